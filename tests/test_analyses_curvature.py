"""The curvature analyses (hessian, hessian_density, fisher) on hand-built Contexts.

References are dense matrices from jax.hessian / jax.jacobian of the `sme.losses`
functions; with P = 32 <= order the Lanczos runs span the whole space, so Ritz
values are exact up to rounding (float64: 1e-9 is generous).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sme import losses
from sme.analyses import REGISTRY
from sme.analyses import curvature as cu
from sme.dropout import sample_masks
from sme.models import make_model
from sme import testing


_model = testing.curvature_model
_context = testing.curvature_context


def _dense(fn, params):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(lambda f: jax.hessian(lambda g: fn(unravel(g)))(f))(flat))


def test_registered_with_plots():
    for name in ("hessian", "hessian_density", "fisher"):
        assert REGISTRY[name].plot_fn is not None and REGISTRY[name].doc


def _plot(tmp_path, name, out, step=7):
    """Write one artifact as the runner does and plot it: the plot reads the documented keys."""
    directory = tmp_path / name
    os.makedirs(directory)
    np.savez(directory / f"step_{step:09d}.npz", **out)
    paths = REGISTRY[name].plot_fn(str(directory), [step])
    assert len(paths) == 1
    with open(paths[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_hessian_analysis_matches_dense_eigh_and_traces(tmp_path, x64):
    ctx = _context(dtype=jnp.float64)
    out = cu.hessian(ctx, key=jax.random.key(1))
    x, y = (jnp.asarray(a, jnp.float64) for a in (ctx.dataset.x_train, ctx.dataset.y_train))
    dense = _dense(lambda p: losses.modified_loss(ctx.model, "mse", p, x, y), ctx.params)
    exact = np.linalg.eigvalsh(dense)
    value = float(losses.modified_loss(ctx.model, "mse", ctx.params, x, y))
    assert str(out["loss_kind"]) == "modified" and "closed form" in str(out["loss_label"])
    assert int(out["num_params"]) == 32 and int(out["order"]) == 32 and int(out["num_examples"]) == 20
    np.testing.assert_allclose(out["top_values"], exact[::-1][:10], atol=1e-9)
    np.testing.assert_allclose(out["bottom_values"], exact[:3], atol=1e-9)
    np.testing.assert_allclose(out["ritz_values"], exact, atol=1e-9)
    assert np.all(out["top_residuals"] < 1e-7) and np.all(out["bottom_residuals"] < 1e-7)
    np.testing.assert_allclose(out["loss_value"], value, rtol=1e-12)
    # Unbiased estimators, fixed key: |error| < 4 se fails with probability 6e-5 (CLT).
    for name in ("hutchinson", "hutchpp"):
        assert abs(float(out[f"trace_{name}"]) - np.trace(dense)) < 4 * float(out[f"trace_{name}_se"])
    assert json.loads(str(out["settings"])) == cu.HESSIAN_DEFAULTS
    _plot(tmp_path, "hessian", out)


def test_hessian_analysis_monte_carlo_per_sample_uses_the_documented_masks(x64):
    settings = dict(loss_kind="modified_mc", num_masks=3, top_k=3, bottom_k=0, num_probes=2, hutchpp_sketch=0)
    ctx = _context(dtype=jnp.float64, mask_mode="per_sample", settings=settings)
    key = jax.random.key(4)
    out = cu.hessian(ctx, key=key)
    x, y = (jnp.asarray(a, jnp.float64) for a in (ctx.dataset.x_train, ctx.dataset.y_train))
    masks = sample_masks(ctx.model.sites, key=jax.random.fold_in(key, cu.MASKS), batch_shape=(3, 20),
                         dtype=jnp.float64)
    dense = _dense(lambda p: losses.modified_loss_mc(ctx.model, "mse", p, x, y, masks, mode="per_sample"),
                   ctx.params)
    assert str(out["loss_kind"]) == "modified_mc"
    np.testing.assert_allclose(out["top_values"], np.linalg.eigvalsh(dense)[::-1][:3], atol=1e-9)
    assert out["bottom_values"].shape == (0,) and np.isnan(out["trace_hutchpp"])


def test_density_analysis_integrates_to_one_and_estimates_the_trace(tmp_path, x64):
    ctx = _context(dtype=jnp.float64, settings=dict(num_probes=6))
    out = cu.hessian_density(ctx, key=jax.random.key(2))
    x, y = (jnp.asarray(a, jnp.float64) for a in (ctx.dataset.x_train, ctx.dataset.y_train))
    exact = np.linalg.eigvalsh(_dense(lambda p: losses.modified_loss(ctx.model, "mse", p, x, y), ctx.params))
    assert out["nodes"].shape == out["weights"].shape == (6, 32)
    np.testing.assert_allclose(out["weights"].sum(1), 1.0, atol=1e-12)
    # order = P: every probe's nodes are H's eigenvalues (the Krylov space is the whole space)
    assert np.all(np.min(np.abs(out["nodes"][..., None] - exact), axis=-1) < 1e-9)
    # The grid spans the nodes +- 5 sigma: the Gaussian tails outside are < 3e-7 of the mass.
    assert np.trapezoid(out["density"], out["grid"]) == pytest.approx(1.0, abs=1e-3)
    assert float(out["sigma"]) == pytest.approx(0.01 * (out["nodes"].max() - out["nodes"].min()))
    assert abs(float(out["trace_slq"]) - exact.sum()) < 4 * float(out["trace_slq_se"])  # unbiased (Hutchinson)
    _plot(tmp_path, "hessian_density", out)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_fisher_analysis_matches_dense_definitions(loss, tmp_path, x64):
    ctx = _context(dtype=jnp.float64, loss=loss)
    out = cu.fisher(ctx, key=jax.random.key(3))
    x, y = (jnp.asarray(a, jnp.float64) for a in (ctx.dataset.x_train, ctx.dataset.y_train))
    flat, unravel = ravel_pytree(ctx.params)
    ones = tuple(jnp.ones(s.shape, jnp.float64) for s in ctx.model.sites)
    f = lambda q, xi: ctx.model.apply(unravel(q), xi, ones)
    loss_of = losses.loss_fn(loss)
    grads, jac, hess_out = jax.jit(lambda q: (
        jax.vmap(lambda xi, yi: jax.grad(lambda r: loss_of(f(r, xi), yi))(q))(x, y),
        jax.vmap(lambda xi: jax.jacobian(f)(q, xi))(x),
        jax.vmap(lambda xi, yi: jax.hessian(lambda o: loss_of(o, yi))(f(q, xi)))(x, y)))(flat)
    r1 = float(losses.r1(ctx.model, ctx.params, x))
    n = x.shape[0]
    matrices = {"empirical_fisher": np.asarray(grads).T @ np.asarray(grads) / n,
                "ggn": np.einsum("iap,iab,ibq->pq", jac, hess_out, jac) / n}
    matrices["true_fisher"] = matrices["ggn"]  # one-hot / Gaussian targets: the true Fisher is the GGN
    for name, dense in matrices.items():
        lam = np.linalg.eigvalsh(dense)
        np.testing.assert_allclose(out[f"{name}_trace"], np.trace(dense), rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(out[f"{name}_eigenvalues"], lam[::-1][:5], atol=1e-9, err_msg=name)
        assert np.all(out[f"{name}_residuals"] < 1e-7)
    assert float(out["keep_prob"]) == pytest.approx(0.7)
    if loss == "mse":
        assert float(out["r1"]) == pytest.approx(r1, rel=1e-12)
        assert float(out["r1_quadratic"]) == pytest.approx(r1, rel=1e-12)  # exact for MSE
    else:
        assert np.isnan(out["r1"]) and 0 < float(out["r1_quadratic"]) < np.inf
    _plot(tmp_path, "fisher", out)


def test_checkpoints_share_one_compilation():
    settings = dict(order=12, top_k=3, bottom_k=1, num_probes=4, hutchpp_sketch=2)
    cu._hessian_core.clear_cache()
    for step in (0, 50):
        ctx = _context(seed=step, step=step, settings=settings)
        out = cu.hessian(ctx, key=jax.random.key(step))
        assert out["top_values"].shape == (3,) and np.all(np.isfinite(out["top_values"]))
    assert cu._hessian_core._cache_size() == 1  # two checkpoints, one trace and compilation


def test_bad_settings_are_named():
    ctx = _context
    with pytest.raises(ValueError, match="unknown settings"):
        cu.hessian(ctx(settings=dict(k=3)), key=jax.random.key(0))
    with pytest.raises(ValueError, match="loss_kind"):
        cu.hessian(ctx(settings=dict(loss_kind="hess")), key=jax.random.key(0))
    with pytest.raises(ValueError, match="top_k=40"):
        cu.hessian(ctx(settings=dict(top_k=40)), key=jax.random.key(0))
    with pytest.raises(ValueError, match="kinds"):
        cu.fisher(ctx(settings=dict(kinds="ggn,hessian")), key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_examples=50"):
        cu.hessian_density(ctx(settings=dict(num_examples=50)), key=jax.random.key(0))
    with pytest.raises(ValueError, match="is not a int"):
        cu.hessian(ctx(settings=dict(order="many")), key=jax.random.key(0))
    with pytest.raises(ValueError, match="closed-form"):
        cu.hessian(ctx(loss="cross_entropy", settings=dict(loss_kind="modified")), key=jax.random.key(0))


def test_hessian_modified_measures_a_net_without_dropout_on_its_dropout_twins_loss(x64):
    # trained "without dropout" (keep_prob 1); L_S at q = 0.6 on its hidden layer, enumerated (5 units)
    settings = dict(keep_prob=0.6, loss_kind="modified_exact", order=32, top_k=3, bottom_k=1, num_probes=4,
                    hutchpp_sketch=0)
    ctx = _context(loss="cross_entropy", keep_prob=1.0, dtype=jnp.float64, settings=settings)
    out = REGISTRY["hessian_modified"].fn(ctx, key=jax.random.key(0))
    x, y = jnp.asarray(ctx.dataset.x_train, jnp.float64), jnp.asarray(ctx.dataset.y_train, jnp.float64)
    twin = _model(0.6)
    dense = _dense(lambda p: losses.modified_loss_exact(twin, "cross_entropy", p, x, y), ctx.params)
    np.testing.assert_allclose(out["top_values"], np.linalg.eigvalsh(dense)[::-1][:3], rtol=1e-9)
    assert float(out["loss_keep_prob"]) == 0.6 and str(out["loss_kind"]) == "modified_exact"
    # the same net's R_S Hessian differs: the loss really changed
    plain = _dense(lambda p: losses.risk(ctx.model, "cross_entropy", p, x, y), ctx.params)
    assert abs(np.linalg.eigvalsh(plain)[-1] - float(out["top_values"][0])) > 1e-3
    # without keep_prob the run has no dropout and hessian_modified refuses, naming the fix
    with pytest.raises(ValueError, match="keep_prob"):
        REGISTRY["hessian_modified"].fn(_context(keep_prob=1.0, settings=dict(order=8)), key=jax.random.key(0))
    with pytest.raises(ValueError, match="keep_prob"):
        REGISTRY["hessian"].fn(_context(settings=dict(keep_prob=1.5)), key=jax.random.key(0))


def test_curvature_uses_the_runs_per_site_keep_probs_and_refuses_an_ambiguous_override(x64):
    from configs import base
    from sme import config as config_lib

    cfg = base.get_config()
    cfg.model.name, cfg.model.hidden, cfg.model.activation = "mlp", (4, 3), "tanh"
    cfg.model.keep_prob, cfg.model.dropout_layers = 0.9, "0:0.8,1:0.5"
    ctx = _context(loss="cross_entropy", dtype=jnp.float64)
    model = config_lib.build_model(cfg, ctx.dataset)
    assert [s.keep_prob for s in model.sites] == [0.8, 0.5]
    params = model.init(jax.random.key(3), jnp.float64)
    # 7 droppable units: L_S enumerated over 128 masks; P = 39 <= order, so Ritz values are exact
    settings = dict(loss_kind="modified_exact", order=39, top_k=3, bottom_k=0, num_probes=2, hutchpp_sketch=0)
    ctx = _context(loss="cross_entropy", dtype=jnp.float64, model=model, params=params, settings=settings)
    out = REGISTRY["hessian"].fn(ctx, key=jax.random.key(0))
    x, y = jnp.asarray(ctx.dataset.x_train, jnp.float64), jnp.asarray(ctx.dataset.y_train, jnp.float64)
    dense = _dense(lambda p: losses.modified_loss_exact(model, "cross_entropy", p, x, y), params)
    np.testing.assert_allclose(out["top_values"], np.linalg.eigvalsh(dense)[::-1][:3], rtol=1e-9)
    np.testing.assert_array_equal(out["loss_site_keep_probs"], [0.8, 0.5])
    assert np.isnan(float(out["loss_keep_prob"]))  # no single keep probability
    # the uniform model.keep_prob would be another loss
    uniform = make_model("mlp", in_dim=3, hidden=(4, 3), out_dim=2, activation="tanh", keep_prob=0.9)
    other = _dense(lambda p: losses.modified_loss_exact(uniform, "cross_entropy", p, x, y), params)
    assert abs(np.linalg.eigvalsh(other)[-1] - float(out["top_values"][0])) > 1e-3
    # one q for layers of different keep probabilities: refused, naming them
    for name in ("hessian", "hessian_modified", "hessian_density"):
        bad = _context(loss="cross_entropy", dtype=jnp.float64, model=model, params=params,
                       settings=dict(keep_prob=0.8, order=8, top_k=1) if name != "hessian_density"
                       else dict(keep_prob=0.8, order=8))
        with pytest.raises(ValueError, match=r"keep_prob=0.8 is ambiguous.*0:0.8, 1:0.5"):
            REGISTRY[name].fn(bad, key=jax.random.key(0))
