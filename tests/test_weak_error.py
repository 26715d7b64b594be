"""Lockstep simulation, weak-error statistics, the SME sweep and its analysis."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sme_weak_error
from sme import config as config_lib
from sme import driver, io, lockstep, rng, sweep, weak_error
from sme.train import loop

from sme.testing import linear_problem


# --- The lockstep processes ------------------------------------------------------------------------


def test_linear_regression_means_match_exact_recursions_and_the_sme_error_is_order_eps(x64):
    """Dropout linear regression: E theta_N = theta* + (I - eps M)^N (theta_0 - theta*) exactly, and the
    Euler-Maruyama mean of the order-1 SME is theta* + (I - h M)^{lN} (theta_0 - theta*) (linear drift),
    whose gap to the discrete mean is O(eps): the simulated gaps must follow it."""
    problem = linear_problem(0.5)
    x, y = np.asarray(problem.x), np.asarray(problem.y)[:, 0]
    a = x.T @ x / 6
    m = a + np.diag(np.diag(a))  # (1 - p)/p = 1
    star = np.linalg.solve(m, x.T @ y / 6)
    start = np.array([2.0, 1.0, -1.5])
    num, l, horizon = 20000, 4, 1.0
    spec = lockstep.LockstepSpec(variants=("order1",), diffusion="closed_form", estimator="closed_form",
                                 substeps=l, coupling="quantile")
    advance = jax.jit(lockstep.make_advance(spec))
    gaps, exact_gaps = [], []
    for eps in (0.1, 0.05, 0.025):
        steps = int(round(horizon / eps))
        state = advance(lockstep.init_lockstep({"w": jnp.asarray(start[:, None])}, spec, num), steps, eps, problem)
        disc = np.asarray(state.paths["discrete"]["w"][..., 0])
        cont = np.asarray(state.paths["order1"]["w"][..., 0])
        want_disc = star + np.linalg.matrix_power(np.eye(3) - eps * m, steps) @ (start - star)
        want_sde = star + np.linalg.matrix_power(np.eye(3) - eps / l * m, steps * l) @ (start - star)
        # 5 standard errors per coordinate: a false alarm has probability ~1e-5.
        assert np.all(np.abs(disc.mean(0) - want_disc) < 5 * disc.std(0) / np.sqrt(num))
        assert np.all(np.abs(cont.mean(0) - want_sde) < 5 * cont.std(0) / np.sqrt(num))
        gap = disc.mean(0) - cont.mean(0)
        assert np.all(np.abs(gap - (want_disc - want_sde)) < 5 * (disc - cont).std(0) / np.sqrt(num))
        gaps.append(np.linalg.norm(gap))
        exact_gaps.append(np.linalg.norm(want_disc - want_sde))
    exact_ratio, ratio = np.array(exact_gaps[:-1]) / exact_gaps[1:], np.array(gaps[:-1]) / gaps[1:]
    assert np.all((1.7 < exact_ratio) & (exact_ratio < 2.3)), exact_ratio  # O(eps): halves with eps
    assert np.all((1.5 < ratio) & (ratio < 2.6)), ratio  # the same within the Monte Carlo error


def _regression_config(**sde):
    cfg = sme_weak_error.get_config("tiny")
    for k, v in sde.items():
        cfg.sde[k] = v
    return cfg


def test_discrete_process_is_the_training_loops_dropout_gd(tmp_path):
    cfg = _regression_config()
    cfg.sde.enabled = False
    cfg.train.num_replicas, cfg.train.share_init, cfg.train.num_steps = 4, True, 5
    cfg.train.eval_every, cfg.train.checkpoint_steps = 5, "5"
    loop.run(cfg, str(tmp_path))
    trained = io.read_checkpoint(io.checkpoint_path(str(tmp_path), 5))
    setup = config_lib.build(cfg)
    spec = lockstep.LockstepSpec(variants=("order1",), diffusion="closed_form", estimator="closed_form", seed=cfg.seed)
    problem = lockstep.Problem(setup.model, "mse", "shared", jnp.asarray(setup.dataset.x_train),
                               jnp.asarray(setup.dataset.y_train))
    params0 = setup.model.init(rng.stream_key(cfg.seed, rng.INIT, replica=0))
    state = jax.jit(lockstep.make_advance(spec))(lockstep.init_lockstep(params0, spec, 4), 5, 0.1, problem)
    # Same masks and steps in float32; vmapped vs unbatched kernels may round differently (~1e-7).
    np.testing.assert_allclose(state.paths["discrete"]["out"]["w"], trained[".params['out']['w']"], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(state.paths["discrete"]["hidden"][0]["w"], trained[".params['hidden'][0]['w']"],
                               rtol=1e-5, atol=1e-6)


# --- Statistics ------------------------------------------------------------------------------------


def test_replica_moments_and_batch_means_equal_direct_formulas():
    values = np.random.default_rng(0).normal(size=(600, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -3.0]
    bm = np.asarray(lockstep.batch_means(jnp.asarray(values), 20))
    np.testing.assert_allclose(bm, values.reshape(20, 30, 3).mean(1), atol=1e-6)  # float32 means
    mean, var = weak_error.replica_moments(values.reshape(20, 30, 3).mean(1), (values**2).reshape(20, 30, 3).mean(1), 600)
    np.testing.assert_allclose(mean, values.mean(0), atol=1e-12)
    np.testing.assert_allclose(var, values.var(0, ddof=1), rtol=1e-10)


def test_weak_error_is_bias_corrected_with_covering_intervals_and_floor():
    """Batch means with a known gap: the raw |mean| is biased up by the noise, the corrected one is
    not (in the square); the |.|-image interval covers |gap| at the nominal rate, also at gap 0."""
    rng = np.random.default_rng(1)
    sd, num_b, trials = 0.1, 100, 300
    gaps = np.array([0.05, 0.0])  # 5 floors and 0
    idx = weak_error.bootstrap_indices(num_b, num_boot=400, seed=0)
    raw, corr, covered, floors = [], [], np.zeros(2), []
    for _ in range(trials):
        ref = sd * rng.normal(size=(num_b, 2))
        out = weak_error.weak_error(ref, ref + gaps + sd * rng.normal(size=(num_b, 2)), idx)
        raw.append(out["raw"])
        corr.append(out["error"])
        floors.append(out["floor"])
        covered += (out["ci_low"] <= np.abs(gaps)) & (np.abs(gaps) <= out["ci_high"])
    se = sd / np.sqrt(num_b)  # the difference of two batch means has sd 0.1 here (ref cancels)
    np.testing.assert_allclose(np.mean(floors, axis=0), se, rtol=0.05)  # 300 trials: the mean SE to ~1 %
    # E raw^2 = gap^2 + se^2; E corrected^2 >= gap^2 with bias only from the max(., 0) clip, which at
    # gap 0 keeps half the mass: E = se^2 E[max(chi2_1 - 1, 0)] ~ 0.4 se^2 (vs 1.0 for raw).
    assert np.mean(np.array(raw)[:, 1] ** 2) > 0.8 * se**2
    assert np.mean(np.array(corr)[:, 1] ** 2) < 0.6 * se**2
    np.testing.assert_allclose(np.mean(np.array(corr)[:, 0] ** 2), gaps[0] ** 2, rtol=0.1)  # 300 trials: ~4 % sd
    # Nominal 95 %; 300 trials give a binomial sd of 1.3 %.
    assert np.all((0.9 <= covered / trials) & (covered / trials <= 0.99)), covered / trials
    nan_ref = np.where(np.arange(num_b)[:, None] == 5, np.nan, 0.0) * np.ones((1, 2))
    assert np.isnan(weak_error.weak_error(nan_ref, np.zeros_like(nan_ref), idx)["error"]).all()


def test_cell_table_reads_fixed_times_and_bootstraps_cells_jointly():
    """Cells share replica keys, so the same batches are resampled in every cell: two cells with the
    same batch means get identical bootstrap draws; times are read where asked, not maximised."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(3, 10, 1))
    cell = lambda lr, shift: {"lr": lr, "keep_prob": 0.5, "times": np.array([0.0, 1.0, 2.0]),
                              "mean/discrete": base, "mean/order1": base + shift + 0.1 * rng.normal(size=base.shape)}
    first, second = cell(0.1, np.array([0.0, 5.0, 0.3])[:, None, None]), cell(0.05, 0.0)
    second["mean/order1"] = first["mean/order1"].copy()
    table = weak_error.cell_table([first, second], ["order1"], times=[2.0], num_boot=50)
    assert table["order1/error"].shape == (2, 1, 1) and table["order1/boot"].shape == (2, 1, 50, 1)
    np.testing.assert_array_equal(table["order1/boot"][0], table["order1/boot"][1])
    assert table["order1/raw"][0, 0, 0] < 1.0  # the t = 1 gap of 5 is not picked up at t = 2
    with pytest.raises(ValueError, match="not a logged time"):
        weak_error.cell_table([first], ["order1"], times=[1.5], num_boot=10)
    coarse = {**second, "times": np.array([0.0, 0.8, 2.0])}  # eps = 0.4 never logs t = 1
    table = weak_error.cell_table([first, coarse], ["order1"], times=[1.0, 2.0], num_boot=10)
    assert np.isfinite(table["order1/error"][0]).all() and np.isnan(table["order1/error"][1, 0]).all()
    assert np.isfinite(table["order1/error"][1, 1]).all()


