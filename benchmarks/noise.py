"""Benchmark: per-sample noise spectrum and mask-gradient throughput, sme against peers, in one run.

1. Top-10 eigenvalues of the per-sample (SGD) gradient covariance
   Sigma = (1/B) sum_i (g_i - g_bar)(g_i - g_bar)^T of an MLP 784-256-256-10
   (cross-entropy, batch B = 256, P = 269,322):
   * ``sme_gram``: `sme.grads.per_sample_gram` (layer-wise a_i.a_j x delta_i.delta_j,
     no per-sample gradient formed) + centred Gram eigh;
   * ``jax_vmap``: materialised per-sample gradients by jax vmap(grad), Gram, eigh;
   * ``torch_vmap``: torch.func vmap(grad) + Gram + torch.linalg.eigvalsh (the peer).
2. K full-batch dropout mask gradients (`sme.grads.mask_gradients`, vmapped in
   chunks) against K single jitted gradients called one after another.

Each contender runs in its own subprocess (peak memory = its ru_maxrss), warms up
(compiles) first, then reports the median of repeated, synchronised
(block_until_ready) timings. Inputs are random pixels in [0, 1) and random
labels (no dataset download); the same weights and data go to every contender
and the eigenvalues are cross-checked.

    python benchmarks/noise.py            # full
    python benchmarks/noise.py --quick    # fewer repeats, K = 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIMS = (784, 256, 256, 10)
BATCH = 256
TOP_K = 10


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    weights = []
    for fan_in, fan_out in zip(DIMS[:-1], DIMS[1:]):
        weights.append((rng.normal(size=(fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32))
        weights.append((0.01 * rng.normal(size=(fan_out,))).astype(np.float32))
    x = rng.random((BATCH, DIMS[0]), dtype=np.float32)
    labels = rng.integers(0, DIMS[-1], BATCH)
    return weights, x, np.eye(DIMS[-1], dtype=np.float32)[labels]


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _sme_setup():
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp

    from sme import models

    weights, x, y = _problem()
    model = models.make_model("mlp", in_dim=DIMS[0], hidden=DIMS[1:-1], out_dim=DIMS[-1], keep_prob=0.8)
    params = {"hidden": [{"w": jnp.asarray(weights[2 * i]), "b": jnp.asarray(weights[2 * i + 1])}
                         for i in range(len(DIMS) - 2)],
              "out": {"w": jnp.asarray(weights[-2]), "b": jnp.asarray(weights[-1])}}
    return jax, jnp, model, params, jnp.asarray(x), jnp.asarray(y)


def worker_sme_gram(repeats: int) -> dict:
    jax, jnp, model, params, x, y = _sme_setup()
    from sme import covariance as cv
    from sme import grads

    @jax.jit
    def top(params, x, y):
        gram = grads.per_sample_gram(model, "cross_entropy", params, x, y)
        return cv.gram_eigenvalues(cv.centred_gram(gram, ddof=0), TOP_K)

    seconds = _median_time(lambda: top(params, x, y).block_until_ready(), repeats)
    flops, peak = _roofline(top, params, x, y)
    return dict(seconds=seconds, eigenvalues=np.asarray(top(params, x, y)).tolist(), flops=flops, gemm_peak=peak)


def _roofline(fn, *args):
    """(XLA's FLOP count of fn(*args), the GEMM peak measured now) from benchmarks/_roofline.py."""
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    from _roofline import flop_count, gemm_peak

    return flop_count(fn, *args), gemm_peak()


def worker_jax_vmap(repeats: int) -> dict:
    jax, jnp, model, params, x, y = _sme_setup()
    from sme import covariance as cv
    from sme import grads

    @jax.jit
    def top(params, x, y):
        g = grads.per_sample_gradients(model, "cross_entropy", params, x, y)
        return cv.gram_eigenvalues(cv.gram(cv.per_sample_covariance(g, ddof=0)), TOP_K)

    seconds = _median_time(lambda: top(params, x, y).block_until_ready(), repeats)
    return dict(seconds=seconds, eigenvalues=np.asarray(top(params, x, y)).tolist())


def worker_torch_vmap(repeats: int) -> dict:
    import torch
    from torch.func import functional_call, grad, vmap

    torch.set_num_threads(os.cpu_count() or 1)
    weights, x, y = _problem()
    net = torch.nn.Sequential(torch.nn.Linear(DIMS[0], DIMS[1]), torch.nn.ReLU(), torch.nn.Linear(DIMS[1], DIMS[2]),
                              torch.nn.ReLU(), torch.nn.Linear(DIMS[2], DIMS[3]))
    with torch.no_grad():
        for layer, i in zip((net[0], net[2], net[4]), range(3)):
            layer.weight.copy_(torch.from_numpy(weights[2 * i].T.copy()))
            layer.bias.copy_(torch.from_numpy(weights[2 * i + 1]))
    params = {k: v.detach() for k, v in net.named_parameters()}
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def loss(p, xi, yi):
        out = functional_call(net, p, (xi[None],))[0]
        return -(yi * torch.log_softmax(out, -1)).sum()

    def top():
        per = vmap(grad(loss), in_dims=(None, 0, 0))(params, xt, yt)
        g = torch.cat([v.reshape(BATCH, -1) for v in per.values()], dim=1)
        gc = g - g.mean(0, keepdim=True)
        values = torch.linalg.eigvalsh(gc @ gc.T / BATCH)
        return values.flip(0)[:TOP_K].clamp(min=0)

    seconds = _median_time(top, repeats)
    return dict(seconds=seconds, eigenvalues=top().tolist(), torch=torch.__version__)


def worker_mask_throughput(repeats: int, num_masks: int) -> dict:
    jax, jnp, model, params, x, y = _sme_setup()
    from sme import grads, losses

    masks = grads.draw_masks(model, key=jax.random.key(0), num_masks=num_masks, mode="per_sample",
                             num_examples=BATCH)
    results = {}
    for chunk in (None, 16):
        batched = jax.jit(lambda p, m: grads.mask_gradients(model, "cross_entropy", p, x, y, m, mode="per_sample",
                                                            chunk_size=chunk))
        results[f"vmapped_chunk_{chunk or num_masks}"] = _median_time(
            lambda: batched(params, masks).block_until_ready(), repeats)
    single = jax.jit(lambda p, m: jax.grad(losses.dropout_risk, argnums=2)(
        model, "cross_entropy", p, x, y, m, mode="per_sample"))
    one_masks = [jax.tree_util.tree_map(lambda a: a[k], masks) for k in range(num_masks)]

    def sequential():
        outs = [single(params, m) for m in one_masks]
        jax.block_until_ready(outs)

    results["sequential_single"] = _median_time(sequential, repeats)
    # K gradients: XLA counts a loop body once, so count one gradient and multiply.
    flops, peak = _roofline(single, params, one_masks[0])
    return dict(seconds=results, num_masks=num_masks, flops=num_masks * flops, gemm_peak=peak)


def _run_worker(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={name}", f"--repeats={args.repeats}",
           f"--num_masks={args.num_masks}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return dict(error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, K = 16 masks")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--num_masks", type=int, default=None)
    parser.add_argument("--worker", default="")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 10)
    args.num_masks = args.num_masks or (16 if args.quick else 64)
    if args.worker:
        fn = dict(sme_gram=worker_sme_gram, jax_vmap=worker_jax_vmap, torch_vmap=worker_torch_vmap)
        result = (worker_mask_throughput(args.repeats, args.num_masks) if args.worker == "mask_throughput"
                  else fn[args.worker](args.repeats))
        result["peak_mb"] = _peak_mb()
        print(json.dumps(result))
        return
    load = os.getloadavg()[0]  # contention from other processes distorts threaded LAPACK timings: say so
    print(f"per-sample covariance top-{TOP_K} eigenvalues, MLP {'-'.join(map(str, DIMS))}, batch {BATCH}, "
          f"{os.cpu_count()} CPU cores (load average {load:.1f} at start), median of {args.repeats}")
    rows = {name: _run_worker(name, args) for name in ("sme_gram", "jax_vmap", "torch_vmap")}
    reference = rows["torch_vmap"]
    for name, row in rows.items():
        if "error" in row:
            print(f"  {name:12s} FAILED: {row['error']}")
            continue
        line = f"  {name:12s} {row['seconds'] * 1e3:9.2f} ms   peak {row['peak_mb']:7.0f} MB"
        if "error" not in reference:
            rel = np.max(np.abs(np.subtract(row["eigenvalues"], reference["eigenvalues"]))
                         / np.abs(reference["eigenvalues"]))
            line += f"   torch/{name} = {reference['seconds'] / row['seconds']:6.1f}x   max rel diff {rel:.1e}"
        print(line)
    if "error" not in rows["sme_gram"]:
        row = rows["sme_gram"]
        print(f"  top eigenvalues (sme): {np.round(row['eigenvalues'][:5], 6).tolist()} ...")
        print(f"  roofline: GEMM peak {row['gemm_peak'] / 1e9:.1f} GFLOP/s (float32 1024^3 matmul, best of 25, in the "
              f"sme worker); sme_gram {row['flops'] / 1e6:.0f} MFLOP (XLA count) at "
              f"{row['flops'] / row['seconds'] / 1e9:.1f} GFLOP/s = {row['flops'] / row['seconds'] / row['gemm_peak']:.0%}"
              f" of peak (FLOP-count limit {row['flops'] / row['gemm_peak'] * 1e3:.2f} ms)")
    mt = _run_worker("mask_throughput", args)
    if "error" in mt:
        print(f"mask-gradient throughput FAILED: {mt['error']}")
        return
    k = mt["num_masks"]
    seq = mt["seconds"]["sequential_single"]
    print(f"K = {k} full-batch dropout mask gradients (per_sample masks, batch {BATCH}), peak {mt['peak_mb']:.0f} MB")
    for name, sec in mt["seconds"].items():
        print(f"  {name:22s} {sec * 1e3:9.1f} ms   {k / sec:8.1f} masks/s   vs sequential {seq / sec:5.2f}x   "
              f"{mt['flops'] / sec / 1e9:6.1f} GFLOP/s = {mt['flops'] / sec / mt['gemm_peak']:.0%} of the GEMM peak "
              f"{mt['gemm_peak'] / 1e9:.1f} GFLOP/s ({mt['flops'] / 1e9:.2f} GFLOP, XLA count)")


if __name__ == "__main__":
    main()
