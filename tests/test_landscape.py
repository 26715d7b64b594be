"""Tests of sme.landscape against dense references and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sme import landscape, testing
from sme.models import make_model


def _orthogonal(rng, dim):
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q


def _dense_pca(data):
    evals, evecs = np.linalg.eigh(np.cov(data.T, ddof=1))
    return evals[::-1], evecs[:, ::-1].T


# --------------------------------------------------------------------------- PCA


@pytest.mark.parametrize("num_samples,dim", [(12, 30), (40, 5)])  # Gram path, then covariance path
@pytest.mark.usefixtures("x64")
def test_pca_equals_dense_covariance_spectrum(num_samples, dim):
    rng = np.random.default_rng(0)
    scales = 2.0 ** -np.arange(dim)  # distinct, well separated variances
    data = rng.normal(size=(num_samples, dim)) * scales + 3.0  # offset: centring matters
    result = landscape.pca(jnp.asarray(data))
    k = min(num_samples - 1, dim)
    ref_vals, ref_vecs = _dense_pca(data)
    # float64 eigh errors are ~1e-16 * sigma_1^2; 1e-10 leaves room for the Gram route.
    np.testing.assert_allclose(result.variances, ref_vals[:k], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.mean, data.mean(0), rtol=1e-12)
    directions = np.asarray(result.directions)
    np.testing.assert_allclose(directions @ directions.T, np.eye(k), atol=1e-9)
    # Same eigenvectors up to sign (the variances are distinct).
    overlap = np.abs(np.sum(directions * ref_vecs[:k], axis=1))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-7)
    # Sign convention: the largest-magnitude entry of each direction is positive.
    peaks = directions[np.arange(k), np.argmax(np.abs(directions), axis=1)]
    assert np.all(peaks > 0)


@pytest.mark.usefixtures("x64")
def test_pca_variance_is_variance_of_projections():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(9, 50)) * np.linspace(0.1, 2.0, 50)
    result = landscape.pca(jnp.asarray(data), num_components=4)
    proj = (data - data.mean(0)) @ np.asarray(result.directions).T
    # Var along u_i with the S - 1 convention equals sigma_i^2 (float64 rounding only).
    np.testing.assert_allclose(proj.var(axis=0, ddof=1), result.variances, rtol=1e-10)
    assert result.directions.shape == (4, 50)


def test_pca_never_forms_p_by_p_when_samples_are_few():
    num_samples, dim = 6, 4000
    data = jnp.zeros((num_samples, dim), jnp.float32)
    jaxpr = jax.make_jaxpr(landscape.pca)(data)

    def shapes(jx):  # every intermediate's shape, descending into sub-jaxprs (pjit, custom_jvp)
        for eqn in jx.eqns:
            for var in eqn.outvars:
                yield getattr(var.aval, "shape", ())
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    yield from shapes(inner)

    big = [s for s in shapes(jaxpr.jaxpr) if sum(d >= dim for d in s) >= 2]
    assert not big, f"pca built a P x P intermediate: {big}"


def test_pca_bad_input():
    with pytest.raises(ValueError, match="at least 2 samples"):
        landscape.pca(jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="num_samples, dim"):
        landscape.pca(jnp.ones(5))
    with pytest.raises(ValueError, match="num_components"):
        landscape.pca(jnp.ones((4, 5)), num_components=4)


# -------------------------------------------------------------- interval flatness

SEARCH = landscape.BracketSearch(init_step=1e-3, max_distance=1e3, num_bisect=40)
# With 40 bisections the crossing is located to (bracket) / 2^41 < 1e-12 relative:
# float64 roundoff of the loss near the crossing dominates, hence rtol = 1e-8.
RTOL = 1e-8


def _quadratic(dim, seed, loss0=0.3):
    """L = 1/2 theta^T A theta + loss0, A's eigenvalues geometric in [0.05, 20]: (loss_fn, A, Q, eigenvalues)."""
    return testing.quadratic(dim, seed, loss0)


def _closed_form(a, theta0, u, loss0, c):
    """Roots of L(theta0 + s u) = c L(theta0) for L = ½ θᵀAθ + L0: ½ k s² + b s - (c-1) L(θ0) = 0."""
    k = u @ a @ u
    b = u @ a @ theta0
    level = 0.5 * theta0 @ a @ theta0 + loss0
    disc = math.sqrt(b * b + 2 * k * (c - 1) * level)
    return (disc + b) / k, (disc - b) / k  # left s_-, right s_+


