"""Named PRNG key streams.

Every random draw in `sme` comes from a key that is a pure function of
(seed, replica, stream, step), so that

* resuming needs no saved key: the key for step N is recomputed from N;
* adding a new consumer of randomness never perturbs another (each consumer has
  its own stream id, folded into the seed key);
* replica r of an R-replica run equals a single run of replica r (the replica
  index is folded in before the stream, and replica 0 is the default).

Analysis keys are additionally folded with the checkpoint step and a stable
hash (`zlib.crc32`, never the salted builtin `hash`) of the analysis name.
"""

from __future__ import annotations

import zlib

import jax

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


def stream_key(seed: int, stream: int, *, replica=0) -> jax.Array:
    """Key of one stream for one replica. `replica` may be a traced integer."""
    key = jax.random.key(seed)
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
