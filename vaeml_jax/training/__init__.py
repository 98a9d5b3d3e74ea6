"""The parts of :func:`vaeml_jax.train.train`, one concern per module.

``config`` (TrainConfig and its validation), ``optim`` (Adam, learning-rate schedules), ``build``
(data, model and estimator of a config), ``step`` (TrainState, the train step, the epoch runner),
``records`` (the per-epoch record and log line), ``loop`` (the job a config builds, one epoch's
run, the length estimate), ``rundir`` (the run directory's files and :func:`load_run`).
:mod:`vaeml_jax.train` holds ``train()`` and re-exports the public names.
"""
