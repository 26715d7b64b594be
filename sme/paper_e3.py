"""P-E3's analysis: Feng & Tu's inverse variance-flatness relation on one weight block.

Feng & Tu (PNAS 2021) take the 2,500 weights between the two hidden layers of 784-50-50-10
over a late-training window, run PCA on them, measure the interval flatness F_i of the loss
along each principal direction (the other weights held at theta*), and fit
sigma_i^2 ~ F_i^(-psi). `analyse_block` does this on a run's snapshots.npz (all weights every
k steps; the block's columns are cut out), with the library's `sme.landscape` functions: PCA,
`trend_fraction` for drift modes, `flatness_along` (bracketing and bisection), and
`variance_flatness_fit` (pairs-bootstrap interval). It also fits the spectrum decay
sigma_i^2 ~ i^(-a) over PCs 2..K. The result is cached as
``<workdir>/analysis/paper_e3/result.npz`` keyed by its settings.

Cost: one PCA of S x 2,500 (Gram route when S < 2,500) plus
2 factors x K directions x (2 x (log2(max_distance / init_step) + 2 + num_bisect)) losses of R_S
on ``num_examples`` images, vmapped.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sme import config as config_lib
from sme import io, landscape, losses, stats

RESULT = os.path.join("analysis", "paper_e3", "result.npz")


def block_mask(params, path) -> np.ndarray:
    """(P,) bool: which entries of ravel_pytree(params) belong to the leaf at ``path`` (keys / indices)."""
    marked = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, bool), params)
    node = marked
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = np.ones(node[path[-1]].shape, bool)
    return np.asarray(ravel_pytree(jax.tree_util.tree_map(lambda a: a.astype(np.float32), marked))[0]) > 0.5


def fits(variances, widths, capped, trend, settings) -> dict:
    """psi for every (PC range, max_trend, factor) of the sensitivity grid; NaN where < 3 points."""
    out = {}
    for k in settings["sensitivity_components"]:
        k_eff = min(k, len(variances))
        for max_trend in settings["sensitivity_trend"]:
            for f, factor in enumerate(settings["factors"]):
                valid = (~capped[f, :k_eff]) & (trend[:k_eff] <= max_trend)
                try:
                    fit = landscape.variance_flatness_fit(variances[:k_eff], widths[f, :k_eff],
                                                          num_excluded=settings["num_excluded"], valid=valid,
                                                          num_boot=settings["num_boot"])
                    row = dict(psi=fit.psi, low=fit.psi_low, high=fit.psi_high, spearman=fit.spearman,
                               points=fit.num_points)
                except ValueError:
                    row = dict(psi=math.nan, low=math.nan, high=math.nan, spearman=math.nan, points=0)
                out[(k, max_trend, round(float(factor), 4))] = row
    return out


def analyse_block(workdir: str, settings: dict, *, block=("hidden", 1, "w")) -> dict:
    """Run (or load the cached) block analysis of ``workdir``; returns the arrays and the fit grid."""
    settings = dict(settings, factors=(2.0, math.e))
    key = json.dumps({k: v for k, v in sorted(settings.items())}, default=str)
    path = os.path.join(workdir, RESULT)
    if os.path.exists(path):
        cached = io.load_arrays(path)
        if str(cached["settings"]) == key:
            return _with_fits(cached, settings)
    from sme.analyses.runner import read_config

    cfg = read_config(workdir)
    setup = config_lib.build(cfg)
    snaps = io.load_arrays(os.path.join(workdir, "snapshots.npz"))
    rows_all = np.asarray(snaps["params"][0], np.float32)  # replica 0: (S, P)
    like = setup.model.init(jax.random.PRNGKey(0))
    flat0, unravel = ravel_pytree(like)
    if rows_all.shape[1] != flat0.shape[0]:
        raise ValueError(f"{workdir}: snapshots have {rows_all.shape[1]} weights, the model {flat0.shape[0]}")
    mask = block_mask(like, block)
    rows = jnp.asarray(rows_all[:, mask])
    reference_full = jnp.asarray(rows_all[-1])  # theta* = the last snapshot
    index = jnp.asarray(np.flatnonzero(mask))
    n = settings["num_examples"] or setup.dataset.num_train
    x = jnp.asarray(setup.dataset.x_train[:n])
    y = jnp.asarray(setup.dataset.y_train[:n])
    model, loss_name = setup.model, cfg.loss

    k = min(settings["num_components"], rows.shape[0] - 1, rows.shape[1])
    pca = landscape.pca(rows, num_components=None)
    directions = pca.directions[:k]
    search = landscape.BracketSearch(settings["init_step"], settings["max_distance"], settings["num_bisect"])

    @jax.jit
    def flatness(full, ref, d, x, y):
        def block_loss(b):  # R_S with the block replaced, every other weight at theta*
            return losses.risk(model, loss_name, unravel(full.at[index].set(b)), x, y)

        return landscape.flatness_along(block_loss, ref, d, factors=settings["factors"], search=search)

    flat = flatness(reference_full, rows[-1], directions, x, y)
    degree = min(settings["trend_degree"], rows.shape[0] - 2)
    trend = landscape.trend_fraction(rows, directions, degree=degree)
    arrays = dict(variances=np.asarray(pca.variances), width=np.asarray(flat.width), capped=np.asarray(flat.capped),
                  trend=np.asarray(trend), loss=np.asarray(flat.loss), num_snapshots=np.asarray(rows.shape[0]),
                  block_size=np.asarray(rows.shape[1]), settings=np.asarray(key))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    io.save_arrays(path, arrays)
    return _with_fits(arrays, settings)


def _with_fits(arrays: dict, settings: dict) -> dict:
    variances = np.asarray(arrays["variances"], np.float64)
    width, capped = np.asarray(arrays["width"], np.float64), np.asarray(arrays["capped"], bool)
    trend = np.asarray(arrays["trend"], np.float64)
    k = width.shape[1]
    out = dict(arrays, fits=fits(variances[:k], width, capped, trend, settings))
    i = np.arange(1, len(variances) + 1)
    top = slice(1, min(settings["num_components"], len(variances)))  # PCs 2..K
    try:
        decay = stats.fit_loglog(i[top], variances[top], num_boot=settings["num_boot"])
        out["decay"] = dict(exponent=-decay.slope, low=-decay.ci_high, high=-decay.ci_low)
    except ValueError:
        out["decay"] = dict(exponent=math.nan, low=math.nan, high=math.nan)
    return out
