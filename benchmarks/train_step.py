"""Throughput and memory of the dropout-SGD training step, against PyTorch and across replicas.

What is measured, all on CPU and in one run:

1. Steps/s of dropout SGD on an MLP 784-256-256-10 (ReLU, keep_prob 0.8 on both
   hidden layers, per-sample masks, cross-entropy, plain SGD with lr 0.1) at batch
   256 on 10,000 synthetic examples (uniform pixels, random labels, fixed NumPy
   seed). ``sme`` runs its own step, built exactly as ``sme.train.loop.run`` builds
   it (make_replica_step -> make_train_step -> make_advance with its epoch Sampler, jitted once), in chunks
   of steps inside its ``lax.fori_loop``. The peer is the same model in PyTorch:
   ``torch.nn`` with ``nn.Dropout(p=0.2)``, the same init scale (He normal for the
   hidden layers, LeCun for the readout, zero biases), ``torch.optim.SGD`` and an
   eager loop drawing a shuffled minibatch per step (epochs without replacement,
   drop-last, as ``sme.data.batch_indices`` does).
2. R = 64 replicas trained at once (``make_train_step`` vmapped over a leading
   replica axis from ``init_state(num_replicas=64)``) against 64 sequential
   single-replica runs of the same number of steps (the single-replica jitted
   advance called 64 times, from the 64 replicas' initial parameters), as
   replica-steps/s.
3. Peak resident memory of each variant, each run alone in a subprocess that
   reports its own high-water mark (VmHWM; ``ru_maxrss`` where there is no
   /proc), compilation included, next to two idle baselines (imports and data).
4. (default mode) Where the sme step's time goes: its parts timed alone in
   ``fori_loop``s, and the size and loop/sort counts of the compiled step.

Method: compile (sme) or warm up (torch) first and report that time separately;
``block_until_ready`` before reading ``time.perf_counter``; repeats of the peers
are interleaved (sme, torch, sme, torch, ...) because the cores may be shared,
and figures are medians with [min, max]. The ratio is given three ways: ratio of
medians, median of the per-repeat ratios of adjacent runs, and ratio of the best
repeats (contention only ever slows a run down). PyTorch uses
``torch.set_num_threads(<cores available to this process>)``; XLA's CPU client
sizes its pool to the same cores. When other processes share the cores,
PyTorch's eager loop (an OpenMP fork/join per op) slows down far more than the
compiled XLA loop, so each part prints the load average: compare runs made at
similar loads.

Run (the benchmark extra brings in torch: ``pip install -e '.[bench]'``):

    python benchmarks/train_step.py           # a few minutes on 2 cores
    python benchmarks/train_step.py --quick   # about 30 s
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np

# The repository root, so that `sme` and `configs` import from a checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # _roofline (after the root: benchmarks/sme.py is not sme)

SEED = 0
NUM_EXAMPLES = 10_000
IN_DIM, HIDDEN, NUM_CLASSES = 784, (256, 256), 10
KEEP_PROB, LR, BATCH = 0.8, 0.1, 256
NUM_REPLICAS = 64
THREADS = len(os.sched_getaffinity(0))


@dataclasses.dataclass(frozen=True)
class Plan:
    chunk: int  # steps per timed call (part 1)
    repeats: int  # interleaved repeats (part 1)
    replica_steps: int  # steps of every replica (part 2)
    replica_repeats: int
    memory_steps: int  # steps run by the single-replica memory children
    baselines: bool  # also measure the idle memory baselines
    profile: bool


QUICK = Plan(chunk=40, repeats=3, replica_steps=2, replica_repeats=2, memory_steps=40, baselines=False,
             profile=False)
DEFAULT = Plan(chunk=100, repeats=7, replica_steps=10, replica_repeats=3, memory_steps=100, baselines=True,
               profile=True)


def synthetic_data():
    """10,000 MNIST-shaped examples: pixels U[0, 1), labels uniform over 10 classes."""
    rs = np.random.default_rng(SEED)
    return rs.random((NUM_EXAMPLES, IN_DIM), dtype=np.float32), rs.integers(0, NUM_CLASSES, NUM_EXAMPLES)


# ----------------------------------------------------------------------------- sme


class SmeRun:
    """The project's training step for `num_replicas` replicas, built as `sme.train.loop.run` builds it."""

    def __init__(self, x, labels, num_replicas: int, chunk: int):
        import jax
        import jax.numpy as jnp

        from configs import base
        from sme import config as config_lib
        from sme import losses, models
        from sme.train.loop import init_state
        from sme.train.step import Sampler, make_advance, make_replica_step, make_train_step, train_keys

        cfg = base.get_config()
        cfg.optim.name, cfg.optim.lr, cfg.optim.schedule = "sgd", LR, "constant"
        self.model = models.make_model("mlp", in_dim=IN_DIM, hidden=HIDDEN, out_dim=NUM_CLASSES,
                                       keep_prob=KEEP_PROB)
        self.optimizer = config_lib.build_optimizer(cfg)
        self.objective = losses.make_objective("dropout", self.model, "cross_entropy", mode="per_sample", lr=LR)
        replica_step = make_replica_step(self.model, self.objective, self.optimizer, batch_size=BATCH,
                                         mask_mode="per_sample")
        self.keys = train_keys(SEED, num_replicas)
        self.x = jnp.asarray(x)
        self.y = jnp.asarray(np.eye(NUM_CLASSES, dtype=np.float32)[labels])
        self.initial = init_state(self.model, self.optimizer, seed=SEED, num_replicas=num_replicas,
                                  share_init=False, dtype=jnp.float32)
        self.state = self.initial
        self.num_steps = jnp.asarray(chunk, jnp.int32)
        tic = time.perf_counter()
        lowered = jax.jit(make_advance(make_train_step(replica_step), Sampler(BATCH))).lower(
            self.state, self.num_steps, self.x, self.y, self.keys)
        self.lower_secs = time.perf_counter() - tic
        tic = time.perf_counter()
        self.advance = lowered.compile()  # the executable train.py's jax.jit(advance) runs
        self.compile_secs = time.perf_counter() - tic

    def run(self, state=None, num_steps: int | None = None):
        """One chunk from `state`, or else from where the previous default chunk ended.

        The trip count is traced, so any `num_steps` runs on the one executable.
        Returns the new state, ready.
        """
        import jax
        import jax.numpy as jnp

        steps = self.num_steps if num_steps is None else jnp.asarray(num_steps, jnp.int32)
        new, bad = self.advance(self.state if state is None else state, steps, self.x, self.y, self.keys)
        jax.block_until_ready(new)
        if int(bad) >= 0:
            raise FloatingPointError(f"sme: non-finite loss at step {int(bad)}")
        if state is None:
            self.state = new
        return new


