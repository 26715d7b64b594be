"""Numerics of sme.sde and sme.diffusion against exact or closed-form references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from jax.flatten_util import ravel_pytree

from sme import covariance, diffusion, dropout, losses, models, rng, sde, testing


def _net(keep_prob=0.7, mode="shared", arch="two_layer", n=5):
    if arch == "two_layer":
        model = models.make_model("two_layer", in_dim=3, hidden=(4,), out_dim=1, keep_prob=keep_prob)
        out = 1
    else:  # dropout on the last of two hidden layers, biases, two outputs
        model = models.make_model("mlp", in_dim=3, hidden=(3, 4), out_dim=2, keep_prob=keep_prob,
                                  dropout_layers=(1,), use_bias=True, activation="tanh")
        out = 2
    params = model.init(jax.random.key(1), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(2), (n, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(3), (n, out), jnp.float64)
    return diffusion.Problem(model, "mse", mode, x, y), params


def _flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def _noise_jacobian(fn, noise):
    """d fn / d noise as a (P, D) matrix over the Gaussian parts (sorted by name)."""
    gauss = {k: v for k, v in noise.items() if k != "masks"}
    jac = jax.jit(jax.jacfwd(lambda g: ravel_pytree(fn({**noise, **g}))[0]))(gauss)
    return np.concatenate([np.asarray(jac[k]).reshape(jac[k].shape[0], -1) for k in sorted(jac)], axis=1)


# --- Brownian increments -------------------------------------------------------------------------


def test_brownian_increments_pass_ks_and_are_reproducible_from_key_and_step():
    sde_key = rng.stream_key(0, rng.SDE, replica=5)
    draw = jax.jit(jax.vmap(lambda step: jax.random.normal(sde.substep_key(sde_key, step, 2), (4,))))
    z = np.asarray(draw(jnp.arange(5000))).ravel()
    # The keys are fixed, so this p-value is a constant of the code: no flakiness. A broken stream
    # (repeated keys, wrong scale) gives p < 1e-10 at 20,000 draws.
    assert scipy.stats.kstest(z, "norm").pvalue > 0.01
    again = np.asarray(draw(jnp.arange(5000))).ravel()
    np.testing.assert_array_equal(z, again)
    key = lambda seed, step, j, replica=0, tag=0: np.asarray(jax.random.key_data(  # noqa: E731
        sde.substep_key(rng.stream_key(seed, rng.SDE, replica=replica), step, j, tag=tag)))
    assert np.array_equal(key(0, 3, 1, replica=2, tag=0), key(0, 3, 1, replica=2, tag=0))
    distinct = {key(0, 3, 1, replica=2).tobytes(), key(0, 4, 1, replica=2).tobytes(), key(0, 3, 2, replica=2).tobytes(),
                key(0, 3, 1, replica=3).tobytes(), key(0, 3, 1, replica=2, tag=1).tobytes(),
                key(1, 3, 1, replica=2).tobytes()}
    assert len(distinct) == 6


def test_bridge_substeps_are_iid_standard_normal_and_sum_to_the_total(x64):
    keys = jax.random.split(jax.random.key(0), 20000)
    total = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), (1,)))(keys)
    xis = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), (4, 1)))(keys)
    sub = np.asarray(jax.vmap(sde.bridge)(total, xis))[..., 0]  # (20000, 4)
    np.testing.assert_allclose(sub.sum(1), 2.0 * np.asarray(total)[:, 0], atol=1e-12)  # sqrt(4) = 2
    cov = np.cov(sub.T)
    # Unit variances, zero correlations: standard error of a sample covariance ~ 1/sqrt(20000) = 0.007.
    np.testing.assert_allclose(cov, np.eye(4), atol=0.04)
    assert scipy.stats.kstest(sub[:, 1], "norm").pvalue > 0.01


# --- Euler-Maruyama on linear and geometric SDEs -------------------------------------------------


def _ou(dim=3, scale=0.3):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(dim, dim))
    a = q @ q.T / dim + 0.5 * np.eye(dim)
    s = rng.normal(size=(dim, dim + 1)) * 0.7
    b = rng.normal(size=dim)
    problem = sde.SDE(drift=lambda th, xi: -(jnp.asarray(a) @ th) + jnp.asarray(b),
                      diffusion=lambda th, xi: jnp.asarray(s) @ xi,
                      sample_noise=lambda key: jax.random.normal(key, (dim + 1,), jnp.float64), scale=scale)
    return problem, a, s, b


def test_ou_euler_maruyama_moments_equal_the_exact_discrete_recursion(x64):
    problem, a, s, b = _ou()
    h, steps, dim = 0.07, 60, 3
    step = lambda th, xi: sde.em_step(problem, th, xi, h=h)
    jac_th = np.asarray(jax.jacfwd(step, argnums=0)(jnp.zeros(dim), jnp.zeros(dim + 1)))
    jac_xi = np.asarray(jax.jacfwd(step, argnums=1)(jnp.zeros(dim), jnp.zeros(dim + 1)))
    m, c = np.array([1.0, -2.0, 0.5]), np.zeros((dim, dim))
    m_ref, c_ref = m.copy(), c.copy()
    for _ in range(steps):
        # The step is affine in (theta, xi), so its moment map is exact: mean through step(., 0),
        # covariance through the Jacobians.
        m = np.asarray(step(jnp.asarray(m), jnp.zeros(dim + 1)))
        c = jac_th @ c @ jac_th.T + jac_xi @ jac_xi.T
        # Hand-written recursion: m' = (I - hA)m + hb, C' = (I - hA)C(I - hA)^T + scale h S S^T.
        f = np.eye(dim) - h * a
        m_ref = f @ m_ref + h * b
        c_ref = f @ c_ref @ f.T + problem.scale * h * s @ s.T
    # Float64 products of O(1) matrices over 60 steps: agreement to 1e-10 is exact arithmetic.
    np.testing.assert_allclose(m, m_ref, atol=1e-10)
    np.testing.assert_allclose(c, c_ref, atol=1e-10)
    # The keyed integrator realises those moments (Monte Carlo over 20,000 paths).
    run = jax.jit(jax.vmap(lambda k: sde.em_integrate(problem, jnp.array([1.0, -2.0, 0.5]), key=k,
                                                       num_steps=steps, h=h)))
    ends = np.asarray(run(jax.random.split(jax.random.key(3), 20000)))
    se = np.sqrt(np.diag(c_ref) / 20000)
    assert np.all(np.abs(ends.mean(0) - m_ref) < 5 * se)  # 5 standard errors: ~1e-6 false alarm
    np.testing.assert_allclose(np.cov(ends.T), c_ref, atol=5 * np.sqrt(2 / 20000) * np.max(np.diag(c_ref)))


def test_euler_maruyama_weak_order_one_and_strong_order_half_on_gbm(x64):
    """dX = mu X dt + sigma X dW, X_0 = 1: X_T = exp((mu - sigma^2/2) T + sigma W_T) on the same path."""
    mu, sig, fine_steps, paths = 1.0, 0.6, 64, 40000
    gbm = sde.SDE(drift=lambda x, xi: mu * x, diffusion=lambda x, xi: sig * x * xi,
                  sample_noise=lambda key: jax.random.normal(key, (), jnp.float64), scale=1.0)
    xi = jax.random.normal(jax.random.key(0), (paths, fine_steps), jnp.float64)
    exact = np.exp(mu - sig**2 / 2 + sig * np.asarray(xi.sum(1)) / np.sqrt(fine_steps))  # T = 1
    strong, weak, hs = [], [], []
    for factor in (16, 8, 4, 2, 1):  # nested grids on one Brownian path
        coarse = jax.vmap(lambda z: sde.coarsen(z, factor))(xi)
        h = factor / fine_steps
        end = np.asarray(jax.vmap(lambda z: sde.em_scan(gbm, jnp.asarray(1.0), z, h=h))(coarse))
        hs.append(h)
        strong.append(np.mean(np.abs(end - exact)))
        weak.append(abs(np.mean(end - exact)))  # paired with the exact solution: small variance
    strong_slope = np.polyfit(np.log(hs), np.log(strong), 1)[0]
    weak_slope = np.polyfit(np.log(hs), np.log(weak), 1)[0]
    # Theory: strong 1/2, weak 1. Bands of +-0.15 hold the finite-h and Monte Carlo deviations
    # (weak errors 0.02-0.3 here against a paired standard error below 2e-3).
    assert 0.35 <= strong_slope <= 0.65, strong_slope
    assert 0.85 <= weak_slope <= 1.15, weak_slope
    # EM's mean is known exactly for GBM: E X_N = (1 + mu h)^N.
    for h, w in zip(hs, weak):
        assert abs(w - abs(np.exp(mu) - (1 + mu * h) ** round(1 / h))) < 5e-3


def test_stationary_covariance_on_a_quadratic_loss_matches_lyapunov_to_order_eps(x64):
    """L = theta^T A theta / 2 with constant Sigma: the SME's stationary C solves A C + C A = eps Sigma."""
    a = np.array([[2.0, 0.5], [0.5, 1.0]])
    root = np.array([[1.0, 0.3, 0.0], [0.2, 0.8, 0.5]])  # Sigma = root root^T
    sigma = root @ root.T
    rel = []
    for eps in (0.2, 0.1):
        quad = sde.SDE(drift=lambda th, xi: -(jnp.asarray(a) @ th), diffusion=lambda th, xi: jnp.asarray(root) @ xi,
                       sample_noise=lambda key: jax.random.normal(key, (3,), jnp.float64), scale=eps)
        steps = int(round(12.0 / eps))  # t = 12 >> 1/lambda_min(A) ~ 1.4: stationary to e^-17
        run = jax.jit(jax.vmap(lambda k: sde.em_integrate(quad, jnp.zeros(2), key=k, num_steps=steps, h=eps)))
        ends = np.asarray(run(jax.random.split(jax.random.key(int(eps * 100)), 40000)))
        cont = scipy.linalg.solve_continuous_lyapunov(a, eps * sigma)
        f = np.eye(2) - eps * a  # EM's exact stationary covariance: C = F C F^T + eps h Sigma, h = eps
        disc = scipy.linalg.solve_discrete_lyapunov(f, eps * eps * sigma)
        sample = np.cov(ends.T)
        # Monte Carlo: a sample covariance of 40,000 draws is within ~4 sqrt(2/N) relative of the truth.
        np.testing.assert_allclose(sample, disc, atol=4 * np.sqrt(2 / 40000) * np.abs(disc).max())
        rel.append(np.abs(sample - cont).max() / np.abs(cont).max())
    # O(eps) relative error that halves with eps (exact discrete values: 0.29 and 0.14).
    assert rel[0] < 0.35 and rel[1] < 0.2 and 1.5 < rel[0] / rel[1] < 2.7, rel