@pytest.mark.parametrize("factor", [2.0, math.e])
@pytest.mark.usefixtures("x64")
def test_flatness_along_eigendirections_matches_closed_form(factor):
    loss0 = 0.3
    loss_fn, _, q, eig = _quadratic(5, seed=0, loss0=loss0)
    result = landscape.flatness_along(loss_fn, jnp.zeros(5), jnp.asarray(q.T), factors=(factor,),
                                      search=SEARCH)
    expected = 2 * np.sqrt(2 * (factor - 1) * loss0 / eig)
    np.testing.assert_allclose(result.width[0], expected, rtol=RTOL)
    np.testing.assert_allclose(result.left[0], result.right[0], rtol=RTOL)  # symmetric
    assert not np.any(result.capped)
    np.testing.assert_allclose(result.loss, loss0, rtol=1e-15)


@pytest.mark.usefixtures("x64")
def test_flatness_non_eigen_and_off_centre_match_closed_form():
    loss0 = 0.2
    rng = np.random.default_rng(3)
    loss_fn, a, _, _ = _quadratic(6, seed=1, loss0=loss0)
    dirs = rng.normal(size=(4, 6))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    for theta0 in (np.zeros(6), rng.normal(size=6)):  # minimiser, then off-centre
        result = landscape.flatness_along(loss_fn, jnp.asarray(theta0), jnp.asarray(dirs),
                                          factors=landscape.FACTORS, search=SEARCH)
        for i, c in enumerate(landscape.FACTORS):
            for j, u in enumerate(dirs):
                left, right = _closed_form(a, theta0, u, loss0, c)
                np.testing.assert_allclose(result.left[i, j], left, rtol=RTOL)
                np.testing.assert_allclose(result.right[i, j], right, rtol=RTOL)
                np.testing.assert_allclose(result.width[i, j], left + right, rtol=RTOL)
    # Off-centre the interval is asymmetric: the test above would catch a symmetric answer.
    assert not np.allclose(result.left, result.right, rtol=1e-2)


@pytest.mark.usefixtures("x64")
def test_flatness_when_first_step_already_exceeds():
    # init_step larger than both crossings: the bracket is [0, init_step] from the start.
    loss_fn = lambda th: 50.0 * jnp.sum(th**2) + 0.01
    search = landscape.BracketSearch(init_step=1.0, max_distance=10.0, num_bisect=45)
    result = landscape.interval_flatness(loss_fn, jnp.zeros(2), jnp.array([1.0, 0.0]),
                                         factor=2.0, search=search)
    # 50 s² = 0.01 → s = sqrt(2e-4); bracket 1 / 2^46 ~ 1e-14 absolute.
    np.testing.assert_allclose(result.right, math.sqrt(2e-4), rtol=1e-9)
    np.testing.assert_allclose(result.left, math.sqrt(2e-4), rtol=1e-9)


@pytest.mark.usefixtures("x64")
def test_flatness_cap_and_flag_on_a_one_sided_loss():
    # L = L0 exp(theta_0): crosses c L0 at s = log c on the right, never on the left.
    loss_fn = lambda th: 0.5 * jnp.exp(th[0]) + 0.0 * th[1]
    search = landscape.BracketSearch(init_step=1e-2, max_distance=7.0, num_bisect=40)
    result = landscape.flatness_along(loss_fn, jnp.zeros(2), jnp.array([[1.0, 0.0], [0.0, 1.0]]),
                                      factors=landscape.FACTORS, search=search)
    np.testing.assert_allclose(result.right[:, 0], np.log(landscape.FACTORS), rtol=1e-9)
    np.testing.assert_allclose(result.left[:, 0], 7.0)
    np.testing.assert_allclose(result.width[:, 1], 14.0)  # flat direction: both sides capped
    assert np.all(result.capped)


def test_flatness_jits_and_vmaps_like_a_loop():
    loss_fn, _, _, _ = _quadratic(4, seed=2)
    dirs = jnp.eye(4)
    jitted = jax.jit(lambda d: landscape.flatness_along(loss_fn, jnp.ones(4) * 0.1, d,
                                                        search=landscape.BracketSearch(num_bisect=20)))
    batched = jitted(dirs)
    for j in range(4):
        single = landscape.interval_flatness(loss_fn, jnp.ones(4) * 0.1, dirs[j], factor=2.0,
                                             search=landscape.BracketSearch(num_bisect=20))
        # Same float32 operations in the same order; vmap may reassociate reductions.
        np.testing.assert_allclose(batched.width[0, j], single.width, rtol=1e-5)


