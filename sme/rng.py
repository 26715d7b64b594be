"""Named PRNG key streams, passed as values.

Every random draw in `sme` comes from a key that is a pure function of
(seed, replica, stream, step):

    stream key   K(seed, stream, r) = fold_in(fold_in(root_key(seed), r), stream)
    step key     fold_in(K(seed, stream, r), N)

Keys are values: a driver computes the stream keys of its R replicas once
(`replica_keys`, an (R,) key array) and passes them into its jitted step as
traced arguments; the step folds in the step number N (`at_step`) and nothing
else. No jitted function holds the seed. Hence

* resuming needs no saved key: the driver recomputes the stream keys from the
  seed and the key of step N from N;
* adding a new consumer of randomness never perturbs another (each consumer has
  its own stream id, folded in after the replica);
* replica r of an R-replica run equals a single run of replica r (the replica
  index is folded in before the stream; replica 0 is the default);
* the same seed gives the same run, however it is chunked or resumed.

`stream_key` and `step_key` compute the same keys eagerly from a seed (for
one-off draws and for tests that check a run against the formula).

The seed is any integer in [0, 2**63): `root_key` uses all of its bits (the
high and low 32-bit halves are the two words of the threefry key, as
``jax.random.key`` does with 64-bit integers enabled), so seeds that agree
modulo 2**32 give different runs, with or without x64.

Analysis keys are additionally folded with the checkpoint step and a stable
hash (`zlib.crc32`, never the salted builtin `hash`) of the analysis name.

Synthetic datasets do not use these streams: they are drawn by NumPy seeded
with (seed, crc32(dataset name)) (`sme.data`).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

MAX_SEED = 2**63  # seeds are integers in [0, MAX_SEED)

# Stream ids are part of the reproducibility contract: never renumber them.
INIT = 0  # parameter initialisation
DATA = 1  # minibatch indices at step N
DROPOUT = 2  # dropout masks at step N
SDE = 3  # Brownian increments / diffusion masks at step N
ANALYSIS = 4  # probe and start vectors of analyses
# 5 is retired (it once named synthetic dataset generation, which never drew from a stream):
# never reuse it.


def root_key(seed: int) -> jax.Array:
    """The key of a seed in [0, 2**63): ``jax.random.key(seed)`` below 2**32 (unchanged runs),
    the threefry key (high word, low word) above it. Raises ValueError outside the range."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < MAX_SEED:
        raise ValueError(f"seed {seed!r} must be an integer in [0, 2**63)")
    seed = int(seed)
    high, low = seed >> 32, seed & 0xFFFFFFFF
    if not high:
        return jax.random.key(low)
    if jax.config.jax_default_prng_impl == "threefry2x32":
        return jax.random.wrap_key_data(np.array([high, low], np.uint32))
    return jax.random.fold_in(jax.random.key(low), high)


def stream_key(seed: int, stream: int, *, replica=0) -> jax.Array:
    """Key of one stream for one replica. `replica` may be a traced integer."""
    key = root_key(seed)
    key = jax.random.fold_in(key, replica)
    return jax.random.fold_in(key, stream)


def replica_keys(seed: int, stream: int, replicas) -> jax.Array:
    """The (R,) key array of `stream` for replicas 0..R-1 (``replicas`` an int R) or for the given
    1-D array of replica indices: entry i is ``stream_key(seed, stream, replica=replicas[i])``."""
    if isinstance(replicas, (int, np.integer)) and not isinstance(replicas, bool):
        if replicas < 1:
            raise ValueError(f"number of replicas {replicas!r} must be a positive integer")
        replicas = np.arange(replicas)
    replicas = jnp.asarray(replicas, jnp.int32)
    if replicas.ndim != 1:
        raise ValueError(f"replicas must be a count or a 1-D array of replica indices, got shape {replicas.shape}")
    return jax.vmap(lambda r: stream_key(seed, stream, replica=r))(replicas)


def at_step(key: jax.Array, step) -> jax.Array:
    """The key of step `step` (which may be traced) in the stream of `key` (a stream key)."""
    return jax.random.fold_in(key, step)


def step_key(seed: int, stream: int, step, *, replica=0) -> jax.Array:
    """Key of `stream` at training step `step` (which may be traced), computed from the seed."""
    return at_step(stream_key(seed, stream, replica=replica), step)


def name_id(name: str) -> int:
    """A stable 31-bit integer for a string (crc32), usable with `fold_in`."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def analysis_key(seed: int, name: str, step: int, *, replica=0) -> jax.Array:
    """Key for analysis `name` run on the checkpoint of training step `step`."""
    key = stream_key(seed, ANALYSIS, replica=replica)
    key = jax.random.fold_in(key, name_id(name))
    return jax.random.fold_in(key, step)
