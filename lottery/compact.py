"""Structured compaction: a physically smaller flax model computing what a masked one computes.

A *unit* is an output neuron of a Dense layer or an output channel of a Conv. The masked network
does not need a unit when
  * every weight reading it is zero (no outputs): it is dropped;
  * every weight feeding it is zero (no inputs): it then outputs a constant, relu of its bias
    (through its batch norm's running averages when it has one). The constant is folded into the
    bias of the Dense layer that reads it (max pools, the flatten and the mean pool keep a
    constant constant) and the unit is dropped. A zero-padded conv sees a constant channel
    differently at the border, so a unit with a non-zero constant that a conv reads is kept.
Dropping a unit drops the matching inputs of the layers reading it (for conv -> flatten -> dense,
rows (h * W + w) * C + c of the dense kernel for channel c), which can free more units: this
repeats until nothing changes. Output classes and input features are never removed.

Supported (the registry's sequential models): LeNet300100, ConvNet (Conv-2/4/6), VGG (batch norm
sliced with its conv), MLP1D (its residual h + relu(fc2(h)) ties unit j of fc1 and fc2: they go
together or not at all) and CNN1D. MLP1D and CNN1D have one width for several layers, so they get
the widest layer's kept count; narrower layers are padded with zero units, which compute exactly 0.
A layer left with no unit keeps one zero unit. Compaction is for inference: batch norm is
evaluated with its running averages (train=False).

ResNet goes through `lottery.groups`: its channels are the coupled groups derived from the traced
model (the stem and every block output of a stage are one group, through the residual adds; each
block's inner conv1/bn1 channels another). A channel of a group is removed when nothing reads it
(every reader's input rows zero), which is what `lottery.groups.expand` makes of a removed channel;
then every member goes (producer filters, batch norm scale, bias, mean and var, readers' rows).
No constant is folded here: a ResNet mask that zeroes a conv's filters but not the rows that read
them leaves its batch norm's constant beta - mean * gamma / sqrt(var + eps) in use, and that
channel stays. A group left with nothing read keeps one channel (its readers' rows are zero). The
result is a `SlimResNet`: ResNet's layers and names with a width per stage and per block.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lottery import groups as groups_lib, masks, models

PyTree = Any
SUPPORTED = ("LeNet300100", "ConvNet", "VGG", "MLP1D", "CNN1D", "ResNet")
BN_EPSILON = 1e-5  # lottery.models._bn
BN_MOMENTUM = 0.9


class Compacted(NamedTuple):
    """The smaller model, its variables, and the original indices of the units each layer kept."""

    model: nn.Module
    variables: dict
    kept: dict[str, np.ndarray]  # layer -> indices into its original units (padding excluded)
    widths: dict[str, int]  # layer -> units in the compacted model (padding included)
    original: dict[str, int]  # layer -> units before compaction


class _Signal(NamedTuple):
    """One activation indexed by a space's units: the sum of relu(layer output) of `sources`."""

    sources: tuple[str, ...]
    readers: tuple[str, ...]  # layers whose inputs are this activation (flattened or pooled)


class _Space(NamedTuple):
    """A set of units shared by `producers` (their output axis) and read through `signals`."""

    producers: tuple[str, ...]
    signals: tuple[_Signal, ...]


class _Spec(NamedTuple):
    kinds: dict[str, str]  # layer -> 'dense' | 'conv', every layer with a kernel
    norms: dict[str, str]  # conv layer -> the batch norm applied to its output
    spaces: tuple[_Space, ...]
    rebuild: Callable[[list[int]], dict]  # widths of the spaces -> module field updates
    shared: bool  # one module field sets every space's width


def _chain(kinds: dict[str, str]) -> tuple[_Space, ...]:
    """Spaces of a plain chain: each layer but the last is read by the next one."""
    names = list(kinds)
    return tuple(_Space((a,), (_Signal((a,), (b,)),)) for a, b in zip(names, names[1:]))


