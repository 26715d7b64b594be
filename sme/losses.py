"""Per-example losses, the empirical risks, and the dropout-modified losses.

Conventions: losses are MEANS over examples; MSE carries the ½,
l(f, y) = ½ ||f - y||² (summed over outputs); cross-entropy is
-sum_k y_k log softmax(f)_k with one-hot y.

* R_S(theta) = (1/n) sum_i l(f_theta(x_i; 1), y_i)                  (no dropout)
* R^drop_S(theta; eta) = (1/n) sum_i l(f_theta(x_i; eta_i), y_i)    (one mask draw)
* L_S(theta) = E_eta R^drop_S(theta; eta): exact by enumeration, Monte Carlo over
  K masks, or for MSE with dropout only on the readout input (arXiv 2207.05952,
  Lemma 1) in closed form  L_S = R_S + R_1,
  R_1 = ((1 - p) / (2 n p)) sum_i sum_j ||W^[L]_{j,:}||² h_j(x_i)².
* R_2 penalty: (eps/4) ||grad R^drop_S(theta; eta)||² for the drawn mask; its
  mask average is (eps/4)(||grad L_S||² + Tr Sigma).
* Diagnostic objectives (docs/theory.md, "L_S and R_1"): L_1 = R_S + R_1,
  L_2 = R_S + (eps/4)||grad R^drop||², L_3 = R^drop - (eps/4)||grad R^drop||²,
  L_4 = R^drop - R_1.
* drop_r2 = R^drop_S + (lambda/4)||grad R^drop_S||² (2207.05952 Fig. 14a), lambda =
  config.penalty_lr when set, else eps (`penalty_coefficient`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sme.dropout import check_mode, enumerate_masks, ones_masks
from sme.models import Model, batch_apply
from sme.problem import Problem, accepts_problem, check_closed_form, takes_problem, tree_sq_norm

LOSS_NAMES = ("mse", "cross_entropy")
# name -> (uses masks, needs the closed-form R_1, needs the R_2 gradient penalty)
OBJECTIVES = {
    "r_s": (False, False, False),
    "dropout": (True, False, False),
    "l1": (False, True, False),
    "l2": (True, False, True),
    "l3": (True, False, True),
    "l4": (True, True, False),
    "l1_r2": (True, True, True),
    "drop_r2": (True, False, True),
}


def mse(out: jax.Array, y: jax.Array) -> jax.Array:
    """½ ||out - y||² for one example."""
    return 0.5 * jnp.sum((out - y) ** 2)


def cross_entropy(out: jax.Array, y: jax.Array) -> jax.Array:
    """-sum_k y_k log softmax(out)_k for one example (y one-hot or a distribution)."""
    return -jnp.sum(y * jax.nn.log_softmax(out))


def loss_fn(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    if name == "mse":
        return mse
    if name == "cross_entropy":
        return cross_entropy
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSS_NAMES}")


def accuracy(out: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of argmax agreements over a batch (classification only)."""
    return jnp.mean(jnp.argmax(out, -1) == jnp.argmax(y, -1))


@accepts_problem
def dropout_risk(model: Model, loss: str, params, x, y, masks, *, mode: str) -> jax.Array:
    """R^drop_S(theta; eta): mean loss with masks shared (one set) or per_sample (leading n)."""
    out = batch_apply(model, params, x, masks, mode=check_mode(mode))
    return jnp.mean(jax.vmap(loss_fn(loss))(out, y))


@accepts_problem
def risk(model: Model, loss: str, params, x, y) -> jax.Array:
    """R_S(theta): the deterministic network's mean loss."""
    masks = ones_masks(model.sites, dtype=x.dtype)
    return dropout_risk(model, loss, params, x, y, masks, mode="shared")


def r1(model: Model, params, x) -> jax.Array:
    """R_1 = ((1 - p)/(2 n p)) sum_i sum_j ||W_{j,:}||² h_j(x_i)²; needs `check_closed_form`."""
    p = model.sites[-1].keep_prob
    masks = ones_masks(model.sites, dtype=x.dtype)
    h = jax.vmap(model.penultimate, in_axes=(None, 0, None))(params, x, masks)
    row_norms = jnp.sum(model.readout(params) ** 2, axis=1)
    return (1.0 - p) / (2.0 * p) * jnp.mean((h**2) @ row_norms)


