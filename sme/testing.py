"""Builders for tests: matrices with a prescribed spectrum, tiny problems, CIFAR-format files.

Every builder is deterministic in its ``seed``, so a test that uses one is the same run every
time. Expected values in tests come from what a builder prescribes (a spectrum, an orthogonal
basis) or from dense references, never from the code under test.

Float64 problems need x64 switched on (the ``x64`` fixture of ``tests/conftest.py``):
``dtype=jnp.float64`` would silently be float32 otherwise, which :func:`mlp_problem` refuses.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from sme import dropout, models
from sme.analyses import Context
from sme.data import Dataset
from sme.models import Model
from sme.problem import Problem

# Test spectra of 120 eigenvalues (those of matfree's tests): a linear ramp (small relative
# gaps at the top), a geometric decay, and a flat block then a cliff (two clusters).
SPECTRA = {
    "ramp": np.linspace(120.0, 1.0, 120),
    "geometric": 0.7 ** np.arange(120),
    "flat_then_cliff": np.r_[np.ones(50), np.full(70, 1e-3)],
}


def orthogonal(dim: int, seed: int = 0) -> np.ndarray:
    """A random (dim, dim) orthogonal matrix: Q of the QR of a Gaussian matrix (NumPy, float64)."""
    if dim < 1:
        raise ValueError(f"orthogonal: dim must be >= 1, got {dim}")
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q


def matrix_with_spectrum(eigenvalues, seed: int = 0) -> np.ndarray:
    """The symmetric matrix Q diag(eigenvalues) Q^T for Q = ``orthogonal(len(eigenvalues), seed)``.

    NumPy float64. Its eigenvalues are ``eigenvalues`` up to rounding (~1e-15 relative to the
    largest), and column i of Q is the eigenvector of ``eigenvalues[i]``.
    """
    lam = np.asarray(eigenvalues, np.float64)
    if lam.ndim != 1 or lam.size == 0:
        raise ValueError(f"matrix_with_spectrum: eigenvalues must be a non-empty vector, got shape {lam.shape}")
    q = orthogonal(lam.size, seed)
    return (q * lam) @ q.T


def quadratic(dim: int, seed: int = 0, loss0: float = 0.3, *, low: float = 0.05, high: float = 20.0):
    """L(theta) = 1/2 theta^T A theta + loss0 with A's eigenvalues geometric in [low, high].

    Returns ``(loss_fn, a, q, eigenvalues)`` with ``a = q diag(eigenvalues) q^T`` (NumPy) and
    ``loss_fn`` a JAX function of a flat vector.
    """
    eig = np.geomspace(low, high, dim)
    q = orthogonal(dim, seed)
    a = (q * eig) @ q.T
    a_jax = jnp.asarray(a)
    return (lambda theta: 0.5 * theta @ a_jax @ theta + loss0), a, q, eig


# The model `mlp_problem` builds unless told otherwise (keywords of ``models.make_model``).
MLP_PROBLEM_MODEL = dict(in_dim=3, hidden=(5, 4), out_dim=3, keep_prob=0.7, activation="tanh")


def mlp_problem(name: str = "mlp", *, n: int = 7, targets: str = "normal", seed: int = 1, dtype=jnp.float64,
                **model_kwargs):
    """A tiny built-in ``mlp`` or ``two_layer`` with Gaussian inputs: ``(model, params, x, y)``.

    ``params`` come from ``jax.random.key(seed)``, ``x`` and the targets from keys ``seed + 1``
    and ``seed + 2``. ``targets``: ``"normal"`` (regression), ``"softmax"`` (soft labels, for
    cross-entropy) or ``"one_hot"`` (hard labels). Other keywords go to ``models.make_model``,
    over the defaults `MLP_PROBLEM_MODEL` (in_dim 3, hidden (5, 4), out_dim 3, keep_prob 0.7, tanh).
    """
    model_kwargs = {**MLP_PROBLEM_MODEL, **model_kwargs}
    in_dim, out_dim = model_kwargs["in_dim"], model_kwargs["out_dim"]
    model_kwargs["hidden"] = tuple(model_kwargs["hidden"])
    if targets not in ("normal", "softmax", "one_hot"):
        raise ValueError(f"mlp_problem: targets must be 'normal', 'softmax' or 'one_hot', got {targets!r}")
    if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("mlp_problem: float64 needs x64 switched on (the x64 fixture, or jax.enable_x64(True))")
    model = models.make_model(name, **model_kwargs)
    params = model.init(jax.random.key(seed), dtype=dtype)
    x = jax.random.normal(jax.random.key(seed + 1), (n, in_dim), dtype)
    k = jax.random.key(seed + 2)
    if targets == "normal":
        y = jax.random.normal(k, (n, out_dim), dtype)
    elif targets == "softmax":
        y = jax.nn.softmax(jax.random.normal(k, (n, out_dim), dtype))
    else:
        y = jax.nn.one_hot(jax.random.randint(k, (n,), 0, out_dim), out_dim, dtype=dtype)
    return model, params, x, y


def two_layer_problem(keep_prob: float = 0.6, *, in_dim: int = 2, width: int = 3, n: int = 5, seed: int = 1,
                      dtype=jnp.float64):
    """The papers' two-layer net (tanh hidden layer with dropout, no biases, scalar output): ``(model, params, x, y)``."""
    return mlp_problem("two_layer", in_dim=in_dim, hidden=(width,), out_dim=1, n=n, keep_prob=keep_prob,
                       seed=seed, dtype=dtype)


