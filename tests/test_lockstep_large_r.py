"""The batched (replica-last, chunked) lockstep of sme.lockstep_batched against the per-replica one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

from sme import data, exact, lockstep, lockstep_batched, models, rng, sde
from sme.diffusion import Problem, coupled_normals, masks_from_uniforms

BLOCK = 64  # replicas of the one-step comparison; chunks of 2 * BLOCK below

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
    noise = lockstep_batched.step_noise(spec, m, 4, 0, num, jnp.float64)
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
    """R = 130 replicas in chunks of 50 (the last one padded), 128 and one chunk: every path of
    every replica the same; replica r's path is the same with R = 64; the same seed gives the same
    state, another seed another; two calls of 2 steps equal one call of 4 (the step counter keys
    the draws). The random numbers are identical; XLA may vectorise a loop over 64 replicas
    otherwise than one over 192 (1 ulp per operation), so float64 and 1e-12 relative."""
    problem, params0 = e1_problem(dtype=jnp.float64)
    runs = {c: _advance(spec_of(variants=variants, substeps=1, chunk_size=c), problem, params0, 130, 4)
            for c in (50, 128, 4096)}
    spec = spec_of(variants=variants, substeps=1)
    small = _advance(spec, problem, params0, 64, 4)
    again = _advance(spec, problem, params0, 64, 2, start=_advance(spec, problem, params0, 64, 2))
    other = _advance(spec_of(variants=variants, substeps=1, seed=4), problem, params0, 64, 4)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-13)
    leaves = {c: jax.tree_util.tree_leaves(s.paths) for c, s in runs.items()}
    for c in (50, 128):
        for a, b in zip(leaves[c], leaves[4096]):
            close(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(small.paths), leaves[4096]):
        close(a, b[:64])
    assert int(again.step) == 4
    for a, b in zip(jax.tree_util.tree_leaves(again.paths), jax.tree_util.tree_leaves(small.paths)):
        close(a, b)
    d_small, d_other = np.asarray(small.paths["order1"]["out"]["w"]), np.asarray(other.paths["order1"]["out"]["w"])
    assert np.all(np.isfinite(d_small)) and not np.allclose(d_small, d_other)
    # replicas differ from each other (no counter is shared between replicas)
    assert len(np.unique(np.asarray(runs[4096].paths["order1"]["out"]["w"])[:, 0, 0])) == 130


def test_batched_layout_refuses_what_it_does_not_cover():
    problem, _ = e1_problem()
    deep = models.make_model("mlp", in_dim=2, hidden=(4, 4), out_dim=1, keep_prob=0.8, dropout_layers=(1,))
    cases = [(dict(), Problem(deep, "mse", "shared", problem.x, problem.y), "one hidden layer"),
             (dict(diffusion="exact"), problem, "closed_form"),
             (dict(trace="exact"), problem, "one-sample"),
             (dict(chunk_size=0), problem, "positive integer"),
             (dict(layout="soa"), problem, "unknown layout")]
    for kw, prob, message in cases:
        with pytest.raises(ValueError, match=message):
            lockstep.check_spec(spec_of(**kw), prob)
    lockstep.check_spec(spec_of(), problem)  # the E1 set is covered


def _threefry_uniforms(key, step, counters):
    """float32 uniforms of `jax.random.uniform`'s bit recipe from jax's own threefry2x32 of the
    counter pairs (step, c): the reference for the layout's documented draw (first words, then second)."""
    counters = np.asarray(counters, np.uint32)
    words = np.asarray(threefry_2x32(jnp.asarray(key, jnp.uint32),
                                     jnp.asarray(np.concatenate([np.full_like(counters, step), counters]))))
    hi, lo = words[: counters.size], words[counters.size:]
    to_unit = lambda b: ((b >> 9) | np.uint32(0x3F800000)).view(np.float32) - np.float32(1.0)
    return to_unit(hi), to_unit(lo)


