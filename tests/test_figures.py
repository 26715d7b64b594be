"""Every analysis' figure is drawn from its written artifact, for one checkpoint and for several.

Artifacts come from the analyses themselves on a tiny net (two checkpoints = two parameter draws);
the plot functions read them from disk (never recompute). A figure must exist, be a real image
(> 1 kB), and be saved at >= 120 dpi.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from PIL import Image

from sme import io, models
from sme.analyses import Context, as_numpy, load_all
from sme.data import Dataset

pytestmark = pytest.mark.slow  # nine analyses, each computed three times and compiled: ~15-30 s each on 2 cores

SETTINGS = {
    "hessian": dict(order=10, top_k=3, bottom_k=2, num_probes=4, hutchpp_sketch=2),
    "hessian_modified": dict(order=10, top_k=3, bottom_k=1, num_probes=4, hutchpp_sketch=0),
    "hessian_density": dict(order=10, num_probes=2, grid_size=64),
    "fisher": dict(order=8, top_k=2),
    "covariance": dict(num_masks=6, top_k=3, decomposition_masks=2),
    "alignment": dict(num_masks=6, top_k=3, sgd_examples=6, num_boot=50),
    "flatness": dict(num_masks=12, num_components=5, num_boot=50, sensitivity_components="4,5"),
    "trajectory_flatness": dict(num_components=5, num_boot=50, sensitivity_components="4,5",
                                sensitivity_max_trend="0.5,1.0"),
    "profile": dict(num_directions=2, num_points=5),
}


def _context(workdir, step, name):
    model = models.make_model("mlp", in_dim=3, hidden=(4, 3), out_dim=2, keep_prob=0.7, activation="tanh",
                              dropout_layers=(1,))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3)).astype(np.float32)
    y = (np.tanh(x[:, :2]) + 0.3).astype(np.float32)
    params = model.init(jax.random.key(step + 1), dtype=jnp.float32)
    return Context(model=model, dataset=Dataset(x, y, x[:4], y[:4], 0, "toy"), loss="mse", mask_mode="shared",
                   lr=0.1, params=params, step=step, seed=0, replica=0, settings=SETTINGS[name],
                   run_config={"train": {"batch_size": 4}}, workdir=str(workdir))


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_figure_from_artifacts_one_and_many_checkpoints(tmp_path, name):
    analysis = load_all()[name]
    flat = np.asarray(ravel_pytree(_context(tmp_path, 0, name).params)[0])
    noise = np.random.default_rng(1).normal(size=(30, flat.size)) * np.geomspace(1e-1, 1e-3, flat.size)
    np.savez(tmp_path / "snapshots.npz", params=(flat + noise).astype(np.float32))
    steps = (0, 10, 100)
    for step in steps:
        out = as_numpy(analysis.fn(_context(tmp_path, step, name), key=jax.random.key(step)))
        io.save_arrays(str(tmp_path / "analysis" / f"step_{step:09d}.npz"), out)
    for chosen in ((100,), steps):
        directory = tmp_path / f"plots_{len(chosen)}"
        directory.mkdir()
        for step in steps:
            os.link(tmp_path / "analysis" / f"step_{step:09d}.npz", directory / f"step_{step:09d}.npz")
        written = analysis.plot_fn(str(directory), list(chosen))
        assert written, f"{name}: no figure for steps {chosen}"
        for path in written:
            assert os.path.getsize(path) > 1000
            with Image.open(path) as image:
                assert min(image.info["dpi"]) >= 119.5, (path, image.info["dpi"])
