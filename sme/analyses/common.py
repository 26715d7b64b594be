"""Helpers shared by the analysis modules: settings, compilation keys, training data, batching, artifacts, plots."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sme import hessian, io, runs
from sme.analyses import Context
from sme.problem import Problem


# ----------------------------------------------------------------------------- settings


def cast_setting(name: str, key: str, value, default):
    """A setting given as text (command line) or a number, as the type of its default.

    bool accepts true/false/1/0 (any case); int accepts integral numbers ("3", 3.0); float any
    number; anything else becomes ``str(value)``. Raises ValueError naming the analysis and key.
    """
    kind = type(default)
    try:
        if kind is bool:
            text = str(value).lower()
            if text not in ("true", "false", "1", "0"):
                raise ValueError
            return text in ("true", "1")
        if kind is int:
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        return float(value) if kind is float else str(value)
    except (TypeError, ValueError):
        raise ValueError(f"analysis {name}: setting {key}={value!r} is not a {kind.__name__}") from None


def fill_settings(name: str, settings: dict, defaults: dict) -> dict:
    """Defaults overridden by ``settings``; unknown keys or ill-typed values raise naming them."""
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"analysis {name}: unknown settings {unknown}; allowed: {sorted(defaults)}")
    return {k: cast_setting(name, k, settings.get(k, d), d) for k, d in defaults.items()}


# ----------------------------------------------------------------------------- analyses


class Settings:
    """Base of an analysis's settings: a frozen dataclass with one typed field (and default) per setting.

    Frozen and compared by value, so equal settings hash equally and a settings object can be a
    static argument of `jax.jit`: equal settings share one compilation. Build one from the dict of
    the analysis config or the command line (``--set``) with `from_dict`, which fills defaults,
    casts text to each field's type, refuses unknown keys and runs the analysis's further checks,
    with the same one-line errors as `fill_settings`. ``s["key"]`` reads a field by the name the
    saved JSON record uses; `as_dict` gives that record.
    """

    # fill(name, settings, defaults) -> dict: validation of the dict (``fill_settings`` plus the
    # analysis's own checks); subclasses made by `settings_class` may give their own.
    fill = staticmethod(fill_settings)

    @classmethod
    def defaults(cls) -> dict:
        """Setting -> default, in declaration order."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, name: str, settings) -> "Settings":
        """Validated settings of analysis ``name`` from a dict (an instance of ``cls`` passes through)."""
        if isinstance(settings, cls):
            return settings
        return cls(**cls.fill(name, dict(settings), cls.defaults()))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The settings as the JSON string artifacts record (keys sorted)."""
        return json.dumps(self.as_dict(), sort_keys=True)

    def __getitem__(self, key: str):
        if key not in self.defaults():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key) -> bool:
        return key in self.defaults()


def settings_class(cls_name: str, defaults: dict, fill=None) -> type:
    """A frozen `Settings` dataclass with one field per item of ``defaults`` (typed as its default).

    ``fill(name, settings, defaults) -> dict`` validates (default: `fill_settings`).
    """
    fields = [(key, type(value), dataclasses.field(default=value)) for key, value in defaults.items()]
    namespace = {"fill": staticmethod(fill)} if fill is not None else {}
    return dataclasses.make_dataclass(cls_name, fields, bases=(Settings,), frozen=True, namespace=namespace)


# ----------------------------------------------------------------------------- compiled cores

STATIC_ARGNAMES = ("kind", "settings", "extra")  # the static arguments a core may take


def static_argnames(fn) -> tuple[str, ...]:
    """The keyword-only parameters of a core (a subset of `STATIC_ARGNAMES`): its static arguments."""
    params = inspect.signature(fn).parameters.values()
    names = tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)
    unknown = sorted(set(names) - set(STATIC_ARGNAMES))
    if unknown:
        raise TypeError(f"{fn.__name__}: keyword-only parameters {unknown}; a core's static arguments are "
                        f"among {STATIC_ARGNAMES}")
    return names


def jit_core(fn):
    """``fn(problem, *arrays, kind=, settings=, extra=)`` jitted with its keyword-only arguments static.

    A core takes the `sme.problem.Problem` first: its model (static by its spec: `sme.models.Model`
    hashes and compares by spec and sites), loss and mask mode are the pytree's static fields and
    its data are traced. The settings are static by value (`Settings`). So equal (model spec, loss,
    mask mode, kind, settings, extra) and equal array shapes reuse one compilation: a run's
    checkpoints, and runs sharing an architecture, compile once. A core declares only the static
    arguments it uses (keyword-only, among `STATIC_ARGNAMES`).
    """
    return jax.jit(fn, static_argnames=static_argnames(fn))


@dataclasses.dataclass(frozen=True)
class Core:
    """A `jit_core` function bound to its static arguments; called with the array arguments only
    (the Problem first).

    Hashable and compared by value: equal cores are the same computation up to the Problem's static
    fields, which `batched` checks too, and which key the vmapped compilation of `map_stacked`.
    """

    fn: Callable
    kind: str = ""
    settings: Any = None
    extra: Any = None

    def __call__(self, *args):
        static = {name: getattr(self, name) for name in static_argnames(self.fn)}
        return self.fn(*args, **static)


def resolve_loss_kind(kind: str, model, loss: str, max_units: int) -> str:
    """The concrete Hessian loss kind (a key of `sme.hessian.LOSS_KINDS`) for ``auto``; others pass through.

    ``auto``: R_S (``risk``) without dropout, else the closed-form L_S = R_S + R_1 (``modified``; MSE,
    last-layer dropout), else exact enumeration up to ``max_units`` droppable units
    (``modified_exact``), else the Monte Carlo L_S (``modified_mc``).
    """
    return hessian.resolve_loss_kind(kind, model, loss, max_units=max_units)


def param_dtype(params):
    """The common floating dtype of a parameter pytree."""
    return jnp.result_type(*jax.tree_util.tree_leaves(params))


def train_subset(ctx: Context, num_examples: int, *, min_examples: int = 1):
    """(x, y) of the first ``num_examples`` training examples (0: all) in the parameters' dtype."""
    n = num_examples or ctx.dataset.num_train
    if not min_examples <= n <= ctx.dataset.num_train:
        raise ValueError(f"num_examples={num_examples} must be in [{min_examples}, {ctx.dataset.num_train}] "
                         "(0 = all)")
    dtype = param_dtype(ctx.params)
    return jnp.asarray(ctx.dataset.x_train[:n], dtype), jnp.asarray(ctx.dataset.y_train[:n], dtype)


