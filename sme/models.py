"""Pure-function models whose dropout masks are arguments.

Every model is a `Model`: ``init(key) -> params`` and ``apply(params, x, masks)``
for ONE example ``x`` (a flat vector; CNNs reshape it). Batches, replicas and
mask ensembles are all made by `jax.vmap` at the call site. ``masks`` is a tuple
with one array per dropout site (see `sme.dropout`), already scaled by 1/p.

Models:

* ``mlp``: x -> [dense -> act -> (dropout)] * L -> dense, with dropout sites
  chosen per hidden layer. The papers' two-layer theory net
  f(x) = sum_k a_k eta_k sigma(w_k . x) (arXiv 2305.15850 §3) is ``two_layer``:
  an mlp with one hidden layer, dropout on it, and optional biases.
* ``cnn``: [conv3x3 -> act -> maxpool2 -> (dropout)] * C -> flatten ->
  [dense -> act -> (dropout)] * L -> dense.

For the closed-form modified loss (arXiv 2207.05952 Lemma 1) a model also
exposes ``penultimate(params, x, masks)``, the last hidden activation h(x)
before the final dropout site, and ``readout(params)``, the last layer's weight
W^[L] of shape (h_dim, out_dim), so that f = (eta * h) @ W^[L] + b.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from sme.dropout import Site, mask_axis

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "linear": lambda z: z,
}
# He gain for layers followed by a rectifier, 1 otherwise (LeCun) and for the
# linear readout: keeps the forward variance O(1).
_GAINS = {"relu": 2.0, "gelu": 2.0, "softplus": 2.0}

MODEL_NAMES = ("mlp", "two_layer", "cnn", "vgg9", "resnet20")  # the last two: sme.flax_models


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """A fully connected net. ``dropout_layers`` indexes hidden layers (None: all)."""

    in_dim: int
    hidden: tuple[int, ...]
    out_dim: int
    activation: str = "relu"
    use_bias: bool = True
    output_bias: bool = True
    keep_prob: float = 1.0
    dropout_layers: tuple[int, ...] | None = None
    init_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class CNNSpec:
    """A small CNN on (height, width, channels) inputs passed flat.

    Dropout sites are numbered: conv blocks first (after pooling), then dense
    hidden layers; ``dropout_layers`` selects among them (None: all).
    """

    input_shape: tuple[int, int, int]
    channels: tuple[int, ...]
    hidden: tuple[int, ...]
    out_dim: int
    activation: str = "relu"
    keep_prob: float = 1.0
    dropout_layers: tuple[int, ...] | None = None
    init_scale: float = 1.0


class Model(NamedTuple):
    spec: Any
    sites: tuple[Site, ...]
    init: Callable[..., Any]  # init(key, dtype=float32) -> params
    apply: Callable[..., jax.Array]  # apply(params, x, masks) -> (out_dim,)
    penultimate: Callable[..., jax.Array]  # penultimate(params, x, masks) -> (h_dim,)
    readout: Callable[[Any], jax.Array]  # readout(params) -> (h_dim, out_dim)

    # Compared and hashed by (spec, sites): equal specs build equal functions, so a model can be a
    # static argument of `jax.jit` and models of one architecture share compilations.
    def __hash__(self):
        return hash((self.spec, self.sites))

    def __eq__(self, other):
        return isinstance(other, Model) and (self.spec, self.sites) == (other.spec, other.sites)

    def __ne__(self, other):
        return not self == other

    @property
    def out_dim(self) -> int:
        return self.spec.out_dim

    @property
    def only_last_layer_dropout(self) -> bool:
        """True when no site but the final one (the readout's input) is droppable."""
        droppable = [i for i, s in enumerate(self.sites) if s.droppable]
        return droppable in ([], [len(self.sites) - 1])


def _dense_init(key, fan_in, fan_out, *, gain, scale, bias, dtype):
    std = scale * math.sqrt(gain / fan_in)
    layer = {"w": std * jax.random.normal(key, (fan_in, fan_out), dtype)}
    if bias:
        layer["b"] = jnp.zeros((fan_out,), dtype)
    return layer


def _dense(layer, h):
    out = h @ layer["w"]
    return out + layer["b"] if "b" in layer else out


def _selected(index: int, selection) -> bool:
    return selection is None or index in selection


def _check_selection(selection, num_sites: int, what: str):
    if selection is None:
        return
    bad = [i for i in selection if not 0 <= i < num_sites]
    if bad:
        raise ValueError(f"dropout_layers {tuple(selection)}: {bad} out of range for {num_sites} {what}")


def make_mlp(spec: MLPSpec) -> Model:
    if spec.activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {spec.activation!r}; expected one of {tuple(ACTIVATIONS)}")
    _check_selection(spec.dropout_layers, len(spec.hidden), "hidden layers")
    act = ACTIVATIONS[spec.activation]
    gain = _GAINS.get(spec.activation, 1.0)
    sites = tuple(
        Site(f"hidden_{i}", (width,), spec.keep_prob if _selected(i, spec.dropout_layers) else 1.0)
        for i, width in enumerate(spec.hidden)
    )
    dims = (spec.in_dim, *spec.hidden)

    def init(key, dtype=jnp.float32):
        keys = jax.random.split(key, len(spec.hidden) + 1)
        hidden = [
            _dense_init(keys[i], dims[i], dims[i + 1], gain=gain,
                        scale=spec.init_scale, bias=spec.use_bias, dtype=dtype)
            for i in range(len(spec.hidden))
        ]
        out = _dense_init(keys[-1], dims[-1], spec.out_dim, gain=1.0, scale=spec.init_scale,
                          bias=spec.output_bias, dtype=dtype)
        return {"hidden": hidden, "out": out}

    def penultimate(params, x, masks):
        h = x
        last = len(spec.hidden) - 1
        for i, layer in enumerate(params["hidden"]):
            h = act(_dense(layer, h))
            if i < last:
                h = h * masks[i]
        return h

    def apply(params, x, masks):
        return _dense(params["out"], penultimate(params, x, masks) * masks[-1])

    return Model(spec, sites, init, apply, penultimate, lambda params: params["out"]["w"])


def mlp_forward_with_taps(spec: MLPSpec, params, x, masks, taps):
    """The MLP forward pass with `taps` added to every dense layer's pre-activation.

    Equal to ``make_mlp(spec).apply(params, x, masks)`` when the taps are zero;
    differentiating the loss with respect to zero taps gives each layer's
    backpropagated error delta = dl/dz, and a dense layer's weight gradient is
    the outer product ``inputs[l] (x) delta[l]`` (per-sample Gram matrices in
    `sme.grads.per_sample_gram` use this).

    Args:
      spec: the MLP's spec.
      params: its parameters.
      x: one example, shape (in_dim,).
      masks: one example's masks (one array per site).
      taps: one array per dense layer (hidden layers, then the readout), shaped
        like that layer's output: ``(*spec.hidden, spec.out_dim)``.

    Returns:
      ``(out, inputs)``: the output (out_dim,) and a tuple with each dense
      layer's input (after its dropout mask), shapes ``(in_dim, *spec.hidden)``.
    """
    act = ACTIVATIONS[spec.activation]
    h, inputs = x, []
    for i, layer in enumerate(params["hidden"]):
        inputs.append(h)
        h = act(_dense(layer, h) + taps[i]) * masks[i]
    inputs.append(h)
    return _dense(params["out"], h) + taps[-1], tuple(inputs)


def first_droppable_site(spec: MLPSpec) -> int:
    """Index of the first hidden layer whose output is masked (len(hidden) when none is)."""
    if spec.keep_prob >= 1.0:
        return len(spec.hidden)
    return min((i for i in range(len(spec.hidden)) if _selected(i, spec.dropout_layers)), default=len(spec.hidden))


def mlp_mask_outputs(spec: MLPSpec, params, x, masks, *, shared: bool) -> jax.Array:
    """Outputs of the MLP on a batch under K mask sets, sharing what the masks cannot change.

    Layers before the first droppable site run once for the whole batch (with dropout on the
    one hidden layer, the first layer's pre-activation x W_1 and its activation). Shared masks
    are folded into the next layer's weights, (h * eta_k) W = h (eta_k * W): at the first site
    the K masks make ONE GEMM (n, d) x (d, K o), later ones a batched matmul over the mask axis
    (K x (n, d) x (d, o)), and the reverse pass forms dW from mask-weighted errors summed over
    the n examples inside each GEMM and over K after it (sum_k eta_k * dW_k), never per-mask
    outer products. Per-sample masks multiply the activations, (K, n, d), and every later layer
    is a batched matmul over K. Masks at sites before the first droppable one are ones by
    construction (`sme.dropout.sample_masks`, `enumerate_masks`) and are not read.

    Args:
      spec: the MLP's spec.
      params: its parameters.
      x: (n, in_dim) examples.
      masks: one array per site with leading K: (K, *site) when ``shared``, else (K, n, *site).
      shared: whether one mask set applies to every example.

    Returns:
      (K, n, out_dim), equal to ``vmap_k vmap_i apply(params, x_i, masks_k(i))``.
      Cost: the prefix once, then K n sum_{l > first} d_l d_{l+1} MACs.
    """
    act = ACTIVATIONS[spec.activation]
    first = first_droppable_site(spec)
    k = masks[0].shape[0]
    layers = (*params["hidden"], params["out"])
    h, pending = x, None  # h: (n, d) before the first droppable site, (K, n, d) after it
    for i, layer in enumerate(layers):
        if pending is not None:  # shared masks (K, d) folded into this layer's weights (d, o)
            w = pending[:, :, None] * layer["w"][None]
            z = jnp.einsum("nd,kdo->kno", h, w) if h.ndim == 2 else jnp.einsum("knd,kdo->kno", h, w)
            z = z + layer["b"] if "b" in layer else z
            pending = None
        else:
            z = _dense(layer, h)
        if i == len(spec.hidden):
            break
        h = act(z)
        if i < first:
            continue
        if shared:
            pending = masks[i]
        else:
            h = (h[None] if h.ndim == 2 else h) * masks[i]
    if z.ndim == 2:  # nothing masked: the same output for every mask set
        return jnp.broadcast_to(z[None], (k, *z.shape))
    return z


def _maxpool2(h):
    return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (2, 2, 1), (2, 2, 1), "VALID")


