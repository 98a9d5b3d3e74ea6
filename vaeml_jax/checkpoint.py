"""Atomic training checkpoints with Orbax: the train state (params + optimizer state) and metadata.

A checkpoint is one directory ``<run>/checkpoints/<epoch>/`` written by
:class:`orbax.checkpoint.CheckpointManager` with two items:

* ``state``: the train-state pytree (``{"params": ..., "opt_state": ...}``), saved with
  ``StandardSave`` and restored with ``StandardRestore`` against an abstract template (so the
  optimizer's NamedTuples come back as NamedTuples);
* ``meta``: a small JSON document (``epoch``, the resolved training config, the library version).

Atomicity. Orbax writes every checkpoint into ``<epoch>.orbax-checkpoint-tmp-*`` and renames it into
place only once all of it is on disk, so a process killed at any moment (SIGKILL included) leaves
either a complete checkpoint or a temporary directory that is ignored and removed on the next
start. Old checkpoints beyond ``keep`` are first *renamed* into ``checkpoints/_trash/`` (one atomic
rename) and only then deleted, so a kill during clean-up cannot leave a half-deleted directory that
looks like a checkpoint. :meth:`Checkpointer.restore` falls back to the previous checkpoint (with a
warning) should the newest one nevertheless fail to read.

Several processes. Every process of a multi-process run creates the :class:`Checkpointer` and calls
:meth:`~Checkpointer.save` and :meth:`~Checkpointer.restore` at the same point (Orbax writes and
reads collectively; the directory must be one that every process sees: a shared file system, or
the same machine). Orbax's primary process (0) renames a finished checkpoint into place and
cleans up; ``_trash/`` is emptied by process 0 only. A checkpoint holds whole arrays, not
per-process pieces, so it restores on any number of processes and devices (one included): the
target shardings come from the template (``_abstract``).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpointer", "TRASH"]

TRASH = "_trash"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the model it is restored into."""


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs of a pytree of arrays (or of ShapeDtypeStructs), for StandardRestore.

    Every leaf gets a sharding on THIS process's devices: a concrete array keeps its own, an
    abstract leaf without one (``jax.eval_shape``'s) is placed on the first local device. Without
    a target sharding Orbax would rebuild the sharding stored in the checkpoint, i.e. the devices
    of the process that wrote it, and a checkpoint written on 4 devices would not open on 1
    ("Topology mismatch").
    """
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x: Any) -> Any:
        s = ocp.utils.to_shape_dtype_struct(x)
        if isinstance(s, jax.ShapeDtypeStruct) and s.sharding is None:
            s = jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=here)
        return s

    return jax.tree.map(leaf, tree)


class Checkpointer:
    """A thin, safe wrapper around :class:`orbax.checkpoint.CheckpointManager`.

    Args:
      directory: where the checkpoints live (created when ``create=True``).
      keep: how many of the most recent checkpoints to keep (>= 1).
      async_save: write in a background thread (call :meth:`wait` or :meth:`close` before the
        process ends). Off by default: a synchronous save of a paper-sized model takes a fraction
        of a second, and :meth:`save` returning then means the checkpoint is on disk.
      read_only: only read (evaluation, plots): nothing is created, cleaned up or deleted, so it
        is safe while a training process writes into the same directory. A missing directory
        gives :class:`CheckpointError`.

    Example::

        ckpt = Checkpointer(run_dir / "checkpoints", keep=3)
        ckpt.save(epoch, {"params": params, "opt_state": opt_state}, {"epoch": epoch})
        state, meta, epoch = ckpt.restore(template_state)
        ckpt.close()
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int = 3,
        async_save: bool = False,
        read_only: bool = False,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 checkpoint, got {keep}.")
        self.directory = Path(directory).absolute()
        self._async = bool(async_save)
        self._read_only = bool(read_only)
        if read_only:
            if not self.directory.is_dir():
                raise CheckpointError(f"no checkpoint directory at {self.directory}.")
            # (not Orbax's read_only option, which logs warnings: no max_to_keep and no
            # clean-up means this manager never deletes or creates anything)
            options = ocp.CheckpointManagerOptions(
                create=False, cleanup_tmp_directories=False, enable_async_checkpointing=False
            )
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._clear_trash()
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                cleanup_tmp_directories=True,  # leftovers of a killed save
                enable_async_checkpointing=async_save,
                todelete_subdir=TRASH,  # delete = atomic rename first, see the module docstring
            )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    # -- queries ---------------------------------------------------------------------------------
    def epochs(self) -> list[int]:
        """The epochs with a complete checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_epoch(self) -> int | None:
        steps = self.epochs()
        return steps[-1] if steps else None

    # -- save / restore --------------------------------------------------------------------------
    def save(self, epoch: int, state: Any, meta: dict) -> None:
        """Save ``state`` (a pytree of arrays) and ``meta`` (JSON-serialisable) as ``epoch``.

        Never call this with a state that failed a finiteness check: the checkpoint is trusted as
        "last good" by ``--resume``.
        """
        if self._read_only:
            raise CheckpointError("this Checkpointer was opened read-only.")
        self._manager.save(
            int(epoch),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
            ),
            force=True,
        )
        if not self._async:
            self._clear_trash()

    def read_meta(self, epoch: int | None = None) -> dict:
        """The JSON metadata of checkpoint ``epoch`` (default: the latest)."""
        epoch = self._pick(epoch)
        try:
            out = self._manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(
                f"cannot read the metadata of checkpoint {epoch} in {self.directory}: {e}"
            ) from e
        return dict(out.meta)

    def restore(self, template: Any, epoch: int | None = None) -> tuple[Any, dict, int]:
        """Restore ``(state, meta, epoch)``; ``template`` gives the tree structure, shapes, dtypes.

        With ``epoch=None`` the latest checkpoint is read; should it fail, older ones are tried in
        turn (a warning names the one skipped). A shape or structure mismatch with ``template``
        (a different model size) raises :class:`CheckpointError`.
        """
        if epoch is not None:
            return self._restore_one(template, self._pick(epoch))
        candidates = self.epochs()[::-1]
        if not candidates:
            raise CheckpointError(f"no checkpoint found in {self.directory}.")
        errors = []
        for step in candidates:
            try:
                return self._restore_one(template, step)
            except CheckpointError as e:
                errors.append(str(e))
                if step != candidates[-1]:
                    warnings.warn(
                        f"checkpoint {step} could not be read ({e}); trying the previous one.",
                        stacklevel=2,
                    )
        raise CheckpointError("no checkpoint could be read:\n  " + "\n  ".join(errors))

    def _restore_one(self, template: Any, step: int) -> tuple[Any, dict, int]:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(template)), meta=ocp.args.JsonRestore()
        )
        try:
            out = self._manager.restore(step, args=args)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} cannot be restored into this model "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e
        return out.state, dict(out.meta), step

    def _pick(self, epoch: int | None) -> int:
        steps = self.epochs()
        if not steps:
            raise CheckpointError(f"no checkpoint found in {self.directory}.")
        if epoch is None:
            return steps[-1]
        if epoch not in steps:
            raise CheckpointError(
                f"no checkpoint for epoch {epoch} in {self.directory}; available: {steps}."
            )
        return int(epoch)

    # -- lifecycle -------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until a background save has finished (and been renamed into place)."""
        self._manager.wait_until_finished()
        self._clear_trash()

    def close(self) -> None:
        """Finish any background save, then release the checkpoint manager."""
        self._manager.wait_until_finished()
        self._manager.close()
        self._clear_trash()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _clear_trash(self) -> None:
        if self._read_only or jax.process_index() != 0:
            return
        trash = self.directory / TRASH
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
