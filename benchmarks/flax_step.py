"""Dropout-SGD steps/s of a Flax model (sme.flax_models) against its built-in twin.

Both nets are the MLP 784-256-256-10 (ReLU, keep_prob 0.8 on both hidden layers, per-sample
masks, cross-entropy, SGD lr 0.1, batch 256, 10,000 synthetic examples) with the SAME parameters
(copied across), trained by the step `sme.train.loop` builds (make_replica_step ->
make_train_step -> make_advance, jitted once) in chunks of CHUNK steps. Compilation is timed
separately; repeats are interleaved (built-in, flax, built-in, ...) because the cores may be
shared; figures are medians with [min, max]. The two must also agree: the mean training loss
over the same steps is printed for both (same masks, same batches, same parameters).

    python benchmarks/flax_step.py        # about a minute on 2 cores
"""

from __future__ import annotations

import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sme import losses, models  # noqa: E402
from sme.flax_models import Dropout, from_flax  # noqa: E402
from sme.train.state import init_state  # noqa: E402
from sme.train.step import Sampler, make_advance, make_replica_step, make_train_step, train_keys  # noqa: E402

IN, HIDDEN, OUT, KEEP, BATCH, N, SEED = 784, (256, 256), 10, 0.8, 256, 10_000, 0
CHUNK, REPEATS = 200, 5


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in HIDDEN:
            x = Dropout(KEEP)(nn.relu(nn.Dense(width)(x)))
        return nn.Dense(OUT)(x)


def build(model, params0):
    import optax

    optimizer = optax.sgd(0.1)
    objective = losses.make_objective("dropout", model, "cross_entropy", mode="per_sample", lr=0.1)
    step = make_replica_step(model, objective, optimizer, batch_size=BATCH, mask_mode="per_sample")
    advance = jax.jit(make_advance(make_train_step(step), Sampler(BATCH)))
    state = init_state(model, optimizer, seed=SEED, num_replicas=1, share_init=False, dtype=jnp.float32)
    keys = train_keys(SEED, 1)
    state = state._replace(params=jax.tree_util.tree_map(lambda a: a[None], params0),
                           opt_state=jax.vmap(optimizer.init)(jax.tree_util.tree_map(lambda a: a[None], params0)))
    return (lambda state, n, x, y: advance(state, n, x, y, keys)), state


def main():
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.uniform(size=(N, IN)), jnp.float32)
    y = jnp.asarray(np.eye(OUT, dtype=np.float32)[rng.integers(0, OUT, N)])
    builtin = models.make_model("mlp", in_dim=IN, hidden=HIDDEN, out_dim=OUT, keep_prob=KEEP)
    flax = from_flax(FlaxMLP(), (IN,))
    p = builtin.init(jax.random.key(SEED))
    twin = {f"Dense_{i}": {"kernel": layer["w"], "bias": layer["b"]}
            for i, layer in enumerate([*p["hidden"], p["out"]])}
    runs = {"built-in": build(builtin, p), "flax": build(flax, twin)}
    n = jnp.asarray(CHUNK, jnp.int32)
    for name, (advance, state) in runs.items():
        tic = time.perf_counter()
        out, _ = advance(state, n, x, y)
        jax.block_until_ready(out)
        print(f"{name:9s} compile + first {CHUNK} steps: {time.perf_counter() - tic:.2f} s, "
              f"mean loss over them {float(out.loss_sum[0]) / CHUNK:.6f}")
    secs = {name: [] for name in runs}
    for _ in range(REPEATS):
        for name, (advance, state) in runs.items():
            tic = time.perf_counter()
            jax.block_until_ready(advance(state, n, x, y)[0])
            secs[name].append(time.perf_counter() - tic)
    for name, s in secs.items():
        rates = CHUNK / np.asarray(s)
        print(f"{name:9s} {np.median(rates):7.1f} steps/s [{rates.min():.1f}, {rates.max():.1f}]")
    print(f"flax / built-in: {np.median(secs['built-in']) / np.median(secs['flax']):.2f}x the throughput "
          f"(load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
