"""Flax NNX models with explicit dropout masks, as `sme` models.

The NNX counterpart of `sme.flax_models`: a module whose dropout layers are
`Dropout` (this module's, holding its mask in a `Mask` variable, not
`flax.nnx.Dropout`, whose masks are hidden random draws) becomes an
`sme.models.Model` with `from_nnx`. NNX layers are built with their shapes, so
`Dropout` takes the per-example shape of the activation it masks. Sites are the
`Dropout` layers in the order of their paths in the module (the order of
`nnx.split`'s state), named by those paths.

``apply(params, x, masks)`` splits nothing at call time: the graph definition and
the parameter layout are fixed once, and each call merges them with the given
parameters and masks (`nnx.merge`), so it jits and vmaps like the built-in models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sme.dropout import Site
from sme.models import Model


class Mask(nnx.Variable):
    """The variable type of explicit dropout masks (kept apart from nnx.Param)."""


class Dropout(nnx.Module):
    """Explicit-mask dropout: ``h * eta`` with eta the layer's `Mask` (one example's shape, batch axis 1)."""

    def __init__(self, shape: tuple[int, ...], keep_prob: float = 1.0):
        if not 0.0 < keep_prob <= 1.0:
            raise ValueError(f"Dropout keep_prob={keep_prob} must be in (0, 1]")
        self.keep_prob = float(keep_prob)
        self.eta = Mask(jnp.ones((1, *shape)))

    def __call__(self, h: jax.Array) -> jax.Array:
        return h * self.eta[...]


@dataclasses.dataclass(frozen=True)
class NnxSpec:
    """A wrapped NNX model: ``module`` is the factory ``make(rngs) -> nnx.Module``; fields as `FlaxSpec`."""

    module: Callable[[nnx.Rngs], nnx.Module]
    input_shape: tuple[int, ...]
    out_dim: int
    keep_prob: float = 1.0
    selected: tuple[int, ...] = ()


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def from_nnx(make: Callable[[nnx.Rngs], nnx.Module], input_shape: tuple[int, ...]) -> Model:
    """Wrap an NNX module factory as an `sme` `Model`.

    Args:
      make: ``make(rngs) -> module``; the module maps (1, *input_shape) to (1, out_dim) and
        uses `Dropout` for its dropout (no flax.nnx.Dropout, no BatchNorm or other state
        besides parameters and masks).
      input_shape: one example's shape; `apply` takes it flattened.

    Returns:
      A `Model`; its ``penultimate``/``readout`` raise (the closed-form R_1 needs
      `sme.flax_models` or the built-in models). Cost: one module construction.
    """
    input_shape = tuple(int(s) for s in input_shape)
    module = make(nnx.Rngs(0))
    nodes = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Dropout):
            raise ValueError(f"{type(module).__name__} uses flax.nnx.Dropout at {'/'.join(map(str, path))}; "
                             "use sme.flax_nnx.Dropout, whose masks are explicit arguments")
        if isinstance(node, Dropout):
            nodes[tuple(str(p) for p in path)] = node
    graphdef, _, masks_state, rest = nnx.split(module, nnx.Param, Mask, ...)
    if jax.tree_util.tree_leaves(rest):
        raise ValueError(f"{type(module).__name__} keeps state besides parameters and masks "
                         f"({sorted(set(type(v).__name__ for v in jax.tree_util.tree_leaves(rest, is_leaf=lambda v: isinstance(v, nnx.Variable))))}); "
                         "an sme model is a pure function of (params, x, masks)")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(masks_state)
    sites = []
    for path, leaf in leaves:
        names = tuple(_key_name(k) for k in path)
        owner = next((names[:i] for i in range(len(names), -1, -1) if names[:i] in nodes), None)
        if owner is None:
            raise ValueError(f"mask variable at {'/'.join(names)} is not in an sme.flax_nnx.Dropout layer")
        sites.append(Site("/".join(owner), tuple(leaf.shape[1:]), nodes[owner].keep_prob))
    sites = tuple(sites)
    droppable = tuple(i for i, s in enumerate(sites) if s.droppable) or tuple(range(len(sites)))

    def init(key, dtype=jnp.float32):
        params = nnx.split(make(nnx.Rngs(key)), nnx.Param, Mask, ...)[1]
        return jax.tree_util.tree_map(lambda a: a.astype(dtype), params)

    def apply(params, x, masks):
        state = jax.tree_util.tree_unflatten(treedef, [m[None] for m in masks])
        return nnx.merge(graphdef, params, state, rest)(x.reshape(1, *input_shape))[0]

    out_shape = jax.eval_shape(lambda: apply(init(jax.random.key(0)), jnp.zeros(input_shape),
                                             tuple(jnp.ones(s.shape) for s in sites))).shape
    if len(out_shape) != 1:
        raise ValueError(f"{type(module).__name__} returns shape {out_shape} per example; expected (out_dim,)")

    def no_closed_form(*args: Any):
        raise ValueError("the closed-form R_1 (penultimate/readout) is not available for NNX models; "
                         "use sme.flax_models (linen) or a built-in model")

    spec = NnxSpec(make, input_shape, int(out_shape[0]), min((s.keep_prob for s in sites), default=1.0), droppable)
    return Model(spec, sites, init, apply, no_closed_form, no_closed_form)