def sequential_runs(single: SmeRun, initial, num_steps: int):
    """Train each replica of the R-replica state `initial` alone, one after another.

    Returns replica 0's final state (for the cross-check with the vmapped run).
    """
    import jax

    def replica(r):
        pick = lambda leaf: leaf[r : r + 1]  # noqa: E731
        return initial._replace(params=jax.tree_util.tree_map(pick, initial.params),
                                opt_state=jax.tree_util.tree_map(pick, initial.opt_state),
                                loss_sum=pick(initial.loss_sum))

    first = single.run(replica(0), num_steps)
    for r in range(1, initial.loss_sum.shape[0]):
        single.run(replica(r), num_steps)
    return first


# ----------------------------------------------------------------------------- torch


class TorchRun:
    """The same model and step in PyTorch: eager, nn.Dropout, torch.optim.SGD."""

    def __init__(self, x, labels):
        import torch
        from torch import nn

        torch.set_num_threads(THREADS)
        torch.manual_seed(SEED)
        dims, layers = (IN_DIM, *HIDDEN), []
        for i in range(len(HIDDEN)):
            layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU(), nn.Dropout(p=round(1.0 - KEEP_PROB, 6))]
        layers.append(nn.Linear(dims[-1], NUM_CLASSES))
        self.net = nn.Sequential(*layers)
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        with torch.no_grad():  # the init scale of sme.models: He normal, LeCun for the readout
            for i, layer in enumerate(linears):
                gain = 1.0 if i == len(linears) - 1 else 2.0
                layer.weight.normal_(0.0, math.sqrt(gain / layer.in_features))
                layer.bias.zero_()
        self.torch = torch
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(labels)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=LR)
        self.loss_fn = nn.CrossEntropyLoss()
        self.generator = torch.Generator().manual_seed(SEED)
        self.perm, self.offset = None, NUM_EXAMPLES
        self.loss_sum = torch.zeros(())

    def run(self, num_steps: int):
        self.net.train()
        for _ in range(num_steps):
            if self.offset + BATCH > NUM_EXAMPLES:  # new epoch, drop-last
                self.perm, self.offset = self.torch.randperm(NUM_EXAMPLES, generator=self.generator), 0
            idx = self.perm[self.offset : self.offset + BATCH]
            self.offset += BATCH
            loss = self.loss_fn(self.net(self.x[idx]), self.y[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.loss_sum += loss.detach()
        if not bool(self.torch.isfinite(self.loss_sum)):
            raise FloatingPointError("torch: non-finite loss")


# ----------------------------------------------------------------------------- timing


def clock(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def interleaved(peers: dict, repeats: int) -> dict:
    """Time each peer's callable `repeats` times, alternating peers within every repeat."""
    secs = {name: [] for name in peers}
    for _ in range(repeats):
        for name, fn in peers.items():
            secs[name].append(clock(fn))
    return {name: np.asarray(s) for name, s in secs.items()}


def rate_line(name: str, work: float, secs: np.ndarray) -> str:
    rates = work / secs
    return f"  {name:<34s} {np.median(rates):15.1f}  [{rates.min():.1f}, {rates.max():.1f}]"


def ratio_line(label: str, work_a, secs_a, work_b, secs_b) -> str:
    a, b = work_a / secs_a, work_b / secs_b
    return (f"  ratio {label}: {np.median(a) / np.median(b):.2f}x (medians), "
            f"{np.median(a / b):.2f}x (median of paired repeats), {a.max() / b.max():.2f}x (best repeats)")


# ----------------------------------------------------------------------------- parts


def part_torch_vs_sme(plan: Plan, x, labels):
    print(f"\n== 1. Dropout SGD, MLP 784-256-256-10, batch {BATCH}: {plan.chunk}-step chunks, "
          f"{plan.repeats} interleaved repeats ==")
    sme = SmeRun(x, labels, num_replicas=1, chunk=plan.chunk)
    warm_sme = clock(sme.run)
    print(f"  sme:   trace+lower {sme.lower_secs:.2f} s, XLA compile {sme.compile_secs:.2f} s, "
          f"first chunk {warm_sme:.2f} s")
    peer, warm_steps = TorchRun(x, labels), min(plan.chunk, 20)
    warm_torch = clock(lambda: peer.run(warm_steps))
    print(f"  torch: warm-up {warm_steps} steps {warm_torch:.2f} s, {peer.torch.get_num_threads()} threads")
    secs = interleaved({"sme": sme.run, "torch": lambda: peer.run(plan.chunk)}, plan.repeats)
    print(f"  {'':<34s} {'steps/s median':>15s}  [min, max]")
    print(rate_line("sme (jit advance, fori_loop)", plan.chunk, secs["sme"]))
    print(rate_line("torch (eager, nn.Dropout)", plan.chunk, secs["torch"]))
    print(ratio_line("sme/torch", plan.chunk, secs["sme"], plan.chunk, secs["torch"]))
    from _roofline import gemm_peak, peak_line

    # Roofline: the step's matmul FLOPs (forward 2B sum_l d_l d_l+1, the same again for the weight
    # gradients, and the input gradients of every layer but the first) against the GEMM peak
    # measured now; elementwise work, masks and the sampler are not counted (they are the gap).
    dims = (IN_DIM, *HIDDEN, NUM_CLASSES)
    forward = 2 * BATCH * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    flops = 2 * forward + 2 * BATCH * sum(a * b for a, b in zip(dims[1:-1], dims[2:]))
    peak = gemm_peak()
    step_secs = float(np.median(secs["sme"])) / plan.chunk
    print(f"  {peak_line(peak)}")
    print(f"  sme step: {flops / 1e6:.0f} MFLOP of matmuls in {step_secs * 1e3:.2f} ms = "
          f"{flops / step_secs / 1e9:.1f} GFLOP/s, {flops / step_secs / peak:.0%} of the GEMM peak "
          f"(target >= 85%; FLOP-count limit {flops / peak * 1e3:.2f} ms)")
    steps_sme = int(sme.state.step)
    steps_torch = warm_steps + plan.chunk * plan.repeats
    print(f"  mean training loss: sme {float(sme.state.loss_sum[0]) / steps_sme:.3f} over {steps_sme} steps, "
          f"torch {float(peer.loss_sum) / steps_torch:.3f} over {steps_torch} steps (ln 10 = 2.303)")
    return sme


def part_replicas(plan: Plan, x, labels, single: SmeRun):
    import jax

    steps = plan.replica_steps
    print(f"\n== 2. R = {NUM_REPLICAS} replicas, {steps} steps each: vmap vs {NUM_REPLICAS} sequential runs, "
          f"{plan.replica_repeats} interleaved repeats ==")
    batched = SmeRun(x, labels, num_replicas=NUM_REPLICAS, chunk=steps)
    print(f"  vmap R={NUM_REPLICAS}: trace+lower {batched.lower_secs:.2f} s, XLA compile {batched.compile_secs:.2f} s; "
          "R=1: part 1's executable (the trip count is traced)")
    warm = clock(lambda: batched.run(batched.initial, 1)) + clock(lambda: single.run(single.initial, 1))
    print(f"  warm-up calls (1 step each) {warm:.2f} s")
    out = {}
    secs = interleaved({
        "vmap": lambda: out.__setitem__("vmap", batched.run(batched.initial)),
        "sequential": lambda: out.__setitem__("seq", sequential_runs(single, batched.initial, steps)),
    }, plan.replica_repeats)
    work = NUM_REPLICAS * steps
    print(f"  {'':<34s} {'replica-steps/s':>15s}  [min, max]")
    print(rate_line(f"vmap (one step, R={NUM_REPLICAS})", work, secs["vmap"]))
    print(rate_line(f"sequential ({NUM_REPLICAS} x R=1)", work, secs["sequential"]))
    print(ratio_line("vmap/sequential", work, secs["vmap"], work, secs["sequential"]))
    diff = max(float(np.max(np.abs(np.asarray(a[0]) - np.asarray(b[0])))) for a, b in zip(
        jax.tree_util.tree_leaves(out["vmap"].params), jax.tree_util.tree_leaves(out["seq"].params)))
    print(f"  check: replica 0 after {steps} steps, vmap vs its sequential run: max |dtheta| = {diff:.1e} "
          "(runs r > 0 reuse replica 0's keys: the seed is static, the work is the same)")


CHILD_VARIANTS = {
    "jax-idle": "import jax + sme, data on device, nothing run",
    "torch-idle": "import torch, data as tensors, nothing run",
    "sme": "sme step, R=1",
    "torch": "torch step",
    "sme-vmap64": f"sme step, vmap R={NUM_REPLICAS}",
    "sme-seq64": f"sme step, {NUM_REPLICAS} sequential R=1 runs",
}


def child(variant: str, plan: Plan) -> None:
    """Body of one memory subprocess: build and run one variant, then exit."""
    x, labels = synthetic_data()
    if variant == "jax-idle":
        import jax.numpy as jnp

        import sme.train.step  # noqa: F401
        jnp.asarray(x).block_until_ready()
    elif variant == "torch-idle":
        import torch

        torch.set_num_threads(THREADS)
        _ = torch.from_numpy(x), torch.from_numpy(labels)
    elif variant == "sme":
        run = SmeRun(x, labels, num_replicas=1, chunk=plan.chunk)
        for _ in range(max(1, plan.memory_steps // plan.chunk)):
            run.run()
    elif variant == "torch":
        TorchRun(x, labels).run(plan.memory_steps)
    elif variant == "sme-vmap64":
        run = SmeRun(x, labels, num_replicas=NUM_REPLICAS, chunk=plan.replica_steps)
        run.run()
    elif variant == "sme-seq64":
        import jax.numpy as jnp

        from sme.train.loop import init_state

        single = SmeRun(x, labels, num_replicas=1, chunk=plan.replica_steps)
        sequential_runs(single, init_state(single.model, single.optimizer, seed=SEED, num_replicas=NUM_REPLICAS,
                                           share_init=False, dtype=jnp.float32), plan.replica_steps)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    Linux's ``ru_maxrss`` of a child starts from its parent's high-water mark at
    fork (it survives exec), so a child of this large process would report at
    least the parent's size; VmHWM belongs to the child's own address space.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_child(variant: str, quick: bool) -> tuple[str, float | str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return variant, f"failed (exit {proc.returncode}): {tail[0]}"
    return variant, json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


def part_memory(plan: Plan, quick: bool):
    print(f"\n== 3. Peak resident memory: one subprocess per variant ({THREADS} at a time), its own VmHWM, "
          "compilation included ==")
    variants = [v for v in CHILD_VARIANTS if plan.baselines or not v.endswith("-idle")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = dict(pool.map(lambda v: measure_child(v, quick), variants))
    for variant in variants:
        value, what = results[variant], CHILD_VARIANTS[variant]
        shown = f"{value:8.0f} MB" if isinstance(value, float) else value
        print(f"  {variant:<11s} {shown}   {what}")
    print(f"  (single-replica children run {plan.memory_steps} steps; R={NUM_REPLICAS} children "
          f"{plan.replica_steps} steps per replica)")


def _loop_timer(body, carry, data, steps: int):
    """A jitted fori_loop of `steps` calls of ``body(i, carry, data)``; returns a timed callable."""
    import jax

    fn = jax.jit(lambda c, d: jax.lax.fori_loop(0, steps, lambda i, c: body(i, c, d), c))
    jax.block_until_ready(fn(carry, data))
    return lambda: jax.block_until_ready(fn(carry, data))


def _hand_batched_loss(params, x, y, masks):
    """The same dropout risk with the batch written into the matmuls instead of vmapped."""
    import jax
    import jax.numpy as jnp

    h = x
    for layer, mask in zip(params["hidden"], masks):
        h = jax.nn.relu(h @ layer["w"] + layer["b"]) * mask
    out = h @ params["out"]["w"] + params["out"]["b"]
    return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(out), axis=-1))


def part_profile(sme: SmeRun, plan: Plan):
    import jax
    import jax.numpy as jnp

    from sme import rng
    from sme.data import batch_indices
    from sme.dropout import sample_masks

    steps_per_epoch = NUM_EXAMPLES // BATCH
    repeats = min(plan.repeats, 5)
    print(f"\n== 4. Where the sme step's time goes (R=1; parts timed alone, each in a {plan.chunk}-step "
          f"fori_loop, {repeats} round-robin repeats) ==")
    data_key = rng.stream_key(SEED, rng.DATA)
    params = jax.tree_util.tree_map(lambda leaf: leaf[0], sme.initial.params)
    data = {"x": sme.x, "y": sme.y, "perm": jax.random.permutation(data_key, NUM_EXAMPLES),
            "xb": sme.x[:BATCH], "yb": sme.y[:BATCH],
            "masks": sample_masks(sme.model.sites, key=jax.random.key(1), batch_shape=(BATCH,))}
    zero = jnp.zeros(())

    def block(i, d):
        return jax.lax.dynamic_slice_in_dim(d["perm"], (i % steps_per_epoch) * BATCH, BATCH)

    def sgd(loss_fn):
        def body(i, p, d):
            grads = jax.grad(loss_fn)(p, d["xb"], d["yb"], d["masks"])
            return jax.tree_util.tree_map(lambda a, g: a - LR * g, p, grads)
        return body

    parts = {
        "whole step (compiled advance)": sme.run,
        f"batch indices: permutation of {NUM_EXAMPLES:,} (batch_indices)": _loop_timer(
            lambda i, c, d: c + batch_indices(data_key, i, num_examples=NUM_EXAMPLES, batch_size=BATCH).sum(),
            jnp.zeros((), jnp.int32), data, plan.chunk),
        "batch indices: slice of a per-epoch permutation": _loop_timer(
            lambda i, c, d: c + block(i, d).sum(), jnp.zeros((), jnp.int32), data, plan.chunk),
        "slice + gather x[idx], y[idx] (+ sum)": _loop_timer(
            lambda i, c, d: c + d["x"][block(i, d)].sum() + d["y"][block(i, d)].sum(), zero, data, plan.chunk),
        f"per-sample masks 2 x ({BATCH}, {HIDDEN[0]}) (sample_masks)": _loop_timer(
            lambda i, c, d: c + sum(m.sum() for m in sample_masks(
                sme.model.sites, key=rng.step_key(SEED, rng.DROPOUT, i), batch_shape=(BATCH,))),
            zero, data, plan.chunk),
        "grad + SGD, sme objective (vmap per example)": _loop_timer(sgd(sme.objective), params, data, plan.chunk),
        "grad + SGD, batch in the matmuls by hand": _loop_timer(sgd(_hand_batched_loss), params, data, plan.chunk),
    }
    secs = interleaved(parts, repeats)
    ms = {name: 1e3 * np.median(s) / plan.chunk for name, s in secs.items()}
    names = list(parts)
    for name in names:
        print(f"  {name:<54s} {ms[name]:7.3f} ms/step")
    whole, perm = ms[names[0]], ms[names[1]]
    print(f"  the loop draws the permutation once per epoch ({steps_per_epoch} steps): "
          f"{perm / steps_per_epoch:.3f} ms/step of it; drawn every step it would add {perm:.3f} ms "
          f"({(whole + perm) / whole:.2f}x the step)")
    hlo = sme.advance.as_text()
    ops = {op: len(re.findall(rf"\s{op}\(", hlo)) for op in ("sort", "while", "gather", "dot", "fusion")}
    print(f"  compiled advance: {len(hlo):,} chars of HLO text; "
          + ", ".join(f"{op} x{n}" for op, n in ops.items()))
    origins = {"_shuffle": "permutation", "_bernoulli": "mask bits", "fold_in": "key fold_in",
               "split": "key split"}
    loops = [next((what for tag, what in origins.items() if tag in name), "training fori_loop")
             for line in hlo.splitlines() if " while(" in line
             for name in re.findall(r'op_name="([^"]*)"', line)]
    print("  while loops by origin: " + ", ".join(f"{what} x{loops.count(what)}" for what in sorted(set(loops)))
          + " (threefry hashing is lowered as rolled loops on CPU)")
    print(f"  sorts: {ops['sort']} passes over {NUM_EXAMPLES:,} random keys (jax.random.permutation), "
          "inside the lax.cond taken once per epoch")


def load() -> None:
    """Other processes on the cores change the figures: print the 1-minute load average."""
    print(f"  load average (1 min) {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def header():
    import jax
    import jaxlib
    import optax
    import torch

    print("train_step benchmark: sme (JAX) vs PyTorch, dropout SGD on CPU")
    print(f"  python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
          f"optax {optax.__version__}, torch {torch.__version__}, numpy {np.__version__}")
    print(f"  {platform.machine()} {cpu_model()}, cores available {THREADS} "
          f"(os.cpu_count {os.cpu_count()}), jax devices {jax.devices()}")
    torch.set_num_threads(THREADS)
    print(f"  threads: torch.set_num_threads({torch.get_num_threads()}); XLA: its default CPU pool, "
          f"one thread per available core ({THREADS}); "
          f"load average at start {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 30 s: fewer steps and repeats, no part 4")
    parser.add_argument("--child", choices=sorted(CHILD_VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    plan = QUICK if args.quick else DEFAULT
    if args.child:
        child(args.child, plan)
        print(json.dumps({"variant": args.child, "peak_mb": peak_rss_mb()}))
        return
    tic = time.perf_counter()
    header()
    x, labels = synthetic_data()
    sme = part_torch_vs_sme(plan, x, labels)
    load()
    part_replicas(plan, x, labels, sme)
    load()
    part_memory(plan, args.quick)
    if plan.profile:
        part_profile(sme, plan)
        load()
    print(f"\ntotal {time.perf_counter() - tic:.0f} s")


if __name__ == "__main__":
    main()