def test_flatness_bad_input():
    loss_fn = lambda th: jnp.sum(th**2) + 1.0
    with pytest.raises(ValueError, match="factors"):
        landscape.flatness_along(loss_fn, jnp.zeros(2), jnp.eye(2), factors=(1.0,))
    with pytest.raises(ValueError, match="init_step"):
        landscape.BracketSearch(init_step=0.0)
    with pytest.raises(ValueError, match="max_distance"):
        landscape.BracketSearch(init_step=1.0, max_distance=0.5)
    with pytest.raises(ValueError, match="direction"):
        landscape.interval_flatness(loss_fn, jnp.zeros(2), jnp.zeros(3), factor=2.0)


@pytest.mark.usefixtures("x64")
def test_trajectory_flatness_on_designed_snapshots():
    """Snapshots whose PCs are A's eigenvectors: widths are the closed form along each."""
    dim, num_samples, loss0 = 5, 12, 0.4
    rng = np.random.default_rng(4)
    loss_fn, a, q, eig = _quadratic(dim, seed=5, loss0=loss0)
    # Centred orthonormal columns z_i of R^S scaled so that Var_i = v_i exactly.
    basis, _ = np.linalg.qr(np.column_stack([np.ones(num_samples), rng.normal(size=(num_samples, dim))]))
    variances = np.array([9.0, 4.0, 1.0, 0.25, 0.0625])
    z = basis[:, 1:] * np.sqrt((num_samples - 1) * variances)
    theta_star = rng.normal(size=dim) * 0.1
    snapshots = theta_star + z @ q.T
    comps, flat = landscape.trajectory_flatness(
        jnp.asarray(snapshots), loss_fn, reference=jnp.asarray(theta_star), num_components=dim,
        factors=(2.0,), search=SEARCH)
    np.testing.assert_allclose(comps.variances, variances, rtol=1e-10)
    for j in range(dim):
        left, right = _closed_form(a, theta_star, np.asarray(comps.directions[j]), loss0, 2.0)
        np.testing.assert_allclose(flat.width[0, j], left + right, rtol=RTOL)
    # The directions are A's eigenvectors (|cos| = 1), so the widths are eigenvalue-driven.
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(comps.directions) * q.T, axis=1)), 1.0, atol=1e-9)
    default = landscape.trajectory_flatness(jnp.asarray(snapshots), loss_fn, num_components=2,
                                            factors=(2.0,), search=SEARCH)[1]
    expected = landscape.flatness_along(loss_fn, jnp.asarray(snapshots[-1]), comps.directions[:2],
                                        factors=(2.0,), search=SEARCH)
    np.testing.assert_allclose(default.width, expected.width, rtol=1e-12)  # reference = last row


@pytest.mark.usefixtures("x64")
def test_trend_fraction_matches_least_squares_and_its_white_noise_mean():
    """Against an independent dense fit, and against E = degree / (S - 1) for white noise."""
    num_samples, dim, degree = 200, 400, 4
    rng = np.random.default_rng(7)
    t = np.linspace(-1.0, 1.0, num_samples)
    # Drift along e_0 (a cubic in t) and e_1 (a parabola) plus white noise everywhere.
    noise = rng.normal(size=(num_samples, dim))
    data = noise.copy()
    data[:, 0] += 100.0 * t**3
    data[:, 1] += 100.0 * t**2
    # Random orthonormal rows whose first two are +-e_0 and +-e_1 (QR keeps leading spans).
    basis = rng.normal(size=(dim, dim))
    basis[:, :2] = np.eye(dim)[:, :2]
    directions = np.linalg.qr(basis)[0].T
    got = np.asarray(landscape.trend_fraction(jnp.asarray(data), jnp.asarray(directions), degree=degree))
    # Dense reference: R^2 of regressing each centred coordinate on [1, t, ..., t^degree].
    coords = (data - data.mean(0)) @ directions.T
    vander = np.vander(t, degree + 1)
    fitted = vander @ np.linalg.lstsq(vander, coords, rcond=None)[0]
    want = np.sum(fitted**2, axis=0) / np.sum(coords**2, axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)  # same projection, float64
    assert got[0] > 0.99 and got[1] > 0.99  # drift variance >= 1e4 * 4/45 ~ 900 x the noise: ~0.999
    # White-noise coordinates: the centred vector is isotropic in the (S - 1)-dim complement
    # of the constant, so its trend fraction is Beta(d/2, (S-1-d)/2) with mean d / (S - 1).
    # The remaining directions are orthonormal, so their coordinates are independent: the
    # mean of dim - 2 of them is within 5 standard errors of d / (S - 1).
    white = got[2:]
    mean = degree / (num_samples - 1)
    var = mean * (1 - mean) / ((num_samples - 1) / 2 + 1)
    assert abs(white.mean() - mean) < 5 * np.sqrt(var / white.size)
    # An exact polynomial of degree <= d is all trend; a constant coordinate has fraction 0.
    poly = np.outer(2.0 * t**4 - t, directions[5]) + 1.0
    np.testing.assert_allclose(landscape.trend_fraction(jnp.asarray(poly), jnp.asarray(directions[5:6]),
                                                        degree=degree), [1.0], rtol=1e-12)
    flat = np.ones((num_samples, dim))
    assert float(landscape.trend_fraction(jnp.asarray(flat), jnp.asarray(directions[:1]))[0]) == 0.0


