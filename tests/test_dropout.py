import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sme import dropout
from sme.dropout import Site

SITES = (Site("a", (3,), 0.7), Site("b", (2,), 1.0), Site("c", (2, 1), 0.4))


def test_enumerated_probabilities_sum_to_one_and_masks_have_unit_mean():
    masks, probs = dropout.enumerate_masks(SITES)
    assert probs.shape == (2**5,)  # 3 + 2 droppable units; the keep_prob=1 site is fixed
    assert abs(probs.sum() - 1.0) < 1e-14
    for m, site in zip(masks, SITES):
        mean = np.tensordot(probs, m, axes=1)
        np.testing.assert_allclose(mean, np.ones(site.shape), atol=1e-14)  # E[eta] = 1 exactly
    np.testing.assert_array_equal(masks[1], 1.0)


def test_enumeration_second_moment_is_one_over_p():
    masks, probs = dropout.enumerate_masks(SITES)
    second = np.tensordot(probs, masks[0] ** 2, axes=1)
    np.testing.assert_allclose(second, 1 / 0.7, rtol=1e-13)  # E[eta^2] = p / p^2


def test_sample_frequencies_within_binomial_bound():
    n = 200_000
    masks = dropout.sample_masks(SITES, key=jax.random.key(3), batch_shape=(n,))
    for m, site in zip(masks, SITES):
        kept = np.asarray(m > 0).reshape(n, -1).mean(0)
        p = site.keep_prob
        # 5 binomial standard errors: a false alarm has probability < 1e-6 per unit.
        bound = 5 * np.sqrt(p * (1 - p) / n) + 1e-12
        assert np.all(np.abs(kept - p) <= bound)
        values = np.unique(np.asarray(m))
        assert set(values.tolist()) <= {0.0, float(np.float32(1 / p))}


def test_keep_prob_one_gives_ones_and_masks_are_key_functions():
    sites = (Site("a", (4,), 1.0),)
    m = dropout.sample_masks(sites, key=jax.random.key(0), batch_shape=(5,))
    np.testing.assert_array_equal(np.asarray(m[0]), 1.0)
    a = dropout.sample_masks(SITES, key=jax.random.key(7))
    b = dropout.sample_masks(SITES, key=jax.random.key(7))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_enumeration_refuses_large_nets_and_bad_modes():
    with pytest.raises(ValueError, match="limited to"):
        dropout.enumerate_masks((Site("big", (64,), 0.5),))
    with pytest.raises(ValueError, match="unknown mask mode"):
        dropout.check_mode("per_batch")
