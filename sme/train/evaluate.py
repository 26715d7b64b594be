"""Full-dataset metrics of the deterministic network (all masks = 1), per replica.

Logged in metrics.jsonl at every evaluation step (means over replicas, plus
``*_std`` when R > 1):

  train/risk        R_S on the whole training set
  train/acc         training accuracy (classification only)
  test/risk         R_S on the test set
  test/acc          test accuracy (classification only)
  train/r1          R_1, when the closed form applies (MSE, readout-only dropout)
  train/modified_loss  L_S = R_S + R_1, same condition
  params/norm       ||theta||
  grad/norm         ||grad R_S(theta)|| on the whole training set
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sme import losses
from sme.dropout import ones_masks
from sme.models import Model
from sme.problem import has_closed_form

# Examples per chunk when evaluating: bounds activation memory on large sets.
EVAL_CHUNK = 2048


def _chunked_sum(fn, x, y):
    """sum_i fn(x_i, y_i) over the dataset in chunks of EVAL_CHUNK (lax.map)."""
    n = x.shape[0]
    per_example = jax.lax.map(lambda xy: fn(*xy), (x, y), batch_size=min(EVAL_CHUNK, n))
    return jnp.sum(per_example, axis=0)


def make_evaluate(model: Model, loss: str, *, classification: bool):
    """Return ``evaluate(params_R, x_tr, y_tr, x_te, y_te) -> dict of (R,) arrays``."""
    loss_fn = losses.loss_fn(loss)
    closed_form = has_closed_form(model, loss)

    def one(params, x_tr, y_tr, x_te, y_te):
        masks = ones_masks(model.sites, dtype=x_tr.dtype)

        def stats(x, y):
            out = model.apply(params, x, masks)
            correct = (jnp.argmax(out) == jnp.argmax(y)).astype(x.dtype)
            return jnp.stack([loss_fn(out, y), correct])

        def train_risk(p):
            f = lambda x, y: loss_fn(model.apply(p, x, masks), y)
            return _chunked_sum(f, x_tr, y_tr) / x_tr.shape[0]

        tr = _chunked_sum(stats, x_tr, y_tr) / x_tr.shape[0]
        te = _chunked_sum(stats, x_te, y_te) / x_te.shape[0]
        grads = jax.grad(train_risk)(params)
        out = {"train/risk": tr[0], "test/risk": te[0], "params/norm": optax.tree.norm(params),
               "grad/norm": optax.tree.norm(grads)}
        if classification:
            out["train/acc"], out["test/acc"] = tr[1], te[1]
        if closed_form:
            out["train/r1"] = losses.r1(model, params, x_tr)
            out["train/modified_loss"] = tr[0] + out["train/r1"]
        return out

    return jax.vmap(one, in_axes=(0, None, None, None, None))
