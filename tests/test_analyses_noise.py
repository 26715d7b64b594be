import dataclasses
import json
import os
import sys
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sme import grads, losses, models, testing
from sme.analyses import as_numpy, load_all
from sme.analyses import noise


# Every test compares against float64 dense references.
pytestmark = pytest.mark.usefixtures("x64")

_context = testing.noise_context


def _masks(ctx, key, k):
    return grads.draw_masks(ctx.model, key=key, num_masks=k, mode=ctx.mask_mode, num_examples=12,
                            dtype=jnp.float64)


def test_analyses_are_registered_with_plots():
    registry = load_all()
    for name in ("covariance", "alignment"):
        assert registry[name].plot_fn is not None and registry[name].doc


def test_covariance_analysis_matches_dense_references():
    settings = dict(num_masks=8, top_k=4, decomposition_masks=4, decomposition_examples=6)
    ctx = _context(loss="cross_entropy", settings=settings)
    key = jax.random.key(3)
    out = as_numpy(noise.covariance(ctx, key=key))
    x, y = jnp.asarray(ctx.dataset.x_train), jnp.asarray(ctx.dataset.y_train)
    g = jax.jit(lambda p, m: grads.mask_gradients(ctx.model, ctx.loss, p, x, y, m, mode=ctx.mask_mode))(
        ctx.params, _masks(ctx, jax.random.fold_in(key, noise.MASKS), 8))
    sigma = np.cov(np.asarray(g).T, ddof=1)
    np.testing.assert_allclose(out["sigma_eigenvalues"], np.linalg.eigvalsh(sigma)[::-1][:4], rtol=1e-8)
    np.testing.assert_allclose(out["sigma_trace"], np.trace(sigma), rtol=1e-10)
    np.testing.assert_allclose(out["sigma_frobenius"], np.linalg.norm(sigma), rtol=1e-10)
    rows = jax.jit(lambda p: grads.per_sample_gradients(ctx.model, ctx.loss, p, x, y))(ctx.params)
    sgd = np.cov(np.asarray(rows).T, ddof=0)  # all 12 examples: the population covariance
    np.testing.assert_allclose(out["sgd_eigenvalues"], np.linalg.eigvalsh(sgd)[::-1][:4], rtol=1e-8)
    np.testing.assert_allclose(out["sgd_trace"], np.trace(sgd), rtol=1e-10)
    # the run's batch of 4 from 12 examples, per-sample masks: factors (f/B, 1/B, 1/B), f = 8/11
    assert int(out["batch_size"]) == 4
    np.testing.assert_allclose(out["minibatch_traces"][:3], out["component_traces"] * [8 / 11 / 4, 1 / 4, 1 / 4])
    np.testing.assert_allclose(out["minibatch_traces"][3], out["minibatch_traces"][:3].sum())
    assert json.loads(str(out["settings"]))["num_masks"] == 8
    assert str(out["mask_mode"]) == "per_sample"


def test_covariance_decomposition_estimates_track_the_enumerated_truth():
    from sme import covariance as cv

    ctx = _context(settings=dict(num_masks=4, top_k=2, decomposition_masks=256, decomposition_examples=0))
    out = noise.covariance(ctx, key=jax.random.key(0))
    x, y = jnp.asarray(ctx.dataset.x_train), jnp.asarray(ctx.dataset.y_train)
    table, probs = cv.enumerate_gradient_table(ctx.model, ctx.loss, ctx.params, x, y)
    exact = np.array([float(cv.trace(c)) for c in cv.noise_components(table, probs)])
    # unbiased estimates from K = 256 masks: Monte Carlo error O(K^-1/2), 25 % is > 4 standard errors here
    np.testing.assert_allclose(out["component_traces"], exact, rtol=0.25)


@pytest.mark.parametrize("name,loss,kind", [("mlp", "cross_entropy", "modified_exact"),
                                            ("two_layer", "mse", "modified")])
