"""The lockstep of `sme.lockstep` for many replicas: replica vectors, counter-based draws, chunks.

The E1 net (an MLP with one hidden layer, dropout on it, MSE, shared masks, the closed-form L_S and
Sigma^{1/2}; also the frozen-feature readout of `sme.exact`) has P = d m + m o parameters: a replica-step
of the full E1 set (discrete GD, order 1/2/r2 and the ODE controls on two Richardson grids, SVAG(4))
is ~1.3e5 FLOPs (XLA's count) spread over tensors of a few dozen entries. Vmapped over a leading
replica axis (`sme.lockstep.make_advance`), every contraction is a batch of tiny matmuls whose inner
loops run over 2 to 8 entries, and every key a per-replica `fold_in`. Here:

* inside a chunk every parameter entry is one vector over the C replicas (`to_lists`), and the forward
  pass, R^drop, the closed-form L_S = R_S + R_1 and the closed-form diffusion potential Q
  (`sme.diffusion.closed_form_potential`) are written over the unrolled small axes (n, d, m, o), so
  every operation is elementwise over the replicas and XLA fuses each gradient into loops the vector
  units run many replicas at a time;
* gradients, the order-2 correction (grad ||grad L_S||^2) and the r2 sample trace (grad ||grad Q||^2)
  are autodiff of the SUM over replicas: replicas do not interact, so d(sum_r f_r)/d theta_r is
  replica r's gradient, and second derivatives follow the same way;
* random numbers: counter-based, never a per-replica key. Number k of replica r at discrete step N
  for one purpose (the discrete masks, the Euler-Maruyama normals of a noise tag, SVAG's masks) is
  the threefry2x32 hash of the counter pair (N, r W + k) under the purpose's key (of seed, stream,
  purpose; derived once at trace time), W the purpose's counters per replica. So a step costs one
  hash call per purpose over exactly the chunk's counters (no key derivation in the loop), and a
  replica's numbers are a pure function of (seed, N, r, k): neither the chunk size nor R changes them
  (replica r's path is the same in every run with the same seed and at least r + 1 replicas), and
  an interrupted run resumed at step N draws what the uninterrupted one does, up to float rounding;
* the replica axis is cut in chunks of ``LockstepSpec.chunk_size`` replicas, run one after the other
  with `lax.map`, each for all steps of the `advance` call, so memory is bounded by the chunk. Small
  chunks (a few hundred replicas) are also the fast ones: every intermediate replica vector of the
  step then stays in the caches (``benchmarks/lockstep.py``);
* the ODE controls use no noise: replicas that share their start (as `init_lockstep` puts them)
  share the whole path, which is integrated once.

The processes are those of `sme.lockstep` with its conventions (Euler-Maruyama substeps, Richardson
on nested grids fed one Brownian path, quantile coupling through `coupled_normals` and a Brownian
bridge, SVAG(l)); only the random numbers differ, so the laws are the same and the numbers are not
(`layout='replica'` keeps the per-replica keys and every number of earlier runs). `batched_step` is
pure in its noise: given the same normals and uniforms it equals the vmapped per-replica step to
float tolerance (tests/test_lockstep_large_r.py). The price of the unrolled form is compile time
(minutes for the full E1 set on a loaded 2-core machine).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

from sme import rng
from sme.lockstep_state import ODE_DRIFTS, SHARED_TAG, TAGS, Lockstep
from sme.diffusion import Problem, coupled_normals
from sme.exact import ReadoutSpec
from sme.models import ACTIVATIONS, MLPSpec
from sme.sde import svag_coefficients

# Part of the reproducibility contract of this layout: never renumber.
BATCHED_TAG = 7  # folded into the stream key before the purpose (the per-replica layout's tags are 0..6)
DISCRETE, EM = 0, 1  # purposes: the discrete masks (DROPOUT stream); EM + noise tag (SDE stream)
SVAG_PURPOSE = EM + TAGS["svag"]  # SVAG's masks (SDE stream)
MAX_COUNTER = 2**32  # the counters r W + k are 32-bit words


def check_batched(spec, problem: Problem) -> None:
    """Raise ValueError naming the problem unless the batched layout covers `spec` on `problem`."""
    model = problem.model
    mlp = isinstance(model.spec, MLPSpec) and len(model.spec.hidden) == 1
    if not (mlp or isinstance(model.spec, ReadoutSpec)):
        raise ValueError("layout 'batched' is written for an MLP with one hidden layer (two_layer) or the "
                         f"frozen-feature readout of sme.exact; got {type(model.spec).__name__} "
                         f"{getattr(model.spec, 'hidden', '')}")
    if problem.mode != "shared" or problem.loss != "mse":
        raise ValueError(f"layout 'batched' needs shared masks and the mse loss, not {problem.mode}/{problem.loss}")
    if spec.diffusion != "closed_form" or spec.estimator != "closed_form":
        raise ValueError("layout 'batched' needs diffusion = loss_estimator = closed_form, not "
                         f"{spec.diffusion}/{spec.estimator}")
    if "r2" in spec.variants and spec.trace != "sample":
        raise ValueError(f"layout 'batched' computes the r2 trace by its one-sample estimate, not {spec.trace!r}")
    if not isinstance(spec.chunk_size, (int, np.integer)) or spec.chunk_size < 1:
        raise ValueError(f"chunk_size {spec.chunk_size!r} must be a positive integer (replicas per chunk)")


class Net(NamedTuple):
    """The E1 net's data as python lists of scalars (x[i][k], y[i][o]) and its constants."""

    x: list
    y: list
    activation: str  # "" for the frozen-feature readout (h = x)
    keep_prob: float

    @classmethod
    def of(cls, problem: Problem) -> Net:
        activation = getattr(problem.model.spec, "activation", "")
        rows = lambda a: [[a[i, k] for k in range(a.shape[1])] for i in range(a.shape[0])]
        return cls(rows(problem.x), rows(problem.y), activation, problem.model.sites[-1].keep_prob)

    @property
    def dtype(self):
        return self.x[0][0].dtype


