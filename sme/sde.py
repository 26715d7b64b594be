"""Stochastic modified equations of dropout: drifts, Euler-Maruyama, dropout-SVAG.

Dropout GD, theta_{N+1} = theta_N - eps grad R^drop_S(theta_N; eta_N), is approximated in the weak
sense by (Li, Tai & E, JMLR 2019; arXiv 2305.15850 §4;
docs/theory.md, "The SME orders and the ODE control")

    order 1:  dTheta = -grad L_S dt + sqrt(eps) Sigma^{1/2} dW,
    order 2:  dTheta = -grad [L_S + (eps/4) ||grad L_S||^2] dt + sqrt(eps) Sigma^{1/2} dW,
    r2:       dTheta = -grad [L_S + (eps/4) E_eta ||grad R^drop_S(theta; eta)||^2] dt + ...,

with grad ||grad L_S||^2 = 2 H grad L_S (one HVP) and E||grad R^drop||^2 = ||grad L_S||^2 + Tr Sigma;
which eps-correction the paper's order-2 equation carries is not recoverable from the sources,
so both are here. L_S = E_eta R^drop_S is ``closed_form`` (R_S + R_1: MSE, readout-only dropout),
``exact`` (enumerating all masks) or ``masks`` (the mean over the substep's K masks).

Conventions: SME time t = N eps; Euler-Maruyama substep h = eps / l with l substeps per discrete
step; an SDE dTheta = b dt + sqrt(scale) sigma dW is stepped as

    Theta <- Theta + h b(Theta) + sqrt(scale h) sigma(Theta) xi,   xi ~ N(0, I),

(scale = eps for the SME), where sigma xi is a `sme.diffusion` sample (covariances over K masks
divide by K - 1). Dropout-SVAG(l) (Li, Malladi & Arora, NeurIPS 2021, adapted to masks): l steps of
size eps/l with g = c+ g(eta^1) + c- g(eta^2), c+- = (1 +- sqrt(2l - 1))/2: mean grad L_S, covariance
l Sigma; it tends weakly to the order-1 SME as l -> infinity without ever forming Sigma.

Every function is pure in (state, noise) or (state, key); iterations are `lax.scan`. Brownian
increments at discrete step N, substep j come from `substep_key(key, N, j, tag=...)`, where ``key``
is replica r's SDE stream key K(seed, SDE, r) (`sme.rng`): a function of (seed, SDE stream, N, j,
replica) only.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sme import losses, rng
from sme.diffusion import (MAX_ENUMERATED_UNITS, Problem, check_diffusion, closed_form_trace, diffusion_sample,
                           enumerated_law, loss_table, mask_risks, mask_weights, noise_potential,
                           sample_noise)
from sme.dropout import sample_masks

DRIFTS = ("order1", "order2", "r2")
LOSS_ESTIMATORS = ("closed_form", "exact", "masks")
TRACES = ("sample", "exact")

_tmap = jax.tree_util.tree_map


def _axpy(a, x, y):
    """a x + y for pytrees (a a scalar)."""
    return _tmap(lambda u, v: a * u + v, x, y)


class SDE(NamedTuple):
    """dTheta = drift(Theta, xi) dt + sqrt(scale) diffusion(Theta, xi) dW.

    ``drift(params, noise)`` (the noise lets a Monte Carlo drift share the substep's masks; exact
    drifts ignore it), ``diffusion(params, noise)`` is sigma(Theta) xi with Cov = sigma sigma^T,
    and ``sample_noise(key)`` draws one substep's noise pytree. ``increment``, when given, computes
    the whole substep increment at once (the SME's is one gradient, see `make_sme`); it must equal
    h drift + sqrt(scale h) diffusion.
    """

    drift: Callable[[Any, Any], Any]
    diffusion: Callable[[Any, Any], Any]
    sample_noise: Callable[[jax.Array], Any]
    scale: Any
    increment: Callable[[Any, Any, Any], Any] | None = None  # (params, noise, h) -> h b + sqrt(scale h) sigma xi


# --- Euler-Maruyama -----------------------------------------------------------------------------


def em_step(sde: SDE, params, noise, *, h):
    """One Euler-Maruyama substep Theta + h b + sqrt(scale h) sigma xi. Cost: one drift + one diffusion
    (or one `SDE.increment`)."""
    if sde.increment is not None:
        return _tmap(jnp.add, params, sde.increment(params, noise, h))
    step = _axpy(h, sde.drift(params, noise), params)
    return _axpy(jnp.sqrt(sde.scale * h), sde.diffusion(params, noise), step)


def em_scan(sde: SDE, params, noises, *, h):
    """Euler-Maruyama over the substeps whose noises are stacked on a leading axis; returns the end point."""
    return jax.lax.scan(lambda p, xi: (em_step(sde, p, xi, h=h), None), params, noises)[0]


def em_integrate(sde: SDE, params, *, key, num_steps: int, h, path: bool = False):
    """``num_steps`` substeps, noise k drawn from ``fold_in(key, k)``.

    Returns:
      The end point, or with ``path`` the (num_steps + 1)-long trajectory (leading axis).
    """

    def body(p, k):
        new = em_step(sde, p, sde.sample_noise(jax.random.fold_in(key, k)), h=h)
        return new, (new if path else None)

    end, traj = jax.lax.scan(body, params, jnp.arange(num_steps))
    if not path:
        return end
    return _tmap(lambda a, b: jnp.concatenate([a[None], b]), params, traj)


def coarsen(noises, factor: int):
    """Standard Gaussian noises of ``factor`` consecutive substeps combined into one coarse substep:
    (xi_1 + ... + xi_f)/sqrt(f), so both grids follow ONE Brownian path. Leading axis L -> L / f."""
    def one(a):
        return a.reshape(a.shape[0] // factor, factor, *a.shape[1:]).sum(1) / jnp.sqrt(jnp.asarray(factor, a.dtype))

    return _tmap(one, noises)


def bridge(total: jax.Array, xis: jax.Array) -> jax.Array:
    """L iid N(0, 1) substep noises whose sum is pinned to sqrt(L) * total (a Brownian bridge).

    zeta_j = total / sqrt(L) + (xi_j - mean xi): each N(0, 1), pairwise uncorrelated, and
    sum_j zeta_j = sqrt(L) total. (L, ...) -> (L, ...).
    """
    num = xis.shape[0]
    return total[None] / jnp.sqrt(jnp.asarray(num, xis.dtype)) + xis - jnp.mean(xis, axis=0, keepdims=True)


def substep_key(key: jax.Array, step, substep, *, tag: int = 0) -> jax.Array:
    """Key of the Brownian increment at discrete step N, substep j: fold_in(fold_in(fold_in(key, N), tag), j)
    with ``key`` one replica's SDE stream key (`sme.rng.replica_keys`; step and substep may be traced;
    ``tag`` separates processes that must not share noise)."""
    return jax.random.fold_in(jax.random.fold_in(rng.at_step(key, step), tag), substep)


# --- The dropout SME ----------------------------------------------------------------------------


def check_estimator(problem: Problem, estimator: str, *, max_units: int = MAX_ENUMERATED_UNITS) -> None:
    """Raise ValueError (saying why) unless L_S can be computed by `estimator` here."""
    if estimator not in LOSS_ESTIMATORS:
        raise ValueError(f"unknown loss estimator {estimator!r}; expected one of {LOSS_ESTIMATORS}")
    if estimator == "closed_form":
        losses.check_closed_form(problem.model, problem.loss)
    if estimator == "exact":
        check_diffusion(problem, problem.loss, "exact", max_units=max_units)


def modified_loss(problem: Problem, estimator: str, params, noise=None) -> jax.Array:
    """L_S(theta) by `estimator`; ``masks`` averages R^drop over ``noise['masks']``. Cost: E or K forwards."""
    model, x, y = problem.model, problem.x, problem.y
    if estimator == "closed_form":
        return losses.modified_loss(model, problem.loss, params, x, y)
    if estimator == "exact":
        masks, probs, _ = enumerated_law(model.sites, x.dtype)
        return probs @ jnp.mean(loss_table(problem, params, masks), axis=1)
    if estimator == "masks":
        return jnp.mean(mask_risks(problem, params, noise["masks"]))
    raise ValueError(f"unknown loss estimator {estimator!r}; expected one of {LOSS_ESTIMATORS}")


def expected_sq_grad_norm(problem: Problem, estimator: str, params, noise=None) -> jax.Array:
    """E_eta ||grad R^drop_S(theta; eta)||^2 = ||grad L_S||^2 + Tr Sigma.

    ``masks``: the mean over the noise's K masks (unbiased); ``closed_form``: ||grad L_S||^2 plus the
    closed-form Tr Sigma (`sme.diffusion.closed_form_trace`); ``exact``: enumeration (shared:
    sum_e P_e ||g_e||^2; per_sample: ||grad L_S||^2 + (1/n^2) sum_i Tr Cov_eta(grad l_i)).
    Cost: K gradients; m(m + 1)/2 VJPs; or E (x n for per_sample) gradients.
    """
    model, x, y = problem.model, problem.x, problem.y
    sq = lambda tree: sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(tree))
    if estimator == "masks":
        grad = jax.grad(lambda p, m: losses.dropout_risk(model, problem.loss, p, x, y, m, mode=problem.mode))
        return jnp.mean(jax.vmap(lambda m: sq(grad(params, m)))(noise["masks"]))
    if estimator == "closed_form":
        grad_l = jax.grad(lambda p: losses.modified_loss(model, problem.loss, p, x, y))(params)
        return sq(grad_l) + closed_form_trace(problem, params)
    masks, probs, _ = enumerated_law(model.sites, x.dtype)
    if problem.mode == "shared":
        grad = jax.grad(lambda p, m: losses.dropout_risk(model, problem.loss, p, x, y, m, mode="shared"))
        return probs @ jax.vmap(lambda m: sq(grad(params, m)))(masks)
    n = problem.num_examples
    lf = losses.loss_fn(problem.loss)
    per = jax.grad(lambda p, xi, yi, m: lf(model.apply(p, xi, m), yi))
    table = jax.vmap(lambda m: jax.vmap(lambda xi, yi: ravel_pytree(per(params, xi, yi, m))[0])(
        x, y))(masks)  # (E, n, P)
    mean_i = jnp.einsum("e,eip->ip", probs, table)
    within = jnp.einsum("e,eip->", probs, table**2) - jnp.sum(mean_i**2)
    grad_l = jax.grad(lambda p: modified_loss(problem, "exact", p))(params)
    return sq(grad_l) + within / n**2


class Drift(NamedTuple):
    """Which SME drift, and how `drift_potential` estimates its parts."""

    kind: str  # order1 | order2 | r2 (`DRIFTS`)
    estimator: str  # L_S: closed_form | exact | masks (`LOSS_ESTIMATORS`)
    diffusion: str = ""  # the diffusion sampler whose noise r2's sample trace uses
    trace: str = "exact"  # r2's Tr Sigma: exact | sample (`TRACES`)


def drift_potential(problem: Problem, drift: Drift, params, noise, *, lr) -> jax.Array:
    """U(theta) with SME drift b = -grad U: order1 L_S; order2 L_S + (eps/4)||grad L_S||^2; r2
    L_S + (eps/4)(||grad L_S||^2 + Tr Sigma), for ``drift.kind``, with L_S by ``drift.estimator``.

    r2's Tr Sigma: ``drift.trace='exact'`` by the estimator (`expected_sq_grad_norm`); ``'sample'``
    the unbiased one-sample estimate ||sigma(theta) xi||^2, xi the substep's own noise of the
    ``drift.diffusion`` sampler (E_xi ||sigma xi||^2 = Tr Sigma; grad ||sigma xi||^2 is uncorrelated with
    the diffusion increment sigma xi because odd Gaussian moments vanish, and its mean-zero O(eps)
    fluctuation enters the weak error at O(eps^2 h) only).
    Cost: L_S; its gradient differentiated once more (~ one HVP) for order2; plus Tr Sigma for r2.
    """
    kind, estimator, diffusion, trace = drift
    loss = lambda p: modified_loss(problem, estimator, p, noise)
    if kind == "order1":
        return loss(params)
    if kind not in ("order2", "r2"):
        raise ValueError(f"unknown drift {kind!r}; expected one of {DRIFTS}")
    value, grad = jax.value_and_grad(loss)(params)
    potential = value + 0.25 * lr * _sq(grad)  # grad of (1/2)||grad L_S||^2 is H grad L_S
    if kind == "order2":
        return potential
    if trace == "sample":
        return potential + 0.25 * lr * _sq(diffusion_sample(problem, diffusion, params, noise))
    if trace == "exact":
        return potential + 0.25 * lr * (expected_sq_grad_norm(problem, estimator, params, noise) - _sq(grad))
    raise ValueError(f"unknown trace estimate {trace!r}; expected one of {TRACES}")


def sme_drift(problem: Problem, drift: Drift, params, noise, *, lr):
    """The SME drift b = -grad U of `drift_potential` (order1 | order2 | r2). Cost: one gradient of U."""
    grad = jax.grad(lambda p: drift_potential(problem, drift, p, noise, lr=lr))(params)
    return _tmap(jnp.negative, grad)


def _sq(tree) -> jax.Array:
    return sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(tree))


def make_sme(problem: Problem, *, drift: str, diffusion: str, estimator: str, lr, num_masks: int = 16,
             trace: str = "sample") -> SDE:
    """The dropout SME as an `SDE` (scale = eps = lr; ``lr`` may be traced). ``trace``: how the r2
    drift gets Tr Sigma (`drift_potential`).

    Its ``increment`` is one gradient, grad_theta [-h U(theta) + sqrt(eps h) Phi(theta)], with U the
    `drift_potential` and Phi the `sme.diffusion.noise_potential` (gradient sigma xi): the forward
    passes of drift and diffusion are shared. Cost per substep: one backward pass through U and Phi.
    """
    if drift not in DRIFTS:
        raise ValueError(f"unknown drift {drift!r}; expected one of {DRIFTS}")
    with_masks = estimator == "masks"
    spec = Drift(drift, estimator, diffusion, trace)
    potential = lambda p, xi: drift_potential(problem, spec, p, xi, lr=lr)

    def increment(params, xi, h):
        root = jnp.sqrt(lr * h)
        if drift == "order1" and with_masks and diffusion == "masks":  # one backward pass through the K masks
            w = root * mask_weights(xi["z"]) - h / xi["z"].shape[0]
            return jax.grad(lambda p: jnp.dot(w, mask_risks(problem, p, xi["masks"])))(params)
        return jax.grad(lambda p: root * noise_potential(problem, diffusion, p, xi) - h * potential(p, xi))(params)

    return SDE(
        drift=lambda p, xi: _tmap(jnp.negative, jax.grad(potential)(p, xi)),
        diffusion=lambda p, xi: diffusion_sample(problem, diffusion, p, xi),
        sample_noise=lambda key: sample_noise(problem, diffusion, key=key, num_masks=num_masks,
                                              with_masks=with_masks),
        scale=lr,
        increment=increment,
    )


def make_ode(problem: Problem, *, drift: str, diffusion: str, estimator: str, lr, num_masks: int = 16) -> SDE:
    """The no-diffusion control dTheta = b(Theta) dt with the SME's `drift` (order1 | order2) and
    Sigma = 0 (docs/theory.md, "The SME orders and the ODE control"). It draws the same substep
    noise as the SME (a ``masks`` drift uses its masks; the Gaussian parts are ignored), so it runs
    in the lockstep beside the SDEs on a shared noise stream. Cost per substep: one gradient of U.
    """
    if drift not in ("order1", "order2"):
        raise ValueError(f"the ODE control takes the order1 or order2 drift, not {drift!r}")
    with_masks = estimator == "masks"
    spec = Drift(drift, estimator, diffusion)
    potential = lambda p, xi: drift_potential(problem, spec, p, xi, lr=lr)
    neg_grad = lambda p, xi: _tmap(jnp.negative, jax.grad(potential)(p, xi))
    return SDE(
        drift=neg_grad,
        diffusion=lambda p, xi: _tmap(jnp.zeros_like, p),
        sample_noise=lambda key: sample_noise(problem, diffusion, key=key, num_masks=num_masks,
                                              with_masks=with_masks),
        scale=0.0,
        increment=lambda p, xi, h: _tmap(lambda g: h * g, neg_grad(p, xi)),
    )


def gaussian_only(diffusion: str, estimator: str) -> bool:
    """True when a substep's noise is purely Gaussian (no masks), so grids can be nested (`coarsen`)."""
    return diffusion != "masks" and estimator != "masks"


