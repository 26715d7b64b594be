import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sme import dropout, grads, losses, models, testing
from sme.problem import Problem

pytestmark = pytest.mark.usefixtures("x64")  # float64 throughout


def _mlp(*, bias=True, activation="tanh"):
    """MLP 3 -> (5, 4) -> 3, keep_prob 0.7, 7 examples."""
    return testing.mlp_problem(use_bias=bias, output_bias=bias, activation=activation)


def _flat_grad(fn, params):
    return ravel_pytree(jax.grad(fn)(params))[0]


def test_ravel_rows_matches_ravel_pytree_per_row(tiny_mlp):
    model, params, *_ = tiny_mlp
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), params)
    rows = grads.ravel_rows(stacked)
    flat = ravel_pytree(params)[0]
    np.testing.assert_array_equal(rows, jnp.stack([flat, 2 * flat]))
    np.testing.assert_array_equal(ravel_pytree(grads.unraveler(params)(flat))[0], flat)


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_mask_gradients_equal_one_gradient_per_mask_for_any_chunking(mode, tiny_mlp):
    model, params, x, y = tiny_mlp
    masks = grads.draw_masks(model, key=jax.random.key(5), num_masks=5, mode=mode,
                             num_examples=x.shape[0], dtype=jnp.float64)
    one = jax.jit(lambda m: _flat_grad(lambda p: losses.dropout_risk(model, "mse", p, x, y, m, mode=mode), params))
    expected = jnp.stack([one(jax.tree_util.tree_map(lambda a: a[k], masks)) for k in range(5)])
    for chunk in (None, 2):  # 2 leaves a remainder chunk of 1
        got = grads.mask_gradients(model, "mse", params, x, y, masks, mode=mode, chunk_size=chunk)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    sampled = grads.sampled_mask_gradients(model, "mse", params, x, y, key=jax.random.key(5), num_masks=5,
                                           mode=mode, chunk_size=2)
    np.testing.assert_allclose(sampled, expected, rtol=1e-12, atol=1e-14)


def test_mask_losses_vjp_is_weighted_sum_of_mask_gradients(tiny_mlp):
    model, params, x, y = tiny_mlp
    masks = grads.draw_masks(model, key=jax.random.key(4), num_masks=4, mode="shared", num_examples=7,
                             dtype=jnp.float64)
    g = grads.mask_gradients(model, "cross_entropy", params, x, jax.nn.softmax(y), masks, mode="shared")
    w = jnp.array([0.3, -1.0, 2.0, 0.5])
    vjp = _flat_grad(lambda p: w @ grads.mask_losses(model, "cross_entropy", p, x, jax.nn.softmax(y), masks,
                                                     mode="shared"), params)
    np.testing.assert_allclose(vjp, w @ g, rtol=1e-12, atol=1e-14)


def test_per_sample_gradients_average_to_the_batch_gradient(tiny_mlp):
    model, params, x, y = tiny_mlp
    masks = dropout.sample_masks(model.sites, key=jax.random.key(8), batch_shape=(7,), dtype=jnp.float64)
    g = grads.per_sample_gradients(model, "mse", params, x, y, masks, chunk_size=3)
    batch = _flat_grad(lambda p: losses.dropout_risk(model, "mse", p, x, y, masks, mode="per_sample"), params)
    # the mean loss's gradient is the mean of the (undivided) per-sample gradients
    np.testing.assert_allclose(jnp.mean(g, 0), batch, rtol=1e-12, atol=1e-14)
    for i in (0, 6):
        mi = jax.tree_util.tree_map(lambda a: a[i], masks)
        gi = _flat_grad(lambda p: losses.mse(model.apply(p, x[i], mi), y[i]), params)
        np.testing.assert_allclose(g[i], gi, rtol=1e-12, atol=1e-14)


