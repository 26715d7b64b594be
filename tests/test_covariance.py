import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sme import covariance as cv
from sme import grads, testing

pytestmark = pytest.mark.usefixtures("x64")  # float64 throughout


def _two_layer(keep_prob=0.6, *, n=4):
    return testing.two_layer_problem(keep_prob, n=n)


def _deep(keep_prob=0.5, n=4):
    """Two hidden layers both with dropout (4 droppable units), biases, softmax targets."""
    return testing.mlp_problem(in_dim=3, hidden=(2, 2), out_dim=2, keep_prob=keep_prob, n=n, targets="softmax",
                               seed=11)


def _weighted_cov(values, weights):
    """Reference: dense covariance of a discrete law in NumPy."""
    values, weights = np.asarray(values), np.asarray(weights)
    mean = weights @ values
    centred = values - mean
    return (centred * weights[:, None]).T @ centred


def test_dense_factored_matvec_and_gram_paths_agree():
    g = jax.random.normal(jax.random.key(0), (9, 30), jnp.float64) * jnp.linspace(0.1, 3.0, 30)
    cov = cv.from_samples(g)
    reference = np.cov(np.asarray(g).T, ddof=1)  # NumPy's Sigma_K = G_c^T G_c / (K - 1)
    np.testing.assert_allclose(cv.dense(cov), reference, rtol=1e-12, atol=1e-13)
    v = jax.random.normal(jax.random.key(1), (30,), jnp.float64)
    np.testing.assert_allclose(cv.matvec(cov, v), reference @ v, rtol=1e-11)
    np.testing.assert_allclose(cv.trace(cov), np.trace(reference), rtol=1e-12)
    np.testing.assert_allclose(cv.frobenius(cov), np.linalg.norm(reference), rtol=1e-12)
    values, vectors = cv.top_eigenpairs(cov, 5)
    dense_values = np.linalg.eigvalsh(reference)[::-1]
    np.testing.assert_allclose(values, dense_values[:5], rtol=1e-10)
    np.testing.assert_allclose(vectors @ reference, values[:, None] * vectors, atol=1e-9)
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(5), atol=1e-10)
    # centring the raw Gram matrix gives the same spectrum without forming G_c
    from_raw = cv.centred_gram(g @ g.T, ddof=1)
    np.testing.assert_allclose(cv.gram_eigenvalues(from_raw, 5), dense_values[:5], rtol=1e-10)
    np.testing.assert_allclose(jnp.trace(from_raw), np.trace(reference), rtol=1e-12)
    # sums of covariances stack roots; scaling scales
    np.testing.assert_allclose(cv.dense(cv.add(cov, cv.scale(cov, 2.0))), 3 * reference, rtol=1e-12,
                               atol=1e-13)
    with pytest.raises(ValueError, match="k=10"):
        cv.top_eigenpairs(cov, 10)


