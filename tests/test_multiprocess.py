"""Multi-process runs over jax.distributed (sme.distributed): two local CPU processes with two devices each
train R = 8 replicas and run a batched analysis on one global mesh of 4 devices; the files equal those of
one process with 4 devices, and process 1 writes nothing."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sme import io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One process of the run. Flags go through the entry points' parser (sme.cli), so the test covers
# --coordinator_address/--num_processes/--process_id; training (sme.driver) and the analysis
# (sme.analyses.runner) are those of train.py and analyze.py, in one process to start JAX once.
_WORKER = textwrap.dedent("""
    import builtins, json, os, sys, tempfile
    from absl import flags, logging
    from sme import cli
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)  # the analysis logs its batched calls
    workdir = os.path.abspath(sys.argv[1])
    flags.FLAGS(["worker", *sys.argv[2:]])
    cli.initialize_distributed()
    import jax
    writes = []
    if jax.process_index() != 0:  # record every attempt of this process to write in the workdir
        def inside(path):
            return os.path.abspath(os.fspath(path)).startswith(workdir)
        real_open, real_mkstemp = builtins.open, tempfile.mkstemp
        def spy_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and inside(file) and any(c in mode for c in "wax+"):
                writes.append(("open", os.fspath(file), mode))
            return real_open(file, mode, *args, **kwargs)
        def spy(name, real):
            def wrapped(path, *args, **kwargs):
                if inside(path):
                    writes.append((name, os.fspath(path)))
                return real(path, *args, **kwargs)
            return wrapped
        builtins.open = spy_open
        os.remove, os.makedirs, os.replace = spy("remove", os.remove), spy("makedirs", os.makedirs), \\
            spy("replace", os.replace)
        tempfile.mkstemp = lambda *a, dir=None, **k: (writes.append(("mkstemp", dir)) if dir and inside(dir)
                                                      else None) or real_mkstemp(*a, dir=dir, **k)
    from configs import smoke
    from sme import driver
    from sme.analyses.runner import Request, analyse_run, read_config, run_settings
    cfg = smoke.get_config()
    cfg.train.num_replicas = 8
    cfg.train.num_steps = 20
    cfg.train.eval_every = 10
    cfg.train.checkpoint_every = 10
    cfg.train.checkpoint_steps = "0,10"
    record = driver.run(cfg, workdir)
    if os.environ.get("WORKER_ANALYSE", "1") == "0":
        print(json.dumps({"process": jax.process_index(), "step": record["step"], "writes": writes}))
        sys.exit(0)
    small = {"hessian": {"order": 12, "top_k": 3, "bottom_k": 0, "num_probes": 4, "num_examples": 100}}
    run_cfg = read_config(workdir)
    # steps 0, 10, 20 of replica 0: one vmapped call, padded to 4 items, one per device of the mesh
    analyse_run(workdir, Request(("hessian",), "all", "0", run_settings(run_cfg, ["hessian"], small), False, 4))
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "step": record["step"], "writes": writes}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(script, workdir, devices, args, analyse=True):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "WORKER_ANALYSE": str(int(analyse))}
    return subprocess.Popen([sys.executable, str(script), str(workdir), *args], cwd=os.path.dirname(workdir),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs):
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            outs.append((json.loads(out.strip().splitlines()[-1]), err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outs


def _files(workdir):
    return sorted(os.path.relpath(os.path.join(d, f), workdir) for d, _, fs in os.walk(workdir) for f in fs)


@pytest.mark.heavy
def test_two_processes_equal_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    (tmp_path / "multi").mkdir()
    (tmp_path / "single").mkdir()
    multi, single = tmp_path / "multi" / "run", tmp_path / "single" / "run"
    procs = _two(script, multi) + [_start(script, single, 4, [])]
    (p0, err0), (p1, _), (ref, _) = _finish(procs)

    assert (p0["process"], p1["process"], p0["processes"], ref["processes"]) == (0, 1, 2, 1)
    assert p0["devices"] == p1["devices"] == ref["devices"] == 4
    assert p1["writes"] == []  # process 1 wrote nothing, took no lock
    assert "(3 items, 4 devices)" in err0  # the analysis ran batched over the global mesh
    assert _files(multi) == _files(single)
    assert open(multi / ".lock").read().split()[0] == str(procs[0].pid)  # the lock is process 0's

    # Exact equality: each device runs the same compiled program on the same replicas/items as in the
    # one-process run, with no reduction across devices, so the bits agree (a tolerance would hide a
    # wrong shard order).
    for step, path in io.list_checkpoints(single):
        want, got = io.read_checkpoint(path), io.read_checkpoint(io.checkpoint_path(multi, step))
        assert list(want) == list(got)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"step {step} {name}")
    assert len(io.list_checkpoints(single)) == 3
    drop = ("time", "steps_per_sec")
    strip = lambda records: [{k: v for k, v in r.items() if k not in drop} for r in records]  # noqa: E731
    assert strip(io.read_jsonl(multi / "metrics.jsonl")) == strip(io.read_jsonl(single / "metrics.jsonl"))
    for step in (0, 10, 20):
        name = f"analysis/hessian/step_{step:09d}.npz"
        want, got = io.load_arrays(single / name), io.load_arrays(multi / name)
        assert sorted(want) == sorted(got)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} {key}")
    summary = io.read_json(multi / "analysis" / "summary.json")
    assert summary == io.read_json(single / "analysis" / "summary.json")
    assert set(summary["hessian"]) == {"0", "10", "20"}


