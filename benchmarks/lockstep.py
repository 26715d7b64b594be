"""Benchmark of the E1 lockstep at large R: replica-steps/s of both layouts, FLOPs, GEMM context.

    python benchmarks/lockstep.py            # batched at R = 1,024, 16,384, 65,536; replica at 1,024
    python benchmarks/lockstep.py --quick    # batched at R = 1,024 and 16,384, one repeat
    python benchmarks/lockstep.py --sets full --chunk 256   # the full E1 set only; replicas per chunk

Each R compiles anew (the full E1 step for minutes on a loaded 2-core machine).

Prints (compile time excluded; each timed call runs its steps in one jitted program), after the
machine's GEMM peak and load average:

* for dropout GD + the order-1 SME (l = 1, quantile coupling) and for the full E1 set (discrete, order
  1/2/r2 and the ODE controls ode1/ode2 with Richardson on l = 2, SVAG(4)), and for each layout of
  `sme.lockstep` (``replica``: vmapped per-replica keys; ``batched``: `sme.lockstep_batched`,
  counter-based draws, chunks of ``--chunk`` replicas): replica-steps/s at each R, with the achieved
  FLOP rate (XLA's count of one replica-step of the batched step, the same arithmetic for both
  layouts) and its fraction of the GEMM peak, and the CPU time per replica-step (all threads; on
  a loaded machine the wall time also holds the time other jobs took the cores);
* R = 1,024 ÷ sequential runs (the replica layout at R = 1, one replica per call) for both layouts,
  against the target >= 30x; and the full set's rate at R >= 10^4 against the target 2e5.

The per-replica layout is measured at R = 1,024 only (its vmapped program holds every intermediate
of all replicas at once). Run it under ``nice -n 10`` beside other work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sme import data, diffusion, lockstep, lockstep_batched, models, rng  # noqa: E402

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # _roofline (after the root)
from _roofline import flop_count, gemm_peak, load_average, peak_line  # noqa: E402

FULL = ("order1", "order2", "r2", "ode1", "ode2", "svag")


def e1_problem():
    ds = data.load_dataset(data.DataSpec(name="teacher", num_points=8, input_dim=2, teacher_width=3, noise_std=0.1))
    model = models.make_model("two_layer", in_dim=2, hidden=(5,), out_dim=1, keep_prob=0.8, activation="tanh")
    problem = diffusion.Problem(model, "mse", "shared", jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
    return problem, model.init(rng.stream_key(0, rng.INIT))


def specs(layout: str, chunk: int = 256) -> dict:
    common = dict(diffusion="closed_form", estimator="closed_form", coupling="quantile", layout=layout, chunk_size=chunk)
    return {"GD + order 1 (l=1)": lockstep.LockstepSpec(variants=("order1",), **common),
            "full E1 (Richardson, l=2)": lockstep.LockstepSpec(variants=FULL, substeps=2, richardson=True, **common)}


def step_flops(spec, problem, params) -> float:
    """XLA's FLOP count of one replica-step (the batched step over 64 replicas, / 64; the ODE
    controls counted for every replica, as the per-replica layout computes them)."""
    net = lockstep_batched.Net.of(problem)
    block = 64
    paths = lockstep.init_lockstep(params, spec, block).paths
    noise = lockstep_batched.step_noise(spec, problem.model.sites[-1].size, 0, 0, block, problem.x.dtype)
    return flop_count(lambda p, nz: lockstep_batched.batched_step(spec, net, p, nz, 0.1), paths, noise) / block


def rate(spec, problem, params, replicas: int, steps: int, repeats: int) -> tuple[float, float]:
    """(replica-steps per wall second, CPU seconds per replica-step): medians of ``repeats`` timed
    calls after one warm-up (compile) call."""
    advance = jax.jit(lockstep.make_advance(spec))
    state = lockstep.init_lockstep(params, spec, replicas)
    jax.block_until_ready(advance(state, steps, 0.1, problem))
    wall, cpu = [], []
    for _ in range(repeats):
        tic, cpu_tic = time.perf_counter(), time.process_time()
        jax.block_until_ready(advance(state, steps, 0.1, problem))
        wall.append(time.perf_counter() - tic)
        cpu.append(time.process_time() - cpu_tic)
    work = replicas * steps
    return work / statistics.median(wall), statistics.median(cpu) / work


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batched at R = 1,024 and 16,384 only, one repeat")
    parser.add_argument("--sets", default="gd,full", help="process sets: gd (GD + order 1), full (the E1 set)")
    parser.add_argument("--chunk", type=int, default=256, help="replicas per chunk of the batched layout")
    args = parser.parse_args()
    sizes = (1024, 16_384) if args.quick else (1024, 16_384, 65_536)
    repeats = 1 if args.quick else 3
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s), "
          f"{os.cpu_count()} CPU(s){' [--quick]' if args.quick else ''}; {load_average()}")
    peak = gemm_peak()
    print(peak_line(peak) + "\n")
    problem, params = e1_problem()
    print(f"Replica-steps/s of the E1 lockstep (GFLOP/s achieved, fraction of the GEMM peak; CPU us per "
          f"replica-step); batched chunks of {args.chunk}")
    labels = {"gd": "GD + order 1 (l=1)", "full": "full E1 (Richardson, l=2)"}
    for label in [labels[k] for k in args.sets.split(",")]:
        spec = specs("batched", args.chunk)[label]
        gd = spec.variants == ("order1",)
        flops = step_flops(spec, problem, params)
        print(f"  {label}: {flops / 1e3:.1f} kFLOP per replica-step (XLA count)", flush=True)
        sequential, seq_cpu = rate(specs("replica")[label], problem, params, 1, 20 if gd else 5, repeats)
        print(f"    sequential (replica layout, R=1): {sequential:10.3g} replica-steps/s  CPU {seq_cpu * 1e6:8.2f} us; "
              f"{load_average()}", flush=True)
        at_1024 = {}
        runs = [("replica", 1024)] + [("batched", r) for r in sizes]
        for layout, r in runs:
            steps = max(2, min(20, int(4e5 // r))) if gd else max(1, min(10, int(4e4 // r)))
            value, cpu = rate(specs(layout, args.chunk)[label], problem, params, r, steps, repeats)
            if r == 1024:
                at_1024[layout] = value
            mark = ""
            if not gd and r >= 10_000:
                mark = f"  (target >= 2e5: {'met' if value >= 2e5 else 'MISSED'})"
            print(f"    {layout:8s} R={r:>7,d}: {value:10.3g} replica-steps/s  {value * flops / 1e9:6.2f} GFLOP/s "
                  f"= {value * flops / peak:6.2%} of peak  CPU {cpu * 1e6:8.2f} us{mark}; {load_average()}", flush=True)
        for layout, value in at_1024.items():
            print(f"    R=1024 ÷ sequential, {layout}: x{value / sequential:.1f} "
                  f"(target >= 30x: {'met' if value >= 30 * sequential else 'MISSED'})")


if __name__ == "__main__":
    main()