# --- Diffusion samples -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
@pytest.mark.parametrize("arch", ["two_layer", "deep_bias"])
def test_exact_and_closed_form_samples_have_covariance_exactly_sigma(mode, arch, x64):
    problem, params = _net(mode=mode, arch=arch)
    sigma = np.asarray(covariance.dense(covariance.exact_mask_covariance(
        problem.model, "mse", params, problem.x, problem.y, mode=mode)))
    for name in ("exact", "closed_form"):
        noise = diffusion.sample_noise(problem, name, key=jax.random.key(0), num_masks=4)
        jac = _noise_jacobian(lambda nz: diffusion.diffusion_sample(problem, name, params, nz), noise)
        # The sample is linear in a standard Gaussian, so its covariance is J J^T exactly; both are
        # float64 sums of <= 2**4 x 5 terms of size ~0.1: 1e-12 is rounding.
        np.testing.assert_allclose(jac @ jac.T, sigma, atol=1e-12)
    trace = float(diffusion.closed_form_trace(problem, params))
    assert abs(trace - np.trace(sigma)) < 1e-12


def test_masks_sample_has_covariance_exactly_the_k_mask_estimate(x64):
    for mode in ("shared", "per_sample"):
        problem, params = _net(mode=mode)
        noise = diffusion.sample_noise(problem, "masks", key=jax.random.key(4), num_masks=6)
        grad = jax.grad(lambda p, m: losses.dropout_risk(problem.model, "mse", p, problem.x, problem.y, m, mode=mode))
        rows = np.asarray(jax.jit(jax.vmap(lambda m: ravel_pytree(grad(params, m))[0]))(noise["masks"]))
        centred = rows - rows.mean(0)
        sigma_k = centred.T @ centred / 5  # G_c^T G_c / (K - 1)
        jac = _noise_jacobian(lambda nz: diffusion.diffusion_sample(problem, "masks", params, nz), noise)
        np.testing.assert_allclose(jac @ jac.T, sigma_k, atol=1e-13)


