"""Run registered analyses over one or several training runs' checkpoints.

For each run directory: rebuild the run's model and data from its own
config.json (so an analysis can never use a different model or data by
accident), load each selected checkpoint (verified), slice one replica (or
each, ``replica="all"``), call each analysis with ``key = analysis_key(seed,
name, step, replica)``, and write ``analysis/<name>/step_<N>.npz`` (or
``analysis/<name>/replica_<r>/step_<N>.npz``); then call the analysis' plot
function on the written files (one directory each). Analyses with a
``batch_fn`` take up to ``batch_size`` checkpoints (and replicas) per call,
vmapped and sharded over devices, with the same keys and results as one at a
time. A failing analysis is reported and the others go on, so finished work is never lost.

Results are keyed by their settings. Every analysis directory holds
``settings.json`` (the settings as a JSON object and their SHA-256 digest,
`sme.runs.settings_digest`), and every artifact stores the same digest and its
own SHA-256. An artifact is reused only when it verifies and its digest is the
requested one; an invalid one is reported and recomputed. Asking for other
settings than a directory holds is refused (before any work) unless
``overwrite``, which then deletes that directory's old artifacts, so all steps of
one directory always share one digest. Settings of every requested analysis are
checked (`sme.analyses.check_settings`) before the run's data or checkpoints are
loaded.

A summary JSON (``analysis/summary.json``, with its SHA-256) collects every scalar
result per analysis (or ``<name>/replica_<r>``) and step. The run holds the
workdir lock (`sme.runs.WorkdirLock`) throughout, and summary updates are
read-merge-write; a corrupt summary is reported and rebuilt from the verified
artifacts.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
import traceback

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from sme import config as config_lib
from sme import distributed, io, rng, runs
from sme.analyses import Context, RunInfo, as_numpy, check_settings, load_all
from sme.train.state import init_state
from sme.train.state import replica as take_replica

SETTINGS_FILE = "settings.json"
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True)
class Request:
    """What to analyse in a run.

    Attributes:
      names: analyses to run (registry names).
      steps: checkpoints: "all" | "last" | "0,100,1000".
      replica: which replica (an int, or its text), or "all": every replica of every selected checkpoint, each
        written to ``analysis/<name>/replica_<r>/`` and summarised under ``<name>/replica_<r>``.
      settings: name -> {setting: value}.
      overwrite: recompute results already on disk.
      batch_size: analyses with a ``batch_fn`` get up to this many (checkpoint, replica) items per
        vmapped call (split over devices when there are several); 1 = one item at a time; 0 = auto:
        the device count when there are several devices, else 1 (on one CPU device the vmapped
        program compiles ~2 s longer and gains only 20-30 % per item, so one at a time is faster).
    """

    names: tuple[str, ...]
    steps: str = "all"
    replica: int | str = 0
    settings: dict = dataclasses.field(default_factory=dict)
    overwrite: bool = False
    batch_size: int = 0


class AnalysisError(ValueError):
    """Bad analysis request (unknown name, missing run, missing checkpoint)."""


def read_config(workdir: str) -> ConfigDict:
    """The run's config from its verified config.json, without loading data. Raises AnalysisError."""
    try:
        cfg = ConfigDict(runs.read_run_config(workdir)["config"])
    except runs.RunError as err:
        raise AnalysisError(f"{err}") from None
    for block in ("model",):  # JSON turns tuples into lists; the config edge wants tuples
        for k, v in cfg[block].items():
            if isinstance(v, list):
                cfg[block][k] = tuple(v)
    return cfg


def run_settings(cfg, names, overrides: dict) -> dict:
    """name -> settings: the run's ``config.analysis.<name>`` block overridden by ``overrides[name]``."""
    return {name: {**(cfg.analysis[name].to_dict() if name in cfg.get("analysis", {}) else {}),
                   **overrides.get(name, {})} for name in names}


def check_request(request: Request) -> None:
    """Names, batch size and every analysis's settings, checked without data. Raises AnalysisError."""
    registry = load_all()
    unknown = [n for n in request.names if n not in registry]
    if unknown:
        raise AnalysisError(f"unknown analyses {unknown}; available: {sorted(registry)}")
    if request.batch_size < 0:
        raise AnalysisError(f"--batch_size={request.batch_size} must be >= 0 (0 = auto)")
    for name in request.names:
        try:
            check_settings(name, request.settings.get(name, {}))
        except ValueError as err:
            raise AnalysisError(str(err)) from None


