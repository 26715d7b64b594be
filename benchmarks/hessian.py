"""Hessian spectrum benchmark: sme (JAX) against PyHessian (PyTorch CPU), side by side.

    python benchmarks/hessian.py            # MLP 784-256-256-10 (P = 269,322), n = 2,000
    python benchmarks/hessian.py --quick    # 784-32-32-10, n = 256: a smoke run in about a minute

Same weights (a JAX MLP after a few full-batch GD steps, copied into torch.nn.Linear
layers), same synthetic data (Gaussian inputs, labels of a random linear
teacher), same loss (mean softmax cross-entropy, no dropout: PyHessian forces
eval mode). Each peer runs in its own subprocess so that its memory is its own: the peak
resident size during the timed computation (VmHWM, reset through
/proc/self/clear_refs after imports and compilation) and the whole process's
ru_maxrss (which includes XLA compilation). The parent imports only NumPy: Linux
carries a parent's resident size into a child's ru_maxrss across fork/exec.

Figures:
* reference: 200-step fully reorthogonalised Lanczos in float64 (top-k with residuals)
  and a float64 SLQ density;
* top-k eigenvalues: PyHessian ``eigenvalues(top_n=k)`` (power iteration with
  deflation, maxIter=100, tol=1e-3) against sme ``top_eigenpairs`` at increasing
  Lanczos orders; sme is timed at the smallest order whose max relative error
  against the reference is at most PyHessian's (matched accuracy);
* Lanczos overhead = time / (steps x one HVP time); HVP time / gradient time;
* SLQ density: PyHessian ``density(iter, n_v)`` against ``slq_density`` at the
  same number of HVPs, L1 distances of the smoothed densities to the reference.
  PyHessian 0.1's density() calls ``torch.eig``, removed from PyTorch: it is
  shimmed with ``torch.linalg.eigh`` (T is symmetric, so the result is the same).

Timings: time.perf_counter after a warm-up (compilation) run, block_until_ready,
median of --repeats (--peer_repeats for PyHessian's top-k, which is slower). PyHessian
runs with the faster of 1 and all torch threads (measured first: torch's OpenMP
ops stall when the cores are shared with other processes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FULL = dict(hidden=(256, 256), n=2000, top_k=10, orders=(15, 20, 25, 30, 40, 60, 80), reference_order=200,
            density_order=80, density_probes=2, reference_probes=4, train_steps=50)
QUICK = dict(hidden=(32, 32), n=256, top_k=3, orders=(6, 10, 15, 20, 30), reference_order=60,
             density_order=20, density_probes=1, reference_probes=2, train_steps=10)
IN_DIM, OUT_DIM = 784, 10


def _peak_mib() -> float:
    """The process's peak resident size (ru_maxrss, KiB on Linux) in MiB: includes compilation."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


class _Window:
    """Peak resident size over a window of the computation, excluding what came before
    (imports, compilation): Linux restarts VmHWM from the current RSS on a write of 5 to
    /proc/self/clear_refs."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.before = _status_mib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = _status_mib("VmHWM")

    def record(self) -> dict:
        return dict(window_before_mib=self.before, window_peak_mib=self.peak)


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        tic = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - tic)
    return float(np.median(times)), out


# ----------------------------------------------------------------------------- inputs


def run_prepare(cfg: dict, path: str, args) -> dict:
    """Synthetic data and the MLP's weights after a few full-batch GD steps, saved as npz."""
    import jax
    import jax.numpy as jnp

    from sme import hessian as hs
    from sme.models import make_model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(cfg["n"], IN_DIM)).astype(np.float32)
    labels = np.argmax(x @ rng.normal(size=(IN_DIM, OUT_DIM)), axis=1)
    y = np.eye(OUT_DIM, dtype=np.float32)[labels]
    model = make_model("mlp", in_dim=IN_DIM, hidden=cfg["hidden"], out_dim=OUT_DIM, activation="relu")
    params = model.init(jax.random.key(0))
    loss = lambda p: hs.loss_value(hs.make_hessian_loss("risk", model, "cross_entropy"), p, x, y)
    step = jax.jit(lambda p: jax.tree_util.tree_map(lambda a, g: a - 0.1 * g, p, jax.grad(loss)(p)))
    for _ in range(cfg["train_steps"]):
        params = step(params)
    arrays = {f"w{i}": np.asarray(layer["w"]) for i, layer in enumerate([*params["hidden"], params["out"]])}
    arrays.update({f"b{i}": np.asarray(layer["b"]) for i, layer in enumerate([*params["hidden"], params["out"]])})
    np.savez(path, x=x, y=y, labels=labels, **arrays)
    return {}


