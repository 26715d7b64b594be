"""The lockstep of `sme.lockstep` for many replicas: replica axis last, one random draw per block.

The E1 net (an MLP with one hidden layer, dropout on it, MSE, shared masks, the closed-form L_S and
Sigma^{1/2}) has P = d m + m o parameters: a replica-step is a few thousand FLOPs spread over
tensors of a few dozen entries. Vmapped over a leading replica axis (`sme.lockstep.make_advance`),
every contraction becomes a batch of tiny matmuls and every key a per-replica `fold_in`. Here the
same processes are written for parameters laid out replica-last (structure of arrays: W1 (d, m, C),
W2 (m, o, C) for a chunk of C replicas), so every operation is an elementwise loop over the
replica axis, which the vector units take C lanes at a time:

* forward pass, R^drop, the closed-form L_S = R_S + R_1 and the closed-form diffusion potential Q
  (`sme.diffusion.closed_form_potential`) are sums of broadcast products over the small axes;
* gradients, the order-2 correction (grad ||grad L_S||^2) and the r2 sample trace (grad ||grad Q||^2)
  are autodiff of the SUM over replicas: replicas do not interact, so d(sum_r f_r)/d theta_r is
  replica r's gradient, and second derivatives follow the same way;
* random numbers: one draw per process and step for a block of `BLOCK` replicas (key of (seed,
  stream, step, block)), never a per-replica key; replica r takes column r mod BLOCK of block
  r // BLOCK, so results depend neither on the chunk size nor on R (replica r's path is the same in
  every run with the same seed and at least r + 1 replicas);
* the replica axis is cut in chunks of ``LockstepSpec.chunk_size`` replicas (a multiple of BLOCK),
  run one after the other with `lax.map`, each for all steps of the `advance` call, so the working
  set is bounded by the chunk and stays in cache.

The processes are those of `sme.lockstep` with its conventions (Euler-Maruyama substeps, Richardson
on nested grids fed one Brownian path, quantile coupling through `coupled_normals` and a Brownian
bridge, SVAG(l)); only the random numbers differ, so the laws are the same and the numbers are not
(`layout='replica'` keeps the per-replica keys and every number of earlier runs). `batched_step` is
pure in its noise: given the same normals and uniforms it equals the vmapped per-replica step to
float tolerance (tests/test_lockstep_large_r.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sme import rng
from sme.diffusion import Problem, coupled_normals
from sme.exact import ReadoutSpec
from sme.models import ACTIVATIONS, MLPSpec
from sme.sde import svag_coefficients

BLOCK = 64  # replicas per random draw: part of the reproducibility contract, never change it
BATCHED_TAG = 7  # folded into the step key before the block index (the per-replica layout's tags are 0..6)
DISCRETE, EM_SHARED, SVAG = 0, 1, 2  # purposes of one block's draws (EM_SHARED + 1 + tag under coupling none)


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
    if spec.chunk_size < 1 or spec.chunk_size % BLOCK:
        raise ValueError(f"chunk_size {spec.chunk_size} must be a positive multiple of {BLOCK} (the random-draw block)")


class Net(NamedTuple):
    """The E1 net's data and constants for the replica-last functions (all static but x, y)."""

    x: jax.Array  # (n, d)
    y: jax.Array  # (n, o)
    activation: str  # "" for the frozen-feature readout (h = x)
    keep_prob: float

    @classmethod
    def of(cls, problem: Problem) -> Net:
        activation = getattr(problem.model.spec, "activation", "")
        return cls(problem.x, problem.y, activation, problem.model.sites[-1].keep_prob)


def hidden(net: Net, params) -> jax.Array:
    """h = act(x W1 + b1): (n, m); the readout's frozen features x."""
    if not net.activation:
        return net.x
    layer = params["hidden"][0]
    pre = net.x @ layer["w"]
    if "b" in layer:
        pre = pre + layer["b"]
    return ACTIVATIONS[net.activation](pre)


def features(net: Net, params) -> jax.Array:
    """phi_ik = h_ik W2_k: (n, m, o), so that f(x_i; eta) = sum_k eta_k phi_ik + b2."""
    return hidden(net, params)[:, :, None] * params["out"]["w"][None]


def _residual(net: Net, params, phi, eta=None) -> jax.Array:
    """f(x_i; eta) - y_i: (n, o)."""
    out = jnp.sum(phi if eta is None else phi * eta[None, :, None], axis=1)
    if "b" in params["out"]:
        out = out + params["out"]["b"]
    return out - net.y


