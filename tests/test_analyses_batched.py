"""Batched analyses: ``batch_fn`` and the runner's batched path equal the one-at-a-time results.

Tolerance. The batched path runs the same jitted core under vmap (and, with several devices,
partitioned), so XLA may reorder float32 sums (relative 1e-7 per operation); Lanczos amplifies
that in the later coefficients and the interior Ritz values, so entries are compared with
rtol = 1e-4 and an absolute floor of 1e-4 x the largest entry of the same array. Residuals
||A v - lambda v|| are themselves rounding noise (~ eps ||A||), so they are compared on the
scale of the spectrum (1e-4 x the largest eigenvalue) instead of their own.

The HVPs are linearised by default (`sme.hessian.make_hvp`, size rule), and linearised products
round differently under vmap. Derived statistics are continuous in the eigenpairs, so the same
tolerance holds for them; that includes the bootstrap slope bounds over 3 eigenpairs, since a
resample of one point is left out exactly (`sme.stats`), not fitted as 0/0 rounding noise.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import smoke
from sme import io, rng, testing
from sme.analyses import Analysis, common, load_all
from sme.analyses.runner import Progress, Request, analyse_run
from sme.testing import assert_same_results, noise_context
from sme.testing import curvature_context as _context
from sme.train import loop

REGISTRY = load_all()  # every analysis registered, whichever tests of this file run


SETTINGS = {"hessian": dict(order=20, top_k=3, bottom_k=1, num_probes=4, hutchpp_sketch=2),
            "fisher": dict(order=10, top_k=2, num_examples=100),
            "covariance": dict(num_masks=4, top_k=2, sgd_examples=16, decomposition_masks=2,
                               decomposition_examples=8)}


@pytest.mark.parametrize("name, settings, mask_mode", [
    ("hessian", dict(order=20, num_probes=4, hutchpp_sketch=2), "shared"),
    # masks are drawn from each item's key: they are batched with it
    ("hessian", dict(loss_kind="modified_mc", num_masks=3, order=20, top_k=3, bottom_k=0, num_probes=2,
                     hutchpp_sketch=0), "per_sample"),
    ("hessian_density", dict(num_probes=3, order=10), "shared"),
    ("fisher", dict(order=10), "shared"),
])
def test_batch_fn_equals_one_at_a_time(name, settings, mask_mode):
    ctxs = [_context(seed=s, step=10 * s, settings=settings, mask_mode=mask_mode) for s in range(3)]
    keys = [jax.random.key(10 + s) for s in range(3)]
    batched = REGISTRY[name].batch_fn(ctxs, keys=keys)
    assert len(batched) == 3
    for i, (ctx, key) in enumerate(zip(ctxs, keys)):
        assert_same_results(REGISTRY[name].fn(ctx, key=key), batched[i], err=f"{name} item {i}")


@pytest.mark.parametrize("name, settings, loss", [
    # SGD rows and decomposition examples are subsets drawn from each item's key: batched with it
    ("covariance", dict(num_masks=4, top_k=2, sgd_examples=6, decomposition_masks=4, decomposition_examples=6),
     "mse"),
    ("alignment", dict(num_masks=4, top_k=3, sgd_examples=6, num_boot=50), "mse"),  # dense Hessian path
    # Lanczos path, and the Monte Carlo L_S whose Hessian masks come from each item's key
    ("alignment", dict(num_masks=4, top_k=3, sgd_examples=6, num_boot=50, dense_max_params=1, lanczos_order=12,
                       num_probes=4, max_enumerated_units=0, hessian_masks=3), "cross_entropy"),
])
@pytest.mark.heavy
def test_noise_batch_fn_equals_one_at_a_time(name, settings, loss, x64):

    ctxs = [noise_context(loss=loss, settings=settings, step=s, params_seed=s + 1) for s in range(3)]
    keys = [jax.random.key(20 + s) for s in range(3)]
    batched = REGISTRY[name].batch_fn(ctxs, keys=keys)
    assert len(batched) == 3
    for i, (ctx, key) in enumerate(zip(ctxs, keys)):
        assert_same_results(REGISTRY[name].fn(ctx, key=key), batched[i], err=f"{name} item {i}")


def test_batch_fn_rejects_contexts_of_different_settings():
    ctxs = [_context(settings=dict(order=10)), _context(settings=dict(order=12))]
    with pytest.raises(ValueError, match="one compiled core"):
        REGISTRY["hessian"].batch_fn(ctxs, keys=[jax.random.key(0)] * 2)


def test_map_stacked_returns_each_items_outputs():
    items = [(np.full((2,), float(i)), np.float32(i)) for i in range(3)]
    out = common.map_stacked(lambda a, b: {"s": a.sum() + b, "a": a}, items, (0, 0))
    assert [float(o["s"]) for o in out] == [0.0, 3.0, 6.0]
    np.testing.assert_array_equal(out[2]["a"], [2.0, 2.0])


@pytest.fixture(scope="module")
def two_replica_run(tmp_path_factory):
    """The smoke run with two replicas: checkpoints at steps 0, 10, ..., 60."""
    workdir = str(tmp_path_factory.mktemp("batched") / "run")
    cfg = smoke.get_config()
    cfg.train.num_replicas = 2
    cfg.train.checkpoint_steps = "linear:6"
    loop.run(cfg, workdir)
    return workdir


_copy = testing.copy_run


def _artifacts(workdir: str, label: str) -> dict[int, dict]:
    directory = os.path.join(workdir, "analysis", label)
    return {step: arrays for step, arrays in common.load_step_artifacts(directory, range(61))}


@pytest.mark.heavy
def test_runner_batched_equals_one_at_a_time(two_replica_run, tmp_path):
    one, many = _copy(two_replica_run, tmp_path, "one"), _copy(two_replica_run, tmp_path, "many")
    names = tuple(SETTINGS)
    analyse_run(one, Request(names, settings=SETTINGS, batch_size=1))
    # 7 checkpoints in groups of 3: the last group has one item and is padded to 3
    summary = analyse_run(many, Request(names, settings=SETTINGS, batch_size=3))
    assert "failures" not in summary
    reference = io.read_json(os.path.join(one, "analysis", "summary.json"))
    for name in names:
        a, b = _artifacts(one, name), _artifacts(many, name)
        assert sorted(a) == sorted(b) == [0, 10, 20, 30, 40, 50, 60]
        for step in a:
            assert_same_results(a[step], b[step], err=f"{name} step {step}")
        assert set(summary[name]) == set(reference[name])
        assert os.path.exists(os.path.join(many, "analysis", name, f"{name}.png"))


@pytest.mark.heavy
def test_all_replicas_match_each_replica_alone(two_replica_run, tmp_path):
    run = _copy(two_replica_run, tmp_path, "run")
    steps = "0,30,60"
    summary = analyse_run(run, Request(("hessian",), steps, "all", SETTINGS, batch_size=4))
    assert set(summary) == {"hessian/replica_0", "hessian/replica_1"}
    for r in (0, 1):
        assert os.path.exists(os.path.join(run, "analysis", "hessian", f"replica_{r}", "hessian.png"))
    alone = _copy(two_replica_run, tmp_path, "alone")
    analyse_run(alone, Request(("hessian",), steps, 1, SETTINGS, batch_size=1))
    a, b = _artifacts(alone, "hessian"), _artifacts(run, "hessian/replica_1")
    assert sorted(a) == sorted(b) == [0, 30, 60]
    for step in a:  # the same replica-1 keys on both paths
        assert_same_results(a[step], b[step], err=f"step {step}")
    zero = _artifacts(run, "hessian/replica_0")
    assert not np.allclose(zero[60]["top_values"], b[60]["top_values"])  # replicas train differently


def _toy(fail_step: int):
    """An analysis that records its key; fn fails at ``fail_step``, batch_fn on any group holding it."""

    def fn(ctx, *, key):
        if ctx.step == fail_step:
            raise RuntimeError("toy failure")
        return {"key": jax.random.key_data(key), "batched": 0}

    def batch_fn(ctxs, *, keys):
        if any(ctx.step == fail_step for ctx in ctxs):
            raise RuntimeError("toy batch failure")
        return [{"key": jax.random.key_data(key), "batched": 1} for key in keys]

    return Analysis("toy", fn, None, "", batch_fn)


@pytest.mark.heavy
def test_failed_batch_is_retried_one_at_a_time_and_corrupt_steps_are_skipped(two_replica_run, tmp_path,
                                                                               monkeypatch):
    run = _copy(two_replica_run, tmp_path, "run")
    monkeypatch.setitem(REGISTRY, "toy", _toy(fail_step=40))
    path = dict(io.list_checkpoints(run))[10]
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    summary = analyse_run(run, Request(("toy",), batch_size=3))
    failures = summary["failures"]
    assert len(failures) == 2 and failures[0].startswith("step 10: ") and "checkpoint" in failures[0]
    assert failures[1] == "toy at step 40: RuntimeError: toy failure"
    done = _artifacts(run, "toy")
    assert sorted(done) == [0, 20, 30, 50, 60]
    # chunks of 3 steps: [0, (10), 20] batched; [30, 40, 50] failed as a batch and was retried one at a
    # time; [60] batched (padded to 3)
    assert {step: int(a["batched"]) for step, a in done.items()} == {0: 1, 20: 1, 30: 0, 50: 0, 60: 1}
    for step, arrays in done.items():
        np.testing.assert_array_equal(arrays["key"], jax.random.key_data(rng.analysis_key(0, "toy", step)))
    assert json.load(open(os.path.join(run, "analysis", "summary.json")))["toy"].keys() == {
        "0", "20", "30", "50", "60"}


@pytest.mark.slow
def test_sharded_over_devices_equals_one_device(two_replica_run, tmp_path, root):
    args = ["--analyses=hessian,fisher,covariance", "--replica=all", "--batch_size=6", "--steps=0,20,40"]
    args += [f"--set={name}.{k}={v}" for name, s in SETTINGS.items() for k, v in s.items()]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    runs = {}
    for name, run_env in (("many", env), ("one", dict(os.environ))):
        runs[name] = _copy(two_replica_run, tmp_path, name)
        done = subprocess.run([sys.executable, os.path.join(root, "analyze.py"), f"--workdir={runs[name]}", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=900, env=run_env)
        assert done.returncode == 0, done.stderr[-3000:]
        # 3 steps x 2 replicas in one group of 6 (padded to 8 for 4 devices)
        assert f"(6 items, {4 if name == 'many' else 1} devices)" in done.stderr
    for name in SETTINGS:
        for r in (0, 1):
            a, b = _artifacts(runs["one"], f"{name}/replica_{r}"), _artifacts(runs["many"], f"{name}/replica_{r}")
            assert sorted(a) == sorted(b) == [0, 20, 40]
            for step in a:
                assert_same_results(a[step], b[step], err=f"{name} replica {r} step {step}")


def test_progress_reports_compilation_first_then_an_eta_from_the_later_calls():
    lines = []
    progress = Progress("toy: item", 5, log=lambda fmt, line: lines.append(line))
    progress.update(1, 5.0)  # compiles: not part of the rate
    progress.update(2, 2.0, " (step 10, 20)")  # 1 s per item, 2 items left
    progress.update(2, 4.0)  # (2 + 4) s / 4 items
    assert lines == ["toy: item 1 of 5 | first call with compilation 5.0s",
                     "toy: item 3 of 5 (step 10, 20) | 1s per item | ETA 2s",
                     "toy: item 5 of 5 | 1.5s per item | ETA 0s"]


@pytest.mark.heavy
def test_runner_logs_item_k_of_n_with_an_eta(two_replica_run, tmp_path, monkeypatch, caplog):
    import logging

    run = _copy(two_replica_run, tmp_path, "run")
    monkeypatch.setitem(REGISTRY, "toy", _toy(fail_step=-1))
    with caplog.at_level(logging.INFO):
        analyse_run(run, Request(("toy",), batch_size=3))  # 7 checkpoints in calls of 3, 3 and 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("toy: item")]
    assert [line.split(" |")[0] for line in lines] == [
        "toy: item 3 of 7 (step 0, 10, 20)", "toy: item 6 of 7 (step 30, 40, 50)", "toy: item 7 of 7 (step 60)"]
    assert "first call with compilation" in lines[0] and "ETA" not in lines[0]
    assert all("s per item | ETA" in line for line in lines[1:])
    with caplog.at_level(logging.INFO):  # everything is on disk now: nothing to do, no item lines
        caplog.clear()
        analyse_run(run, Request(("toy",), batch_size=3))
    assert not [r for r in caplog.records if r.getMessage().startswith("toy: item")]
    assert any(r.getMessage().startswith("toy: 0 of 7") for r in caplog.records)