@accepts_problem
def modified_loss(model: Model, loss: str, params, x, y) -> jax.Array:
    """Closed-form L_S = R_S + R_1 (MSE, last-layer dropout only)."""
    check_closed_form(model, loss)
    return risk(model, loss, params, x, y) + r1(model, params, x)


@accepts_problem
def modified_loss_mc(model: Model, loss: str, params, x, y, masks, *, mode: str) -> jax.Array:
    """Monte Carlo L_S: mean of R^drop_S over masks with a leading axis K. Cost: K forward passes."""
    per_mask = jax.vmap(lambda m: dropout_risk(model, loss, params, x, y, m, mode=mode))(masks)
    return jnp.mean(per_mask)


@accepts_problem
def modified_loss_exact(model: Model, loss: str, params, x, y) -> jax.Array:
    """Exact L_S = sum_eta P(eta) R^drop_S(theta; eta) over all 2**m shared masks (tiny nets)."""
    masks, probs = enumerate_masks(model.sites, dtype=np.dtype(x.dtype))
    per_mask = jax.vmap(lambda m: dropout_risk(model, loss, params, x, y, m, mode="shared"))(masks)
    return jnp.dot(jnp.asarray(probs, x.dtype), per_mask)


@takes_problem
def r2_penalty(problem: Problem, params, masks, *, lr: float) -> jax.Array:
    """(eps/4) ||grad_theta R^drop_S(theta; eta)||² for the given masks. Cost: one gradient.

    Also callable in the loose form ``(model, loss, params, x, y, masks, *, mode, lr)``
    (`sme.problem.takes_problem`)."""
    grads = jax.grad(dropout_risk, argnums=2)(problem.model, problem.loss, params, problem.x, problem.y, masks,
                                              mode=problem.mode)
    return lr / 4.0 * tree_sq_norm(grads)


def penalty_coefficient(cfg) -> float:
    """The coefficient in (coef/4)||grad R^drop_S||²: ``cfg.penalty_lr`` if set (>= 0), else ``cfg.optim.lr``."""
    value = float(cfg.get("penalty_lr", -1.0))
    return value if value >= 0 else float(cfg.optim.lr)


def make_objective(name: str, model: Model, loss: str, *, mode: str, lr: float):
    """The training objective `name` as ``fn(params, x, y, masks) -> scalar``.

    Names: r_s, dropout, l1, l2, l3, l4, l1_r2 (= R_S + R_1 + R_2 penalty), drop_r2; see the
    module docstring. ``lr`` is the eps (or lambda) of the R_2 penalty.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {tuple(OBJECTIVES)}")
    loss_fn(loss)
    check_mode(mode)
    _, needs_r1, _ = OBJECTIVES[name]
    if needs_r1:
        check_closed_form(model, loss)

    def drop(params, x, y, masks):
        return dropout_risk(model, loss, params, x, y, masks, mode=mode)

    def penalty(params, x, y, masks):
        return r2_penalty(Problem(model, loss, mode, x, y), params, masks, lr=lr)

    def objective(params, x, y, masks):
        if name == "r_s":
            return risk(model, loss, params, x, y)
        if name == "dropout":
            return drop(params, x, y, masks)
        if name == "l1":
            return risk(model, loss, params, x, y) + r1(model, params, x)
        if name == "l2":
            return risk(model, loss, params, x, y) + penalty(params, x, y, masks)
        if name == "drop_r2":
            return drop(params, x, y, masks) + penalty(params, x, y, masks)
        if name == "l3":
            return drop(params, x, y, masks) - penalty(params, x, y, masks)
        if name == "l4":
            return drop(params, x, y, masks) - r1(model, params, x)
        return risk(model, loss, params, x, y) + r1(model, params, x) + penalty(params, x, y, masks)

    return objective
