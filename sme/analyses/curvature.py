"""Curvature analyses: Hessian spectrum, spectral density, Gauss-Newton and Fisher (docs/theory.md, "The Fisher forms").

Registered analyses (settings: the module-level ``*_DEFAULTS`` dicts; missing
settings are filled in, unknown ones are an error; the filled settings are
saved as the JSON string ``settings``). S is the first ``num_examples``
training examples (0: all); operators sum over S in chunks of ``chunk_size``
examples (0: all at once), so memory is bounded by one chunk.

Which Hessian (``loss_kind``, `sme.hessian.LOSS_KINDS`); ``auto`` resolves to
R_S without dropout, else the closed-form L_S = R_S + R_1 (MSE, last-layer
dropout), else exact enumeration up to ``max_enumerated_units`` droppable
units, else the Monte Carlo L_S over ``num_masks`` frozen masks. Masks (for
``modified_mc`` and ``fixed_mask``, in the run's mask mode) come from
``sample_masks(sites, key=fold_in(key, MASKS), batch_shape=(K,) | (K, n) | () | (n,))``.

Random draws come from named sub-streams of the analysis key, ``fold_in(key, STREAM)``:

  =========  =====  =====================================================
  stream     value  draws
  =========  =====  =====================================================
  MASKS      0      the frozen masks of ``modified_mc`` and ``fixed_mask``
  START      1      hessian: Lanczos start; hessian_density: SLQ starts
  PROBES     2      hessian: Hutchinson probes of Tr H
  SKETCH     3      hessian: Hutch++ sketch and probes
  =========  =====  =====================================================

``fisher`` starts the Lanczos of the i-th of its ``kinds`` from ``fold_in(key, FISHER_START + i)``
(FISHER_START = 0): its own streams, one per matrix (the analysis draws no masks).

* ``hessian`` — top-k and bottom-k eigenpairs from ONE Lanczos run (start vector
  ``normal`` from stream START, ``order`` steps, clipped to P), each with its true
  residual; Tr H by Hutchinson (``num_probes``, stream PROBES) and by
  Hutch++ (``hutchpp_sketch`` + ``num_probes``, stream SKETCH).
  Keys: ``loss_kind``, ``loss_label`` (strings), ``loss_value``, ``num_params``,
  ``num_examples``, ``order``, ``top_values``/``top_residuals`` (top_k,) largest
  first, ``bottom_values``/``bottom_residuals`` (bottom_k,) smallest first,
  ``ritz_values`` (order,) ascending, ``lanczos_alphas`` (order,),
  ``lanczos_betas`` (order - 1,), ``trace_hutchinson``, ``trace_hutchinson_se``,
  ``trace_hutchpp``, ``trace_hutchpp_se`` (NaN when hutchpp_sketch = 0),
  ``top_vectors`` (top_k, P) when ``save_vectors``, ``loss_keep_prob`` (the
  keep probability of the loss's dropout sites; NaN when they differ),
  ``loss_site_keep_probs`` (one per site), ``settings``.

* ``hessian_modified`` — the same as ``hessian`` (same keys) for the dropout-modified
  loss L_S only, with ``keep_prob`` q (0: the run's own, per-site keep
  probabilities included) on the run's dropout layers: a run trained without
  dropout is measured on the L_S of its dropout twin, like for like. A q for a
  run whose dropout layers have different keep probabilities is refused. Separate artifacts, so a run holds both R_S (``hessian``
  with ``loss_kind=risk``) and L_S results.

* ``hessian_density`` — stochastic Lanczos quadrature: ``num_probes`` Rademacher
  starts (stream START) of ``order`` steps, raw nodes and weights, and
  the density smoothed by a Gaussian of width sigma = ``sigma_rel`` x (node
  range) on ``grid_size`` points spanning the nodes +- 5 sigma.
  Keys: ``loss_kind``, ``loss_label``, ``num_params``, ``num_examples``,
  ``nodes``/``weights`` (num_probes, order), ``grid``/``density`` (grid_size,),
  ``sigma``, ``trace_slq`` (P x mean_probes sum_i w_i theta_i, an estimate of Tr H)
  and ``trace_slq_se`` (its standard error over probes), ``settings``.

* ``fisher`` — for the deterministic network f(x; 1) (as evaluated), the
  empirical Fisher (1/n) sum g_i g_i^T, the true Fisher (softmax
  J^T (diag pi - pi pi^T) J; Gaussian: J^T J) and the Gauss-Newton matrix: exact
  traces (per-example gradients / Jacobians in chunks of ``trace_chunk_size``)
  and top-k eigenvalues by Lanczos (``order`` steps, start ``normal(fold_in(key,
  FISHER_START + i))`` for the i-th kind); with R_1 when the closed form applies and its
  Fisher-weighted quadratic form for last-layer dropout under any loss.
  Keys, for each of ``kinds`` named ``empirical_fisher``, ``true_fisher``,
  ``ggn``: ``<name>_trace``, ``<name>_eigenvalues``/``<name>_residuals``
  (top_k,); and ``risk`` (R_S), ``keep_prob`` (of the readout input's site),
  ``r1`` (NaN unless MSE with last-layer dropout), ``r1_quadratic``
  (`sme.hessian.dropout_penalty_quadratic`, NaN unless last-layer-only
  dropout), ``num_params``, ``num_examples``, ``settings``.

Hessian-vector products linearise the gradient once per Lanczos, SLQ or
Hutchinson run and apply the stored linear map (`sme.hessian.make_hvp`, its size
rule: forward-over-reverse when ``chunk_size`` splits the examples or the stored
residuals would exceed `sme.hessian.LINEARIZE_MAX_BYTES`).

The cores are plain functions of a `sme.problem.Problem` (model, loss and mask
mode static, the examples traced), the parameters, masks and key, jitted with the
loss kind and settings (a frozen `*Settings` dataclass, static by value) as static
arguments (`sme.analyses.common.jit_core`), so all checkpoints of a run share one
compilation. Each analysis
also has a ``batch_fn`` (`sme.analyses.common.batched`): several checkpoints
or replicas in one vmapped call of the same core (parameters, masks and keys
per item), with the same post-processing, so the results equal the
one-at-a-time ones up to float re-association.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from sme import hessian as hs
from sme import lanczos, losses, models
from sme.analyses import Context, common, register
from sme.analyses.common import (Core, batched, jit_core, settings_class, load_step_artifacts, pyplot, resolve_loss_kind, run_single,
                                 save_figure, step_axis, train_problem)
from sme.dropout import mask_shape, sample_masks
from sme.problem import Problem

# Sub-streams of the analysis key (module docstring): fold_in(key, STREAM).
MASKS, START, PROBES, SKETCH = 0, 1, 2, 3
FISHER_START = 0  # fisher: the i-th kind's Lanczos start is fold_in(key, FISHER_START + i)

_LOSS_DEFAULTS = dict(
    loss_kind="auto",  # auto | modified | modified_exact | modified_mc | risk | fixed_mask
    keep_prob=0.0,  # dropout of the loss: 0 = the run's own (per site); q in (0, 1]: q on its dropout layers
    num_masks=8,  # K frozen masks of modified_mc
    max_enumerated_units=8,  # auto: exact L_S by enumerating 2**m masks up to m units
    num_examples=0,  # S = first n training examples; 0 = all
    chunk_size=0,  # examples per HVP chunk (bounds memory); 0 = all at once
)
HESSIAN_DEFAULTS = dict(
    _LOSS_DEFAULTS,
    order=80,  # Lanczos steps (one HVP each), clipped to P
    top_k=10,  # largest eigenpairs
    bottom_k=3,  # smallest eigenpairs from the same Lanczos run; 0 = none
    num_probes=64,  # Hutchinson probes for Tr H (one HVP each)
    hutchpp_sketch=16,  # Hutch++ sketch size (2 x sketch + num_probes HVPs); 0 = skip Hutch++
    save_vectors=False,  # also save the (top_k, P) eigenvectors
)
# The same as hessian for L_S at keep_prob (a run trained without dropout on its dropout twin's
# loss): its own artifacts, so one run can hold the Hessians of R_S and of L_S.
HESSIAN_MODIFIED_DEFAULTS = dict(HESSIAN_DEFAULTS, loss_kind="auto")
DENSITY_DEFAULTS = dict(
    _LOSS_DEFAULTS,
    num_probes=8,  # SLQ starts (order HVPs each)
    order=80,  # Lanczos steps per start, clipped to P
    keep_basis=True,  # full reorthogonalisation (order x P memory); False: O(P), three-term recurrence
    grid_size=1024,  # points of the smoothed density
    sigma_rel=0.01,  # Gaussian kernel width / (largest - smallest node)
)
FISHER_DEFAULTS = dict(
    num_examples=0,  # S = first n training examples; 0 = all
    chunk_size=0,  # examples per matvec chunk; 0 = all at once
    trace_chunk_size=32,  # examples per chunk of the exact traces (memory chunk x out_dim x P)
    kinds="empirical,true,ggn",  # comma-separated subset of empirical, true, ggn
    order=40,  # Lanczos steps per matrix, clipped to P
    top_k=5,  # top eigenvalues per matrix
)
FISHER_NAMES = {"empirical": "empirical_fisher", "true": "true_fisher", "ggn": "ggn"}
LOSS_KIND_CHOICES = ("auto", *hs.LOSS_KINDS)


def fill_settings(name: str, settings: dict, defaults: dict) -> dict:
    """`common.fill_settings`, then loss_kind must be a choice and counts must be >= 1."""
    s = common.fill_settings(name, settings, defaults)
    if "loss_kind" in s and s["loss_kind"] not in LOSS_KIND_CHOICES:
        raise ValueError(f"analysis {name}: loss_kind={s['loss_kind']!r}; expected one of {LOSS_KIND_CHOICES}")
    for key in ("order", "num_probes", "grid_size", "top_k", "num_masks"):
        if key in s and s[key] < 1:
            raise ValueError(f"analysis {name}: {key}={s[key]} must be >= 1")
    return s


HessianSettings = settings_class("HessianSettings", HESSIAN_DEFAULTS, fill_settings)
HessianModifiedSettings = settings_class("HessianModifiedSettings", HESSIAN_MODIFIED_DEFAULTS, fill_settings)
DensitySettings = settings_class("DensitySettings", DENSITY_DEFAULTS, fill_settings)
FisherSettings = settings_class("FisherSettings", FISHER_DEFAULTS, fill_settings)


def _dropout_layers(model) -> tuple[int, ...]:
    """Indices of the run's dropout layers: the sites its config selects (``model.dropout_layers``)."""
    if hasattr(model.spec, "module"):  # a Flax model (sme.flax_models)
        return tuple(model.spec.selected)
    selection = model.spec.dropout_layers
    return tuple(range(len(model.sites))) if selection is None else tuple(selection)


