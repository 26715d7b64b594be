"""Benchmark of the E1 lockstep at large R: replica-steps/s of both layouts, FLOPs, GEMM context.

    python benchmarks/lockstep.py            # R = 64, 1,024, 10,000, 160,000
    python benchmarks/lockstep.py --quick    # R = 1,024 and 16,384, one repeat (each R compiles anew)

Prints (compile time excluded; each timed call runs its steps in one jitted program), after the
machine's GEMM peak and load average:

* for dropout GD + the order-1 SME (l = 1, quantile coupling) and for the full E1 set (discrete, order
  1/2/r2 and the ODE controls ode1/ode2 with Richardson on l = 2, SVAG(4)), and for each layout of
  `sme.lockstep` (``replica``: vmapped per-replica keys; ``batched``: `sme.lockstep_batched`, block
  draws, chunks of 8,192): replica-steps/s at each R, with the achieved FLOP rate (XLA's count of
  one replica-step of the batched step, the same arithmetic for both layouts) and its fraction of
  the GEMM peak;
* R = 1,024 ÷ sequential runs (the replica layout at R = 1, one replica per call) for both layouts,
  against the target >= 30x; and the full set's rate at R >= 10^4 against the target 2e5.

The per-replica layout is measured up to R = 10,000 (its vmapped program at 160,000 holds every
intermediate of all replicas at once).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sme import data, diffusion, lockstep, lockstep_batched, models, rng  # noqa: E402

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # _roofline (after the root)
from _roofline import flop_count, gemm_peak, median_seconds, peak_line  # noqa: E402

FULL = ("order1", "order2", "r2", "ode1", "ode2", "svag")


def e1_problem():
    ds = data.load_dataset(data.DataSpec(name="teacher", num_points=8, input_dim=2, teacher_width=3, noise_std=0.1))
    model = models.make_model("two_layer", in_dim=2, hidden=(5,), out_dim=1, keep_prob=0.8, activation="tanh")
    problem = diffusion.Problem(model, "mse", "shared", jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
    return problem, model.init(rng.stream_key(0, rng.INIT))


def specs(layout: str) -> dict:
    common = dict(diffusion="closed_form", estimator="closed_form", coupling="quantile", layout=layout, chunk_size=8192)
    return {"GD + order 1 (l=1)": lockstep.LockstepSpec(variants=("order1",), **common),
            "full E1 (Richardson, l=2)": lockstep.LockstepSpec(variants=FULL, substeps=2, richardson=True, **common)}


def step_flops(spec, problem, params) -> float:
    """XLA's FLOP count of one replica-step (the batched step over one block, / BLOCK; the ODE
    controls counted for every replica, as the per-replica layout computes them)."""
    net = lockstep_batched.Net.of(problem)
    block = lockstep_batched.BLOCK
    paths = lockstep.init_lockstep(params, spec, block).paths
    noise = lockstep_batched.step_noise(spec, problem.model.sites[-1].size, 0, 0, 1, problem.x.dtype)
    return flop_count(lambda p, nz: lockstep_batched.batched_step(spec, net, p, nz, 0.1), paths, noise) / block


def rate(spec, problem, params, replicas: int, steps: int, repeats: int) -> float:
    advance = jax.jit(lockstep.make_advance(spec))
    state = lockstep.init_lockstep(params, spec, replicas)
    return replicas * steps / median_seconds(lambda s: advance(s, steps, 0.1, problem), state, repeats=repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="R = 1,024 and 16,384 only, one repeat")
    args = parser.parse_args()
    sizes = (1024, 16_384) if args.quick else (64, 1024, 10_000, 160_000)
    repeats = 1 if args.quick else 3
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s), "
          f"{os.cpu_count()} CPU(s){' [--quick]' if args.quick else ''}")
    peak = gemm_peak()
    print(peak_line(peak) + "\n")
    problem, params = e1_problem()
    print("Replica-steps/s of the E1 lockstep (GFLOP/s achieved, fraction of the GEMM peak)")
    for label, spec in specs("batched").items():
        flops = step_flops(spec, problem, params)
        print(f"  {label}: {flops / 1e3:.1f} kFLOP per replica-step (XLA count)")
        sequential = rate(specs("replica")[label], problem, params, 1, 20 if spec.variants == ("order1",) else 5,
                          repeats)
        print(f"    sequential (replica layout, R=1): {sequential:10.3g} replica-steps/s")
        at_1024 = {}
        for layout in ("replica", "batched"):
            s = specs(layout)[label]
            for r in sizes:
                if layout == "replica" and r > 10_000:
                    continue
                steps = max(2, min(20, int(4e5 // r))) if spec.variants == ("order1",) else max(1, min(10, int(4e4 // r)))
                value = rate(s, problem, params, r, steps, repeats)
                if r == 1024:
                    at_1024[layout] = value
                mark = ""
                if label.startswith("full") and r >= 10_000:
                    mark = f"  (target >= 2e5: {'met' if value >= 2e5 else 'MISSED'})"
                print(f"    {layout:8s} R={r:>7,d}: {value:10.3g} replica-steps/s  {value * flops / 1e9:6.2f} GFLOP/s "
                      f"= {value * flops / peak:6.2%} of peak{mark}", flush=True)
        for layout, value in at_1024.items():
            print(f"    R=1024 ÷ sequential, {layout}: x{value / sequential:.1f} "
                  f"(target >= 30x: {'met' if value >= 30 * sequential else 'MISSED'})")


if __name__ == "__main__":
    main()
