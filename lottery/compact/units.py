"""Compaction of the registry's sequential models (LeNet300100, ConvNet, VGG, MLP1D, CNN1D) by
units, the cascade of `lottery.compact`'s docstring: a unit (a Dense output neuron or a Conv output
channel) with no outputs is dropped, one with no inputs has its constant folded into the Dense
layer reading it, until nothing changes. `Compacted` is what every compaction returns.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lottery import models
from lottery.models.layers import BN_EPSILON, BN_MOMENTUM  # noqa: F401 - re-exported by compact

PyTree = Any
SUPPORTED = ("LeNet300100", "ConvNet", "VGG", "MLP1D", "CNN1D", "ResNet")


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



def compact_units(model: nn.Module, variables: dict, params: PyTree) -> Compacted:
    """`lottery.compact.compact` of a sequential model; `params` are the masked params."""
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