def test_fit_order_recovers_a_known_slope_and_refuses_undefined_errors():
    lrs = np.array([0.4, 0.2, 0.1, 0.05, 0.025])
    rng = np.random.default_rng(2)
    errors = 0.3 * lrs**2 * np.exp(0.05 * rng.normal(size=5))
    boots = errors[:, None] * np.exp(0.05 * rng.normal(size=(5, 500)))
    fit = weak_error.fit_order(lrs, errors, boots)
    assert abs(fit["order"] - 2.0) < 0.1 and fit["ci_low"] < 2.0 < fit["ci_high"] and fit["num_points"] == 5
    zero = errors.copy()
    zero[-1] = 0.0  # corrected to 0 (below the noise): log undefined, no slope rather than a chosen subset
    assert np.isnan(weak_error.fit_order(lrs, zero, boots)["order"])
    boots[-1, :100] = 0.0  # 20 % of draws undefined: no interval at level 0.95
    fit = weak_error.fit_order(lrs, errors, boots)
    assert np.isfinite(fit["order"]) and np.isnan(fit["ci_low"])


# --- Config, sweep and analysis end to end --------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("sde.variants", "order1,order3", "comma-separated distinct names"),
    ("sde.coupling", "strong", "must be one of"),
    ("sde.num_replicas", 401, "must be a multiple of sde.num_batches=20"),
    ("sde.lr_grid", "0.3", "whole number"),
    ("sde.keep_prob_grid", "0.5,1.0", "must be in \\(0, 1\\)"),
    ("sde.substeps", 0, "must be an integer >= 1"),
    ("train.batch_size", 4, "full-batch dropout GD"),
    ("optim.name", "adam", "use sgd"),
])
def test_bad_sde_values_fail_at_start_naming_the_field(field, value, message, tmp_path):
    cfg = _regression_config()
    block, leaf = field.split(".")
    cfg[block][leaf] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.{field}"):
        driver.run(cfg, str(tmp_path / "run"))
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.build(cfg)
    assert not (tmp_path / "run").exists()


