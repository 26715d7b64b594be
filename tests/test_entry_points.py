"""The console commands sme-train / sme-analyze and --config paths from any directory (sme.cli.config_path)."""

import os
import shutil
import subprocess
import sys

import pytest

from sme import cli, io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(name):
    path = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e . creates it)")
    return path


def test_config_path_falls_back_to_the_installed_package(tmp_path, monkeypatch):
    installed = os.path.join(ROOT, "configs", "smoke.py")
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert cli.config_path("configs/smoke.py") == installed
    assert cli.config_path("configs/e2_noise.py:sgd") == os.path.join(ROOT, "configs", "e2_noise.py") + ":sgd"
    assert cli.config_path("configs/paper/p_e3.py") == os.path.join(ROOT, "configs", "paper", "p_e3.py")
    assert cli.config_path("configs/missing.py") == "configs/missing.py"  # the load error names what was given
    assert cli.config_path("mine/smoke.py") == "mine/smoke.py"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "smoke.py").write_text("")
    assert cli.config_path("configs/smoke.py") == "configs/smoke.py"  # a file here comes first


@pytest.mark.heavy
def test_help_lists_the_flags_from_another_directory(tmp_path):
    for name, wanted in (("sme-train", ("--config", "--workdir", "--num_processes", "--coordinator_address")),
                         ("sme-analyze", ("--analyses", "--workdir", "--process_id"))):
        proc = subprocess.run([_command(name), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]  # absl's --help exits with 1
        for flag in wanted:
            assert f"  {flag}" in proc.stdout, (name, flag)


@pytest.mark.heavy
def test_sme_train_runs_an_installed_config_from_another_directory(tmp_path):
    proc = subprocess.run([_command("sme-train"), "--config=configs/smoke.py", "--config.train.num_steps=2",
                           "--config.train.eval_every=1", "--config.train.checkpoint_steps=0",
                           "--config.train.checkpoint_every=2", "--workdir=run"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: step 2" in proc.stdout
    saved = io.read_json(str(tmp_path / "run" / "config.json"))["config"]
    assert (saved["train"]["num_steps"], saved["data"]["num_train"]) == (2, 300)  # configs/smoke.py's data
    assert [step for step, _ in io.list_checkpoints(str(tmp_path / "run"))] == [0, 2]
