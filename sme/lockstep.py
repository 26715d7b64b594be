"""Discrete dropout GD and its SDE approximations, run side by side over R replicas.

Processes (all start from the same theta_0; replica r of every process is one sample path):

* ``discrete``: full-batch dropout GD theta_{N+1} = theta_N - eps grad R^drop_S(theta_N; eta_N) with the
  training loop's masks: `sme.train.step.step_masks` of replica r's DROPOUT stream key at step N;
* ``order1``, ``order2``, ``r2``: Euler-Maruyama of the SME (`sme.sde`), l substeps of h = eps/l per
  discrete step, so SDE time t = N eps is in lockstep with step N. With ``richardson`` each runs on two
  nested grids, h = eps/(2l) (path ``v``) and eps/l (path ``v/coarse``, fed the pairwise sums of the
  fine Brownian increments), and 2 g(fine) - g(coarse) removes the O(h) weak error of Euler-Maruyama
  (Talay & Tubaro 1990), leaving O(h^2);
* ``ode1``, ``ode2``: the no-diffusion controls, the same Euler-Maruyama grids with the order-1 or
  order-2 drift and Sigma = 0 (`sme.sde.make_ode`): what the SME's noise adds is the gap between
  ``orderk`` and ``odek``;
* ``svag``: dropout-SVAG(l_svag), itself a discrete process with mean grad L_S and covariance l Sigma.

Common random numbers (``coupling``):

* ``none``: every process has its own noise (SDE tag = variant id);
* ``variants``: the SDE variants share every Brownian increment (and masks of the ``masks``
  diffusion), so differences BETWEEN SDE variants are estimated with little noise. This couples
  nothing between the discrete process and the SDEs;
* ``quantile``: as ``variants``, and the SDE's unit noise zeta over discrete step N is tied to the
  discrete mask: zeta_j = Phi^{-1}(1 - U_j) where eta_j = 1[U_j < p]/p (`sme.diffusion.coupled_normals`),
  spread over the substeps by a Brownian bridge (`sme.sde.bridge`). Both laws are unchanged; the
  linear part of the SDE noise, B zeta (the regression of g_eta on the unit noise), is then
  correlated with the discrete noise (per unit ~0.6-0.8). The residual noise (mask interactions)
  and SVAG stay independent. Needs the ``exact`` or ``closed_form`` diffusion.

Keys: `make_advance` computes the replicas' stream keys (`LockstepKeys`: DROPOUT and SDE, `sme.rng`)
from ``spec.seed`` once per call, outside its loop, and passes them to the replica step as values;
the step folds in the step number (and the substep and noise tag) only.

`replica_step` is the one-replica step, vmapped once over the replica axis in `make_advance`
(``layout='replica'``, the default). ``layout='batched'`` runs the same processes for the E1 class
of problems with one random draw per block of replicas and fixed-size chunks
(`sme.lockstep_batched`): the same law, other random numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sme import lockstep_batched, losses, rng, sde
from sme.lockstep_state import ODE_DRIFTS, SHARED_TAG, TAGS, Lockstep  # noqa: F401  (re-exported)
from sme.diffusion import MAX_ENUMERATED_UNITS, Problem, check_diffusion, coupled_normals, num_units
from sme.models import batch_apply
from sme.train.step import step_masks

# The no-diffusion controls: the ODE with the order-1 or order-2 drift (Sigma = 0).
EM_VARIANTS = (*sde.DRIFTS, *ODE_DRIFTS)  # order1, order2, r2, ode1, ode2
VARIANTS = (*EM_VARIANTS, "svag")
COUPLINGS = ("none", "variants", "quantile")
LAYOUTS = ("replica", "batched")
# Noise tags of the SDE stream: never renumber (they are part of the reproducibility contract).


@dataclasses.dataclass(frozen=True)
class LockstepSpec:
    """Static description of the processes (hashable: a jit static argument)."""

    variants: tuple[str, ...] = ("order1",)
    diffusion: str = "exact"
    estimator: str = "closed_form"
    num_masks: int = 16
    substeps: int = 1
    richardson: bool = False
    svag_substeps: int = 4
    coupling: str = "variants"
    trace: str = "sample"
    seed: int = 0
    layout: str = "replica"
    chunk_size: int = 4096

    def __repr__(self) -> str:
        """The dataclass repr; ``layout`` and ``chunk_size`` only when not at their defaults, so the
        cell configs (`sme.sweep.cell_config`) of runs made before they existed are unchanged."""
        fields = [f for f in dataclasses.fields(self)
                  if f.name not in ("layout", "chunk_size") or getattr(self, f.name) != f.default]
        return f"LockstepSpec({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in fields)})"

    @property
    def em_variants(self) -> tuple[str, ...]:
        return tuple(v for v in self.variants if v in EM_VARIANTS)

    @property
    def fine_substeps(self) -> int:
        return self.substeps * (2 if self.richardson else 1)


def check_spec(spec: LockstepSpec, problem: Problem, *, max_units: int = MAX_ENUMERATED_UNITS) -> None:
    """Raise ValueError naming the problem unless `spec` can run on `problem`."""
    bad = [v for v in spec.variants if v not in VARIANTS]
    if bad or not spec.variants:
        raise ValueError(f"variants {spec.variants}: each must be one of {VARIANTS}")
    if spec.coupling not in COUPLINGS:
        raise ValueError(f"unknown coupling {spec.coupling!r}; expected one of {COUPLINGS}")
    if spec.em_variants:
        check_diffusion(problem, problem.loss, spec.diffusion, max_units=max_units)
        sde.check_estimator(problem, spec.estimator, max_units=max_units)
    if spec.coupling == "quantile" and spec.diffusion == "masks":
        raise ValueError("quantile coupling needs the exact or closed_form diffusion (the masks diffusion has no unit noise)")
    if num_units(problem.model.sites) == 0:
        raise ValueError("the model has no droppable unit (keep_prob = 1): there is no noise to model")
    if spec.layout not in LAYOUTS:
        raise ValueError(f"unknown layout {spec.layout!r}; expected one of {LAYOUTS}")
    if spec.layout == "batched":
        lockstep_batched.check_batched(spec, problem)


class LockstepKeys(NamedTuple):
    """The stream keys of the processes of R replicas ((R,) key arrays; one key each inside `replica_step`).

    Attributes:
      dropout: K(seed, DROPOUT, r): the discrete process's masks, the training loop's (`step_masks`).
      sde: K(seed, SDE, r): Brownian increments, diffusion masks and SVAG masks (`sme.sde.substep_key`).
    """

    dropout: jax.Array
    sde: jax.Array


def lockstep_keys(seed: int, num_replicas: int) -> LockstepKeys:
    """The stream keys of replicas 0..R-1 (recomputed from the seed; nothing is saved)."""
    return LockstepKeys(rng.replica_keys(seed, rng.DROPOUT, num_replicas), rng.replica_keys(seed, rng.SDE, num_replicas))


def path_names(spec: LockstepSpec) -> tuple[str, ...]:
    names = ["discrete"]
    for v in spec.variants:
        names.append(v)
        if spec.richardson and v in EM_VARIANTS:
            names.append(v + "/coarse")
    return tuple(names)


def init_lockstep(params0, spec: LockstepSpec, num_replicas: int) -> Lockstep:
    """Every path of every replica starts at params0 (the same theta_0 for both processes)."""
    tile = lambda leaf: jnp.broadcast_to(leaf, (num_replicas, *leaf.shape))
    paths = {name: jax.tree_util.tree_map(tile, params0) for name in path_names(spec)}
    return Lockstep(jnp.asarray(0, jnp.int32), paths)


def _discrete_masks(spec: LockstepSpec, problem: Problem, step, key):
    """The discrete step's masks (``key``: the replica's DROPOUT stream key) and, under quantile coupling,
    the unit normals zeta (G, m) tied to them."""
    sites, dtype = problem.model.sites, problem.x.dtype
    shape = () if problem.mode == "shared" else (problem.num_examples,)
    if spec.coupling != "quantile":
        return step_masks(sites, key, step, batch_shape=shape, dtype=dtype), None
    masks, u = step_masks(sites, key, step, batch_shape=shape, dtype=dtype, uniforms=True)
    zeta = coupled_normals(u).reshape(problem.num_groups, -1).astype(dtype)
    return masks, zeta


def _em_noises(spec: LockstepSpec, sme_v: sde.SDE, step, key, tag, zeta):
    """Noises of the fine grid (leading axis 2l or l) and, with Richardson, of the coarse grid
    (``key``: the replica's SDE stream key)."""
    fine = spec.fine_substeps
    draw = lambda j: sme_v.sample_noise(sde.substep_key(key, step, j, tag=tag))
    noises = jax.vmap(draw)(jnp.arange(fine))
    if zeta is not None:
        noises = {**noises, "zeta": sde.bridge(zeta, noises["zeta"])}
    if not spec.richardson:
        return noises, None
    if sde.gaussian_only(spec.diffusion, spec.estimator):
        return noises, sde.coarsen(noises, 2)
    coarse = jax.vmap(draw)(jnp.arange(fine, fine + spec.substeps))  # masks cannot be nested
    if zeta is not None:
        coarse = {**coarse, "zeta": sde.bridge(zeta, coarse["zeta"])}
    return noises, coarse


def make_process(spec: LockstepSpec, problem: Problem, variant: str, lr) -> sde.SDE:
    """The `sde.SDE` of an Euler-Maruyama variant: an SME (order1 | order2 | r2) or an ODE control."""
    if variant in ODE_DRIFTS:
        return sde.make_ode(problem, drift=ODE_DRIFTS[variant], diffusion=spec.diffusion, estimator=spec.estimator,
                            lr=lr, num_masks=spec.num_masks)
    return sde.make_sme(problem, drift=variant, diffusion=spec.diffusion, estimator=spec.estimator, lr=lr,
                        num_masks=spec.num_masks, trace=spec.trace)


def replica_step(spec: LockstepSpec, paths: dict, step, keys: LockstepKeys, lr, problem: Problem) -> dict:
    """One discrete step N -> N + 1 of every process of one replica, whose stream keys are ``keys``.
    Cost: one gradient (discrete), l (or 3l with Richardson) SME substeps per EM variant, 2 l_svag
    gradients for SVAG."""
    masks, zeta = _discrete_masks(spec, problem, step, keys.dropout)
    new = {"discrete": sde.dropout_gd_step(problem, paths["discrete"], masks, lr=lr)}
    cache = {}
    for v in spec.em_variants:
        sme_v = make_process(spec, problem, v, lr)
        tag = TAGS[v] if spec.coupling == "none" else SHARED_TAG
        if tag not in cache:
            cache[tag] = _em_noises(spec, sme_v, step, keys.sde, tag, zeta)
        fine, coarse = cache[tag]
        new[v] = sde.em_scan(sme_v, paths[v], fine, h=lr / spec.fine_substeps)
        if spec.richardson:
            new[v + "/coarse"] = sde.em_scan(sme_v, paths[v + "/coarse"], coarse, h=lr / spec.substeps)
    if "svag" in spec.variants:
        key = sde.substep_key(keys.sde, step, 0, tag=TAGS["svag"])
        new["svag"] = sde.svag_step(problem, paths["svag"], key=key, lr=lr, substeps=spec.svag_substeps)
    return new


def make_advance(spec: LockstepSpec):
    """``advance(state, num_steps, lr, problem) -> state``: a `fori_loop` (traced trip count) of
    replica steps vmapped over the replica axis. Jit it once; lr and the data are traced.
    ``layout='batched'``: `sme.lockstep_batched.make_advance` (replica vectors, block draws, chunks)."""
    if spec.layout == "batched":
        return lockstep_batched.make_advance(spec)
    batched = jax.vmap(lambda paths, step, keys, lr, prob: replica_step(spec, paths, step, keys, lr, prob),
                       in_axes=(0, None, 0, None, None))

    def advance(state: Lockstep, num_steps, lr, problem: Problem) -> Lockstep:
        num_replicas = jax.tree_util.tree_leaves(state.paths)[0].shape[0]
        keys = lockstep_keys(spec.seed, num_replicas)  # once per call, outside the loop

        def body(_, s):
            return Lockstep(s.step + 1, batched(s.paths, s.step, keys, lr, problem))

        return jax.lax.fori_loop(0, num_steps, body, state)

    return advance


# --- Test functions and their replica statistics -------------------------------------------------


class TestData(NamedTuple):
    """Arrays the test functions need: probe inputs (q, d), test set, fixed L_S masks (or None)."""

    probes: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    loss_masks: Any


def test_function_names(num_probes: int, classification: bool) -> tuple[str, ...]:
    names = ["R_S", "L_S", "sq_norm"] + [f"f_probe{j}" for j in range(num_probes)]
    return tuple(names + (["test_acc"] if classification else []))


def make_test_functions(problem_like: Problem, estimator: str, *, classification: bool):
    """``g(params, problem, data) -> (G,)``: R_S, L_S (by `estimator`; ``masks`` uses the fixed
    ``data.loss_masks``), ||theta||^2, the deterministic net's first output at each probe, and test
    accuracy (classification). Cost: a few forward passes (E for exact L_S)."""
    model, loss = problem_like.model, problem_like.loss

    def g(params, problem: Problem, data: TestData):
        ones = tuple(jnp.ones(s.shape, problem.x.dtype) for s in model.sites)
        parts = [losses.risk(model, loss, params, problem.x, problem.y),
                 sde.modified_loss(problem, estimator, params, {"masks": data.loss_masks}),
                 sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(params))]
        probe_out = batch_apply(model, params, data.probes, ones, mode="shared")[:, 0]
        vec = jnp.concatenate([jnp.stack(parts), probe_out])
        if classification:
            out = batch_apply(model, params, data.x_test, ones, mode="shared")
            vec = jnp.concatenate([vec, losses.accuracy(out, data.y_test)[None]])
        return vec

    return g