def _jax_problem(cfg: dict, path: str, dtype):
    import jax.numpy as jnp

    from sme import hessian as hs
    from sme.models import make_model

    f = np.load(path)
    layers = [{"w": jnp.asarray(f[f"w{i}"], dtype), "b": jnp.asarray(f[f"b{i}"], dtype)}
              for i in range(len(cfg["hidden"]) + 1)]
    params = {"hidden": layers[:-1], "out": layers[-1]}
    model = make_model("mlp", in_dim=IN_DIM, hidden=cfg["hidden"], out_dim=OUT_DIM, activation="relu")
    return hs.make_hessian_loss("risk", model, "cross_entropy"), params, jnp.asarray(f["x"], dtype), \
        jnp.asarray(f["y"], dtype)


def _torch_problem(cfg: dict, path: str):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    f = np.load(path)
    dims = (IN_DIM, *cfg["hidden"], OUT_DIM)
    layers = []
    for i in range(len(dims) - 1):
        linear = torch.nn.Linear(dims[i], dims[i + 1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(f[f"w{i}"].T.copy()))
            linear.bias.copy_(torch.from_numpy(f[f"b{i}"]))
        layers += [linear, torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    return model, torch.nn.CrossEntropyLoss(), torch.from_numpy(f["x"]), torch.from_numpy(f["labels"]).long()


# ----------------------------------------------------------------------------- sme workers


def run_reference(cfg: dict, path: str, args) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)  # this process only: the float64 reference
    import jax.numpy as jnp

    from sme import hessian as hs
    from sme import lanczos

    hloss, params, x, y = _jax_problem(cfg, path, jnp.float64)
    matvec, dim = hs.make_hvp(hloss, params, x, y, linearize=None)
    top = jax.jit(lambda key: lanczos.top_eigenpairs(matvec, dim, key=key, k=cfg["top_k"],
                                                     order=cfg["reference_order"], dtype=jnp.float64))
    pairs = top(jax.random.key(123))
    density = jax.jit(lambda key: lanczos.slq_density(matvec, dim, key=key, num_probes=cfg["reference_probes"],
                                                      order=cfg["density_order"], dtype=jnp.float64))
    nodes, weights = density(jax.random.key(321))
    return dict(values=np.asarray(pairs.values).tolist(), residuals=np.asarray(pairs.residuals).tolist(),
                nodes=np.asarray(nodes).tolist(), weights=np.asarray(weights).tolist(), dim=dim)


def run_sme_top(cfg: dict, path: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from sme import hessian as hs
    from sme import lanczos

    hloss, params, x, y = _jax_problem(cfg, path, jnp.float32)
    reference = np.asarray(args.reference_values)
    target = args.target_error
    dim = ravel_pytree(params)[0].shape[0]
    from _roofline import flop_count, gemm_peak

    loss = lambda q: hs.loss_value(hloss, q, x, y)
    grad_fn = lambda p: ravel_pytree(jax.grad(loss)(p))[0]
    grad = jax.jit(grad_fn)
    # One product of the operator the Lanczos loop applies: the gradient linearised once
    # (outside the timing, as in every Lanczos/SLQ call), then one JVP of the stored map.
    unravel = ravel_pytree(params)[1]
    lin = jax.jit(lambda p: jax.linearize(jax.grad(loss), p)[1])(params)
    apply = jax.jit(lambda lin, v: ravel_pytree(lin(unravel(v)))[0])
    hvp = lambda p, v: apply(lin, v)
    fresh = jax.jit(lambda p, v: hs.make_hvp(hloss, p, x, y, linearize=False)[0](v))  # forward-over-reverse
    v = jax.random.normal(jax.random.key(1), (dim,))
    grad(params).block_until_ready(), hvp(params, v).block_until_ready(), fresh(params, v).block_until_ready()
    t_grad, _ = _median_time(lambda: grad(params).block_until_ready(), 5 * args.repeats)
    t_hvp, _ = _median_time(lambda: hvp(params, v).block_until_ready(), 5 * args.repeats)
    t_fresh, _ = _median_time(lambda: fresh(params, v).block_until_ready(), 5 * args.repeats)
    peak = gemm_peak()
    flops = dict(grad=flop_count(grad_fn, params), hvp=flop_count(lambda lin, v: lin(unravel(v)), lin, v),
                 fresh=flop_count(lambda p, v: hs.make_hvp(hloss, p, x, y, linearize=False)[0](v), params, v))
    residual_mib = hs.linearization_bytes(loss, params) / 2**20
    sweep = []
    for order in cfg["orders"]:
        top = jax.jit(lambda p, key: lanczos.top_eigenpairs(hs.make_hvp(hloss, p, x, y, linearize=None)[0], dim,
                                                            key=key,
                                                            k=cfg["top_k"], order=order))
        tri = jax.jit(lambda p, key: lanczos.tridiagonalize(hs.make_hvp(hloss, p, x, y, linearize=None)[0],
                                                            jax.random.normal(key, (dim,)), order=order)[:2])
        key = jax.random.key(7)
        jax.block_until_ready(top(params, key)), jax.block_until_ready(tri(params, key))  # compile
        with _Window() as window:
            t_top, pairs = _median_time(lambda: jax.block_until_ready(top(params, key)), args.repeats)
        # Overhead: each tridiagonalisation timed right after 5 HVPs (the load on a shared machine drifts).
        ratios, t_tris = [], []
        for _ in range(args.repeats):
            t_h, _ = _median_time(lambda: hvp(params, v).block_until_ready(), 5)
            t_tri, _ = _median_time(lambda: jax.block_until_ready(tri(params, key)), 1)
            ratios.append(t_tri / (order * t_h))
            t_tris.append(t_tri)
        t_tri = float(np.median(t_tris))
        error = float(np.max(np.abs(np.asarray(pairs.values) - reference) / np.abs(reference)))
        sweep.append(dict(order=order, time=t_top, time_tridiagonalize=t_tri, max_rel_error=error,
                          max_residual=float(np.max(pairs.residuals)), values=np.asarray(pairs.values).tolist(),
                          overhead=float(np.median(ratios)),
                          overhead_with_residuals=t_top / ((order + cfg["top_k"]) * t_hvp), **window.record()))
        if error <= target:
            break
    return dict(t_grad=t_grad, t_hvp=t_hvp, t_fresh=t_fresh, gemm_peak=peak, flops=flops, residual_mib=residual_mib,
                sweep=sweep, peak_mib=_peak_mib(), **sweep[-1])


def run_sme_density(cfg: dict, path: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from sme import hessian as hs
    from sme import lanczos

    hloss, params, x, y = _jax_problem(cfg, path, jnp.float32)
    dim = ravel_pytree(params)[0].shape[0]
    run = jax.jit(lambda p, key: lanczos.slq_density(hs.make_hvp(hloss, p, x, y, linearize=None)[0], dim, key=key,
                                                     num_probes=cfg["density_probes"], order=cfg["density_order"]))
    jax.block_until_ready(run(params, jax.random.key(11)))  # compile
    with _Window() as window:
        t, (nodes, weights) = _median_time(lambda: jax.block_until_ready(run(params, jax.random.key(11))),
                                           args.repeats)
    return dict(time=t, nodes=np.asarray(nodes).tolist(), weights=np.asarray(weights).tolist(),
                peak_mib=_peak_mib(), **window.record())


# ----------------------------------------------------------------------------- PyHessian workers


def _pyhessian(cfg, path):
    import importlib

    import torch

    ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports a class of that name)

    model, criterion, x, labels = _torch_problem(cfg, path)
    calls = {"hvp": 0}
    original = ph.hessian_vector_product

    def counted(*a, **k):
        calls["hvp"] += 1
        return original(*a, **k)

    ph.hessian_vector_product = counted
    # Give the peer its best thread count: torch's OpenMP ops stall badly when the cores
    # are shared with other processes, where one thread can beat two.
    comp = ph.hessian(model, criterion, data=(x, labels), cuda=False)
    v = [torch.randn_like(p) for p in comp.params]
    best = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for _ in range(3):
            original(comp.gradsH, comp.params, v)
        best[threads] = _median_time(lambda: original(comp.gradsH, comp.params, v), 7)[0]
    torch.set_num_threads(min(best, key=best.get))
    model.zero_grad(set_to_none=True)
    return ph, model, criterion, x, labels, calls


def run_pyhessian_top(cfg: dict, path: str, args) -> dict:
    import torch

    ph, model, criterion, x, labels, calls = _pyhessian(cfg, path)
    with torch.no_grad():
        loss = float(criterion(model(x), labels))
    comp = ph.hessian(model, criterion, data=(x, labels), cuda=False)
    v = [torch.randn_like(p) for p in comp.params]
    for _ in range(3):  # warm-up: torch's first autograd calls allocate and spin up threads
        ph.hessian_vector_product(comp.gradsH, comp.params, v)
    t_hvp, _ = _median_time(lambda: ph.hessian_vector_product(comp.gradsH, comp.params, v), 5 * args.repeats)

    def gradient():
        model.zero_grad()
        criterion(model(x), labels).backward()

    for _ in range(3):
        gradient()
    t_grad, _ = _median_time(gradient, 5 * args.repeats)
    del comp, v
    runs = []
    with _Window() as window:
        for _ in range(args.peer_repeats):
            torch.manual_seed(len(runs))
            calls["hvp"] = 0
            tic = time.perf_counter()  # the setup (one gradient with create_graph) is part of the solution
            model.zero_grad(set_to_none=True)  # PyHessian accumulates into .grad: start each run clean
            values, _ = ph.hessian(model, criterion, data=(x, labels), cuda=False).eigenvalues(top_n=cfg["top_k"])
            runs.append(dict(time=time.perf_counter() - tic, values=sorted(values, reverse=True), hvps=calls["hvp"]))
    median = sorted(runs, key=lambda r: r["time"])[len(runs) // 2]
    return dict(loss=loss, t_hvp=t_hvp, t_grad=t_grad, peak_mib=_peak_mib(), threads=torch.get_num_threads(),
                **median, **window.record())


def run_pyhessian_density(cfg: dict, path: str, args) -> dict:
    import torch

    def eig_shim(t, eigenvectors=True):  # torch.eig was removed; T is symmetric, so eigh is exact
        values, vectors = torch.linalg.eigh(t)
        return torch.stack([values, torch.zeros_like(values)], 1), vectors

    torch.eig = eig_shim
    ph, model, criterion, x, labels, calls = _pyhessian(cfg, path)
    ph.hessian(model, criterion, data=(x, labels), cuda=False).eigenvalues(maxIter=3)  # warm-up autograd
    calls["hvp"] = 0
    with _Window() as window:
        tic = time.perf_counter()
        comp = ph.hessian(model, criterion, data=(x, labels), cuda=False)
        nodes, weights = comp.density(iter=cfg["density_order"], n_v=cfg["density_probes"])
        elapsed = time.perf_counter() - tic
    return dict(time=elapsed, nodes=np.asarray(nodes, np.float64).tolist(),
                weights=np.asarray(weights, np.float64).tolist(), hvps=calls["hvp"], peak_mib=_peak_mib(),
                **window.record())


WORKERS = {"prepare": run_prepare, "reference": run_reference, "sme_top": run_sme_top, "sme_density": run_sme_density,
           "pyhessian_top": run_pyhessian_top, "pyhessian_density": run_pyhessian_density}


# ----------------------------------------------------------------------------- orchestration


def _spawn(role: str, args, workdir: str, extra=()) -> dict:
    out = os.path.join(workdir, f"{role}.json")
    cmd = [sys.executable, os.path.abspath(__file__), f"--role={role}", f"--workdir={workdir}",
           f"--repeats={args.repeats}", f"--peer_repeats={args.peer_repeats}", *extra]
    if args.quick:
        cmd.append("--quick")
    tic = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {role} failed:\n{proc.stderr[-4000:]}")
    print(f"  [{role}: {time.perf_counter() - tic:.0f}s wall]", flush=True)
    with open(out) as f:
        return json.load(f)


def _smoothed(nodes, weights, grid, sigma):
    nodes, weights = np.atleast_2d(nodes), np.atleast_2d(weights)
    z = (grid[:, None, None] - nodes[None]) / sigma
    return np.sum(np.exp(-0.5 * z**2) * weights[None], axis=(1, 2)) / (nodes.shape[0] * sigma * np.sqrt(2 * np.pi))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model and data: a smoke run")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median) of the sme kernels")
    parser.add_argument("--peer_repeats", type=int, default=3, help="timed repeats (median) of PyHessian's top-k")
    parser.add_argument("--role", default="", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--target_error", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--reference_values", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.role:  # a worker: compute, write JSON, exit
        if args.reference_values:
            args.reference_values = json.loads(args.reference_values)
        result = WORKERS[args.role](cfg, os.path.join(args.workdir, "inputs.npz"), args)
        with open(os.path.join(args.workdir, f"{args.role}.json"), "w") as f:
            json.dump(result, f)
        return
    run_all(cfg, args)


def run_all(cfg: dict, args) -> None:
    workdir = tempfile.mkdtemp(prefix="sme_bench_hessian_")
    print(f"MLP 784-{'-'.join(map(str, cfg['hidden']))}-10, n = {cfg['n']}, top-{cfg['top_k']}, "
          f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f}); workers in subprocesses "
          f"(workdir {workdir})", flush=True)
    _spawn("prepare", args, workdir)
    ref = _spawn("reference", args, workdir)
    reference = np.asarray(ref["values"])
    print(f"P = {ref['dim']:,}; reference: {cfg['reference_order']}-step Lanczos, float64; top-{cfg['top_k']} "
          f"{np.array2string(reference, precision=5)}; max residual {max(ref['residuals']):.1e}")
    pyh = _spawn("pyhessian_top", args, workdir)
    pyh_error = float(np.max(np.abs(np.asarray(pyh["values"]) - reference) / np.abs(reference)))
    sme = _spawn("sme_top", args, workdir, [f"--target_error={pyh_error}",
                                             f"--reference_values={json.dumps(ref['values'])}"])
    matched = sme["sweep"][-1]
    print("\n== top eigenvalues (time to solution, matched accuracy vs the reference)")
    print(f"PyHessian eigenvalues(top_n={cfg['top_k']}) ({pyh['threads']} torch thread(s), the faster): "
          f"{pyh['time']:.2f} s, {pyh['hvps']} HVPs, "
          f"max rel. error {pyh_error:.1e}  (torch loss {pyh['loss']:.6f})")
    print(f"{'order':>6} {'time s':>8} {'max rel err':>12} {'max resid':>10} {'overhead':>9} {'w/ resid':>9}")
    for row in sme["sweep"]:
        print(f"{row['order']:>6} {row['time']:>8.3f} {row['max_rel_error']:>12.1e} {row['max_residual']:>10.1e} "
              f"{row['overhead']:>9.2f} {row['overhead_with_residuals']:>9.2f}")
    ok = matched["max_rel_error"] <= pyh_error
    print(f"sme top_eigenpairs at order {matched['order']} ({'matched' if ok else 'NOT matched: largest order tried'}):"
          f" {matched['time']:.3f} s -> speed-up over PyHessian {pyh['time'] / matched['time']:.1f}x (target >= 8x)")
    print(f"Lanczos overhead (tridiagonalize time / (steps x HVP time)) at order {matched['order']}: "
          f"{matched['overhead']:.2f} (target <= 1.3); with the k residual HVPs: {matched['overhead_with_residuals']:.2f}")
    print("\n== HVP vs gradient (full batch)")
    print(f"sme:       HVP {sme['t_hvp'] * 1e3:.1f} ms (one JVP of the gradient linearised once per Lanczos call; "
          f"residuals {sme['residual_mib']:.0f} MiB), gradient {sme['t_grad'] * 1e3:.1f} ms, "
          f"ratio {sme['t_hvp'] / sme['t_grad']:.2f} (target <= 1.2); forward-over-reverse from scratch "
          f"{sme['t_fresh'] * 1e3:.1f} ms ({sme['t_fresh'] / sme['t_grad']:.2f}x the gradient)")
    peak = sme["gemm_peak"]
    print(f"roofline (sme worker): GEMM peak {peak / 1e9:.1f} GFLOP/s (float32 1024^3 matmul, best of 25, this run)")
    for name, t in (("grad", sme["t_grad"]), ("hvp", sme["t_hvp"]), ("fresh", sme["t_fresh"])):
        f = sme["flops"][name]
        label = {"grad": "gradient", "hvp": "linearised HVP", "fresh": "forward-over-reverse HVP"}[name]
        print(f"  {label:<26s} {f / 1e6:8.1f} MFLOP (XLA count) in {t * 1e3:7.2f} ms: {f / t / 1e9:6.1f} GFLOP/s = "
              f"{f / t / peak:6.1%} of peak (FLOP-count limit {f / peak * 1e3:.2f} ms)")
    print(f"PyHessian: HVP {pyh['t_hvp'] * 1e3:.1f} ms (double backward of a stored graph), gradient "
          f"{pyh['t_grad'] * 1e3:.1f} ms, ratio {pyh['t_hvp'] / pyh['t_grad']:.2f}; sme HVP is "
          f"{pyh['t_hvp'] / sme['t_hvp']:.1f}x faster")
    sd = _spawn("sme_density", args, workdir)
    pd = _spawn("pyhessian_density", args, workdir)
    print("PyHessian density(): torch.eig (removed from PyTorch) shimmed with torch.linalg.eigh")
    nodes = [np.asarray(ref["nodes"]), np.asarray(sd["nodes"]), np.asarray(pd["nodes"])]
    low, high = min(n.min() for n in nodes), max(n.max() for n in nodes)
    sigma = 0.01 * (high - low)
    grid = np.linspace(low - 5 * sigma, high + 5 * sigma, 4000)
    dens = [_smoothed(n, w, grid, sigma) for n, w in zip(nodes, (ref["weights"], sd["weights"], pd["weights"]))]
    l1 = lambda a, b: float(np.trapezoid(np.abs(a - b), grid))
    traces = [ref["dim"] * np.mean(np.sum(np.asarray(n) * np.asarray(w), axis=1))
              for n, w in zip(nodes, (ref["weights"], sd["weights"], pd["weights"]))]
    hvps = cfg["density_order"] * cfg["density_probes"]
    print(f"\n== SLQ density ({cfg['density_probes']} probe(s) x {cfg['density_order']} steps = {hvps} HVPs each; "
          f"reference: {cfg['reference_probes']} probes, float64)")
    print(f"sme slq_density: {sd['time']:.2f} s; PyHessian density(): {pd['time']:.2f} s ({pd['hvps']} HVPs) -> "
          f"speed-up {pd['time'] / sd['time']:.1f}x (target >= 1.5x)")
    print(f"L1 distance of the smoothed densities (sigma = 1% of the range) to the reference: "
          f"sme {l1(dens[1], dens[0]):.2e}, PyHessian {l1(dens[2], dens[0]):.2e}; between them "
          f"{l1(dens[1], dens[2]):.2e} (probe noise)")
    print(f"trace estimates P sum_i w_i theta_i: reference {traces[0]:.2f}, sme {traces[1]:.2f}, "
          f"PyHessian {traces[2]:.2f} (probe noise ~ Hutchinson's)")
    print(f"largest node: reference {nodes[0].max():.4f}, sme {nodes[1].max():.4f}, PyHessian {nodes[2].max():.4f}")
    print("\n== memory: peak resident size during the timed computation (VmHWM reset after compilation"
          " / imports; 'before' = resident size when it started) and the process's ru_maxrss")
    for name, r in (("sme top-k", sme), ("PyHessian top-k", pyh), ("sme SLQ", sd), ("PyHessian SLQ", pd)):
        print(f"{name:>16}: {r['window_peak_mib']:.0f} MiB (before {r['window_before_mib']:.0f} MiB, "
              f"+{r['window_peak_mib'] - r['window_before_mib']:.0f} MiB); ru_maxrss {r['peak_mib']:.0f} MiB")
    for what, ours, theirs in (("top-k", sme, pyh), ("SLQ", sd, pd)):
        ratio = ours["window_peak_mib"] / theirs["window_peak_mib"]
        print(f"peak memory {what}: sme / PyHessian = {ratio:.2f} (target <= 1.3: {'met' if ratio <= 1.3 else 'MISSED'})")
    basis = matched["order"] * ref["dim"] * 4 / 2**20
    print(f"(sme's Lanczos basis at order {matched['order']}: order x P x 4 B = {basis:.0f} MiB; SLQ: "
          f"{cfg['density_order'] * ref['dim'] * 4 / 2**20:.0f} MiB)")
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{a:.1f}' for a in os.getloadavg())}")


if __name__ == "__main__":
    main()
