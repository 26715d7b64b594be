"""The landscape analyses (flatness, trajectory_flatness, profile) on a hand-built Context."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sme import landscape, losses
from sme.analyses import REGISTRY, Context
from sme.analyses import landscape as la
from sme.data import Dataset
from sme.dropout import sample_masks
from sme.models import make_model


def _context(tmp_path=None, *, keep_prob=0.7, hidden=5, settings=None, params_seed=0, **overrides):
    model = make_model("mlp", in_dim=3, hidden=(hidden,), out_dim=2, activation="tanh", keep_prob=keep_prob)
    rng = np.random.default_rng(0)
    f32 = lambda a: np.asarray(a, np.float32)
    x, xt = f32(rng.normal(size=(20, 3))), f32(rng.normal(size=(10, 3)))
    y, yt = f32(np.tanh(x[:, :2]) + 0.3), f32(np.tanh(xt[:, :2]) + 0.3)
    fields = dict(model=model, dataset=Dataset(x, y, xt, yt, 0, "toy"), loss="mse", mask_mode="shared",
                  lr=0.1, params=model.init(jax.random.key(params_seed)), step=0, seed=0, replica=0,
                  settings=settings or {}, run_config={"train": {"batch_size": 8}},
                  workdir=str(tmp_path) if tmp_path else "")
    fields.update(overrides)
    return Context(**fields)


def _risk(ctx, flat_params):
    unravel = ravel_pytree(ctx.params)[1]
    return float(losses.risk(ctx.model, ctx.loss, unravel(flat_params), ctx.dataset.x_train, ctx.dataset.y_train))


def _check_crossings(ctx, result, reference):
    """Each reported side lands on L = c L(theta*) (float32 loss, 2^-21 bracket: rtol 1e-3)."""
    loss0 = _risk(ctx, reference)
    np.testing.assert_allclose(result["loss_star"], loss0, rtol=1e-5)
    for i, c in enumerate(result["factors"]):
        for j, u in enumerate(result["directions"]):
            for side, sign in (("right", 1.0), ("left", -1.0)):
                s = result[side][i, j]
                if result["capped"][i, j] and s >= la.FLATNESS_DEFAULTS["max_distance"]:
                    continue
                np.testing.assert_allclose(_risk(ctx, reference + sign * s * u), c * loss0, rtol=1e-3)
                assert _risk(ctx, reference + 0.5 * sign * s * u) <= c * loss0 * (1 + 1e-5)


def test_flatness_analysis_matches_dense_gradient_pca():
    settings = dict(num_masks=12, num_components=5, num_boot=200)
    ctx = _context(settings=settings)
    key = jax.random.key(3)
    result = la.flatness(ctx, key=key)
    # Independent reference: the documented noise draw of row k, a dense covariance, eigh.
    grad = jax.grad(losses.dropout_risk, argnums=2)
    x, y = jnp.asarray(ctx.dataset.x_train), jnp.asarray(ctx.dataset.y_train)
    rows = np.stack([
        np.asarray(ravel_pytree(grad(ctx.model, "mse", ctx.params, x, y,
                                     sample_masks(ctx.model.sites, key=k), mode="shared"))[0], np.float64)
        for k in jax.random.split(jax.random.fold_in(key, la.ROWS), 12)])
    dense = np.sort(np.linalg.eigvalsh(np.cov(rows.T, ddof=1)))[::-1][:11]
    # float32 gradients and Gram eigh: errors ~1e-6 of the top variance.
    np.testing.assert_allclose(result["variances"], dense, rtol=1e-3, atol=1e-5 * dense[0])
    proj = (rows - rows.mean(0)) @ result["directions"].T.astype(np.float64)
    np.testing.assert_allclose(proj.var(axis=0, ddof=1), result["variances"][:5], rtol=1e-3)
    flat = ravel_pytree(ctx.params)[0]
    _check_crossings(ctx, result, np.asarray(flat))
    assert result["width"].shape == (2, 5) and result["directions"].shape == (5, 32)
    assert np.all(result["width"][1] > result["width"][0])  # c = e > 2: wider intervals
    reported = json.loads(result["settings"])
    assert reported == dict(la.FLATNESS_DEFAULTS, **settings)
    for tag in la.FACTOR_NAMES:
        assert np.isfinite(result[f"psi_{tag}"]) == (f"fit_error_{tag}" not in result)  # a psi, or the reason why not


def test_flatness_noise_kinds_and_bad_settings():
    ctx = _context(keep_prob=1.0, settings=dict(num_masks=6, num_components=3, noise="minibatch", num_boot=100))
    result = la.flatness(ctx, key=jax.random.key(0))
    assert json.loads(result["settings"])["batch_size"] == 8  # taken from the run's train.batch_size
    assert np.all(result["variances"][:3] > 0)
    both = la.flatness(_context(mask_mode="per_sample", settings=dict(
        num_masks=6, num_components=3, noise="dropout_minibatch", batch_size=5, num_boot=100)),
        key=jax.random.key(0))
    assert both["variances"].shape == (5,) and np.all(both["variances"] > 0)
    assert json.loads(both["settings"])["batch_size"] == 5
    # Two droppable units: d <= 4 distinct masks among the 12 drawn, so the centred mask
    # gradients span d - 1 dimensions and the other variances are round-off.
    few_ctx = _context(hidden=2, settings=dict(num_masks=12, num_components=6, num_boot=100))
    few = la.flatness(few_ctx, key=jax.random.key(0))
    drawn = {tuple(np.asarray(sample_masks(few_ctx.model.sites, key=k)[0]))
             for k in jax.random.split(jax.random.fold_in(jax.random.key(0), la.ROWS), 12)}
    rank = len(drawn) - 1
    np.testing.assert_array_equal(few["resolved"], np.arange(6) < rank)
    assert few["num_fit_points_c2"] <= 2 and "fit_error_c2" in few  # PC 1 excluded: too few to fit
    with pytest.raises(ValueError, match="no dropout"):
        la.flatness(_context(keep_prob=1.0, settings=dict(num_masks=6, num_components=3)), key=jax.random.key(0))
    with pytest.raises(ValueError, match="unknown settings"):
        la.flatness(_context(settings=dict(num_mask=6)), key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_components"):
        la.flatness(_context(settings=dict(num_masks=4, num_components=4)), key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_masks='six' is not a int"):
        la.flatness(_context(settings=dict(num_masks="six")), key=jax.random.key(0))
    with pytest.raises(ValueError, match="objective"):
        la.flatness(_context(settings=dict(objective="nope")), key=jax.random.key(0))


def _write_snapshots(directory, ctx, num, *, replicas=None):
    flat = np.asarray(ravel_pytree(ctx.params)[0])
    rng = np.random.default_rng(1)
    scales = np.geomspace(1e-1, 1e-3, flat.size)  # anisotropic wandering around theta
    shape = (num, flat.size) if replicas is None else (replicas, num, flat.size)
    stack = (flat + rng.normal(size=shape) * scales).astype(np.float32)
    np.savez(os.path.join(directory, "snapshots.npz"), params=stack, steps=np.arange(num))
    return stack


def test_trajectory_flatness_reads_snapshots(tmp_path):
    settings = dict(num_components=4, num_boot=200)
    ctx = _context(tmp_path, settings=settings)
    stack = _write_snapshots(tmp_path, ctx, 10).astype(np.float64)
    result = la.trajectory_flatness(ctx, key=jax.random.key(0))
    dense = np.sort(np.linalg.eigvalsh(np.cov(stack.T, ddof=1)))[::-1][:9]
    np.testing.assert_allclose(result["variances"], dense, rtol=1e-3, atol=1e-5 * dense[0])
    assert result["num_snapshots"] == 10
    _check_crossings(ctx, result, np.asarray(stack[-1], np.float32))  # reference = last snapshot
    # The fallback for contexts without the workdir field: run_config['workdir'].
    ctx_cfg = _context(settings=dict(settings, reference="mean"), run_config={"workdir": str(tmp_path)})
    mean_ref = la.trajectory_flatness(ctx_cfg, key=jax.random.key(0))
    _check_crossings(ctx_cfg, mean_ref, stack.mean(0).astype(np.float32))


def test_trajectory_flatness_leaves_out_drift_modes(tmp_path):
    """A smooth drift along one coordinate becomes PC 2 and is excluded by the trend rule only."""
    ctx = _context(tmp_path, settings=dict(num_components=8, num_excluded=0, num_boot=200))
    flat = np.asarray(ravel_pytree(ctx.params)[0])
    rng = np.random.default_rng(2)
    num = 60
    noise = rng.normal(size=(num, flat.size)) * np.geomspace(1e-1, 1e-3, flat.size)
    noise[:, 0] *= 3.0  # coordinate 0: white noise of variance 0.09, PC 1
    t = np.linspace(-1.0, 1.0, num)
    noise[:, 5] = 0.5 * t**2  # coordinate 5: a parabola, variance 0.25 * 4/45 ~ 0.022, PC 2
    np.savez(os.path.join(tmp_path, "snapshots.npz"), params=(flat + noise).astype(np.float32))
    result = la.trajectory_flatness(ctx, key=jax.random.key(0))
    trend = result["trend_fraction"]
    assert abs(result["directions"][1][5]) > 0.99  # PC 2 is the drift coordinate
    assert trend[1] > 0.99  # its coordinate is the parabola (rounded to float32)
    # The white-noise PCs have trend fractions ~ 4 / 59 (Beta(2, 27.5): P(> 0.5) < 1e-6).
    assert np.all(np.delete(trend, 1) < 0.5)
    np.testing.assert_array_equal(result["excluded"], np.arange(8) == 1)
    # The fit is the plain fit of the kept points.
    usable = result["resolved"] & ~result["excluded"] & ~result["capped"][0]
    fit = landscape.variance_flatness_fit(result["variances"][:8], result["width"][0], num_excluded=0,
                                          valid=usable, num_boot=200)
    np.testing.assert_allclose(result["psi_c2"], fit.psi, rtol=1e-12)
    assert result["num_fit_points_c2"] == usable.sum()
    # max_trend = 1 turns the rule off; num_excluded still drops leading PCs.
    off = la.trajectory_flatness(_context(tmp_path, settings=dict(num_components=8, num_excluded=1,
                                                                 max_trend=1.0, num_boot=200)),
                                 key=jax.random.key(0))
    np.testing.assert_array_equal(off["excluded"], np.arange(8) == 0)
    for bad, message in ((dict(max_trend=0.0), "max_trend=0.0 must be in"),
                         (dict(trend_degree=59), "trend_degree=59 must be in \\[1, 58\\]")):
        with pytest.raises(ValueError, match=message):
            la.trajectory_flatness(_context(tmp_path, settings=dict(num_components=3, **bad)),
                                   key=jax.random.key(0))


def test_trajectory_flatness_replica_axis_skip_and_errors(tmp_path):
    ctx = _context(tmp_path, settings=dict(num_components=3, num_boot=100), replica=1)
    stack = _write_snapshots(tmp_path, ctx, 6, replicas=2).astype(np.float64)
    result = la.trajectory_flatness(ctx, key=jax.random.key(0))
    dense = np.sort(np.linalg.eigvalsh(np.cov(stack[1].T, ddof=1)))[::-1][:5]
    np.testing.assert_allclose(result["variances"], dense, rtol=1e-3, atol=1e-5 * dense[0])
    skipped = la.trajectory_flatness(_context(settings={}), key=jax.random.key(0))
    assert "no workdir" in str(skipped["skipped"])
    missing = la.trajectory_flatness(_context(tmp_path / "elsewhere"), key=jax.random.key(0))
    assert "no snapshot file" in str(missing["skipped"])
    np.savez(os.path.join(tmp_path, "snapshots.npz"), params=np.zeros((5, 7), np.float32))
    with pytest.raises(ValueError, match="7 parameters but the model has 32"):
        la.trajectory_flatness(_context(tmp_path), key=jax.random.key(0))


def test_profile_analysis_and_jit_cache():
    # Text settings (as from a command line) are cast to the defaults' types.
    ctx = _context(settings=dict(num_directions="2", num_points=5.0, radius="0.5", zero_bias="true"))
    result = la.profile(ctx, key=jax.random.key(0))
    assert json.loads(result["settings"]) == dict(la.PROFILE_DEFAULTS, num_directions=2, num_points=5, radius=0.5)
    loss = losses.risk(ctx.model, "mse", ctx.params, ctx.dataset.x_train, ctx.dataset.y_train)
    test = losses.risk(ctx.model, "mse", ctx.params, ctx.dataset.x_test, ctx.dataset.y_test)
    # float32 losses of identical parameters; only the reduction order may differ.
    np.testing.assert_allclose(result["loss_at_params"], loss, rtol=1e-6)
    np.testing.assert_allclose(result["train_losses"][:, 2], loss, rtol=1e-6)
    np.testing.assert_allclose(result["test_losses"][:, 2], test, rtol=1e-6)
    np.testing.assert_allclose(result["alphas"], [-0.5, -0.25, 0.0, 0.25, 0.5])
    assert result["train_losses"].shape == (2, 5)
    assert not np.allclose(result["train_losses"][:, 0], loss, rtol=1e-3)  # the directions move theta
    before = la._profile_core._cache_size()
    other = la.profile(_context(settings=dict(num_directions=2, num_points=5, radius=0.5), params_seed=1,
                                step=100), key=jax.random.key(0))
    assert la._profile_core._cache_size() == before  # a later checkpoint reuses the compilation
    assert not np.allclose(other["loss_at_params"], result["loss_at_params"])
    with pytest.raises(ValueError, match="odd num_points"):
        la.profile(_context(settings=dict(num_points=4)), key=jax.random.key(0))


def test_modified_objectives_and_plots(tmp_path):
    settings = dict(num_masks=8, num_components=4, num_boot=100, objective="modified_mc", num_loss_masks=4)
    ctx = _context(settings=settings)
    key = jax.random.key(0)
    result = la.flatness(ctx, key=key)
    # modified_mc: the mean of R^drop over the 4 masks documented as drawn from stream LOSS_MASKS.
    x, y = ctx.dataset.x_train, ctx.dataset.y_train
    masks = sample_masks(ctx.model.sites, key=jax.random.fold_in(key, la.LOSS_MASKS), batch_shape=(4,))
    mc = np.mean([losses.dropout_risk(ctx.model, "mse", ctx.params, x, y, tuple(m[k] for m in masks),
                                      mode="shared") for k in range(4)])
    np.testing.assert_allclose(result["loss_star"], mc, rtol=1e-5)  # float32 means of 4 numbers
    # modified: closed-form L_S = R_S + R_1 (MSE, dropout on the readout input only).
    closed = la.flatness(_context(settings=dict(settings, objective="modified")), key=key)
    np.testing.assert_allclose(closed["loss_star"], losses.modified_loss(ctx.model, "mse", ctx.params, x, y),
                               rtol=1e-5)
    profile = la.profile(_context(settings=dict(num_directions=2, num_points=5)), key=jax.random.key(0))
    for name, arrays in (("flatness", result), ("profile", profile)):
        directory = tmp_path / name
        directory.mkdir()
        for step in (0, 50):
            np.savez(directory / f"step_{step:09d}.npz", **{k: np.asarray(v) for k, v in arrays.items()})
        written = REGISTRY[name].plot_fn(str(directory), [0, 50])
        assert written and all(os.path.getsize(p) > 1000 for p in written)
    skipped_dir = tmp_path / "trajectory_flatness"
    skipped_dir.mkdir()
    np.savez(skipped_dir / "step_000000000.npz", skipped=np.asarray("no snapshots"))
    assert REGISTRY["trajectory_flatness"].plot_fn(str(skipped_dir), [0]) == []


def test_trajectory_flatness_sensitivity_grid_refits_the_artifact(tmp_path):
    """Each cell of the PC-range x max_trend grid is the plain fit of exactly its points."""
    settings = dict(num_components=8, num_excluded=0, num_boot=200, fit_components=6,
                    sensitivity_components="4,8", sensitivity_max_trend="0.5,1.0")
    ctx = _context(tmp_path, settings=settings)
    flat = np.asarray(ravel_pytree(ctx.params)[0])
    rng = np.random.default_rng(2)
    num = 60
    noise = rng.normal(size=(num, flat.size)) * np.geomspace(1e-1, 1e-3, flat.size)
    noise[:, 0] *= 3.0
    noise[:, 5] = 0.5 * np.linspace(-1.0, 1.0, num) ** 2  # a drift: PC 2, trend fraction ~ 1
    np.savez(os.path.join(tmp_path, "snapshots.npz"), params=(flat + noise).astype(np.float32))
    r = la.trajectory_flatness(ctx, key=jax.random.key(0))
    np.testing.assert_array_equal(r["sensitivity_components"], [4, 8])
    np.testing.assert_array_equal(r["sensitivity_max_trend"], [0.5, 1.0])
    assert r["sensitivity_psi"].shape == (2, 2, 2)
    index = np.arange(8)
    for a, c in enumerate((4, 8)):
        for b, t in enumerate((0.5, 1.0)):
            for i in range(2):  # c = 2, c = e
                valid = r["resolved"] & ~(r["trend_fraction"] > t) & (index < c) & ~r["capped"][i]
                if valid.sum() < 3:  # too few points: NaN, not an error
                    assert np.isnan(r["sensitivity_psi"][i, a, b])
                    continue
                fit = landscape.variance_flatness_fit(r["variances"][:8], r["width"][i], num_excluded=0,
                                                      valid=valid, num_boot=200)
                np.testing.assert_allclose(r["sensitivity_psi"][i, a, b], fit.psi, rtol=1e-12)
                assert r["sensitivity_num_fit_points"][i, a, b] == valid.sum()
    assert np.isfinite(r["sensitivity_psi"][:, 1, :]).all()  # all 8 PCs: enough points in every cell
    # the headline fit uses PCs 1..fit_components only
    valid = r["resolved"] & ~r["excluded"] & (index < 6) & ~r["capped"][0]
    assert r["num_fit_points_c2"] == valid.sum() and valid.sum() < (r["resolved"] & ~r["excluded"]).sum()
    for bad, message in ((dict(fit_components=9), "fit_components=9"),
                         (dict(sensitivity_components="4,9"), "sensitivity_components"),
                         (dict(sensitivity_max_trend="0.5,x"), "sensitivity_max_trend")):
        with pytest.raises(ValueError, match=message):
            la.trajectory_flatness(_context(tmp_path, settings=dict(settings, **bad)), key=jax.random.key(0))