def test_counter_based_draws_follow_their_contract_and_laws():
    """`uniforms`: number k of replica r at step N is the threefry hash of (N, r W + k) under the
    purpose's key (checked against jax's threefry2x32 on hand-built counters); any replica range gives
    the same columns as a wider draw; another step or purpose gives other numbers. Laws on 4,096
    replicas x 60 normals (n = 245,760): the mean within 4.5 standard errors (1/sqrt(n)) of 0, the
    variance within 4.5 of its standard error sqrt(2/n) of 1, P(|Z| > 2) within 4.5 SE of 0.0455,
    neighbouring numbers uncorrelated (|rho| < 4.5/sqrt(n)); SVAG's uniforms' mean and variance
    likewise. A false alarm has probability < 7 x 7e-6 (and the seed is fixed). float64 uniforms use
    both words: nearly all of them are not float32 numbers."""
    spec = spec_of(substeps=2, richardson=True)
    m, q = 5, 10
    key = lockstep_batched.purpose_key(spec.seed, rng.SDE, lockstep_batched.EM)
    count = spec.fine_substeps * (m + q)  # 60 numbers, W = 30 counters per replica
    words = lockstep_batched.counters_per_replica(count, jnp.float32)
    u = np.asarray(lockstep_batched.uniforms(key, 9, 1000, 3, count, jnp.float32))  # replicas 1000..1002
    for col, r in enumerate(range(1000, 1003)):
        hi, lo = _threefry_uniforms(key, 9, r * words + np.arange(words))
        np.testing.assert_array_equal(u[:, col], np.concatenate([hi, lo]))
    wide = np.asarray(jax.jit(lambda s: lockstep_batched.uniforms(key, s, 990, 40, count, jnp.float32))(9))
    np.testing.assert_array_equal(wide[:, 10:13], u)
    other_step = np.asarray(lockstep_batched.uniforms(key, 10, 1000, 3, count, jnp.float32))
    other_key = lockstep_batched.purpose_key(spec.seed, rng.SDE, lockstep_batched.EM + 1)
    other_purpose = np.asarray(lockstep_batched.uniforms(other_key, 9, 1000, 3, count, jnp.float32))
    assert not np.any(other_step == u) and not np.any(other_purpose == u)

    noise = lockstep_batched.step_noise(spec, m, 0, 0, 4096, jnp.float32)
    z = np.asarray(noise.normals[lockstep.SHARED_TAG], np.float64).ravel()
    n = z.size
    assert abs(z.mean()) < 4.5 / np.sqrt(n)
    assert abs(z.var() - 1.0) < 4.5 * np.sqrt(2.0 / n)
    tail = np.mean(np.abs(z) > 2.0)
    assert abs(tail - 0.0455) < 4.5 * np.sqrt(0.0455 * 0.9545 / n)
    rho = np.corrcoef(z[:-1], z[1:])[0, 1]
    assert abs(rho) < 4.5 / np.sqrt(n)
    uu = np.asarray(noise.svag_u, np.float64).ravel()  # 4,096 x 40
    assert abs(uu.mean() - 0.5) < 4.5 * np.sqrt(1 / 12 / uu.size)
    assert abs(uu.var() - 1 / 12) < 4.5 * np.sqrt(1 / 180 / uu.size)  # Var (U - 1/2)^2 = 1/80 - 1/144 = 1/180
    with jax.enable_x64(True):
        u64 = np.asarray(lockstep_batched.uniforms(key, 9, 0, 1000, count, jnp.float64))
    assert u64.dtype == np.float64 and np.mean(u64 != u64.astype(np.float32)) > 0.99
    assert np.all((u64 >= 0) & (u64 < 1))


def test_too_many_replicas_for_the_32_bit_counters_is_refused():
    """R W >= 2**32 would reuse counters: refused at trace time (eval_shape allocates nothing)."""
    problem, params0 = e1_problem()
    spec = spec_of(variants=("order1",), substeps=1, chunk_size=4096)
    num = 2**32 // lockstep_batched.max_counters(spec, 5, jnp.float32) + 1
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((num, *a.shape), a.dtype), params0)
    state = lockstep.Lockstep(jax.ShapeDtypeStruct((), jnp.int32), {name: shapes for name in lockstep.path_names(spec)})
    with pytest.raises(ValueError, match="32-bit counters"):
        jax.eval_shape(lambda s: lockstep.make_advance(spec)(s, 1, 0.1, problem), state)