def dropout_risk(net: Net, params, eta=None) -> jax.Array:
    """R^drop_S(theta; eta) = (1/2n) sum_i ||f(x_i; eta) - y_i||^2 with eta (m,) (None: all ones)."""
    res = _residual(net, params, features(net, params), eta)
    return 0.5 * jnp.sum(res**2) / res.shape[0]


def modified_loss(net: Net, params) -> jax.Array:
    """Closed-form L_S = R_S + R_1, R_1 = ((1 - p)/(2p)) mean_i sum_j ||W2_j||^2 h_ij^2 (`sme.losses`)."""
    phi = features(net, params)
    res = _residual(net, params, phi)
    v = (1.0 - net.keep_prob) / net.keep_prob
    return 0.5 * (jnp.sum(res**2) + v * jnp.sum(phi**2)) / res.shape[0]


def noise_potential(net: Net, params, zeta: jax.Array, z: jax.Array) -> jax.Array:
    """`sme.diffusion.closed_form_potential` (shared masks) with zeta (m,) and z (m(m-1)/2,) in
    row-major upper-triangle order: its gradient is Sigma(theta)^{1/2} xi. With phi_ik = h_ik W2_k:
    Q = (sqrt(v) [sum_i <sum_k zeta_k phi_ik, res_i> + (beta/2) sum_ik zeta_k ||phi_ik||^2]
    + v sum_{k<l} z_kl sum_i <phi_ik, phi_il>) / n, written as products and sums over the small
    axes (no Gram matrices, no scatter: both are slow batched over replicas on CPU)."""
    p = net.keep_prob
    v, beta = (1.0 - p) / p, (1.0 - 2.0 * p) / p
    phi = features(net, params)  # (n, m, o)
    n, m = phi.shape[0], phi.shape[1]
    res = _residual(net, params, phi)
    linear = jnp.sum(jnp.einsum("k,iko->io", zeta, phi) * res) + 0.5 * beta * jnp.dot(zeta, jnp.sum(phi**2, axis=(0, 2)))
    rows, cols = np.triu_indices(m, 1)
    pair = jnp.dot(z, jnp.sum(phi[:, rows] * phi[:, cols], axis=(0, 2)))
    return (np.sqrt(v) * linear + v * pair) / n


def drift_potential(net: Net, kind: str, params, zeta, z, *, lr) -> jax.Array:
    """U of `sme.sde.drift_potential` (closed-form L_S; r2 with the sample trace)."""
    if kind == "order1":
        return modified_loss(net, params)
    loss, grad_l = jax.value_and_grad(lambda p: modified_loss(net, p))(params)
    potential = loss + 0.25 * lr * _sq(grad_l)
    if kind == "order2":
        return potential
    sample = jax.grad(lambda p: noise_potential(net, p, zeta, z))(params)
    return potential + 0.25 * lr * _sq(sample)


def _sq(tree):
    return sum(jnp.sum(a**2) for a in jax.tree_util.tree_leaves(tree))


def increment(net: Net, kind: str, params, zeta, z, *, h, lr, diffusion: bool):
    """One Euler-Maruyama increment h b + sqrt(eps h) sigma xi = grad [sqrt(eps h) Q - h U] (one gradient,
    as `sme.sde.make_sme`); without ``diffusion`` the ODE control's h b."""

    def total(p):
        value = -h * drift_potential(net, kind, p, zeta, z, lr=lr)
        if diffusion:
            value = value + jnp.sqrt(lr * h) * noise_potential(net, p, zeta, z)
        return value

    return jax.grad(total)(params)


def _add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def _axpy(alpha, x, y):
    return jax.tree_util.tree_map(lambda u, w: alpha * u + w, x, y)


# --- One discrete step of every process, pure in its noise ---------------------------------------


class StepNoise(NamedTuple):
    """A step's random numbers for a chunk of C replicas (leading axis C; per replica below).

    ``u`` (m,): uniforms of the discrete mask (kept iff u < p); ``normals``: per noise tag, the
    fine grid's standard normals (F, m + m(m-1)/2), zeta first; ``svag_u`` (l_svag, 2, m).
    """

    u: jax.Array
    normals: dict
    svag_u: jax.Array | None


def _masks(u, keep_prob):
    return (u < keep_prob).astype(u.dtype) / jnp.asarray(keep_prob, u.dtype)


