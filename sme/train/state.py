"""Training state: arrays only, so it checkpoints as a flat list of named leaves."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sme import rng


class TrainState(NamedTuple):
    """State of R replicas trained in lockstep.

    Attributes:
      step: int32 scalar, the number of optimisation steps taken (shared by replicas).
      params: parameter pytree, every leaf with a leading replica axis R.
      opt_state: optax state pytree, leading replica axis R.
      loss_sum: (R,) training objective summed since the last metrics record. Kept
        in the state (and checkpoint) so the logged mean is the same however the
        run was chunked or resumed.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    loss_sum: jax.Array


def replica(tree, index: int):
    """Slice replica `index` out of a pytree with a leading replica axis."""
    return jax.tree_util.tree_map(lambda leaf: leaf[index], tree)


def init_state(model, optimizer, *, seed: int, num_replicas: int, share_init: bool, dtype) -> TrainState:
    """Initial state of R replicas; replica r uses K(seed, INIT, r), or replica 0's if shared.

    Cost: R parameter initialisations.
    """
    replicas = jnp.zeros(num_replicas, jnp.int32) if share_init else jnp.arange(num_replicas)
    params = jax.vmap(lambda key: model.init(key, dtype=dtype))(rng.replica_keys(seed, rng.INIT, replicas))
    return TrainState(jnp.asarray(0, jnp.int32), params, jax.vmap(optimizer.init)(params),
                      jnp.zeros((num_replicas,), dtype))