def _with_widths(plan, widths) -> tuple:
    """`plan` with its conv widths replaced, in order, by `widths` ('M' entries unchanged)."""
    it = iter(widths)
    return tuple(s if s == "M" else next(it) for s in plan)


def _spec(model: nn.Module, params: PyTree) -> _Spec:
    """The layers, unit spaces and width fields of a supported registry model."""
    if isinstance(model, models.LeNet300100):
        kinds = {f"fc{i}": "dense" for i in range(1, len(model.hidden) + 1)} | {"out": "dense"}
        return _Spec(kinds, {}, _chain(kinds), lambda w: {"hidden": tuple(w)}, False)
    if isinstance(model, models.ConvNet):
        n_conv = sum(1 for s in model.plan if s != "M")
        kinds = ({f"conv{i}": "conv" for i in range(1, n_conv + 1)}
                 | {f"fc{i}": "dense" for i in range(1, len(model.hidden) + 1)} | {"out": "dense"})
        return _Spec(kinds, {}, _chain(kinds), lambda w: {
            "plan": _with_widths(model.plan, w[:n_conv]), "hidden": tuple(w[n_conv:])}, False)
    if isinstance(model, models.VGG):
        n_conv = sum(1 for s in model.plan if s != "M")
        kinds = {f"conv{i}": "conv" for i in range(1, n_conv + 1)} | {"out": "dense"}
        norms = {f"conv{i}": f"bn{i}" for i in range(1, n_conv + 1)}
        return _Spec(kinds, norms, _chain(kinds),
                     lambda w: {"plan": _with_widths(model.plan, w)}, False)
    if isinstance(model, models.MLP1D):
        kinds = {"fc1": "dense", "fc2": "dense", "out": "dense"}
        if model.residual:  # h1 = relu(fc1); h2 = h1 + relu(fc2(h1)); out(h2)
            spaces = (_Space(("fc1", "fc2"), (_Signal(("fc1",), ("fc2",)),
                                              _Signal(("fc1", "fc2"), ("out",)))),)
        else:
            spaces = _chain(kinds)
        return _Spec(kinds, {}, spaces, lambda w: {"hidden": w[0]}, True)
    if isinstance(model, models.CNN1D):
        kinds = {f"conv{i}": "conv" for i in range(1, len(model.kernels) + 1)} | {"out": "dense"}
        return _Spec(kinds, {}, _chain(kinds), lambda w: {"channels": w[0]}, True)
    raise ValueError(f"cannot compact model {type(model).__name__}: compaction supports the "
                     f"lottery.models modules {', '.join(SUPPORTED)} (sequential Dense/Conv "
                     f"chains with optional BatchNorm, and ResNet); for another model, "
                     f"lottery.groups.take slices its variables by channel groups and the model "
                     f"must be rebuilt with the new widths by hand")


def _check_layers(spec: _Spec, params: PyTree, batch_stats: PyTree, name: str) -> None:
    """ValueError naming the first layer path the spec does not describe."""
    what = ("compaction supports Dense and Conv layers with 'kernel' and 'bias', and BatchNorm "
            "with 'scale' and 'bias' (running 'mean' and 'var' in batch_stats)")
    expected = {**{k: ("kernel", "bias") for k in spec.kinds},
                **{b: ("bias", "scale") for b in spec.norms.values()}}
    for layer in params:
        if layer not in expected:
            raise ValueError(f"params layer {layer!r} is not part of {name} as compaction knows "
                             f"it (layers {sorted(expected)}); {what}")
    for layer, leaves in expected.items():
        got = tuple(sorted(params.get(layer, {}))) if layer in params else None
        if got != tuple(sorted(leaves)):
            raise ValueError(f"params layer {layer!r} has leaves {got}, expected "
                             f"{tuple(sorted(leaves))}; {what}")
        if layer in spec.kinds:
            nd = np.ndim(params[layer]["kernel"])
            if (spec.kinds[layer] == "dense") != (nd == 2) or nd < 2:
                raise ValueError(f"params layer {layer!r}: a {spec.kinds[layer]} kernel, got "
                                 f"ndim {nd}; {what}")
    for bn in spec.norms.values():
        got = tuple(sorted(batch_stats.get(bn, {}))) if hasattr(batch_stats, "get") else ()
        if got != ("mean", "var"):
            raise ValueError(f"batch_stats layer {bn!r} has leaves {got}, expected "
                             f"('mean', 'var'); {what}")