def em_noises(spec, normals: jax.Array, zeta_step, m: int):
    """Fine (and with Richardson coarse) substep noises [(zeta (m,), z (q,))] from (F, m + q) normals:
    under quantile coupling the fine zetas are the Brownian bridge pinned to the step's coupled
    zeta (`sme.sde.bridge`); the coarse grid gets pairwise sums / sqrt 2 (`sme.sde.coarsen`)."""
    zeta, z = normals[:, :m], normals[:, m:]
    if zeta_step is not None:
        fine = normals.shape[0]
        zeta = zeta_step[None] / jnp.sqrt(jnp.asarray(fine, zeta.dtype)) + zeta - jnp.mean(zeta, axis=0, keepdims=True)
    fine = [(zeta[j], z[j]) for j in range(normals.shape[0])]
    if not spec.richardson:
        return fine, None
    root2 = jnp.sqrt(jnp.asarray(2.0, normals.dtype))
    coarse = [((fine[2 * j][0] + fine[2 * j + 1][0]) / root2, (fine[2 * j][1] + fine[2 * j + 1][1]) / root2)
              for j in range(len(fine) // 2)]
    return fine, coarse


def batched_step(spec, net: Net, paths: dict, noise: StepNoise, lr) -> dict:
    """Discrete step N -> N + 1 of every path (names of `sme.lockstep.path_names`) of a chunk of
    replicas (leading axis): `replica_step` vmapped."""
    return jax.vmap(lambda p, nz: replica_step(spec, net, p, nz, lr))(paths, noise)


def replica_step(spec, net: Net, paths: dict, noise: StepNoise | None, lr) -> dict:
    """Discrete step N -> N + 1 of the paths in ``paths`` (any subset) of one replica, pure in its
    noise (None when ``paths`` holds ODE paths only: they use none)."""
    from sme.lockstep import ODE_DRIFTS, SHARED_TAG, TAGS  # noqa: PLC0415 (lockstep imports this module)

    new, grids = {}, {}
    if noise is None:
        zeros = jnp.zeros((spec.fine_substeps, 0), net.x.dtype)
        noise = StepNoise(None, {t: zeros for t in (*TAGS.values(), SHARED_TAG)}, None)
    if "discrete" in paths:
        eta = _masks(noise.u, net.keep_prob)
        grad = jax.grad(lambda p: dropout_risk(net, p, eta))(paths["discrete"])
        new["discrete"] = _axpy(-lr, grad, paths["discrete"])
    zeta_step = coupled_normals(noise.u) if spec.coupling == "quantile" and noise.u is not None else None
    m = 0 if noise.u is None else noise.u.shape[0]
    for v in spec.em_variants:
        if v not in paths:
            continue
        tag = TAGS[v] if spec.coupling == "none" else SHARED_TAG
        if tag not in grids:
            grids[tag] = em_noises(spec, noise.normals[tag], zeta_step, m)
        fine, coarse = grids[tag]
        kind, with_diffusion = ODE_DRIFTS.get(v, v), v not in ODE_DRIFTS
        for name, noises, h in ((v, fine, lr / spec.fine_substeps), (v + "/coarse", coarse, lr / spec.substeps)):
            if noises is None:
                continue
            p = paths[name]
            for zeta, z in noises:
                p = _add(p, increment(net, kind, p, zeta, z, h=h, lr=lr, diffusion=with_diffusion))
            new[name] = p
    if "svag" in paths:
        c_plus, c_minus = svag_coefficients(spec.svag_substeps)
        p = paths["svag"]
        for j in range(spec.svag_substeps):
            e1, e2 = _masks(noise.svag_u[j, 0], net.keep_prob), _masks(noise.svag_u[j, 1], net.keep_prob)
            g = jax.grad(lambda q: c_plus * dropout_risk(net, q, e1) + c_minus * dropout_risk(net, q, e2))(p)
            p = _axpy(-lr / spec.svag_substeps, g, p)
        new["svag"] = p
    return new


# --- Random numbers: one draw per block of BLOCK replicas -----------------------------------------


def _block_key(seed: int, stream: int, step, block, purpose: int):
    key = jax.random.fold_in(rng.step_key(seed, stream, step), BATCHED_TAG)
    return jax.random.fold_in(jax.random.fold_in(key, block), purpose)


def _draw(sampler, seed, stream, step, first_block, num_blocks: int, purpose: int, shape, dtype):
    """(num_blocks * BLOCK, *shape): block b's (*shape, BLOCK) draw from its own key, column j for
    replica b BLOCK + j."""
    blocks = first_block + jnp.arange(num_blocks)
    keys = jax.vmap(lambda b: _block_key(seed, stream, step, b, purpose))(blocks)
    draws = jax.vmap(lambda k: sampler(k, (*shape, BLOCK), dtype))(keys)  # (k, *shape, B)
    return jnp.moveaxis(draws, -1, 1).reshape(num_blocks * BLOCK, *shape)


def step_noise(spec, m: int, step, first_block, num_blocks: int, dtype) -> StepNoise:
    """The StepNoise of blocks [first_block, first_block + num_blocks) at discrete step N."""
    from sme.lockstep import SHARED_TAG, TAGS  # noqa: PLC0415

    seed, q = spec.seed, m * (m - 1) // 2
    u = _draw(jax.random.uniform, seed, rng.DROPOUT, step, first_block, num_blocks, DISCRETE, (m,), dtype)
    tags = sorted({TAGS[v] if spec.coupling == "none" else SHARED_TAG for v in spec.em_variants})
    normals = {t: _draw(jax.random.normal, seed, rng.SDE, step, first_block, num_blocks, EM_SHARED + t,
                        (spec.fine_substeps, m + q), dtype) for t in tags}
    svag_u = None
    if "svag" in spec.variants:
        svag_u = _draw(jax.random.uniform, seed, rng.SDE, step, first_block, num_blocks, EM_SHARED + TAGS["svag"],
                       (spec.svag_substeps, 2, m), dtype)
    return StepNoise(u, normals, svag_u)


# --- advance -----------------------------------------------------------------------------------


def chunking(num_replicas: int, chunk_size: int) -> tuple[int, int]:
    """(chunk C, number of chunks): C = chunk_size, or R rounded up to BLOCK when R is smaller."""
    chunk = min(chunk_size, -(-num_replicas // BLOCK) * BLOCK)
    return chunk, -(-num_replicas // chunk)


def _advance_odes(spec, net: Net, odes: dict, num_steps, lr) -> dict:
    """The ODE controls use no noise (closed-form drift), so replicas that start at one point (as
    `sme.lockstep.init_lockstep` puts them) stay there: one replica is integrated and broadcast.
    Replicas that differ are integrated each (`lax.cond`)."""
    run = lambda paths: jax.lax.fori_loop(0, num_steps, lambda i, p: jax.vmap(
        lambda q: replica_step(spec, net, q, None, lr))(p), paths)
    leaves = jax.tree_util.tree_leaves(odes)
    same = jnp.all(jnp.stack([jnp.all(a == a[:1]) for a in leaves]))
    one = lambda paths: jax.tree_util.tree_map(
        lambda a, b: jnp.broadcast_to(a, b.shape), run(jax.tree_util.tree_map(lambda a: a[:1], paths)), paths)
    return jax.lax.cond(same, one, run, odes)


def make_advance(spec):
    """``advance(state, num_steps, lr, problem) -> state`` like `sme.lockstep.make_advance`: chunks of
    replicas one after the other (`lax.map`), each all ``num_steps`` steps in a `fori_loop`."""
    from sme.lockstep import ODE_DRIFTS, Lockstep  # noqa: PLC0415

    def advance(state, num_steps, lr, problem: Problem):
        check_batched(spec, problem)
        net = Net.of(problem)
        leaves = jax.tree_util.tree_leaves(state.paths)
        num_replicas, dtype = leaves[0].shape[0], leaves[0].dtype
        chunk, num_chunks = chunking(num_replicas, spec.chunk_size)
        padded = chunk * num_chunks
        m = problem.model.sites[-1].size

        def split(a):  # (R, ...) -> (chunks, C, ...), padded with copies of the last replica
            a = jnp.concatenate([a, jnp.broadcast_to(a[-1:], (padded - num_replicas, *a.shape[1:]))])
            return a.reshape(num_chunks, chunk, *a.shape[1:])

        def join(a):
            return a.reshape(padded, *a.shape[2:])[:num_replicas]

        def run_chunk(args):
            paths, index = args
            first = index * (chunk // BLOCK)

            def body(i, p):
                noise = step_noise(spec, m, state.step + i, first, chunk // BLOCK, dtype)
                return batched_step(spec, net, p, noise, lr)

            return jax.lax.fori_loop(0, num_steps, body, paths)

        odes = {k: v for k, v in state.paths.items() if k.split("/")[0] in ODE_DRIFTS}
        noisy = {k: v for k, v in state.paths.items() if k not in odes}
        chunks = jax.tree_util.tree_map(split, noisy)
        done = jax.tree_util.tree_map(join, jax.lax.map(run_chunk, (chunks, jnp.arange(num_chunks))))
        if odes:
            done.update(_advance_odes(spec, net, odes, num_steps, lr))
        return Lockstep(state.step + num_steps, done)

    return advance