def loss_model(model, keep_prob: float):
    """The run's model with keep probability ``keep_prob`` on its dropout layers (0: unchanged).

    0 keeps the run's sites as trained, per-site keep probabilities included
    (``model.dropout_layers="0:0.8,1:0.5"``). The parameters are the same pytree, so a net trained
    without dropout can be measured on the dropout-modified loss L_S of its dropout twin (like for
    like). An override of a run whose dropout layers have different keep probabilities is refused:
    one q for all of them would silently replace the run's per-site values.
    """
    if keep_prob == 0.0:
        return model
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob={keep_prob} must be in (0, 1] (0 = the run's own)")
    layers = _dropout_layers(model)
    own = sorted({model.sites[i].keep_prob for i in layers})
    if len(own) > 1:
        per_site = ", ".join(f"{i}:{model.sites[i].keep_prob:g}" for i in layers)
        raise ValueError(f"keep_prob={keep_prob:g} is ambiguous: the run's dropout layers have per-site keep "
                         f"probabilities {per_site}; leave keep_prob at 0 to use them")
    if own == [keep_prob] and model.spec.keep_prob == keep_prob:
        return model
    if hasattr(model.spec, "module"):  # a Flax model (sme.flax_models)
        from sme.flax_models import with_keep_prob

        return with_keep_prob(model, keep_prob)
    spec = dataclasses.replace(model.spec, keep_prob=float(keep_prob))
    return models.make_cnn(spec) if isinstance(spec, models.CNNSpec) else models.make_mlp(spec)


def loss_keep_prob(model) -> float:
    """The keep probability of the loss's dropout sites (1 without any), NaN when they differ."""
    own = {site.keep_prob for site in model.sites if site.droppable}
    return own.pop() if len(own) == 1 else (1.0 if not own else math.nan)


def _masks(problem: Problem, kind: str, s: dict, key):
    """The frozen masks of `kind` (None when it needs none), from stream MASKS: see the module docstring."""
    n = problem.num_examples
    if kind == "modified_mc":
        shape = mask_shape(problem.mode, n, s["num_masks"])
    elif kind == "fixed_mask":
        shape = mask_shape(problem.mode, n)
    else:
        return None
    return sample_masks(problem.model.sites, key=jax.random.fold_in(key, MASKS), batch_shape=shape,
                        dtype=problem.x.dtype)


def _setup(ctx: Context, s: dict, key):
    """(problem of the loss's model, resolved kind, masks, P) shared by the Hessian analyses."""
    model = loss_model(ctx.model, s["keep_prob"])
    kind = resolve_loss_kind(s["loss_kind"], model, ctx.loss, s["max_enumerated_units"])
    problem = train_problem(ctx, s["num_examples"], model=model)
    return problem, kind, _masks(problem, kind, s, key), ravel_pytree(ctx.params)[0].shape[0]


# ----------------------------------------------------------------------------- hessian


@jit_core
def _hessian_core(problem, params, masks, key, *, kind, settings, extra):
    """Lanczos eigenpairs and trace estimates of one Hessian; ``extra`` is the Lanczos order."""
    s, order, x, y = settings, extra, problem.x, problem.y
    hloss = hs.make_hessian_loss(kind, problem, masks=masks)
    matvec, dim = hs.make_hvp(hloss, params, x, y, chunk_size=s["chunk_size"])
    dtype = ravel_pytree(params)[0].dtype
    v0 = jax.random.normal(jax.random.fold_in(key, START), (dim,), dtype)
    alphas, betas, basis = lanczos.tridiagonalize(matvec, v0, order=order)
    top = lanczos.ritz_pairs(matvec, alphas, betas, basis, k=s["top_k"], which="largest")
    out = dict(top_values=top.values, top_residuals=top.residuals, lanczos_alphas=alphas,
               lanczos_betas=betas, ritz_values=lanczos.tridiagonal_eigh(alphas, betas)[0],
               loss_value=hs.loss_value(hloss, params, x, y, chunk_size=s["chunk_size"]))
    if s["save_vectors"]:
        out["top_vectors"] = top.vectors
    if s["bottom_k"]:
        bottom = lanczos.ritz_pairs(matvec, alphas, betas, basis, k=s["bottom_k"], which="smallest")
        out.update(bottom_values=bottom.values, bottom_residuals=bottom.residuals)
    out["trace_hutchinson"], out["trace_hutchinson_se"] = lanczos.hutchinson_trace(
        matvec, dim, key=jax.random.fold_in(key, PROBES), num_probes=s["num_probes"], dtype=dtype)
    if s["hutchpp_sketch"]:
        out["trace_hutchpp"], out["trace_hutchpp_se"] = lanczos.hutchpp_trace(
            matvec, dim, key=jax.random.fold_in(key, SKETCH), sketch_size=min(s["hutchpp_sketch"], dim),
            num_probes=s["num_probes"], dtype=dtype)
    return out


def _hessian_plan(ctx: Context, key, *, name="hessian", settings_type=HessianSettings):
    s = settings_type.from_dict(name, ctx.settings)
    problem, kind, masks, dim = _setup(ctx, s, key)
    model = problem.model
    if name == "hessian_modified" and not kind.startswith("modified"):
        raise ValueError(f"hessian_modified: the loss must be L_S (loss_kind modified*, got {kind!r}); the run "
                         "has no dropout, so set keep_prob to the dropout twin's")
    order = min(s["order"], dim)
    if s["top_k"] > order or s["bottom_k"] > order or s["bottom_k"] < 0:
        raise ValueError(f"hessian: top_k={s['top_k']} and bottom_k={s['bottom_k']} must be in [0, order={order}]")

    def finish(core_out) -> dict:
        out = {k: np.asarray(v) for k, v in core_out.items()}
        empty = np.zeros((0,), np.float64)
        out.setdefault("bottom_values", empty)
        out.setdefault("bottom_residuals", empty)
        out.setdefault("trace_hutchpp", np.nan)
        out.setdefault("trace_hutchpp_se", np.nan)
        out.update(loss_kind=kind, loss_label=hs.LOSS_KINDS[kind], num_params=dim, num_examples=problem.num_examples,
                   order=order, loss_keep_prob=loss_keep_prob(model),
                   loss_site_keep_probs=np.array([site.keep_prob for site in model.sites], np.float64),
                   settings=s.to_json())
        return {k: np.asarray(v) for k, v in out.items()}

    core = Core(_hessian_core, kind, s, order)
    return core, (problem, ctx.params, masks, key), finish


def hessian(ctx: Context, *, key) -> dict:
    """Top/bottom Hessian eigenpairs with residuals, and Tr H by Hutchinson and Hutch++."""
    return run_single(_hessian_plan, ctx, key)


_modified_plan = functools.partial(_hessian_plan, name="hessian_modified",
                                   settings_type=HessianModifiedSettings)


def hessian_modified(ctx: Context, *, key) -> dict:
    """The hessian analysis for L_S only (keep_prob: also for a run without dropout), beside hessian's R_S."""
    return run_single(_modified_plan, ctx, key)


# ----------------------------------------------------------------------------- density


@jit_core
def _density_core(problem, params, masks, key, *, kind, settings, extra):
    """SLQ nodes and weights; ``extra`` is the Lanczos order."""
    s, order = settings, extra
    hloss = hs.make_hessian_loss(kind, problem, masks=masks)
    matvec, dim = hs.make_hvp(hloss, params, problem.x, problem.y, chunk_size=s["chunk_size"])
    nodes, weights = lanczos.slq_density(matvec, dim, key=jax.random.fold_in(key, START), num_probes=s["num_probes"],
                                         order=order, keep_basis=s["keep_basis"],
                                         dtype=ravel_pytree(params)[0].dtype)
    return nodes, weights


def _density_plan(ctx: Context, key):
    s = DensitySettings.from_dict("hessian_density", ctx.settings)
    problem, kind, masks, dim = _setup(ctx, s, key)
    order = min(s["order"], dim)

    def finish(core_out) -> dict:
        nodes, weights = (np.asarray(a, np.float64) for a in core_out)
        low, high = float(nodes.min()), float(nodes.max())
        sigma = s["sigma_rel"] * max(high - low, 1e-12 * max(abs(high), 1.0))
        grid = np.linspace(low - 5 * sigma, high + 5 * sigma, s["grid_size"])
        density = np.asarray(lanczos.smooth_density(nodes, weights, grid, sigma))
        per_probe = dim * np.sum(nodes * weights, axis=1)  # each probe's estimate of Tr H
        se = np.std(per_probe, ddof=1) / math.sqrt(len(per_probe)) if len(per_probe) > 1 else np.nan
        return {k: np.asarray(v) for k, v in dict(
            nodes=nodes, weights=weights, grid=grid, density=density, sigma=sigma, trace_slq=per_probe.mean(),
            trace_slq_se=se, loss_kind=kind, loss_label=hs.LOSS_KINDS[kind], num_params=dim,
            num_examples=problem.num_examples, settings=s.to_json()).items()}

    core = Core(_density_core, kind, s, order)
    return core, (problem, ctx.params, masks, key), finish


def hessian_density(ctx: Context, *, key) -> dict:
    """Hessian spectral density by stochastic Lanczos quadrature: raw nodes/weights and a smoothed density."""
    return run_single(_density_plan, ctx, key)


# ----------------------------------------------------------------------------- fisher


def _fisher_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in hs.FISHER_KINDS]
    if bad or not kinds:
        raise ValueError(f"analysis fisher: kinds={text!r}; expected a comma-separated subset of {hs.FISHER_KINDS}")
    return kinds