def load_run(workdir: str):
    """The run (`sme.config.Run`: data, model, ... rebuilt from its config.json) and its state layout."""
    run = config_lib.build(read_config(workdir))
    t = run.train
    like = jax.eval_shape(lambda: init_state(run.model, run.optimizer, seed=run.seed, num_replicas=t.num_replicas,
                                             share_init=t.share_init, dtype=np.dtype(t.dtype)))
    return run, like


def select_steps(available: list[int], spec: str, workdir: str) -> list[int]:
    if not available:
        raise AnalysisError(f"{workdir}: no checkpoints to analyse")
    spec = str(spec).strip()
    if spec == "all":
        return available
    if spec == "last":
        return available[-1:]
    try:
        wanted = [int(s) for s in spec.split(",")]
    except ValueError:
        raise AnalysisError(f"--steps={spec!r}: expected all, last or comma-separated checkpoint steps") from None
    missing = [s for s in wanted if s not in available]
    if missing:
        raise AnalysisError(f"{workdir}: no checkpoint for steps {missing}; available: {available}")
    return wanted


def _scalars(result: dict) -> dict:
    """The 0-d numbers and strings of an artifact, and the largest eigenvalue of each spectrum with its
    residual (``top_values``/``top_residuals`` as ``lambda_max``/``lambda_max_residual``,
    ``<name>_eigenvalues``/``<name>_residuals`` as ``<name>_max``/``<name>_max_residual``)."""
    out = {}
    for k, v in result.items():
        stem = "lambda" if k == "top_values" else k[:-len("_eigenvalues")] if k.endswith("_eigenvalues") else None
        res = np.asarray(result.get("top_residuals" if k == "top_values" else f"{stem}_residuals", []))
        a = np.asarray(v)
        if stem and a.ndim == 1 and a.size and a.dtype.kind == "f":
            out[f"{stem}_max"] = float(a[0])
            if res.ndim == 1 and res.size == a.size:
                out[f"{stem}_max_residual"] = float(res[0])
    for k, v in result.items():
        a = np.asarray(v)
        if a.ndim == 0 and a.dtype.kind in "fiub":
            out[k] = float(a)
        elif a.ndim == 0 and a.dtype.kind == "U":
            out[k] = _json_object(str(a))
    return out


def _json_object(text: str):
    """A string holding a JSON object (e.g. an analysis's settings) as the object, else the string."""
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def _replicas(request: Request, num_replicas: int) -> list[int]:
    if str(request.replica) == "all":
        return list(range(num_replicas))
    try:
        replica = int(request.replica)
    except ValueError:
        raise AnalysisError(f"--replica={request.replica!r}: expected an integer or 'all'") from None
    if not 0 <= replica < num_replicas:
        raise AnalysisError(f"--replica={replica} but the run has {num_replicas} replicas")
    return [replica]


class Progress:
    """Progress lines "<what> k of n" for a job of n items, with an ETA once the first call is done.

    ``update(count, seconds)`` records a call that finished ``count`` items in ``seconds``. The first
    call compiles, so it is reported as such and left out of the rate; later lines give the mean
    seconds per item since then and the ETA of the rest (as `sme.train.loop` does for steps).
    """

    def __init__(self, what: str, total: int, *, log=logging.info, first: str = "first call with compilation"):
        self.what, self.total, self.done, self.log, self.first = what, total, 0, log, first
        self.compile_secs: float | None = None
        self.rate_items, self.rate_secs = 0, 0.0

    def update(self, count: int, seconds: float, detail: str = "") -> str:
        self.done += count
        if self.compile_secs is None:
            self.compile_secs = seconds
            speed = f"{self.first} {seconds:.1f}s"
        else:
            self.rate_items, self.rate_secs = self.rate_items + count, self.rate_secs + seconds
            per_item = self.rate_secs / self.rate_items
            speed = f"{per_item:.3g}s per item | ETA {per_item * max(self.total - self.done, 0):.0f}s"
        line = f"{self.what} {self.done} of {self.total}{detail} | {speed}"
        self.log("%s", line)
        return line


