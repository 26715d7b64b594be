"""`sme.config.build` returns a complete typed `Run`: the drivers read it, never the config again."""

import dataclasses
import json

import pytest

from configs import base, sme_weak_error, smoke
from sme import config as config_lib
from sme import analyses, driver, io, losses, runs, sweep
from sme.analyses import Context, RunInfo, runner


class SealableConfig:
    """A config that answers reads until `seal`, then fails every read naming the field."""

    def __init__(self, cfg):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_sealed", False)

    def seal(self):
        object.__setattr__(self, "_sealed", True)

    def _read(self, name):
        if self._sealed:
            raise AssertionError(f"config.{name} was read after config.build")

    def __getattr__(self, name):
        self._read(name)
        return getattr(self._cfg, name)

    def __getitem__(self, name):
        self._read(name)
        return self._cfg[name]

    def __contains__(self, name):
        self._read(name)
        return name in self._cfg


@pytest.fixture
def sealing_build(monkeypatch):
    """config.build that seals its (sealable) config once the Run is built."""
    real = config_lib.build

    def build(cfg):
        run = real(cfg)
        cfg.seal()
        return run

    monkeypatch.setattr(config_lib, "build", build)


def _tiny_sweep_config():
    cfg = sme_weak_error.get_config("tiny")
    cfg.sde.variants, cfg.sde.keep_prob_grid, cfg.sde.lr_grid = "order1", "0.8,0.5", "0.2"
    cfg.sde.num_replicas, cfg.sde.num_batches, cfg.sde.richardson = 8, 2, False
    return cfg


def test_build_returns_every_field_a_run_needs():
    cfg = smoke.get_config()
    run = config_lib.build(cfg)
    t = cfg.train
    assert run.config == cfg.to_dict()  # what config.json records, unchanged
    assert (run.seed, run.loss, run.mask_mode, run.lr) == (cfg.seed, cfg.loss, cfg.mask_mode, cfg.optim.lr)
    assert run.train == config_lib.TrainSpec(
        num_steps=t.num_steps, batch_size=t.batch_size or run.dataset.num_train, num_replicas=t.num_replicas,
        share_init=t.share_init, dtype=t.dtype, eval_every=t.eval_every, checkpoint_every=t.checkpoint_every,
        checkpoint_steps=tuple(config_lib.parse_checkpoint_steps(t.checkpoint_steps, t.num_steps)),
        log_every_secs=t.log_every_secs, snapshot_start=t.snapshot_start, snapshot_every=t.snapshot_every)
    assert run.sweep is None and run.tensorboard is False and callable(run.objective)
    assert run.model.out_dim == run.dataset.out_dim
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.seed = 1


def test_full_batch_resolves_to_the_training_set_size():
    cfg = smoke.get_config()
    cfg.train.batch_size = 0
    run = config_lib.build(cfg)
    assert run.train.batch_size == run.dataset.num_train == run.batch_size


def test_the_sweep_spec_holds_the_grids_and_one_model_per_keep_prob():
    cfg = _tiny_sweep_config()
    run = config_lib.build(cfg)
    s = run.sweep
    assert s.keep_probs == (0.8, 0.5) and s.lrs == (0.2,) and s.variants == ("order1",)
    assert s.horizon == (float(cfg.sde.horizon) or cfg.train.num_steps * cfg.optim.lr)
    assert [{site.keep_prob for site in m.sites if site.droppable} for m in s.models] == [{0.8}, {0.5}]
    assert (s.num_replicas, s.num_batches, s.num_boot) == (8, 2, cfg.sde.num_boot)