def test_alignment_analysis_matches_dense_computation(name, loss, kind):
    ctx = _context(name=name, loss=loss, settings=dict(num_masks=6, top_k=5, sgd_examples=0, num_boot=200))
    key = jax.random.key(5)
    out = as_numpy(noise.alignment(ctx, key=key))
    assert str(out["hessian_of"]) == kind
    x, y = jnp.asarray(ctx.dataset.x_train), jnp.asarray(ctx.dataset.y_train)
    flat, unravel = ravel_pytree(ctx.params)
    h = np.asarray(jax.jit(jax.hessian(lambda f: losses.modified_loss_exact(ctx.model, loss, unravel(f), x, y)))(
        flat))
    values, vectors = np.linalg.eigh(h)
    np.testing.assert_allclose(out["hessian_eigenvalues"], values[::-1][:5], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(out["hessian_frobenius"], np.linalg.norm(h), rtol=1e-10)
    g = grads.mask_gradients(ctx.model, loss, ctx.params, x, y,
                             _masks(ctx, jax.random.fold_in(key, noise.MASKS), 6), mode=ctx.mask_mode)
    rows = grads.per_sample_gradients(ctx.model, loss, ctx.params, x, y)
    for noise_name, sigma in (("dropout", np.cov(np.asarray(g).T, ddof=1)),
                              ("sgd", np.cov(np.asarray(rows).T, ddof=0))):
        alpha = np.trace(h @ sigma) / (np.linalg.norm(h) * np.linalg.norm(sigma))
        np.testing.assert_allclose(out[f"{noise_name}_alpha"], alpha, rtol=1e-8)
        u = vectors[:, ::-1][:, :5]
        np.testing.assert_allclose(out[f"{noise_name}_projected_variance"],
                                   np.einsum("pi,pq,qi->i", u, sigma, u), rtol=1e-6, atol=1e-14)
        null = np.trace(h) * np.trace(sigma) / (h.shape[0] * np.linalg.norm(h) * np.linalg.norm(sigma))
        np.testing.assert_allclose(out[f"{noise_name}_null_haar_mean"], null, rtol=1e-8)
    assert np.isfinite(out["dropout_slope"]) == (int(out["dropout_slope_points"]) >= 3)  # a slope iff >= 3 points


def test_alignment_compiles_once_per_architecture_and_plots(tmp_path):
    settings = dict(num_masks=4, top_k=3, sgd_examples=6, num_boot=100)
    noise._alignment_core.clear_cache()
    for step, seed in ((0, 1), (10, 2)):
        # a fresh Model object per checkpoint, as a runner might build: equal specs share the compilation
        ctx = _context(name="two_layer", settings=settings, step=step, params_seed=seed)
        out = as_numpy(noise.alignment(ctx, key=jax.random.key(step)))
        np.savez(os.path.join(tmp_path, f"step_{step:09d}.npz"), **out)
        cov = as_numpy(noise.covariance(_context(settings=dict(num_masks=4, top_k=2, decomposition_masks=2)),
                                        key=jax.random.key(step)))
        os.makedirs(tmp_path / "cov", exist_ok=True)
        np.savez(os.path.join(tmp_path, "cov", f"step_{step:09d}.npz"), **cov)
    assert noise._alignment_core._cache_size() == 1  # two checkpoints, one trace and compilation
    written = noise.plot_alignment(str(tmp_path), [0, 10]) + noise.plot_covariance(str(tmp_path / "cov"), [0, 10])
    assert len(written) == 3 and all(os.path.getsize(p) > 1000 for p in written)


def test_without_dropout_alignment_is_undefined_not_an_error():
    ctx = _context(name="two_layer", settings=dict(num_masks=4, top_k=3, num_boot=100))
    model = models.make_model("two_layer", in_dim=3, hidden=(4,), out_dim=1, keep_prob=1.0)
    ctx = dataclasses.replace(ctx, model=model)
    out = as_numpy(noise.alignment(ctx, key=jax.random.key(0)))
    assert str(out["hessian_of"]) == "risk"
    assert out["dropout_sigma_trace"] == 0.0 and np.isnan(out["dropout_null_haar_mean"])
    assert np.isnan(out["dropout_slope"]) and int(out["dropout_slope_points"]) == 0
    assert np.isfinite(out["sgd_alpha"]) and np.isfinite(out["sgd_null_haar_mean"])


def test_bad_settings_are_named():
    ctx = _context(settings=dict(num_maskz=3))
    with pytest.raises(ValueError, match="num_maskz"):
        noise.covariance(ctx, key=jax.random.key(0))
    with pytest.raises(ValueError, match="top_k"):
        noise.covariance(_context(settings=dict(num_masks=4, top_k=9)), key=jax.random.key(0))


def _dense_lanczos_module():
    """A stand-in for `sme.lanczos` with the pinned signature, exact by dense eigh (tests the plumbing)."""
    module = types.ModuleType("sme.lanczos")

    class Eigenpairs(NamedTuple):
        values: jax.Array
        vectors: jax.Array
        residuals: jax.Array

    def top_eigenpairs(matvec, dim, *, key, k, order, which="largest"):
        del key, order
        assert which == "largest"
        dense = jax.vmap(matvec)(jnp.eye(dim))
        values, vectors = jnp.linalg.eigh((dense + dense.T) / 2)
        values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k].T
        return Eigenpairs(values, vectors, jnp.linalg.norm(jax.vmap(matvec)(vectors) - values[:, None] * vectors,
                                                          axis=1))

    module.top_eigenpairs = top_eigenpairs
    return module


