"""Pure training steps for dropout GD/SGD and the regularised objectives.

One step for one replica, at step N:

    batch  = data[batch_indices(key(seed, DATA, replica), N)]   (or the full set: dropout GD)
    masks  = sample_masks(key(seed, DROPOUT, N, replica))       (per_sample: one per example)
    theta <- optimizer(theta, grad objective(theta; batch, masks))

Every key is a function of (seed, replica, stream, N) only, so a run is the same
whether it is executed in one chunk or many, and resuming needs no RNG state.
Replicas are a leading axis added by `jax.vmap` in `make_train_step`.

Minibatch order: an epoch's permutation of n examples costs far more than a small
model's step (a sort of n keys), so `make_advance` given a `Sampler` draws it once
per epoch, carries it through its loop and slices each step's batch from it. The
indices are the same as `batch_indices(key, N)` computes alone, so both paths give
bit-identical runs (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from sme import rng
from sme.data import batch_from_permutation, batch_indices, epoch_permutation
from sme.dropout import mask_shape, sample_masks
from sme.models import Model


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Minibatch sampling of every replica: epochs without replacement keyed by (seed, DATA, replica)."""

    seed: int
    batch_size: int

    def permutations(self, step, num_replicas: int, num_examples: int) -> jax.Array:
        """The (num_replicas, n) permutations of the epoch that contains ``step``."""
        epoch = step // (num_examples // self.batch_size)
        keys = jax.vmap(lambda r: rng.stream_key(self.seed, rng.DATA, replica=r))(jnp.arange(num_replicas))
        return jax.vmap(lambda k: epoch_permutation(k, epoch, num_examples))(keys)


def make_replica_step(model: Model, objective_fn: Callable, optimizer: optax.GradientTransformation, *,
                      seed: int, batch_size: int, mask_mode: str):
    """Return ``step(params, opt_state, step, replica, x, y, perm=None) -> (params, opt_state, loss)``.

    ``x, y`` are the full training arrays; the step takes its minibatch when
    ``batch_size < len(x)``: from ``perm``, this replica's permutation of the
    current epoch, when given, else by drawing it (`batch_indices`). Cost: one
    gradient of the objective on B examples.
    """

    def replica_step(params, opt_state, step, replica, x, y, perm=None):
        num_examples = x.shape[0]
        if batch_size < num_examples:
            if perm is None:
                idx = batch_indices(rng.stream_key(seed, rng.DATA, replica=replica), step,
                                    num_examples=num_examples, batch_size=batch_size)
            else:
                idx = batch_from_permutation(perm, step, batch_size=batch_size)
            x, y = x[idx], y[idx]
        mask_key = rng.step_key(seed, rng.DROPOUT, step, replica=replica)
        shape = mask_shape(mask_mode, batch_size)
        masks = sample_masks(model.sites, key=mask_key, batch_shape=shape, dtype=x.dtype)
        loss, grads = jax.value_and_grad(objective_fn)(params, x, y, masks)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return replica_step


def make_train_step(replica_step):
    """Vmap a replica step over the leading replica axis of params and opt_state."""
    batched = jax.vmap(replica_step, in_axes=(0, 0, None, 0, None, None, 0))

    def train_step(params, opt_state, step, x, y, perms=None):
        """``perms``: (R, n) epoch permutations (see `Sampler`), or None to draw them per step."""
        num_replicas = jax.tree_util.tree_leaves(params)[0].shape[0]
        return batched(params, opt_state, step, jnp.arange(num_replicas), x, y, perms)

    return train_step


def make_advance(train_step, sampler: Sampler | None = None):
    """Return ``advance(state, num_steps, x, y) -> (state, first_bad_step)``.

    Runs ``num_steps`` steps in one `lax.fori_loop` whose trip count is a traced
    value, so one compilation serves chunks of any length. Each step's training
    losses (R,) are added to ``state.loss_sum``; ``first_bad_step`` is the first
    step whose loss was non-finite in any replica, or -1. With a ``sampler`` (and
    minibatches), the epoch permutations (R, n) are drawn once per epoch and
    carried through the loop; without one, every step draws its own.
    """
    from sme.train.state import TrainState

    def advance(state: TrainState, num_steps, x, y):
        num_examples = x.shape[0]
        minibatch = sampler is not None and sampler.batch_size < num_examples
        num_replicas = state.loss_sum.shape[0]
        draw = lambda step: sampler.permutations(step, num_replicas, num_examples)  # noqa: E731
        steps_per_epoch = num_examples // sampler.batch_size if minibatch else 1

        def body(_, carry):
            state, bad, perms = carry
            if minibatch:  # a new epoch starts: draw its permutations (the first chunk's are drawn below)
                perms = jax.lax.cond(state.step % steps_per_epoch == 0, draw, lambda _: perms, state.step)
            params, opt_state, loss = train_step(state.params, state.opt_state, state.step, x, y, perms)
            finite = jnp.all(jnp.isfinite(loss))
            bad = jnp.where((bad < 0) & ~finite, state.step, bad)
            return TrainState(state.step + 1, params, opt_state, state.loss_sum + loss), bad, perms

        perms = draw(state.step) if minibatch else None
        state, bad, _ = jax.lax.fori_loop(0, num_steps, body, (state, jnp.asarray(-1, jnp.int32), perms))
        return state, bad

    return advance