def test_trend_fraction_bad_input():
    data, directions = jnp.zeros((6, 3)), jnp.eye(3)
    with pytest.raises(ValueError, match="degree=5 must be an integer in \\[1, 4\\]"):
        landscape.trend_fraction(data, directions, degree=5)
    with pytest.raises(ValueError, match="directions \\(k, P\\)"):
        landscape.trend_fraction(data, jnp.eye(4))


# ------------------------------------------------------------------------ psi fit


def test_fit_recovers_psi_within_its_interval():
    psi_true, covered, num_seeds = 4.0, 0, 20
    for seed in range(num_seeds):
        rng = np.random.default_rng(seed)
        widths = np.geomspace(0.1, 10.0, 30) * np.exp(rng.normal(0, 0.05, 30))
        variances = 3e-2 * widths ** (-psi_true) * np.exp(rng.normal(0, 0.3, 30))
        # PC 1 (drift mode): huge variance AND wide, which would flatten the slope if fitted.
        widths[0], variances[0] = 100.0, 1e3
        fit = landscape.variance_flatness_fit(variances, widths, num_excluded=1, num_boot=500, seed=seed)
        covered += fit.psi_low <= psi_true <= fit.psi_high
        # log-noise 0.3 over two decades of F: OLS slope s.e. ~ 0.3 / (1.33 sqrt(30)) ~ 0.04.
        assert abs(fit.psi - psi_true) < 0.25
        assert fit.spearman < -0.9
        assert fit.num_points == 29
    # 95 % intervals: P(Binomial(20, 0.95) <= 15) < 0.4 %; bootstrap percentile intervals
    # under-cover slightly at n = 29, so 16 leaves margin without being vacuous.
    assert covered >= 16
    bad = landscape.variance_flatness_fit(variances, widths, num_excluded=0, num_boot=200)
    assert abs(bad.psi - psi_true) > 0.5  # the drift mode is why exclusion exists


def test_fit_excludes_invalid_points_and_rejects_too_few():
    widths = np.array([50.0, 1.0, 2.0, 4.0, 8.0, 1e6])
    variances = widths ** -2.0
    valid = np.array([True, True, True, True, True, False])  # the last one is a capped width
    variances[-1] = 1.0  # would break the exact power law if used
    fit = landscape.variance_flatness_fit(variances, widths, valid=valid, num_boot=100)
    np.testing.assert_allclose([fit.psi, fit.psi_low, fit.psi_high], 2.0, atol=1e-9)  # noiseless
    assert fit.num_points == 4
    with pytest.raises(ValueError, match="usable points"):
        landscape.variance_flatness_fit(variances[:4], widths[:4], num_excluded=2)
    with pytest.raises(ValueError, match="equal length"):
        landscape.variance_flatness_fit(variances, widths[:3])


# ------------------------------------------------------- filter normalisation


def _filter_norms(a):
    """Norm of each slice a[..., j] computed by an explicit loop (the definition)."""
    return np.array([np.linalg.norm(np.asarray(a)[..., j]) for j in range(a.shape[-1])])


@pytest.mark.parametrize("name,kwargs", [
    ("mlp", dict(in_dim=5, hidden=(7, 3), out_dim=2)),
    ("cnn", dict(input_shape=(8, 8, 2), channels=(4,), hidden=(6,), out_dim=3)),
])
def test_filter_normalize_matches_definition(name, kwargs):
    model = make_model(name, **kwargs)
    # Jitted setup: eager op-by-op dispatch would dominate this test's time.
    params = jax.jit(model.init)(jax.random.key(0))
    params = jax.tree.map(lambda p: np.asarray(p + 0.1 * np.arange(p.size).reshape(p.shape) / p.size, p.dtype), params)
    direction = jax.jit(lambda k: landscape.random_direction(params, key=k))(jax.random.key(1))
    normalize = jax.jit(landscape.filter_normalize, static_argnames="zero_bias")  # one compile, not one per op
    for zero_bias in (True, False):
        normed = normalize(direction, params, zero_bias=zero_bias)
        for p, d, n in zip(jax.tree.leaves(params), jax.tree.leaves(direction), jax.tree.leaves(normed)):
            if p.ndim == 1:
                if zero_bias:
                    assert np.all(np.asarray(n) == 0)
                else:
                    np.testing.assert_allclose(np.linalg.norm(n), np.linalg.norm(p), rtol=1e-5)
                continue
            # float32 norms: relative error ~ sqrt(size) * 6e-8 < 1e-5.
            np.testing.assert_allclose(_filter_norms(n), _filter_norms(p), rtol=1e-5)
            # Each filter keeps its direction: n[..., j] is a positive multiple of d[..., j].
            for j in range(p.shape[-1]):
                nj, dj = np.asarray(n)[..., j].ravel(), np.asarray(d)[..., j].ravel()
                cos = nj @ dj / (np.linalg.norm(nj) * np.linalg.norm(dj))
                np.testing.assert_allclose(cos, 1.0, rtol=1e-5)