def auto_batch_size() -> int:
    """Items per batched call when not given: one per device when there are several, else 1."""
    count = jax.device_count()
    return count if count > 1 else 1


def analyse_run(workdir: str, request: Request) -> dict:
    """Run the requested analyses on one run, under its workdir lock; returns the summary on disk.

    Checkpoints are taken in near-equal chunks of at most ``batch_size`` (checkpoint, replica)
    items, so only a chunk's parameters are in memory; within a chunk each analysis with a
    ``batch_fn`` runs in near-equal groups of at most ``batch_size`` items, every group padded to
    the same size by repeating its last item (so one compilation serves the whole run), the others
    one item at a time. A failing group is retried one item at a time, so only the failing items
    are lost.

    Raises:
      AnalysisError: a bad request, or settings that differ from those on disk without ``overwrite``
        (before anything is computed or written).
      RunError: the workdir is in use by another writer, or not writable.
    """
    check_request(request)
    replicas = _replicas(request, RunInfo.from_config(read_config(workdir).to_dict()).num_replicas)
    checkpoints = dict(io.list_checkpoints(workdir))
    steps = select_steps(sorted(checkpoints), request.steps, workdir)
    runs.check_workdir(workdir)
    with runs.WorkdirLock(workdir, "analysis"):
        runs.clean_temporaries(workdir)
        return _analyse_locked(workdir, request, replicas, checkpoints, steps)


