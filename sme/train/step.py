"""Pure training steps for dropout GD/SGD and the regularised objectives.

One step for one replica r, at step N, given the replica's stream keys
``keys = StepKeys(data=K(seed, DATA, r), dropout=K(seed, DROPOUT, r))`` (`sme.rng`):

    batch  = data[batch_indices(keys.data, N)]            (or the full set: dropout GD)
    masks  = step_masks(sites, keys.dropout, N)           (per_sample: one per example)
    theta <- optimizer(theta, grad objective(theta; batch, masks))

The keys are values: `train_keys(seed, R)` computes the (R,) stream keys once, and
the jitted step receives them as traced arguments and folds in N only (the seed is
never a constant of the compiled step). Every key is a function of (seed, replica,
stream, N) only, so a run is the same whether it is executed in one chunk or many,
and resuming needs no RNG state. Replicas are a leading axis added by `jax.vmap` in
`make_train_step`. `step_masks` is the one rule for the masks of step N: the lockstep
discrete process (`sme.lockstep`) draws its masks with it too.

Minibatch order: an epoch's permutation of n examples costs far more than a small
model's step (a sort of n keys), so `make_advance` given a `Sampler` draws it once
per epoch, carries it through its loop and slices each step's batch from it. The
indices are the same as `batch_indices(key, N)` computes alone, so both paths give
bit-identical runs (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sme import rng
from sme.data import batch_from_permutation, batch_indices, epoch_permutation
from sme.diffusion import masks_from_uniforms, unit_uniforms
from sme.dropout import Sites, mask_shape, sample_masks
from sme.models import Model
from sme.train.state import TrainState


class StepKeys(NamedTuple):
    """The stream keys a training step draws from (a pytree: pass it to jitted code as a traced value).

    Attributes:
      data: K(seed, DATA, r), the minibatch order (one permutation per epoch).
      dropout: K(seed, DROPOUT, r), the dropout masks (`step_masks`).

    Each is an (R,) key array for R replicas, or a single key inside a vmapped replica step.
    """

    data: jax.Array
    dropout: jax.Array


def train_keys(seed: int, num_replicas: int) -> StepKeys:
    """The stream keys of replicas 0..R-1: computed once per run (and again on resume), never saved."""
    return StepKeys(rng.replica_keys(seed, rng.DATA, num_replicas), rng.replica_keys(seed, rng.DROPOUT, num_replicas))


def step_masks(sites: Sites, key: jax.Array, step, *, batch_shape=(), dtype=jnp.float32, uniforms: bool = False):
    """The dropout masks of step N (``step``, may be traced) of one replica whose DROPOUT stream key is ``key``:
    ``sample_masks(sites, key=fold_in(key, N))``. With ``uniforms`` also the unit uniforms U (*batch_shape, m)
    behind them (``masks = 1[U < p]/p``, the same masks; see `sme.diffusion.unit_uniforms`), returned as
    ``(masks, U)``. Cost: one uniform per unit (x examples for per_sample masks)."""
    key = rng.at_step(key, step)
    if not uniforms:
        return sample_masks(sites, key=key, batch_shape=batch_shape, dtype=dtype)
    u = unit_uniforms(sites, key=key, batch_shape=batch_shape)
    return masks_from_uniforms(sites, u, dtype=dtype), u


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Minibatch sampling of every replica: epochs without replacement keyed by the replicas' DATA keys."""

    batch_size: int

    def permutations(self, step, data_keys: jax.Array, num_examples: int) -> jax.Array:
        """The (R, n) permutations of the epoch that contains ``step``; ``data_keys`` (R,) as `StepKeys.data`."""
        epoch = step // (num_examples // self.batch_size)
        return jax.vmap(lambda k: epoch_permutation(k, epoch, num_examples))(data_keys)


def make_replica_step(model: Model, objective_fn: Callable, optimizer: optax.GradientTransformation, *,
                      batch_size: int, mask_mode: str):
    """Return ``step(params, opt_state, step, keys, x, y, perm=None) -> (params, opt_state, loss)``.

    ``keys`` is this replica's `StepKeys`. ``x, y`` are the full training arrays; the
    step takes its minibatch when ``batch_size < len(x)``: from ``perm``, this
    replica's permutation of the current epoch, when given, else by drawing it
    (`batch_indices`). Cost: one gradient of the objective on B examples.
    """

    def replica_step(params, opt_state, step, keys: StepKeys, x, y, perm=None):
        num_examples = x.shape[0]
        if batch_size < num_examples:
            if perm is None:
                idx = batch_indices(keys.data, step, num_examples=num_examples, batch_size=batch_size)
            else:
                idx = batch_from_permutation(perm, step, batch_size=batch_size)
            x, y = x[idx], y[idx]
        shape = mask_shape(mask_mode, batch_size)
        masks = step_masks(model.sites, keys.dropout, step, batch_shape=shape, dtype=x.dtype)
        loss, grads = jax.value_and_grad(objective_fn)(params, x, y, masks)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return replica_step


def make_train_step(replica_step):
    """Vmap a replica step over the leading replica axis of params, opt_state and the keys."""
    batched = jax.vmap(replica_step, in_axes=(0, 0, None, 0, None, None, 0))

    def train_step(params, opt_state, step, keys: StepKeys, x, y, perms=None):
        """``keys``: `StepKeys` of (R,) keys (`train_keys`); ``perms``: (R, n) epoch permutations
        (see `Sampler`), or None to draw them per step."""
        return batched(params, opt_state, step, keys, x, y, perms)

    return train_step


def make_advance(train_step, sampler: Sampler | None = None):
    """Return ``advance(state, num_steps, x, y, keys) -> (state, first_bad_step)``.

    ``keys``: the replicas' `StepKeys` (`train_keys`), a traced argument like the data.
    Runs ``num_steps`` steps in one `lax.fori_loop` whose trip count is a traced
    value, so one compilation serves chunks of any length. Each step's training
    losses (R,) are added to ``state.loss_sum``; ``first_bad_step`` is the first
    step whose loss was non-finite in any replica, or -1. With a ``sampler`` (and
    minibatches), the epoch permutations (R, n) are drawn once per epoch and
    carried through the loop; without one, every step draws its own.
    """

    def advance(state: TrainState, num_steps, x, y, keys: StepKeys):
        num_examples = x.shape[0]
        minibatch = sampler is not None and sampler.batch_size < num_examples
        draw = lambda step: sampler.permutations(step, keys.data, num_examples)  # noqa: E731
        steps_per_epoch = num_examples // sampler.batch_size if minibatch else 1

        def body(_, carry):
            state, bad, perms = carry
            if minibatch:  # a new epoch starts: draw its permutations (the first chunk's are drawn below)
                perms = jax.lax.cond(state.step % steps_per_epoch == 0, draw, lambda _: perms, state.step)
            params, opt_state, loss = train_step(state.params, state.opt_state, state.step, keys, x, y, perms)
            finite = jnp.all(jnp.isfinite(loss))
            bad = jnp.where((bad < 0) & ~finite, state.step, bad)
            return TrainState(state.step + 1, params, opt_state, state.loss_sum + loss), bad, perms

        perms = draw(state.step) if minibatch else None
        state, bad, _ = jax.lax.fori_loop(0, num_steps, body, (state, jnp.asarray(-1, jnp.int32), perms))
        return state, bad

    return advance
