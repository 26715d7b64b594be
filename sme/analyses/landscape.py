"""Landscape analyses: inverse variance-flatness (gradient and trajectory data) and 1-D profiles.

Registered analyses (settings: module-level ``*_DEFAULTS``; missing ones are
filled, unknown ones are an error, and the filled settings are returned as the
JSON string ``settings``):

* ``flatness`` — random gradient data at the checkpoint theta (arXiv 2305.15850
  §5, Feng & Tu PNAS 2021): K gradients g_k = grad R^drop_S(theta; eta_k) over the
  first ``num_examples`` training examples with fresh noise per row
  (``noise``: ``dropout`` masks in the run's mask mode, ``minibatch`` batches of
  ``batch_size`` without dropout, or ``dropout_minibatch`` both), PCA of the
  K x P rows (variances divided by K - 1), interval flatness F_i of the
  landscape ``objective`` at theta along the top ``num_components`` PCs for
  c = 2 and c = e, and the fit sigma_i^2 ~ F_i^(-psi) leaving out the first
  ``num_excluded`` PCs and capped widths. Row k's noise comes from
  ``split(fold_in(key, ROWS), K)[k]``: masks from that key, batch indices from its
  ``fold_in(., BATCH)``.
* ``trajectory_flatness`` — random trajectory data: the same with the rows read
  from ``<workdir>/<filename>`` (default ``snapshots.npz``), key ``params`` of
  shape (S, P) (or (R, S, P), replica axis first; float32), optional ``steps``
  (S,). theta* is the ``reference``: ``last`` snapshot, window ``mean``, or the
  ``checkpoint``'s parameters. Besides the first ``num_excluded`` PCs, every PC
  whose trend fraction (`sme.landscape.trend_fraction`, Legendre degree
  ``trend_degree``) exceeds ``max_trend`` is drift, not fluctuation, and is left
  out of the fit. The window does not depend on the checkpoint: request it for
  one step. Skipped (key ``skipped`` holds the reason) when there
  is no workdir or no snapshot file.
* ``profile`` — filter-normalised 1-D profiles (Li et al. 2018):
  ``objective`` on the training set and R_S on the test set along
  ``num_directions`` random directions, alpha in [-radius, radius].

Landscape ``objective``: ``risk`` (R_S, the deterministic net), ``modified``
(closed-form L_S = R_S + R_1; MSE with last-layer dropout only) or
``modified_mc`` (L_S averaged over ``num_loss_masks`` masks drawn once from
``fold_in(key, LOSS_MASKS)``, so that the loss is a deterministic function of theta).

Random draws come from named sub-streams of the analysis key, ``fold_in(key, STREAM)``:

  ==========  =====  ==========================================================
  stream      value  draws
  ==========  =====  ==========================================================
  ROWS        0      flatness: the gradient rows' noise (one split key per row)
  LOSS_MASKS  1      the ``modified_mc`` objective's masks (every analysis here)
  DIRECTIONS  2      profile: the random directions (one split key each)
  ==========  =====  ==========================================================

Within a row's key, the minibatch indices come from ``fold_in(row_key, BATCH)`` (BATCH = 1) and
the masks from the row key itself.

Artifact keys (flatness, trajectory_flatness): ``variances`` (all PCs),
``directions`` (k, P) float32, ``factors`` (2,) = (2, e), ``width``/``left``/
``right``/``capped`` (2, k), ``resolved`` (k,) (variance above 100 eps sigma_1^2,
the Gram route's noise floor; unresolved and capped points are not fitted),
``excluded`` (k,) (left out as drift; the headline fit also leaves out PCs beyond
``fit_components``), ``trend_fraction`` (k,) (trajectory only),
``loss_star``, and per factor (suffix ``c2``,
``ce``) the scalars ``psi``, ``psi_low``, ``psi_high``, ``intercept``,
``spearman``, ``num_fit_points`` (NaN with ``fit_error_<c>`` when fewer than 3
points remain); with ``sensitivity_components`` the same fit over a grid of PC
ranges (x ``sensitivity_max_trend`` for trajectory data): ``sensitivity_*`` (see
`_sensitivity`). Profile: ``alphas`` (A,), ``train_losses``/``test_losses``
(D, A), ``loss_at_params``, ``test_loss_at_params``.

The cores take a `sme.problem.Problem` (model by spec, loss and mask mode static,
the examples traced) and are jitted with the settings (a frozen dataclass) as
static arguments (`common.jit_core`), so the many checkpoints of a run compile once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sme import landscape, losses
from sme.analyses import Context, common, register
from sme.analyses.common import Core, jit_core, load_step_artifacts, pyplot, save_figure, settings_class, train_problem
from sme.dropout import mask_shape, sample_masks
from sme.problem import Problem

# Sub-streams of the analysis key (module docstring): fold_in(key, STREAM).
ROWS, LOSS_MASKS, DIRECTIONS = 0, 1, 2
BATCH = 1  # within a gradient row's key: its minibatch indices

FACTOR_NAMES = ("c2", "ce")  # suffixes of landscape.FACTORS = (2, e)
OBJECTIVES = landscape.OBJECTIVES  # risk, modified, modified_mc (sme.landscape.problem_loss)
NOISES = ("dropout", "minibatch", "dropout_minibatch")

_SEARCH_DEFAULTS = dict(
    objective="risk",  # landscape whose flatness is measured (see module docstring)
    num_loss_masks=16,  # masks of the modified_mc objective
    num_examples=0,  # first n training examples for losses and gradients; 0 = all
    num_components=16,  # PCs along which F_i is measured
    num_excluded=1,  # leading PCs (drift mode) left out of the psi fit
    fit_components=0,  # PCs 1..this enter the headline psi fit; 0 = all num_components
    sensitivity_components="",  # PC ranges of the sensitivity table, e.g. "16,30,60" (each <= num_components)
    init_step=1e-3,  # first bracket step along a unit direction (parameter units)
    max_distance=1e3,  # cap of each side of the interval
    num_bisect=20,  # bisections: crossing located to 2^-21 of its bracket
    num_boot=2000,  # bootstrap resamples of the psi interval
    level=0.95,  # confidence level of the psi interval
)
FLATNESS_DEFAULTS = dict(
    _SEARCH_DEFAULTS,
    num_masks=64,  # K gradient rows
    noise="dropout",  # dropout | minibatch | dropout_minibatch
    batch_size=0,  # minibatch noise: batch size; 0 = the run's train.batch_size
    chunk_size=16,  # gradient rows vmapped at once (memory bound)
)
TRAJECTORY_DEFAULTS = dict(
    _SEARCH_DEFAULTS, filename="snapshots.npz", reference="last",
    max_trend=0.5,  # PCs whose trend fraction exceeds this are drift, left out of the fit (1: rule off)
    sensitivity_max_trend="",  # max_trend values of the sensitivity table, e.g. "0.4,0.5,0.6,0.7"
    trend_degree=4,  # Legendre degrees 1..trend_degree span the trend (landscape.trend_fraction)
)
PROFILE_DEFAULTS = dict(
    objective="risk", num_loss_masks=16, num_examples=0,
    num_directions=4,  # random filter-normalised directions
    num_points=41,  # odd, so that alpha = 0 is on the grid
    radius=1.0,  # alpha in [-radius, radius], in filter-normalised units
    zero_bias=True,  # Li et al.: biases are not perturbed
)


def fill_settings(name: str, settings: dict, defaults: dict) -> dict:
    """`common.fill_settings`, then the objective must be one of OBJECTIVES."""
    filled = common.fill_settings(name, settings, defaults)
    if filled["objective"] not in OBJECTIVES:
        raise ValueError(f"analysis {name}: objective={filled['objective']!r}; expected one of {OBJECTIVES}")
    return filled


FlatnessSettings = settings_class("FlatnessSettings", FLATNESS_DEFAULTS, fill_settings)
TrajectorySettings = settings_class("TrajectorySettings", TRAJECTORY_DEFAULTS, fill_settings)
ProfileSettings = settings_class("ProfileSettings", PROFILE_DEFAULTS, fill_settings)


def _search(s: dict) -> landscape.BracketSearch:
    return landscape.BracketSearch(s["init_step"], s["max_distance"], s["num_bisect"])


def _objective(problem: Problem, s, *, key):
    """The landscape loss as fn(params pytree); masks of modified_mc are fixed (drawn once)."""
    model, loss, mode, x, y = problem.model, problem.loss, problem.mode, problem.x, problem.y
    if s["objective"] == "risk":
        return lambda p: losses.risk(model, loss, p, x, y)
    if s["objective"] == "modified":
        losses.check_closed_form(model, loss)
        return lambda p: losses.modified_loss(model, loss, p, x, y)
    batch_shape = mask_shape(mode, x.shape[0], s["num_loss_masks"])
    masks = sample_masks(model.sites, key=key, batch_shape=batch_shape, dtype=x.dtype)
    # lax.map over masks: memory of one mask's forward pass even when vmapped over directions.
    return lambda p: jnp.mean(jax.lax.map(
        lambda m: losses.dropout_risk(model, loss, p, x, y, m, mode=mode), masks))


def _gradient_rows(problem: Problem, s, params, *, key):
    """(K, P) raveled gradients of R^drop over a noise draw per row (module docstring)."""
    model, loss, mode, x, y = problem.model, problem.loss, problem.mode, problem.x, problem.y
    use_masks, use_batch = s["noise"] != "minibatch", s["noise"] != "dropout"
    n = s["batch_size"] if use_batch else x.shape[0]
    grad = jax.grad(losses.dropout_risk, argnums=2)

    def row(k):
        xb, yb = x, y
        if use_batch:
            idx = jax.random.choice(jax.random.fold_in(k, BATCH), x.shape[0], (n,), replace=False)
            xb, yb = x[idx], y[idx]
        shape = mask_shape(mode, n)
        masks = (sample_masks(model.sites, key=k, batch_shape=shape, dtype=x.dtype) if use_masks else
                 tuple(jnp.ones((*shape, *site.shape), x.dtype) for site in model.sites))
        return ravel_pytree(grad(model, loss, params, xb, yb, masks, mode=mode))[0]

    return jax.lax.map(row, jax.random.split(key, s["num_masks"]), batch_size=s["chunk_size"])


@jit_core
def _flatness_core(problem, params, rows, key, *, settings, extra):
    """PCA of the rows and the interval flatness along them; ``extra``: draw gradient rows (else given)."""
    s, from_gradients = settings, extra
    flat, unravel = ravel_pytree(params)
    # Gradient data: rows drawn at theta; trajectory data: rows given, theta* = params.
    if from_gradients:
        rows = _gradient_rows(problem, s, params, key=jax.random.fold_in(key, ROWS))
    objective = _objective(problem, s, key=jax.random.fold_in(key, LOSS_MASKS))
    comps, flat_res = landscape.pca_flatness(
        rows, lambda v: objective(unravel(v)), flat, num_components=s["num_components"],
        search=_search(s))
    directions = comps.directions[: s["num_components"]]
    trend = None if from_gradients else landscape.trend_fraction(rows, directions, degree=s["trend_degree"])
    return comps.variances, directions, flat_res, trend


# Gram eigenvalues are accurate to ~eps * sigma_1^2: smaller variances (e.g. beyond the
# rank of K rows drawn from fewer distinct masks) are numerical noise, not data.
RESOLVED_EPS = 100


def _fit_entries(variances, result, usable, s) -> dict:
    out = {}
    for i, tag in enumerate(FACTOR_NAMES):
        try:
            fit = landscape.variance_flatness_fit(
                variances[: len(usable)], result.width[i], num_excluded=0,
                valid=usable & ~result.capped[i], num_boot=s["num_boot"], level=s["level"])
            values = fit._asdict()
        except ValueError as err:
            values = {f: math.nan for f in landscape.PsiFit._fields}
            values["num_points"] = 0
            out[f"fit_error_{tag}"] = str(err)
        for field, value in values.items():
            out[f"{'num_fit_points' if field == 'num_points' else field}_{tag}"] = value
    return out


def _parse_list(s: dict, key: str, cast, low, high) -> list:
    try:
        values = [cast(v) for v in str(s[key]).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{key}={s[key]!r}: expected comma-separated numbers") from None
    bad = [v for v in values if not low <= v <= high]
    if bad:
        raise ValueError(f"{key}={s[key]!r}: {bad} outside [{low}, {high}]")
    return values


def _check_fit_settings(s: dict, trajectory: bool):
    """Fit ranges and the sensitivity grid, checked before any compute."""
    k = s["num_components"]
    if s["fit_components"] and not 3 <= s["fit_components"] <= k:
        raise ValueError(f"fit_components={s['fit_components']} must be 0 (all) or in [3, num_components={k}]")
    _parse_list(s, "sensitivity_components", int, 3, k)
    if trajectory:
        _parse_list(s, "sensitivity_max_trend", float, 1e-12, 1.0)


def _sensitivity(variances, result, resolved, trend, s) -> dict:
    """psi over the grid PC range x max_trend (trajectory data; one column otherwise), per factor.

    Keys ``sensitivity_components`` (a,), ``sensitivity_max_trend`` (b,) (NaN: no trend rule) and
    ``sensitivity_<field>`` (2, a, b) for psi, psi_low, psi_high, spearman, num_fit_points.
    """
    comps = _parse_list(s, "sensitivity_components", int, 3, len(resolved))
    if not comps:
        return {}
    trends = _parse_list(s, "sensitivity_max_trend", float, 1e-12, 1.0) if trend is not None else []
    trends = trends or [math.nan]
    fields = ("psi", "psi_low", "psi_high", "spearman", "num_fit_points")
    grid = {f: np.full((len(FACTOR_NAMES), len(comps), len(trends)), np.nan) for f in fields}
    index = np.arange(len(resolved))
    for a, c in enumerate(comps):
        for b, t in enumerate(trends):
            excluded = index < s["num_excluded"]
            if trend is not None:
                excluded = excluded | (trend > t)
            fits = _fit_entries(variances, result, resolved & ~excluded & (index < c), s)
            for i, tag in enumerate(FACTOR_NAMES):
                for f in fields:
                    grid[f][i, a, b] = fits[f"{f}_{tag}"]
    return {"sensitivity_components": np.asarray(comps), "sensitivity_max_trend": np.asarray(trends),
            **{f"sensitivity_{f}": v for f, v in grid.items()}}


def _flatness_result(variances, directions, result, trend, s) -> dict:
    dtype = directions.dtype
    variances = np.asarray(variances, np.float64)
    result = landscape.Flatness(*(np.asarray(a) for a in result))
    k = result.width.shape[1]
    resolved = variances[:k] > RESOLVED_EPS * np.finfo(dtype).eps * variances[0]
    excluded = np.arange(k) < s["num_excluded"]
    out = dict(variances=variances, directions=np.asarray(directions, np.float32),
               factors=np.asarray(landscape.FACTORS), width=result.width, left=result.left,
               right=result.right, capped=result.capped, resolved=resolved, loss_star=result.loss,
               settings=s.to_json())
    if trend is not None:
        out["trend_fraction"] = trend = np.asarray(trend, np.float64)
        excluded = excluded | (trend > s["max_trend"])
    out["excluded"] = excluded
    in_fit = np.arange(k) < (s["fit_components"] or k)
    out.update(_fit_entries(variances, result, resolved & ~excluded & in_fit, s))
    out.update(_sensitivity(variances, result, resolved, trend, s))
    return out


def _check_rows(s: dict, num_rows: int, dim: int, what: str):
    if not 1 <= s["num_components"] <= min(num_rows - 1, dim):
        raise ValueError(f"num_components={s['num_components']} must be in [1, {min(num_rows - 1, dim)}] "
                         f"for {num_rows} {what} of dimension {dim}")


def flatness(ctx: Context, *, key) -> dict:
    """Random gradient data at the checkpoint: PCA, interval flatness (c = 2, e) and the psi fit."""
    s = FlatnessSettings.from_dict("flatness", ctx.settings)
    if s["noise"] not in NOISES:
        raise ValueError(f"analysis flatness: noise={s['noise']!r}; expected one of {NOISES}")
    if s["noise"] != "minibatch" and not any(site.droppable for site in ctx.model.sites):
        raise ValueError("analysis flatness: the model has no dropout (all keep_prob = 1), so mask "
                         "gradients are identical; use noise='minibatch'")
    problem = train_problem(ctx, s["num_examples"])
    if s["noise"] != "dropout":
        run_batch = ctx.run.batch_size
        s = dataclasses.replace(s, batch_size=s["batch_size"] or run_batch)
        if not 1 <= s["batch_size"] < problem.num_examples:
            raise ValueError(f"analysis flatness: minibatch noise needs 1 <= batch_size < {problem.num_examples} "
                             f"examples, got batch_size={s['batch_size']}")
    _check_rows(s, s["num_masks"], ravel_pytree(ctx.params)[0].shape[0], "gradient rows")
    _check_fit_settings(s, trajectory=False)
    fn = Core(_flatness_core, settings=s, extra=True)
    return _flatness_result(*fn(problem, ctx.params, None, key), s)


def _workdir(ctx: Context):
    return ctx.run.workdir or None


def load_snapshots(path: str, *, replica: int = 0) -> np.ndarray:
    """The (S, P) ``params`` stack of a snapshot file (replica ``replica`` of an (R, S, P) stack)."""
    with np.load(path, allow_pickle=False) as f:
        if "params" not in f.files:
            raise ValueError(f"{path}: no 'params' array (keys: {f.files})")
        stack = f["params"]
    if stack.ndim == 3:
        if not 0 <= replica < stack.shape[0]:
            raise ValueError(f"{path}: replica {replica} but the stack has {stack.shape[0]} replicas")
        stack = stack[replica]
    if stack.ndim != 2 or stack.shape[0] < 2:
        raise ValueError(f"{path}: 'params' must be (S, P) or (R, S, P) with S >= 2, got {stack.shape}")
    return stack


def trajectory_flatness(ctx: Context, *, key) -> dict:
    """Random trajectory data from <workdir>/snapshots.npz: PCA, interval flatness, psi fit."""
    s = TrajectorySettings.from_dict("trajectory_flatness", ctx.settings)
    if s["reference"] not in ("last", "mean", "checkpoint"):
        raise ValueError(f"analysis trajectory_flatness: reference={s['reference']!r}; "
                         "expected last, mean or checkpoint")
    workdir = _workdir(ctx)
    path = os.path.join(workdir, s["filename"]) if workdir else None
    if path is None or not os.path.exists(path):
        reason = ("no workdir in the analysis context" if path is None else
                  f"no snapshot file {path} (training must save the window's weights)")
        logging.warning("trajectory_flatness skipped: %s", reason)
        return {"skipped": f"trajectory_flatness skipped: {reason}", "settings": s.to_json()}
    flat, unravel = ravel_pytree(ctx.params)
    rows = jnp.asarray(load_snapshots(path, replica=ctx.replica), flat.dtype)
    if rows.shape[1] != flat.shape[0]:
        raise ValueError(f"{path}: snapshots have {rows.shape[1]} parameters but the model has {flat.shape[0]}")
    _check_rows(s, rows.shape[0], rows.shape[1], "snapshots")
    _check_fit_settings(s, trajectory=True)
    if not 0 < s["max_trend"] <= 1:
        raise ValueError(f"analysis trajectory_flatness: max_trend={s['max_trend']} must be in (0, 1]")
    if not 1 <= s["trend_degree"] <= rows.shape[0] - 2:
        raise ValueError(f"analysis trajectory_flatness: trend_degree={s['trend_degree']} must be in "
                         f"[1, {rows.shape[0] - 2}] for {rows.shape[0]} snapshots")
    reference = {"last": rows[-1], "mean": jnp.mean(rows, axis=0), "checkpoint": flat}[s["reference"]]
    problem = train_problem(ctx, s["num_examples"])
    fn = Core(_flatness_core, settings=s, extra=False)
    out = _flatness_result(*fn(problem, unravel(reference), rows, key), s)
    out["num_snapshots"] = rows.shape[0]
    return out


@jit_core
def _profile_core(problem, params, test_problem, key, *, settings):
    """Train and test loss profiles along filter-normalised random directions (``test_problem``: the test set)."""
    s = settings
    with jax.ensure_compile_time_eval():  # a constant of the compiled function, as computed eagerly
        alphas = jnp.linspace(-s["radius"], s["radius"], s["num_points"])
    objective = _objective(problem, s, key=jax.random.fold_in(key, LOSS_MASKS))
    test = lambda p: losses.risk(test_problem, p)

    def one(k):
        d = landscape.filter_normalize(landscape.random_direction(params, key=k), params,
                                       zero_bias=s["zero_bias"])
        return (landscape.profile_1d(objective, params, d, alphas),
                landscape.profile_1d(test, params, d, alphas))

    keys = jax.random.split(jax.random.fold_in(key, DIRECTIONS), s["num_directions"])
    train_losses, test_losses = jax.lax.map(one, keys)  # one direction at a time: bounded memory
    return alphas, train_losses, test_losses, objective(params), test(params)


def profile(ctx: Context, *, key) -> dict:
    """Filter-normalised 1-D loss profiles along random directions at the checkpoint."""
    s = ProfileSettings.from_dict("profile", ctx.settings)
    if s["num_points"] < 3 or s["num_points"] % 2 == 0 or s["num_directions"] < 1 or not s["radius"] > 0:
        raise ValueError(f"analysis profile: need odd num_points >= 3, num_directions >= 1 and radius > 0; got "
                         f"{s['num_points']}, {s['num_directions']}, {s['radius']}")
    problem = train_problem(ctx, s["num_examples"])
    dtype = problem.x.dtype
    test = Problem(ctx.model, ctx.loss, ctx.mask_mode, jnp.asarray(ctx.dataset.x_test, dtype),
                   jnp.asarray(ctx.dataset.y_test, dtype))
    fn = Core(_profile_core, settings=s)
    alphas, train_losses, test_losses, at_params, test_at_params = fn(problem, ctx.params, test, key)
    return dict(alphas=alphas, train_losses=train_losses, test_losses=test_losses,
                loss_at_params=at_params, test_loss_at_params=test_at_params,
                settings=s.to_json())


# ----------------------------------------------------------------------------- plots


def _plot_flatness_kind(prefix: str, title: str):
    def plot(directory: str, steps) -> list[str]:
        plt, written = pyplot(), []
        for step, a in load_step_artifacts(directory, steps):
            if "skipped" in a:
                continue
            fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
            k = a["width"].shape[1]
            var = a["variances"][:k]
            if "excluded" in a:
                fitted = ~a["excluded"].astype(bool)
            else:  # artifacts written before the trend rule
                fitted = np.arange(k) >= json.loads(str(a["settings"]))["num_excluded"]
            fit_k = json.loads(str(a["settings"])).get("fit_components") or k
            in_range = np.arange(k) < fit_k
            for i, (ax, tag) in enumerate(zip(axes, FACTOR_NAMES)):
                w, capped = a["width"][i], a["capped"][i]
                ok = fitted & ~capped & a["resolved"]
                used = ok & in_range
                ax.loglog(w[used], var[used], "o", label="PCs in the fit")
                if np.any(ok & ~in_range):
                    ax.loglog(w[ok & ~in_range], var[ok & ~in_range], ".", color="C0", alpha=0.5,
                              label=f"PCs beyond {fit_k} (not fitted)")
                ax.loglog(w[~fitted], var[~fitted], "s", color="grey", label="excluded (drift)")
                ax.loglog(w[fitted & ~ok], var[fitted & ~ok], "o", mfc="none", label="capped/unresolved")
                psi = float(a[f"psi_{tag}"])
                if np.isfinite(psi):
                    grid = np.geomspace(w[used].min(), w[used].max(), 50)
                    limits = ax.get_xlim(), ax.get_ylim()
                    ax.loglog(grid, np.exp(float(a[f"intercept_{tag}"])) * grid ** -psi, "k-",
                              label=f"ψ = {psi:.2f} [{float(a[f'psi_low_{tag}']):.2f}, "
                                    f"{float(a[f'psi_high_{tag}']):.2f}], ρ = {float(a[f'spearman_{tag}']):.2f}")
                    # the interval's slopes, pivoting at the fitted points' log-log centroid
                    cx, cy = np.mean(np.log(w[used])), np.mean(np.log(var[used]))
                    for j, end in enumerate((float(a[f"psi_low_{tag}"]), float(a[f"psi_high_{tag}"]))):
                        if np.isfinite(end):
                            ax.loglog(grid, np.exp(cy - end * (np.log(grid) - cx)), "k:", lw=0.9,
                                      label="95 % interval of ψ" if j == 0 else None)
                    ax.set_xlim(limits[0])
                    ax.set_ylim(limits[1])  # a wide interval must not squash the points
                c = "2" if tag == "c2" else "e"
                ax.set(xlabel=f"flatness F_i (c = {c})", title=f"{title}, step {step}")
                ax.legend(fontsize=7, loc="best")
            axes[0].set_ylabel("variance σ_i²")
            written.append(save_figure(fig, plt, directory, f"{prefix}_step_{step:09d}.png"))
        return written

    return plot


def plot_profile(directory: str, steps) -> list[str]:
    """Mean profile over directions (band: min to max) per checkpoint, train and test."""
    loaded = load_step_artifacts(directory, steps)
    if not loaded:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = plt.cm.viridis(np.linspace(0, 1, len(loaded)))
    for (step, a), color in zip(loaded, colors):
        for ax, key in zip(axes, ("train_losses", "test_losses")):
            ax.plot(a["alphas"], a[key].mean(0), color=color, label=f"step {step}")
            ax.fill_between(a["alphas"], a[key].min(0), a[key].max(0), color=color, alpha=0.2)
    objective = json.loads(str(loaded[-1][1]["settings"]))["objective"]
    axes[0].set(xlabel="α (filter-normalised)", ylabel=f"{objective} (train)", title="train")
    axes[1].set(xlabel="α (filter-normalised)", ylabel="R_S (test)", title="test")
    axes[1].legend(fontsize=8)
    return [save_figure(fig, plt, directory, "profile.png")]


register("flatness", plot_fn=_plot_flatness_kind("flatness", "random gradient data"))(flatness)
register("trajectory_flatness", plot_fn=_plot_flatness_kind("trajectory_flatness", "random trajectory data"))(trajectory_flatness)
register("profile", plot_fn=plot_profile)(profile)
