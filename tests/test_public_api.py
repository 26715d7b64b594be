"""The public API: `import sme`, the README's "Python API" example (run from README.md itself, so it
cannot drift from the code), the Problem form of the function signatures and the shared rules of
`sme.problem`."""

import contextlib
import io
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sme
from sme import config as config_lib
from sme import covariance, diffusion, dropout, grads, hessian, lockstep, losses, problem, relations, sde

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_snippet() -> str:
    """The python block between the README's python-api markers."""
    text = open(os.path.join(ROOT, "README.md")).read()
    found = re.search(r"<!-- python-api:begin[^>]*-->\s*```python\n(.*?)```\s*<!-- python-api:end -->", text, re.S)
    assert found, "README.md has no python-api block"
    return found.group(1)


def test_readme_python_api_example_matches_dense_references():
    code = readme_snippet()
    assert 10 <= len(code.strip().splitlines()) <= 30
    ns = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, "README.md:python-api", "exec"), ns)
    assert "alpha" in out.getvalue()

    prob, params, top, norms, g = ns["problem"], ns["params"], ns["top"], ns["norms"], ns["g"]
    flat, unravel = ravel_pytree(params)
    # Dense references: the Hessian of the closed-form L_S by jax.hessian (a different code path from
    # the HVP's per-example terms) and Sigma_K as the dense sample covariance of the mask gradients.
    h = jax.jit(jax.hessian(lambda f: losses.modified_loss(prob.model, prob.loss, unravel(f), prob.x, prob.y)))(flat)
    eig = np.linalg.eigvalsh(np.asarray(h, np.float64))[::-1]
    # float32 throughout: HVPs and the dense Hessian each carry ~1e-6 relative rounding at P = 113;
    # converged Ritz values (residuals ~1e-6) then agree to 1e-4 of the top eigenvalue.
    np.testing.assert_allclose(np.asarray(top.values), eig[:5], atol=1e-4 * eig[0])
    sigma = np.cov(np.asarray(g, np.float64), rowvar=False)
    h64 = np.asarray(h, np.float64)
    fro_h, fro_s = np.linalg.norm(h64), np.linalg.norm(sigma)
    # alpha = Tr(H Sigma) / (||H||_F ||Sigma||_F): the numerator and ||Sigma||_F are exact (float32
    # rounding, 1e-3); ||H||_F is Hutchinson on the complement of the top 5 eigenvectors, within
    # 5 of its own standard errors (plus float32 rounding).
    assert float(ns["alpha"]) * float(norms.frobenius) == pytest.approx(np.sum(h64 * sigma) / fro_s, rel=1e-3)
    assert abs(float(norms.frobenius) - fro_h) <= 5 * float(norms.frobenius_se) + 1e-4 * fro_h
    assert 0.0 < float(ns["alpha"]) <= 1.0


def test_import_sme_exposes_the_core_api():
    for name in sme.__all__:
        assert getattr(sme, name) is not None, name
    assert sme.Problem is problem.Problem is diffusion.Problem  # one bundle, re-exported where it was
    assert sme.hvp is hessian.hvp and sme.top_eigenpairs is sme.lanczos.top_eigenpairs
    assert relations.make_flat_hvp is hessian.make_flat_hvp  # the flat HVP lives in hessian
    assert grads.draw_masks is problem.draw_masks is sme.draw_masks  # one mask-drawing function
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        sme.nonexistent  # noqa: B018


