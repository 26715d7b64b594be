"""train.py and analyze.py: one-line errors (no traceback unless --verbosity asks), and a re-run of a
finished run that exits 0 with its final metrics."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from sme import io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def _train(workdir, *extra, cwd):
    return _run(os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/smoke.py", f"--workdir={workdir}", *extra,
                cwd=cwd)


def _one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    proc = _train(tmp / "run", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp, tmp / "run", proc.stdout


@pytest.mark.slow
def test_rerunning_a_finished_run_exits_0_with_its_final_metrics(finished):
    tmp, workdir, first = finished
    again = _train(workdir, cwd=tmp)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "done: step 60:" in again.stdout
    assert first.splitlines()[0] == again.stdout.splitlines()[0]  # the same final metrics


@pytest.mark.heavy
def test_flag_and_config_mistakes_are_one_line(finished, tmp_path):
    tmp, workdir, _ = finished
    proc = _train(tmp_path / "a", "--config.model.keep_prb=0.5", cwd=tmp_path)
    _one_line_error(proc, "--config.model.keep_prb", "did you mean 'keep_prob'?")
    proc = _run(os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/nonexistent.py", cwd=tmp_path)
    _one_line_error(proc, "nonexistent.py", "cannot load the config file")
    proc = _train(tmp_path / "a", "--config.train.num_steps=abc", cwd=tmp_path)
    _one_line_error(proc, "--config.train.num_steps")
    proc = _train(tmp_path / "a", "--config.seed=100000000000000000000", cwd=tmp_path)
    _one_line_error(proc, "config.seed=100000000000000000000", "[0, 2**63)")
    (tmp_path / "file").write_text("not a directory")
    proc = _train(tmp_path / "file", cwd=tmp_path)
    _one_line_error(proc, "is a file, not a directory")
    assert not (tmp_path / "a").exists()
    verbose = _train(tmp_path / "a", "--config.model.keep_prb=0.5", "--verbosity=1", cwd=tmp_path)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


@pytest.mark.heavy
def test_analyze_mistakes_are_one_line_before_any_data_is_loaded(finished, tmp_path):
    tmp, workdir, _ = finished
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    # Point the run at data that does not exist: a request that got as far as loading it would say so.
    saved = io.read_json(str(run / "config.json"))
    saved["config"]["data"].update(name="npz", path=str(tmp_path / "missing.npz"))
    io.write_json(str(run / "config.json"), saved, digest=True)
    analyze = os.path.join(ROOT, "analyze.py")
    proc = _run(analyze, f"--workdir={run}", "--analyses=profile,hessian", "--set=hessian.top_kk=3", cwd=tmp_path)
    _one_line_error(proc, "hessian", "top_kk")
    assert "wrote" not in proc.stdout and "missing.npz" not in proc.stderr
    proc = _run(analyze, f"--workdir={run}", "--analyses=profile", "--steps=abc", cwd=tmp_path)
    _one_line_error(proc, "--steps='abc'")
    assert not (run / "analysis").exists()


@pytest.mark.slow
def test_analyze_refuses_changed_settings_naming_overwrite(finished, tmp_path):
    tmp, workdir, _ = finished
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    analyze = [os.path.join(ROOT, "analyze.py"), f"--workdir={run}", "--analyses=profile", "--steps=last",
               "--set=profile.num_directions=1", "--set=profile.num_points=3"]
    assert _run(*analyze, cwd=tmp_path).returncode == 0
    proc = _run(*analyze[:-1], "--set=profile.num_points=5", cwd=tmp_path)
    _one_line_error(proc, "other settings", "--overwrite")
    assert "wrote" not in proc.stdout
    proc = _run(*analyze[:-1], "--set=profile.num_points=5", "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    arrays = io.load_arrays(str(run / "analysis" / "profile" / "step_000000060.npz"))
    assert arrays["train_losses"].shape == (1, 5)
    summary = json.loads(open(run / "analysis" / "summary.json").read())
    assert set(summary["profile"]) == {"60"}
