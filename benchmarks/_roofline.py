"""Roofline figures shared by the benchmarks: the machine's measured GEMM peak and FLOP counts.

Every benchmark prints, in the same run as its timings, the FLOP rate of a large float32 matmul
(the best this machine does on dense linear algebra right now, load included) and, per kernel,
its FLOP count, the achieved rate and its fraction of that peak; or, for a kernel with a stated
FLOP-count limit, measured time ÷ (FLOPs / peak). FLOP counts come from XLA's cost analysis of
the compiled single-step program (it counts the multiply-adds of every dot and convolution as 2
FLOPs, plus elementwise work), never from the timings.

    from _roofline import gemm_peak, flop_count, roofline_line
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (the machine is shared: print them with every run)."""
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unavailable"


def gemm_peak(*, size: int = 1024, repeats: int = 25, dtype=jnp.float32) -> float:
    """FLOP/s of a (size x size) @ (size x size) matmul: the best of ``repeats`` timed calls.

    The best, not the median, because the peak is what the hardware can do; a kernel measured
    beside it under the same load is compared with the same figure. 1024 fills the caches the
    way the benchmarks' GEMMs do (2048 gives the same rate within a few percent here).
    Cost: about ``repeats`` x 2 size^3 FLOPs.
    """
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - tic)
    return 2.0 * size**3 / best


def flop_count(fn, *args) -> float:
    """FLOPs of one call of ``fn(*args)`` from XLA's cost analysis of the compiled program.

    Loops (scan, fori_loop, while) are counted once per body by XLA: pass single-step
    functions. Returns NaN when the backend reports no count.
    """
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def median_seconds(fn, *args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` (blocked) after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def roofline_line(label: str, seconds: float, flops: float, peak: float, *, width: int = 52) -> str:
    """One line: time, FLOPs, achieved GFLOP/s, fraction of the GEMM peak, and time ÷ the FLOP-count limit."""
    limit = flops / peak
    count = f"{flops / 1e6:9.1f} MFLOP" if flops >= 1e6 else f"{flops / 1e3:9.1f} kFLOP"
    return (f"{label:<{width}s} {seconds * 1e3:9.3f} ms  {count}  "
            f"{flops / seconds / 1e9:6.1f} GFLOP/s = {flops / seconds / peak:6.1%} of peak  "
            f"(limit {limit * 1e3:.3f} ms: x{seconds / limit:.2f})")


def peak_line(peak: float) -> str:
    return (f"GEMM peak (float32 1024^3 matmul, best of 25, this run): {peak / 1e9:.1f} GFLOP/s; "
            f"{jax.device_count()} device(s), {os.cpu_count()} CPU(s), {load_average()}")
