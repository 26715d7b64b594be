import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from sme import dropout, losses, models, testing

pytestmark = pytest.mark.usefixtures("x64")  # float64 throughout


def _problem(keep_prob, hidden=(6,), name="two_layer", out_dim=1, bias=False):
    return testing.mlp_problem(name, in_dim=3, hidden=hidden, out_dim=out_dim, n=10, keep_prob=keep_prob,
                               dropout_layers=(len(hidden) - 1,), use_bias=bias, output_bias=bias)


@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("arch", ["two_layer", "deep_bias"])
def test_closed_form_modified_loss_equals_enumeration(keep_prob, arch):
    if arch == "two_layer":
        model, params, x, y = _problem(keep_prob)
    else:  # dropout on the last of two hidden layers, biases, two outputs
        model, params, x, y = _problem(keep_prob, hidden=(4, 5), name="mlp", out_dim=2, bias=True)
    closed = losses.modified_loss(model, "mse", params, x, y)
    exact = losses.modified_loss_exact(model, "mse", params, x, y)
    # Both are float64 sums of O(1) terms over <= 2**6 masks: agreement to 1e-10 is exact arithmetic.
    assert abs(float(closed) - float(exact)) <= 1e-10
    if keep_prob == 1.0:
        assert float(losses.r1(model, params, x)) == 0.0


def test_monte_carlo_modified_loss_converges_for_both_mask_modes():
    model, params, x, y = _problem(0.5)
    exact = float(losses.modified_loss_exact(model, "mse", params, x, y))
    k = 20_000
    for mode, shape in (("shared", (k,)), ("per_sample", (k, 10))):
        masks = dropout.sample_masks(model.sites, key=jax.random.key(9), batch_shape=shape, dtype=jnp.float64)
        per_mask = jax.vmap(lambda m: losses.dropout_risk(model, "mse", params, x, y, m, mode=mode))(masks)
        se = float(jnp.std(per_mask)) / np.sqrt(k)
        # E_eta R^drop is the same under both conventions; 5 standard errors of the MC mean.
        assert abs(float(jnp.mean(per_mask)) - exact) < 5 * se


def test_r2_penalty_is_a_quarter_eps_gradient_norm():
    model, params, x, y = _problem(0.5)
    masks = dropout.sample_masks(model.sites, key=jax.random.key(0), dtype=jnp.float64)
    grads = jax.grad(lambda p: losses.dropout_risk(model, "mse", p, x, y, masks, mode="shared"))(params)
    flat = jax.flatten_util.ravel_pytree(grads)[0]
    pen = losses.r2_penalty(model, "mse", params, x, y, masks, mode="shared", lr=0.3)
    np.testing.assert_allclose(pen, 0.3 / 4 * flat @ flat, rtol=1e-12)


def test_objectives_relate_as_defined():
    model, params, x, y = _problem(0.7)
    masks = dropout.sample_masks(model.sites, key=jax.random.key(4), dtype=jnp.float64)
    kw = dict(mode="shared", lr=0.2)
    value = {n: float(losses.make_objective(n, model, "mse", **kw)(params, x, y, masks)) for n in losses.OBJECTIVES}
    r_s = float(losses.risk(model, "mse", params, x, y))
    r_1 = float(losses.r1(model, params, x))
    drop = float(losses.dropout_risk(model, "mse", params, x, y, masks, mode="shared"))
    pen = float(losses.r2_penalty(model, "mse", params, x, y, masks, mode="shared", lr=0.2))
    expected = {"r_s": r_s, "dropout": drop, "l1": r_s + r_1, "l2": r_s + pen, "l3": drop - pen,
                "l4": drop - r_1, "l1_r2": r_s + r_1 + pen}
    for name in expected:
        assert value[name] == pytest.approx(expected[name], rel=1e-12), name


def test_losses_conventions():
    out, y = jnp.array([1.0, 3.0]), jnp.array([0.0, 1.0])
    assert float(losses.mse(out, y)) == pytest.approx(0.5 * (1 + 4))
    logits = jnp.array([2.0, 0.0])
    assert float(losses.cross_entropy(logits, jnp.array([1.0, 0.0]))) == pytest.approx(np.log(1 + np.exp(-2.0)))


def test_closed_form_refuses_where_it_does_not_hold():
    model = models.make_model("mlp", in_dim=3, hidden=(4, 4), out_dim=2, keep_prob=0.5)  # dropout on both
    with pytest.raises(ValueError, match="last hidden layer only"):
        losses.make_objective("l1", model, "mse", mode="shared", lr=0.1)
    last = models.make_model("mlp", in_dim=3, hidden=(4,), out_dim=2, keep_prob=0.5)
    with pytest.raises(ValueError, match="mse loss only"):
        losses.make_objective("l1", last, "cross_entropy", mode="shared", lr=0.1)
    with pytest.raises(ValueError, match="unknown objective"):
        losses.make_objective("l9", last, "mse", mode="shared", lr=0.1)