def test_uniforms_reproduce_the_training_masks_and_the_coupling_is_countermonotone():
    model = models.make_model("mlp", in_dim=3, hidden=(4, 6), out_dim=1, keep_prob=0.7, dropout_layers=None)
    for x64 in (False, True):  # both precisions in one test: the masks must agree in each
        with jax.enable_x64(x64):
            for shape in ((), (5,)):
                both = jax.jit(lambda key, s=shape: (
                    dropout.sample_masks(model.sites, key=key, batch_shape=s),
                    diffusion.masks_from_uniforms(model.sites, diffusion.unit_uniforms(model.sites, key=key,
                                                                                        batch_shape=s))))
                masks, again = both(jax.random.key(11))
                for a, b in zip(masks, again):
                    np.testing.assert_array_equal(a, b)
    u, zeta = jax.jit(lambda key: (lambda v: (v, diffusion.coupled_normals(v)))(
        diffusion.unit_uniforms(model.sites, key=key, batch_shape=(20000,))))(jax.random.key(0))
    zeta = np.asarray(zeta)[:, 0]
    kept = np.asarray(u)[:, 0] < 0.7
    assert np.all(np.isfinite(zeta)) and scipy.stats.kstest(zeta, "norm").pvalue > 0.01
    corr = np.corrcoef(zeta, kept)[0, 1]
    # Maximal |correlation| of a Bernoulli(0.7) and a Gaussian: phi(Phi^-1(0.7)) / sqrt(0.21) = 0.6999.
    assert abs(corr + scipy.stats.norm.pdf(scipy.stats.norm.ppf(0.7)) / np.sqrt(0.21)) < 0.02
    edge = diffusion.coupled_normals(jnp.array([0.0, 1.0 - 2.0**-23], jnp.float32))
    assert np.all(np.isfinite(np.asarray(edge)))


