"""The issue-10 options of TrainConfig / the CLI: encoder family, encoder objectives and particles,
rejuvenation; resolved and validated with one clear error, passed through to the model and the
estimator (no training here: the CLI tests run a real one)."""

import pytest

from vaeml_jax.training.build import build_vae, make_estimator
from vaeml_jax.training.config import ConfigError, TrainConfig, parse_rejuvenation


def cfg(**kw):
    return TrainConfig.from_dict(dict(hidden=[8], latent_dim=2, **kw)).resolved()


def test_rejuvenation_resolves_to_the_plain_loop_and_reaches_the_estimator():
    c = cfg(rejuvenation="2,0.4,0.2")
    assert c.num_slots is None
    r = parse_rejuvenation(c.rejuvenation)
    assert (r.num_steps, r.step_size, r.meet_scale) == (2, 0.4, 0.2)
    est = make_estimator(c, build_vae(c).model)
    assert est.name == "unbiased"
    # The warm-start phase's estimator does not inherit the main phase's rejuvenation.
    w = cfg(rejuvenation="2,0.4,0.2", warm_start_epochs=1, epochs=2).warm_start_config()
    assert w.rejuvenation is None and w.estimator == "iwae"


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(rejuvenation="3,0.5"), "STEPS,STEP_SIZE,MEET_SCALE"),
        (dict(rejuvenation="0,0.5,0"), "does nothing"),
        (dict(rejuvenation="1,0.5,0.3", num_slots=4), "plain loop only"),
        (dict(rejuvenation="1,0.5,0.3", estimator="iwae"), "--estimator unbiased"),
        (dict(encoder="flow"), "unknown encoder 'flow'"),
        (dict(encoder="iaf", two_layer=True), "one stochastic layer"),
        (dict(encoder="iaf", iaf_hidden=[]), "iaf_hidden"),
        (dict(encoder_particles=0), "encoder_particles must be a positive integer"),
        (dict(encoder_particles=5, encoder_objective="inclusive_kl"), "reparameterised"),
        (dict(encoder_objective="dreg"), "unknown encoder_objective 'dreg'"),
    ],
)
def test_bad_options_name_the_problem(kw, message):
    with pytest.raises(ConfigError, match=message):
        cfg(**kw)


@pytest.mark.parametrize("encoder", ["diag", "full_cov", "iaf"])
def test_encoder_family_reaches_the_model(encoder):
    c = cfg(encoder=encoder, iaf_layers=1, iaf_hidden="16", encoder_objective="iwae_dreg")
    vae = build_vae(c)
    assert vae.config.encoder == encoder
    assert c.to_dict()["iaf_hidden"] == [16]
    make_estimator(c, vae.model)  # builds with the new objective