# --------------------------------------------------------------------------- CIFAR binary files


def cifar_images(n: int, offset: int) -> np.ndarray:
    """Distinct uint8 images: pixel (r, c, ch) of image i = (7r + 3c + 50ch + 11(i + offset)) mod 256."""
    i, r, c, ch = np.meshgrid(np.arange(n) + offset, np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return ((7 * r + 3 * c + 50 * ch + 11 * i) % 256).astype(np.uint8)


def cifar_record(image, labels) -> bytes:
    """One record as the CIFAR page describes it: label byte(s), then the R, G, B planes, rows in order."""
    out = bytearray(labels)
    for ch in range(3):
        for r in range(32):
            for c in range(32):
                out.append(int(image[r, c, ch]))
    return bytes(out)


def write_cifar_file(path: str, images, labels) -> None:
    """Write one CIFAR binary file: ``labels[i]`` is the list of label bytes of ``images[i]``."""
    with open(path, "wb") as f:
        for image, label in zip(images, labels):
            f.write(cifar_record(image, label))


def write_cifar10(directory: str, per_batch: int = 2, num_test: int = 3) -> dict:
    """The five CIFAR-10 training batches and the test batch, tiny; returns {split: (images, labels)}."""
    os.makedirs(directory, exist_ok=True)
    truth = {"train": [], "test": []}
    for b in range(1, 6):
        images, labels = cifar_images(per_batch, 10 * b), [(b + k) % 10 for k in range(per_batch)]
        write_cifar_file(os.path.join(directory, f"data_batch_{b}.bin"), images, [[lab] for lab in labels])
        truth["train"].append((images, labels))
    images, labels = cifar_images(num_test, 100), [k % 10 for k in range(num_test)]
    write_cifar_file(os.path.join(directory, "test_batch.bin"), images, [[lab] for lab in labels])
    truth["test"].append((images, labels))
    return {k: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])) for k, v in truth.items()}


# --- analysis contexts (the curvature and noise analyses' tests and the batched/conformance checks) ---

def curvature_model(keep_prob: float = 0.7):
    """The 3-5-2 tanh MLP of the curvature-analysis tests."""
    return models.make_model("mlp", in_dim=3, hidden=(5,), out_dim=2, activation="tanh", keep_prob=keep_prob)


@functools.lru_cache(maxsize=None)
def _curvature_params(seed, dtype):  # shapes do not depend on keep_prob; one compilation for all contexts
    return jax.jit(curvature_model().init, static_argnums=1)(jax.random.key(seed), dtype)


