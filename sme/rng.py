"""Named PRNG key streams.

Every random draw in `sme` comes from a key that is a pure function of
(seed, replica, stream, step), so that

* resuming needs no saved key: the key for step N is recomputed from N;
* adding a new consumer of randomness never perturbs another (each consumer has
  its own stream id, folded into the seed key);
* replica r of an R-replica run equals a single run of replica r (the replica
  index is folded in before the stream, and replica 0 is the default).

The seed is any integer in [0, 2**63): `root_key` uses all of its bits (the
high and low 32-bit halves are the two words of the threefry key, as
``jax.random.key`` does with 64-bit integers enabled), so seeds that agree
modulo 2**32 give different runs, with or without x64.

Analysis keys are additionally folded with the checkpoint step and a stable
hash (`zlib.crc32`, never the salted builtin `hash`) of the analysis name.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np

MAX_SEED = 2**63  # seeds are integers in [0, MAX_SEED)

# Stream ids are part of the reproducibility contract: never renumber them.
INIT = 0  # parameter initialisation
DATA = 1  # minibatch indices at step N
DROPOUT = 2  # dropout masks at step N
SDE = 3  # Brownian increments / diffusion masks at step N
ANALYSIS = 4  # probe and start vectors of analyses
DATASET = 5  # synthetic dataset generation

STREAMS = {
    "INIT": INIT,
    "DATA": DATA,
    "DROPOUT": DROPOUT,
    "SDE": SDE,
    "ANALYSIS": ANALYSIS,
    "DATASET": DATASET,
}


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


def step_key(seed: int, stream: int, step, *, replica=0) -> jax.Array:
    """Key of `stream` at training step `step` (which may be traced)."""
    return jax.random.fold_in(stream_key(seed, stream, replica=replica), step)


def name_id(name: str) -> int:
    """A stable 31-bit integer for a string (crc32), usable with `fold_in`."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def analysis_key(seed: int, name: str, step: int, *, replica=0) -> jax.Array:
    """Key for analysis `name` run on the checkpoint of training step `step`."""
    key = stream_key(seed, ANALYSIS, replica=replica)
    key = jax.random.fold_in(key, name_id(name))
    return jax.random.fold_in(key, step)
