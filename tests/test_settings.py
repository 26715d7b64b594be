"""Analysis settings as frozen dataclasses, and cores jitted with (model spec, settings) as static arguments."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sme import testing
from sme.analyses import REGISTRY, check_settings, common
from sme.analyses import curvature as cu
from sme.analyses import landscape as la
from sme.analyses import noise
from sme.analyses import weak_error as we
from sme.problem import Problem

# (settings type, analysis name, its defaults dict as listed by `sme.listing`)
TYPES = [
    (cu.HessianSettings, "hessian", cu.HESSIAN_DEFAULTS),
    (cu.HessianModifiedSettings, "hessian_modified", cu.HESSIAN_MODIFIED_DEFAULTS),
    (cu.DensitySettings, "hessian_density", cu.DENSITY_DEFAULTS),
    (cu.FisherSettings, "fisher", cu.FISHER_DEFAULTS),
    (noise.CovarianceSettings, "covariance", noise.COVARIANCE_DEFAULTS),
    (noise.AlignmentSettings, "alignment", noise.ALIGNMENT_DEFAULTS),
    (la.FlatnessSettings, "flatness", la.FLATNESS_DEFAULTS),
    (la.TrajectorySettings, "trajectory_flatness", la.TRAJECTORY_DEFAULTS),
    (la.ProfileSettings, "profile", la.PROFILE_DEFAULTS),
    (we.WeakErrorSettings, "weak_error", we.DEFAULTS),
]


@pytest.mark.parametrize("cls,name,defaults", TYPES, ids=[t[1] for t in TYPES])
def test_defaults_fields_and_types(cls, name, defaults):
    s = cls.from_dict(name, {})
    assert s.as_dict() == defaults  # one typed field per documented setting, same defaults
    assert [f.name for f in dataclasses.fields(cls)] == list(defaults)
    assert all(f.type is type(defaults[f.name]) for f in dataclasses.fields(cls))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.num_examples = 3  # every analysis here has it or another field; frozen either way
    assert cls.from_dict(name, s) is s  # already converted: passes through


def test_text_is_cast_once_and_equal_settings_hash_equal():
    from_cli = cu.HessianSettings.from_dict("hessian", {"top_k": "3", "save_vectors": "true", "keep_prob": "0.5"})
    from_config = cu.HessianSettings.from_dict("hessian", {"top_k": 3.0, "save_vectors": True, "keep_prob": 0.5})
    assert from_cli.top_k == 3 and type(from_cli.top_k) is int and from_cli.save_vectors is True
    assert from_cli == from_config and hash(from_cli) == hash(from_config)
    assert from_cli != cu.HessianSettings.from_dict("hessian", {"top_k": 4})
    assert from_cli["top_k"] == 3 and "top_k" in from_cli and "k" not in from_cli
    with pytest.raises(KeyError):
        from_cli["k"]


@pytest.mark.parametrize("name,settings,message", [
    ("hessian", dict(k=3), r"analysis hessian: unknown settings \['k'\]; allowed: "),
    ("hessian", dict(top_k="three"), "analysis hessian: setting top_k='three' is not a int"),
    ("hessian_modified", dict(loss_kind="hess"), "analysis hessian_modified: loss_kind='hess'; expected one of"),
    ("hessian_density", dict(order=0), "analysis hessian_density: order=0 must be >= 1"),
    ("covariance", dict(save_vectors=True), r"analysis covariance: unknown settings \['save_vectors'\]"),
    ("alignment", dict(level="high"), "analysis alignment: setting level='high' is not a float"),
    ("profile", dict(objective="hinge"), "analysis profile: objective='hinge'; expected one of"),
    ("weak_error", dict(num_boot=1.5), "analysis weak_error: setting num_boot=1.5 is not a int"),
])
def test_validation_errors_are_one_line_and_named(name, settings, message):
    cls = {n: c for c, n, _ in TYPES}[name]
    with pytest.raises(ValueError, match=message) as err:
        cls.from_dict(name, settings)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=message):  # the same error before any data is loaded (--set)
        check_settings(name, settings)


def test_model_is_compared_by_spec():
    a, b = testing.curvature_model(0.7), testing.curvature_model(0.7)
    assert a is not b and a.apply is not b.apply  # separately built functions
    assert a == b and hash(a) == hash(b) and not a != b
    assert a != testing.curvature_model(0.5)


def test_equal_settings_compile_once():
    """Equal settings from differently written dicts and separately built models: one trace."""
    traces = []

    @common.jit_core
    def core(problem, params, *, kind, settings):
        traces.append(settings)  # runs once per trace (compilation), not per call
        return problem.model.readout(params) * settings.keep_prob + problem.x[0, 0]

    model = testing.curvature_model(0.7)
    params = model.init(jax.random.key(0), jnp.float32)
    x = jnp.ones((1, 3), jnp.float32)
    problem = lambda m, data: Problem(m, "mse", "shared", data, jnp.ones((1, 2), jnp.float32))
    calls = [common.Core(core, "risk", cu.HessianSettings.from_dict("hessian", s))
             for s in ({"keep_prob": 0.5}, {"keep_prob": "0.5"}, {"keep_prob": 0.5, "top_k": 10})]
    # separately built models (equal specs) and other data of the same shape: the same compilation
    outs = [c(problem(testing.curvature_model(0.7), x * (i + 1)), params) for i, c in enumerate(calls)]
    assert len(traces) == 1 and len(set(calls)) == 1
    # x[0, 0] is traced (1, then 3): the outputs differ by 2, to float32 rounding of O(1) values
    np.testing.assert_allclose(outs[0] + 2.0, outs[2], rtol=0, atol=1e-6)
    common.Core(core, "risk", cu.HessianSettings.from_dict("hessian", {"top_k": 2}))(problem(model, x), params)
    assert len(traces) == 2  # other settings: a second compilation
    common.Core(core, "risk", calls[0].settings)(problem(testing.curvature_model(0.5), x), params)
    assert len(traces) == 3  # another model (a static field of the Problem): a third


def test_analysis_checkpoints_share_one_compilation():
    """The fisher analysis on two checkpoints (fresh model objects, equal settings): one compilation."""
    settings = dict(order=8, top_k=2, kinds="ggn")
    cu._fisher_core.clear_cache()
    outs = [cu.fisher(testing.curvature_context(seed=seed, settings=dict(settings)), key=jax.random.key(seed))
            for seed in (0, 1)]
    assert cu._fisher_core._cache_size() == 1
    assert not np.allclose(outs[0]["ggn_trace"], outs[1]["ggn_trace"])  # different parameters, same compiled core


def test_batched_refuses_contexts_of_different_problems():
    """Equal cores but different models (a static field of the shared Problem), or different
    settings: one vmapped call cannot serve both, so the batch is refused before any compute."""
    batch = REGISTRY["hessian"].batch_fn
    settings = dict(order=4, top_k=1, num_probes=1, hutchpp_sketch=0)
    keys = [jax.random.key(0), jax.random.key(1)]
    for other in (testing.curvature_context(keep_prob=0.5, settings=dict(settings)),
                  testing.curvature_context(settings=dict(settings, top_k=2))):
        with pytest.raises(ValueError, match="share one compiled core"):
            batch([testing.curvature_context(settings=dict(settings)), other], keys=keys)