# --- Parameters as lists of replica vectors -------------------------------------------------------
#
# A params leaf (C, *shape) becomes nested python lists (over *shape) of (C,) replica vectors, so
# every operation below is elementwise over the C replicas: XLA fuses a whole gradient (and its
# second derivatives) into loops over the replica axis that the vector units run C lanes at a time.
# The sizes (n = 8, d = 2, m = 5, o = 1 for E1) are unrolled at trace time.


def to_lists(params):
    def one(a):
        a = jnp.moveaxis(a, 0, -1)
        rec = lambda b: [rec(b[i]) for i in range(b.shape[0])] if b.ndim > 1 else b
        return rec(a)

    return jax.tree_util.tree_map(one, params)


def from_lists(lists, like):
    """Inverse of `to_lists`; ``like`` gives the params structure (its leaves are not read)."""
    treedef = jax.tree_util.tree_structure(like)

    def one(node):
        rec = lambda x: jnp.stack([rec(e) for e in x]) if isinstance(x, list) else x
        return jnp.moveaxis(rec(node), -1, 0)

    return jax.tree_util.tree_unflatten(treedef, [one(node) for node in treedef.flatten_up_to(lists)])


def hidden(net: Net, params) -> list:
    """h[i][j] = act(x_i W1_:j + b1_j) (the readout's features: x[i][j])."""
    if not net.activation:
        return net.x
    layer, act = params["hidden"][0], ACTIVATIONS[net.activation]
    w, b = layer["w"], layer.get("b")
    d, m = len(w), len(w[0])
    return [[act(sum(xi[k] * w[k][j] for k in range(d)) + (b[j] if b is not None else 0.0)) for j in range(m)]
            for xi in net.x]


def features(net: Net, params) -> list:
    """phi[i][j][o] = h_ij W2_jo, so that f(x_i; eta)_o = sum_j eta_j phi_ijo + b2_o."""
    w = params["out"]["w"]
    return [[[hij * wjo for wjo in w[j]] for j, hij in enumerate(hi)] for hi in hidden(net, params)]


def _residual(net: Net, params, phi, eta=None) -> list:
    """res[i][o] = f(x_i; eta)_o - y_io."""
    b = params["out"].get("b")
    out = []
    for phi_i, y_i in zip(phi, net.y):
        row = []
        for o, y_io in enumerate(y_i):
            f = sum(pj[o] * (1.0 if eta is None else eta[j]) for j, pj in enumerate(phi_i))
            row.append(f + (b[o] if b is not None else 0.0) - y_io)
        out.append(row)
    return out