# ----------------------------------------------------------------------------------------------
# The removal pass, on a mutable numpy copy: p[layer][leaf], s[bn][mean|var].


def _view(kernel: np.ndarray, width: int, positions: int) -> np.ndarray:
    """A reader's kernel as (positions, width, out): conv (kernel pixels, in, out); dense after a
    channels-last flatten (spatial positions, channels, out)."""
    return kernel.reshape(positions, width, kernel.shape[-1])


def _unview(view: np.ndarray, shape: tuple) -> np.ndarray:
    """Back to a kernel of `shape` with the new number of input units (inverse of `_view`)."""
    positions, width, out = view.shape
    if len(shape) > 2:
        return view.reshape(*shape[:-2], width, out)
    return view.reshape(positions * width, out)


def _constant(p, s, spec: _Spec, layer: str, width: int) -> np.ndarray:
    """Per unit of `layer`: relu of its constant output when all its inputs are zero, else NaN."""
    k = p[layer]["kernel"]
    dead = ~np.any(k.reshape(-1, width) != 0, axis=0)
    v = p[layer]["bias"].astype(np.float64)
    if layer in spec.norms:
        bn = spec.norms[layer]
        v = ((v - s[bn]["mean"]) / np.sqrt(s[bn]["var"].astype(np.float64) + BN_EPSILON)
             * p[bn]["scale"] + p[bn]["bias"])
    return np.where(dead, np.maximum(v, 0.0), np.nan)


def _removable(p, s, spec, space, width, positions) -> np.ndarray:
    """Units no reader needs: each reader sees zero weights or a constant it can absorb."""
    ok = np.ones(width, bool)
    for sig in space.signals:
        const = sum(_constant(p, s, spec, src, width) for src in sig.sources)
        for r in sig.readers:
            view = _view(p[r]["kernel"], width, positions[r])
            unread = ~np.any(view != 0, axis=(0, 2))
            foldable = np.isfinite(const) & ((spec.kinds[r] == "dense") | (const == 0))
            ok &= unread | foldable
    return ok


def _fold(p, s, spec, space, width, positions, remove: np.ndarray) -> None:
    """Add the constants of the removed units, times their weights, to the Dense readers' biases."""
    for sig in space.signals:
        const = sum(_constant(p, s, spec, src, width) for src in sig.sources)
        a = np.where(remove & np.isfinite(const), const, 0.0)
        for r in sig.readers:
            if spec.kinds[r] == "dense" and np.any(a):
                view = _view(p[r]["kernel"], width, positions[r]).astype(np.float64)
                p[r]["bias"] = (p[r]["bias"] + np.einsum("pco,c->o", view, a)).astype(
                    p[r]["bias"].dtype)


def _readers(space: _Space) -> list[str]:
    return list(dict.fromkeys(r for sig in space.signals for r in sig.readers))


def _take(p, s, spec, space, width, positions, keep: np.ndarray) -> None:
    """Keep units `keep` (indices) of the producers, their norms, and the readers' inputs."""
    for layer in space.producers:
        p[layer] = {k: v[..., keep] for k, v in p[layer].items()}
        if layer in spec.norms:
            bn = spec.norms[layer]
            p[bn] = {k: v[keep] for k, v in p[bn].items()}
            s[bn] = {k: v[keep] for k, v in s[bn].items()}
    for r in _readers(space):
        k = p[r]["kernel"]
        p[r]["kernel"] = _unview(_view(k, width, positions[r])[:, keep, :], k.shape)


