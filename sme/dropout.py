"""Dropout masks as explicit data.

Conventions (arXiv 2305.15850 §2, 2207.05952 §2):

* `keep_prob` is the papers' p: a unit is kept with probability p. A mask entry
  is eta = b / p with b ~ Bernoulli(p), so E[eta] = 1 exactly and keep_prob = 1
  gives a mask of ones (no dropout). Frameworks' `rate` is 1 - p; that word is
  never used here.
* A model declares its dropout *sites*: the activations that get multiplied by a
  mask, each with a per-example shape and a keep probability. `masks` is a tuple
  with one array per site, in site order.
* Mask modes: ``shared`` draws one mask for the whole batch (the papers'
  R^drop_S(theta; eta) = (1/n) sum_i l(f(x_i; eta), y_i)); ``per_sample`` draws
  an independent mask per example (what `nn.Dropout` does). E_eta R^drop_S is the
  same under both; the noise covariance is not.

Leading axes are free: ``sample_masks(..., batch_shape=(K,))`` gives K shared
masks, ``batch_shape=(K, n)`` K per-sample mask sets.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

MASK_MODES = ("shared", "per_sample")

# What `enumerate_masks` does at all: 2**20 masks is already ~1e6 forward passes; beyond that
# enumeration is a mistake. (The SME's per-step default is lower: `sme.problem.MAX_EXACT_UNITS`.)
MAX_ENUMERATED_UNITS = 20


@dataclasses.dataclass(frozen=True)
class Site:
    """One dropout site: the activation of per-example `shape` multiplied by a mask."""

    name: str
    shape: tuple[int, ...]
    keep_prob: float

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def droppable(self) -> bool:
        return self.keep_prob < 1.0


Sites = tuple[Site, ...]
Masks = tuple[jax.Array, ...]


def check_mode(mode: str) -> str:
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; expected one of {MASK_MODES}")
    return mode


def mask_shape(mode: str, num_examples: int, *lead) -> tuple:
    """Leading axes of masks in `mode`: ``(*lead,)`` for shared, ``(*lead, num_examples)`` for per_sample.

    ``mask_shape(mode, n)`` is one draw's batch shape (``()`` or ``(n,)``), ``mask_shape(mode, n, K)``
    that of K draws (``(K,)`` or ``(K, n)``); a ``None`` in ``lead`` stands for any size (shape checks).
    """
    return tuple(lead) if check_mode(mode) == "shared" else (*lead, num_examples)


def mask_axis(mode: str) -> int | None:
    """The examples' axis of one draw's masks, as a `vmap` in_axes entry: None (shared) or 0 (per_sample)."""
    return 0 if mask_shape(mode, 1) else None


def sample_masks(sites: Sites, *, key: jax.Array, batch_shape=(), dtype=jnp.float32) -> Masks:
    """Draw masks eta = Bernoulli(p)/p for every site.

    Args:
      sites: the model's dropout sites.
      key: PRNG key; site s uses ``fold_in(key, s)`` so sites never share bits.
      batch_shape: leading axes, e.g. ``(n,)`` for per-sample masks of a batch.
      dtype: floating dtype of the masks.

    Returns:
      A tuple of arrays of shape ``(*batch_shape, *site.shape)``.
    """
    masks = []
    for index, site in enumerate(sites):
        shape = (*batch_shape, *site.shape)
        if not site.droppable:
            masks.append(jnp.ones(shape, dtype))
            continue
        keep = jax.random.bernoulli(jax.random.fold_in(key, index), site.keep_prob, shape)
        masks.append(keep.astype(dtype) / jnp.asarray(site.keep_prob, dtype))
    return tuple(masks)


def ones_masks(sites: Sites, *, batch_shape=(), dtype=jnp.float32) -> Masks:
    """Masks of ones: the deterministic network (no dropout)."""
    return tuple(jnp.ones((*batch_shape, *site.shape), dtype) for site in sites)


def num_droppable_units(sites: Sites) -> int:
    return sum(site.size for site in sites if site.droppable)


def enumerate_masks(sites: Sites, *, dtype=np.float64) -> tuple[Masks, np.ndarray]:
    """Every shared mask with its probability, for tiny nets (the exact oracle).

    Units with keep_prob = 1 are fixed at 1; each of the m droppable units takes
    0 or 1/p, so there are 2**m masks with probabilities p**k (1 - p)**(m - k).

    Returns:
      ``(masks, probs)``: masks with a leading axis of size 2**m, probs of shape (2**m,)
      summing to 1. Both are NumPy arrays (exact float64 by default).
    """
    m = num_droppable_units(sites)
    if m > MAX_ENUMERATED_UNITS:
        raise ValueError(
            f"enumerate_masks: {m} droppable units means 2**{m} masks; "
            f"enumeration is limited to {MAX_ENUMERATED_UNITS} units"
        )
    bits = np.array(list(itertools.product((0, 1), repeat=m)), dtype=np.int64).reshape(2**m, m)
    probs = np.ones(2**m, dtype=np.float64)
    masks, offset = [], 0
    for site in sites:
        if not site.droppable:
            masks.append(np.ones((2**m, *site.shape), dtype))
            continue
        b = bits[:, offset : offset + site.size]
        offset += site.size
        p = site.keep_prob
        probs *= np.prod(np.where(b == 1, p, 1.0 - p), axis=1)
        masks.append((b / p).reshape(2**m, *site.shape).astype(dtype))
    return tuple(masks), probs