def _sum_sq(nested) -> jax.Array:
    return sum(_sum_sq(e) if isinstance(e, list) else e**2 for e in nested)


def dropout_risk(net: Net, params, eta=None) -> jax.Array:
    """R^drop_S(theta; eta) = (1/2n) sum_i ||f(x_i; eta) - y_i||^2, eta a list of m replica vectors
    (None: all ones). (C,)."""
    return 0.5 * _sum_sq(_residual(net, params, features(net, params), eta)) / len(net.x)


def modified_loss(net: Net, params) -> jax.Array:
    """Closed-form L_S = R_S + R_1, R_1 = ((1 - p)/(2p)) mean_i sum_j ||W2_j||^2 h_ij^2 (`sme.losses`). (C,)."""
    phi = features(net, params)
    v = (1.0 - net.keep_prob) / net.keep_prob
    return 0.5 * (_sum_sq(_residual(net, params, phi)) + v * _sum_sq(phi)) / len(net.x)


def noise_potential(net: Net, params, zeta, z) -> jax.Array:
    """`sme.diffusion.closed_form_potential` (shared masks), zeta: m and z: m(m-1)/2 replica vectors
    (row-major upper triangle); its per-replica gradient is Sigma(theta)^{1/2} xi. With phi as above:
    Q = (sqrt(v) [sum_io (sum_j zeta_j phi_ijo) res_io + (beta/2) sum_ijo zeta_j phi_ijo^2]
    + v sum_{k<l} z_kl sum_io phi_iko phi_ilo) / n. (C,)."""
    p = net.keep_prob
    v, beta = (1.0 - p) / p, (1.0 - 2.0 * p) / p
    phi = features(net, params)
    res = _residual(net, params, phi)
    m = len(phi[0])
    linear = 0.0
    for phi_i, res_i in zip(phi, res):
        for o, r in enumerate(res_i):
            linear = linear + sum(zeta[j] * pj[o] for j, pj in enumerate(phi_i)) * r
            linear = linear + 0.5 * beta * sum(zeta[j] * pj[o] ** 2 for j, pj in enumerate(phi_i))
    rows, cols = np.triu_indices(m, 1)
    pair = sum(z[q] * sum(phi_i[k][o] * phi_i[l][o] for phi_i in phi for o in range(len(phi_i[0])))
               for q, (k, l) in enumerate(zip(rows, cols)))
    return (np.sqrt(v) * linear + v * pair) / len(net.x)


def _grad(fn):
    """Per-replica gradient of fn(params, ...) -> (C,): autodiff of the sum over replicas (replicas
    do not interact, so d(sum_r f_r)/d theta_r is replica r's gradient; second derivatives alike)."""
    return jax.grad(lambda params, *args: jnp.sum(fn(params, *args)))


def _sq(tree) -> jax.Array:
    """||theta_r||^2 per replica of a lists-of-replica-vectors pytree. (C,)."""
    return sum(a**2 for a in jax.tree_util.tree_leaves(tree))


def drift_potential(net: Net, kind: str, params, zeta, z, *, lr) -> jax.Array:
    """U of `sme.sde.drift_potential` (closed-form L_S; r2 with the sample trace). (C,)."""
    loss = modified_loss(net, params)
    if kind == "order1":
        return loss
    potential = loss + 0.25 * lr * _sq(_grad(lambda p: modified_loss(net, p))(params))
    if kind == "order2":
        return potential
    return potential + 0.25 * lr * _sq(_grad(lambda p: noise_potential(net, p, zeta, z))(params))


def increment(net: Net, kind: str, params, noise, *, h, lr, diffusion: bool):
    """One Euler-Maruyama increment h b + sqrt(eps h) sigma xi = grad [sqrt(eps h) Q - h U] (one gradient,
    as `sme.sde.make_sme`), ``noise`` the substep's (zeta, z) lists of replica vectors; without
    ``diffusion`` the ODE control's h b."""
    zeta, z = noise

    def total(p):
        value = -h * drift_potential(net, kind, p, zeta, z, lr=lr)
        if diffusion:
            value = value + jnp.sqrt(lr * h) * noise_potential(net, p, zeta, z)
        return value

    return _grad(total)(params)


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def _axpy(alpha, x, y):
    return jax.tree_util.tree_map(lambda u, w: alpha * u + w, x, y)


# --- One discrete step of every process, pure in its noise ---------------------------------------


