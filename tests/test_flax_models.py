"""Flax models with explicit masks agree with the built-in models they copy.

References are the built-in `sme.models` (tested against hand-written backprop
and enumeration elsewhere) with the same parameters copied across, so every
comparison is between two independent implementations of one function.
All in float64: the two differ only by the order of floating-point operations,
so agreement to ~1e-12 relative is expected; 1e-9 leaves room for the
conv/reduction orders of different XLA kernels.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sme import covariance as cv
from sme import dropout, flax_models, hessian, losses, models
from sme.flax_models import Dropout, from_flax

RTOL, ATOL = 1e-9, 1e-12


class FlaxMLP(nn.Module):
    """A user's MLP: [dense -> tanh -> Dropout] per hidden layer, then the readout."""

    hidden: tuple
    out_dim: int
    keep_prob: float

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = Dropout(self.keep_prob)(jnp.tanh(nn.Dense(width)(x)))
        return nn.Dense(self.out_dim)(x)


class FlaxCNN(nn.Module):
    """A user's CNN: conv3x3 -> relu -> maxpool2 -> Dropout, flatten, dense -> relu -> Dropout, readout."""

    channels: int
    hidden: int
    out_dim: int
    keep_prob: float

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(self.channels, (3, 3), padding="SAME")(x))
        h = Dropout(self.keep_prob)(nn.max_pool(h, (2, 2), strides=(2, 2)))
        h = h.reshape(h.shape[0], -1)
        h = Dropout(self.keep_prob)(nn.relu(nn.Dense(self.hidden)(h)))
        return nn.Dense(self.out_dim)(h)


def _dense(layer):
    return {"kernel": layer["w"], "bias": layer["b"]}


def _mlp_pair(keep_prob=0.6, hidden=(3, 2)):
    builtin = models.make_model("mlp", in_dim=3, hidden=hidden, out_dim=2, activation="tanh", keep_prob=keep_prob)
    flax = from_flax(FlaxMLP(hidden, 2, keep_prob), (3,))
    params = builtin.init(jax.random.key(0), dtype=jnp.float64)
    copied = {f"Dense_{i}": _dense(layer) for i, layer in enumerate([*params["hidden"], params["out"]])}
    return builtin, flax, params, copied


def _cnn_pair(keep_prob=0.7):
    builtin = models.make_model("cnn", input_shape=(4, 4, 1), channels=(2,), hidden=(3,), out_dim=2,
                                keep_prob=keep_prob)
    flax = from_flax(FlaxCNN(2, 3, 2, keep_prob), (4, 4, 1))
    params = builtin.init(jax.random.key(1), dtype=jnp.float64)
    copied = {"Conv_0": _dense(params["conv"][0]), "Dense_0": _dense(params["hidden"][0]),
              "Dense_1": _dense(params["out"])}
    return builtin, flax, params, copied


def _data(in_dim, n=5, out_dim=2, seed=3):
    x = jax.random.normal(jax.random.key(seed), (n, in_dim), jnp.float64)
    y = jax.nn.softmax(jax.random.normal(jax.random.key(seed + 1), (n, out_dim), jnp.float64))
    return x, y


@pytest.mark.parametrize("pair", [_mlp_pair, _cnn_pair])
@pytest.mark.usefixtures("x64")
def test_sites_outputs_and_gradients_match_builtin(pair):
    builtin, flax, params, copied = pair()
    assert [(s.shape, s.keep_prob) for s in flax.sites] == [(s.shape, s.keep_prob) for s in builtin.sites]
    assert flax.out_dim == builtin.out_dim
    # Same leaf order after raveling, so flat vectors (gradients, Sigma, Hessians) compare entrywise.
    np.testing.assert_array_equal(ravel_pytree(params)[0], ravel_pytree(copied)[0])
    x, y = _data(int(np.prod(flax.spec.input_shape)))
    masks = dropout.sample_masks(builtin.sites, key=jax.random.key(7), batch_shape=(len(x),), dtype=jnp.float64)
    run = jax.jit(models.batch_apply, static_argnums=0, static_argnames="mode")
    out_b = run(builtin, params, x, masks, mode="per_sample")
    out_f = run(flax, copied, x, masks, mode="per_sample")
    assert out_f.shape == (len(x), 2)
    np.testing.assert_allclose(out_f, out_b, rtol=RTOL, atol=ATOL)
    obj_b = losses.make_objective("dropout", builtin, "cross_entropy", mode="per_sample", lr=0.1)
    obj_f = losses.make_objective("dropout", flax, "cross_entropy", mode="per_sample", lr=0.1)
    g_b = jax.jit(jax.grad(obj_b))(params, x, y, masks)
    g_f = jax.jit(jax.grad(obj_f))(copied, x, y, masks)
    np.testing.assert_allclose(ravel_pytree(g_f)[0], ravel_pytree(g_b)[0], rtol=RTOL, atol=ATOL)


