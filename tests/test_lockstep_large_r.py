"""The batched (replica-last, chunked) lockstep of sme.lockstep_batched against the per-replica one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sme import data, exact, lockstep, lockstep_batched, models, rng, sde
from sme.diffusion import Problem, coupled_normals, masks_from_uniforms
from sme.lockstep_batched import BLOCK

FULL = ("order1", "order2", "r2", "ode1", "ode2", "svag")


def e1_problem(keep_prob=0.8, dtype=jnp.float32, bias=False):
    ds = data.load_dataset(data.DataSpec(name="teacher", num_points=8, input_dim=2, teacher_width=3, noise_std=0.1))
    model = models.make_model("two_layer", in_dim=2, hidden=(5,), out_dim=1, keep_prob=keep_prob,
                              activation="tanh", use_bias=bias, output_bias=bias)
    problem = Problem(model, "mse", "shared", jnp.asarray(ds.x_train, dtype), jnp.asarray(ds.y_train, dtype))
    params = model.init(rng.stream_key(0, rng.INIT), dtype=dtype)
    if bias:  # non-zero biases, so their gradients are exercised
        params = jax.tree_util.tree_map(lambda a: a + 0.1, params)
    return problem, params


def spec_of(layout="batched", **kw):
    base = dict(variants=FULL, diffusion="closed_form", estimator="closed_form", substeps=2, richardson=True,
                coupling="quantile", seed=3, layout=layout, chunk_size=2 * BLOCK)
    return lockstep.LockstepSpec(**{**base, **kw})


def reference_step(spec, problem, params, noise, lr):
    """The per-replica processes of sme.lockstep (vmapped over a leading replica axis) fed the SAME
    random numbers as `batched_step`: masks from the uniforms, the fine grid's normals, the bridge
    and the coarsening of sme.sde."""
    sites, m = problem.model.sites, problem.model.sites[-1].size

    def one(p, u, normals, svag_u):
        masks = masks_from_uniforms(sites, u, dtype=u.dtype)
        new = {"discrete": sde.dropout_gd_step(problem, p["discrete"], masks, lr=lr)}
        zeta_step = coupled_normals(u)[None] if spec.coupling == "quantile" else None
        for v in spec.em_variants:
            tag = lockstep.TAGS[v] if spec.coupling == "none" else lockstep.SHARED_TAG
            xs = normals[tag]  # (F, m + q)
            fine = {"zeta": xs[:, None, :m], "z": xs[:, None, m:]}
            if zeta_step is not None:
                fine["zeta"] = sde.bridge(zeta_step, fine["zeta"])
            process = lockstep.make_process(spec, problem, v, lr)
            new[v] = sde.em_scan(process, p[v], fine, h=lr / spec.fine_substeps)
            if spec.richardson:
                new[v + "/coarse"] = sde.em_scan(process, p[v + "/coarse"], sde.coarsen(fine, 2), h=lr / spec.substeps)
        if "svag" in spec.variants:
            q = p["svag"]
            for j in range(spec.svag_substeps):
                pair = masks_from_uniforms(sites, svag_u[j], dtype=u.dtype)
                q = jax.tree_util.tree_map(
                    lambda a, g: a - lr / spec.svag_substeps * g, q,
                    sde.svag_gradient(problem, q, pair, substeps=spec.svag_substeps))
            new["svag"] = q
        return new

    move = lambda a: None if a is None else jnp.moveaxis(a, -1, 0)  # the batched draws are replica-last
    normals = {t: move(a) for t, a in noise.normals.items()}
    return jax.vmap(one)(params, move(noise.u), normals, move(noise.svag_u))


@pytest.mark.parametrize("variants,coupling,richardson,bias", [
    (("order2", "r2", "svag"), "quantile", False, False),
    pytest.param(FULL, "quantile", True, False, marks=pytest.mark.slow),
    pytest.param(FULL, "none", False, True, marks=pytest.mark.slow)])
def test_batched_step_equals_the_per_replica_step_on_the_same_random_numbers(variants, coupling, richardson, bias, x64):
    """Every path (discrete, the Euler-Maruyama variants, with Richardson on both grids, SVAG(4))
    after one step from different per-replica parameters. float64: the two compute the same sums in
    another order, so they agree to ~1e-15 relative; 1e-10 leaves room for the nested autodiff (HVPs)."""
    problem, params0 = e1_problem(dtype=jnp.float64, bias=bias)
    spec = spec_of(variants=variants, coupling=coupling, richardson=richardson, substeps=2 if richardson else 1)
    num = BLOCK
    state = lockstep.init_lockstep(params0, spec, num)
    keys = jax.random.split(jax.random.key(1), len(state.paths))
    paths = {name: jax.tree_util.tree_map(lambda a, k=k: a + 0.3 * jax.random.normal(k, a.shape, a.dtype), tree)
             for (name, tree), k in zip(state.paths.items(), keys)}
    m = problem.model.sites[-1].size
    noise = lockstep_batched.step_noise(spec, m, 4, 0, 1, jnp.float64)
    lr = 0.2
    got = jax.jit(lambda p, nz: lockstep_batched.batched_step(
        spec, lockstep_batched.Net.of(problem), p, nz, lr))(paths, noise)
    want = jax.jit(lambda p, nz: reference_step(spec, problem, p, nz, lr))(paths, noise)
    assert set(got) == set(want) == set(lockstep.path_names(spec))
    for name in want:
        for a, b in zip(jax.tree_util.tree_leaves(got[name]), jax.tree_util.tree_leaves(want[name])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12, err_msg=name)
        moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(got[name]),
                                                                   jax.tree_util.tree_leaves(paths[name])))
        assert moved > 1e-4, name  # the step did something


def _advance(spec, problem, params0, num_replicas, num_steps, lr=0.1, start=None):
    state = start or lockstep.init_lockstep(params0, spec, num_replicas)
    return jax.jit(lockstep.make_advance(spec), static_argnums=())(state, num_steps, lr, problem)


@pytest.mark.parametrize("variants", [("order1",), pytest.param(("order1", "ode1", "svag"), marks=pytest.mark.slow)])
def test_chunk_size_and_replica_count_do_not_change_any_path_and_the_seed_does(variants, x64):
    """R = 130 replicas (padded to whole blocks) in chunks of 64, 128 and one chunk: every path of
    every replica the same; replica r's path is the same with R = 64; the same seed gives the same
    state, another seed another; two calls of 2 steps equal one call of 4 (the step counter keys
    the draws). The random numbers are identical; XLA may vectorise a loop over 64 replicas
    otherwise than one over 192 (1 ulp per operation), so float64 and 1e-12 relative."""
    problem, params0 = e1_problem(dtype=jnp.float64)
    runs = {c: _advance(spec_of(variants=variants, substeps=1, chunk_size=c), problem, params0, 130, 4)
            for c in (64, 128, 4096)}
    spec = spec_of(variants=variants, substeps=1)
    small = _advance(spec, problem, params0, 64, 4)
    again = _advance(spec, problem, params0, 64, 2, start=_advance(spec, problem, params0, 64, 2))
    other = _advance(spec_of(variants=variants, substeps=1, seed=4), problem, params0, 64, 4)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-13)
    leaves = {c: jax.tree_util.tree_leaves(s.paths) for c, s in runs.items()}
    for c in (64, 128):
        for a, b in zip(leaves[c], leaves[4096]):
            close(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(small.paths), leaves[4096]):
        close(a, b[:64])
    assert int(again.step) == 4
    for a, b in zip(jax.tree_util.tree_leaves(again.paths), jax.tree_util.tree_leaves(small.paths)):
        close(a, b)
    d_small, d_other = np.asarray(small.paths["order1"]["out"]["w"]), np.asarray(other.paths["order1"]["out"]["w"])
    assert np.all(np.isfinite(d_small)) and not np.allclose(d_small, d_other)
    # replicas differ from each other (block draws are not repeated across columns or blocks)
    assert len(np.unique(np.asarray(runs[4096].paths["order1"]["out"]["w"])[:, 0, 0])) == 130


def test_batched_layout_refuses_what_it_does_not_cover():
    problem, _ = e1_problem()
    deep = models.make_model("mlp", in_dim=2, hidden=(4, 4), out_dim=1, keep_prob=0.8, dropout_layers=(1,))
    cases = [(dict(), Problem(deep, "mse", "shared", problem.x, problem.y), "one hidden layer"),
             (dict(diffusion="exact"), problem, "closed_form"),
             (dict(trace="exact"), problem, "one-sample"),
             (dict(chunk_size=100), problem, "multiple of 64"),
             (dict(layout="soa"), problem, "unknown layout")]
    for kw, prob, message in cases:
        with pytest.raises(ValueError, match=message):
            lockstep.check_spec(spec_of(**kw), prob)
    lockstep.check_spec(spec_of(), problem)  # the E1 set is covered
