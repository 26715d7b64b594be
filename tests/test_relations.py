import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sme import covariance as cv
from sme import losses, relations, testing

pytestmark = pytest.mark.usefixtures("x64")  # float64 throughout


def _sym(seed, spectrum):
    return jnp.asarray(testing.matrix_with_spectrum(spectrum, seed))


def test_alignment_equals_dense_computation_on_a_tiny_net(two_layer_net):
    model, params, x, y = two_layer_net
    fn = lambda p: losses.modified_loss_exact(model, "mse", p, x, y)  # H of L_S
    flat, unravel = ravel_pytree(params)
    h = jax.jit(jax.hessian(lambda f: fn(unravel(f))))(flat)
    cov = jax.jit(lambda p: cv.exact_mask_covariance(model, "mse", p, x, y, mode="shared"))(params)
    sigma = cv.dense(cov)
    dense_alpha = np.trace(h @ sigma) / (np.linalg.norm(h) * np.linalg.norm(sigma))
    hvp, dim = relations.make_flat_hvp(fn, params)
    v = jax.random.normal(jax.random.key(0), (dim,), jnp.float64)
    np.testing.assert_allclose(hvp(v), h @ v, rtol=1e-10)
    np.testing.assert_allclose(jax.jit(lambda r: relations.trace_h_sigma(hvp, cv.Factored(r), chunk_size=3))(
        cov.root), np.trace(h @ sigma), rtol=1e-10)
    alpha = jax.jit(lambda r: relations.alignment_factored(hvp, cv.Factored(r), np.linalg.norm(h)))(cov.root)
    np.testing.assert_allclose(alpha, dense_alpha, rtol=1e-10)
    assert abs(dense_alpha) > 1e-3
    # a full eigenbasis makes the Hutchinson part vanish: norms exact
    basis = np.linalg.eigh(np.asarray(h))[1].T
    norms = jax.jit(lambda b: relations.hessian_norms(hvp, dim, key=jax.random.key(1), num_probes=4,
                                                      basis=b))(jnp.asarray(basis))
    np.testing.assert_allclose(norms.frobenius, np.linalg.norm(h), rtol=1e-9)
    np.testing.assert_allclose(norms.trace, np.trace(h), rtol=1e-9, atol=1e-12)


def test_hutchinson_norms_with_partial_deflation_are_within_their_error():
    dim = 60
    h = _sym(0, jnp.concatenate([jnp.array([50.0, 20.0, 10.0]), jax.random.normal(jax.random.key(1), (dim - 3,))]))
    hvp = lambda v: h @ v
    basis = jnp.asarray(np.linalg.eigh(np.asarray(h))[1][:, ::-1][:, :3].T)
    plain, deflated = jax.jit(lambda b: (
        relations.hessian_norms(hvp, dim, key=jax.random.key(2), num_probes=400),
        relations.hessian_norms(hvp, dim, key=jax.random.key(2), num_probes=400, basis=b)))(basis)
    for norms in (plain, deflated):
        # 5 standard errors of the Monte Carlo mean (CLT over 400 probes)
        assert abs(norms.trace - np.trace(h)) < 5 * norms.trace_se
        assert abs(norms.frobenius - np.linalg.norm(h)) < 5 * norms.frobenius_se
        assert norms.frobenius_se < 0.05 * norms.frobenius
    assert deflated.frobenius_se < 0.5 * plain.frobenius_se  # deflation pays on a dominated spectrum


def test_alignment_of_a_matrix_with_itself_is_one():
    cov = cv.from_samples(jax.random.normal(jax.random.key(0), (7, 20), jnp.float64))
    alpha = relations.alignment_factored(lambda v: cv.matvec(cov, v), cov, cv.frobenius(cov))
    np.testing.assert_allclose(alpha, 1.0, rtol=1e-12)


def test_haar_null_closed_form_matches_sampling():
    dim = 8
    h = _sym(0, jnp.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.0, -0.5, -1.0]))
    s_eigs = jnp.array([4.0, 1.0, 0.25])  # a rank-3 Sigma
    fro_h = float(jnp.linalg.norm(h))
    null = relations.haar_null(jnp.trace(h), fro_h, jnp.sum(s_eigs), jnp.linalg.norm(s_eigs), dim)
    n = 4000
    reduced = relations.haar_null_samples(lambda v: h @ v, s_eigs, dim, fro_h, key=jax.random.key(1),
                                          num_samples=n)
    # an independent dense sampler: Q from the QR of a Gaussian (sign-fixed), Sigma = Q diag(s) Q^T
    def dense_one(k):
        q, r = jnp.linalg.qr(jax.random.normal(k, (dim, dim), jnp.float64))
        q = q * jnp.sign(jnp.diag(r))
        sigma = (q[:, :3] * s_eigs) @ q[:, :3].T
        return jnp.trace(h @ sigma) / (fro_h * jnp.linalg.norm(sigma))
    dense = jax.vmap(dense_one)(jax.random.split(jax.random.key(2), n))
    for samples in (reduced, dense):
        # 5 standard errors for the mean; for the std, its sampling error is about std / sqrt(2n) < 2 %
        assert abs(np.mean(samples) - null.mean) < 5 * null.std / np.sqrt(n)
        np.testing.assert_allclose(np.std(samples), null.std, rtol=0.06)
    assert null.mean > 2 * null.std / np.sqrt(n) * 5  # not a comparison of zeros


def test_wishart_null_leading_order_matches_sampling():
    dim, rank, n = 200, 8, 2000
    h = _sym(0, jnp.linspace(-1.0, 3.0, dim))
    fro_h = float(jnp.linalg.norm(h))
    null = relations.wishart_null(jnp.trace(h), fro_h, dim, rank)

    def one(k):
        z = jax.random.normal(k, (rank, dim), jnp.float64)
        return jnp.sum((z @ h) * z) / (fro_h * jnp.linalg.norm(z @ z.T))

    samples = jax.vmap(one)(jax.random.split(jax.random.key(1), n))
    # neglected denominator fluctuations are O(1/sqrt(K P)) = 2.5 % relative: allow 5 SE + 3 % of the mean
    assert abs(np.mean(samples) - null.mean) < 5 * null.std / np.sqrt(n) + 0.03 * abs(null.mean)
    np.testing.assert_allclose(np.std(samples), null.std, rtol=0.1)


def test_projected_variance_and_variance_relation():
    cov = cv.from_samples(jax.random.normal(jax.random.key(0), (6, 15), jnp.float64))
    u = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (15, 4), jnp.float64))[0].T
    sigma = cv.dense(cov)
    np.testing.assert_allclose(relations.projected_variance(cov, u), jnp.einsum("ip,pq,iq->i", u, sigma, u),
                               rtol=1e-12)
    lam = np.array([10.0, 5.0, 2.0, 1.0, 0.5, 0.1])
    noise = np.exp(0.1 * np.random.default_rng(0).normal(size=lam.size))
    fit = relations.variance_relation(np.append(lam, -1.0), np.append(3 * lam**1.5 * noise, 1.0), num_boot=500)
    assert fit.num_points == 6  # the negative eigenvalue is dropped
    assert fit.ci_low < 1.5 < fit.ci_high and abs(fit.slope - 1.5) < 0.15