def curvature_context(*, loss="mse", keep_prob=0.7, settings=None, dtype=jnp.float32, seed=0, **overrides):
    """An analysis Context on 20 toy points for `curvature_model` (params from ``seed``)."""
    model = curvature_model(keep_prob)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3)).astype(np.float32)
    if loss == "cross_entropy":
        y = np.eye(2, dtype=np.float32)[(x[:, 0] > 0).astype(int)]
    else:
        y = (np.tanh(x[:, :2]) + 0.3).astype(np.float32)
    fields = dict(model=model, dataset=Dataset(x, y, x, y, 0, "toy"), loss=loss, mask_mode="shared", lr=0.1,
                  params=_curvature_params(seed, jnp.dtype(dtype)), step=0, seed=0,
                  replica=0, settings=settings or {}, run_config={})
    fields.update(overrides)
    return Context(**fields)


def noise_context(*, loss="mse", name="mlp", mode="per_sample", settings=None, step=0, params_seed=1):
    """A float64 analysis Context on 12 toy points (a 3-4-3-2 MLP, or the two-layer net) for the noise analyses."""
    kwargs = dict(in_dim=3, hidden=(4, 3), out_dim=2, keep_prob=0.7, activation="tanh")
    if name == "two_layer":
        kwargs = dict(in_dim=3, hidden=(4,), out_dim=1, keep_prob=0.7)
    model = models.make_model(name, **kwargs)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3))
    y = rng.normal(size=(12, model.out_dim))
    if loss == "cross_entropy":
        y = np.eye(model.out_dim)[rng.integers(0, model.out_dim, 12)]
    dataset = Dataset(x, y, x[:4], y[:4], model.out_dim if loss == "cross_entropy" else 0, "toy")
    params = model.init(jax.random.key(params_seed), dtype=jnp.float64)
    return Context(model=model, dataset=dataset, loss=loss, mask_mode=mode, lr=0.1, params=params, step=step,
                   seed=0, replica=0, settings=dict(settings or {}), run_config={"train": {"batch_size": 4}})


def assert_same_results(one, many, *, err=""):
    """Every key equal: strings and integers exactly, floats to rtol 1e-4 (atol 1e-4 of the key's scale;
    Lanczos residuals, rounding noise near 1e-7 of the spectrum, against the spectrum's scale): the
    tolerance of batched-vs-one-at-a-time float32 analyses, whose reductions differ in order."""
    assert set(one) == set(many), err
    spectrum = max([float(np.max(np.abs(v), initial=0.0)) for k, v in one.items()
                    if k.endswith(("_values", "_eigenvalues", "nodes"))] or [1.0])
    for k, a in one.items():
        b = many[k]
        if a.dtype.kind != "f":
            np.testing.assert_array_equal(b, a, err_msg=f"{err} {k}")
            continue
        scale = spectrum if k.endswith("residuals") else float(np.max(np.abs(a), initial=0.0))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * scale, err_msg=f"{err} {k}")


def copy_run(run: str, tmp_path, name: str) -> str:
    """A copy of the run directory ``run`` as ``tmp_path/name`` without its ``analysis/`` folder."""
    out = str(tmp_path / name)
    shutil.copytree(run, out)
    shutil.rmtree(os.path.join(out, "analysis"), ignore_errors=True)
    return out


# --- dropout linear regression: the SDE tests' exactly solvable problem ---

@dataclasses.dataclass(frozen=True)
class _LinearSpec:  # the spec of `linear_dropout_model`
    in_dim: int
    out_dim: int = 1


def linear_dropout_model(dim: int, keep_prob: float) -> Model:
    """f(x; eta) = sum_j theta_j eta_j x_j: dropout on the inputs of a linear readout."""
    sites = (dropout.Site("inputs", (dim,), keep_prob),)
    init = lambda key, dtype=jnp.float32: {"w": jnp.zeros((dim, 1), dtype)}
    apply = lambda params, x, masks: (x * masks[0]) @ params["w"]
    return Model(_LinearSpec(dim), sites, init, apply, lambda params, x, masks: x, lambda params: params["w"])


def linear_problem(keep_prob=0.5):
    """Dropout linear regression on 6 points in 3-d (`linear_dropout_model`, MSE, shared masks)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 3))
    y = x @ np.array([1.0, -1.0, 0.5]) + 0.3 * rng.normal(size=6)
    return Problem(linear_dropout_model(3, keep_prob), "mse", "shared", jnp.asarray(x),
                             jnp.asarray(y[:, None]))
