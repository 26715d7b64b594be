"""Benchmark of the SME integrator: step cost against dropout GD, FLOP-count limits, replica throughput, diffrax.

    python benchmarks/sme.py            # about 4 minutes on 2 CPU cores
    python benchmarks/sme.py --quick    # about 1.5 minutes

Prints (compile time excluded; median of repeats; each timed call runs many steps in one jitted
`lax.fori_loop`/`scan`, so Python dispatch is not measured), after the machine's GEMM peak:

1. Cost of one SME step / one discrete dropout GD step in the same run, on the digits MLP (64-256-10,
   n = 512, MSE, dropout on the readout input, R = 1): order 1 with the K = 16 masks diffusion (drift
   closed form, or from the same 16 masks), order 2 (K = 16), the closed-form diffusion, and
   per_sample masks with K = 2 mask sets (the fewest a covariance estimate takes; each example gets
   its own mask in each set) against a per_sample dropout GD step. Every row also gives its FLOPs
   (XLA's count of one step), achieved rate and fraction of the GEMM peak.
2. The K = 16 masks step (drift and diffusion from the masks) on 64-256-256-10 with dropout after
   both hidden layers: measured time beside the FLOP-count limit FLOPs / GEMM peak.
3. The E1 net (two-layer tanh, 5 units, 8 points; P = 10): step ratios at R = 1 and R = 1,024.
4. Replica throughput (replica-steps/s) of the E1 lockstep simulation at R = 1, 64, 1,024: dropout GD
   + the order-1 SME, and the full E1 set (order 1, order 2, r2 with Richardson, SVAG(4)); and the
   ratio R = 1,024 vmapped ÷ R = 1 (the throughput of sequential runs).
5. The same Euler-Maruyama on the same drift and diffusion (order-1 SME of the E1 net, closed-form
   Sigma^{1/2} as a matrix-free `lineax.FunctionLinearOperator`) through `diffrax.diffeqsolve`
   (Euler; UnsafeBrownianPath or VirtualBrownianTree) against `sme.sde.em_integrate` (lax.scan).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from sme import data, diffusion, lockstep, models, rng, sde  # noqa: E402

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # _roofline (after the root: benchmarks/sme.py is not sme)
from _roofline import flop_count, gemm_peak, median_seconds, peak_line, roofline_line  # noqa: E402


def e1_problem():
    ds = data.load_dataset(data.DataSpec(name="teacher", num_points=8, input_dim=2, teacher_width=3, noise_std=0.1))
    model = models.make_model("two_layer", in_dim=2, hidden=(5,), out_dim=1, keep_prob=0.8, activation="tanh")
    return diffusion.Problem(model, "mse", "shared", jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)), model


def digits_problem(hidden=(256,), mode="shared"):
    ds = data.load_dataset(data.DataSpec(name="digits", num_train=512))
    model = models.make_model("mlp", in_dim=64, hidden=hidden, out_dim=10, keep_prob=0.8, activation="tanh",
                              dropout_layers=tuple(range(len(hidden))) if len(hidden) > 1 else (0,))
    return diffusion.Problem(model, "mse", mode, jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)), model


def step_costs(problem, model, *, steps: int, repeats: int, variants, replicas: int = 1, num_masks: int = 16):
    """(label, seconds per step per replica, ratio to dropout GD, FLOPs of one step per replica)."""
    params = model.init(rng.stream_key(0, rng.INIT))
    lr = 0.05
    gd_one = lambda q, k: sde.dropout_gd_step(
        problem, q, lockstep._discrete_masks(lockstep.LockstepSpec(), problem, k, rng.stream_key(0, rng.DROPOUT))[0],
        lr=lr)

    def discrete(p, key):
        def body(k, q):
            masks = lockstep._discrete_masks(lockstep.LockstepSpec(), problem, k, key)[0]
            return sde.dropout_gd_step(problem, q, masks, lr=lr)
        return jax.lax.fori_loop(0, steps, body, p)

    rs = jnp.arange(replicas)
    dropout_keys = rng.replica_keys(0, rng.DROPOUT, replicas)  # the replicas' DROPOUT stream keys
    batched = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (replicas, *a.shape)), params)
    base = median_seconds(jax.jit(jax.vmap(discrete)), batched, dropout_keys, repeats=repeats) / steps / replicas
    rows = [("dropout GD step", base, flop_count(gd_one, params, 0))]
    for label, drift, diff, est in variants:
        sme_v = sde.make_sme(problem, drift=drift, diffusion=diff, estimator=est, lr=lr, num_masks=num_masks)
        run = jax.vmap(lambda p, r, s=sme_v: sde.em_integrate(s, p, key=jax.random.key(r), num_steps=steps, h=lr))
        one = lambda p, k, s=sme_v: sde.em_step(s, p, s.sample_noise(k), h=lr)
        rows.append((label, median_seconds(jax.jit(run), batched, rs, repeats=repeats) / steps / replicas,
                     flop_count(one, params, jax.random.key(0))))
    return [(label, t, t / base, flops) for label, t, flops in rows]


def throughput(problem, model, *, spec, replicas, steps: int, repeats: int) -> float:
    params = model.init(rng.stream_key(0, rng.INIT))
    advance = jax.jit(lockstep.make_advance(spec))
    state = lockstep.init_lockstep(params, spec, replicas)
    seconds = median_seconds(lambda s: advance(s, steps, 0.1, problem), state, repeats=repeats)
    return replicas * steps / seconds


def diffrax_comparison(problem, model, *, steps: int, replicas: int, repeats: int):
    import diffrax
    import lineax

    params = model.init(rng.stream_key(0, rng.INIT))
    flat0, unravel = ravel_pytree(params)
    lr = 0.1
    h = lr
    sme_v = sde.make_sme(problem, drift="order1", diffusion="closed_form", estimator="closed_form", lr=lr)
    shapes = diffusion.noise_shapes(problem, "closed_form", num_masks=0)
    names = sorted(shapes)
    sizes = [int(np.prod(shapes[k])) for k in names]
    dim = sum(sizes)

    def split(xi):
        out, offset = {}, 0
        for k, size in zip(names, sizes):
            out[k] = xi[offset:offset + size].reshape(shapes[k])
            offset += size
        return out

    def ours(key):
        return ravel_pytree(sde.em_integrate(sme_v, params, key=key, num_steps=steps, h=h))[0]

    drift = diffrax.ODETerm(lambda t, y, args: ravel_pytree(sme_v.drift(unravel(y), None))[0])

    def diffusion_op(t, y, args):
        mv = lambda xi: jnp.sqrt(lr) * ravel_pytree(sme_v.diffusion(unravel(y), split(xi)))[0]
        return lineax.FunctionLinearOperator(mv, jax.ShapeDtypeStruct((dim,), flat0.dtype))

    def theirs(key, path: str):
        t1 = steps * h
        if path == "unsafe":
            brownian = diffrax.UnsafeBrownianPath(shape=(dim,), key=key)
        else:
            brownian = diffrax.VirtualBrownianTree(0.0, t1, tol=h / 2, shape=(dim,), key=key)
        terms = diffrax.MultiTerm(drift, diffrax.ControlTerm(diffusion_op, brownian))
        sol = diffrax.diffeqsolve(terms, diffrax.Euler(), 0.0, t1, dt0=h, y0=flat0, saveat=diffrax.SaveAt(t1=True),
                                  max_steps=steps + 1, adjoint=diffrax.DirectAdjoint())
        return sol.ys[-1]

    keys = jax.random.split(jax.random.key(0), replicas)
    rows = []
    t_ours = median_seconds(jax.jit(jax.vmap(ours)), keys, repeats=repeats)
    rows.append(("sme em_integrate (lax.scan)", t_ours, 1.0))
    for path in ("unsafe", "virtual"):
        run = jax.jit(jax.vmap(lambda k, p=path: theirs(k, p)))
        t = median_seconds(run, keys, repeats=repeats)
        rows.append((f"diffrax Euler + {'UnsafeBrownianPath' if path == 'unsafe' else 'VirtualBrownianTree'}",
                     t, t / t_ours))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--skip_diffrax", action="store_true", help="leave out table 5")
    args = parser.parse_args()
    steps, repeats = (50, 3) if args.quick else (200, 5)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s), "
          f"{os.cpu_count()} CPU(s){' [--quick]' if args.quick else ''}")
    peak = gemm_peak()
    print(peak_line(peak) + "\n")

    e1, e1_model = e1_problem()
    common = [("SME order 1, K=16 masks (drift closed form)", "order1", "masks", "closed_form"),
              ("SME order 1, K=16 masks (drift from the masks)", "order1", "masks", "masks"),
              ("SME order 2, K=16 masks", "order2", "masks", "closed_form"),
              ("SME order 1, closed-form diffusion", "order1", "closed_form", "closed_form")]
    targets = {common[0][0]: 4.0, common[1][0]: 6.0, common[3][0]: 3.0}

    def table(rows, *, with_target=True):
        for label, t, ratio, flops in rows:
            target = targets.get(label) if with_target else None
            mark = "" if target is None else f"  (target <= {target:g}x: {'met' if ratio <= target else 'MISSED'})"
            print(f"     {label:<48s} x{ratio:6.2f}{mark}")
            print(f"       {roofline_line('', t, flops, peak, width=0)}")

    print("1. One step ÷ one dropout GD step in this run (seconds per step; FLOPs of one step, XLA count)")
    digits, digits_model = digits_problem()
    print("   digits MLP 64-256-10 (P=19,210, n=512), shared masks, R=1")
    table(step_costs(digits, digits_model, steps=steps, repeats=repeats, variants=common))
    per_sample, ps_model = digits_problem(mode="per_sample")
    print("   the same, per_sample masks (each example its own mask): K=2 mask sets, drift from the masks")
    rows = step_costs(per_sample, ps_model, steps=steps, repeats=repeats, num_masks=2,
                      variants=[("SME order 1, per_sample, K=2 (drift from the masks)", "order1", "masks", "masks")])
    targets[rows[1][0]] = 2.0
    table(rows)

    print("\n2. K=16 masks step on 64-256-256-10, dropout after both hidden layers, n=512 "
          "(drift and diffusion from the masks): time ÷ FLOP-count limit (FLOPs / GEMM peak)")
    deep, deep_model = digits_problem(hidden=(256, 256))
    rows = step_costs(deep, deep_model, steps=max(steps // 4, 10), repeats=repeats,
                      variants=[("SME order 1, K=16 masks (drift from the masks)", "order1", "masks", "masks")])
    table(rows, with_target=False)
    label, t, _, flops = rows[1]
    print(f"     K-mask step: measured {t * 1e3:.2f} ms, FLOP-count limit {flops / peak * 1e3:.2f} ms "
          f"({flops / 1e9:.2f} GFLOP at {peak / 1e9:.1f} GFLOP/s): x{t / (flops / peak):.2f} "
          f"(target <= 1.5x: {'met' if t <= 1.5 * flops / peak else 'MISSED'})")

    print("\n3. E1 net (P=10, n=8): one step ÷ one dropout GD step")
    exact = [("SME order 1, exact diffusion (32 masks)", "order1", "exact", "closed_form")]
    for replicas in (1, 1024):
        print(f"   R={replicas}{' replicas vmapped' if replicas > 1 else ''}")
        table(step_costs(e1, e1_model, steps=steps if replicas == 1 else max(steps // 10, 5), repeats=repeats,
                         variants=common + exact, replicas=replicas), with_target=False)

    print("\n4. Replica throughput of the E1 lockstep simulation (replica-steps/s)")
    specs = {"dropout GD + order-1 SME (l=1, quantile)": lockstep.LockstepSpec(
                 variants=("order1",), diffusion="closed_form", estimator="closed_form", coupling="quantile"),
             "full E1: GD + order1/order2/r2 (Richardson) + SVAG(4)": lockstep.LockstepSpec(
                 variants=("order1", "order2", "r2", "svag"), diffusion="closed_form", estimator="closed_form",
                 coupling="quantile", richardson=True)}
    for label, spec in specs.items():
        rates = [throughput(e1, e1_model, spec=spec, replicas=r, steps=max(steps // 10, 5), repeats=repeats)
                 for r in (1, 64, 1024)]
        print(f"   {label:<56s} R=1: {rates[0]:9.3g}   R=64: {rates[1]:9.3g}   R=1024: {rates[2]:9.3g}   "
              f"R=1024 ÷ sequential (R=1): x{rates[2] / rates[0]:.1f} (target >= 30x: "
              f"{'met' if rates[2] >= 30 * rates[0] else 'MISSED'})")

    if args.skip_diffrax:
        return
    print("\n5. Euler-Maruyama of the order-1 SME (E1 net, closed-form diffusion), "
          f"{steps} steps: sme vs diffrax (seconds; ratio to sme)")
    for replicas in (1, 64):
        print(f"   R = {replicas}")
        for label, t, ratio in diffrax_comparison(e1, e1_model, steps=steps, replicas=replicas, repeats=repeats):
            print(f"     {label:<48s} {t * 1e3:9.2f} ms   x{ratio:6.1f}")


if __name__ == "__main__":
    main()