@pytest.mark.heavy
@pytest.mark.parametrize("pair", [_mlp_pair, pytest.param(_cnn_pair, marks=pytest.mark.slow)])
@pytest.mark.usefixtures("x64")
def test_exact_covariance_and_hessian_eigenvalues_match_builtin(pair):
    builtin, flax, params, copied = pair()
    x, y = _data(int(np.prod(flax.spec.input_shape)), n=4)
    for mode in ("shared", "per_sample"):  # Sigma by enumerating all 2**m masks, both modes
        sigma = jax.jit(lambda model, p: cv.dense(cv.exact_mask_covariance(model, "cross_entropy", p, x, y,
                                                                           mode=mode)), static_argnums=0)
        s_b, s_f = sigma(builtin, params), sigma(flax, copied)
        assert float(jnp.trace(s_b)) > 0  # the noise is there to compare
        np.testing.assert_allclose(s_f, s_b, rtol=RTOL, atol=ATOL)
    for kind in ("modified_exact",):  # dense Hessian of L_S (all 2**m masks), then eigh
        dense = []
        for model, p in ((builtin, params), (flax, copied)):
            matvec, dim = hessian.make_hvp(hessian.make_hessian_loss(kind, model, "cross_entropy"), p, x, y)
            dense.append(jax.jit(lambda: hessian.to_dense(matvec, dim, dtype=jnp.float64))())
        np.testing.assert_allclose(dense[1], dense[0], rtol=RTOL, atol=1e-10)
        np.testing.assert_allclose(np.linalg.eigvalsh(dense[1]), np.linalg.eigvalsh(dense[0]), atol=1e-10)


@pytest.mark.usefixtures("x64")
def test_enumeration_and_closed_form_r1_on_a_tiny_flax_net():
    """L_S by enumerating the 2**3 masks of a flax net equals R_S + R_1 through its penultimate/readout."""
    net = from_flax(FlaxMLP((3,), 1, 0.6), (2,))
    masks, probs = dropout.enumerate_masks(net.sites)
    assert masks[0].shape == (8, 3) and np.isclose(probs.sum(), 1.0)
    params = net.init(jax.random.key(2), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(3), (6, 2), jnp.float64)
    y = jax.random.normal(jax.random.key(4), (6, 1), jnp.float64)
    exact = sum(pr * losses.dropout_risk(net, "mse", params, x, y, tuple(jnp.asarray(m[e]) for m in masks),
                                         mode="shared") for e, pr in enumerate(probs))
    np.testing.assert_allclose(losses.modified_loss(net, "mse", params, x, y), exact, rtol=1e-12)
    # Reference for penultimate/readout: the hidden activation and kernel computed by hand.
    h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    ones = dropout.ones_masks(net.sites, dtype=jnp.float64)
    np.testing.assert_allclose(jax.vmap(lambda xi: net.penultimate(params, xi, ones))(x), h, rtol=1e-12)
    assert net.readout(params) is params["Dense_1"]["kernel"]


