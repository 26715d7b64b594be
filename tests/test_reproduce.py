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
    assert all(-1 <= a <= 1 for a in e2["dropout_alpha"])  # a cosine; H may be indefinite, so alpha may be < 0
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
    assert (out / "report.md").read_text().startswith("# Reproduction report")