def _pad(p, s, spec, space, width, positions, extra: int) -> None:
    """Append `extra` zero units (zero weights and bias, batch norm mapping 0 to 0)."""
    if extra <= 0:
        return
    for layer in space.producers:
        p[layer] = {k: np.concatenate([v, np.zeros((*v.shape[:-1], extra), v.dtype)], -1)
                    for k, v in p[layer].items()}
        if layer in spec.norms:
            bn = spec.norms[layer]
            fill = {"scale": 0.0, "bias": 0.0, "mean": 0.0, "var": 1.0}
            p[bn] = {k: np.concatenate([v, np.full(extra, fill[k], v.dtype)]) for k, v in
                     p[bn].items()}
            s[bn] = {k: np.concatenate([v, np.full(extra, fill[k], v.dtype)]) for k, v in
                     s[bn].items()}
    for r in _readers(space):
        k = p[r]["kernel"]
        view = _view(k, width, positions[r])
        zeros = np.zeros((view.shape[0], extra, view.shape[2]), k.dtype)
        p[r]["kernel"] = _unview(np.concatenate([view, zeros], 1), k.shape)


def _positions(p, spec: _Spec) -> dict[str, int]:
    """Per reader: kernel pixels (conv) or flattened spatial positions (dense) per input unit."""
    out = {}
    for space in spec.spaces:
        width = p[space.producers[0]]["kernel"].shape[-1]
        for r in _readers(space):
            k = p[r]["kernel"]
            rows = int(np.prod(k.shape[:-1]))
            if rows % width:
                raise ValueError(f"params layer {r!r}: its {rows} inputs are not a multiple of "
                                 f"the {width} units of {space.producers[0]!r}")
            out[r] = rows // width
    return out


def compact(model: nn.Module, variables: dict, mask: PyTree | None = None) -> Compacted:
    """The smaller model of the same class (a `SlimResNet` for a ResNet), with the units the
    masked network does not need removed.

    `variables` are the model's ('params' and, for VGG and ResNet, 'batch_stats'); `mask` a bool
    pytree like the params (None: exact zeros in the params are the pruned weights). The compacted
    model's outputs equal `model.apply(masked variables, x, train=False)` up to float rounding.
    Raises ValueError if nothing can be removed, or for a model or layer it does not support.
    """
    if not hasattr(variables, "keys") or "params" not in variables:
        raise ValueError("variables must be the model's variable dict with a 'params' entry "
                         "(as returned by model.init)")
    params = variables["params"]
    if mask is not None:
        masks.check(mask, params)
        params = jax.tree.map(lambda p, m: np.where(np.asarray(m, bool), np.asarray(p), 0)
                              .astype(np.asarray(p).dtype), params, mask)
    if isinstance(model, (models.ResNet, SlimResNet)):
        return _compact_resnet(model, variables, params)
    spec = _spec(model, params)
    batch_stats = variables.get("batch_stats", {})
    _check_layers(spec, params, batch_stats, type(model).__name__)
    p = {k: {n: np.asarray(v) for n, v in d.items()} for k, d in params.items()}
    s = {k: {n: np.asarray(v) for n, v in d.items()} for k, d in batch_stats.items()}
    positions = _positions(p, spec)
    original = [p[sp.producers[0]]["kernel"].shape[-1] for sp in spec.spaces]
    index = [np.arange(w) for w in original]
    changed = True
    while changed:
        changed = False
        for i, space in enumerate(spec.spaces):
            width = len(index[i])
            if width == 0:
                continue
            remove = _removable(p, s, spec, space, width, positions)
            if remove.any():
                _fold(p, s, spec, space, width, positions, remove)
                _take(p, s, spec, space, width, positions, np.flatnonzero(~remove))
                index[i] = index[i][~remove]
                changed = True
    kept = [len(ix) for ix in index]
    if kept == original:
        raise ValueError(
            f"no removable unit in {type(model).__name__}: every unit of layers "
            f"{[sp.producers for sp in spec.spaces]} has non-zero input and output weights "
            f"(or a non-zero constant output read by a conv); compaction needs a mask that "
            f"zeroes whole units (e.g. lottery.prune.units_to_density), use lottery.sparse for "
            f"unstructured masks")
    widths = [max(1, *kept)] * len(kept) if spec.shared else [max(1, k) for k in kept]
    for space, w, k in zip(spec.spaces, widths, kept):
        _pad(p, s, spec, space, k, positions, w - k)
    new_model = model.clone(**spec.rebuild(widths))
    new_vars = {"params": jax.tree.map(jnp.asarray, p)}
    if s:
        new_vars["batch_stats"] = jax.tree.map(jnp.asarray, s)
    names = [sp.producers for sp in spec.spaces]
    return Compacted(new_model, new_vars,
                     {n: index[i] for i, ps in enumerate(names) for n in ps},
                     {n: widths[i] for i, ps in enumerate(names) for n in ps},
                     {n: original[i] for i, ps in enumerate(names) for n in ps})