def test_model_dependent_sde_checks_fail_before_writing(tmp_path):
    cfg = _regression_config(diffusion="closed_form")
    cfg.model.hidden, cfg.model.name, cfg.model.dropout_layers = (3, 4), "mlp", "0"  # dropout before the readout
    with pytest.raises(config_lib.ConfigError, match="dropout on the last hidden layer only"):
        driver.run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.heavy
def test_sweep_in_process_logs_both_processes_and_skips_finished_cells(tmp_path):
    cfg = _regression_config(variants="order1", keep_prob_grid="0.8", lr_grid="0.2,0.1", num_replicas=40,
                             num_batches=4, richardson=False)
    record = driver.run(cfg, str(tmp_path))
    assert record["cells"] == 2 and record["step"] == 4
    records = io.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [(r["cell"], r["step"]) for r in records] == [("p0.8_lr0.2", s) for s in (0, 1, 2)] + [
        ("p0.8_lr0.1", s) for s in (0, 1, 2, 3, 4)]
    last = records[-1]
    assert last["t"] == pytest.approx(0.4) and last["discrete/R_S/var"] > 0 and last["order1/dist/mean"] > 0
    # The logged mean is the replica mean: recompute it from the cell's batch means.
    cell = sweep.load_cell(sweep.cell_path(str(tmp_path), 0.8, 0.1))
    j = list(cell["g_names"]).index("R_S")
    assert last["order1/R_S/mean"] == pytest.approx(float(cell["mean/order1"][-1, :, j].astype(np.float64).mean()))
    stamp = os.path.getmtime(sweep.cell_path(str(tmp_path), 0.8, 0.2))
    driver.run(cfg, str(tmp_path))
    assert os.path.getmtime(sweep.cell_path(str(tmp_path), 0.8, 0.2)) == stamp  # skipped, not rewritten
    assert io.read_jsonl(str(tmp_path / "metrics.jsonl")) == records
    other = _regression_config(variants="order1,order2", keep_prob_grid="0.8", lr_grid="0.2,0.1",
                               num_replicas=40, num_batches=4, richardson=False)
    with pytest.raises(config_lib.ConfigError, match="different config"):
        driver.run(other, str(tmp_path))