def test_weighted_loss_vjp_and_implicit_matvec_need_no_gradient_rows():
    model, params, x, y = _deep()
    masks = grads.draw_masks(model, key=jax.random.key(4), num_masks=6, mode="per_sample", num_examples=4,
                             dtype=jnp.float64)
    lossvec = lambda p: grads.mask_losses(model, "cross_entropy", p, x, y, masks, mode="per_sample")
    g = jax.jit(lambda p: grads.mask_gradients(model, "cross_entropy", p, x, y, masks, mode="per_sample"))(params)
    cov = cv.mask_covariance(g)
    z = jax.random.normal(jax.random.key(5), (6,), jnp.float64)
    v = jax.random.normal(jax.random.key(6), (g.shape[1],), jnp.float64)
    vjp, mv = jax.jit(lambda p: (ravel_pytree(cv.weighted_loss_sample(lossvec, p, z))[0],
                                 cv.implicit_matvec(lossvec, p)(v)))(params)
    np.testing.assert_allclose(vjp, z @ cov.root, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(mv, cv.dense(cov) @ v, rtol=1e-10, atol=1e-14)
    # the keyed sample is z @ root with z drawn from the key
    key = jax.random.key(7)
    np.testing.assert_allclose(cv.sample(cov, key=key),
                               jax.random.normal(key, (6,), jnp.float64) @ cov.root, rtol=1e-12)


def test_exact_sample_covariance_converges_to_sigma_k():
    g = jax.random.normal(jax.random.key(0), (8, 12), jnp.float64) * jnp.linspace(0.2, 2.0, 12)
    cov = cv.from_samples(g)
    n = 20_000
    xi = cv.sample(cov, key=jax.random.key(1), num_samples=n)
    empirical = xi.T @ xi / n  # the sample has mean zero exactly
    sigma = cv.dense(cov)
    # For a Gaussian, E||C_hat - Sigma||_F² = (||Sigma||_F² + (Tr Sigma)²) / N; 5x its root
    # fails with probability < 1/25 by Markov (and far less in practice).
    bound = 5 * np.sqrt((np.linalg.norm(sigma) ** 2 + np.trace(sigma) ** 2) / n)
    assert np.linalg.norm(empirical - sigma) < bound
    # and the sample lies in the span of the K - 1 centred rows: zero variance off it
    null = np.linalg.svd(np.asarray(cov.root))[2][8:]
    assert np.abs(xi @ null.T).max() < 1e-10


def _closed_form_two_layer_sigma(params, x, y, p):
    """Sigma of the shared-mask full-batch gradient of f = sum_k a_k eta_k tanh(w_k.x), MSE, by moments.

    g_q(eta) = eta_u(q) sum_i c_iq r_i(eta), r_i = sum_l a_l eta_l s_il - y_i, so
    g_q = sum_l B_ql eta_u eta_l + D_q eta_u with B_ql = sum_i c_iq a_l s_il and
    D_q = -sum_i c_iq y_i. With eta^r = eta / p^(r-1) and independent units,
    E prod(eta over a multiset) = p^-(size - number of distinct units).
    """
    w = np.asarray(params["hidden"][0]["w"])  # (d, m)
    a = np.asarray(params["out"]["w"])[:, 0]  # (m,)
    x, y = np.asarray(x), np.asarray(y)[:, 0]
    n, d = x.shape
    m = a.size
    s = np.tanh(x @ w)  # (n, m)
    ds = 1 - s**2
    # parameters in ravel order: W row-major (j, k), then a_k
    units, coef = [], []
    for j in range(d):
        for k in range(m):
            units.append(k)
            coef.append(a[k] * ds[:, k] * x[:, j] / n)
    for k in range(m):
        units.append(k)
        coef.append(s[:, k] / n)
    units, coef = np.array(units), np.array(coef)  # (P,), (P, n)
    b = coef @ (s * a)  # (P, m)
    dcoef = -coef @ y  # (P,)

    def moment(*idx):
        return p ** -(len(idx) - len(set(idx)))

    num = len(units)
    mean = np.array([sum(b[q, l] * moment(units[q], l) for l in range(m)) + dcoef[q] for q in range(num)])
    second = np.zeros((num, num))
    for q in range(num):
        for r in range(num):
            u, v = units[q], units[r]
            total = dcoef[q] * dcoef[r] * moment(u, v)
            for l in range(m):
                total += b[q, l] * dcoef[r] * moment(u, l, v) + dcoef[q] * b[r, l] * moment(v, l, u)
                for l2 in range(m):
                    total += b[q, l] * b[r, l2] * moment(u, l, v, l2)
            second[q, r] = total
    return second - np.outer(mean, mean), mean


@pytest.mark.parametrize("keep_prob", [0.3, 0.8])
def test_enumerated_sigma_equals_independent_closed_form_for_the_two_layer_net(keep_prob):
    model, params, x, y = _two_layer(keep_prob)
    table, probs = cv.enumerate_gradient_table(model, "mse", params, x, y)
    sigma = cv.dense(cv.exact_covariance(table, probs, mode="shared"))
    closed, mean = _closed_form_two_layer_sigma(params, x, y, keep_prob)
    # float64 sums of O(1) products over 8 masks: 1e-10 absolute is exact arithmetic
    np.testing.assert_allclose(sigma, closed, atol=1e-10, rtol=0)
    np.testing.assert_allclose(probs @ jnp.mean(table, 1), mean, atol=1e-10, rtol=0)
    assert np.abs(closed).max() > 1e-3  # the comparison is not between zeros


def test_per_sample_exact_sigma_equals_joint_enumeration():
    model, params, x, y = _two_layer(0.5, n=2)
    table, probs = cv.enumerate_gradient_table(model, "mse", params, x, y)
    exact = cv.dense(cv.exact_covariance(table, probs, mode="per_sample"))
    # brute force: every joint per-example mask (8 x 8) and its full-batch gradient
    values, weights = [], []
    for e1, e2 in itertools.product(range(8), repeat=2):
        values.append(np.asarray((table[e1, 0] + table[e2, 1]) / 2))
        weights.append(float(probs[e1] * probs[e2]))
    np.testing.assert_allclose(exact, _weighted_cov(values, weights), atol=1e-12)
    shared = cv.dense(cv.exact_covariance(table, probs, mode="shared"))
    assert np.linalg.norm(shared - exact) > 1e-3 * np.linalg.norm(shared)  # the conventions differ


def _mc_bound(values, weights, k):
    """5 x the leading-order RMS error of Sigma_K from K draws: sqrt((E||x-mu||^4 - ||Sigma||_F²) / K)."""
    values, weights = np.asarray(values), np.asarray(weights)
    centred = values - weights @ values
    fourth = weights @ np.sum(centred**2, 1) ** 2
    sigma = _weighted_cov(values, weights)
    return 5 * np.sqrt((fourth - np.linalg.norm(sigma) ** 2) / k), sigma


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_mask_covariance_from_k_samples_converges_to_enumeration(mode):
    model, params, x, y = _two_layer(0.5, n=3)
    table, probs = cv.enumerate_gradient_table(model, "mse", params, x, y)
    if mode == "shared":
        values, weights = np.asarray(jnp.mean(table, 1)), np.asarray(probs)
    else:
        combos = list(itertools.product(range(8), repeat=3))
        values = [np.asarray(sum(table[e, i] for i, e in enumerate(c)) / 3) for c in combos]
        weights = [float(np.prod([probs[e] for e in c])) for c in combos]
    k = 4000
    bound, sigma = _mc_bound(values, weights, k)
    np.testing.assert_allclose(sigma, cv.dense(cv.exact_covariance(table, probs, mode=mode)), atol=1e-12)
    g = grads.sampled_mask_gradients(model, "mse", params, x, y, key=jax.random.key(3), num_masks=k,
                                     mode=mode, chunk_size=500)
    estimate = cv.dense(cv.mask_covariance(g))
    # Markov: P(error > 5 RMS) < 1/25; the O(1/K²) mean-estimation term is far below this.
    assert np.linalg.norm(estimate - sigma) < bound
    assert bound < 0.2 * np.linalg.norm(sigma)  # the bound is informative


def _batch_law(table, probs, *, batch_size, mode, replacement):
    """Every (batch, masks) outcome of minibatch dropout SGD with its probability (brute force)."""
    num_masks, n, _ = table.shape
    batches = list(itertools.product(range(n), repeat=batch_size) if replacement
                   else itertools.permutations(range(n), batch_size))
    outcomes = []  # (batch index, mask tuple, probability, gradient)
    mask_sets = ([(e,) * batch_size for e in range(num_masks)] if mode == "shared"
                 else list(itertools.product(range(num_masks), repeat=batch_size)))
    for s, batch in enumerate(batches):
        for masks in mask_sets:
            prob = np.prod([probs[e] for e in (masks[:1] if mode == "shared" else masks)]) / len(batches)
            grad = np.mean([table[e, i] for e, i in zip(masks, batch)], axis=0)
            outcomes.append((s, masks, prob, grad))
    return outcomes


def _conditional_cov(outcomes, key_fn):
    """Cov of E[g | key] under the outcome law."""
    groups = {}
    for o in outcomes:
        k = key_fn(o)
        w, s = groups.get(k, (0.0, 0.0))
        groups[k] = (w + o[2], s + o[2] * o[3])
    weights = np.array([w for w, _ in groups.values()])
    means = np.array([s / w for w, s in groups.values()])
    return _weighted_cov(means, weights)


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
@pytest.mark.parametrize("replacement", [False, True])
def test_minibatch_decomposition_adds_up_exactly(mode, replacement):
    model, params, x, y = _deep(n=4)
    table, probs = cv.enumerate_gradient_table(model, "cross_entropy", params, x, y)
    table, probs = np.asarray(table), np.asarray(probs)
    comps = cv.noise_components(jnp.asarray(table), jnp.asarray(probs))
    # B = 1 ANOVA: data, mask and interaction are the covariances they are defined as, and add up
    flat = table.reshape(-1, table.shape[-1])
    flat_w = (probs[:, None] * np.full(4, 0.25)).reshape(-1)
    np.testing.assert_allclose(cv.dense(comps.data), _weighted_cov(probs @ table.transpose(1, 0, 2),
                                                                     np.full(4, 0.25)), atol=1e-12)
    np.testing.assert_allclose(cv.dense(comps.mask), _weighted_cov(table.mean(1), probs), atol=1e-12)
    np.testing.assert_allclose(cv.dense(cv.add(*comps)), _weighted_cov(flat, flat_w), atol=1e-12)
    parts = cv.minibatch_noise(comps, batch_size=2, num_examples=4, mode=mode, replacement=replacement)
    outcomes = _batch_law(table, probs, batch_size=2, mode=mode, replacement=replacement)
    total = _weighted_cov(np.array([o[3] for o in outcomes]), np.array([o[2] for o in outcomes]))
    data = _conditional_cov(outcomes, lambda o: o[0])  # Cov_S E[g | S]
    mask = _conditional_cov(outcomes, lambda o: o[1])  # Cov_eta E[g | eta] (masks by slot)
    np.testing.assert_allclose(cv.dense(parts["total"]), total, atol=1e-12)
    np.testing.assert_allclose(cv.dense(parts["data"]), data, atol=1e-12)
    np.testing.assert_allclose(cv.dense(parts["mask"]), mask, atol=1e-12)
    assert np.linalg.norm(cv.dense(parts["interaction"])) > 1e-6  # a real third part
    if mode == "shared":  # the full-batch shared mask part is the paper's Sigma
        np.testing.assert_allclose(cv.dense(comps.mask),
                                   cv.dense(cv.exact_covariance(jnp.asarray(table), jnp.asarray(probs),
                                                                mode="shared")), atol=1e-12)


def test_component_trace_estimator_is_unbiased_and_needs_no_table():
    model, params, x, y = _deep(n=3)
    table, probs = cv.enumerate_gradient_table(model, "cross_entropy", params, x, y)
    comps = cv.noise_components(table, probs)
    exact = np.array([float(cv.trace(c)) for c in comps])
    # E over two iid masks, enumerated exactly: unbiasedness holds already at K = 2
    pairs = np.array(list(itertools.product(range(table.shape[0]), repeat=2)))
    est = jax.jit(jax.vmap(lambda ij: jnp.stack(cv.component_traces_from_table(table[ij]))))(jnp.asarray(pairs))
    weights = np.asarray(probs)[pairs[:, 0]] * np.asarray(probs)[pairs[:, 1]]
    np.testing.assert_allclose(weights @ np.asarray(est), exact, rtol=1e-10, atol=1e-14)
    assert exact.min() > 1e-6
    # the inner-product (Gram) version equals the table version on the same masks
    masks = grads.draw_masks(model, key=jax.random.key(1), num_masks=5, mode="shared", num_examples=3,
                             dtype=jnp.float64)
    sampled = grads.sample_mask_gradients(model, "cross_entropy", params, x, y, masks, mode="shared")
    streamed, column = jax.jit(lambda p, m: cv.component_traces(model, "cross_entropy", p, x, y, m,
                                                                chunk_size=2))(params, masks)
    np.testing.assert_allclose(jnp.stack(streamed), jnp.stack(cv.component_traces_from_table(sampled)),
                               rtol=1e-10)
    np.testing.assert_allclose(column, jnp.mean(sampled, 1), rtol=1e-12)


def test_minibatch_factors_reject_bad_batch():
    with pytest.raises(ValueError, match="batch_size=5"):
        cv.minibatch_factors(batch_size=5, num_examples=4, mode="shared")
    with pytest.raises(ValueError, match="mask mode"):
        cv.minibatch_factors(batch_size=2, num_examples=4, mode="batch")


def test_lanczos_spectrum_matches_gram():
    pytest.importorskip("sme.lanczos")
    g = jax.random.normal(jax.random.key(0), (12, 40), jnp.float64) * jnp.linspace(0.1, 3.0, 40)
    cov = cv.from_samples(g)
    pairs = cv.lanczos_eigenpairs(lambda v: cv.matvec(cov, v), 40, key=jax.random.key(1), k=3, order=12)
    # Sigma has rank 11; the start vector's range part and its null part span a Krylov space of
    # dimension 12 that is invariant: Ritz values are then exact up to rounding
    np.testing.assert_allclose(pairs.values, cv.top_eigenpairs(cov, 3)[0], rtol=1e-8)


def test_subset_correction_makes_component_traces_unbiased_for_the_population():
    model, params, x, y = _deep(n=5)
    table, probs = cv.enumerate_gradient_table(model, "cross_entropy", params, x, y)
    exact = np.array([float(cv.trace(c)) for c in cv.noise_components(table, probs)])
    pairs = np.array(list(itertools.product(range(table.shape[0]), repeat=2)))
    weights = np.asarray(probs)[pairs[:, 0]] * np.asarray(probs)[pairs[:, 1]]
    for size in (2, 3):
        subsets = list(itertools.combinations(range(5), size))
        expected = np.zeros(3)
        for subset in subsets:  # E over the subset and the two masks, enumerated exactly
            sub = table[:, np.array(subset)]
            est = jax.vmap(lambda ij: jnp.stack(cv.subset_corrected(
                cv.component_traces_from_table(sub[ij]), subset_size=size, population=5)))(jnp.asarray(pairs))
            expected += weights @ np.asarray(est) / len(subsets)
        np.testing.assert_allclose(expected, exact, rtol=1e-10, atol=1e-14)


def test_unbiased_frobenius_equals_the_u_statistic_of_its_definition():
    # (1/4) mean over distinct (i, j, k, l) of ((x_i - x_j)^T (x_k - x_l))², brute force
    x = np.asarray(jax.random.normal(jax.random.key(5), (7, 3), jnp.float64)) * [1.0, 2.0, 0.5]
    brute = np.mean([((x[i] - x[j]) @ (x[k] - x[l])) ** 2 / 4
                     for i, j, k, l in itertools.permutations(range(7), 4)])
    centred = (x - x.mean(0)) @ (x - x.mean(0)).T
    np.testing.assert_allclose(cv.frobenius_sq_unbiased(jnp.asarray(centred)), brute, rtol=1e-12)
    with pytest.raises(ValueError, match="K >= 4"):
        cv.frobenius_sq_unbiased(jnp.eye(3))


def test_unbiased_frobenius_is_exactly_unbiased_over_all_mask_draws_and_the_plug_in_is_not():
    model, params, x, y = _deep(n=3)  # 4 droppable units: 16 masks
    table, probs = cv.enumerate_gradient_table(model, "cross_entropy", params, x, y)
    exact = float(cv.frobenius(cv.exact_covariance(table, probs, mode="shared")) ** 2)
    column = jnp.mean(table, axis=1)  # full-batch gradient under each shared mask
    # E over K = 4 iid masks, every one of the 16**4 draws enumerated with its probability
    draws = jnp.asarray(list(itertools.product(range(table.shape[0]), repeat=4)))

    def both(idx):
        cov = cv.mask_covariance(column[idx])
        return cv.frobenius_sq_unbiased(3 * cv.gram(cov)), cv.frobenius(cov) ** 2

    unbiased, plug_in = jax.jit(jax.vmap(both))(draws)
    weights = np.prod(np.asarray(probs)[np.asarray(draws)], axis=1)
    np.testing.assert_allclose(weights @ np.asarray(unbiased), exact, rtol=1e-9)
    assert weights @ np.asarray(plug_in) > 1.2 * exact  # the finite-K inflation the estimator removes
    # sampled masks, K = 8, 4,000 draws: mean within 4 standard errors of the exact value, plug-in outside
    g = grads.sampled_mask_gradients(model, "cross_entropy", params, x, y, key=jax.random.key(9),
                                     num_masks=8 * 4000, mode="shared", chunk_size=1000).reshape(4000, 8, -1)
    unbiased, plug_in = jax.vmap(lambda rows: (
        cv.frobenius_sq_unbiased(7 * cv.gram(cv.mask_covariance(rows))),
        cv.frobenius(cv.mask_covariance(rows)) ** 2))(g)
    unbiased, plug_in = np.asarray(unbiased), np.asarray(plug_in)
    se = unbiased.std(ddof=1) / np.sqrt(len(unbiased))
    assert abs(unbiased.mean() - exact) < 4 * se
    assert plug_in.mean() - exact > 4 * plug_in.std(ddof=1) / np.sqrt(len(plug_in))