def summary(c: Compacted) -> str:
    """One line per compacted layer: original units -> kept units (and zero padding)."""
    lines = []
    for layer, n in c.original.items():
        k, w = len(c.kept[layer]), c.widths[layer]
        pad = f" (+{w - k} zero units)" if w > k else ""
        lines.append(f"{layer}: {n} -> {k} units{pad}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# ResNet, through the channel groups of lottery.groups.


class _SlimBlock(nn.Module):
    """lottery.models.ResBlock with its own inner width (conv1/bn1) and output width."""

    inner: int
    features: int
    stride: int = 1
    projection: bool = False
    bn_init: str = "uniform"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def conv(n, name, stride=1, size=3):
            pad = ((1, 1), (1, 1)) if size == 3 else "VALID"
            return nn.Conv(n, (size, size), strides=(stride, stride), padding=pad, use_bias=False,
                           kernel_init=models.kaiming_normal, name=name)

        def bn(name):
            return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                                epsilon=BN_EPSILON, scale_init=models.BN_SCALE_INITS[self.bn_init],
                                name=name)

        y = nn.relu(bn("bn1")(conv(self.inner, "conv1", self.stride)(x)))
        y = bn("bn2")(conv(self.features, "conv2")(y))
        if self.projection:
            x = bn("shortcut_bn")(conv(self.features, "shortcut_conv", self.stride, 1)(x))
        return nn.relu(y + x)


class SlimResNet(nn.Module):
    """A compacted `lottery.models.ResNet`: the same layers, names and computation, with a width
    per stage (`widths`: the stem and every block output of the stage, one channel group) and per
    block (`inner`: conv1/bn1, stage-major). Projection shortcuts at the start of stages 2 and 3,
    as ResNet. With `widths` (W, 2W, 4W) and every inner width equal to its stage's it has
    exactly ResNet-D's parameters."""

    num_classes: int = 10
    depth: int = 20
    widths: Sequence[int] = (16, 32, 64)
    inner: Sequence[int] = ()
    bn_init: str = "uniform"
    bias_init: str = "torch"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"depth={self.depth}: must be 6n + 2 with n >= 1 (20, 32, 56, ...)")
        n = (self.depth - 2) // 6
        inner = tuple(self.inner) or tuple(w for w in self.widths for _ in range(n))
        if len(self.widths) != 3 or len(inner) != 3 * n:
            raise ValueError(f"SlimResNet(depth={self.depth}) needs 3 stage widths and {3 * n} "
                             f"inner widths, got {tuple(self.widths)} and {inner}")
        x = nn.Conv(self.widths[0], (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=models.kaiming_normal, name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                                 epsilon=BN_EPSILON, scale_init=models.BN_SCALE_INITS[self.bn_init],
                                 name="bn")(x))
        for s in range(3):
            for b in range(n):
                x = _SlimBlock(inner[s * n + b], self.widths[s], 2 if s > 0 and b == 0 else 1,
                               s > 0 and b == 0, self.bn_init, name=f"stage{s + 1}_block{b}")(
                    x, train)
        x = jnp.mean(x, axis=(1, 2))
        bias = (models.torch_default_bias(x.shape[-1]) if self.bias_init == "torch"
                else models.zeros)
        return nn.Dense(self.num_classes, kernel_init=models.kaiming_normal, bias_init=bias,
                        name="out")(x)


