"""`analyze.py --compare` figures: result keys only, standard errors as error bars, profiles drawn."""

import json
import os

import numpy as np

from sme import io
from sme.analyses import compare


def _run(tmp_path, name, steps, trace):
    workdir = tmp_path / name
    (workdir / "analysis" / "profile").mkdir(parents=True)
    summary = {"hessian": {str(s): {"trace_hutchinson": trace + s, "trace_hutchinson_se": 0.1, "num_params": 100,
                                    "order": 20, "loss_value": 0.5} for s in steps},
               "profile": {str(steps[-1]): {"loss_at_params": 0.1}}}
    (workdir / "analysis" / "summary.json").write_text(json.dumps(summary))
    alphas = np.linspace(-1, 1, 5)
    io.save_arrays(str(workdir / "analysis" / "profile" / f"step_{steps[-1]:09d}.npz"),
                   dict(alphas=alphas, train_losses=np.stack([alphas**2 + 0.1, 2 * alphas**2 + 0.1])))
    return str(workdir)


def test_compare_draws_results_with_error_bars_and_profiles(tmp_path):
    for steps in ((10,), (0, 10, 100)):  # one checkpoint per run (bars) and several (lines)
        runs = [_run(tmp_path / str(len(steps)), n, steps, t) for n, t in (("a", 1.0), ("b", 2.0))]
        out = tmp_path / f"cmp{len(steps)}"
        table = compare.compare_runs(runs, ["hessian", "profile"], str(out))
        assert compare._panel_keys(table["hessian"]) == ["loss_value", "trace_hutchinson"]  # no sizes, no se
        assert os.path.getsize(out / "compare_hessian.png") > 1000
        assert os.path.getsize(out / "compare_profile.png") > 1000