def _analyse_locked(workdir, request, replicas, checkpoints, steps) -> dict:
    registry = load_all()
    per_replica = str(request.replica) == "all"
    # an analysis' directory under analysis/ and its summary key
    where = lambda name, replica: f"{name}/replica_{replica}" if per_replica else name  # noqa: E731
    digests = {name: runs.settings_digest(request.settings.get(name, {})) for name in request.names}
    labels = {where(name, r): name for name in request.names for r in replicas}
    stale = {label: _held_settings(workdir, label, digests[name]) for label, name in labels.items()}
    refused = {label: held for label, held in stale.items() if held is not None}
    runs.agree_on_resume(workdir, [int(label in refused) for label in labels])  # multi-process: all read, then 0 writes
    if refused and not request.overwrite:
        label, held = next(iter(refused.items()))
        raise AnalysisError(
            f"{workdir}/analysis/{label} holds results computed with other settings ({held} -> "
            f"{json.dumps(request.settings.get(labels[label], {}), sort_keys=True)}); pass --overwrite to "
            "recompute them with the new settings (its old results are deleted), or ask for the old ones")
    updates: dict = {}
    failures: list[str] = []
    for label, name in labels.items():
        if label in refused:  # --overwrite with new settings: no step of the directory keeps the old ones
            for path in glob.glob(os.path.join(workdir, "analysis", label, "step_*.npz")):
                io.remove(path)
        io.write_json(os.path.join(workdir, "analysis", label, SETTINGS_FILE),
                      {"analysis": name, "settings": request.settings.get(name, {}), "digest": digests[name]},
                      digest=True)
    batch_size = request.batch_size or auto_batch_size()
    run, like = load_run(workdir)
    info = RunInfo.from_config(run.config, workdir)

    def reusable(label, step) -> bool:
        """A verified artifact with the requested settings exists (its scalars go to the summary)."""
        scalars = None if request.overwrite else _stored_scalars(_artifact(workdir, label, step), digests[labels[label]])
        if scalars is not None:
            updates.setdefault(label, {})[str(step)] = scalars
        return scalars is not None

    chunk = _balanced(len(steps), max(1, batch_size // len(replicas)))  # steps per chunk
    group = _balanced(chunk * len(replicas), batch_size)  # items per batched call
    pending = {name: [(step, r) for step in steps for r in replicas if not reusable(where(name, r), step)]
               for name in request.names}
    progress = {name: Progress(f"{name}: item", len(items)) for name, items in pending.items()}
    for name, items in pending.items():
        logging.info("%s: %d of %d (checkpoint, replica) items to compute, the others are on disk", name,
                     len(items), len(steps) * len(replicas))
    for start in range(0, len(steps), chunk):
        todo = {name: [(step, r) for step, r in items if step in steps[start:start + chunk]]
                for name, items in pending.items()}
        runs.agree_on_resume(workdir, [len(items) for items in todo.values()])  # the same batched calls everywhere
        params = {}
        for step in sorted({step for items in todo.values() for step, _ in items}):
            try:
                state = io.load_checkpoint(checkpoints[step], like)
            except io.CorruptCheckpoint as err:
                logging.warning("skipping step %d: %s", step, err)
                failures.append(f"step {step}: {err}")
                continue
            for r in replicas:
                params[step, r] = jax.tree_util.tree_map(jax.numpy.asarray, take_replica(state.params, r))
        for name, items in todo.items():
            ctxs = [_context(run, info, params[step, r], step, r, request.settings.get(name, {}))
                    for step, r in items if (step, r) in params]
            size = group if registry[name].batch_fn is not None else 1
            progress[name].total -= len(items) - len(ctxs)  # items of unreadable checkpoints are not done
            for i in range(0, len(ctxs), size):
                tic = time.time()
                done = _analyse(registry[name], ctxs[i:i + size], run.seed, size)
                progress[name].update(len(done), time.time() - tic,
                                      f" (step {', '.join(str(ctx.step) for ctx, _ in done)})")
                for ctx, result in done:
                    label = where(name, ctx.replica)
                    if isinstance(result, str):
                        failures.append(f"{label} at step {ctx.step}: {result}")
                        continue
                    io.save_arrays(_artifact(workdir, label, ctx.step), result, meta={"settings": digests[name]})
                    updates.setdefault(label, {})[str(ctx.step)] = _scalars(result)
        _merge_summary(workdir, updates, cleared=refused)
    for label, name in labels.items():
        failures += _plot(workdir, label, registry[name].plot_fn, checkpoints)
    return _merge_summary(workdir, updates, cleared=refused, failures=failures)


def _context(run, info: RunInfo, params, step: int, replica: int, settings: dict) -> Context:
    """The Context of one (checkpoint, replica) of `run` (`sme.config.Run`) for one analysis's settings."""
    return Context(model=run.model, dataset=run.dataset, loss=run.loss, mask_mode=run.mask_mode, lr=run.lr,
                   params=params, step=step, seed=run.seed, replica=replica, settings=dict(settings),
                   run_config=run.config, workdir=info.workdir, run=info)


def _stored_scalars(path: str, digest: str) -> dict | None:
    """The scalars of the artifact at `path` when it verifies and was computed with the settings of
    `digest`, else None (an invalid or stale one is reported: it is recomputed)."""
    if not os.path.exists(path):
        return None
    try:
        arrays, meta = io.load_artifact(path)
    except io.CorruptArtifact as err:
        logging.warning("recomputing %s", err)
        return None
    if meta.get("settings") != digest:
        logging.warning("recomputing %s: computed with other settings", path)
        return None
    return _scalars(arrays)


def _plot(workdir: str, label: str, plot_fn, checkpoints: dict) -> list[str]:
    """Run an analysis's plot function over its artifacts in ``analysis/<label>`` (process 0 only);
    returns the failure, if any, as a one-item list."""
    done = sorted(s for s in checkpoints if os.path.exists(_artifact(workdir, label, s)))
    if plot_fn is None or not done or not distributed.is_writer():
        return []
    try:
        plot_fn(os.path.join(workdir, "analysis", label), done)
    except Exception as err:
        logging.error("plot of %s failed:\n%s", label, traceback.format_exc())
        return [f"plot of {label}: {type(err).__name__}: {err}"]
    return []


def _held_settings(workdir: str, label: str, digest: str) -> str | None:
    """None when ``analysis/<label>`` may serve ``digest`` (its manifest has it, or it holds no
    results); else the settings it holds, as JSON text for the message."""
    directory = os.path.join(workdir, "analysis", label)
    if not glob.glob(os.path.join(directory, "step_*.npz")):
        return None
    path = os.path.join(directory, SETTINGS_FILE)
    try:
        manifest = io.read_json(path)
    except FileNotFoundError:
        return "unrecorded settings"  # results from before settings were recorded
    except io.CorruptArtifact as err:
        logging.warning("%s", err)
        return "unknown settings (settings.json is corrupt)"
    if manifest.get("digest") == digest:
        return None
    return json.dumps(manifest.get("settings"), sort_keys=True)


def read_summary(workdir: str) -> dict:
    """The verified ``analysis/summary.json`` ({} when absent); a corrupt one is reported and rebuilt
    from the verified artifacts on disk."""
    path = os.path.join(workdir, "analysis", SUMMARY_FILE)
    if not os.path.exists(path):
        return {}
    try:
        return io.read_json(path)
    except io.CorruptArtifact as err:
        logging.warning("rebuilding %s from the artifacts", err)
        return rebuild_summary(workdir)


def rebuild_summary(workdir: str) -> dict:
    """{label: {step: scalars}} from every verified ``analysis/<label>/step_<N>.npz``."""
    root = os.path.join(workdir, "analysis")
    summary: dict = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "step_*.npz"), recursive=True)):
        label = os.path.relpath(os.path.dirname(path), root)
        try:
            arrays = io.load_arrays(path, require_digest=True)
        except io.CorruptArtifact as err:
            logging.warning("left out of the summary: %s", err)
            continue
        summary.setdefault(label, {})[str(int(os.path.basename(path)[5:-4]))] = _scalars(arrays)
    return summary