def _lanczos_vs_dense(settings):
    dense = as_numpy(noise.alignment(_context(settings=settings), key=jax.random.key(1)))
    lanczos = as_numpy(noise.alignment(_context(settings=dict(settings, dense_max_params=0)), key=jax.random.key(1)))
    np.testing.assert_allclose(lanczos["hessian_eigenvalues"], dense["hessian_eigenvalues"], rtol=1e-6)
    np.testing.assert_allclose(lanczos["dropout_tr_h_sigma"], dense["dropout_tr_h_sigma"], rtol=1e-10)
    np.testing.assert_allclose(lanczos["dropout_projected_variance"], dense["dropout_projected_variance"],
                               rtol=1e-5, atol=1e-14)
    # deflated Hutchinson: within 5 of its standard errors (plus rounding)
    for name in ("trace", "frobenius"):
        assert abs(lanczos[f"hessian_{name}"] - dense[f"hessian_{name}"]) <= \
            5 * lanczos[f"hessian_{name}_se"] + 1e-8 * abs(dense[f"hessian_{name}"])
    assert lanczos["hessian_frobenius_se"] > 0


@pytest.mark.slow
def test_alignment_matrix_free_path_with_the_pinned_lanczos_signature(monkeypatch):
    monkeypatch.setitem(sys.modules, "sme.lanczos", _dense_lanczos_module())
    _lanczos_vs_dense(dict(num_masks=4, top_k=3, sgd_examples=0, num_boot=100, lanczos_order=7, num_probes=16))


@pytest.mark.slow
def test_alignment_lanczos_path_agrees_with_dense():
    pytest.importorskip("sme.lanczos")
    # P = 39 parameters and 39 Lanczos steps: the Krylov space is everything, Ritz values are exact
    _lanczos_vs_dense(dict(num_masks=4, top_k=3, sgd_examples=0, num_boot=100, lanczos_order=39, num_probes=16))


@pytest.mark.heavy
def test_alignment_with_the_risk_hessian_and_the_unbiased_frobenius():
    import itertools

    settings = dict(num_masks=6, top_k=3, sgd_examples=6, num_boot=100, loss_kind="risk")
    ctx = _context(loss="cross_entropy", settings=settings)
    key = jax.random.key(7)
    out = as_numpy(noise.alignment(ctx, key=key))
    assert str(out["hessian_of"]) == "risk"
    x, y = jnp.asarray(ctx.dataset.x_train), jnp.asarray(ctx.dataset.y_train)
    flat, unravel = ravel_pytree(ctx.params)
    h = np.asarray(jax.hessian(lambda f: losses.risk(ctx.model, ctx.loss, unravel(f), x, y))(flat))
    np.testing.assert_allclose(out["hessian_frobenius"], np.linalg.norm(h), rtol=1e-10)
    g = np.asarray(grads.mask_gradients(ctx.model, ctx.loss, ctx.params, x, y,
                                        _masks(ctx, jax.random.fold_in(key, noise.MASKS), 6),
                                        mode=ctx.mask_mode))
    sigma = np.cov(g.T, ddof=1)
    # ||Sigma||_F² by its definition: (1/4) mean over distinct (i, j, k, l) of ((g_i - g_j)^T (g_k - g_l))²
    u = np.mean([((g[i] - g[j]) @ (g[k] - g[l])) ** 2 / 4 for i, j, k, l in itertools.permutations(range(6), 4)])
    np.testing.assert_allclose(out["dropout_sigma_frobenius_unbiased"], np.sqrt(u), rtol=1e-8)
    np.testing.assert_allclose(out["dropout_alpha_unbiased"],
                               np.trace(h @ sigma) / (np.linalg.norm(h) * np.sqrt(u)), rtol=1e-8)
    assert out["dropout_sigma_frobenius_unbiased"] < out["dropout_sigma_frobenius"]
    assert -1 <= out["sgd_alpha"] <= 1  # a cosine; H of R_S may be indefinite, so alpha may be < 0
    with pytest.raises(ValueError, match="loss_kind"):
        noise.alignment(dataclasses.replace(ctx, settings=dict(settings, loss_kind="fixed_mask")), key=key)
