"""The per-cell table the SME sweep logs as cells finish (p, eps, variant, weak error, replicas, time)."""

import logging
import re

import numpy as np
import pytest

from configs import sme_weak_error
from sme import driver, sweep
from sme.analyses import weak_error as weak_error_analysis


def test_format_table_aligns_columns_under_a_header():
    text = sweep.format_table([("0.5", "0.1", "order1", "0.0123 [0.01, 0.015]", "400", "1.2s")],
                              columns=("p", "eps", "variant", "error", "R", "time"))
    header, row = text.split("\n")
    assert header.split() == ["p", "eps", "variant", "error", "R", "time"]
    assert row.index("order1") == header.index("variant") and row.index("400") == header.index("R")


def test_tiny_sweep_logs_one_table_per_cell_with_the_analysis_weak_errors(tmp_path, caplog):
    cfg = sme_weak_error.get_config("tiny")
    cfg.sde.variants, cfg.sde.keep_prob_grid, cfg.sde.lr_grid = "order1,ode1", "0.8", "0.2,0.1"
    cfg.sde.num_replicas, cfg.sde.num_batches, cfg.sde.richardson = 40, 4, False
    with caplog.at_level(logging.INFO):
        driver.run(cfg, str(tmp_path))
    tables = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cell p0.8_lr")
              and "\n" in r.getMessage()]
    assert [t.split(":")[0] for t in tables] == ["cell p0.8_lr0.2 (1/2)", "cell p0.8_lr0.1 (2/2)"]
    # the weak errors of the analysis at the final time: the numbers the table must show
    art = weak_error_analysis.compute(str(tmp_path), num_boot=cfg.sde.num_boot, level=0.95)
    j = [str(g) for g in art["g_names"]].index(sweep.TABLE_FUNCTION)
    for table in tables:
        lines = table.split("\n")[1:]
        assert lines[0].split()[:3] == ["p", "eps", "variant"]
        rows = [line.split() for line in lines[1:]]
        assert [row[2] for row in rows] == ["order1", "ode1"]
        for row in rows:
            c = int(np.flatnonzero(np.isclose(art["lr"], float(row[1])) & np.isclose(art["keep_prob"], 0.8))[0])
            error, low, high, floor = (float(art[f"{row[2]}/{k}"][c, -1, j])
                                       for k in ("error", "ci_low", "ci_high", "floor"))
            assert row[0] == "0.8" and row[-2] == "40" and re.fullmatch(r"\d+\.\ds", row[-1])
            shown = " ".join(row[3:-2])
            if low > 0:  # resolved: error [low, high] to 3 significant digits
                assert shown == f"{error:.3g} [{low:.3g}, {high:.3g}]"
            else:
                assert shown == f"<= {high:.3g} (floor {floor:.3g})"
    # the bias-corrected error from its formula on the cell file: sqrt(max(dbar^2 - se^2, 0)) over batch means
    cell = sweep.load_cell(sweep.cell_path(str(tmp_path), 0.8, 0.1))
    d = (cell["mean/order1"][-1, :, j] - cell["mean/discrete"][-1, :, j]).astype(np.float64)
    se = d.std(ddof=1) / np.sqrt(d.size)
    c = int(np.flatnonzero(np.isclose(art["lr"], 0.1))[0])
    assert float(art["order1/error"][c, -1, j]) == pytest.approx(np.sqrt(max(d.mean() ** 2 - se**2, 0.0)),
                                                                 rel=1e-12, abs=1e-15)
    assert float(art["order1/floor"][c, -1, j]) == pytest.approx(se, rel=1e-12)