def test_import_sme_imports_nothing_until_used():
    code = ("import sys, sme; assert 'jax' not in sys.modules and 'sme.hessian' not in sys.modules; "
            "sme.hvp; assert 'sme.hessian' in sys.modules and 'hvp' in dir(sme)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_allowed_values_have_one_source():
    assert config_lib.SDE_DIFFUSIONS == ("auto", *problem.METHODS) == ("auto", *diffusion.DIFFUSIONS)
    assert set(config_lib.SDE_ESTIMATORS) == {"auto", *sde.LOSS_ESTIMATORS}
    assert config_lib.SDE_VARIANTS is lockstep.VARIANTS and config_lib.SDE_COUPLINGS is lockstep.COUPLINGS
    assert config_lib.SDE_TRACES is sde.TRACES
    # two enumeration limits that mean different things (sme.problem's docstring)
    assert problem.MAX_EXACT_UNITS == diffusion.MAX_ENUMERATED_UNITS == 12
    assert dropout.MAX_ENUMERATED_UNITS == 20 and problem.MAX_EXACT_UNITS < dropout.MAX_ENUMERATED_UNITS


def test_mask_shape_rule():
    assert dropout.mask_shape("shared", 7) == () and dropout.mask_shape("per_sample", 7) == (7,)
    assert dropout.mask_shape("shared", 7, 5) == (5,) and dropout.mask_shape("per_sample", 7, 5) == (5, 7)
    assert dropout.mask_shape("per_sample", 7, None) == (None, 7)
    assert dropout.mask_axis("shared") is None and dropout.mask_axis("per_sample") == 0
    with pytest.raises(ValueError, match="unknown mask mode 'batch'"):
        dropout.mask_shape("batch", 7)


def _tiny(mode="shared", loss="mse", hidden=(4,), keep_prob=0.5, dropout_layers=None):
    model = sme.make_model("mlp", in_dim=3, hidden=hidden, out_dim=2, keep_prob=keep_prob,
                           dropout_layers=dropout_layers)
    x = jax.random.normal(jax.random.key(0), (6, 3))
    y = jax.random.normal(jax.random.key(1), (6, 2))
    return problem.Problem(model, loss, mode, x, y), model.init(jax.random.key(2))


def test_problem_rejects_an_unknown_mode():
    model = sme.make_model("mlp", in_dim=3, hidden=(4,), out_dim=2)
    with pytest.raises(ValueError, match="unknown mask mode 'batch'"):
        problem.Problem(model, "mse", "batch", jnp.zeros((2, 3)), jnp.zeros((2, 2)))


def test_resolver():
    closed, _ = _tiny()
    assert problem.resolve_method(closed) == "closed_form"
    assert hessian.resolve_loss_kind("auto", closed) == "modified"
    ce, _ = _tiny(loss="cross_entropy")  # 4 droppable units
    assert problem.resolve_method(ce) == "exact" and problem.resolve_method(ce, max_units=3) == "masks"
    assert hessian.resolve_loss_kind("auto", ce, max_units=3) == "modified_mc"
    two, _ = _tiny(hidden=(4, 4))  # dropout before the last hidden layer too: no closed form
    assert problem.resolve_method(two.model, "mse") == "exact"
    plain, _ = _tiny(keep_prob=1.0)
    assert hessian.resolve_loss_kind("auto", plain) == "risk"
    assert hessian.resolve_loss_kind("fixed_mask", plain) == "fixed_mask"
    with pytest.raises(ValueError, match="needs the loss name"):
        problem.resolve_method(closed.model)


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_draw_masks_streams(mode):
    prob, _ = _tiny(mode)
    key, sites, n = jax.random.key(3), prob.model.sites, prob.num_examples
    split = problem.draw_masks(prob.model, key=key, num_masks=4, mode=mode, num_examples=n)
    batched = diffusion.draw_masks(prob, key=key, num_masks=4)
    lead = (4,) if mode == "shared" else (4, n)
    for k, sub in enumerate(jax.random.split(key, 4)):  # row k from split(key, K)[k]
        one = dropout.sample_masks(sites, key=sub, batch_shape=lead[1:])
        np.testing.assert_array_equal(split[0][k], one[0])
    np.testing.assert_array_equal(batched[0], dropout.sample_masks(sites, key=key, batch_shape=lead)[0])
    assert split[0].shape == batched[0].shape == (*lead, 4)


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_problem_form_equals_positional_form(mode):
    prob, params = _tiny(mode)
    m, loss, x, y = prob.model, prob.loss, prob.x, prob.y
    masks = problem.draw_masks(prob, key=jax.random.key(4), num_masks=3)
    one = jax.tree_util.tree_map(lambda a: a[0], masks)
    pairs = [
        (losses.risk(prob, params), losses.risk(m, loss, params, x, y)),
        (losses.dropout_risk(prob, params, one), losses.dropout_risk(m, loss, params, x, y, one, mode=mode)),
        (losses.modified_loss_mc(prob, params, masks),
         losses.modified_loss_mc(m, loss, params, x, y, masks, mode=mode)),
        (losses.r2_penalty(prob, params, one, lr=0.1),
         losses.r2_penalty(m, loss, params, x, y, one, mode=mode, lr=0.1)),
        (grads.mask_gradients(prob, params, masks), grads.mask_gradients(m, loss, params, x, y, masks, mode=mode)),
        (covariance.exact_mask_covariance(prob, params).root,
         covariance.exact_mask_covariance(m, loss, params, x, y, mode=mode).root),
    ]
    for via_problem, positional in pairs:
        np.testing.assert_array_equal(via_problem, positional)
    with pytest.raises(TypeError, match="params is missing"):
        losses.risk(prob)


def test_r2_penalty_is_the_squared_gradient_norm():
    prob, params = _tiny()
    one = jax.tree_util.tree_map(lambda a: a[0], problem.draw_masks(prob, key=jax.random.key(5), num_masks=1))
    g = ravel_pytree(jax.grad(lambda p: losses.dropout_risk(prob, p, one))(params))[0]
    np.testing.assert_allclose(losses.r2_penalty(prob, params, one, lr=0.4), 0.1 * jnp.dot(g, g), rtol=1e-6)


def test_problem_hvp_and_landscape_take_a_problem():
    prob, params = _tiny(loss="cross_entropy")  # auto: exact enumeration of the 4 units
    flat, unravel = ravel_pytree(params)
    dense = jax.jit(lambda p: hessian.to_dense(*hessian.problem_hvp(prob, p)))(params)  # jitted: compiles once
    h = jax.jit(jax.hessian(lambda f: losses.modified_loss_exact(prob, unravel(f))))(flat)
    # float32: two evaluation orders of the same sums, relative rounding ~1e-6 of |H|
    np.testing.assert_allclose(dense, h, atol=1e-5 * float(jnp.max(jnp.abs(h))))
    mc = jax.jit(lambda p, v: hessian.problem_hvp(prob, p, kind="modified_mc", key=jax.random.key(6),
                                                  num_masks=3)[0](v))
    assert mc(params, flat).shape == flat.shape
    with pytest.raises(ValueError, match="needs masks or a key"):
        hessian.problem_hvp(prob, params, kind="modified_mc")
    direction = sme.random_direction(params, key=jax.random.key(7))
    np.testing.assert_array_equal(sme.profile_1d(prob, params, direction, jnp.array([0.0, 0.5])),
                                  sme.profile_1d(lambda p: losses.risk(prob, p), params, direction,
                                                 jnp.array([0.0, 0.5])))
    flat_loss = sme.problem_loss(prob, like=params)
    assert float(flat_loss(flat)) == pytest.approx(float(losses.risk(prob, params)), rel=1e-6)
