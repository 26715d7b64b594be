"""Noise analyses: the dropout covariance Sigma and its relation to the Hessian (docs/theory.md, "α and its nulls").

Registered analyses (settings: module-level ``*_DEFAULTS``; missing ones are
filled, unknown ones are an error; the filled settings are returned as the JSON
string ``settings``). S is the first ``num_examples`` training examples (0: all).

* ``covariance`` — at the checkpoint theta:
  Sigma_K = G_c^T G_c / (K - 1) from K = ``num_masks`` full-batch mask gradients
  in the run's mask mode (masks from ``split(fold_in(key, MASKS), K)``); the SGD
  noise of the deterministic net, Cov_i(grad l_i) over ``sgd_examples`` examples
  (0 or >= n: all of S, population covariance; else a random subset from
  stream SGD_SUBSET, divided by n' - 1), from the per-sample Gram matrix
  (`sme.grads.per_sample_gram`, no per-sample gradients for MLPs); and the
  decomposition of minibatch dropout SGD's noise (`sme.covariance.Components`):
  the B = 1 traces of data A, mask M and interaction C estimated from
  ``decomposition_masks`` shared masks (stream DECOMPOSITION_MASKS) on a random subset
  of ``decomposition_examples`` examples (stream DECOMPOSITION_SUBSET; 0: all) corrected
  to the population S, then scaled for batches of B = ``batch_size`` (-1: the
  run's train.batch_size, where 0 means full batch) drawn without replacement
  in the run's mask mode.

  Keys: ``sigma_eigenvalues`` (top_k,), ``sigma_trace``, ``sigma_frobenius``,
  ``sigma_effective_rank`` ((Tr)² / ||.||_F²), ``grad_norm`` (||mean_k g_k||,
  estimating ||grad L_S||), ``sgd_eigenvalues`` (top_k,), ``sgd_trace``,
  ``sgd_frobenius``, ``component_traces`` (3,) = Tr (A, M, C),
  ``minibatch_traces`` (4,) = Tr (data, mask, interaction, total) for batch B,
  ``batch_size``, ``num_masks``, ``mask_mode``, ``settings``.

* ``alignment`` — alpha(H, Sigma) = Tr(H Sigma) / (||H||_F ||Sigma||_F) with its
  Haar and Wishart null models, for the dropout noise (Sigma_K as above) and the
  SGD noise (per-sample gradients of ``sgd_examples`` random examples, divided
  by n' - 1); and the projected variance u_i^T Sigma u_i against the top-k
  Hessian eigenvalues with the log-log slope (bootstrap interval). H is the
  Hessian (`sme.hessian.make_hessian_loss`, HVPs over S in chunks of
  ``hessian_chunk_size`` examples) of ``loss_kind``: ``risk`` (R_S, the same
  loss for a run with and without dropout), or (``auto``) L_S: ``modified`` (closed form; MSE,
  last-layer dropout), ``modified_exact`` (enumerated; <= ``max_enumerated_units``
  droppable units), else ``modified_mc`` (``hessian_masks`` mask sets in the run's
  mode, fixed from stream HESSIAN_MASKS); ``risk`` (R_S) without dropout. Dense
  ``eigh`` when P <= ``dense_max_params``, else Lanczos
  (`sme.lanczos.top_eigenpairs`, ``lanczos_order`` steps, start from stream LANCZOS_START)
  with Tr H and ||H||_F by Hutchinson deflated by the top-k eigenvectors
  (``num_probes``, stream PROBES). The dropout noise's masks are stream MASKS, the
  SGD examples stream SGD_SUBSET, as for ``covariance``. Tr(H Sigma) costs one HVP per mask
  and per SGD example (``hvp_chunk_size`` at once).

  Keys: ``hessian_eigenvalues``, ``hessian_residuals`` (top_k,), ``hessian_trace``,
  ``hessian_trace_se``, ``hessian_frobenius``, ``hessian_frobenius_se``,
  ``hessian_of`` (kind), ``hessian_label``, ``num_params``, and for noise in
  (``dropout``, ``sgd``):
  ``<noise>_alpha``, ``<noise>_tr_h_sigma``, ``<noise>_sigma_trace``,
  ``<noise>_sigma_frobenius``, ``<noise>_sigma_frobenius_unbiased`` (from the
  U-statistic `sme.covariance.frobenius_sq_unbiased`: the plug-in ||Sigma_K||_F is
  inflated by the finite K; equal to the plug-in for the whole population),
  ``<noise>_alpha_unbiased`` (alpha with it; a ratio of estimates, so unlike the plug-in
  cosine it leaves [-1, 1] when K samples do not resolve ||Sigma||_F, e.g. heavy-tailed
  per-example gradients), ``<noise>_null_haar_unbiased_mean``/``_std``,
  ``<noise>_null_haar_mean``/``_std``,
  ``<noise>_null_wishart_mean``/``_std``, ``<noise>_projected_variance`` (top_k,),
  ``<noise>_slope`` (log-log), ``<noise>_slope_intercept``, ``<noise>_slope_low``,
  ``<noise>_slope_high``, ``<noise>_slope_points`` (NaN slopes when fewer than 3
  positive pairs, e.g. without dropout).

Random draws come from named sub-streams of the analysis key, ``fold_in(key, STREAM)``
(each analysis has its own key, so the two share values):

  ====================  =====  ==========================================================
  stream                value  draws
  ====================  =====  ==========================================================
  MASKS                 0      the K masks of Sigma_K (one split key per mask)
  SGD_SUBSET            1      the examples of the SGD noise
  DECOMPOSITION_MASKS   2      covariance: the decomposition's shared masks
  HESSIAN_MASKS         2      alignment: the masks of the Monte Carlo L_S
  DECOMPOSITION_SUBSET  3      covariance: the decomposition's examples
  LANCZOS_START         3      alignment: the Lanczos start
  PROBES                4      alignment: the Hutchinson probes of Tr H and ||H||_F
  ====================  =====  ==========================================================

The cores take a `sme.problem.Problem` (model by spec, loss and mask mode static,
the examples traced) and are jitted with the settings (a frozen dataclass) and
loss kind as static arguments (`common.jit_core`), so the checkpoints of a run
compile once. Both analyses also have a ``batch_fn``
(`sme.analyses.common.batched`): several checkpoints or replicas in one vmapped
call of the same core (parameters, subsets, masks and keys per item), with the
same post-processing, so the results equal the one-at-a-time ones up to float
re-association.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sme import covariance as cv
from sme import grads, hessian, lanczos, relations
from sme.analyses import Context, register
from sme.analyses.common import (Core, batched, jit_core, load_step_artifacts, pyplot, resolve_loss_kind,
                                 run_single, save_figure, settings_class, step_axis, train_problem)
from sme.dropout import mask_shape, sample_masks
from sme.problem import Problem

# Sub-streams of the analysis key (module docstring): fold_in(key, STREAM).
MASKS, SGD_SUBSET = 0, 1
DECOMPOSITION_MASKS, DECOMPOSITION_SUBSET = 2, 3  # covariance
HESSIAN_MASKS, LANCZOS_START, PROBES = 2, 3, 4  # alignment

COVARIANCE_DEFAULTS = dict(
    num_masks=64,  # K mask gradients for Sigma_K
    chunk_size=16,  # masks (or examples) vmapped at once
    top_k=20,  # eigenvalues reported (<= num_masks)
    num_examples=0,  # S = first n training examples; 0 = all
    sgd_examples=0,  # examples of the SGD-noise Gram matrix; 0 = all of S
    decomposition_masks=16,  # shared masks of the data/mask/interaction traces; 0 = skip
    decomposition_examples=0,  # random examples they are estimated on; 0 = all of S
    batch_size=-1,  # B of the minibatch decomposition; -1 = the run's train.batch_size
)
ALIGNMENT_DEFAULTS = dict(
    num_masks=64,  # K mask gradients for Sigma_K (one HVP each)
    chunk_size=16,  # gradients vmapped at once
    hvp_chunk_size=1,  # HVPs vmapped at once (1 = one after another: fastest on CPU, memory-bound)
    top_k=20,  # Hessian eigenpairs for the projected variance
    num_examples=0,  # S = first n training examples; 0 = all
    sgd_examples=64,  # random examples of the SGD noise (one HVP each); = num_masks: like for like
    loss_kind="auto",  # H of: auto (L_S, or R_S without dropout) | risk | modified | modified_exact | modified_mc
    hessian_masks=8,  # mask sets of the Monte Carlo L_S
    hessian_chunk_size=0,  # examples per HVP chunk (bounds memory); 0 = all at once
    max_enumerated_units=10,  # exact L_S by enumeration up to this many droppable units
    dense_max_params=1500,  # dense Hessian eigh up to this many parameters
    lanczos_order=60,  # Lanczos steps otherwise
    num_probes=32,  # Hutchinson probes for Tr H and ||H||_F beyond the top-k basis
    num_boot=2000,  # bootstrap resamples of the slope interval
    level=0.95,  # confidence level of the slope interval
)
CovarianceSettings = settings_class("CovarianceSettings", COVARIANCE_DEFAULTS)
AlignmentSettings = settings_class("AlignmentSettings", ALIGNMENT_DEFAULTS)

ALIGNMENT_LOSS_KINDS = ("auto", "risk", "modified", "modified_exact", "modified_mc")


def _subset(key, n: int, size: int, what: str) -> np.ndarray:
    """Sorted indices of a random subset of `size` of n examples (all of them for size 0 or >= n)."""
    if size == 0 or size >= n:
        return np.arange(n)
    if not 2 <= size <= n:
        raise ValueError(f"{what}={size} must be in [2, {n}] (0 = all)")
    return np.sort(np.asarray(jax.random.permutation(key, n))[:size])


def _rows(problem: Problem, index) -> Problem:
    """The problem on the examples ``index``."""
    return Problem(problem.model, problem.loss, problem.mode, problem.x[index], problem.y[index])


def _run_batch_size(ctx: Context, setting: int, n: int) -> int:
    b = setting if setting >= 0 else ctx.run.batch_size
    return n if b == 0 else min(b, n)


# ----------------------------------------------------------------------------- covariance


@jit_core
def _covariance_core(problem, params, sgd, dec, key, *, settings):
    """Sigma_K and SGD-noise spectra and traces, and the noise decomposition traces.

    ``sgd`` and ``dec``: the problem on the SGD-noise and decomposition subsets of its examples."""
    s, x = settings, problem.x
    g = grads.sampled_mask_gradients(problem, params, key=jax.random.fold_in(key, MASKS),
                                     num_masks=s["num_masks"], chunk_size=s["chunk_size"])
    cov = cv.mask_covariance(g)
    k = s["num_masks"]
    out = dict(sigma_eigenvalues=cv.gram_eigenvalues(cv.gram(cov), s["top_k"]),
               sigma_trace=cv.trace(cov), sigma_frobenius=cv.frobenius(cov),
               grad_norm=jnp.linalg.norm(jnp.full((k,), 1.0 / k, g.dtype) @ g))
    ddof = 0 if sgd.num_examples == problem.num_examples else 1
    sgd_gram = cv.centred_gram(grads.per_sample_gram(sgd, params, chunk_size=s["chunk_size"]), ddof=ddof)
    out.update(sgd_eigenvalues=cv.gram_eigenvalues(sgd_gram, s["top_k"]), sgd_trace=jnp.trace(sgd_gram),
               sgd_frobenius=jnp.linalg.norm(sgd_gram))
    if s["decomposition_masks"]:
        masks = grads.draw_masks(problem.model, key=jax.random.fold_in(key, DECOMPOSITION_MASKS),
                                 num_masks=s["decomposition_masks"], mode="shared",
                                 num_examples=dec.num_examples, dtype=x.dtype)
        traces, _ = cv.component_traces(dec, params, masks, chunk_size=s["chunk_size"])
        out["component_traces"] = jnp.stack(cv.subset_corrected(
            traces, subset_size=dec.num_examples, population=problem.num_examples))
    return out


def _covariance_plan(ctx: Context, key):
    s = CovarianceSettings.from_dict("covariance", ctx.settings)
    if not 1 <= s["top_k"] <= s["num_masks"] or s["num_masks"] < 2:
        raise ValueError(f"covariance: need 2 <= num_masks and 1 <= top_k <= num_masks, got {s.as_dict()}")
    if s["decomposition_masks"] == 1:
        raise ValueError("covariance: decomposition_masks must be 0 (skip) or >= 2")
    problem = train_problem(ctx, s["num_examples"], min_examples=2)
    n = problem.num_examples
    sgd_idx = _subset(jax.random.fold_in(key, SGD_SUBSET), n, s["sgd_examples"], "sgd_examples")
    dec_idx = _subset(jax.random.fold_in(key, DECOMPOSITION_SUBSET), n, s["decomposition_examples"],
                      "decomposition_examples")
    if s["top_k"] > len(sgd_idx):
        raise ValueError(f"covariance: top_k={s['top_k']} exceeds the {len(sgd_idx)} SGD examples")
    batch = _run_batch_size(ctx, s["batch_size"], n)

    def finish(core_out) -> dict:
        out = {k: np.asarray(v, np.float64) for k, v in core_out.items()}
        out["sigma_effective_rank"] = out["sigma_trace"] ** 2 / max(out["sigma_frobenius"] ** 2, 1e-300)
        if "component_traces" in out:
            factors = cv.minibatch_factors(batch_size=batch, num_examples=n, mode=ctx.mask_mode)
            parts = np.asarray(factors) * out["component_traces"]
            out["minibatch_traces"] = np.append(parts, parts.sum())
        out.update(batch_size=np.asarray(batch), num_masks=np.asarray(s["num_masks"]),
                   mask_mode=np.asarray(ctx.mask_mode), settings=np.asarray(s.to_json()))
        return out

    core = Core(_covariance_core, settings=s)
    return core, (problem, ctx.params, _rows(problem, sgd_idx), _rows(problem, dec_idx), key), finish


def covariance(ctx: Context, *, key) -> dict:
    """Spectrum, trace and Frobenius norm of Sigma_K and of the SGD noise; minibatch noise decomposition."""
    return run_single(_covariance_plan, ctx, key)


# ----------------------------------------------------------------------------- alignment


def _noise_entries(hvp, cov, vectors, fro_h, chunk, ddof):
    tr_hs = relations.trace_h_sigma(hvp, cov, chunk_size=chunk)
    fro_s = cv.frobenius(cov)
    rows = cov.root.shape[0]
    # ddof = 1: K iid samples, ||Sigma_K||_F² is inflated by the finite K; ddof = 0: the whole
    # population (every example), where the plug-in value is exact.
    fro2 = cv.frobenius_sq_unbiased((rows - 1) * cv.gram(cov)) if ddof == 1 and rows >= 4 else fro_s**2
    fro_u = jnp.where(fro2 > 0, jnp.sqrt(jnp.maximum(fro2, 0.0)), jnp.nan)
    return dict(tr_h_sigma=tr_hs, sigma_trace=cv.trace(cov), sigma_frobenius=fro_s,
                sigma_frobenius_unbiased=fro_u,
                alpha=relations.alignment(tr_hs, fro_h, fro_s),
                alpha_unbiased=relations.alignment(tr_hs, fro_h, fro_u),
                projected_variance=relations.projected_variance(cov, vectors))


@jit_core
def _alignment_core(problem, params, hmasks, sgd, key, *, kind, settings):
    """Alignment of the noise with the Hessian (``sgd``: the problem on the SGD-noise examples);
    the dense Hessian up to ``dense_max_params`` parameters, else Lanczos."""
    s, x = settings, problem.x
    hloss = hessian.make_hessian_loss(kind, problem, masks=hmasks)
    hvp, dim = hessian.make_hvp(hloss, params, x, problem.y, chunk_size=s["hessian_chunk_size"])
    k = s["top_k"]
    if dim <= s["dense_max_params"]:
        h = hessian.to_dense(hvp, dim, dtype=x.dtype)
        values, vectors = jnp.linalg.eigh((h + h.T) / 2)
        values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k].T
        residuals = jnp.linalg.norm(vectors @ h - values[:, None] * vectors, axis=1)
        zero = jnp.zeros((), h.dtype)
        norms = relations.HessianNorms(jnp.trace(h), zero, jnp.linalg.norm(h), zero)
    else:
        pairs = lanczos.top_eigenpairs(hvp, dim, key=jax.random.fold_in(key, LANCZOS_START), k=k,
                                       order=s["lanczos_order"])
        values, vectors, residuals = pairs.values, pairs.vectors, pairs.residuals
        norms = relations.hessian_norms(hvp, dim, key=jax.random.fold_in(key, PROBES),
                                        num_probes=s["num_probes"], basis=vectors)
    g = grads.sampled_mask_gradients(problem, params, key=jax.random.fold_in(key, MASKS),
                                     num_masks=s["num_masks"], chunk_size=s["chunk_size"])
    sgd_rows = grads.per_sample_gradients(sgd, params, chunk_size=s["chunk_size"])
    ddof = 0 if sgd.num_examples == problem.num_examples else 1
    out = dict(hessian_eigenvalues=values, hessian_residuals=residuals, hessian_trace=norms.trace,
               hessian_trace_se=norms.trace_se, hessian_frobenius=norms.frobenius,
               hessian_frobenius_se=norms.frobenius_se)
    for name, cov, dd in (("dropout", cv.mask_covariance(g), 1),
                          ("sgd", cv.from_samples(sgd_rows, ddof=ddof), ddof)):
        entries = _noise_entries(hvp, cov, vectors, norms.frobenius, s["hvp_chunk_size"], dd)
        out.update({f"{name}_{k}": v for k, v in entries.items()})
    return out


def _fit_entries(prefix: str, eigenvalues, projected, s) -> dict:
    try:
        fit = relations.variance_relation(eigenvalues, projected, num_boot=s["num_boot"], level=s["level"])
        values = (fit.slope, fit.intercept, fit.ci_low, fit.ci_high, fit.num_points)
    except ValueError:  # fewer than 3 positive (lambda, variance) pairs, e.g. no dropout
        values = (math.nan, math.nan, math.nan, math.nan, 0)
    names = ("slope", "slope_intercept", "slope_low", "slope_high", "slope_points")
    return {f"{prefix}_{name}": value for name, value in zip(names, values)}


def _alignment_plan(ctx: Context, key):
    s = AlignmentSettings.from_dict("alignment", ctx.settings)
    problem = train_problem(ctx, s["num_examples"], min_examples=2)
    n = problem.num_examples
    dim = ravel_pytree(ctx.params)[0].shape[0]
    if not 1 <= s["top_k"] <= dim or s["num_masks"] < 2:
        raise ValueError(f"alignment: need 1 <= top_k <= {dim} parameters and num_masks >= 2, got {s.as_dict()}")
    if s["loss_kind"] not in ALIGNMENT_LOSS_KINDS:
        raise ValueError(f"alignment: loss_kind={s['loss_kind']!r}; expected one of {ALIGNMENT_LOSS_KINDS}")
    if s["loss_kind"].startswith("modified") and not any(site.droppable for site in ctx.model.sites):
        raise ValueError(f"alignment: loss_kind={s['loss_kind']!r} needs dropout, but the model has none")
    kind = resolve_loss_kind(s["loss_kind"], ctx.model, ctx.loss, s["max_enumerated_units"])
    hmasks = None
    if kind == "modified_mc":
        shape = mask_shape(ctx.mask_mode, n, s["hessian_masks"])
        hmasks = sample_masks(ctx.model.sites, key=jax.random.fold_in(key, HESSIAN_MASKS), batch_shape=shape,
                              dtype=problem.x.dtype)
    sgd_idx = _subset(jax.random.fold_in(key, SGD_SUBSET), n, s["sgd_examples"], "sgd_examples")

    def finish(core_out) -> dict:
        out = {k: np.asarray(v, np.float64) for k, v in core_out.items()}
        for name, rank in (("dropout", s["num_masks"] - 1), ("sgd", len(sgd_idx) - 1)):
            haar = relations.haar_null(out["hessian_trace"], out["hessian_frobenius"],
                                       out[f"{name}_sigma_trace"], out[f"{name}_sigma_frobenius"], dim)
            wishart = relations.wishart_null(out["hessian_trace"], out["hessian_frobenius"], dim, rank)
            haar_u = relations.haar_null(out["hessian_trace"], out["hessian_frobenius"],
                                         out[f"{name}_sigma_trace"], out[f"{name}_sigma_frobenius_unbiased"], dim)
            out.update({f"{name}_null_haar_unbiased_mean": haar_u.mean,
                        f"{name}_null_haar_unbiased_std": haar_u.std})
            out.update({f"{name}_null_haar_mean": haar.mean, f"{name}_null_haar_std": haar.std,
                        f"{name}_null_wishart_mean": wishart.mean, f"{name}_null_wishart_std": wishart.std})
            out.update(_fit_entries(name, out["hessian_eigenvalues"], out[f"{name}_projected_variance"], s))
        out.update(hessian_of=kind, hessian_label=hessian.LOSS_KINDS[kind], num_params=dim,
                   settings=s.to_json())
        return {k: np.asarray(v) for k, v in out.items()}

    core = Core(_alignment_core, kind, s)
    return core, (problem, ctx.params, hmasks, _rows(problem, sgd_idx), key), finish


def alignment(ctx: Context, *, key) -> dict:
    """alpha(H, Sigma) with Haar/Wishart nulls and projected variance vs Hessian eigenvalue, dropout and SGD."""
    return run_single(_alignment_plan, ctx, key)


# ----------------------------------------------------------------------------- plots


def plot_covariance(directory: str, steps) -> list[str]:
    """Sigma and SGD spectra per checkpoint, and the traces (with the decomposition) against the step."""
    loaded = load_step_artifacts(directory, steps)
    if not loaded:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.cm.viridis(np.linspace(0, 1, len(loaded)))
    for (step, a), color in zip(loaded, colors):
        axes[0].semilogy(np.arange(1, a["sigma_eigenvalues"].size + 1), a["sigma_eigenvalues"], "o-",
                         color=color, ms=3, label=f"step {step}")
        axes[0].semilogy(np.arange(1, a["sgd_eigenvalues"].size + 1), a["sgd_eigenvalues"], "x--", color=color, ms=3)
    axes[0].set(xlabel="index i", ylabel="eigenvalue", title="Sigma_K (o, dropout) and SGD noise (x)")
    axes[0].legend(fontsize=7)
    xs = [step for step, _ in loaded]
    mode = str(loaded[0][1]["mask_mode"])
    if len(loaded) == 1:  # one checkpoint: the traces as bars
        a = loaded[0][1]
        names = ["Tr Σ (dropout GD)", "Tr SGD noise (B = 1)"]
        values = [float(a["sigma_trace"]), float(a["sgd_trace"])]
        if "minibatch_traces" in a:
            names += [f"minibatch {p}" for p in ("data", "mask", "interaction", "total")]
            values += [float(v) for v in a["minibatch_traces"]]
        positive = [v for v in values if v > 0]
        floor = min(positive) / 3 if positive else 1e-12
        axes[1].bar(range(len(values)), [max(v, floor) for v in values], bottom=0,
                    color=[f"C{i}" if v > 0 else "none" for i, v in enumerate(values)])
        for i, v in enumerate(values):
            if v <= 0:  # e.g. the data and interaction parts of a full batch
                axes[1].text(i, floor * 1.3, "0", ha="center", fontsize=8)
        axes[1].set_xticks(range(len(values)), names, rotation=30, ha="right", fontsize=7)
        axes[1].set(ylabel="trace", yscale="log", title=f"noise traces, step {xs[0]} ({mode} masks)")
        axes[1].set_ylim(bottom=floor)
        return [save_figure(fig, plt, directory, "covariance.png")]
    axes[1].plot(xs, [a["sigma_trace"] for _, a in loaded], "o-", label=f"Tr Sigma (dropout GD, {mode})")
    axes[1].plot(xs, [a["sgd_trace"] for _, a in loaded], "x-", label="Tr SGD noise (B = 1, no dropout)")
    if "minibatch_traces" in loaded[0][1]:
        for i, part in enumerate(("data", "mask", "interaction", "total")):
            axes[1].plot(xs, [a["minibatch_traces"][i] for _, a in loaded], ".--",
                         label=f"minibatch {part} (B={int(loaded[0][1]['batch_size'])})")
    axes[1].set(ylabel="trace", yscale="log", title="noise traces")
    step_axis(axes[1], xs)
    axes[1].legend(fontsize=7)
    return [save_figure(fig, plt, directory, "covariance.png")]


def plot_alignment(directory: str, steps) -> list[str]:
    """alpha vs training step with the Haar null band (mean ± 2 std); the projected-variance scatter."""
    loaded = load_step_artifacts(directory, steps)
    if not loaded:
        return []
    plt, written = pyplot(), []
    xs = np.array([step for step, _ in loaded], np.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(loaded) == 1:  # one checkpoint: alpha and its Haar null as bars (log scale: the null is tiny)
        step, a = loaded[0]
        unbiased = "dropout_alpha_unbiased" in a
        bars = []
        for name in ("dropout", "sgd"):
            if float(a[f"{name}_sigma_trace"]) <= 1e-12 * max(float(a["sgd_sigma_trace"]), 1e-300):
                continue  # no dropout in the run: Sigma_dropout = 0 and alpha is undefined
            key = f"{name}_alpha_unbiased" if unbiased else f"{name}_alpha"
            null = f"{name}_null_haar_unbiased" if unbiased else f"{name}_null_haar"
            bars += [(f"α, {name} noise", float(a[key]), 0.0),
                     (f"Haar null, {name}", float(a[f"{null}_mean"]), 2 * float(a[f"{null}_std"]))]
        ax.bar(range(len(bars)), [b[1] for b in bars], yerr=[b[2] for b in bars], capsize=4,
               color=[("C0" if "dropout" in b[0] else "C1") if b[0].startswith("α") else "lightgrey" for b in bars])
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
        ax.set(ylabel="alignment α(H, Σ)" + (" (unbiased ‖Σ‖_F)" if unbiased else ""),
               xlabel="noise and its null (error bar: ± 2 sd)", title=f"H of {a['hessian_label']}, step {step}")
        ax.set_yscale("symlog", linthresh=1e-4)  # log-like, so the null shows; H may be indefinite (alpha < 0)
        written.append(save_figure(fig, plt, directory, "alignment.png"))
        fig, ax = plt.subplots(figsize=(6, 4))
        return written + _projected_variance_figure(plt, fig, ax, directory, step, a)
    unbiased = all("dropout_alpha_unbiased" in a for _, a in loaded)
    suffix, null = ("_unbiased", "_null_haar_unbiased") if unbiased else ("", "_null_haar")
    for name, marker in (("dropout", "o"), ("sgd", "x")):
        alpha = np.array([a[f"{name}_alpha{suffix}"] for _, a in loaded])
        mean = np.array([a[f"{name}{null}_mean"] for _, a in loaded])
        std = np.array([a[f"{name}{null}_std"] for _, a in loaded])
        line = ax.plot(xs, alpha, marker + "-", label=f"α(H, Σ_{name})")[0]
        ax.errorbar(xs, mean, yerr=2 * std, fmt="_", color=line.get_color(), capsize=2,
                    label=f"Haar null ± 2 sd ({name})")
    ax.set(ylabel="alignment α" + (" (unbiased ‖Σ‖_F)" if unbiased else ""),
           title=f"alignment, H of {loaded[0][1]['hessian_label']}")
    ax.set_yscale("symlog", linthresh=1e-4)  # log-like, so the null shows; H may be indefinite (alpha < 0)
    step_axis(ax, xs)
    ax.legend(fontsize=7, loc="best")
    written.append(save_figure(fig, plt, directory, "alignment.png"))
    step, a = loaded[-1]
    fig, ax = plt.subplots(figsize=(6, 4))
    return written + _projected_variance_figure(plt, fig, ax, directory, step, a)


def _projected_variance_figure(plt, fig, ax, directory, step, a) -> list[str]:
    lam = a["hessian_eigenvalues"]
    for name, marker in (("dropout", "o"), ("sgd", "x")):
        pv = a[f"{name}_projected_variance"]
        keep = (lam > 0) & (pv > 0)
        points = ax.loglog(lam[keep], pv[keep], marker, label=name)[0]
        slope = float(a[f"{name}_slope"])
        if np.isfinite(slope):
            grid = np.geomspace(lam[keep].min(), lam[keep].max(), 50)
            intercept = float(a[f"{name}_slope_intercept"])
            ax.loglog(grid, np.exp(intercept) * grid**slope, "-", color=points.get_color(),
                      label=f"slope {slope:.2f} [{float(a[f'{name}_slope_low']):.2f}, "
                            f"{float(a[f'{name}_slope_high']):.2f}]")
    ax.set(xlabel="Hessian eigenvalue λ_i", ylabel="projected variance u_iᵀ Σ u_i", title=f"projected variance, step {step}")
    ax.legend(fontsize=7)
    return [save_figure(fig, plt, directory, "projected_variance.png")]


# Per-item arguments (in_axes 0): parameters, the SGD/decomposition subsets and the Hessian's
# masks (drawn from each item's key), and the key; the training problem is shared (None).
register("covariance", plot_fn=plot_covariance,
         batch_fn=batched(_covariance_plan, (None, 0, 0, 0, 0)))(covariance)
register("alignment", plot_fn=plot_alignment, batch_fn=batched(_alignment_plan, (None, 0, 0, 0, 0)))(alignment)
