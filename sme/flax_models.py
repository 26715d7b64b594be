"""Flax linen models with explicit dropout masks, as `sme` models.

A Flax module that uses `Dropout` (this module's explicit-mask layer, not
`flax.linen.Dropout`) becomes an `sme.models.Model` with `from_flax`:
``init(key)`` and ``apply(params, x, masks)`` for ONE example, masks as
arguments, one `Site` per `Dropout` layer discovered by tracing the module once
(`jax.eval_shape`, no compute). Every tool that takes a `Model` (losses,
curvature, noise covariance, the SME, training, analyses) then works on it
unchanged.

`Dropout` multiplies its input by the array in the ``masks`` variable
collection (``{"masks": {<path>: {"eta": mask}}}``), so a Flax user can also
call ``module.apply({"params": p, "masks": m}, x)`` directly. Masks follow
`sme.dropout`: eta = Bernoulli(p)/p, `keep_prob` p, never a drop rate.

Built-in architectures (the dropout papers train a VGG-9 on CIFAR-10 and a
ResNet-20 on CIFAR-100: arXiv 2207.05952 §A, 2111.01022). Both follow the usual
layouts, with the widths as fields:

* `VGG9`: three blocks of two 3x3 convs and a 2x2 max-pool (channels
  (64, 64, 128, 128, 256, 256)), then dense 512-512 and the readout: 6 conv + 3
  dense layers. Dropout sites: after each block's pool, after each hidden dense.
* `ResNet20`: a 3x3 stem conv, three stages of three basic blocks (16, 32, 64
  channels, stride 2 entering stages 2 and 3; 6 * 3 + 2 = 20 layers), global
  average pool and the readout. GroupNorm replaces BatchNorm: BatchNorm couples
  the examples of a batch and keeps running statistics, so a network using it is
  not a function of one example and its Hessian is not the papers' object.
  Dropout sites: after each stage, and on the pooled features (the readout input).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sme.dropout import Site
from sme.models import ACTIVATIONS, Model

MASKS = "masks"  # the variable collection holding the masks
FLAX_MODEL_NAMES = ("vgg9", "resnet20")


class Dropout(nn.Module):
    """Explicit-mask dropout: ``h * eta`` with eta read from the ``masks`` collection.

    Attributes:
      keep_prob: the papers' p in (0, 1]; 1 makes a site that is never dropped.
    """

    keep_prob: float = 1.0

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        if not 0.0 < self.keep_prob <= 1.0:
            raise ValueError(f"Dropout keep_prob={self.keep_prob} must be in (0, 1]")
        eta = self.variable(MASKS, "eta", jnp.ones, h.shape, h.dtype)
        return h * eta.value


@dataclasses.dataclass(frozen=True)
class FlaxSpec:
    """What a wrapped Flax model is: the module, its per-example input shape, its dropout.

    ``keep_prob`` is the keep probability of the dropout sites ``selected`` (indices into the
    model's sites); the other sites keep everything. The sites, not the module's `Dropout`
    attributes, decide how masks are drawn, so `with_keep_prob` changes p without a new module.
    """

    module: nn.Module
    input_shape: tuple[int, ...]
    out_dim: int
    keep_prob: float = 1.0
    selected: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Trace:
    sites: tuple[Site, ...]
    paths: tuple[tuple[str, ...], ...]
    readout: tuple[str, ...] | None  # path of the final Dense when f = Dense(last dropout output)


def _trace(module: nn.Module, x: jax.Array) -> tuple[_Trace, Any]:
    """Run ``module.init`` abstractly, recording Dropout calls and the final Dense."""
    drops, denses, out_of = [], [], {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        mod = context.module
        if isinstance(mod, nn.Dropout):
            raise ValueError(f"{type(module).__name__} uses flax.linen.Dropout at {'/'.join(mod.scope.path)}; "
                             "use sme.flax_models.Dropout, whose masks are explicit arguments")
        if isinstance(mod, Dropout):
            drops.append((tuple(mod.scope.path), float(mod.keep_prob), args[0].shape, out))
        elif isinstance(mod, nn.Dense):
            denses.append((tuple(mod.scope.path), args[0], out))
        elif mod is not None and not mod.scope.path:
            out_of["root"] = out
        return out

    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
    others = sorted(set(variables) - {"params", MASKS})
    if others:
        raise ValueError(f"{type(module).__name__} keeps variable collections {others}: an sme model is a pure "
                         "function of (params, x, masks); use GroupNorm/LayerNorm rather than BatchNorm")
    paths = [p for p, *_ in drops]
    if len(set(paths)) != len(paths):
        raise ValueError(f"{type(module).__name__}: a Dropout layer is called more than once; "
                         "use one Dropout instance per site")
    sites = []
    for path, keep_prob, shape, _ in drops:
        if shape[:1] != (1,):
            raise ValueError(f"Dropout at {'/'.join(path)}: expected a leading batch axis of 1, got {shape}")
        sites.append(Site("/".join(path), tuple(shape[1:]), keep_prob))
    # f = (eta * h) W + b holds when the last site's output is the final Dense's input and that
    # Dense's output is the network output (identity of the traced arrays: no op in between).
    readout = None
    if drops and denses and denses[-1][1] is drops[-1][3] and denses[-1][2] is out_of.get("root"):
        readout = denses[-1][0]
    return _Trace(tuple(sites), tuple(paths), readout), variables


def _mask_tree(paths, masks) -> dict:
    tree: dict = {}
    for path, mask in zip(paths, masks):
        node = tree
        for name in path:
            node = node.setdefault(name, {})
        node["eta"] = mask[None]
    return tree


def from_flax(module: nn.Module, input_shape: tuple[int, ...]) -> Model:
    """Wrap a Flax linen module that uses `Dropout` as an `sme` `Model`.

    The module is called on a batch of one example of shape ``(1, *input_shape)``
    and must return logits of shape ``(1, out_dim)``; its dropout sites are its
    `Dropout` layers in call order, named by their module paths.

    Args:
      module: the Flax module (no BatchNorm or other mutable state, no
        `flax.linen.Dropout`; each `Dropout` instance called once).
      input_shape: one example's shape, e.g. (32, 32, 3); `apply` takes the
        flattened example (prod(input_shape),) like the built-in models.

    Returns:
      A `Model` whose ``penultimate``/``readout`` exist when the last `Dropout`
      feeds the final `nn.Dense` directly (the closed-form R_1 structure);
      otherwise they raise ValueError naming why. Cost: one abstract trace.
    """
    input_shape = tuple(int(s) for s in input_shape)
    trace, variables = _trace(module, jnp.zeros((1, *input_shape), jnp.float32))
    out_shape = jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1, *input_shape))), variables).shape
    if len(out_shape) != 2 or out_shape[0] != 1:
        raise ValueError(f"{type(module).__name__} returns shape {out_shape} for one example; expected (1, out_dim)")
    # The sites a changed keep_prob applies to: the dropped ones, or every Dropout layer of a net
    # built without dropout (keep_prob 1 everywhere), measured on its dropout twin's loss.
    droppable = tuple(i for i, s in enumerate(trace.sites) if s.droppable) or tuple(range(len(trace.sites)))
    spec = FlaxSpec(module, input_shape, int(out_shape[1]),
                    min((s.keep_prob for s in trace.sites), default=1.0), droppable)

    def init(key, dtype=jnp.float32):
        params = module.init(key, jnp.zeros((1, *input_shape), dtype))["params"]
        return jax.tree_util.tree_map(lambda a: a.astype(dtype), params)

    def apply(params, x, masks):
        variables = {"params": params, MASKS: _mask_tree(trace.paths, masks)}
        return module.apply(variables, x.reshape(1, *input_shape))[0]

    def _need_readout():
        if trace.readout is None:
            raise ValueError(f"{type(module).__name__}: the closed-form R_1 needs the last Dropout's output to be "
                             "the input of the final nn.Dense, whose output is the network output")

    def penultimate(params, x, masks):
        _need_readout()
        captured = []

        def capture(next_fun, args, kwargs, context):
            if isinstance(context.module, Dropout) and tuple(context.module.scope.path) == trace.paths[-1]:
                captured.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(capture):
            apply(params, x, masks)
        return captured[0][0]

    def readout(params):
        _need_readout()
        node = params
        for name in trace.readout:
            node = node[name]
        return node["kernel"]

    return Model(spec, trace.sites, init, apply, penultimate, readout)


def with_keep_prob(model: Model, keep_prob: float) -> Model:
    """The same wrapped Flax model with keep probability `keep_prob` on its selected dropout sites."""
    if not model.spec.selected:
        raise ValueError(f"{type(model.spec.module).__name__} has no dropout sites selected to set keep_prob on")
    sites = tuple(dataclasses.replace(s, keep_prob=float(keep_prob)) if i in model.spec.selected else s
                  for i, s in enumerate(model.sites))
    return model._replace(spec=dataclasses.replace(model.spec, keep_prob=float(keep_prob)), sites=sites)


# --------------------------------------------------------------------------- architectures


def _kernel_init(gain: float, scale: float) -> Callable:
    # He (gain 2) / LeCun (gain 1) normal with std scale * sqrt(gain / fan_in), as sme.models.
    return nn.initializers.variance_scaling(gain * scale**2, "fan_in", "normal")


def _gain(activation: str) -> float:
    return 2.0 if activation in ("relu", "gelu", "softplus") else 1.0


class VGG9(nn.Module):
    """VGG-9: [conv3x3 -> act -> conv3x3 -> act -> maxpool2 -> Dropout] * 3, [dense -> act -> Dropout] * 2, dense.

    Attributes:
      out_dim: classes.
      keep_probs: one keep probability per site (blocks, then hidden dense layers).
      channels: conv widths, two per block.
      hidden: hidden dense widths.
      activation: a name from `sme.models.ACTIVATIONS`.
      init_scale: multiplies the He/LeCun init std.
    """

    out_dim: int
    keep_probs: tuple[float, ...]
    channels: tuple[int, ...] = (64, 64, 128, 128, 256, 256)
    hidden: tuple[int, ...] = (512, 512)
    activation: str = "relu"
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        act, init = ACTIVATIONS[self.activation], _kernel_init(_gain(self.activation), self.init_scale)
        h, site = x, 0
        for block in range(len(self.channels) // 2):
            for c in self.channels[2 * block: 2 * block + 2]:
                h = act(nn.Conv(c, (3, 3), padding="SAME", kernel_init=init)(h))
            h = Dropout(self.keep_probs[site])(nn.max_pool(h, (2, 2), strides=(2, 2)))
            site += 1
        h = h.reshape(h.shape[0], -1)
        for width in self.hidden:
            h = Dropout(self.keep_probs[site])(act(nn.Dense(width, kernel_init=init)(h)))
            site += 1
        return nn.Dense(self.out_dim, kernel_init=_kernel_init(1.0, self.init_scale))(h)


class _BasicBlock(nn.Module):
    channels: int
    stride: int
    activation: str
    init_scale: float

    @nn.compact
    def __call__(self, x):
        act, init = ACTIVATIONS[self.activation], _kernel_init(_gain(self.activation), self.init_scale)
        norm = lambda: nn.GroupNorm(num_groups=math.gcd(self.channels, 8))
        s = (self.stride, self.stride)
        h = act(norm()(nn.Conv(self.channels, (3, 3), s, padding="SAME", use_bias=False, kernel_init=init)(x)))
        h = norm()(nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False, kernel_init=init)(h))
        if self.stride != 1 or x.shape[-1] != self.channels:  # projection shortcut
            x = norm()(nn.Conv(self.channels, (1, 1), s, use_bias=False, kernel_init=init)(x))
        return act(h + x)


class ResNet20(nn.Module):
    """ResNet-20 (GroupNorm): stem conv, [3 basic blocks -> Dropout] per stage, average pool, Dropout, dense.

    Attributes:
      out_dim: classes.
      keep_probs: one keep probability per site (stages, then the pooled features).
      channels: widths of the stages (16, 32, 64); stages after the first halve the resolution.
      blocks_per_stage: 3 gives ResNet-20 (6n + 2 layers).
      activation: a name from `sme.models.ACTIVATIONS`.
      init_scale: multiplies the He/LeCun init std.
    """

    out_dim: int
    keep_probs: tuple[float, ...]
    channels: tuple[int, ...] = (16, 32, 64)
    blocks_per_stage: int = 3
    activation: str = "relu"
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        act, init = ACTIVATIONS[self.activation], _kernel_init(_gain(self.activation), self.init_scale)
        h = nn.Conv(self.channels[0], (3, 3), padding="SAME", use_bias=False, kernel_init=init)(x)
        h = act(nn.GroupNorm(num_groups=math.gcd(self.channels[0], 8))(h))
        for stage, c in enumerate(self.channels):
            for block in range(self.blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                h = _BasicBlock(c, stride, self.activation, self.init_scale)(h)
            h = Dropout(self.keep_probs[stage])(h)
        h = Dropout(self.keep_probs[-1])(jnp.mean(h, axis=(1, 2)))
        return nn.Dense(self.out_dim, kernel_init=_kernel_init(1.0, self.init_scale))(h)


def num_sites(name: str, num_channels: int, num_hidden: int) -> int:
    """Dropout sites of a built-in Flax architecture with these many conv and hidden widths."""
    if name == "vgg9":
        return num_channels // 2 + num_hidden
    if name == "resnet20":
        return num_channels + 1
    raise ValueError(f"unknown Flax model {name!r}; expected one of {FLAX_MODEL_NAMES}")


@dataclasses.dataclass(frozen=True)
class FlaxNet:
    """A built-in Flax architecture as `make_flax_model` builds it.

    ``name``: ``vgg9`` or ``resnet20``; ``input_shape`` (height, width, channels) of one example;
    ``channels``: two widths per VGG block, one per ResNet stage; ``hidden``: VGG dense widths;
    ``keep_prob`` on the sites ``dropout_layers`` indexes (None: all); ``init_scale`` multiplies
    the kernels' initial standard deviation.
    """

    name: str
    input_shape: tuple
    out_dim: int
    channels: tuple
    hidden: tuple = ()
    keep_prob: float = 1.0
    dropout_layers: tuple | None = None
    activation: str = "relu"
    init_scale: float = 1.0


def make_flax_model(name: str, **options) -> Model:
    """Build ``vgg9`` or ``resnet20`` as an sme `Model`; ``options`` are the other fields of `FlaxNet`
    (input_shape, out_dim and channels required; `dropout_layers` indexes the sites, None: all).

    Cost: one abstract trace of the module (no compute).
    """
    return build_flax_model(FlaxNet(name, **options))


def build_flax_model(net: FlaxNet) -> Model:
    """The sme `Model` of a `FlaxNet` (see `make_flax_model`)."""
    name, dropout_layers, keep_prob, activation = net.name, net.dropout_layers, net.keep_prob, net.activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {tuple(ACTIVATIONS)}")
    channels, hidden = tuple(int(c) for c in net.channels), tuple(int(w) for w in net.hidden)
    if name == "vgg9" and (not channels or len(channels) % 2):
        raise ValueError(f"vgg9: channels {channels} must hold two widths per block")
    if name == "resnet20" and not channels:
        raise ValueError("resnet20: channels must hold one width per stage")
    count = num_sites(name, len(channels), len(hidden))
    bad = [i for i in (dropout_layers or ()) if not 0 <= i < count]
    if bad:
        raise ValueError(f"dropout_layers {tuple(dropout_layers)}: {bad} out of range for {count} sites")
    keep_probs = tuple(float(keep_prob) if dropout_layers is None or i in dropout_layers else 1.0
                       for i in range(count))
    if name == "vgg9":
        module = VGG9(net.out_dim, keep_probs, channels, hidden, activation, float(net.init_scale))
    else:
        module = ResNet20(net.out_dim, keep_probs, channels, 3, activation, float(net.init_scale))
    model = from_flax(module, tuple(net.input_shape))
    selected = tuple(range(count)) if dropout_layers is None else tuple(sorted(dropout_layers))
    return model._replace(spec=dataclasses.replace(model.spec, keep_prob=float(keep_prob), selected=selected))