def batch_means(values: jax.Array, num_batches: int) -> jax.Array:
    """Means over consecutive groups of R / B replicas: (R, ...) -> (B, ...)."""
    r = values.shape[0]
    return jnp.mean(values.reshape(num_batches, r // num_batches, *values.shape[1:]), axis=1)


def make_evaluate(spec: LockstepSpec, g_fn, *, num_batches: int):
    """``evaluate(state, problem, data) -> dict`` of batch means over replica groups:

    ``mean/<series>``, ``sq/<series>`` (B, G): g and g^2; ``dist/<path>`` (B,): ||theta_N - Theta||
    between each path and the discrete path of the same replica (with Richardson, path v is the fine grid). Series: discrete, each variant (with Richardson the
    extrapolation 2 g(fine) - g(coarse)), and with Richardson ``<v>/fine``, ``<v>/coarse``.
    """

    def evaluate(state: Lockstep, problem: Problem, data: TestData) -> dict:
        values = {name: jax.vmap(lambda p: g_fn(p, problem, data))(params) for name, params in state.paths.items()}
        flat = {name: jax.vmap(lambda p: jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(p)]))(params)
                for name, params in state.paths.items()}
        series = {"discrete": values["discrete"]}
        for v in spec.variants:
            if spec.richardson and v in EM_VARIANTS:
                series[v] = 2.0 * values[v] - values[v + "/coarse"]
                series[v + "/fine"], series[v + "/coarse"] = values[v], values[v + "/coarse"]
            else:
                series[v] = values[v]
        out = {}
        for name, vals in series.items():
            out[f"mean/{name}"] = batch_means(vals, num_batches)
            out[f"sq/{name}"] = batch_means(vals**2, num_batches)
        for name in flat:
            if name != "discrete":  # with Richardson, path v is the fine grid
                dist = jnp.sqrt(jnp.sum((flat[name] - flat["discrete"]) ** 2, axis=1))
                out[f"dist/{name}"] = batch_means(dist, num_batches)
        return out

    return evaluate