# --- Discrete processes: dropout GD and dropout-SVAG --------------------------------------------


def dropout_gd_step(problem: Problem, params, masks, *, lr):
    """theta - eps grad R^drop_S(theta; eta). Cost: one gradient."""
    grad = jax.grad(losses.dropout_risk, argnums=2)(problem.model, problem.loss, params, problem.x, problem.y,
                                                     masks, mode=problem.mode)
    return _axpy(-lr, grad, params)


def svag_coefficients(substeps: int) -> tuple[float, float]:
    """(c+, c-) = ((1 + sqrt(2l - 1))/2, (1 - sqrt(2l - 1))/2): c+ + c- = 1, c+^2 + c-^2 = l."""
    root = (2.0 * substeps - 1.0) ** 0.5
    return (1.0 + root) / 2.0, (1.0 - root) / 2.0


def svag_gradient(problem: Problem, params, masks_pair, *, substeps: int):
    """c+ grad R^drop(theta; eta^1) + c- grad R^drop(theta; eta^2); masks_pair has a leading axis 2.
    Mean grad L_S, covariance l Sigma. Cost: one backward pass over two forward passes."""
    c = jnp.asarray(svag_coefficients(substeps), problem.x.dtype)
    risks = lambda p: jax.vmap(lambda m: losses.dropout_risk(problem.model, problem.loss, p, problem.x, problem.y,
                                                             m, mode=problem.mode))(masks_pair)
    return jax.grad(lambda p: jnp.dot(c, risks(p)))(params)


def svag_masks(problem: Problem, *, key):
    """The two independent mask sets of one SVAG substep (leading axis 2)."""
    shape = () if problem.mode == "shared" else (problem.num_examples,)
    return jax.vmap(lambda k: sample_masks(problem.model.sites, key=k, batch_shape=shape, dtype=problem.x.dtype))(
        jax.random.split(key, 2))


def svag_step(problem: Problem, params, *, key, lr, substeps: int):
    """One discrete step of dropout-SVAG(l): l substeps of size eps/l, substep j from ``fold_in(key, j)``."""

    def body(p, j):
        pair = svag_masks(problem, key=jax.random.fold_in(key, j))
        return _axpy(-lr / substeps, svag_gradient(problem, p, pair, substeps=substeps), p), None

    return jax.lax.scan(body, params, jnp.arange(substeps))[0]

