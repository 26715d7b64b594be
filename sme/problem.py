"""The dropout problem bundle and the rules every layer above it shares.

A `Problem` is what the papers call the full-batch dropout problem: the model (with its dropout
sites), the per-example loss, the mask mode and the data. The losses, gradients, curvature, noise,
SME and landscape modules take one: functions written for the loose positional form
``(model, loss, params, x, y, ..., mode=...)`` also accept a Problem (`accepts_problem`), and functions
written for a Problem, ``(problem, params, ...)``, also accept the loose form (`takes_problem`), so no
signature needs more than seven parameters.

Rules written once here:

* `mask_shape` (from `sme.dropout`, re-exported): the leading axes of a mask set — ``shared`` masks
  have none per draw (one set for the batch), ``per_sample`` masks one axis of n (one set per
  example); K draws add a leading K. `mask_axis` is the same rule as a `vmap` axis over the examples.
* `resolve_method`: how L_S and the noise are computed when asked for ``auto``: ``closed_form``
  when L_S = R_S + R_1 holds exactly (MSE, dropout only on the readout input; arXiv 2207.05952,
  Lemma 1), else ``exact`` (all 2**m masks enumerated) up to ``max_units`` droppable units, else
  ``masks`` (Monte Carlo over K masks).
* `draw_masks`: K mask sets from one key.
* `tree_sq_norm`: ||tree||², the sum of squares over a pytree (`optax.tree.norm`).

Two enumeration limits, meaning different things: `sme.dropout.MAX_ENUMERATED_UNITS` (20) is what
`enumerate_masks` can do at all (2**20 masks, ~1e6 forward passes, once); `MAX_EXACT_UNITS` (12) is
the default up to which ``auto`` picks exact enumeration for a computation repeated at every step
(the SME's drift and diffusion: 2**m masks per gradient per Euler-Maruyama substep). The second is a
cost default below the first, and configs may raise it up to the first.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from sme.dropout import (MASK_MODES, MAX_ENUMERATED_UNITS, check_mode, mask_axis, mask_shape, num_droppable_units,
                         sample_masks)
from sme.models import Model

# How L_S and Sigma are computed: the closed form, exact enumeration, or Monte Carlo over K masks.
METHODS = ("closed_form", "exact", "masks")
# ``auto`` enumerates all 2**m masks per step up to this many droppable units (see module docstring).
MAX_EXACT_UNITS = 12

__all__ = ["MASK_MODES", "MAX_ENUMERATED_UNITS", "MAX_EXACT_UNITS", "METHODS", "Problem", "accepts_problem",
           "check_closed_form", "draw_masks", "has_closed_form", "mask_axis", "mask_shape", "resolve_method",
           "takes_problem", "tree_sq_norm"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=("x", "y"), meta_fields=("model", "loss", "mode"))
@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """Full-batch dropout regression/classification: the model, its loss, the mask mode and the data.

    A pytree whose leaves are ``x`` (n, d) and ``y`` (n, out), so jitted functions take it as an
    argument (the data are traced, not baked into the program).
    """

    model: Model
    loss: str
    mode: str
    x: jax.Array
    y: jax.Array

    def __post_init__(self):
        check_mode(self.mode)  # a static field: also checked when jax rebuilds the pytree

    @property
    def num_examples(self) -> int:
        return self.x.shape[0]

    @property
    def num_groups(self) -> int:
        """Independent mask draws per step: 1 (shared) or n (per_sample)."""
        return math.prod(mask_shape(self.mode, self.num_examples))


def tree_sq_norm(tree) -> jax.Array:
    """sum over leaves of sum(leaf²) (``optax.tree.norm(tree, squared=True)``)."""
    return optax.tree.norm(tree, squared=True)


def check_closed_form(model: Model, loss: str) -> None:
    """Raise unless L_S = R_S + R_1 holds exactly (MSE, dropout only on the readout input)."""
    if loss != "mse":
        raise ValueError(f"the closed-form R_1 holds for the mse loss only, not {loss!r}")
    if not model.only_last_layer_dropout:
        raise ValueError(
            "the closed-form R_1 needs dropout on the last hidden layer only "
            f"(sites: {[(s.name, s.keep_prob) for s in model.sites]})")


def has_closed_form(model: Model, loss: str) -> bool:
    """True when `check_closed_form` passes."""
    try:
        check_closed_form(model, loss)
    except ValueError:
        return False
    return True


def resolve_method(model: Model | Problem, loss: str | None = None, *, max_units: int = MAX_EXACT_UNITS) -> str:
    """``auto`` made concrete: 'closed_form' when it holds, else 'exact' when the model has at most
    ``max_units`` droppable units, else 'masks' (one of `METHODS`). Takes a model and loss or a Problem."""
    if isinstance(model, Problem):
        model, loss = model.model, model.loss
    if loss is None:
        raise ValueError("resolve_method needs the loss name (or a Problem)")
    if has_closed_form(model, loss):
        return "closed_form"
    return "exact" if num_droppable_units(model.sites) <= max_units else "masks"


def draw_masks(model: Model | Problem, *, key, num_masks: int, mode: str | None = None,
               num_examples: int | None = None, dtype=None, split_keys: bool = True):
    """K mask draws with leading axes ``mask_shape(mode, n, K)``: (K,) shared, (K, n) per_sample.

    Two streams from the same key, both kept because runs are reproduced from them:

    * ``split_keys=True``: draw k from ``split(key, K)[k]``, so row k does not depend on K's
      chunking (the masks `sme.grads.sampled_mask_gradients` uses);
    * ``split_keys=False``: one `sample_masks` call over the (K, ...) batch (the SME's masks per
      substep, `sme.diffusion.draw_masks`).

    A Problem supplies ``mode``, ``num_examples`` and ``dtype`` (its x's); with a model they are
    arguments (``dtype`` float32 by default).
    """
    if isinstance(model, Problem):
        mode = model.mode if mode is None else mode
        num_examples = model.num_examples if num_examples is None else num_examples
        dtype = model.x.dtype if dtype is None else dtype
        model = model.model
    if mode is None or num_examples is None:
        raise ValueError("draw_masks: mode and num_examples are needed with a model (or pass a Problem)")
    dtype = jnp.float32 if dtype is None else dtype
    if not split_keys:
        return sample_masks(model.sites, key=key, batch_shape=mask_shape(mode, num_examples, num_masks), dtype=dtype)
    batch_shape = mask_shape(mode, num_examples)
    keys = jax.random.split(key, num_masks)
    return jax.vmap(lambda k: sample_masks(model.sites, key=k, batch_shape=batch_shape, dtype=dtype))(keys)


def accepts_problem(fn: Callable) -> Callable:
    """Let ``fn(model, loss, params, x, y, *rest, mode=..., **kw)`` also be called as
    ``fn(problem, params, *rest, **kw)``: the Problem supplies model, loss, x, y and (when ``fn`` takes
    it) the default ``mode``. The positional form is unchanged."""
    takes_mode = "mode" in inspect.signature(fn).parameters

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        if not isinstance(first, Problem):
            return fn(first, *args, **kwargs)
        if not args:
            raise TypeError(f"{fn.__name__}(problem, params, ...): params is missing")
        if takes_mode:
            kwargs.setdefault("mode", first.mode)
        params, *rest = args
        return fn(first.model, first.loss, params, first.x, first.y, *rest, **kwargs)

    return wrapper


def takes_problem(fn: Callable) -> Callable:
    """Let ``fn(problem, params, *rest, **kw)`` also be called in the loose form
    ``fn(model, loss, params, x, y, *rest, mode=..., **kw)``, which builds the Problem.

    The reverse of `accepts_problem`, for functions written for a Problem. With a Problem, a
    ``mode=`` keyword overrides its mask mode (as `accepts_problem` lets it)."""

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        if isinstance(first, Problem):
            if "mode" in kwargs:
                first = dataclasses.replace(first, mode=kwargs.pop("mode"))
            return fn(first, *args, **kwargs)
        if len(args) < 4 or "mode" not in kwargs:
            raise TypeError(f"{fn.__name__}: pass a Problem, or model, loss, params, x, y positionally and mode=")
        loss, params, x, y, *rest = args
        return fn(Problem(first, loss, kwargs.pop("mode"), x, y), params, *rest, **kwargs)

    return wrapper