def _merge_summary(workdir: str, updates: dict, *, cleared=(), failures: list[str] | None = None) -> dict:
    """Read-merge-write of summary.json (under the workdir lock): the ``cleared`` labels' entries are
    dropped, then ``updates`` {label: {step: scalars}} replace those steps; ``failures`` are this
    invocation's."""
    summary = read_summary(workdir)
    summary.pop("failures", None)  # failures are reported per invocation
    for label in cleared:
        summary.pop(label, None)
    for label, entries in updates.items():
        summary.setdefault(label, {}).update(entries)
    if failures:
        summary["failures"] = failures
    io.write_json(os.path.join(workdir, "analysis", SUMMARY_FILE), summary, digest=True)
    return summary


def _balanced(n: int, most: int) -> int:
    """The size of the near-equal parts of ``n`` items in as few parts of at most ``most`` as possible."""
    return -(-n // -(-n // most)) if n else 1


def _analyse(analysis, ctxs: list[Context], seed: int, size: int) -> list[tuple[Context, dict | str]]:
    """(ctx, result, or the error as text) for every context: one batched call padded to ``size``
    items when ``size`` > 1, one at a time otherwise or when the batched call fails (so only the
    failing items are lost)."""
    keys = [rng.analysis_key(seed, analysis.name, ctx.step, replica=ctx.replica) for ctx in ctxs]
    if size > 1:
        tic = time.time()
        pad = size - len(ctxs)
        try:
            results = analysis.batch_fn(ctxs + ctxs[-1:] * pad, keys=keys + keys[-1:] * pad)[:len(ctxs)]
            results = [as_numpy(r) for r in results]
            logging.info("%s steps %s (%d items, %d devices): %.1fs", analysis.name, [c.step for c in ctxs],
                         len(ctxs), jax.device_count(), time.time() - tic)
            return list(zip(ctxs, results))
        except Exception:
            logging.warning("batched %s failed at steps %s; one at a time:\n%s", analysis.name,
                            [c.step for c in ctxs], traceback.format_exc())
    done = []
    for ctx, key in zip(ctxs, keys):
        tic = time.time()
        try:
            done.append((ctx, as_numpy(analysis.fn(ctx, key=key))))
            logging.info("%s step %d: %.1fs", analysis.name, ctx.step, time.time() - tic)
        except Exception as err:  # one failing analysis must not lose the others' results
            logging.error("analysis %s failed at step %d:\n%s", analysis.name, ctx.step, traceback.format_exc())
            done.append((ctx, f"{type(err).__name__}: {err}"))
    return done


def _artifact(workdir: str, name: str, step: int) -> str:
    return os.path.join(workdir, "analysis", name, f"step_{step:09d}.npz")