@jit_core
def _fisher_core(problem, params, key, *, settings, extra):
    """Fisher / GGN eigenvalues and traces, R_1; ``extra`` is the Lanczos order."""
    s, order = settings, extra
    model, loss, x, y = problem.model, problem.loss, problem.x, problem.y
    closed_form = loss == "mse" and model.only_last_layer_dropout
    hloss = hs.make_hessian_loss("risk", model, loss)
    dim = ravel_pytree(params)[0].shape[0]
    out = dict(risk=hs.loss_value(hloss, params, x, y, chunk_size=s["chunk_size"]))
    for i, kind in enumerate(_fisher_kinds(s["kinds"])):
        name = FISHER_NAMES[kind]
        matvec, _ = hs.make_fisher(kind, hloss, params, x, y, chunk_size=s["chunk_size"])
        pairs = lanczos.top_eigenpairs(matvec, dim, key=jax.random.fold_in(key, FISHER_START + i), k=s["top_k"],
                                       order=order,
                                       dtype=ravel_pytree(params)[0].dtype)
        out[f"{name}_eigenvalues"], out[f"{name}_residuals"] = pairs.values, pairs.residuals
        out[f"{name}_trace"] = hs.fisher_trace(kind, hloss, params, x, y, chunk_size=s["trace_chunk_size"])
    if model.only_last_layer_dropout:
        out["r1_quadratic"] = hs.dropout_penalty_quadratic(model, loss, params, x, y)
    if closed_form:
        out["r1"] = losses.r1(model, params, x)
    return out