# --- Drifts and SVAG --------------------------------------------------------------------------------


def test_drifts_equal_autodiff_of_their_modified_losses(x64):
    problem, params = _net()
    lr = 0.3
    masks, probs = dropout.enumerate_masks(problem.model.sites)
    grad = jax.grad(losses.dropout_risk, argnums=2)

    def loss_s(p):
        return losses.modified_loss(problem.model, "mse", p, problem.x, problem.y)

    def mean_sq_grad(p):  # E_eta ||grad R^drop||^2 written out over the 16 masks
        return sum(probs[e] * jnp.sum(ravel_pytree(grad(problem.model, "mse", p, problem.x, problem.y,
                                                        tuple(m[e] for m in masks), mode="shared"))[0] ** 2)
                   for e in range(len(probs)))

    refs = {
        "order1": lambda p: loss_s(p),
        "order2": lambda p: loss_s(p) + lr / 4 * jnp.sum(ravel_pytree(jax.grad(loss_s)(p))[0] ** 2),
        "r2": lambda p: loss_s(p) + lr / 4 * mean_sq_grad(p),
    }
    for kind, ref in refs.items():
        want = -_flat(jax.jit(jax.grad(ref))(params))
        for est in ("closed_form", "exact"):
            drift = jax.jit(lambda p, k=kind, e=est: sde.sme_drift(problem, sde.Drift(k, e, "exact", "exact"),
                                                                    p, None, lr=lr))
            got = _flat(drift(params))
            np.testing.assert_allclose(got, want, atol=1e-12)  # float64, O(1) values
    # The r2 drift's one-sample trace estimate is exact on average: E_xi ||s(xi)||^2 is a quadratic
    # form, and the mean over xi = sqrt(D) e_j, j = 1..D is its trace.
    d = sum(int(np.prod(s)) for s in diffusion.noise_shapes(problem, "closed_form", num_masks=0).values())
    shapes = diffusion.noise_shapes(problem, "closed_form", num_masks=0)

    def basis_noise(j):
        e = jnp.sqrt(float(d)) * jnp.eye(d)[j]
        return {"z": e[: int(np.prod(shapes["z"]))].reshape(shapes["z"]),
                "zeta": e[int(np.prod(shapes["z"])):].reshape(shapes["zeta"])}

    drift = jax.jit(jax.vmap(lambda j: ravel_pytree(sde.sme_drift(problem, sde.Drift("r2", "closed_form", "closed_form", "sample"),
                                                                  params, basis_noise(j), lr=lr))[0]))
    sampled = np.asarray(drift(jnp.arange(d))).mean(0)
    np.testing.assert_allclose(sampled, -_flat(jax.jit(jax.grad(refs["r2"]))(params)), atol=1e-12)


