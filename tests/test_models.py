import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sme import dropout, models

MODELS = {
    "mlp": dict(in_dim=6, hidden=(5, 4), out_dim=3, keep_prob=0.6),
    "two_layer": dict(in_dim=6, hidden=(5,), out_dim=1, keep_prob=0.6),
    "cnn": dict(input_shape=(4, 4, 2), channels=(3,), hidden=(5,), out_dim=3, keep_prob=0.6),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_vmapped_batch_equals_python_loop(name):
    model = models.make_model(name, **MODELS[name])
    params = model.init(jax.random.key(0))
    in_dim = 32 if name == "cnn" else 6
    x = jax.random.normal(jax.random.key(1), (7, in_dim))
    masks = dropout.sample_masks(model.sites, key=jax.random.key(2), batch_shape=(7,))
    batched = models.batch_apply(model, params, x, masks, mode="per_sample")
    for i in range(7):
        one = model.apply(params, x[i], tuple(m[i] for m in masks))
        np.testing.assert_allclose(batched[i], one, rtol=1e-6, atol=1e-6)  # float32 re-association only
    shared = dropout.sample_masks(model.sites, key=jax.random.key(3))
    out = models.batch_apply(model, params, x, shared, mode="shared")
    np.testing.assert_allclose(out[2], model.apply(params, x[2], shared), rtol=1e-6, atol=1e-6)


def test_two_layer_is_the_papers_formula():
    model = models.make_model("two_layer", in_dim=3, hidden=(4,), out_dim=1, keep_prob=0.5, activation="tanh")
    params = model.init(jax.random.key(0))
    assert set(params["hidden"][0]) == {"w"} and set(params["out"]) == {"w"}  # no biases by default
    x = jnp.array([0.3, -1.0, 2.0])
    eta = jnp.array([2.0, 0.0, 2.0, 2.0])
    w, a = params["hidden"][0]["w"], params["out"]["w"][:, 0]
    expected = jnp.sum(a * eta * jnp.tanh(x @ w))  # f(x) = sum_k a_k eta_k sigma(w_k . x)
    np.testing.assert_allclose(model.apply(params, x, (eta,))[0], expected, rtol=1e-6)


def test_dropout_layers_selects_sites_and_keep_prob_one_is_deterministic():
    model = models.make_model("mlp", in_dim=4, hidden=(3, 3, 3), out_dim=2, keep_prob=0.5, dropout_layers=(2,))
    assert [s.keep_prob for s in model.sites] == [1.0, 1.0, 0.5]
    assert model.only_last_layer_dropout
    plain = models.make_model("mlp", in_dim=4, hidden=(3,), out_dim=2, keep_prob=1.0)
    params = plain.init(jax.random.key(0))
    x = jnp.ones(4)
    drawn = dropout.sample_masks(plain.sites, key=jax.random.key(5))
    np.testing.assert_array_equal(plain.apply(params, x, drawn),
                                  plain.apply(params, x, dropout.ones_masks(plain.sites)))


def test_bad_model_arguments_are_named():
    with pytest.raises(ValueError, match="unknown model"):
        models.make_model("resnet", in_dim=2, hidden=(2,), out_dim=1)
    with pytest.raises(ValueError, match="unknown activation"):
        models.make_model("mlp", in_dim=2, hidden=(2,), out_dim=1, activation="swish2")
    with pytest.raises(ValueError, match="out of range"):
        models.make_model("mlp", in_dim=2, hidden=(2,), out_dim=1, dropout_layers=(3,))
    with pytest.raises(ValueError, match="too small"):
        models.make_model("cnn", input_shape=(2, 2, 1), channels=(2, 2), hidden=(3,), out_dim=1)
