"""End to end: train.py then analyze.py on configs/smoke.py, asserting on artifact contents."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sme import io

pytestmark = pytest.mark.heavy  # every test runs train.py or analyze.py in a subprocess


def _run(args, cwd):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tmp_path_factory.mktemp("e2e")
    workdir = tmp / "run"
    proc = _run([os.path.join(root, "train.py"), f"--config={root}/configs/smoke.py", f"--workdir={workdir}"], tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, tmp, workdir


def test_analyze_profile_matches_training_metrics(smoke_run):
    root, tmp, workdir = smoke_run
    proc = _run([os.path.join(root, "analyze.py"), f"--workdir={workdir}", "--analyses=profile",
                 "--steps=0,60", "--set=profile.num_directions=2", "--set=profile.num_points=11"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = {r["step"]: r for r in io.read_jsonl(str(workdir / "metrics.jsonl"))}
    for step in (0, 60):
        arrays = io.load_arrays(str(workdir / "analysis" / "profile" / f"step_{step:09d}.npz"))
        assert arrays["train_losses"].shape == (2, 11)
        # alpha = 0 is the checkpoint itself: the profile's centre is R_S as logged during training
        # (both float32 means over the same 300 examples, summed in different orders: 1e-5).
        np.testing.assert_allclose(arrays["loss_at_params"], metrics[step]["train/risk"], rtol=1e-5)
        np.testing.assert_allclose(arrays["train_losses"][:, 5], metrics[step]["train/risk"], rtol=1e-5)
    assert os.path.exists(workdir / "analysis" / "profile" / "profile.png")
    summary = json.load(open(workdir / "analysis" / "summary.json"))
    assert set(summary["profile"]) == {"0", "60"}


def test_analyze_rejects_bad_requests(smoke_run):
    root, tmp, workdir = smoke_run
    proc = _run([os.path.join(root, "analyze.py"), f"--workdir={workdir}", "--analyses=nonsense"], tmp)
    assert proc.returncode != 0 and "unknown analyses ['nonsense']" in proc.stderr
    proc = _run([os.path.join(root, "analyze.py"), f"--workdir={workdir}", "--analyses=profile", "--steps=7"], tmp)
    assert proc.returncode != 0 and "no checkpoint for steps [7]" in proc.stderr
    proc = _run([os.path.join(root, "analyze.py"), f"--workdir={tmp / 'missing'}", "--analyses=profile"], tmp)
    assert proc.returncode != 0 and "no config.json" in proc.stderr


def test_compare_runs_collects_each_runs_numbers(smoke_run):
    root, tmp, workdir = smoke_run
    other = tmp / "other"
    proc = _run([os.path.join(root, "train.py"), f"--config={root}/configs/smoke.py", f"--workdir={other}",
                 "--config.model.keep_prob=1.0"], tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp / "compare"
    proc = _run([os.path.join(root, "analyze.py"), f"--workdir={workdir},{other}", "--analyses=profile",
                 "--steps=last", "--set=profile.num_directions=1", "--set=profile.num_points=5",
                 f"--compare={out}", "--overwrite"], tmp)  # other settings than the first test's: --overwrite
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.load(open(out / "compare.json"))["profile"]["loss_at_params"]
    for label, path in (("run", workdir), ("other", other)):
        final = io.read_jsonl(str(path / "metrics.jsonl"))[-1]
        assert table[label]["60"] == pytest.approx(final["train/risk"], rel=1e-5)
    assert table["run"]["60"] != table["other"]["60"]  # dropout and no dropout train differently
    assert os.path.exists(out / "compare_profile.png")


def test_analyze_prints_headline_table_with_lambda_max(smoke_run):
    """The printed table and summary.json carry lambda_max and its residual, equal to the artifact's
    largest Ritz value and residual (the same float, printed to 4 significant digits)."""
    root, tmp, workdir = smoke_run
    proc = _run([os.path.join(root, "analyze.py"), f"--workdir={workdir}", "--analyses=hessian", "--steps=60",
                 "--set=hessian.order=8", "--set=hessian.top_k=2", "--set=hessian.bottom_k=0",
                 "--set=hessian.num_probes=2", "--set=hessian.hutchpp_sketch=0"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arrays = io.load_arrays(str(workdir / "analysis" / "hessian" / f"step_{60:09d}.npz"))
    summary = json.load(open(workdir / "analysis" / "summary.json"))["hessian"]["60"]
    assert summary["lambda_max"] == float(arrays["top_values"][0])
    assert summary["lambda_max_residual"] == float(arrays["top_residuals"][0])
    line = next(l for l in proc.stdout.splitlines() if l.strip().startswith("hessian"))
    assert f"lambda_max={summary['lambda_max']:.4g}" in line and "lambda_max_residual=" in line, proc.stdout
