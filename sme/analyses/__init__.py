"""Registry of analyses run by `analyze.py` over a training run's checkpoints.

An analysis is ``fn(ctx, *, key) -> dict[str, np.ndarray]``: it reads a `Context`
(the run's model, data and one checkpoint's parameters, plus this analysis's own
settings) and returns arrays that the runner writes to
``<workdir>/analysis/<name>/step_<N>.npz``. Its optional ``plot_fn(artifact_dir,
steps) -> list[str]`` reads those npz files (never recomputes) and writes PNGs
into the same directory. Keys come from `sme.rng.analysis_key(seed, name, step)`.

An analysis may also register ``batch_fn(ctxs, *, keys) -> list[dict]``: the
same results as ``[fn(ctx, key=k) for ctx, k in zip(ctxs, keys)]`` for contexts
of one run (checkpoints and/or replicas), computed by one vmapped call (see
`sme.analyses.common.batched`); the runner uses it to analyse several
checkpoints at once.

Analyses register themselves with `register`; modules are imported by
`load_all()` so that importing `sme` stays free of side effects.

Settings contract: ``fn`` converts ``ctx.settings`` once into its frozen settings
dataclass (``<Analysis>Settings.from_dict``, `sme.analyses.common.Settings`: defaults,
types, unknown keys and any further checks of the settings alone) before it reads anything else
from the context. `check_settings` relies on it to reject a bad ``--set`` for
every requested analysis before any data or checkpoint is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable

import numpy as np

from configs import base as base_config
from sme.data import Dataset
from sme.models import Model

# Modules (under sme.analyses) that define analyses; imported lazily by load_all().
ANALYSIS_MODULES = ("curvature", "noise", "landscape", "weak_error")


@functools.lru_cache(maxsize=1)
def _base_defaults() -> dict:
    return base_config.get_config().to_dict()


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """The run's config fields that analyses read, typed (`from_config`).

    Attributes:
      batch_size: ``train.batch_size`` as configured (0 = full batch).
      num_steps: ``train.num_steps``.
      num_replicas: ``train.num_replicas``.
      num_boot: ``sde.num_boot``, bootstrap draws of the weak-error intervals.
      workdir: the run's directory ("" when the context is not from a run directory).
    """

    batch_size: int
    num_steps: int
    num_replicas: int
    num_boot: int
    workdir: str = ""

    @classmethod
    def from_config(cls, config: dict, workdir: str = "") -> "RunInfo":
        """From a run's config as a plain dict (its config.json). A field the dict lacks (a run written
        before the field existed) takes its ``configs/base.py`` default: the one place of the defaults."""
        defaults = _base_defaults()
        field = lambda block, name: (config.get(block) or {}).get(name, defaults[block][name])  # noqa: E731
        return cls(batch_size=int(field("train", "batch_size")), num_steps=int(field("train", "num_steps")),
                   num_replicas=int(field("train", "num_replicas")), num_boot=int(field("sde", "num_boot")),
                   workdir=str(workdir or config.get("workdir", "")))


@dataclasses.dataclass(frozen=True)
class Context:
    """What an analysis sees: one run, one checkpoint, one replica.

    Attributes:
      model: the run's model (same spec as in training).
      dataset: the run's dataset (same source, subset and split).
      loss: per-example loss name ('mse' or 'cross_entropy').
      mask_mode: 'shared' or 'per_sample', as trained.
      lr: the run's learning rate eps (SME time t = N * eps).
      params: parameters of ONE replica at this checkpoint.
      step: the checkpoint's training step N.
      seed: the run's seed.
      replica: which replica of the run `params` belongs to.
      settings: this analysis's settings: a plain dict from the analysis config or ``--set``
        (or already its `sme.analyses.common.Settings` dataclass).
      run_config: the run's full config as a plain dict (read-only, for the record).
      workdir: the run's directory (for analyses that read other run artifacts).
      run: the typed run fields analyses read (`RunInfo`); built from ``run_config`` and ``workdir``
        when not given.
    """

    model: Model
    dataset: Dataset
    loss: str
    mask_mode: str
    lr: float
    params: Any
    step: int
    seed: int
    replica: int
    settings: dict
    run_config: dict
    workdir: str = ""
    run: RunInfo | None = None

    def __post_init__(self):
        if self.run is None:
            object.__setattr__(self, "run", RunInfo.from_config(self.run_config or {}, self.workdir))


AnalysisFn = Callable[..., dict]
BatchFn = Callable[..., list]
PlotFn = Callable[[str, list], list]


@dataclasses.dataclass(frozen=True)
class Analysis:
    name: str
    fn: AnalysisFn
    plot_fn: PlotFn | None
    doc: str
    batch_fn: BatchFn | None = None


REGISTRY: dict[str, Analysis] = {}


def register(name: str, *, plot_fn: PlotFn | None = None, batch_fn: BatchFn | None = None):
    """Decorator: ``@register("hessian", plot_fn=plot_hessian, batch_fn=...)`` on ``fn(ctx, *, key)``."""

    def decorate(fn):
        if name in REGISTRY:
            raise ValueError(f"analysis {name!r} registered twice")
        REGISTRY[name] = Analysis(name, fn, plot_fn, (fn.__doc__ or "").strip(), batch_fn)
        return fn

    return decorate


def load_all() -> dict[str, Analysis]:
    """Import every analysis module (each registers itself) and return the registry."""
    for module in ANALYSIS_MODULES:
        try:
            importlib.import_module(f"sme.analyses.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"sme.analyses.{module}":
                raise
    return REGISTRY


def as_numpy(result: dict) -> dict[str, np.ndarray]:
    """Convert an analysis result to NumPy arrays (strings become 0-d unicode arrays)."""
    return {k: np.asarray(v) for k, v in result.items()}


class _SettingsChecked(Exception):
    """Raised by `_SettingsProbe` when an analysis reads past its settings: they were accepted."""


class _SettingsProbe:
    """A stand-in Context holding only ``settings``; reading any other field ends the probe."""

    def __init__(self, settings: dict):
        self.settings = settings

    def __getattr__(self, name):
        raise _SettingsChecked(name)


def check_settings(name: str, settings: dict) -> None:
    """Validate an analysis's settings without data or parameters (see the settings contract above).

    Raises:
      ValueError: from the analysis's own validation, naming the analysis and setting.
    """
    analysis = load_all()[name]
    try:
        analysis.fn(_SettingsProbe(dict(settings)), key=None)
    except _SettingsChecked:
        return
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - not a settings error (e.g. the probe's missing key); the run decides
        return
