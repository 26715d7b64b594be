"""A workdir as a small database: each trap of a run directory that could lose work or serve a stale
result, one test each (re-run, config.json, lock, settings keys, verification, checkpoint order,
--restart, seeds, strict JSON, divergence), in process and fast."""

import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import smoke
from sme import analyses, io, rng, runs, sweep
from sme import config as config_lib
from sme.analyses import common, runner
from sme.train import loop

VOLATILE = ("time", "steps_per_sec")


def _metrics(workdir):
    records = io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def _files(workdir):
    """{relative path: bytes} of every file under workdir except the lock."""
    out = {}
    for directory, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(directory, name)
            if name != runs.LOCK_FILE:
                out[os.path.relpath(path, workdir)] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished smoke run (60 steps; checkpoints 0, 20, 40, 60), copied by each test that changes it."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    loop.run(smoke.get_config(), workdir)
    return workdir


def _copy(trained, tmp_path, name="run"):
    dst = str(tmp_path / name)
    shutil.copytree(trained, dst)
    return dst


# --- 1. re-running a finished run -------------------------------------------------------------------


def test_rerunning_a_finished_run_is_a_no_op_returning_its_final_metrics(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    before = _files(workdir)
    record = loop.run(smoke.get_config(), workdir)
    assert record["step"] == 60
    assert record["train/risk"] == io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]["train/risk"]
    assert _files(workdir) == before  # nothing rewritten


# --- 2. resume needs config.json ------------------------------------------------------------------------


