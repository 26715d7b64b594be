"""Fault injection on real processes (slow tier): kill -9 at each write point, a second writer, a full
disk and a read-only workdir.

A kill is injected by running train.py / analyze.py under a wrapper that replaces `sme.io`'s two
writers: at the N-th write whose path matches a pattern it writes the temporary file (or half a JSONL
line) and then sends itself SIGKILL, before the rename; that is the worst moment of an atomic write
and the only one of an append. Re-running the same command must then give exactly the files of an
uninterrupted run.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sme import io, runs

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("time", "steps_per_sec", "seconds")

WRAPPER = r"""
import os, re, runpy, signal, sys
from sme import io
pattern, count, script = re.compile(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
seen = [0]

def hit(path):
    if pattern.search(path):
        seen[0] += 1
        return seen[0] == count
    return False

atomic_write, append_jsonl = io._atomic_write, io.append_jsonl

def killing_atomic_write(path, write_fn):
    if not hit(path):
        return atomic_write(path, write_fn)
    def write_then_die(f):
        write_fn(f)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return atomic_write(path, write_then_die)

def killing_append(path, record):
    if not hit(path):
        return append_jsonl(path, record)
    with open(path, "a") as f:
        line = io.dumps(record)
        f.write(line[:len(line) // 2])
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

io._atomic_write, io.append_jsonl = killing_atomic_write, killing_append
sys.argv = [script] + sys.argv[4:]
sys.path.insert(0, os.path.dirname(script))  # as `python script` would
runpy.run_path(script, run_name="__main__")
"""

TRAIN_FLAGS = ("--config.train.snapshot_start=30", "--config.train.snapshot_every=3")


def _cmd(script, *args):
    return [sys.executable, os.path.join(ROOT, script), *args]


def _killed(pattern, count, script, *args, cwd):
    proc = subprocess.run([sys.executable, "-c", WRAPPER, pattern, str(count), os.path.join(ROOT, script), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {pattern} #{count}: {proc.stderr[-2000:]}"


def _ok(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _state(workdir):
    """Every file's content in comparable form: arrays of npz files, JSONL/JSON records without times."""
    out = {}
    for directory, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, workdir)
            if name == runs.LOCK_FILE or name.endswith(".png") or name in ("config.json", "settings.json"):
                continue
            if name.endswith(".npz"):
                arrays = (io.read_checkpoint(path) if rel.startswith("checkpoints") else
                          io.load_arrays(path, require_digest=True))
                out[rel] = {k: v for k, v in arrays.items() if k not in VOLATILE}
            elif name.endswith(".jsonl"):
                out[rel] = [{k: v for k, v in r.items() if k not in VOLATILE} for r in io.read_jsonl(path)]
            elif name.endswith(".json"):
                out[rel] = io.read_json(path)
            else:
                out[rel] = open(path, "rb").read()
    return out


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for rel in a:
        if isinstance(a[rel], dict) and all(isinstance(v, np.ndarray) for v in a[rel].values()):
            assert sorted(a[rel]) == sorted(b[rel]), rel
            for k in a[rel]:
                np.testing.assert_array_equal(a[rel][k], b[rel][k], err_msg=f"{rel}:{k}")
        else:
            assert repr(a[rel]) == repr(b[rel]), rel  # repr: NaN equals NaN


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """An uninterrupted smoke run with snapshots (the reference of the kill tests)."""
    tmp = tmp_path_factory.mktemp("faults")
    _ok(_cmd("train.py", f"--config={ROOT}/configs/smoke.py", f"--workdir={tmp / 'clean'}", *TRAIN_FLAGS), tmp)
    return tmp, tmp / "clean"


# Kill points hit one after another on the same workdir: each re-run first recovers from the previous
# kill, then is killed at the next point (the counts are of matching writes within that re-run).
TRAIN_KILLS = [
    (r"checkpoints/step_000000030\.npz$", 1),  # a rolling checkpoint, mid-write
    (r"metrics\.jsonl$", 1),  # the first line after resuming (step 40), half written
    (r"snapshots\.npz$", 2),  # the snapshots written with checkpoint 50
    (r"checkpoints/step_000000060\.npz$", 1),  # the final checkpoint
]


def test_training_killed_at_each_write_then_resumed_equals_uninterrupted(clean_run, tmp_path):
    tmp, clean = clean_run
    workdir = tmp_path / "killed"
    args = (f"--config={ROOT}/configs/smoke.py", f"--workdir={workdir}", *TRAIN_FLAGS)
    for pattern, count in TRAIN_KILLS:
        _killed(pattern, count, "train.py", *args, cwd=tmp_path)
    _ok(_cmd("train.py", *args), tmp_path)
    _assert_same(_state(workdir), _state(clean))


ANALYZE = ("--analyses=profile", "--steps=20,40", "--set=profile.num_directions=1", "--set=profile.num_points=3")


def test_analysis_killed_at_each_write_then_rerun_equals_uninterrupted(clean_run, tmp_path):
    _, clean = clean_run
    workdir, reference = tmp_path / "run", tmp_path / "reference"
    shutil.copytree(clean, workdir)
    shutil.copytree(clean, reference)
    _ok(_cmd("analyze.py", f"--workdir={reference}", *ANALYZE), tmp_path)
    _killed(r"analysis/profile/step_000000040\.npz$", 1, "analyze.py", f"--workdir={workdir}", *ANALYZE,
            cwd=tmp_path)
    _killed(r"analysis/summary\.json$", 1, "analyze.py", f"--workdir={workdir}", *ANALYZE, cwd=tmp_path)
    _ok(_cmd("analyze.py", f"--workdir={workdir}", *ANALYZE), tmp_path)
    _assert_same(_state(workdir), _state(reference))


SWEEP = (f"--config={ROOT}/configs/sme_weak_error.py:tiny", "--config.sde.keep_prob_grid=0.8",
         "--config.sde.lr_grid=0.2,0.1", "--config.sde.num_replicas=40", "--config.sde.num_batches=4",
         "--config.sde.variants=order1", "--config.sde.richardson=False")


def test_sme_sweep_killed_at_a_cell_write_then_rerun_equals_uninterrupted(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    _ok(_cmd("train.py", f"--workdir={clean}", *SWEEP), tmp_path)
    _killed(r"sme/cell_p0\.8_lr0\.1\.npz$", 1, "train.py", f"--workdir={killed}", *SWEEP, cwd=tmp_path)
    assert os.path.exists(killed / "sme" / "cell_p0.8_lr0.2.npz")  # the first cell finished
    _ok(_cmd("train.py", f"--workdir={killed}", *SWEEP), tmp_path)
    _assert_same(_state(killed), _state(clean))


def test_a_second_train_is_refused_while_training(tmp_path):
    workdir = tmp_path / "run"
    first = subprocess.Popen(_cmd("train.py", f"--config={ROOT}/configs/smoke.py", f"--workdir={workdir}",
                                  "--config.train.num_steps=100000", "--config.train.checkpoint_steps="),
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not io.list_checkpoints(str(workdir)) and time.time() < deadline:
            time.sleep(0.2)
        assert io.list_checkpoints(str(workdir)), "first writer never started"
        proc = subprocess.run(_cmd("train.py", f"--config={ROOT}/configs/smoke.py", f"--workdir={workdir}",
                                   "--config.train.num_steps=100000", "--config.train.checkpoint_steps="),
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
        assert f"in use by process {first.pid} (training)" in errors[0]
    finally:
        first.kill()
        first.wait()
    records = io.read_jsonl(str(workdir / "metrics.jsonl"))
    assert [r["step"] for r in records] == sorted({r["step"] for r in records})  # one writer: no duplicates


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 96 KiB tmpfs (root only; skipped elsewhere): room for config, metrics and a few checkpoints."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_earlier_files_stay_intact(tiny_tmpfs, tmp_path):
    workdir = tiny_tmpfs / "run"
    proc = subprocess.run(_cmd("train.py", f"--config={ROOT}/configs/smoke.py", f"--workdir={workdir}",
                               "--config.train.checkpoint_steps=linear:60"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "No space left on device" in errors[0] and str(workdir) in errors[0]
    saved = io.list_checkpoints(str(workdir))
    assert saved, "the disk filled before the first checkpoint; the test needs a larger tmpfs"
    for _, path in saved:
        io.read_checkpoint(path)  # every checkpoint on disk verifies
    assert io.read_json(str(workdir / "config.json"))["config"]["seed"] == 0
    steps = [r["step"] for r in io.read_jsonl(str(workdir / "metrics.jsonl"))]
    assert steps == sorted(set(steps))
    assert not [n for _, _, names in os.walk(workdir) for n in names if n.startswith(".tmp_")]


def test_a_read_only_workdir_is_one_line_and_untouched(tiny_tmpfs, tmp_path):
    workdir = tiny_tmpfs / "run"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("earlier")
    if subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], capture_output=True).returncode != 0:
        pytest.skip("cannot remount read-only")
    proc = subprocess.run(_cmd("train.py", f"--config={ROOT}/configs/smoke.py", f"--workdir={workdir}"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert str(workdir) in errors[0] and ("not writable" in errors[0] or "Read-only" in errors[0])
    assert sorted(os.listdir(workdir)) == ["keep.txt"]
