"""Curvature operators against dense references (jax.hessian / jax.jacobian of the `sme.losses` functions).

Float64 throughout: the operators and the references are different code paths
evaluating the same sums of O(1) terms, so they agree to ~1e-13; tolerances of
1e-10 leave room for the ~P-term accumulations and nothing else.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sme import hessian as hs
from sme import lanczos, losses
from sme.dropout import enumerate_masks, sample_masks
from sme.models import make_model

pytestmark = pytest.mark.usefixtures("x64")  # float64 throughout


def _problem(*, keep_prob=0.7, hidden=(4,), n=7, out_dim=2, name="mlp", loss="mse", seed=0, dtype=jnp.float64):
    model = make_model(name, in_dim=3, hidden=hidden, out_dim=out_dim, activation="tanh", keep_prob=keep_prob)
    params = jax.jit(model.init, static_argnums=1)(jax.random.key(seed), dtype)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, 3)))
    if loss == "cross_entropy":
        y = jax.nn.one_hot(rng.integers(0, out_dim, n), out_dim, dtype=jnp.float64)
    else:
        y = jnp.asarray(rng.normal(size=(n, out_dim)))
    return model, params, x, y


def _dense_hessian(fn, params):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: fn(unravel(f)))(flat)


def _dense(hloss, params, x, y, chunk_size=0, operator=None):
    matvec, dim = operator or hs.make_hvp(hloss, params, x, y, chunk_size=chunk_size)
    return np.asarray(jax.jit(lambda: hs.to_dense(matvec, dim, dtype=jnp.float64))())


def _cases(model, x):
    """(kind, make_hessian_loss kwargs, reference loss(params, x, y)) for every loss kind and mask mode."""
    n = x.shape[0]
    shared = sample_masks(model.sites, key=jax.random.key(1), batch_shape=(3,), dtype=x.dtype)
    per_sample = sample_masks(model.sites, key=jax.random.key(2), batch_shape=(3, n), dtype=x.dtype)
    one = sample_masks(model.sites, key=jax.random.key(3), dtype=x.dtype)
    one_each = sample_masks(model.sites, key=jax.random.key(4), batch_shape=(n,), dtype=x.dtype)
    mc = lambda m, mode: lambda p, x, y: losses.modified_loss_mc(model, "mse", p, x, y, m, mode=mode)
    drop = lambda m, mode: lambda p, x, y: losses.dropout_risk(model, "mse", p, x, y, m, mode=mode)
    return [
        ("risk", {}, lambda p, x, y: losses.risk(model, "mse", p, x, y)),
        ("modified", {}, lambda p, x, y: losses.modified_loss(model, "mse", p, x, y)),
        ("modified_exact", {}, lambda p, x, y: losses.modified_loss_exact(model, "mse", p, x, y)),
        ("modified_mc", dict(masks=shared), mc(shared, "shared")),
        ("modified_mc", dict(masks=per_sample, mode="per_sample"), mc(per_sample, "per_sample")),
        ("fixed_mask", dict(masks=one), drop(one, "shared")),
        ("fixed_mask", dict(masks=one_each, mode="per_sample"), drop(one_each, "per_sample")),
    ]


def test_hvp_and_loss_equal_the_dense_hessian_of_every_loss_kind_chunked_or_not():
    model, params, x, y = _problem()
    v = jax.random.normal(jax.random.key(9), (ravel_pytree(params)[0].size,), jnp.float64)
    cases = _cases(model, x)
    hlosses = [hs.make_hessian_loss(kind, model, "mse", **kwargs) for kind, kwargs, _ in cases]
    for (kind, _, _), hloss in zip(cases, hlosses):
        assert hloss.kind == kind and hloss.label == hs.LOSS_KINDS[kind]

    @jax.jit  # one compilation: every operator beside its reference
    def evaluate(params, v):
        results = []
        for (_, _, reference), hloss in zip(cases, hlosses):
            dense = _dense_hessian(lambda p: reference(p, x, y), params)
            # chunk 3 does not divide n = 7: the padded examples must weigh nothing
            ours = [(hs.loss_value(hloss, params, x, y, chunk_size=c),
                     hs.make_hvp(hloss, params, x, y, chunk_size=c)[0](v)) for c in (0, 3)]
            results.append((reference(params, x, y), dense @ v, ours))
        return results

    for (kind, _, _), (value, hv, ours) in zip(cases, evaluate(params, v)):
        for chunk, (our_value, our_hv) in zip((0, 3), ours):
            np.testing.assert_allclose(our_value, value, rtol=1e-12, err_msg=f"{kind} {chunk}")
            np.testing.assert_allclose(our_hv, hv, atol=1e-10, err_msg=f"{kind} {chunk}")


def test_linearised_hvp_equals_forward_over_reverse_and_the_size_rule_picks_it(monkeypatch):
    model, params, x, y = _problem(hidden=(3, 4))
    v = jax.random.normal(jax.random.key(9), (ravel_pytree(params)[0].size,), jnp.float64)
    hlosses = [hs.make_hessian_loss(kind, model, "mse", **kwargs) for kind, kwargs, _ in _cases(model, x)
               if kind != "modified"]  # (closed form needs one hidden layer)
    pairs = jax.jit(lambda p, v: [(hs.make_hvp(h, p, x, y, linearize=True)[0](v),
                                   hs.make_hvp(h, p, x, y, linearize=False)[0](v)) for h in hlosses])(params, v)
    for hloss, (lin, fwd_rev) in zip(hlosses, pairs):
        np.testing.assert_allclose(lin, fwd_rev, atol=1e-12, err_msg=hloss.kind)  # same sums, other order
    # The rule: the linearised matvec evaluates no primal tanh (its residuals are stored);
    # forward-over-reverse recomputes the forward pass in every product.
    risk = hs.make_hessian_loss("risk", model, "mse")
    primal_ops = lambda **kw: str(jax.make_jaxpr(hs.make_hvp(risk, params, x, y, **kw)[0])(v)).count("tanh")
    fn = lambda p: hs.loss_value(risk, p, x, y)
    assert 0 < hs.linearization_bytes(fn, params) < hs.LINEARIZE_MAX_BYTES
    assert primal_ops(linearize=None) == primal_ops(linearize=True) == 0 < primal_ops(linearize=False)
    assert primal_ops() == 0  # the default is the size rule
    monkeypatch.setattr(hs, "LINEARIZE_MAX_BYTES", 0)
    assert primal_ops(linearize=None) > 0
    assert primal_ops(linearize=None, chunk_size=3) > 0
    with pytest.raises(ValueError, match="linearize=True needs the examples unchunked"):
        hs.make_hvp(risk, params, x, y, chunk_size=3, linearize=True)


def test_hvp_pytree_equals_dense_hessian_times_v():
    model, params, x, y = _problem(hidden=(3, 4), loss="cross_entropy", out_dim=3)
    fn = lambda p: losses.risk(model, "cross_entropy", p, x, y)
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.key(0), flat.shape, jnp.float64)
    out, dense = jax.jit(lambda p, v: (hs.hvp(fn, p, unravel(v)), _dense_hessian(fn, p)))(params, v)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(ravel_pytree(out)[0], dense @ np.asarray(v), atol=1e-10)


def test_full_order_lanczos_ritz_values_equal_eigh_of_the_dense_hessian():
    model, params, x, y = _problem()
    hloss = hs.make_hessian_loss("modified", model, "mse")
    matvec, dim = hs.make_hvp(hloss, params, x, y)
    run = jax.jit(lambda key: lanczos.top_eigenpairs(matvec, dim, key=key, k=dim, order=dim, dtype=jnp.float64))
    pairs = run(jax.random.key(0))
    dense = jax.jit(lambda p: _dense_hessian(lambda q: losses.modified_loss(model, "mse", q, x, y), p))(params)
    exact = np.linalg.eigvalsh(dense)
    # Full reorthogonalisation: T is similar to H up to ~P eps ||H||: 1e-10 is generous.
    np.testing.assert_allclose(pairs.values, exact[::-1], atol=1e-10)
    assert np.max(pairs.residuals) < 1e-8  # near-degenerate pairs: residual ~ eps ||H|| / gap


def test_mask_averaged_hessian_equals_the_probability_weighted_fixed_mask_hessians():
    model, params, x, y = _problem(name="two_layer", hidden=(6,), keep_prob=0.6, n=5, out_dim=1)
    closed = _dense(hs.make_hessian_loss("modified", model, "mse"), params, x, y)
    masks, probs = enumerate_masks(model.sites)
    per_mask = jax.jit(jax.vmap(lambda m: _dense_hessian(
        lambda p: losses.dropout_risk(model, "mse", p, x, y, m, mode="shared"), params)))(masks)
    average = np.einsum("k,kpq->pq", probs, per_mask)
    # 64 masks, each Hessian exact to ~1e-15: the weighted sum is exact to ~1e-14 (Lemma 1 is an identity).
    np.testing.assert_allclose(closed, average, atol=1e-10)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_ggn_true_and_empirical_fisher_equal_their_dense_definitions(loss):
    model, params, x, y = _problem(hidden=(3, 4), loss=loss, out_dim=3)
    hloss = hs.make_hessian_loss("risk", model, loss)
    flat, unravel = ravel_pytree(params)
    ones = tuple(jnp.ones(s.shape, x.dtype) for s in model.sites)
    f = lambda q, xi: model.apply(unravel(q), xi, ones)
    per_example = lambda q: jax.vmap(lambda xi, yi: losses.loss_fn(loss)(f(q, xi), yi))(x, y)

    @jax.jit
    def evaluate(flat):
        p = unravel(flat)
        ops = {(kind, chunk): hs.to_dense(*hs.make_fisher(kind, hloss, p, x, y, chunk_size=chunk),
                                          dtype=jnp.float64)
               for kind in hs.FISHER_KINDS for chunk in (0, 3)}
        traces = {kind: hs.fisher_trace(kind, hloss, p, x, y, chunk_size=3) for kind in hs.FISHER_KINDS}
        jac = jax.vmap(lambda xi: jax.jacobian(f)(flat, xi))(x)  # (n, out, P)
        out = jax.vmap(lambda xi: f(flat, xi))(x)
        return ops, traces, jac, out, jax.jacobian(per_example)(flat)  # last: (n, P) per-example gradients

    ops, traces, jac, out, g = evaluate(flat)
    n = x.shape[0]
    if loss == "mse":
        m = np.broadcast_to(np.eye(3), (n, 3, 3))
    else:
        pi = np.exp(out - out.max(1, keepdims=True))
        pi /= pi.sum(1, keepdims=True)
        m = np.stack([np.diag(p) - np.outer(p, p) for p in pi])
    ggn = np.einsum("iap,iab,ibq->pq", jac, m, jac) / n
    empirical = np.asarray(g).T @ np.asarray(g) / n
    for kind, reference in (("ggn", ggn), ("true", ggn), ("empirical", empirical)):
        for chunk in (0, 3):
            np.testing.assert_allclose(ops[kind, chunk], reference, atol=1e-10, err_msg=f"{kind} {chunk}")
        np.testing.assert_allclose(traces[kind], np.trace(reference), rtol=1e-10)


def test_fisher_of_a_fixed_per_sample_mask_network():
    model, params, x, y = _problem(hidden=(3, 4))
    masks = sample_masks(model.sites, key=jax.random.key(5), batch_shape=(x.shape[0],), dtype=x.dtype)
    hloss = hs.make_hessian_loss("fixed_mask", model, "mse", masks=masks, mode="per_sample")
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def evaluate(flat):
        jac = jax.vmap(lambda xi, mi: jax.jacobian(lambda q: model.apply(unravel(q), xi, mi))(flat))(x, masks)
        return jac, hs.to_dense(*hs.make_fisher("ggn", hloss, unravel(flat), x, y), dtype=jnp.float64)

    jac, dense = evaluate(flat)
    ggn = np.einsum("iap,iaq->pq", jac, jac) / x.shape[0]  # MSE: output Hessian is the identity
    np.testing.assert_allclose(dense, ggn, atol=1e-10)


def test_block_restriction_equals_the_dense_block():
    model, params, x, y = _problem(hidden=(3, 4))
    hloss = hs.make_hessian_loss("risk", model, "mse")
    matvec, dim = hs.make_hvp(hloss, params, x, y)
    full = np.asarray(jax.jit(lambda p: _dense_hessian(lambda q: losses.risk(model, "mse", q, x, y), p))(params))
    layers, leaves = hs.param_blocks(params), hs.param_blocks(params, by="leaf")
    assert sorted(layers) == ["hidden/0", "hidden/1", "out"]
    assert sorted(leaves) == sorted(f"{l}/{k}" for l in layers for k in ("b", "w"))
    for blocks in (layers, leaves):  # the blocks partition the flat vector
        np.testing.assert_array_equal(np.sort(np.concatenate(list(blocks.values()))), np.arange(dim))
    assert layers["hidden/1"].size == 3 * 4 + 4
    # ravel_pytree order: the leaf's entries in the flat vector are the leaf itself
    flat = np.asarray(ravel_pytree(params)[0])
    np.testing.assert_array_equal(flat[leaves["hidden/1/w"]], np.asarray(params["hidden"][1]["w"]).ravel())
    dense_blocks = jax.jit(lambda: {name: hs.to_dense(*hs.restrict(matvec, idx, dim), dtype=jnp.float64)
                                    for name, idx in layers.items()})()
    for name, idx in layers.items():
        np.testing.assert_allclose(dense_blocks[name], full[np.ix_(idx, idx)], atol=1e-10, err_msg=name)


def test_quadratic_dropout_penalty_is_r1_for_mse_and_the_fisher_form_for_cross_entropy():
    model, params, x, y = _problem(hidden=(5,), keep_prob=0.8)
    ours, r1 = jax.jit(lambda p: (hs.dropout_penalty_quadratic(model, "mse", p, x, y), losses.r1(model, p, x)))(params)
    np.testing.assert_allclose(ours, r1, rtol=1e-12)
    model, params, x, y = _problem(hidden=(5,), keep_prob=0.8, loss="cross_entropy", out_dim=3)
    ones = tuple(jnp.ones(s.shape) for s in model.sites)
    ours, h, out = jax.jit(lambda p: (hs.dropout_penalty_quadratic(model, "cross_entropy", p, x, y),
                                      jax.vmap(lambda xi: model.penultimate(p, xi, ones))(x),
                                      jax.vmap(lambda xi: model.apply(p, xi, ones))(x)))(params)
    w = np.asarray(params["out"]["w"])
    total = 0.0
    for hi, oi in zip(h, out):
        pi = np.exp(oi - oi.max())
        pi /= pi.sum()
        fisher = np.diag(pi) - np.outer(pi, pi)
        total += sum(hi[j] ** 2 * w[j] @ fisher @ w[j] for j in range(5))
    np.testing.assert_allclose(ours, (1 - 0.8) / (2 * 0.8) * total / x.shape[0], rtol=1e-12)


def test_bad_inputs_are_named():
    model, params, x, y = _problem(dtype=jnp.float32)
    with pytest.raises(ValueError, match="unknown loss kind"):
        hs.make_hessian_loss("curvy", model, "mse")
    with pytest.raises(ValueError, match="needs masks"):
        hs.make_hessian_loss("fixed_mask", model, "mse")
    with pytest.raises(ValueError, match="closed-form"):
        hs.make_hessian_loss("modified", model, "cross_entropy")
    deep = make_model("mlp", in_dim=3, hidden=(4, 4), out_dim=2, keep_prob=0.7)
    with pytest.raises(ValueError, match="last hidden layer only"):
        hs.make_hessian_loss("modified", deep, "mse")
    with pytest.raises(ValueError, match="mask mode"):
        hs.make_hessian_loss("risk", model, "mse", mode="batch")
    masks = sample_masks(model.sites, key=jax.random.key(0), batch_shape=(3,))
    hloss = hs.make_hessian_loss("fixed_mask", model, "mse", masks=masks, mode="per_sample")
    with pytest.raises(ValueError, match="3 rows for 7 examples"):
        hs.make_hvp(hloss, params, x, y)
    with pytest.raises(ValueError, match="7 examples but y has 6"):
        hs.make_hvp(hs.make_hessian_loss("risk", model, "mse"), params, x, y[:6])
    with pytest.raises(ValueError, match="one network per example"):
        hs.make_fisher("ggn", hs.make_hessian_loss("modified", model, "mse"), params, x, y)
    with pytest.raises(ValueError, match="unknown Fisher kind"):
        hs.make_fisher("fancy", hs.make_hessian_loss("risk", model, "mse"), params, x, y)
    with pytest.raises(ValueError, match="P=6000"):
        hs.to_dense(lambda v: v, 6000)
    with pytest.raises(ValueError, match="indices"):
        hs.restrict(lambda v: v, np.array([0, 9]), 5)
    with pytest.raises(ValueError, match="by="):
        hs.param_blocks(params, by="module")