def train_problem(ctx: Context, num_examples: int, *, model=None, min_examples: int = 1) -> Problem:
    """The `Problem` of the analysis: ``model`` (default the run's), the run's loss and mask mode, and
    the first ``num_examples`` training examples (`train_subset`)."""
    x, y = train_subset(ctx, num_examples, min_examples=min_examples)
    return Problem(ctx.model if model is None else model, ctx.loss, ctx.mask_mode, x, y)


# ----------------------------------------------------------------------------- batching
#
# An analysis written as ``plan(ctx, key) -> (core, args, finish)`` (a cached jitted core, its
# arguments, and host-side post-processing of the core's outputs) runs one context as
# ``finish(core(*args))`` and many as `batched`: the cores' arguments stacked along a new leading
# axis, one call of ``jit(vmap(core))``, and the same ``finish`` on each item's outputs.


@functools.lru_cache(maxsize=32)
def _vmapped(core, in_axes: tuple):
    return jax.jit(jax.vmap(core, in_axes=in_axes))


def shard_batch(tree):
    """Split a pytree's leading axis over a ("batch",) mesh of all devices (`sme.runs.shard_leading`).

    The axis length must be a multiple of the device count (`map_stacked` pads it).
    """
    return runs.shard_leading(tree, "batch")


def map_stacked(core, items: list[tuple], in_axes: tuple) -> list:
    """``[core(*item) for item in items]`` as ONE call of ``jit(vmap(core, in_axes))``.

    Arguments with ``in_axes`` 0 (parameters, keys, per-item masks) are stacked along a new leading
    axis; those with None must be the same for every item and are taken from the first. With several
    devices the batch is padded to a multiple of the device count by repeating the last item (its
    outputs are dropped) and split over them (`shard_batch`). Returns each item's outputs with
    NumPy leaves. Equal to the one-at-a-time results up to float re-association.
    """
    if not items:
        return []
    padded = list(items) + [items[-1]] * (-len(items) % jax.device_count())
    args = [items[0][i] if axis is None else
            shard_batch(jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *[item[i] for item in padded]))
            for i, axis in enumerate(in_axes)]
    out = runs.to_host(_vmapped(core, tuple(in_axes))(*args))  # gathered from every process
    return [jax.tree_util.tree_map(lambda leaf: np.asarray(leaf[j]), out) for j in range(len(items))]