class StepNoise(NamedTuple):
    """A step's random numbers for a chunk of C replicas, replica axis last.

    ``u`` (m, C): uniforms of the discrete mask (kept iff u < p); ``normals``: per noise tag, the
    fine grid's standard normals (F, m + m(m-1)/2, C), zeta first; ``svag_u`` (l_svag, 2, m, C).
    """

    u: jax.Array
    normals: dict
    svag_u: jax.Array | None


def _masks(u, keep_prob):
    return (u < keep_prob).astype(u.dtype) / jnp.asarray(keep_prob, u.dtype)


def em_noises(spec, normals: jax.Array, zeta_step, m: int):
    """Fine (and with Richardson coarse) substep noises, each (zeta (S, m, C), z (S, q, C)), from the
    (F, m + q, C) normals: under quantile coupling the fine zetas are the Brownian bridge pinned to
    the step's coupled zeta (`sme.sde.bridge`); the coarse grid gets pairwise sums / sqrt 2 (`sme.sde.coarsen`)."""
    zeta, z = normals[:, :m], normals[:, m:]
    fine = normals.shape[0]
    if zeta_step is not None:
        zeta = zeta_step[None] / jnp.sqrt(jnp.asarray(fine, zeta.dtype)) + zeta - jnp.mean(zeta, axis=0, keepdims=True)
    if not spec.richardson:
        return (zeta, z), None
    pairs = lambda a: (a[0::2] + a[1::2]) / jnp.sqrt(jnp.asarray(2.0, a.dtype))
    return (zeta, z), (pairs(zeta), pairs(z))


def _em_path(net, kind, params, noises, *, h, lr, diffusion):
    """Euler-Maruyama over the substeps of ``noises`` (a `lax.scan`: one compiled body per grid)."""

    def body(p, xs):
        zeta, z = xs
        return _add(p, increment(net, kind, p, (list(zeta), list(z)), h=h, lr=lr, diffusion=diffusion)), None

    return jax.lax.scan(body, params, noises)[0]


def batched_step(spec, net: Net, paths: dict, noise: StepNoise, lr) -> dict:
    """Discrete step N -> N + 1 of every path (names of `sme.lockstep.path_names`) of a chunk of
    replicas (leading axis C, as in `sme.lockstep.Lockstep`)."""
    lists = {k: to_lists(v) for k, v in paths.items()}
    new = list_step(spec, net, lists, noise, lr)
    return {k: from_lists(new[k], paths[k]) for k in new}


def list_step(spec, net: Net, paths: dict, noise: StepNoise | None, lr) -> dict:
    """`batched_step` on paths held as lists of replica vectors (`to_lists`); any subset of the
    paths; ``noise`` None when ``paths`` holds ODE paths only (they use none)."""

    new, grids = {}, {}
    if "discrete" in paths:
        eta = list(_masks(noise.u, net.keep_prob))
        grad = _grad(lambda p: dropout_risk(net, p, eta))(paths["discrete"])
        new["discrete"] = _axpy(-lr, grad, paths["discrete"])
    quantile = spec.coupling == "quantile" and noise is not None
    zeta_step = coupled_normals(noise.u) if quantile else None
    m = len(net.x[0]) if not net.activation else len(paths[next(iter(paths))]["out"]["w"])
    for v in spec.em_variants:
        if v not in paths:
            continue
        tag = TAGS[v] if spec.coupling == "none" else SHARED_TAG
        if tag not in grids:
            if noise is None:  # ODE only: a zero-size noise of the right number of substeps
                empty = jnp.zeros((spec.fine_substeps, 0, 1), net.dtype)
                grids[tag] = ((empty, empty), (empty[: spec.substeps], empty[: spec.substeps]) if spec.richardson else None)
            else:
                grids[tag] = em_noises(spec, noise.normals[tag], zeta_step, m)
        fine, coarse = grids[tag]
        kind, with_diffusion = ODE_DRIFTS.get(v, v), v not in ODE_DRIFTS
        new[v] = _em_path(net, kind, paths[v], fine, h=lr / spec.fine_substeps, lr=lr, diffusion=with_diffusion)
        if spec.richardson:
            new[v + "/coarse"] = _em_path(net, kind, paths[v + "/coarse"], coarse, h=lr / spec.substeps, lr=lr,
                                          diffusion=with_diffusion)
    if "svag" in paths:
        c_plus, c_minus = svag_coefficients(spec.svag_substeps)

        def body(p, u_pair):
            e1, e2 = list(_masks(u_pair[0], net.keep_prob)), list(_masks(u_pair[1], net.keep_prob))
            g = _grad(lambda q: c_plus * dropout_risk(net, q, e1) + c_minus * dropout_risk(net, q, e2))(p)
            return _axpy(-lr / spec.svag_substeps, g, p), None

        new["svag"] = jax.lax.scan(body, paths["svag"], noise.svag_u)[0]
    return new