def make_cnn(spec: CNNSpec) -> Model:
    if spec.activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {spec.activation!r}; expected one of {tuple(ACTIVATIONS)}")
    height, width, chans = spec.input_shape
    shapes = []
    for c in spec.channels:
        height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(f"cnn: input {spec.input_shape} too small for {len(spec.channels)} pooling blocks")
        shapes.append((height, width, c))
    flat_dim = height * width * (spec.channels[-1] if spec.channels else chans)
    num_sites = len(spec.channels) + len(spec.hidden)
    _check_selection(spec.dropout_layers, num_sites, "conv blocks + hidden layers")
    if not spec.hidden:
        raise ValueError("cnn: needs at least one dense hidden layer (the readout input)")
    act = ACTIVATIONS[spec.activation]
    gain = _GAINS.get(spec.activation, 1.0)
    site_shapes = [*shapes, *((w,) for w in spec.hidden)]
    sites = tuple(
        Site(f"site_{i}", shape, spec.keep_prob if _selected(i, spec.dropout_layers) else 1.0)
        for i, shape in enumerate(site_shapes)
    )
    dims = (flat_dim, *spec.hidden)

    def init(key, dtype=jnp.float32):
        keys = jax.random.split(key, num_sites + 1)
        convs, c_in = [], chans
        for i, c in enumerate(spec.channels):
            fan_in = 9 * c_in
            std = spec.init_scale * math.sqrt(gain / fan_in)
            convs.append({"w": std * jax.random.normal(keys[i], (3, 3, c_in, c), dtype),
                          "b": jnp.zeros((c,), dtype)})
            c_in = c
        dense = [
            _dense_init(keys[len(spec.channels) + i], dims[i], dims[i + 1], gain=gain,
                        scale=spec.init_scale, bias=True, dtype=dtype)
            for i in range(len(spec.hidden))
        ]
        out = _dense_init(keys[-1], dims[-1], spec.out_dim, gain=1.0, scale=spec.init_scale,
                          bias=True, dtype=dtype)
        return {"conv": convs, "hidden": dense, "out": out}

    def penultimate(params, x, masks):
        h = x.reshape(spec.input_shape)
        for i, layer in enumerate(params["conv"]):
            h = jax.lax.conv_general_dilated(
                h[None], layer["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]
            h = _maxpool2(act(h + layer["b"])) * masks[i]
        h = h.reshape(-1)
        offset, last = len(spec.channels), len(spec.hidden) - 1
        for i, layer in enumerate(params["hidden"]):
            h = act(_dense(layer, h))
            if i < last:
                h = h * masks[offset + i]
        return h

    def apply(params, x, masks):
        return _dense(params["out"], penultimate(params, x, masks) * masks[-1])

    return Model(spec, sites, init, apply, penultimate, lambda params: params["out"]["w"])


def make_model(name: str, **kwargs) -> Model:
    """Build a model by name: ``mlp``, ``two_layer`` (an mlp with one hidden layer) or ``cnn``."""
    if name == "mlp":
        return make_mlp(MLPSpec(**kwargs))
    if name == "two_layer":
        hidden = kwargs.pop("hidden")
        if len(hidden) != 1:
            raise ValueError(f"two_layer: hidden must have exactly one width, got {hidden}")
        kwargs.setdefault("activation", "tanh")
        kwargs.setdefault("use_bias", False)
        kwargs.setdefault("output_bias", False)
        return make_mlp(MLPSpec(hidden=tuple(hidden), **kwargs))
    if name == "cnn":
        return make_cnn(CNNSpec(**kwargs))
    if name in ("vgg9", "resnet20"):
        raise ValueError(f"{name} is a Flax model: build it with sme.flax_models.make_flax_model")
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")


def batch_apply(model: Model, params, x, masks, *, mode: str) -> jax.Array:
    """Outputs for a batch x of shape (n, ...): masks shared (one set) or per_sample (leading n)."""
    return jax.vmap(model.apply, in_axes=(None, 0, mask_axis(mode)))(params, x, masks)


def num_params(params) -> int:
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