def test_checkpoints_without_config_json_are_refused_and_kept(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    os.remove(os.path.join(workdir, "config.json"))
    before = _files(workdir)
    other = smoke.get_config()
    other.optim.lr = 0.05
    with pytest.raises(runs.RunError, match="no config.json.*nothing was changed"):
        loop.run(other, workdir)
    assert _files(workdir) == before


# --- 3. one writer per workdir -------------------------------------------------------------------------


def _hold_lock(workdir):
    """A child process holding the workdir lock until its stdin closes; returns it once it holds it."""
    code = ("import sys; from sme import runs\n"
            f"with runs.WorkdirLock({workdir!r}, 'training'):\n"
            "    print('held', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holders_pid(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    holder = _hold_lock(workdir)
    try:
        before = _files(workdir)
        with pytest.raises(runs.RunError, match=f"in use by process {holder.pid} \\(training\\)"):
            loop.run(smoke.get_config(), workdir)
        with pytest.raises(runs.RunError, match=f"in use by process {holder.pid}"):
            runner.analyse_run(workdir, runner.Request(("toy_scaled",), "last"))
        assert _files(workdir) == before
    finally:
        holder.stdin.close()
        holder.wait()
    loop.run(smoke.get_config(), workdir)  # released when the holder exits


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with runs.WorkdirLock(str(tmp_path / "w"), "outer"):
        with runs.WorkdirLock(str(tmp_path / "w"), "inner"):
            pass
        assert open(tmp_path / "w" / runs.LOCK_FILE).read().split() == [str(os.getpid()), "outer"]


# --- 4. analysis results keyed by settings ---------------------------------------------------------------


TOY_DEFAULTS = dict(scale=1.0)


def _toy(ctx, *, key):
    """Test analysis: scale * the sum of the readout weights; a NaN scalar; settings as JSON text."""
    s = common.fill_settings("toy_scaled", ctx.settings, TOY_DEFAULTS)
    total = float(np.sum(np.asarray(ctx.params["out"]["w"], np.float64)))
    return {"value": np.asarray(s["scale"] * total), "undefined": np.asarray(np.nan),
            "settings": np.asarray(json.dumps(s, sort_keys=True))}


def _plot_toy(directory, steps):
    values = [a["value"] for _, a in common.load_step_artifacts(directory, steps)]
    assert len(values) == len(steps)
    return []


@pytest.fixture(autouse=True)
def _toy_registered():
    """Registers the toy analysis for this module's tests only (other tests see the real registry)."""
    if "toy_scaled" not in analyses.REGISTRY:
        analyses.register("toy_scaled", plot_fn=_plot_toy)(_toy)
    yield
    analyses.REGISTRY.pop("toy_scaled", None)


def _request(steps="all", overwrite=False, **settings):
    return runner.Request(("toy_scaled",), steps, 0, {"toy_scaled": settings}, overwrite)


def _toy_value(workdir, step):
    return float(io.load_arrays(os.path.join(workdir, "analysis", "toy_scaled", f"step_{step:09d}.npz"))["value"])


def test_changed_settings_are_refused_naming_overwrite_then_recomputed_for_every_step(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    runner.analyse_run(workdir, _request(scale=1.0))
    base = {s: _toy_value(workdir, s) for s in (0, 20, 40, 60)}
    with pytest.raises(runner.AnalysisError, match="other settings.*--overwrite"):
        runner.analyse_run(workdir, _request(scale=2.0))
    assert {s: _toy_value(workdir, s) for s in base} == base  # refused before any write
    # --overwrite on one step: the directory's other steps (old settings) go, none is served stale.
    summary = runner.analyse_run(workdir, _request("60", overwrite=True, scale=2.0))
    assert _toy_value(workdir, 60) == pytest.approx(2 * base[60])
    assert sorted(os.listdir(os.path.join(workdir, "analysis", "toy_scaled"))) == [
        "settings.json", "step_000000060.npz"]
    assert set(summary["toy_scaled"]) == {"60"}
    runner.analyse_run(workdir, _request(scale=2.0))  # the rest, with the new settings
    assert {s: _toy_value(workdir, s) for s in base} == pytest.approx({s: 2 * v for s, v in base.items()})
    manifest = io.read_json(os.path.join(workdir, "analysis", "toy_scaled", "settings.json"))
    assert manifest["settings"] == {"scale": 2.0}
    for step in base:
        _, meta = io.load_artifact(os.path.join(workdir, "analysis", "toy_scaled", f"step_{step:09d}.npz"))
        assert meta["settings"] == manifest["digest"] == runs.settings_digest({"scale": 2.0})


def test_bad_settings_are_refused_before_any_data_or_checkpoint_is_loaded(trained, tmp_path, monkeypatch):
    workdir = _copy(trained, tmp_path)
    monkeypatch.setattr(runner, "load_run", lambda *a: pytest.fail("data loaded before the settings were checked"))
    monkeypatch.setattr(io, "load_checkpoint", lambda *a: pytest.fail("checkpoint loaded"))
    with pytest.raises(runner.AnalysisError, match="toy_scaled: unknown settings \\['scael'\\]"):
        runner.analyse_run(workdir, _request(scael=2.0))
    with pytest.raises(runner.AnalysisError, match="scale='big' is not a float"):
        runner.analyse_run(workdir, _request(scale="big"))
    assert not os.path.exists(os.path.join(workdir, "analysis"))


# --- 5. every artifact verified -------------------------------------------------------------------------


def _truncate(path, keep=0.5):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:int(len(raw) * keep)])


def _flip(path):
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("damage", [_truncate, _flip])
def test_an_invalid_analysis_artifact_is_recomputed_never_reused(trained, tmp_path, damage):
    workdir = _copy(trained, tmp_path)
    runner.analyse_run(workdir, _request(scale=1.0))
    path = os.path.join(workdir, "analysis", "toy_scaled", "step_000000020.npz")
    good = io.load_arrays(path)
    damage(path)
    with pytest.raises(io.CorruptArtifact, match="step_000000020.npz"):
        io.load_arrays(path)
    runner.analyse_run(workdir, _request(scale=1.0))
    np.testing.assert_array_equal(io.load_arrays(path)["value"], good["value"])


def _text(obj):
    return json.dumps(obj, sort_keys=True)  # NaN == NaN as text


def test_a_corrupt_summary_is_reported_and_rebuilt_from_the_artifacts(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    first = runner.analyse_run(workdir, _request(scale=1.0))
    path = os.path.join(workdir, "analysis", "summary.json")
    _truncate(path)
    with pytest.raises(io.CorruptArtifact, match="summary.json: not valid JSON"):
        io.read_json(path)
    again = runner.analyse_run(workdir, _request(scale=1.0))
    assert _text(again["toy_scaled"]) == _text(first["toy_scaled"])
    text = open(path).read()  # a valid edit that breaks the digest is caught too
    open(path, "w").write(text.replace('"value": ', '"value": 1', 1))
    with pytest.raises(io.CorruptArtifact, match="SHA-256 mismatch"):
        io.read_json(path)
    assert _text(runner.read_summary(workdir)["toy_scaled"]) == _text(first["toy_scaled"])


def test_summary_is_strict_json_with_settings_as_objects(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    runner.analyse_run(workdir, _request(scale=1.0))
    text = open(os.path.join(workdir, "analysis", "summary.json")).read()

    def no_constants(name):
        raise AssertionError(f"bare {name} in summary.json")

    raw = json.loads(text, parse_constant=no_constants)
    entry = raw["toy_scaled"]["60"]
    assert entry["undefined"] is None and entry["undefined__nonfinite"] == "nan"
    assert entry["settings"] == {"scale": 1.0}
    assert np.isnan(runner.read_summary(workdir)["toy_scaled"]["60"]["undefined"])  # read back as the float


def test_strict_json_round_trips_non_finite_values(tmp_path):
    value = {"a": float("inf"), "b": [1.0, float("nan"), -float("inf")], "c": {"d": float("-inf")}, "e": "x"}
    path = str(tmp_path / "v.json")
    io.write_json(path, value, digest=True)
    text = open(path).read()
    assert "NaN" not in text and "Infinity" not in text
    back = io.read_json(path)
    assert back["a"] == np.inf and back["c"]["d"] == -np.inf and back["e"] == "x"
    assert back["b"][0] == 1.0 and np.isnan(back["b"][1]) and back["b"][2] == -np.inf
    line = io.dumps({"step": 3, "loss": float("nan")})
    assert json.loads(line) == {"step": 3, "loss": None, "loss__nonfinite": "nan"}


@pytest.mark.slow
def test_a_truncated_snapshots_file_is_reported_and_retaken(tmp_path):
    cfg = smoke.get_config()
    cfg.train.snapshot_start, cfg.train.snapshot_every = 30, 3
    clean, broken = str(tmp_path / "clean"), str(tmp_path / "broken")
    loop.run(cfg, clean)
    loop.run(cfg, broken)
    for step, path in io.list_checkpoints(broken):
        if step > 40:
            os.remove(path)
    _truncate(os.path.join(broken, "snapshots.npz"))
    with pytest.raises(io.CorruptArtifact, match="snapshots.npz: unreadable"):
        io.load_arrays(os.path.join(broken, "snapshots.npz"))
    loop.run(cfg, broken)  # resumes from before the window (step 20) and retakes every snapshot
    a, b = (io.load_arrays(os.path.join(d, "snapshots.npz")) for d in (clean, broken))
    np.testing.assert_array_equal(a["steps"], b["steps"])
    np.testing.assert_array_equal(a["params"], b["params"])
    assert _metrics(broken) == _metrics(clean)


def test_a_corrupt_sme_cell_is_not_reused(tmp_path):
    path = str(tmp_path / "sme" / "cell_p0.5_lr0.1.npz")
    sweep.save_cell(path, {"mean/discrete": np.arange(6.0).reshape(2, 3), "cell_config": np.asarray("{}")})
    assert sweep.load_cell(path, "{}") is not None
    _flip(path)
    assert sweep.load_cell(path, "{}") is None
    _truncate(path)
    assert sweep.load_cell(path, "{}") is None


# --- 6. checkpoint order, temporary files, metrics ----------------------------------------------------


def test_older_checkpoints_are_deleted_only_after_the_new_one_verifies(trained, tmp_path, monkeypatch):
    workdir = _copy(trained, tmp_path)
    for step, path in io.list_checkpoints(workdir):
        if step > 40:
            os.remove(path)
    cfg = smoke.get_config()
    real = io.read_checkpoint

    def corrupt_on_readback(path):
        if path.endswith("step_000000050.npz"):
            raise io.CorruptCheckpoint(f"{path}: SHA-256 mismatch, the file is corrupt")
        return real(path)

    monkeypatch.setattr(io, "read_checkpoint", corrupt_on_readback)
    with pytest.raises(io.CorruptCheckpoint):
        loop.run(cfg, workdir)
    assert [s for s, _ in io.list_checkpoints(workdir)] == [0, 20, 40, 50]  # 40's successor unverified: 40 stays


def test_temporary_files_are_cleaned_and_metrics_are_truncated_to_the_resumed_step(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    reference = _metrics(workdir)
    for step, path in io.list_checkpoints(workdir):
        if step > 20:
            os.remove(path)
    leftovers = [os.path.join(workdir, "checkpoints", ".tmp_abc.npz"), os.path.join(workdir, ".tmp_xyzconfig.json")]
    for path in leftovers:
        open(path, "wb").write(b"half")
    records = io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:  # a second writer's and a killed writer's lines
        f.write(json.dumps(records[1]) + "\n" + json.dumps(records[0]) + "\n" + '{"step": 8')
    loop.run(smoke.get_config(), workdir)
    assert not any(os.path.exists(p) for p in leftovers)
    assert _metrics(workdir) == reference


# --- 7. --restart -----------------------------------------------------------------------------------------


def test_unreadable_checkpoints_with_metrics_are_refused_unless_restart(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    reference = _metrics(workdir)
    for _, path in io.list_checkpoints(workdir):
        _flip(path)
    before = _files(workdir)
    with pytest.raises(runs.RunError, match="none of its 4 checkpoints can be read.*--restart"):
        loop.run(smoke.get_config(), workdir)
    assert _files(workdir) == before
    record = loop.run(smoke.get_config(), workdir, restart=True)
    assert record["step"] == 60 and _metrics(workdir) == reference


# --- 8. seeds ------------------------------------------------------------------------------------------------


def test_every_bit_of_the_seed_counts_and_out_of_range_seeds_are_refused():
    data = lambda seed: np.asarray(jax.random.key_data(rng.stream_key(seed, rng.INIT)))  # noqa: E731
    assert not np.array_equal(data(0), data(2**32))
    assert not np.array_equal(data(5), data(2**40 + 5))
    assert not np.array_equal(data(2**63 - 1), data(2**31 - 1))
    # Below 2**32 the key is jax.random.key(seed) as before: existing runs keep their numbers.
    np.testing.assert_array_equal(jax.random.key_data(rng.root_key(7)), jax.random.key_data(jax.random.key(7)))
    # x64 only here, mid-test: the keys above are checked in the default 32-bit mode
    with jax.enable_x64(True):
        # with 64-bit integers jax itself keys a large seed as (high, low): the same key
        np.testing.assert_array_equal(jax.random.key_data(rng.root_key(2**40 + 5)),
                                      jax.random.key_data(jax.random.key(2**40 + 5)))
    for seed in (2**63, -1, 10**20, True):
        cfg = smoke.get_config()
        cfg.seed = seed
        with pytest.raises(config_lib.ConfigError, match="config.seed=.*must be an integer in \\[0, 2\\*\\*63\\)"):
            config_lib.validate(cfg)


def test_seed_two_to_the_32_is_a_different_run_than_seed_0(trained, tmp_path):
    cfg = smoke.get_config()
    cfg.seed = 2**32
    cfg.train.num_steps, cfg.train.checkpoint_steps = 20, "0,20"
    loop.run(cfg, str(tmp_path / "big"))
    mine = io.read_checkpoint(io.checkpoint_path(str(tmp_path / "big"), 0))
    seed0 = io.read_checkpoint(io.checkpoint_path(trained, 0))
    assert not np.array_equal(mine[".params['out']['w']"], seed0[".params['out']['w']"])


# --- 9. a full disk ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_is_one_error_naming_the_file_and_earlier_files_stay_intact(trained, tmp_path, monkeypatch):
    workdir = _copy(trained, tmp_path)
    for step, path in io.list_checkpoints(workdir):
        if step > 40:
            os.remove(path)
    before = {k: v for k, v in _files(workdir).items() if k.startswith("checkpoints")}
    real = os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("step_000000050.npz"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="cannot write .*step_000000050.npz: No space left on device"):
        loop.run(smoke.get_config(), workdir)
    after = {k: v for k, v in _files(workdir).items() if k.startswith("checkpoints")}
    assert after == before  # no partial file, no temporary left, the old ones untouched
    monkeypatch.setattr(os, "fsync", real)
    assert loop.run(smoke.get_config(), workdir)["step"] == 60


def test_unusable_workdirs_are_named(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(runs.RunError, match="is a file, not a directory"):
        runs.check_workdir(str(tmp_path / "file"))
    with pytest.raises(runs.RunError, match="is a file, not a directory"):
        runs.check_workdir(str(tmp_path / "file" / "run"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(runs.RunError, match="is not writable"):
        runs.check_workdir(str(tmp_path))
    with pytest.raises(runs.RunError, match="cannot be created"):
        runs.check_workdir(str(tmp_path / "new"))


# --- 10. divergence names a checkpoint whose loss was finite ---------------------------------------------


def test_divergence_names_a_checkpoint_before_the_non_finite_step(tmp_path):
    cfg = smoke.get_config()
    cfg.loss, cfg.optim.lr = "mse", 1e4
    cfg.train.checkpoint_every, cfg.train.checkpoint_steps = 1, "0,1,2,3,4,5,6,7,8,9,10"
    with pytest.raises(loop.NonFiniteLoss) as info:
        loop.run(cfg, str(tmp_path))
    message = str(info.value)
    bad = int(message.split("at step ")[1].split(";")[0])
    named = int(message.split("Last good checkpoint: step ")[1].split(" ")[0])
    assert 0 <= named < bad
    saved = [s for s, _ in io.list_checkpoints(str(tmp_path))]
    assert bad in saved  # the checkpoint of the step whose loss is non-finite exists, and is not named


def test_a_corrupt_config_json_or_settings_manifest_is_named_not_trusted(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    path = os.path.join(workdir, "config.json")
    text = open(path).read()
    open(path, "w").write(text.replace('"keep_prob": 0.8', '"keep_prob": 0.9'))  # valid JSON, wrong digest
    before = _files(workdir)
    with pytest.raises(runs.RunError, match="config.json: SHA-256 mismatch"):
        loop.run(smoke.get_config(), workdir)
    with pytest.raises(runner.AnalysisError, match="config.json: SHA-256 mismatch"):
        runner.analyse_run(workdir, _request(scale=1.0))
    assert _files(workdir) == before
    open(path, "w").write(text)
    runner.analyse_run(workdir, _request(scale=1.0))
    _truncate(os.path.join(workdir, "analysis", "toy_scaled", "settings.json"))
    with pytest.raises(runner.AnalysisError, match="unknown settings.*--overwrite"):
        runner.analyse_run(workdir, _request(scale=1.0))


def test_every_registered_analysis_checks_its_settings_before_reading_anything_else():
    """The settings contract of `sme.analyses` that lets analyze.py refuse a bad --set before loading data."""
    registry = analyses.load_all()
    for name in sorted(set(registry) - {"toy_scaled"}):
        with pytest.raises(ValueError, match=f"{name}: unknown settings \\['no_such_setting'\\]"):
            analyses.check_settings(name, {"no_such_setting": 1})
        analyses.check_settings(name, {})  # the defaults pass


def test_a_rerun_restores_summary_entries_another_writer_dropped(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    first = runner.analyse_run(workdir, _request(scale=1.0))
    path = os.path.join(workdir, "analysis", "summary.json")
    io.write_json(path, {"other": {"0": {"x": 1.0}}}, digest=True)  # a valid summary without our entries
    again = runner.analyse_run(workdir, _request(scale=1.0))
    assert _text(again["toy_scaled"]) == _text(first["toy_scaled"]) and again["other"] == {"0": {"x": 1.0}}


def test_field_added_later_at_its_default_resumes(tmp_path):
    """A run whose config.json predates a field (here `penalty_lr`, default -1) resumes when the field
    holds its base default, and is refused, naming the field, when it does not."""
    cfg = smoke.get_config()
    workdir = str(tmp_path)
    runs.write_run_config(workdir, cfg)
    saved = io.read_json(runs.config_path(workdir))
    del saved["config"]["penalty_lr"]
    io.write_json(runs.config_path(workdir), saved, digest=True)
    assert runs.check_same_run(cfg, workdir)

    cfg.penalty_lr = 0.01
    with pytest.raises(config_lib.ConfigError, match=r"config.penalty_lr: None -> 0.01"):
        runs.check_same_run(cfg, workdir)