def test_filter_normalize_keeps_zero_filters_finite():
    params = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    direction = {"w": jnp.array([[0.0, 1.0], [0.0, 1.0]])}
    normed = landscape.filter_normalize(direction, params)
    np.testing.assert_array_equal(normed["w"][:, 0], 0.0)
    np.testing.assert_allclose(np.linalg.norm(normed["w"][:, 1]), np.sqrt(20.0), rtol=1e-6)
    with pytest.raises(ValueError, match="structure"):
        landscape.filter_normalize({"v": direction["w"]}, params)


def test_random_direction_structure_and_determinism():
    params = {"a": jnp.zeros((3, 2)), "b": [jnp.zeros(4, jnp.float32)]}
    d1 = landscape.random_direction(params, key=jax.random.key(7))
    d2 = landscape.random_direction(params, key=jax.random.key(7))
    d3 = landscape.random_direction(params, key=jax.random.key(8))
    assert jax.tree.structure(d1) == jax.tree.structure(params)
    assert all(x.shape == p.shape and x.dtype == p.dtype
               for x, p in zip(jax.tree.leaves(d1), jax.tree.leaves(params)))
    np.testing.assert_array_equal(d1["a"], d2["a"])
    assert not np.allclose(d1["a"], d3["a"])


# ----------------------------------------------------------------- profiles


def _tiny_loss():
    model = make_model("mlp", in_dim=3, hidden=(4,), out_dim=2, activation="tanh")
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(10, 3))), jnp.asarray(rng.normal(size=(10, 2)))
    masks = tuple(jnp.ones(s.shape) for s in model.sites)

    @jax.jit  # the reference evaluations below would otherwise dispatch op by op
    def loss_fn(params):
        out = jax.vmap(model.apply, in_axes=(None, 0, None))(params, x, masks)
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=1))

    return model, loss_fn


@pytest.mark.usefixtures("x64")
def test_profiles_and_interpolation_against_direct_evaluation():
    model, loss_fn = _tiny_loss()
    params = model.init(jax.random.key(0), jnp.float64)
    other = model.init(jax.random.key(1), jnp.float64)
    dx = landscape.filter_normalize(landscape.random_direction(params, key=jax.random.key(2)), params)
    dy = landscape.filter_normalize(landscape.random_direction(params, key=jax.random.key(3)), params)
    shift = lambda p, d, s: jax.tree.map(lambda a, b: a + s * b, p, d)
    alphas = jnp.linspace(-1.0, 1.0, 5)
    betas = jnp.array([-0.5, 0.0, 0.7])
    prof = landscape.profile_1d(loss_fn, params, dx, alphas)
    # Exact equality at s = 0 (params + 0 * d == params bitwise); elsewhere float64 roundoff.
    assert prof[2] == loss_fn(params)
    for i, a in enumerate(alphas):
        np.testing.assert_allclose(prof[i], loss_fn(shift(params, dx, a)), rtol=1e-13)
    grid = landscape.profile_2d(loss_fn, params, dx, dy, alphas, betas)
    assert grid.shape == (5, 3)
    assert grid[2, 1] == loss_fn(params)
    np.testing.assert_allclose(grid[0, 2], loss_fn(shift(shift(params, dx, -1.0), dy, 0.7)), rtol=1e-13)
    ts = jnp.array([0.0, 0.5, 1.0, 1.5])
    line = landscape.interpolate(loss_fn, params, other, ts)
    assert line[0] == loss_fn(params) and line[2] == loss_fn(other)  # (1-t) a + t b is exact at 0, 1
    mid = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, params, other)
    np.testing.assert_allclose(line[1], loss_fn(mid), rtol=1e-13)
    assert line[3] > 0 and np.isfinite(line[3])