def _fisher_plan(ctx: Context, key):
    s = FisherSettings.from_dict("fisher", ctx.settings)
    _fisher_kinds(s["kinds"])
    problem = train_problem(ctx, s["num_examples"])
    dim = ravel_pytree(ctx.params)[0].shape[0]
    order = min(s["order"], dim)
    if s["top_k"] > order:
        raise ValueError(f"fisher: top_k={s['top_k']} must be <= order={order}")

    def finish(core_out) -> dict:
        out = {k: np.asarray(v) for k, v in core_out.items()}
        out.setdefault("r1", np.nan)
        out.setdefault("r1_quadratic", np.nan)
        out.update(keep_prob=ctx.model.sites[-1].keep_prob if ctx.model.sites else 1.0, num_params=dim,
                   num_examples=problem.num_examples, settings=s.to_json())
        return {k: np.asarray(v) for k, v in out.items()}

    core = Core(_fisher_core, settings=s, extra=order)
    return core, (problem, ctx.params, key), finish


def fisher(ctx: Context, *, key) -> dict:
    """Traces and top eigenvalues of the empirical Fisher, true Fisher and Gauss-Newton matrix; R_1."""
    return run_single(_fisher_plan, ctx, key)


# ----------------------------------------------------------------------------- plots


def plot_hessian(directory: str, steps) -> list[str]:
    """Top (and bottom) eigenvalues and Tr H against the training step."""
    loaded = load_step_artifacts(directory, steps)
    if not loaded:
        return []
    plt = pyplot()
    xs = [step for step, _ in loaded]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if len(loaded) == 1:  # one checkpoint: the spectrum by index and the traces as bars
        step, a = loaded[0]
        top, bottom = np.asarray(a["top_values"]), np.asarray(a["bottom_values"])
        axes[0].errorbar(np.arange(1, top.size + 1), top, yerr=np.asarray(a["top_residuals"]), fmt="o", capsize=3,
                         label="largest (error bar: residual ‖Hv − λv‖)")
        if bottom.size:
            axes[0].errorbar(-np.arange(1, bottom.size + 1), bottom, yerr=np.asarray(a["bottom_residuals"]), fmt="x",
                             color="grey", capsize=3, label="smallest (index −i: i-th smallest)")
        axes[0].axhline(0.0, color="k", lw=0.6)
        axes[0].set(xlabel="eigenvalue index i", ylabel="eigenvalue λ_i",
                    title=f"Hessian of {a['loss_label']}, step {step}")
        axes[0].legend(fontsize=7)
        names = [k for k in ("hutchinson", "hutchpp") if np.isfinite(float(a[f"trace_{k}"]))]
        axes[1].bar(range(len(names)), [float(a[f"trace_{k}"]) for k in names],
                    yerr=[2 * float(a[f"trace_{k}_se"]) for k in names], capsize=5, color=["C0", "C1"][:len(names)])
        axes[1].set_xticks(range(len(names)), names)
        axes[1].set(xlabel="estimator", ylabel="Tr H (± 2 se)", title=f"Hessian trace, step {step}")
        return [save_figure(fig, plt, directory, "hessian.png")]
    top = np.array([a["top_values"] for _, a in loaded])
    colors = plt.cm.viridis(np.linspace(0, 1, top.shape[1]))
    for i in range(top.shape[1]):
        last = top.shape[1] - 1
        axes[0].plot(xs, top[:, i], "o-", ms=3, color=colors[i],
                     label=f"λ_{i + 1}" + (" (dark) ... λ_k (light)" if last else "") if i == 0 else None)
    bottom = np.array([a["bottom_values"] for _, a in loaded])
    for i in range(bottom.shape[1]):
        axes[0].plot(xs, bottom[:, i], "x--", ms=3, color="grey", label="smallest" if i == 0 else None)
    axes[0].set(ylabel="eigenvalue", title=f"Hessian of {loaded[0][1]['loss_label']}")
    axes[0].legend(fontsize=7)
    step_axis(axes[0], xs)
    for key, marker in (("hutchinson", "o"), ("hutchpp", "s")):
        t, se = np.array([a[f"trace_{key}"] for _, a in loaded]), np.array([a[f"trace_{key}_se"] for _, a in loaded])
        if np.all(np.isfinite(t)):
            axes[1].errorbar(xs, t, yerr=2 * se, fmt=marker + "-", ms=3, capsize=2, label=f"{key} ±2 se")
    axes[1].set(ylabel="Tr H", title="Hessian trace")
    axes[1].legend(fontsize=7)
    step_axis(axes[1], xs)
    return [save_figure(fig, plt, directory, "hessian.png")]