@pytest.mark.usefixtures("x64")
def test_sme_paths_match_builtin():
    """Euler-Maruyama paths of the order-2 SME (exact drift and diffusion over all 2**5 masks), same noise."""
    from sme import sde
    from sme.diffusion import Problem

    builtin, flax, params, copied = _mlp_pair()
    x = jax.random.normal(jax.random.key(5), (4, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(6), (4, 2), jnp.float64)
    ends = []
    for model, p in ((builtin, params), (flax, copied)):
        eq = sde.make_sme(Problem(model, "mse", "shared", x, y), drift="order2", diffusion="exact",
                          estimator="exact", lr=0.2)
        ends.append(jax.jit(lambda p0: sde.em_integrate(eq, p0, key=jax.random.key(8), num_steps=4, h=0.1))(p))
    moved = ravel_pytree(ends[0])[0] - ravel_pytree(params)[0]
    assert float(jnp.linalg.norm(moved)) > 1e-3  # the path went somewhere
    np.testing.assert_allclose(ravel_pytree(ends[1])[0], ravel_pytree(ends[0])[0], rtol=RTOL, atol=1e-10)


@pytest.mark.usefixtures("x64")
def test_changing_keep_prob_matches_the_builtin_twin():
    from sme.analyses.curvature import loss_model

    for p in (0.6, 1.0):  # a net with dropout, and one without measured on its dropout twin
        builtin, flax, _, _ = _mlp_pair(keep_prob=p)
        for q in (0.9, 0.5):
            assert loss_model(flax, q).sites == tuple(
                type(s)(f.name, s.shape, s.keep_prob) for s, f in zip(loss_model(builtin, q).sites, flax.sites))
            assert loss_model(flax, q).spec.keep_prob == q


def test_builtin_architectures_have_the_documented_sites_and_sizes():
    vgg = flax_models.make_flax_model("vgg9", input_shape=(32, 32, 3), out_dim=10,
                                      channels=(64, 64, 128, 128, 256, 256), hidden=(512, 512), keep_prob=0.8,
                                      dropout_layers=(3, 4))
    assert [s.shape for s in vgg.sites] == [(16, 16, 64), (8, 8, 128), (4, 4, 256), (512,), (512,)]
    assert [s.keep_prob for s in vgg.sites] == [1.0, 1.0, 1.0, 0.8, 0.8]
    shapes = jax.eval_shape(vgg.init, jax.random.key(0))
    convs = [k for k in shapes if k.startswith("Conv")]
    denses = [k for k in shapes if k.startswith("Dense")]
    assert (len(convs), len(denses)) == (6, 3)  # VGG-9: 6 conv + 3 dense layers
    res = flax_models.make_flax_model("resnet20", input_shape=(32, 32, 3), out_dim=100, channels=(16, 32, 64),
                                      keep_prob=0.9, dropout_layers=(3,))
    assert [s.shape for s in res.sites] == [(32, 32, 16), (16, 16, 32), (8, 8, 64), (64,)]
    assert res.only_last_layer_dropout
    params = jax.eval_shape(res.init, jax.random.key(0))
    kernels = [leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if "kernel" in jax.tree_util.keystr(path) and len(leaf.shape) == 4 and leaf.shape[0] == 3]
    assert len(kernels) == 19  # 1 stem + 3 stages x 3 blocks x 2 convs; + the readout = 20 layers
    assert res.readout(params).shape == (64, 100)


def test_bad_modules_are_refused_by_name():
    class RngDropout(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.Dropout(0.5, deterministic=True)(x))

    class Batchnorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.BatchNorm(use_running_average=True)(Dropout(0.5)(x)))

    class Reused(nn.Module):
        @nn.compact
        def __call__(self, x):
            drop = Dropout(0.5)
            return nn.Dense(2)(drop(jnp.tanh(drop(x))))

    with pytest.raises(ValueError, match="flax.linen.Dropout"):
        from_flax(RngDropout(), (3,))
    with pytest.raises(ValueError, match="batch_stats"):
        from_flax(Batchnorm(), (3,))
    with pytest.raises(ValueError, match="more than once"):
        from_flax(Reused(), (3,))
    # Dropout not directly feeding the readout: no closed form, said when asked for it.
    class Squashed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(jnp.tanh(Dropout(0.5)(x)))

    net = from_flax(Squashed(), (3,))
    with pytest.raises(ValueError, match="closed-form R_1"):
        losses.modified_loss(net, "mse", net.init(jax.random.key(0)), jnp.ones((2, 3)), jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="out of range"):
        flax_models.make_flax_model("vgg9", input_shape=(8, 8, 1), out_dim=2, channels=(2, 2), hidden=(3,),
                                    dropout_layers=(2,))