MODULES = (SlimResNet,)  # module classes compaction builds, besides lottery.models' own


def _resnet_fields(model: nn.Module) -> tuple[dict, int]:
    """SlimResNet fields of a ResNet or SlimResNet (before compaction) and its blocks per stage."""
    n = (model.depth - 2) // 6
    if isinstance(model, SlimResNet):
        return {"widths": tuple(model.widths), "inner": tuple(model.inner)}, n
    if model.depth < 8 or (model.depth - 2) % 6:
        raise ValueError(f"depth={model.depth}: must be 6n + 2 with n >= 1 (20, 32, 56, ...)")
    widths = tuple(model.width * 2**s for s in range(3))
    return {"widths": widths, "inner": tuple(w for w in widths for _ in range(n))}, n


def _compact_resnet(model: nn.Module, variables: dict, params: PyTree) -> Compacted:
    """Remove the channels of every ResNet group that nothing reads (see the module docstring)."""
    cin = np.shape(params["conv"]["kernel"])[2]
    shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype),
                          dict(variables))
    # ResNet's channel groups do not depend on the spatial size (global mean pool): any will do
    x = jax.ShapeDtypeStruct((1, 32, 32, cin), jnp.float32)
    g = groups_lib.derive(model, shapes, x, train=False)
    unread = groups_lib.unread(g, params)
    if not any(u.any() for u in unread):
        raise ValueError(
            f"no removable channel in {type(model).__name__}: every channel of its "
            f"{len(g)} groups is read by some kernel (a ResNet channel goes when every reader's "
            f"input rows are zero, its batch norm constant otherwise stays in use); prune whole "
            f"groups with lottery.groups (prune, or to_density + expand), or use "
            f"lottery.sparse for unstructured masks")
    keep = [np.flatnonzero(~u) if not u.all() else np.arange(1) for u in unread]
    kept = [np.flatnonzero(~u) for u in unread]
    rest = {k: v for k, v in variables.items() if k != "params"}
    sliced = groups_lib.take(g, {"params": params, **rest}, keep)
    p = sliced["params"]
    fields, n = _resnet_fields(model)
    fields["widths"] = tuple(int(np.shape(p[f"stage{s + 1}_block0"]["conv2"]["kernel"])[-1])
                             for s in range(3))
    fields["inner"] = tuple(int(np.shape(p[f"stage{s + 1}_block{b}"]["conv1"]["kernel"])[-1])
                            for s in range(3) for b in range(n))
    new = SlimResNet(num_classes=model.num_classes, depth=model.depth, bn_init=model.bn_init,
                     bias_init=model.bias_init, **fields)
    want = jax.eval_shape(lambda: models.init(new, jax.random.key(0), (8, 8, cin)))
    got = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype), sliced)
    if jax.tree.map(lambda a: a.shape, dict(want)) != jax.tree.map(lambda a: a.shape, got):
        raise ValueError(f"cannot rebuild {type(model).__name__} from its sliced variables: the "
                         f"channel groups do not match SlimResNet's widths {fields}")
    out = {"params": jax.tree.map(jnp.asarray, p)}
    if "batch_stats" in sliced:
        out["batch_stats"] = jax.tree.map(jnp.asarray, sliced["batch_stats"])
    k_map, w_map, o_map = {}, {}, {}
    for grp, k, kk in zip(g, kept, keep):
        for layer in grp.layers:
            k_map[layer], w_map[layer], o_map[layer] = k, len(kk), grp.size
    return Compacted(new, out, k_map, w_map, o_map)