@pytest.mark.heavy
def test_the_objective_is_built_once_per_run(monkeypatch, tmp_path):
    calls = []
    real = losses.make_objective
    monkeypatch.setattr(losses, "make_objective", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cfg = smoke.get_config()
    cfg.train.num_steps, cfg.train.checkpoint_steps = 4, ""
    driver.run(cfg, str(tmp_path))
    assert calls == [cfg.objective]


def test_training_reads_no_config_field_after_build(sealing_build, tmp_path):
    cfg = smoke.get_config()
    cfg.train.num_steps, cfg.train.checkpoint_steps = 4, ""
    record = driver.run(SealableConfig(cfg), str(tmp_path))
    assert record["step"] == 4
    assert runs.read_run_config(str(tmp_path))["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert driver.run(SealableConfig(cfg), str(tmp_path))["step"] == 4  # resume (finished): still no read


@pytest.mark.heavy
def test_the_sweep_reads_no_config_field_after_build(sealing_build, tmp_path):
    cfg = _tiny_sweep_config()
    record = driver.run(SealableConfig(cfg), str(tmp_path))
    assert record["cells"] == 2
    assert driver.run(SealableConfig(cfg), str(tmp_path))["cells"] == 2  # every cell skipped on resume


def test_a_cell_keeps_the_identity_its_config_gave_it():
    """Cells written before the typed Run are reused: their identity is the same JSON text."""
    cfg = _tiny_sweep_config()
    run = config_lib.build(cfg)
    spec = sweep.make_spec(run.sweep, run.sweep.models[1], run.loss, run.seed)
    s = cfg.sde
    expected = json.dumps({  # the identity as it was computed from the config
        "seed": cfg.seed, "data": cfg.data.to_dict(), "model": {**cfg.model.to_dict(), "keep_prob": 0.5},
        "loss": cfg.loss, "mask_mode": cfg.mask_mode, "lr": 0.2, "horizon": float(s.horizon) or
        cfg.train.num_steps * cfg.optim.lr, "spec": repr(spec), "num_replicas": s.num_replicas,
        "num_batches": s.num_batches, "num_evals": s.num_evals, "num_probes": s.num_probes,
        "eval_num_masks": s.eval_num_masks, "dtype": cfg.train.dtype}, sort_keys=True, default=list)
    assert sweep.cell_config(run, 0.5, 0.2, spec) == expected


@pytest.mark.parametrize("field,value,message", [
    ("optim.lr", 0.0, "learning rate must be finite and > 0"),
    ("train.batch_size", 301, "must be <= the 300 training examples"),
    ("objective", "l1", "mse loss only"),
])
def test_bad_values_fail_in_one_line_before_the_workdir_is_made(field, value, message, tmp_path):
    cfg = smoke.get_config()
    *blocks, leaf = field.split(".")
    (cfg[blocks[0]] if blocks else cfg)[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.{field}") as err:
        driver.run(cfg, str(tmp_path / "run"))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_the_typed_run_fields_of_analyses_default_to_the_base_config():
    defaults = base.get_config()
    old = {"train": {"batch_size": 8}, "model": {}}  # a config.json without sde (written before the block)
    info = RunInfo.from_config(old, "/runs/a")
    assert info == RunInfo(batch_size=8, num_steps=defaults.train.num_steps,
                           num_replicas=defaults.train.num_replicas, num_boot=defaults.sde.num_boot, workdir="/runs/a")
    full = smoke.get_config()
    full.sde.num_boot = 200
    info = RunInfo.from_config(full.to_dict())
    assert (info.batch_size, info.num_boot, info.num_replicas) == (full.train.batch_size, 200, full.train.num_replicas)


def test_a_context_derives_its_run_fields_from_its_config():
    ctx = Context(model=None, dataset=None, loss="mse", mask_mode="shared", lr=0.1, params=None, step=0, seed=0,
                  replica=0, settings={}, run_config={"train": {"batch_size": 4}}, workdir="/runs/b")
    assert ctx.run.batch_size == 4 and ctx.run.workdir == "/runs/b"


def test_the_runner_gives_analyses_the_runs_typed_fields(tmp_path, monkeypatch):
    cfg = smoke.get_config()
    cfg.train.num_steps, cfg.train.checkpoint_steps, cfg.train.batch_size = 2, "", 7
    workdir = str(tmp_path)
    driver.run(cfg, workdir)
    seen = []

    def record_context(ctx, *, key):
        assert ctx.model is not None  # past the settings: the settings check stops here
        seen.append(ctx)
        return {"x": 1.0}

    name = sorted(runner.load_all())[0]
    monkeypatch.setitem(analyses.REGISTRY, name, analyses.Analysis(name, record_context, None, ""))
    runner.analyse_run(workdir, runner.Request(names=(name,), steps="last"))
    assert [(c.run.batch_size, c.run.num_replicas, c.run.workdir) for c in seen] == [
        (7, cfg.train.num_replicas, workdir)]
    assert io.read_json(f"{workdir}/analysis/summary.json")[name]["2"]["x"] == 1.0
