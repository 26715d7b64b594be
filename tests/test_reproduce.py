"""The reproduce command end to end on the tiny plan (every run shrunk to seconds)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest


@pytest.mark.slow
def test_reproduce_tiny_end_to_end(tmp_path, root):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, os.path.join(root, "analyze.py"), "--reproduce=tiny", f"--report={out}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(out / "report.json"))
    for section in ("e2", "e3", "e4", "e5", "e6"):
        assert "error" not in report[section], report[section]
        if "figure" in report[section]:
            assert os.path.getsize(out / report[section]["figure"]) > 1000
    e2 = report["e2"]
    # the plug-in alpha is a cosine, in [-1, 1] (H of R_S may be indefinite, so alpha may be < 0); the
    # unbiased one is a ratio of estimates and may leave that range, but not by much at K = 16
    assert all(-1 <= a <= 1 for a in e2["dropout_alpha_plug_in"] + e2["sgd_noise_alpha_plug_in"])
    assert all(-1.5 <= a <= 1.5 for a in e2["dropout_alpha"])
    assert e2["num_samples"] == {"dropout": 16, "sgd": 16}  # like for like
    assert all(m < 0.1 for m in e2["null_haar_mean"])
    e3 = report["e3"]["dropout_trajectory_flatness"]
    assert {(r["components"], r["max_trend"]) for r in e3["sensitivity"]} == {
        (c, t) for c in (4, 6) for t in (0.4, 0.5, 0.6, 0.7)}
    e4 = report["e4"]
    for run in ("dropout", "plain"):  # every seed's Hessian of the same two losses
        assert e4[run]["num_seeds"] == 2
        assert e4[run]["r_s"]["loss"].startswith("R_S") and e4[run]["l_s"]["loss"].startswith("L_S")
        assert len(e4[run]["r_s"]["lambda_max_per_seed"]) == 2 and e4[run]["r_s"]["lambda_max"]["n"] == 2
        assert e4[run]["test_acc"]["low"] <= e4[run]["test_acc"]["mean"] <= e4[run]["test_acc"]["high"]
    rows = report["e6"]["rows"]
    assert [r["keep_prob"] for r in rows] == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    for r in rows:
        # MSE with readout-only dropout: R_1 equals its Fisher quadratic form exactly (float32 rounding).
        assert r["r1"] == pytest.approx(r["r1_quadratic"], rel=1e-4, abs=1e-7)
    assert rows[-1]["r1"] == 0.0
    e5 = report["e5"]
    for run in ("dropout", "r1", "rs"):
        assert 0.0 <= e5[run]["test_acc"] <= 1.0
    summaries = [json.load(open(out / "runs" / "e2" / "dropout" / "analysis" / "summary.json"))]
    assert not summaries[0].get("failures")
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# Reproduction report")
    assert "| run | Hessian of | seeds |" in markdown and "{" not in markdown.split("## E4")[1]  # tables, no dicts
