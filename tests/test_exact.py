"""The exact linear case (sme.exact) and the lockstep Monte Carlo against it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sme import exact, lockstep
from sme.diffusion import Problem


def _problem(keep_prob=0.8, seed=0, n=8, d=4):
    rng = np.random.default_rng(seed)
    phi = np.tanh(rng.normal(size=(n, d)) @ rng.normal(size=(d, d)))
    return exact.Linear(phi, rng.normal(size=n), keep_prob), 0.7 * rng.normal(size=d)


def test_mask_law_and_mean_map_match_the_moments_of_eta():
    """E eta = 1, E eta_i eta_j = 1 + v delta_ij (v = (1 - p)/p), so E D A D = A + v diag A: written
    from the moments of eta, independently of the enumeration."""
    problem, _ = _problem(0.7)
    eta, probs = exact.masks(problem.dim, 0.7)
    v = 0.3 / 0.7
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-14)
    np.testing.assert_allclose(probs @ eta, np.ones(problem.dim), rtol=1e-13)
    np.testing.assert_allclose(np.einsum("e,ei,ej->ij", probs, eta, eta), 1.0 + v * np.eye(problem.dim), rtol=1e-13)
    g, h, _ = exact.mask_gradients(problem)
    a = problem.gram[0]
    np.testing.assert_allclose(np.einsum("e,eij->ij", probs, g), a + v * np.diag(np.diag(a)), rtol=1e-12)
    np.testing.assert_allclose(problem.a_hat, a + v * np.diag(np.diag(a)), rtol=1e-14)


def test_expected_sigma_at_a_point_is_the_mask_covariance_of_the_gradient():
    problem, a0 = _problem()
    g, h, probs = exact.mask_gradients(problem)
    grads = g @ a0 - h  # (E, d)
    mean = probs @ grads
    want = np.einsum("e,ei,ej->ij", probs, grads - mean, grads - mean)
    np.testing.assert_allclose(exact.expected_sigma(problem, a0, np.outer(a0, a0)), want, atol=1e-14)
    # Affine in (m, S): Sigma's mean over a two-point law of Theta is the mean of Sigma.
    b0 = -a0[::-1]
    mix = exact.expected_sigma(problem, (a0 + b0) / 2, (np.outer(a0, a0) + np.outer(b0, b0)) / 2)
    np.testing.assert_allclose(mix, (exact.expected_sigma(problem, a0, np.outer(a0, a0))
                                     + exact.expected_sigma(problem, b0, np.outer(b0, b0))) / 2, atol=1e-14)


@pytest.mark.parametrize("kind", exact.KINDS)
def test_euler_maruyama_moments_converge_to_the_matrix_exponential_at_rate_h(kind):
    problem, a0 = _problem()
    want = exact.sme_moments(problem, kind, a0, 0.1, [1.0])[0]
    errs = [np.abs(exact.iterate(exact.em_transition(problem, kind, 0.1, l), exact.start(a0), 10)[-1] - want).max()
            for l in (20, 40, 80)]
    # Euler-Maruyama on a linear SDE: moment error c h + O(h^2), so doubling l halves it.
    assert errs[-1] < 1e-3
    np.testing.assert_allclose(np.array(errs[:-1]) / errs[1:], 2.0, rtol=0.05)


def test_ode_control_has_no_covariance_and_sme_covariance_is_order_eps():
    problem, a0 = _problem()
    for lr in (0.1, 0.05):
        ode = exact.covariance(exact.sme_moments(problem, "ode1", a0, lr, [1.0])[0])
        sme = exact.covariance(exact.sme_moments(problem, "order1", a0, lr, [1.0])[0])
        np.testing.assert_allclose(ode, 0.0, atol=1e-12)
        assert np.all(np.linalg.eigvalsh(sme) > -1e-14)
    small = np.linalg.norm(exact.covariance(exact.sme_moments(problem, "order1", a0, 0.05, [1.0])[0]))
    large = np.linalg.norm(exact.covariance(exact.sme_moments(problem, "order1", a0, 0.1, [1.0])[0]))
    np.testing.assert_allclose(large / small, 2.0, rtol=0.05)  # Cov = eps x (an eps-independent matrix)


def test_exact_weak_error_orders():
    """Order 1 and the ODEs are first order in eps; the order-2 SME is second order; in the
    covariance the ODE (Cov = 0) is first order and the SMEs second order. (||a||^2: R_S's
    order-2 error changes sign near eps = 0.05 for this problem, so its slope is not asymptotic there.)"""
    problem, a0 = _problem()
    lrs = np.array([0.025, 0.0125, 0.00625])
    errs = {k: np.array([exact.weak_errors(problem, a0, lr, 1.0, kinds=(k,), fractions=(1.0,))[k]["sq_norm"][0]
                         for lr in lrs]) for k in exact.KINDS}
    covs = {k: np.array([exact.weak_errors(problem, a0, lr, 1.0, kinds=(k,), fractions=(1.0,))[k]["cov"][0]
                         for lr in lrs]) for k in ("order1", "ode1")}
    slope = lambda e: np.polyfit(np.log(lrs), np.log(e), 1)[0]
    for k, want in (("order1", 1), ("ode1", 1), ("ode2", 1), ("order2", 2)):
        assert abs(slope(errs[k]) - want) < 0.15, (k, errs[k])
    assert abs(slope(covs["ode1"]) - 1) < 0.15 and abs(slope(covs["order1"]) - 2) < 0.15


# --- The lockstep Monte Carlo against the exact moments ---------------------------------------------


def _replica_stats(a):
    """Mean (d,), covariance (d, d) and their standard errors from replicas (R, d)."""
    num = a.shape[0]
    mean = a.mean(0)
    c = a - mean
    prods = c[:, :, None] * c[:, None, :]
    return mean, a.std(0, ddof=1) / np.sqrt(num), prods.mean(0) * num / (num - 1), prods.std(0, ddof=1) / np.sqrt(num)


def lockstep_against_exact(keep_prob=0.8, lr=0.2, num_steps=5, substeps=2, num_replicas=4000, layout="replica"):
    """Max |z-score| of every process's replica mean and covariance against the exact moments of
    its chain (dropout GD; Euler-Maruyama of the SMEs and ODEs on the lockstep's own grid)."""
    problem, a0 = _problem(keep_prob, seed=3, d=5)
    variants = ("order1", "order2", "ode1", "ode2")
    spec = lockstep.LockstepSpec(variants=variants, diffusion="closed_form", estimator="closed_form",
                                 substeps=substeps, coupling="quantile", seed=5, layout=layout, chunk_size=1024)
    # a helper several tests call: it sets the float64 it needs itself
    with jax.enable_x64(True):
        model = exact.readout_model(problem.dim, keep_prob)
        prob = Problem(model, "mse", "shared", jnp.asarray(problem.phi), jnp.asarray(problem.y[:, None]))
        params0 = {"out": {"w": jnp.asarray(a0[:, None])}}
        state = jax.jit(lockstep.make_advance(spec))(lockstep.init_lockstep(params0, spec, num_replicas),
                                                     num_steps, lr, prob)
        paths = {k: np.asarray(v["out"]["w"][..., 0]) for k, v in state.paths.items()}
    z0 = exact.start(a0)
    exact_z = {"discrete": np.linalg.matrix_power(exact.dropout_gd_transition(problem, lr), num_steps) @ z0}
    for v in variants:
        exact_z[v] = np.linalg.matrix_power(exact.em_transition(problem, v, lr, substeps), num_steps) @ z0
    scores = {}
    for name, z in exact_z.items():
        mean, mean_se, cov, cov_se = _replica_stats(paths[name])
        m, want_cov = exact.unpack(z)[0], exact.covariance(z)
        if name.startswith("ode"):  # deterministic: replicas agree with the recursion to rounding
            scores[name] = max(np.abs(mean - m).max(), np.abs(cov).max()) / 1e-10
        else:
            iu = np.triu_indices(len(m))
            scores[name] = max(np.abs((mean - m) / mean_se).max(),
                               np.abs((cov - want_cov)[iu] / cov_se[iu]).max())
    return scores


@pytest.mark.parametrize("layout", ["replica", pytest.param("batched", marks=pytest.mark.slow)])
def test_lockstep_means_and_covariances_match_the_exact_moments(layout):
    """Every process of the lockstep (library masks, closed-form L_S, closed-form Sigma^{1/2},
    Euler-Maruyama, fused increments) against sme.exact, which shares none of that code.

    R = 4000 replicas; 5 means + 15 covariance entries per process; z-scores against standard
    errors from the replicas themselves. |z| < 4.5 for all 60 random statistics: a false alarm has
    probability < 60 x 7e-6 (and the seed is fixed). Halving or doubling the diffusion moves the SME
    covariances by -75 % / +300 % of their eps-part, i.e. by tens of standard errors (2-3 % each).
    ODE paths are deterministic here: they must equal the recursion to 1e-10 in float64.
    ``batched``: the same processes with block random draws in chunks of 1024 (sme.lockstep_batched)."""
    scores = lockstep_against_exact(layout=layout)
    assert all(s < 4.5 for s in scores.values()), scores
