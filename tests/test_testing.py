"""The shared test builders (sme.testing) and fixtures (conftest.py) do what they promise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sme import diffusion, testing


def test_matrix_with_spectrum_has_the_prescribed_eigenvalues_and_eigenvectors():
    lam = np.r_[5.0, -2.0, 0.0, 1e-3, 3.0]
    a = testing.matrix_with_spectrum(lam, seed=3)
    q = testing.orthogonal(lam.size, seed=3)
    # float64 QR and products: the errors are a few ulps of max |lambda| = 5, so 1e-13 absolute.
    np.testing.assert_allclose(a, a.T, atol=1e-13)
    np.testing.assert_allclose(q.T @ q, np.eye(lam.size), atol=1e-13)
    np.testing.assert_allclose(np.linalg.eigvalsh(a), np.sort(lam), atol=1e-13)
    np.testing.assert_allclose(a @ q, q * lam, atol=1e-13)  # column i of Q belongs to lam[i]
    np.testing.assert_array_equal(testing.matrix_with_spectrum(lam, seed=3), a)  # same seed, same matrix
    assert not np.allclose(testing.matrix_with_spectrum(lam, seed=4), a)


def test_quadratic_is_its_matrix_form():
    loss_fn, a, q, eig = testing.quadratic(4, seed=1, loss0=0.2)
    np.testing.assert_allclose(np.linalg.eigvalsh(a), eig, rtol=1e-12)
    theta = np.array([0.3, -1.0, 2.0, 0.5])
    assert float(loss_fn(jnp.asarray(theta, jnp.float32))) == pytest.approx(0.5 * theta @ a @ theta + 0.2, rel=1e-5)


def test_problems_are_float64_under_the_x64_fixture_and_the_same_for_a_seed(x64, tiny_mlp):
    model, params, x, y = testing.mlp_problem(targets="softmax", n=4)
    assert x.dtype == y.dtype == jnp.float64 and x.shape == (4, 3) and y.shape == (4, 3)
    np.testing.assert_allclose(np.sum(y, axis=1), 1.0, rtol=1e-15)
    again = testing.mlp_problem(targets="softmax", n=4)
    for a, b in zip(jax.tree_util.tree_leaves((params, x, y)), jax.tree_util.tree_leaves(again[1:])):
        np.testing.assert_array_equal(a, b)
    _, _, _, hard = testing.mlp_problem(targets="one_hot", n=6)
    np.testing.assert_array_equal(np.sum(hard, axis=1), 1.0)
    two = testing.two_layer_problem(n=3)
    assert two[0].spec.hidden == (3,) and two[2].shape == (3, 2) and two[3].shape == (3, 1)
    assert tiny_mlp[2].dtype == jnp.float64 and tiny_mlp[0].spec.hidden == (5, 4)


def test_problem_fixture_bundles_the_tiny_mlp_and_keys_are_distinct(x64, problem, tiny_mlp, keys):
    bundle, params = problem
    assert bundle.model is tiny_mlp[0] and params is tiny_mlp[1] and bundle.x is tiny_mlp[2]
    masks = diffusion.draw_masks(bundle, key=keys(1)[0], num_masks=3)
    assert [m.shape for m in masks] == [(3, 5), (3, 4)]  # shared: one mask per site and draw
    k = jax.random.key_data(keys(4))
    assert len({tuple(np.asarray(row).ravel()) for row in k}) == 4


def test_bad_input_is_named():
    # x64 off on purpose (whatever the caller's setting): the float64 builder must refuse
    with jax.enable_x64(False), pytest.raises(ValueError, match="float64 needs x64"):
        testing.mlp_problem()
    with pytest.raises(ValueError, match="targets must be"):
        testing.mlp_problem(targets="labels", dtype=jnp.float32)
    with pytest.raises(ValueError, match="non-empty vector"):
        testing.matrix_with_spectrum(np.ones((2, 2)))
    with pytest.raises(ValueError, match="dim must be >= 1"):
        testing.orthogonal(0)
