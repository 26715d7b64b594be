"""Flax NNX models with explicit masks agree with the built-in MLP they copy (float64; tolerance as
in test_flax_models: the two differ only in the order of floating-point operations)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from sme import covariance as cv
from sme import dropout, losses, models
from sme.flax_nnx import Dropout, from_nnx

RTOL, ATOL = 1e-9, 1e-12


class NnxMLP(nnx.Module):
    def __init__(self, rngs, keep_prob=0.6):
        self.dense_0 = nnx.Linear(3, 3, rngs=rngs)
        self.drop_0 = Dropout((3,), keep_prob)
        self.dense_1 = nnx.Linear(3, 2, rngs=rngs)
        self.drop_1 = Dropout((2,), keep_prob)
        self.out = nnx.Linear(2, 2, rngs=rngs)

    def __call__(self, x):
        h = self.drop_0(jnp.tanh(self.dense_0(x)))
        return self.out(self.drop_1(jnp.tanh(self.dense_1(h))))


def _pair():
    builtin = models.make_model("mlp", in_dim=3, hidden=(3, 2), out_dim=2, activation="tanh", keep_prob=0.6)
    net = from_nnx(NnxMLP, (3,))
    params = builtin.init(jax.random.key(0), dtype=jnp.float64)
    copied = net.init(jax.random.key(1), dtype=jnp.float64)
    layers = [*params["hidden"], params["out"]]
    for name, layer in zip(("dense_0", "dense_1", "out"), layers):
        copied[name]["kernel"].set_value(layer["w"])
        copied[name]["bias"].set_value(layer["b"])
    return builtin, net, params, copied


@pytest.mark.usefixtures("x64")
def test_nnx_mlp_matches_builtin():
    builtin, net, params, copied = _pair()
    assert [(s.name, s.shape, s.keep_prob) for s in net.sites] == [("drop_0", (3,), 0.6), ("drop_1", (2,), 0.6)]
    assert net.out_dim == 2
    x = jax.random.normal(jax.random.key(3), (4, 3), jnp.float64)
    y = jax.nn.softmax(jax.random.normal(jax.random.key(4), (4, 2), jnp.float64))
    masks = dropout.sample_masks(net.sites, key=jax.random.key(5), batch_shape=(4,), dtype=jnp.float64)
    run = jax.jit(models.batch_apply, static_argnums=0, static_argnames="mode")
    np.testing.assert_allclose(run(net, copied, x, masks, mode="per_sample"),
                               run(builtin, params, x, masks, mode="per_sample"), rtol=RTOL, atol=ATOL)
    grad = lambda model, p: jax.jit(jax.grad(losses.make_objective(
        "dropout", model, "cross_entropy", mode="per_sample", lr=0.1)))(p, x, y, masks)
    g_b, g_n = grad(builtin, params), grad(net, copied)
    for name, layer in zip(("dense_0", "dense_1", "out"), [*g_b["hidden"], g_b["out"]]):
        np.testing.assert_allclose(g_n[name]["kernel"][...], layer["w"], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(g_n[name]["bias"][...], layer["b"], rtol=RTOL, atol=ATOL)
    # The raveled parameter orders differ, so the exact Sigma is compared by its spectrum.
    sigma = jax.jit(lambda model, p: cv.dense(cv.exact_mask_covariance(model, "cross_entropy", p, x, y,
                                                                       mode="shared")), static_argnums=0)
    np.testing.assert_allclose(np.linalg.eigvalsh(sigma(net, copied)), np.linalg.eigvalsh(sigma(builtin, params)),
                               atol=1e-10)


def test_nnx_refusals():
    class RngDropout(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 2, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.dense(self.drop(x))

    class Batchnorm(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.BatchNorm(3, use_running_average=True, rngs=rngs)
            self.dense = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            return self.dense(self.norm(x))

    with pytest.raises(ValueError, match="flax.nnx.Dropout"):
        from_nnx(RngDropout, (3,))
    with pytest.raises(ValueError, match="state besides parameters and masks"):
        from_nnx(Batchnorm, (3,))
    net = from_nnx(NnxMLP, (3,))
    with pytest.raises(ValueError, match="closed-form R_1"):
        net.readout(net.init(jax.random.key(0)))