def _two(script, workdir, analyse=True):
    port = _free_port()
    return [_start(script, workdir, 2, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                        f"--process_id={i}"], analyse) for i in range(2)]


@pytest.mark.slow
def test_two_processes_resume_like_one(tmp_path):
    """A 2-process run resumed from its step-10 checkpoint ends as an uninterrupted 1-process run (the processes
    read metrics.jsonl only after process 0 truncated it, so they evaluate and gather at the same steps)."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    (tmp_path / "multi").mkdir()
    (tmp_path / "single").mkdir()
    multi, single = tmp_path / "multi" / "run", tmp_path / "single" / "run"
    _finish(_two(script, multi, analyse=False) + [_start(script, single, 4, [], analyse=False)])
    os.remove(io.checkpoint_path(multi, 20))
    (p0, _), (p1, _) = _finish(_two(script, multi, analyse=False))
    assert (p0["step"], p1["step"], p1["writes"]) == (20, 20, [])
    want, got = io.read_checkpoint(io.checkpoint_path(single, 20)), io.read_checkpoint(io.checkpoint_path(multi, 20))
    for name in want:  # exact, as in test_two_processes_equal_one
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    drop = ("time", "steps_per_sec")
    strip = lambda records: [{k: v for k, v in r.items() if k not in drop} for r in records]  # noqa: E731
    assert strip(io.read_jsonl(multi / "metrics.jsonl")) == strip(io.read_jsonl(single / "metrics.jsonl"))


@pytest.mark.parametrize("args, message", [
    (["--num_processes=2", "--process_id=2"], "--process_id=2 is not in 0..1"),
    (["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"], "expected HOST:PORT"),
])
def test_bad_process_flags_are_one_line_errors(tmp_path, args, message):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/smoke.py",
                           f"--workdir={tmp_path / 'run'}", *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr
    assert not (tmp_path / "run").exists()


def test_single_process_needs_no_flags(monkeypatch):
    from sme import distributed

    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.requested() is None
    assert distributed.requested(num_processes=2, process_id=1) == {"num_processes": 2, "process_id": 1}
    assert distributed.requested(auto=True) == {}
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert distributed.requested() == {}


@pytest.mark.slow
def test_sme_sweep_through_train_py_in_two_processes(tmp_path):
    """train.py's own flags on an SME sweep: two processes x 2 devices give the cell file and metrics of one
    process x 4 devices (exact, as above: the replicas are split, never reduced across devices)."""
    args = [os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/sme_weak_error.py:tiny",
            "--config.sde.lr_grid=0.2", "--config.sde.keep_prob_grid=0.9", "--config.sde.num_replicas=16",
            "--config.sde.num_batches=4"]
    port = _free_port()

    def start(workdir, devices, extra):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
        return subprocess.Popen([sys.executable, *args, f"--workdir={workdir}", *extra], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start(tmp_path / "multi", 2, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                           f"--process_id={i}"]) for i in range(2)]
    procs.append(start(tmp_path / "single", 4, []))
    try:
        outs = [proc.communicate(timeout=900) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    assert "done: step" in outs[0][0] and "done: step" not in outs[1][0]  # process 0 reports
    assert _files(tmp_path / "multi") == _files(tmp_path / "single")
    want = io.load_arrays(tmp_path / "single" / "sme" / "cell_p0.9_lr0.2.npz")
    got = io.load_arrays(tmp_path / "multi" / "sme" / "cell_p0.9_lr0.2.npz")
    assert sorted(want) == sorted(got)
    for key in set(want) - {"seconds"}:  # wall time differs
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    timing = ("time", "seconds", "steps_per_sec")
    strip = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records]  # noqa: E731
    assert strip(io.read_jsonl(tmp_path / "multi" / "metrics.jsonl")) == strip(
        io.read_jsonl(tmp_path / "single" / "metrics.jsonl"))
