"""Pure training steps for dropout GD/SGD and the regularised objectives.

One step for one replica, at step N:

    batch  = data[batch_indices(key(seed, DATA, replica), N)]   (or the full set: dropout GD)
    masks  = sample_masks(key(seed, DROPOUT, N, replica))       (per_sample: one per example)
    theta <- optimizer(theta, grad objective(theta; batch, masks))

Every key is a function of (seed, replica, stream, N) only, so a run is the same
whether it is executed in one chunk or many, and resuming needs no RNG state.
Replicas are a leading axis added by `jax.vmap` in `make_train_step`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from sme import rng
from sme.data import batch_indices
from sme.dropout import sample_masks
from sme.models import Model


def make_replica_step(model: Model, objective_fn: Callable, optimizer: optax.GradientTransformation, *,
                      seed: int, batch_size: int, mask_mode: str):
    """Return ``step(params, opt_state, step, replica, x, y) -> (params, opt_state, loss)`` for one replica.

    ``x, y`` are the full training arrays; the step draws its own minibatch when
    ``batch_size < len(x)``. Cost: one gradient of the objective on B examples.
    """

    def replica_step(params, opt_state, step, replica, x, y):
        num_examples = x.shape[0]
        if batch_size < num_examples:
            idx = batch_indices(rng.stream_key(seed, rng.DATA, replica=replica), step,
                                num_examples=num_examples, batch_size=batch_size)
            x, y = x[idx], y[idx]
        mask_key = rng.step_key(seed, rng.DROPOUT, step, replica=replica)
        shape = (batch_size,) if mask_mode == "per_sample" else ()
        masks = sample_masks(model.sites, key=mask_key, batch_shape=shape, dtype=x.dtype)
        loss, grads = jax.value_and_grad(objective_fn)(params, x, y, masks)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return replica_step


def make_train_step(replica_step):
    """Vmap a replica step over the leading replica axis of params and opt_state."""
    batched = jax.vmap(replica_step, in_axes=(0, 0, None, 0, None, None))

    def train_step(params, opt_state, step, x, y):
        num_replicas = jax.tree_util.tree_leaves(params)[0].shape[0]
        return batched(params, opt_state, step, jnp.arange(num_replicas), x, y)

    return train_step


def make_advance(train_step):
    """Return ``advance(state, num_steps, x, y) -> (state, first_bad_step)``.

    Runs ``num_steps`` steps in one `lax.fori_loop` whose trip count is a traced
    value, so one compilation serves chunks of any length. Each step's training
    losses (R,) are added to ``state.loss_sum``; ``first_bad_step`` is the first
    step whose loss was non-finite in any replica, or -1.
    """
    from sme.train.state import TrainState

    def advance(state: TrainState, num_steps, x, y):
        def body(_, carry):
            state, bad = carry
            params, opt_state, loss = train_step(state.params, state.opt_state, state.step, x, y)
            finite = jnp.all(jnp.isfinite(loss))
            bad = jnp.where((bad < 0) & ~finite, state.step, bad)
            return TrainState(state.step + 1, params, opt_state, state.loss_sum + loss), bad

        return jax.lax.fori_loop(0, num_steps, body, (state, jnp.asarray(-1, jnp.int32)))

    return advance
