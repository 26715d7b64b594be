"""Every registered analysis, through the runner on a tiny run, obeys the registry's contract.

Parametrised by the registry (`sme.analyses.load_all`), so a new analysis is covered without
editing this file: it runs with the tiny settings below if it has some, else with its defaults, on
the trained run unless it reads an SME sweep (``SWEEP``). For each analysis:

(a) deterministic: the same request on two copies of the run writes identical artifacts (bit for
    bit, every key);
(b) batched equals one at a time: ``batch_size=2`` (two checkpoints per vmapped call when the
    analysis has a ``batch_fn``) against ``batch_size=1``, within the float32 re-association
    tolerance justified in tests/test_analyses_batched.py (`assert_same_results`);
(c) its plot function reads only its own artifacts: every file it loads is in its own directory,
    and every key it reads is one its artifact holds (the artifacts are handed over as a dict that
    records reads and fails on any other key); it reads at least one key and writes its figures.
"""

import os

import numpy as np
import pytest

from configs import sme_weak_error, smoke
from sme import driver, io, testing
from sme.analyses import load_all
from sme.analyses.runner import Request, analyse_run
from sme.testing import assert_same_results
from sme.train import loop

N = 60  # training examples the analyses use: seconds, not minutes
SETTINGS = {
    "hessian": dict(order=12, top_k=2, bottom_k=1, num_probes=2, hutchpp_sketch=2, num_examples=N),
    "hessian_modified": dict(order=12, top_k=2, bottom_k=1, num_probes=2, hutchpp_sketch=0, num_masks=2,
                             num_examples=N),
    "hessian_density": dict(num_probes=2, order=8, grid_size=64, num_examples=N),
    "fisher": dict(order=8, top_k=2, num_examples=N),
    "covariance": dict(num_masks=4, top_k=2, sgd_examples=8, decomposition_masks=2, decomposition_examples=8,
                       num_examples=N),
    "alignment": dict(num_masks=4, top_k=3, sgd_examples=6, num_boot=50, lanczos_order=10, num_probes=2,
                      hessian_masks=2, num_examples=N),
    "flatness": dict(num_masks=8, num_components=4, num_boot=50, num_examples=N),
    "trajectory_flatness": dict(num_components=4, num_boot=50, num_examples=N),
    "profile": dict(num_directions=2, num_points=5, num_examples=N),
}
SWEEP = {"weak_error"}  # analyses of an SME sweep's cell files (the checkpoint does not matter)
# Measured at load ~16 on 2 cores (about 10x quiet times): alignment 178 s, fisher 75 s, covariance 60 s,
# hessian 38 s, weak_error 37 s (with its sweep); the others 9-30 s stay in the default tier.
SLOW = {"alignment", "fisher", "covariance", "hessian", "weak_error"}
STEPS = "20,40"  # two checkpoints: one batched call of two items


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """The smoke run shrunk to a 64-8-10 MLP (P = 610) on 100 digits, with trajectory snapshots (steps 40..60)."""
    cfg = smoke.get_config()
    cfg.data.num_train, cfg.model.hidden = 100, (8,)
    cfg.train.snapshot_start, cfg.train.snapshot_every = 40, 2
    workdir = str(tmp_path_factory.mktemp("conformance") / "train")
    loop.run(cfg, workdir)
    return workdir


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """A two-cell SME sweep (p = 0.8, eps = 0.2 and 0.1; order1 and ode1; 40 replicas)."""
    cfg = sme_weak_error.get_config("tiny")
    cfg.sde.variants, cfg.sde.keep_prob_grid, cfg.sde.lr_grid = "order1,ode1", "0.8", "0.2,0.1"
    cfg.sde.num_replicas, cfg.sde.num_batches, cfg.sde.richardson = 40, 4, False
    workdir = str(tmp_path_factory.mktemp("conformance") / "sweep")
    driver.run(cfg, workdir)
    return workdir


_copy = testing.copy_run