# --- Random numbers: counter-based, one hash call per step and purpose ---------------------------


def purpose_key(seed: int, stream: int, purpose: int) -> tuple[int, int]:
    """The two threefry key words of one purpose: the stream key (`sme.rng.stream_key`, replica 0)
    folded with BATCHED_TAG and the purpose. Computed at trace time (the seed is static)."""
    with jax.ensure_compile_time_eval():
        key = jax.random.fold_in(jax.random.fold_in(rng.stream_key(seed, stream), BATCHED_TAG), purpose)
        data = np.asarray(jax.random.key_data(key))
    if data.shape != (2,):
        raise ValueError(f"layout 'batched' draws with threefry2x32 keys; the default PRNG gives key data {data.shape}")
    return int(data[0]), int(data[1])


def counters_per_replica(count: int, dtype) -> int:
    """W: threefry counters per replica for ``count`` uniforms (two 32-bit words per counter; a
    float64 uniform takes both words of one counter, a narrower one a single word)."""
    return count if jnp.dtype(dtype).itemsize == 8 else -(-count // 2)


def uniforms(key: tuple[int, int], step, first, num: int, count: int, dtype) -> jax.Array:
    """(count, num) uniforms in [0, 1): column c for replica first + c, row k from the counter pair
    (step, (first + c) W + k) (float32 and narrower: rows k < W from the hash's first word, the
    rest from its second), with the mantissa bits of `jax.random.uniform`."""
    words = counters_per_replica(count, dtype)
    replicas = jnp.asarray(first).astype(jnp.uint32) + jnp.arange(num, dtype=jnp.uint32)
    x2 = replicas[None, :] * jnp.uint32(words) + jnp.arange(words, dtype=jnp.uint32)[:, None]
    x1 = jnp.broadcast_to(jnp.asarray(step).astype(jnp.uint32), x2.shape)
    k1, k2 = (jnp.full(x2.shape, np.uint32(k)) for k in key)
    hi, lo = threefry2x32_p.bind(k1, k2, x1, x2)
    if jnp.dtype(dtype).itemsize == 8:
        bits = (hi.astype(jnp.uint64) << 32) | lo.astype(jnp.uint64)
        one = jax.lax.bitcast_convert_type((bits >> 12) | np.uint64(0x3FF0000000000000), jnp.float64)
        return (one - 1.0).astype(dtype)
    bits = jnp.concatenate([hi, lo])[:count]
    one = jax.lax.bitcast_convert_type((bits >> 9) | np.uint32(0x3F800000), jnp.float32)
    return (one - 1.0).astype(dtype)


def standard_normals(u: jax.Array) -> jax.Array:
    """Phi^{-1} of uniforms in [0, 1) as `jax.random.normal` computes it: sqrt 2 erfinv(2u - 1),
    2u - 1 kept above -1."""
    low = np.nextafter(np.asarray(-1.0, u.dtype), np.asarray(0.0, u.dtype))
    return np.sqrt(2.0).astype(u.dtype) * jax.lax.erf_inv(jnp.maximum(2.0 * u - 1.0, low))


def step_noise(spec, m: int, step, first, num: int, dtype) -> StepNoise:
    """The StepNoise of replicas [first, first + num) at discrete step N (`uniforms` per purpose)."""

    seed, q = spec.seed, m * (m - 1) // 2
    draw = lambda stream, purpose, shape: uniforms(purpose_key(seed, stream, purpose), step, first, num,
                                                   int(np.prod(shape)), dtype).reshape(*shape, num)
    u = draw(rng.DROPOUT, DISCRETE, (m,))
    tags = sorted({TAGS[v] if spec.coupling == "none" else SHARED_TAG for v in spec.em_variants})
    normals = {t: standard_normals(draw(rng.SDE, EM + t, (spec.fine_substeps, m + q))) for t in tags}
    svag_u = None
    if "svag" in spec.variants:
        svag_u = draw(rng.SDE, SVAG_PURPOSE, (spec.svag_substeps, 2, m))
    return StepNoise(u, normals, svag_u)


def max_counters(spec, m: int, dtype) -> int:
    """The largest W of `step_noise`'s purposes (R W must stay below MAX_COUNTER)."""
    q = m * (m - 1) // 2
    counts = [m, spec.fine_substeps * (m + q) if spec.em_variants else 0, spec.svag_substeps * 2 * m]
    return max(counters_per_replica(c, dtype) for c in counts)


# --- advance -----------------------------------------------------------------------------------


def chunking(num_replicas: int, chunk_size: int) -> tuple[int, int]:
    """(chunk C, number of chunks): C = chunk_size, or R when R is smaller."""
    chunk = min(chunk_size, num_replicas)
    return chunk, -(-num_replicas // chunk)


def _advance_odes(spec, net: Net, odes: dict, num_steps, lr) -> dict:
    """The ODE controls use no noise (closed-form drift), so replicas that start at one point (as
    `sme.lockstep.init_lockstep` puts them) stay there: one replica is integrated and broadcast.
    Replicas that differ are integrated each (`lax.cond`)."""
    def run(paths):
        lists = jax.lax.fori_loop(0, num_steps, lambda i, p: list_step(spec, net, p, None, lr),
                                  {k: to_lists(v) for k, v in paths.items()})
        return {k: from_lists(lists[k], paths[k]) for k in paths}

    leaves = jax.tree_util.tree_leaves(odes)
    same = jnp.all(jnp.stack([jnp.all(a == a[:1]) for a in leaves]))
    one = lambda paths: jax.tree_util.tree_map(
        lambda a, b: jnp.broadcast_to(a, b.shape), run(jax.tree_util.tree_map(lambda a: a[:1], paths)), paths)
    return jax.lax.cond(same, one, run, odes)


def make_advance(spec):
    """``advance(state, num_steps, lr, problem) -> state`` like `sme.lockstep.make_advance`: chunks of
    replicas one after the other (`lax.map`), each all ``num_steps`` steps in a `fori_loop`."""

    def advance(state, num_steps, lr, problem: Problem):
        check_batched(spec, problem)
        net = Net.of(problem)
        leaves = jax.tree_util.tree_leaves(state.paths)
        num_replicas, dtype = leaves[0].shape[0], leaves[0].dtype
        chunk, num_chunks = chunking(num_replicas, spec.chunk_size)
        padded = chunk * num_chunks
        m = problem.model.sites[-1].size
        if padded * max_counters(spec, m, dtype) >= MAX_COUNTER:
            raise ValueError(f"{num_replicas} replicas (padded to {padded}) exceed the batched layout's 32-bit "
                             f"counters: at most {MAX_COUNTER // max_counters(spec, m, dtype) - 1} with these processes")

        def split(a):  # (R, ...) -> (chunks, C, ...), padded with copies of the last replica
            a = jnp.concatenate([a, jnp.broadcast_to(a[-1:], (padded - num_replicas, *a.shape[1:]))])
            return a.reshape(num_chunks, chunk, *a.shape[1:])

        def join(a):
            return a.reshape(padded, *a.shape[2:])[:num_replicas]

        def run_chunk(args):
            paths, index = args
            first = index * chunk

            def body(i, p):
                noise = step_noise(spec, m, state.step + i, first, chunk, dtype)
                return list_step(spec, net, p, noise, lr)

            lists = jax.lax.fori_loop(0, num_steps, body, {k: to_lists(v) for k, v in paths.items()})
            return {k: from_lists(lists[k], paths[k]) for k in paths}

        odes = {k: v for k, v in state.paths.items() if k.split("/")[0] in ODE_DRIFTS}
        noisy = {k: v for k, v in state.paths.items() if k not in odes}
        chunks = jax.tree_util.tree_map(split, noisy)
        done = jax.tree_util.tree_map(join, jax.lax.map(run_chunk, (chunks, jnp.arange(num_chunks))))
        if odes:
            done.update(_advance_odes(spec, net, odes, num_steps, lr))
        return Lockstep(state.step + num_steps, done)

    return advance
