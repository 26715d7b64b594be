"""Lanczos, SLQ and trace estimators against dense eigendecompositions and matfree.

All tests run in float64 on matrices A = Q diag(lambda) Q^T with a known
spectrum (matfree's construction), so every expected value is the prescribed
lambda or a dense `numpy.linalg.eigh`, never a number produced by sme.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sme import lanczos as lz
from sme import testing

# Jitted once per (shape, dtype, static arguments) with the matrix as an argument, so the
# tests share compilations (as the analyses do across checkpoints).


@functools.partial(jax.jit, static_argnames=("k", "order", "which"))
def _top(a, key, *, k, order, which="largest"):
    return lz.top_eigenpairs(lambda v: a @ v, a.shape[0], key=key, k=k, order=order, which=which, dtype=a.dtype)


@functools.partial(jax.jit, static_argnames=("order", "keep_basis"))
def _tridiagonalize(a, v0, *, order, keep_basis=True):
    alphas, betas, basis = lz.tridiagonalize(lambda v: a @ v, v0, order=order, keep_basis=keep_basis)
    return alphas, betas, basis, lz.tridiagonal_eigh(alphas, betas)


@functools.partial(jax.jit, static_argnames=("num_probes", "order"))
def _slq(a, key, *, num_probes, order):
    return lz.slq_density(lambda v: a @ v, a.shape[0], key=key, num_probes=num_probes, order=order, dtype=a.dtype)


@functools.partial(jax.jit, static_argnames=("sketch_size", "num_probes"))
def _hutchpp(a, key, *, sketch_size, num_probes):
    return lz.hutchpp_trace(lambda v: a @ v, a.shape[0], key=key, sketch_size=sketch_size, num_probes=num_probes,
                            dtype=a.dtype)


def _matrix(lam, seed=0):
    return jnp.asarray(testing.matrix_with_spectrum(lam, seed))


SPECTRA = testing.SPECTRA  # matfree's test spectra: linear ramp, geometric decay, flat-then-cliff


@pytest.mark.usefixtures("x64")
def test_full_order_ritz_values_equal_eigh_and_basis_is_orthonormal():
    a = np.random.default_rng(1).normal(size=(40, 40))
    a = jnp.asarray(a + a.T)
    alphas, betas, basis, (theta, s) = _tridiagonalize(a, jnp.ones(40), order=40)
    # With full reorthogonalisation Q stays orthonormal to ~P eps, so T = Q A Q^T is
    # similar to A up to ~P eps ||A|| ~ 40 * 2e-16 * 20 ~ 2e-13.
    np.testing.assert_allclose(theta, np.linalg.eigvalsh(np.asarray(a)), atol=1e-11)
    np.testing.assert_allclose(basis @ basis.T, np.eye(40), atol=1e-12)
    t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    np.testing.assert_allclose(basis @ a @ basis.T, t, atol=1e-11)
    np.testing.assert_allclose(s @ np.diag(theta) @ s.T, t, atol=1e-11)


def test_float32_basis_stays_orthonormal_when_the_extremes_converge_fast():
    # A few well-separated top eigenvalues converge within ~10 steps, after which plain Lanczos
    # loses orthogonality at rate eps / gap; full reorthogonalisation (one pass, a second only
    # when DGKS asks) must keep Q orthonormal to a small multiple of the float32 rounding of
    # one Gram-Schmidt pass, ~sqrt(order) * eps32 ~ 8 * 1.2e-7 ~ 1e-6; 2e-5 leaves room for
    # the rounding of A v itself (||A|| = 1e3). Without reorthogonalisation the error is O(1).
    lam = np.concatenate([[1000.0, 500.0, 250.0], np.linspace(0.0, 1.0, 297)])
    a = _matrix(lam).astype(jnp.float32)
    v0 = jnp.ones(300, jnp.float32)
    _, _, basis, _ = _tridiagonalize(a, v0, order=60)
    np.testing.assert_allclose(np.asarray(basis) @ np.asarray(basis).T, np.eye(60), atol=2e-5)


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.usefixtures("x64")
def test_controlled_spectra_converge_to_the_known_extremes(name):
    lam = SPECTRA[name]
    exact = np.sort(lam)
    a = _matrix(lam)
    top = _top(a, jax.random.key(0), k=3, order=60)
    # Ramp: relative gap 1/119, Kaniel-Paige error ~ exp(-4 * 60 / sqrt(119)) * 120 ~ 3e-8 (1e-6 is safe);
    # geometric and flat-then-cliff have O(1) gaps or a 2-point spectrum: converged to rounding.
    tol = {"ramp": 1e-6, "geometric": 1e-12, "flat_then_cliff": 1e-12}[name]
    np.testing.assert_allclose(top.values, exact[::-1][:3], atol=tol)
    # Residual^2 <= gap x eigenvalue error for a converged Ritz pair; ramp: sqrt(1 * 1e-6) = 1e-3.
    assert np.all(top.residuals < (1e-2 if name == "ramp" else 1e-10))
    np.testing.assert_allclose(np.linalg.norm(top.vectors, axis=1), 1.0, atol=1e-12)
    if name != "geometric":  # the geometric bottom is a 0.7^119 cluster: it never converges
        bottom = _top(a, jax.random.key(0), k=3, order=60, which="smallest")
        np.testing.assert_allclose(bottom.values, exact[:3], atol=tol)


@pytest.mark.usefixtures("x64")
def test_top_eigenvalue_within_the_kaniel_paige_bound():
    lam = SPECTRA["ramp"]
    a = _matrix(lam, seed=3)
    v0 = jax.random.normal(jax.random.key(5), (lam.size,), jnp.float64)
    alphas, betas, _, _ = _tridiagonalize(a, v0, order=30)
    u1 = np.linalg.eigh(np.asarray(a))[1][:, -1]
    cos = abs(u1 @ np.asarray(v0)) / np.linalg.norm(v0)
    gamma = (lam[0] - lam[1]) / (lam[1] - lam[-1])
    t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    for order in (10, 20, 30):  # the order-m run's T is the leading m x m block
        theta = np.linalg.eigvalsh(t[:order, :order])[-1]
        # lambda_1 - theta_1 <= (lambda_1 - lambda_n) (tan(phi) / T_{m-1}(1 + 2 gamma))^2 in exact arithmetic
        cheb = np.cosh((order - 1) * np.arccosh(1 + 2 * gamma))
        bound = (lam[0] - lam[-1]) * (np.sqrt(1 - cos**2) / cos / cheb) ** 2
        assert 0 <= lam[0] - theta <= bound + 1e-10  # never overshoots (Cauchy interlacing)


@pytest.mark.usefixtures("x64")
def test_breakdown_on_a_two_point_spectrum_restarts_and_keeps_every_ritz_value_exact():
    lam = np.r_[np.full(40, 3.0), np.full(80, -1.0)]
    a = _matrix(lam)
    alphas, betas, basis, (theta, _) = _tridiagonalize(a, jnp.ones(120), order=8)
    # Krylov space of a 2-point spectrum has dimension 2: beta_1 = 0, then restarts.
    assert np.all(np.isfinite(alphas)) and np.all(np.isfinite(betas))
    assert np.min(np.abs(betas)) == 0.0
    np.testing.assert_allclose(basis @ basis.T, np.eye(8), atol=1e-12)
    assert np.all(np.min(np.abs(theta[:, None] - np.array([3.0, -1.0])), axis=1) < 1e-12)


@pytest.mark.usefixtures("x64")
def test_tridiagonalisation_agrees_with_matfree():
    matfree_decomp = pytest.importorskip("matfree.decomp")
    a = _matrix(SPECTRA["ramp"])
    v0 = jax.random.normal(jax.random.key(2), (120,), jnp.float64)
    alphas, betas, basis, _ = _tridiagonalize(a, v0, order=30)
    q, t, *_ = matfree_decomp.tridiag_sym(30)(lambda v: a @ v, v0)
    # Same Krylov recurrence with full reorthogonalisation in float64: equal to rounding.
    np.testing.assert_allclose(alphas, np.diag(t), rtol=1e-9)
    np.testing.assert_allclose(betas, np.abs(np.diag(t, 1)), rtol=1e-9)
    np.testing.assert_allclose(np.abs(np.sum(basis * q, axis=1)), 1.0, atol=1e-9)


@pytest.mark.usefixtures("x64")
def test_without_basis_matches_the_reorthogonalised_run_early_and_keeps_gauss_quadrature():
    a = _matrix(SPECTRA["ramp"] / 120.0)
    v0 = jax.random.normal(jax.random.key(4), (120,), jnp.float64)
    full = _tridiagonalize(a, v0, order=8)
    plain = _tridiagonalize(a, v0, order=8, keep_basis=False)
    assert plain[2] is None
    # Before any Ritz value converges, orthogonality is lost only at rounding level.
    np.testing.assert_allclose(plain[0], full[0], atol=1e-10)
    np.testing.assert_allclose(plain[1], full[1], atol=1e-10)


@pytest.mark.usefixtures("x64")
def test_slq_nodes_and_weights_are_gauss_quadrature_of_the_start_vector():
    a = _matrix(np.linspace(-1.0, 1.0, 60) ** 3)
    m = 6
    nodes, weights = _slq(a, jax.random.key(7), num_probes=3, order=m)
    z = np.asarray(jax.random.rademacher(jax.random.split(jax.random.key(7), 3)[0], (60,), jnp.float64))
    v = z / np.linalg.norm(z)
    for k in range(2 * m):  # an m-point Gauss rule integrates degree <= 2m - 1 exactly
        moment = v @ np.linalg.matrix_power(np.asarray(a), k) @ v
        np.testing.assert_allclose(np.sum(weights[0] * nodes[0] ** k), moment, atol=1e-12)
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-12)


@pytest.mark.usefixtures("x64")
def test_slq_density_matches_the_smoothed_eigh_density_within_its_standard_error():
    # 300 eigenvalues: a Gaussian bulk, an atom at 0, three outliers
    lam = np.r_[np.random.default_rng(0).normal(0.0, 1.0, 280), np.zeros(17), [6.0, 7.5, 9.0]]
    a = _matrix(lam)
    nodes, weights = _slq(a, jax.random.key(1), num_probes=40, order=50)
    grid = np.linspace(-4.0, 10.0, 200)
    sigma = 0.3
    exact = np.asarray(lz.smooth_density(jnp.asarray(lam)[None], jnp.full((1, lam.size), 1.0 / lam.size),
                                         grid, sigma))
    direct = np.exp(-0.5 * ((grid[:, None] - lam) / sigma) ** 2).sum(1) / (lam.size * sigma * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(exact, direct, atol=1e-14)  # smooth_density is the kernel sum
    per_probe = np.stack([np.asarray(lz.smooth_density(nodes[i], weights[i], grid, sigma)) for i in range(40)])
    estimate = np.asarray(lz.smooth_density(nodes, weights, grid, sigma))
    np.testing.assert_allclose(estimate, per_probe.mean(0), atol=1e-14)
    se = per_probe.std(0, ddof=1) / np.sqrt(40)
    # Normalised Rademacher probes make SLQ unbiased for tr g(A)/P up to the quadrature error of a
    # 50-point Gauss rule for a sigma = 0.3 Gaussian on [-4, 10] (< 1e-6): a z-test, 5 se per point
    # (probability < 1e-4 over 200 points for a correct estimator; the key is fixed).
    assert np.all(np.abs(estimate - exact) <= 5 * se + 1e-6)
    assert np.trapezoid(estimate, grid) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.usefixtures("x64")
def test_hutchinson_is_unbiased_within_its_standard_error_and_the_error_is_right():
    a = _matrix(np.linspace(-2.0, 5.0, 50), seed=2) + 0.3
    an = np.asarray(a)
    estimate, se = lz.hutchinson_trace(lambda v: a @ v, 50, key=jax.random.key(0), num_probes=4000)
    # CLT: (estimate - Tr A) / se ~ N(0, 1); |z| < 4 fails with probability 6e-5 (the key is fixed).
    assert abs(float(estimate) - np.trace(an)) < 4 * float(se)
    # Rademacher probes: Var(z^T A z) = 2 (||A||_F^2 - sum A_ii^2). The sample variance of 4000
    # draws has relative error ~ sqrt(2 / 4000) * sqrt(kurtosis) < 10%; allow 20%.
    variance = 2 * (np.sum(an**2) - np.sum(np.diag(an) ** 2))
    assert float(se) ** 2 * 4000 == pytest.approx(variance, rel=0.2)


@pytest.mark.usefixtures("x64")
def test_hutchpp_is_unbiased_and_exact_for_low_rank():
    a = _matrix(np.r_[100.0 * 0.5 ** np.arange(10), np.linspace(0.0, 1.0, 90)], seed=4)
    estimate, se = _hutchpp(a, jax.random.key(3), sketch_size=20, num_probes=400)
    assert abs(float(estimate) - np.trace(np.asarray(a))) < 4 * float(se)  # as for Hutchinson
    low_rank = _matrix(np.r_[np.linspace(1.0, 4.0, 8), np.zeros(92)], seed=5)
    estimate, se = _hutchpp(low_rank, jax.random.key(3), sketch_size=20, num_probes=400)
    # rank 8 <= sketch size: Q spans range(A), the remainder is zero up to rounding.
    assert float(estimate) == pytest.approx(np.linspace(1.0, 4.0, 8).sum(), abs=1e-10)
    assert float(se) < 1e-10


@pytest.mark.usefixtures("x64")
def test_agrees_with_scipy_eigsh():
    from scipy.sparse.linalg import LinearOperator, eigsh

    lam = np.r_[np.linspace(-3.0, 3.0, 115), [8.0, 9.0, 11.0, -6.0, -7.0]]
    a = _matrix(lam, seed=6)
    op = LinearOperator((120, 120), matvec=lambda v: np.asarray(a @ jnp.asarray(v)), dtype=np.float64)
    ref = eigsh(op, k=3, which="LA", tol=1e-12)[0][::-1]
    ours = _top(a, jax.random.key(0), k=3, order=60)
    np.testing.assert_allclose(ours.values, ref, atol=1e-10)  # isolated outliers: converged to rounding


def test_jitted_top_eigenpairs_compile_once_for_new_operators():
    def run(a, key):
        return lz.top_eigenpairs(lambda v: a @ v, 30, key=key, k=2, order=10)

    jitted = jax.jit(run)
    for seed in range(3):
        values = jitted(_matrix(np.linspace(1.0, 30.0, 30), seed=seed).astype(jnp.float32), jax.random.key(seed))
        np.testing.assert_allclose(values.values[0], 30.0, rtol=1e-2)  # float32, order 10: converged to 1%
    assert jitted._cache_size() == 1


def test_bad_arguments_are_named():
    a = jnp.eye(5)
    mv = lambda v: a @ v
    with pytest.raises(ValueError, match="order=6"):
        lz.tridiagonalize(mv, jnp.ones(5), order=6)
    with pytest.raises(ValueError, match="flat"):
        lz.tridiagonalize(mv, jnp.ones((5, 1)), order=2)
    with pytest.raises(ValueError, match="k=4"):
        lz.top_eigenpairs(mv, 5, key=jax.random.key(0), k=4, order=3)
    with pytest.raises(ValueError, match="which"):
        lz.top_eigenpairs(mv, 5, key=jax.random.key(0), k=1, order=3, which="middle")
    with pytest.raises(ValueError, match="shape"):
        lz.top_eigenpairs(lambda v: jnp.ones(4), 5, key=jax.random.key(0), k=1, order=3)
    with pytest.raises(ValueError, match="num_probes"):
        lz.hutchinson_trace(mv, 5, key=jax.random.key(0), num_probes=1)
    with pytest.raises(ValueError, match="keep_basis=True"):
        lz.ritz_pairs(mv, jnp.ones(3), jnp.ones(2), None, k=1)
    with pytest.raises(ValueError, match="betas"):
        lz.tridiagonal_eigh(jnp.ones(3), jnp.ones(3))