class OwnKeys(dict):
    """An artifact that records the keys read and fails on a key it does not hold.

    Membership tests (``key in a``) are how a plot asks whether an optional key is there: they are
    allowed and not counted as reads.
    """

    def __init__(self, arrays: dict, read: set):
        super().__init__(arrays)
        self.read = read

    def __getitem__(self, key):
        if not dict.__contains__(self, key):
            raise AssertionError(f"the plot read {key!r}, which its artifact does not hold")
        self.read.add(key)
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        return self[key] if dict.__contains__(self, key) else default

    def values(self):
        self.read.update(self.keys())
        return dict.values(self)

    def items(self):
        self.read.update(self.keys())
        return dict.items(self)


def _artifacts(workdir: str, name: str) -> dict:
    directory = os.path.join(workdir, "analysis", name)
    return {f: io.load_arrays(os.path.join(directory, f)) for f in sorted(os.listdir(directory))
            if f.startswith("step_") and f.endswith(".npz")}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


@pytest.mark.heavy
@pytest.mark.parametrize("name", _params(sorted(load_all())))
def test_analysis_is_deterministic_batch_invariant_and_plots_its_own_keys(name, request, tmp_path, monkeypatch):
    registry = load_all()
    run = request.getfixturevalue("sweep_run" if name in SWEEP else "train_run")
    steps = "last" if name in SWEEP else STEPS
    settings = {name: SETTINGS.get(name, {})}
    runs = {}
    for label, batch_size in (("one", 1), ("again", 1), ("batched", 2)):
        runs[label] = _copy(run, tmp_path, label)
        summary = analyse_run(runs[label], Request((name,), steps, settings=settings, batch_size=batch_size))
        assert "failures" not in summary, summary.get("failures")
    one = _artifacts(runs["one"], name)
    assert len(one) == len(steps.split(","))
    # (a) the same request twice: the same artifacts, bit for bit
    again = _artifacts(runs["again"], name)
    assert sorted(again) == sorted(one)
    for f, arrays in one.items():
        assert sorted(again[f]) == sorted(arrays), f
        for key, value in arrays.items():
            np.testing.assert_array_equal(again[f][key], value, err_msg=f"{name} {f} {key}")
    # (b) batched equals one at a time (without a batch_fn the runner calls fn either way: exactly)
    batched = _artifacts(runs["batched"], name)
    assert sorted(batched) == sorted(one)
    for f, arrays in one.items():
        if registry[name].batch_fn is not None:
            assert_same_results(arrays, batched[f], err=f"{name} {f}")
        else:
            assert sorted(batched[f]) == sorted(arrays), f
            for key, value in arrays.items():
                np.testing.assert_array_equal(batched[f][key], value, err_msg=f"{name} {f} {key}")
    # (c) the plot reads only files of its own directory and keys its artifacts hold
    plot_fn = registry[name].plot_fn
    if plot_fn is None:
        return
    directory = os.path.join(runs["one"], "analysis", name)
    for f in os.listdir(directory):
        if f.endswith(".png"):
            os.remove(os.path.join(directory, f))
    read, paths = set(), []
    real_load = io.load_arrays

    def recording_load(path, **kwargs):
        paths.append(os.path.abspath(path))
        return OwnKeys(real_load(path, **kwargs), read)

    monkeypatch.setattr(io, "load_arrays", recording_load)
    artifact_steps = sorted(int(f[5:-4]) for f in one)
    written = plot_fn(directory, artifact_steps)
    assert paths and all(os.path.dirname(p) == os.path.abspath(directory) for p in paths), paths
    held = set().union(*(set(a) for a in one.values()))
    assert read and read <= held, sorted(read - held)
    assert written and all(os.path.exists(p) and os.path.dirname(os.path.abspath(p)) == os.path.abspath(directory)
                           for p in written), written


def test_own_keys_records_reads_and_fails_on_keys_the_artifact_does_not_hold():
    read = set()
    a = OwnKeys({"x": 1, "y": 2}, read)
    assert a["x"] == 1 and a.get("z") is None and "y" in a and read == {"x"}  # membership is not a read
    with pytest.raises(AssertionError, match="'z'"):
        a["z"]
    list(a.items())
    assert read == {"x", "y"}