def test_sample_mask_gradients_table_matches_per_sample_gradients(tiny_mlp):
    model, params, x, y = tiny_mlp
    shared = grads.draw_masks(model, key=jax.random.key(6), num_masks=3, mode="shared", num_examples=7,
                              dtype=jnp.float64)
    table = grads.sample_mask_gradients(model, "mse", params, x, y, shared, mode="shared", chunk_size=2)
    assert table.shape == (3, 7, ravel_pytree(params)[0].size)
    for k in range(3):
        mk = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a[k], (7, *a.shape[1:])), shared)
        np.testing.assert_allclose(table[k], grads.per_sample_gradients(model, "mse", params, x, y, mk),
                                   rtol=1e-12, atol=1e-14)
    # the mean over examples of each mask's table is that mask's full-batch gradient
    full = grads.mask_gradients(model, "mse", params, x, y, shared, mode="shared")
    np.testing.assert_allclose(jnp.mean(table, 1), full, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_tapped_forward_equals_apply_and_gram_trick_equals_materialised(bias, loss):
    model, params, x, y = _mlp(bias=bias, activation="relu")
    y = jax.nn.softmax(y) if loss == "cross_entropy" else y
    masks = dropout.sample_masks(model.sites, key=jax.random.key(3), batch_shape=(7,), dtype=jnp.float64)
    m0 = jax.tree_util.tree_map(lambda a: a[0], masks)
    taps = tuple(jnp.zeros(w) for w in (*model.spec.hidden, model.spec.out_dim))
    out, inputs = models.mlp_forward_with_taps(model.spec, params, x[0], m0, taps)
    np.testing.assert_array_equal(out, model.apply(params, x[0], m0))
    assert [a.shape for a in inputs] == [(3,), (5,), (4,)]
    for use_masks in (None, masks):
        g = grads.per_sample_gradients(model, loss, params, x, y, use_masks)
        gram = grads.per_sample_gram(model, loss, params, x, y, use_masks)
        # the same float64 sums in another order: relative 1e-12
        np.testing.assert_allclose(gram, g @ g.T, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["mlp", pytest.param("cnn", marks=pytest.mark.slow)])
def test_per_example_mask_gram_equals_materialised_table(name):
    if name == "mlp":
        model, params, x, y = _mlp(activation="relu")
    else:
        model = models.make_model("cnn", input_shape=(4, 4, 1), channels=(2,), hidden=(3,), out_dim=3,
                                  keep_prob=0.5)
        params = model.init(jax.random.key(0), dtype=jnp.float64)
        x = jax.random.normal(jax.random.key(1), (7, 16), jnp.float64)
        y = jax.random.normal(jax.random.key(2), (7, 3), jnp.float64)
    masks = grads.draw_masks(model, key=jax.random.key(9), num_masks=4, mode="shared", num_examples=7,
                             dtype=jnp.float64)
    table = grads.sample_mask_gradients(model, "mse", params, x, y, masks, mode="shared")
    got = grads.per_example_mask_gram(model, "mse", params, x, y, masks, chunk_size=3)
    np.testing.assert_allclose(got, jnp.einsum("kip,lip->ikl", table, table), rtol=1e-11, atol=1e-14)


def test_gram_of_a_cnn_falls_back_to_materialised_gradients():
    model = models.make_model("cnn", input_shape=(4, 4, 1), channels=(2,), hidden=(3,), out_dim=2,
                              keep_prob=0.5)
    params = model.init(jax.random.key(0), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (4, 16), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (4, 2), jnp.float64)
    g = grads.per_sample_gradients(model, "mse", params, x, y)
    np.testing.assert_allclose(grads.per_sample_gram(model, "mse", params, x, y), g @ g.T, rtol=1e-12)


def test_bad_input_is_named(tiny_mlp):
    model, params, x, y = tiny_mlp
    with pytest.raises(ValueError, match="mask mode"):
        grads.draw_masks(model, key=jax.random.key(0), num_masks=2, mode="batch", num_examples=7)
    shared = grads.draw_masks(model, key=jax.random.key(0), num_masks=2, mode="shared", num_examples=7)
    with pytest.raises(ValueError, match=r"site hidden_0 .* expected \('K', 7, 5\)"):
        grads.mask_gradients(model, "mse", params, x, y, shared, mode="per_sample")
    with pytest.raises(ValueError, match="1 mask arrays for 2 dropout sites"):
        grads.per_sample_gradients(model, "mse", params, x, y, shared[:1])


def test_problem_and_loose_forms_are_the_same_call(tiny_mlp):
    """The mask-gradient functions are written for a Problem; the loose positional form builds one,
    and a mode= keyword overrides a Problem's (`sme.problem.takes_problem`)."""
    model, params, x, y = tiny_mlp
    problem = Problem(model, "mse", "per_sample", x, y)
    key = jax.random.key(2)
    np.testing.assert_array_equal(
        grads.sampled_mask_gradients(problem, params, key=key, num_masks=3),
        grads.sampled_mask_gradients(model, "mse", params, x, y, key=key, num_masks=3, mode="per_sample"))
    shared = grads.draw_masks(model, key=key, num_masks=2, mode="shared", num_examples=7, dtype=x.dtype)
    np.testing.assert_array_equal(grads.sample_mask_gradients(problem, params, shared, mode="shared"),
                                  grads.sample_mask_gradients(model, "mse", params, x, y, shared, mode="shared"))
    with pytest.raises(TypeError, match="pass a Problem"):
        grads.mask_gradients(model, "mse", params, x, y, shared)  # loose form without mode=