def batched(plan, in_axes: tuple):
    """A ``batch_fn(ctxs, *, keys)`` from ``plan(ctx, key) -> (core, args, finish)`` (see above).

    Every context must plan the same core and the same static parts of its shared arguments (one
    run: same model, loss, mask mode and settings: the Problem's static fields are in its tree
    structure); otherwise ValueError, and the caller analyses them one at a time.
    """

    def batch_fn(ctxs: list[Context], *, keys: list) -> list[dict]:
        plans = [plan(ctx, key) for ctx, key in zip(ctxs, keys, strict=True)]
        shared = [i for i, axis in enumerate(in_axes) if axis is None]
        static = {(core, tuple(jax.tree_util.tree_structure(args[i]) for i in shared)) for core, args, _ in plans}
        if len(static) > 1:
            raise ValueError("batched contexts must share one compiled core (same model, loss and settings)")
        outs = map_stacked(plans[0][0], [args for _, args, _ in plans], in_axes) if plans else []
        return [finish(out) for (_, _, finish), out in zip(plans, outs)]

    return batch_fn


def run_single(plan, ctx: Context, key) -> dict:
    """One context's results: ``finish(core(*args))`` of ``plan(ctx, key)``."""
    core, args, finish = plan(ctx, key)
    return finish(core(*args))


# ----------------------------------------------------------------------------- plots


def load_step_artifacts(directory: str, steps) -> list[tuple[int, dict]]:
    """(step, arrays) of ``step_XXXXXXXXX.npz`` (or unpadded ``step_N.npz``) in ``directory``,
    ascending by step; steps without a file are skipped. Each file is verified against its SHA-256
    (`sme.io.load_arrays`: CorruptArtifact names a bad one)."""
    out = []
    for step in sorted({int(s) for s in steps}):
        for name in (f"step_{step:09d}.npz", f"step_{step}.npz"):
            path = os.path.join(directory, name)
            if os.path.exists(path):
                out.append((step, io.load_arrays(path)))
                break
    return out


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, plt, directory: str, name: str, *, dpi: int = 120) -> str:
    """Lay out, write ``directory/name`` and close the figure; returns the path."""
    path = os.path.join(directory, name)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def subplots(rows: int, cols: int, size: tuple[float, float]):
    """A rows x cols grid of panels, each ``size`` inches: (plt, fig, the axes as a flat array)."""
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    return plt, fig, axes.reshape(-1)


def save_report_figure(fig, plt, out_dir: str, name: str, *, dpi: int) -> str:
    """Write ``out_dir/figures/name``; returns its path relative to ``out_dir`` (as a report links it)."""
    directory = os.path.join(out_dir, "figures")
    os.makedirs(directory, exist_ok=True)
    return os.path.relpath(save_figure(fig, plt, directory, name, dpi=dpi), out_dir)


def step_axis(ax, steps) -> None:
    """Label the training-step axis; log-spaced checkpoints (with step 0) read best on a symlog axis."""
    ax.set_xlabel("training step N")
    steps = np.asarray(steps, np.float64)
    if steps.size and steps.max() > 20 * max(steps[steps > 0].min(initial=1.0), 1.0):
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(left=0.0, right=steps.max() * 1.3)
