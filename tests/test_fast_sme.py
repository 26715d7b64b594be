"""The shared-computation SME paths equal the unshared computation (values and gradients).

Every comparison runs in float64, where the shared and unshared programs differ only by the
order of floating-point sums (a few ulps of the O(1) quantities compared), so a relative
tolerance of 1e-10 is ~1e6 ulps of slack and still fails at any real error (a wrong mask or a
missing term changes the values at O(1)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sme import diffusion, dropout, losses, models, testing

pytestmark = pytest.mark.usefixtures("x64")  # float64 throughout

RTOL = 1e-10

ARCHS = {
    "readout": dict(hidden=(6,), dropout_layers=None),  # dropout on the readout input only
    "both": dict(hidden=(5, 4), dropout_layers=None),  # dropout after both hidden layers
    "second": dict(hidden=(5, 4), dropout_layers=(1,)),  # a two-layer prefix shared by every mask
    "first": dict(hidden=(5, 4), dropout_layers=(0,)),  # masked after layer 0, deterministic after
    "none": dict(hidden=(5,), dropout_layers=None, keep_prob=1.0),  # no droppable site
}


def _problem(arch, mode, *, n=7, out=3, loss="mse"):
    kw = dict(ARCHS[arch])
    keep_prob = kw.pop("keep_prob", 0.7)
    model, params, x, y = testing.mlp_problem(in_dim=4, out_dim=out, n=n, keep_prob=keep_prob, **kw)
    return diffusion.Problem(model, loss, mode, x, y), params


def _unshared_risks(problem, params, masks):
    """R^drop_S(theta; eta_k) from one full forward pass per (mask set, example)."""
    lf, model = losses.loss_fn(problem.loss), problem.model
    axis = None if problem.mode == "shared" else 0

    def risk(m):
        outs = jax.vmap(model.apply, in_axes=(None, 0, axis))(params, problem.x, m)
        return jnp.mean(jax.vmap(lf)(outs, problem.y))

    return jax.vmap(risk)(masks)


def _close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * float(np.max(np.abs(b))))


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_mask_outputs_and_weighted_gradients_equal_the_per_mask_computation(arch, mode):
    problem, params = _problem(arch, mode, loss="cross_entropy" if arch == "both" else "mse")
    masks = diffusion.draw_masks(problem, key=jax.random.key(4), num_masks=5)
    shared = mode == "shared"
    outs = models.mlp_mask_outputs(problem.model.spec, params, problem.x, masks, shared=shared)
    axis = None if shared else 0
    want = jax.vmap(lambda m: jax.vmap(problem.model.apply, in_axes=(None, 0, axis))(params, problem.x, m))(masks)
    assert outs.shape == want.shape == (5, 7, 3)
    _close(outs, want)
    _close(diffusion.mask_risks(problem, params, masks), _unshared_risks(problem, params, masks))
    # The step's gradient is sum_k w_k grad R^drop(eta_k): mask-weighted errors summed before
    # the outer product in the shared path, one gradient per mask in the reference.
    w = jnp.linspace(-1.0, 2.0, 5, dtype=jnp.float64)
    got, ref = jax.jit(lambda p: (jax.grad(lambda q: w @ diffusion.mask_risks(problem, q, masks))(p),
                                  jax.grad(lambda q: w @ _unshared_risks(problem, q, masks))(p)))(params)
    _close(ravel_pytree(got)[0], ravel_pytree(ref)[0])


def test_loss_table_of_enumerated_masks_equals_per_mask_forwards():
    problem, params = _problem("both", "shared")
    masks, _, _ = diffusion.enumerated_law(problem.model.sites, jnp.float64)
    lf = losses.loss_fn("mse")
    want = jax.vmap(lambda m: jax.vmap(lambda xi, yi: lf(problem.model.apply(params, xi, m), yi))(
        problem.x, problem.y))(masks)
    _close(diffusion.loss_table(problem, params, masks), want)


def _phi_sample(problem, params, noise):
    """The closed-form sample from the (n, m, out) features phi_ik = h_ik W_k: s = J^T d with
    d_phi = ((A phi_i)_k - alpha_ik psi_i)/n and d_psi = -sum_k alpha_ik phi_ik / n (module
    docstring of `sme.diffusion`), every product formed explicitly."""
    model, n = problem.model, problem.num_examples
    p = model.sites[-1].keep_prob
    v, beta = (1 - p) / p, (1 - 2 * p) / p

    def features(q):
        h, w, psi = diffusion.closed_form_features(model, q, problem.x, problem.y)
        return h[:, :, None] * w[None], psi

    (phi, psi), vjp = jax.vjp(features, params)
    m = phi.shape[1]
    zeta = jnp.broadcast_to(noise["zeta"], (n, m))
    pairs = jnp.broadcast_to(diffusion.pair_matrices(noise["z"], m), (n, m, m))
    a = np.sqrt(v) * (zeta[:, :, None] + zeta[:, None, :] + beta * jax.vmap(jnp.diag)(zeta)) + v * pairs
    alpha = np.sqrt(v) * zeta
    d_phi = (jnp.einsum("ikl,ilo->iko", a, phi) - alpha[:, :, None] * psi[:, None, :]) / n
    d_psi = -jnp.einsum("ik,iko->io", alpha, phi) / n
    return vjp((d_phi, d_psi))[0]


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_closed_form_gram_potential_equals_the_feature_form_and_its_derivative(mode):
    # m = 16 readout units: 2**16 masks, beyond enumeration; the feature form is the reference.
    model = models.make_model("mlp", in_dim=4, hidden=(8, 16), out_dim=3, keep_prob=0.7, activation="tanh",
                              dropout_layers=(1,))
    params = model.init(jax.random.key(1), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(2), (6, 4), jnp.float64)
    y = jax.random.normal(jax.random.key(3), (6, 3), jnp.float64)
    problem = diffusion.Problem(model, "mse", mode, x, y)
    noise = diffusion.sample_noise(problem, "closed_form", key=jax.random.key(5), num_masks=0)
    ours = lambda p: diffusion.diffusion_sample(problem, "closed_form", p, noise)
    theirs = lambda p: _phi_sample(problem, p, noise)
    # Derivative of sigma xi in theta (the r2 drift differentiates ||sigma xi||^2).
    sq = lambda fn: jax.grad(lambda p: sum(jnp.sum(a**2) for a in jax.tree_util.tree_leaves(fn(p))))
    flat = lambda t: ravel_pytree(t)[0]
    got, want = jax.jit(lambda p: ((flat(ours(p)), flat(sq(ours)(p))), (flat(theirs(p)), flat(sq(theirs)(p)))))(
        params)
    _close(got[0], want[0])
    _close(got[1], want[1])


def test_masks_at_non_droppable_sites_are_ones():
    # mlp_mask_outputs does not read masks before the first droppable site: they must be ones.
    spec = models.MLPSpec(in_dim=3, hidden=(4, 5), out_dim=2, keep_prob=0.5, dropout_layers=(1,))
    assert models.first_droppable_site(spec) == 1
    masks = dropout.sample_masks(models.make_mlp(spec).sites, key=jax.random.key(0), batch_shape=(3,))
    np.testing.assert_array_equal(np.asarray(masks[0]), 1.0)
