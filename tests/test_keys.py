"""Keys as values: the stream keys computed once and passed into the jitted steps give the same
random bits as the seed-based formula fold_in(fold_in(fold_in(root(seed), r), stream), N).

The references below are written inline from that formula, independently of `sme.rng`, so a change
of derivation anywhere (rng, the training step, the lockstep process, the SDE substep keys) fails here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sme import dropout, lockstep, models, rng, sde
from sme.data import batch_indices
from sme.train.state import TrainState
from sme.train.step import Sampler, make_advance, make_replica_step, make_train_step, step_masks, train_keys

DATA, DROPOUT, SDE = 1, 2, 3  # the stream ids of the reproducibility contract, written out


def _old_stream_key(seed, stream, replica):
    """The derivation the keys must keep: fold_in(fold_in(root(seed), replica), stream)."""
    root = jax.random.key(seed) if seed < 2**32 else rng.root_key(seed)  # root_key has its own test (test_workdir)
    return jax.random.fold_in(jax.random.fold_in(root, replica), stream)


def _bits(key):
    return np.asarray(jax.random.key_data(key))


def test_stream_ids_are_the_contract_and_the_retired_id_is_unused():
    assert (rng.INIT, rng.DATA, rng.DROPOUT, rng.SDE, rng.ANALYSIS) == (0, 1, 2, 3, 4)
    assert not hasattr(rng, "STREAMS") and not hasattr(rng, "DATASET")


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 5])
def test_replica_keys_equal_the_seed_formula_for_every_replica_and_stream(seed):
    for stream in (rng.INIT, DATA, DROPOUT, SDE, rng.ANALYSIS):
        keys = rng.replica_keys(seed, stream, 5)
        assert keys.shape == (5,)
        for r in range(5):
            np.testing.assert_array_equal(_bits(keys[r]), _bits(_old_stream_key(seed, stream, r)))
            np.testing.assert_array_equal(_bits(keys[r]), _bits(rng.stream_key(seed, stream, replica=r)))
    picked = rng.replica_keys(seed, DROPOUT, np.array([3, 0, 3]))  # explicit replica indices (shared init: zeros)
    for i, r in enumerate([3, 0, 3]):
        np.testing.assert_array_equal(_bits(picked[i]), _bits(_old_stream_key(seed, DROPOUT, r)))


def test_replica_keys_refuse_bad_replica_counts():
    with pytest.raises(ValueError, match="number of replicas 0 must be a positive integer"):
        rng.replica_keys(0, DATA, 0)
    with pytest.raises(ValueError, match="1-D array of replica indices"):
        rng.replica_keys(0, DATA, np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="must be an integer in"):
        rng.replica_keys(-1, DATA, 2)


def _flat(tree):
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])


def _probe_step(num_examples, batch, width, mode):
    """A training step whose parameters after one SGD step of size 1 from zero reveal, exactly, the
    masks it drew and the examples of its minibatch: objective = sum(a * masks) + sum(b * x), with
    x one-hot per example, so grad a = the masks (entries 0 or 1/p = 2) and grad b = the count of
    each example in the batch (small integers: exact in float32)."""
    model = models.make_model("mlp", in_dim=num_examples, hidden=(width,), out_dim=1, keep_prob=0.5)

    def objective(params, x, y, masks):
        return jnp.sum(params["a"] * masks[0]) + jnp.sum(params["b"] * x)

    optimizer = optax.sgd(1.0)
    replica_step = make_replica_step(model, objective, optimizer, batch_size=batch, mask_mode=mode)
    shape = dropout.mask_shape(mode, batch)
    zeros = {"a": jnp.zeros((*shape, width)), "b": jnp.zeros((batch, num_examples))}
    return model, optimizer, replica_step, zeros


@pytest.mark.parametrize("mode", ["per_sample", "shared"])
@pytest.mark.parametrize("carried", [False, True])
def test_a_runs_masks_and_minibatches_equal_the_old_derivation_bit_for_bit(mode, carried):
    n, batch, width, num_replicas, seed = 12, 4, 3, 3, 5
    model, optimizer, replica_step, zeros = _probe_step(n, batch, width, mode)
    advance = jax.jit(make_advance(make_train_step(replica_step), Sampler(batch) if carried else None))
    x, y = jnp.eye(n), jnp.zeros((n, 1))
    keys = train_keys(seed, num_replicas)
    params = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (num_replicas, *a.shape)), zeros)
    for step in (0, 1, 2, 3, 7, 10):  # inside epochs and across their boundaries (3 steps per epoch)
        state = TrainState(jnp.asarray(step, jnp.int32), params, jax.vmap(optimizer.init)(params),
                           jnp.zeros(num_replicas))
        new, _ = advance(state, jnp.asarray(1, jnp.int32), x, y, keys)
        for r in range(num_replicas):
            mask_key = jax.random.fold_in(_old_stream_key(seed, DROPOUT, r), step)
            masks = dropout.sample_masks(model.sites, key=mask_key, batch_shape=dropout.mask_shape(mode, batch))
            np.testing.assert_array_equal(-np.asarray(new.params["a"][r]), np.asarray(masks[0]))
            idx = batch_indices(_old_stream_key(seed, DATA, r), step, num_examples=n, batch_size=batch)
            np.testing.assert_array_equal(-np.asarray(new.params["b"][r]), np.eye(n)[np.asarray(idx)])


def test_same_seed_same_run_other_seed_other_run_and_replica_r_is_the_single_run_of_r():
    n, batch, width = 12, 4, 3
    _, optimizer, replica_step, zeros = _probe_step(n, batch, width, "per_sample")
    advance = jax.jit(make_advance(make_train_step(replica_step), Sampler(batch)))
    x, y = jnp.eye(n), jnp.zeros((n, 1))

    def run(keys, num_replicas):
        params = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (num_replicas, *a.shape)), zeros)
        state = TrainState(jnp.asarray(0, jnp.int32), params, jax.vmap(optimizer.init)(params),
                           jnp.zeros(num_replicas))
        return advance(state, jnp.asarray(5, jnp.int32), x, y, keys)[0].params

    first, again, other = run(train_keys(3, 4), 4), run(train_keys(3, 4), 4), run(train_keys(4, 4), 4)
    for u, v in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(_flat(first), _flat(other))
    # replica r of the 4-replica run = a 1-replica run handed replica r's keys
    for r in range(4):
        alone = run(jax.tree_util.tree_map(lambda k: k[r:r + 1], train_keys(3, 4)), 1)
        for u, v in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(alone)):
            np.testing.assert_array_equal(u[r], v[0])


def test_step_masks_uniforms_give_the_same_masks_and_are_those_of_the_old_key():
    model = models.make_model("mlp", in_dim=3, hidden=(4, 5), out_dim=2, keep_prob=0.7,
                              dropout_layers=(0, 1))
    key = rng.replica_keys(9, DROPOUT, 2)[1]
    plain = jax.jit(lambda k, s: step_masks(model.sites, k, s, batch_shape=(6,)))(key, 11)
    masks, u = jax.jit(lambda k, s: step_masks(model.sites, k, s, batch_shape=(6,), uniforms=True))(key, 11)
    old = dropout.sample_masks(model.sites, key=jax.random.fold_in(_old_stream_key(9, DROPOUT, 1), 11),
                               batch_shape=(6,))
    assert u.shape == (6, 9)  # 4 + 5 droppable units
    for a, b, c in zip(plain, masks, old):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)


def test_lockstep_keys_and_substep_keys_equal_the_old_derivation():
    seed, num_replicas = 2, 3
    keys = lockstep.lockstep_keys(seed, num_replicas)
    draw = jax.jit(jax.vmap(lambda k, step, j, tag: sde.substep_key(k, step, j, tag=tag), in_axes=(0, None, None, None)))
    for step, j, tag in ((0, 0, 0), (4, 1, 2), (9, 3, 7)):
        got = draw(keys.sde, step, j, tag)
        for r in range(num_replicas):
            np.testing.assert_array_equal(_bits(keys.dropout[r]), _bits(_old_stream_key(seed, DROPOUT, r)))
            old = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(_old_stream_key(seed, SDE, r), step), tag), j)
            np.testing.assert_array_equal(_bits(got[r]), _bits(old))


def test_the_jitted_training_step_does_not_hold_the_seed():
    """The keys are arguments: one compilation serves every seed."""
    n, batch, width = 12, 4, 3
    _, optimizer, replica_step, zeros = _probe_step(n, batch, width, "shared")
    advance = jax.jit(make_advance(make_train_step(replica_step), Sampler(batch)))
    params = jax.tree_util.tree_map(lambda a: a[None], zeros)
    state = TrainState(jnp.asarray(0, jnp.int32), params, jax.vmap(optimizer.init)(params), jnp.zeros(1))
    x, y = jnp.eye(n), jnp.zeros((n, 1))
    outs = [_flat(advance(state, jnp.asarray(2, jnp.int32), x, y, train_keys(seed, 1))[0].params)
            for seed in (0, 1, 2**40)]
    assert advance._cache_size() == 1
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])