def plot_hessian_density(directory: str, steps) -> list[str]:
    """Smoothed SLQ densities at up to 8 of the analysed steps (evenly chosen), log scale."""
    loaded = load_step_artifacts(directory, steps)
    if not loaded:
        return []
    if len(loaded) > 8:
        loaded = [loaded[i] for i in np.unique(np.linspace(0, len(loaded) - 1, 8).round().astype(int))]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.cm.viridis(np.linspace(0, 1, len(loaded)))
    floor = 1e-12
    for (step, a), color in zip(loaded, colors):
        ax.semilogy(a["grid"], np.maximum(a["density"], floor), color=color, label=f"step {step}")
    ax.set(xlabel="eigenvalue λ", ylabel="density (smoothed SLQ)", ylim=(floor * 1e3, None),
           title=f"Hessian spectral density of {loaded[0][1]['loss_label']}")
    ax.legend(fontsize=7)
    return [save_figure(fig, plt, directory, "hessian_density.png")]


def plot_fisher(directory: str, steps) -> list[str]:
    """Fisher / GGN traces and top eigenvalues against the step, with R_1 and its quadratic form."""
    loaded = load_step_artifacts(directory, steps)
    if not loaded:
        return []
    plt = pyplot()
    xs = [step for step, _ in loaded]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in FISHER_NAMES.values():
        if f"{name}_trace" in loaded[0][1]:
            axes[0].plot(xs, [float(a[f"{name}_trace"]) for _, a in loaded], "o-", ms=3, label=f"Tr {name}")
            axes[1].plot(xs, [float(a[f"{name}_eigenvalues"][0]) for _, a in loaded], "o-", ms=3,
                         label=f"λ_max {name}")
    for key, style in (("r1", "k--"), ("r1_quadratic", "k:")):
        values = np.array([float(a[key]) for _, a in loaded])
        if np.any(np.isfinite(values)):
            axes[0].plot(xs, values, style, label=key)
    p = float(loaded[0][1]["keep_prob"])
    axes[0].set(ylabel="trace / penalty", yscale="log", title=f"Fisher traces and R_1 (keep_prob {p:g})")
    axes[1].set(ylabel="top eigenvalue", yscale="log", title="largest eigenvalues")
    for ax in axes:
        ax.legend(fontsize=7)
        step_axis(ax, xs)
    return [save_figure(fig, plt, directory, "fisher.png")]


# Batched: parameters, masks (drawn from each item's key) and keys per item; the problem shared.
register("hessian", plot_fn=plot_hessian, batch_fn=batched(_hessian_plan, (None, 0, 0, 0)))(hessian)
register("hessian_modified", plot_fn=plot_hessian,
         batch_fn=batched(_modified_plan, (None, 0, 0, 0)))(hessian_modified)
register("hessian_density", plot_fn=plot_hessian_density,
         batch_fn=batched(_density_plan, (None, 0, 0, 0)))(hessian_density)
register("fisher", plot_fn=plot_fisher, batch_fn=batched(_fisher_plan, (None, 0, 0)))(fisher)