@pytest.mark.slow
def test_sweep_and_analysis_end_to_end_with_resume(tmp_path, root):
    workdir = tmp_path / "sme"
    train = [sys.executable, os.path.join(root, "train.py"), f"--config={root}/configs/sme_weak_error.py:tiny",
             f"--workdir={workdir}"]
    done = subprocess.run(train, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cells = sorted(os.listdir(workdir / "sme"))
    assert len(cells) == 6  # 2 keep_probs x 3 learning rates
    records = io.read_jsonl(str(workdir / "metrics.jsonl"))
    first = [r for r in records if r["cell"] == "p0.9_lr0.05"]
    assert [r["step"] for r in first] == [0, 2, 4, 6, 8]
    assert first[0]["order1/R_S/mean"] == first[0]["discrete/R_S/mean"]  # same theta_0 for all processes
    assert first[-1]["discrete/R_S/var"] > 0 and first[-1]["order1/dist/mean"] > 0
    # Resume: a corrupted cell is recomputed (bit-identically), finished ones are skipped.
    victim = workdir / "sme" / "cell_p0.5_lr0.1.npz"
    before = io.load_arrays(str(victim))
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    again = subprocess.run(train, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done, skipped") == 5
    after = io.load_arrays(str(victim))
    for k in before:
        if k not in ("seconds", "digest"):
            np.testing.assert_array_equal(before[k], after[k])
    assert len(io.read_jsonl(str(workdir / "metrics.jsonl"))) == len(records)
    analyze = subprocess.run([sys.executable, os.path.join(root, "analyze.py"), f"--workdir={workdir}",
                              "--analyses=weak_error", "--steps=last"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
    assert analyze.returncode == 0, analyze.stderr[-3000:]
    art = io.load_arrays(str(workdir / "analysis" / "weak_error" / "step_000000000.npz"))
    for png in ("trajectories.png", "weak_error_vs_lr.png", "weak_error_vs_keep_prob.png"):
        assert (workdir / "analysis" / "weak_error" / png).stat().st_size > 10_000
    j = list(art["g_names"]).index("R_S")
    at = lambda p, lr: int(np.flatnonzero((art["keep_prob"] == p) & (art["lr"] == lr))[0])
    np.testing.assert_allclose(art["times"], [0.2, 0.4])  # declared in the config (config.analysis)
    # At p = 0.9 the order-1 error of R_S at T shrinks with eps (about 4x over a factor 4), its
    # interval excludes 0, and order 2 is below order 1 at the smallest eps.
    big, small = art["order1/error"][at(0.9, 0.2), -1, j], art["order1/error"][at(0.9, 0.05), -1, j]
    assert art["order1/ci_low"][at(0.9, 0.2), -1, j] > 0 and 2.0 < big / small < 8.0
    assert art["order2/error"][at(0.9, 0.05), -1, j] < small
    assert art["order1/ci_low"][at(0.9, 0.2), -1, j] <= big <= art["order1/ci_high"][at(0.9, 0.2), -1, j]
    assert 0.7 < art["order1/order"][list(art["keep_probs"]).index(0.9), -1, j] < 1.3


@pytest.mark.slow
def test_sweep_sharded_over_devices_matches_one_device(tmp_path, root):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    for name, run_env in (("many", env), ("one", dict(os.environ))):
        done = subprocess.run([sys.executable, os.path.join(root, "train.py"),
                               f"--config={root}/configs/sme_weak_error.py:tiny", f"--workdir={tmp_path / name}",
                               "--config.sde.keep_prob_grid=0.9"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, env=run_env)
        assert done.returncode == 0, done.stderr[-2000:]
    assert io.read_json(str(tmp_path / "many" / "config.json"))["versions"]["devices"] == 4
    for cell in os.listdir(tmp_path / "one" / "sme"):
        a, b = (io.load_arrays(str(tmp_path / d / "sme" / cell)) for d in ("many", "one"))
        for k in a:
            if k.startswith(("mean/", "sq/", "dist/")):  # same programme, partitioned: float32 re-association
                np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_eval_steps_and_cell_names():
    assert sweep.eval_steps(5, 20) == [0, 1, 2, 3, 4, 5]
    assert sweep.eval_steps(80, 20) == list(range(0, 81, 4))
    assert sweep.cell_name(0.8, 0.025) == "p0.8_lr0.025"