def test_order2_correction_is_half_eps_hessian_times_gradient(x64):
    problem, params = _net()
    flat, unravel = ravel_pytree(params)
    loss_s = lambda f: losses.modified_loss(problem.model, "mse", unravel(f), problem.x, problem.y)
    g, hess = (np.asarray(a) for a in jax.jit(lambda f: (jax.grad(loss_s)(f), jax.hessian(loss_s)(f)))(flat))
    got = _flat(jax.jit(lambda p: sde.sme_drift(problem, sde.Drift("order2", "closed_form"), p, None, lr=0.2))(params))
    np.testing.assert_allclose(got, -(g + 0.1 * hess @ g), atol=1e-12)


@pytest.mark.parametrize("substeps", [1, 4])
def test_svag_gradient_has_mean_grad_ls_and_covariance_l_sigma(substeps, x64):
    problem, params = _net(keep_prob=0.6)
    masks, probs = dropout.enumerate_masks(problem.model.sites)
    e = len(probs)
    masks = tuple(jnp.asarray(m) for m in masks)
    pair = lambda i, j: tuple(jnp.stack([m[i], m[j]]) for m in masks)
    ii, jj = np.meshgrid(np.arange(e), np.arange(e), indexing="ij")
    one = lambda i, j: ravel_pytree(sde.svag_gradient(problem, params, pair(i, j), substeps=substeps))[0]
    rows = np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(ii.ravel()), jnp.asarray(jj.ravel())))
    w = np.outer(probs, probs).ravel()  # the two masks are independent
    mean = w @ rows
    cov = (rows - mean).T @ ((rows - mean) * w[:, None])
    sigma = np.asarray(covariance.dense(covariance.exact_mask_covariance(
        problem.model, "mse", params, problem.x, problem.y, mode="shared")))
    grad_l = _flat(jax.grad(lambda p: losses.modified_loss(problem.model, "mse", p, problem.x, problem.y))(params))
    np.testing.assert_allclose(mean, grad_l, atol=1e-12)  # exact sums over 256 pairs
    np.testing.assert_allclose(cov, substeps * sigma, atol=1e-12)


# --- Dropout linear regression: E theta_N in closed form ------------------------------------------


linear_dropout_model = testing.linear_dropout_model
linear_problem = testing.linear_problem


def test_dropout_linear_regression_drift_is_the_exact_expected_update(x64):
    """E_eta grad R^drop = M theta - b, M = A + ((1 - p)/p) diag(A), A = X^T X / n, b = X^T y / n
    (E eta_j eta_k = 1 + ((1 - p)/p) [j = k]), so E theta_{N+1} = (I - eps M) E theta_N + eps b."""
    problem = linear_problem(0.5)
    x, y = np.asarray(problem.x), np.asarray(problem.y)[:, 0]
    a, b = x.T @ x / 6, x.T @ y / 6
    m = a + np.diag(np.diag(a))  # (1 - p)/p = 1
    theta = {"w": jnp.array([[0.3], [-0.2], [1.1]])}
    for est in ("closed_form", "exact"):
        got = _flat(sde.sme_drift(problem, sde.Drift("order1", est), theta, None, lr=0.1))
        np.testing.assert_allclose(got, -(m @ _flat(theta) - b), atol=1e-13)


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_fused_increment_equals_drift_plus_scaled_diffusion(mode, x64):
    """make_sme's one-gradient increment grad[-h U + sqrt(eps h) Phi] against its separate parts."""
    problem, params = _net(mode=mode)
    lr, h = 0.3, 0.075
    for drift in sde.DRIFTS:
        for name, est in (("masks", "masks"), ("exact", "closed_form"), ("closed_form", "exact")):
            sme_v = sde.make_sme(problem, drift=drift, diffusion=name, estimator=est, lr=lr, num_masks=5)
            noise = sme_v.sample_noise(jax.random.key(2))
            fused, parts = jax.jit(lambda p, xi, s=sme_v: (
                s.increment(p, xi, h), (s.drift(p, xi), s.diffusion(p, xi))))(params, noise)
            want = _flat(parts[0]) * h + np.sqrt(lr * h) * _flat(parts[1])
            np.testing.assert_allclose(_flat(fused), want, atol=1e-13)  # float64, O(0.1) entries
