"""Channel masks (a tuple of bool vectors, one per group; True = kept) and weight masks:
`init`, `alive` (read back from a weight mask: a channel lives while a producer weight does),
`expand` (to a weight mask with the params' structure that zeroes every params slice of a removed
channel: producer filters, biases, norm scale and bias, consumer input rows; works under jit), and
what compaction uses: `unread` (channels no reader's row touches) and `take` (every member sliced).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lottery import masks
from lottery.groups.structure import Groups, Member

PyTree = Any
Channels = tuple  # one bool (or float score) vector per group



def by_path(tree) -> dict[str, Any]:
    return dict(zip(masks.paths(tree), jax.tree.leaves(tree)))


def check_channels(groups: Groups, channels, what: str = "channels") -> None:
    if len(channels) != len(groups):
        raise ValueError(f"{what} has {len(channels)} entries, the model has {len(groups)} "
                         f"groups ({groups.names})")
    for g, c in zip(groups, channels):
        if tuple(jnp.shape(c)) != (g.size,):
            raise ValueError(f"{what} of group {g.name!r} has shape {tuple(jnp.shape(c))}, "
                             f"expected ({g.size},)")


def init(groups: Groups) -> Channels:
    """All channels kept."""
    return tuple(jnp.ones(g.size, bool) for g in groups)


def channel_slices(leaf, m: Member) -> jax.Array:
    """(channels, everything else) view of a member's slices."""
    x = jnp.moveaxis(jnp.asarray(leaf), m.axis, 0)[m.index.reshape(-1)]
    return x.reshape(m.index.shape[0], -1)


def alive(groups: Groups, mask: PyTree) -> Channels:
    """Per group, the channels some producer weight of which `mask` keeps."""
    return _alive(groups, mask)


@functools.partial(jax.jit, static_argnums=0)
def _alive(groups: Groups, mask: PyTree) -> Channels:
    flat = by_path(mask)
    out = []
    for g in groups:
        acc = jnp.zeros(g.size, bool)
        for m in g.members:
            if m.collection == "params" and m.role == "out":
                acc = acc | jnp.any(channel_slices(flat[m.path], m), axis=1)
        out.append(acc)
    return tuple(out)


def expand(groups: Groups, channels: Channels, mask: PyTree) -> PyTree:
    """`mask` with every params slice of every removed channel set False (producer filters,
    biases, norm scales and biases, readers' input rows). Works under jit."""
    check_channels(groups, channels)
    return _expand(groups, tuple(channels), mask)


@functools.partial(jax.jit, static_argnums=0)
def _expand(groups: Groups, channels: Channels, mask: PyTree) -> PyTree:
    leaves, treedef = jax.tree.flatten(mask)
    index = {p: i for i, p in enumerate(masks.paths(mask))}
    leaves = [jnp.asarray(x, bool) for x in leaves]
    for g, cm in zip(groups, channels):
        cm = jnp.asarray(cm, bool)
        for m in g.members:
            if m.collection != "params":
                continue
            if m.path not in index:
                raise ValueError(f"mask has no leaf {m.path!r} (a member of group {g.name!r})")
            i = index[m.path]
            n = leaves[i].shape[m.axis]
            keep = jnp.ones(n, bool).at[m.index.reshape(-1)].set(
                jnp.repeat(cm, m.index.shape[1]))
            shape = [1] * leaves[i].ndim
            shape[m.axis] = n
            leaves[i] = leaves[i] & keep.reshape(shape)
    return jax.tree.unflatten(treedef, leaves)


def unread(groups: Groups, params: PyTree) -> Channels:
    """Per group, the channels every reader's input rows of which are all zero in `params` (apply
    the mask first): nothing reads them, so removing them does not change the function. A group
    with no kernel reader, or read by an activation contraction, reports none."""
    flat = by_path(params)
    out = []
    for g in groups:
        readers = [m for m in g.members if m.collection == "params" and m.role == "in"]
        if not readers or g.reads_activations:
            out.append(np.zeros(g.size, bool))
            continue
        acc = np.ones(g.size, bool)
        for m in readers:
            acc &= ~np.any(np.asarray(channel_slices(flat[m.path], m)) != 0, axis=1)
        out.append(acc)
    return tuple(out)


def take(groups: Groups, variables: PyTree, keep: Sequence[np.ndarray]) -> PyTree:
    """`variables` (a {'params', 'batch_stats', ...} dict) with only channels `keep[i]` (indices)
    of group i: every member sliced. Numpy leaves out."""
    if len(keep) != len(groups):
        raise ValueError(f"keep has {len(keep)} entries for {len(groups)} groups")
    flat = {c: by_path(t) for c, t in variables.items()}
    drop: dict[tuple, np.ndarray] = {}
    for g, k in zip(groups, keep):
        gone = np.setdiff1d(np.arange(g.size), np.asarray(k, int))
        for m in g.members:
            key = (m.collection, m.path, m.axis)
            if key not in drop:
                drop[key] = np.zeros(np.shape(flat[m.collection][m.path])[m.axis], bool)
            drop[key][m.index[gone].reshape(-1)] = True
    out = {}
    for coll, tree in variables.items():
        def cut(path, x, coll=coll):
            x = np.asarray(x)
            p = masks.path_str(path)
            for axis in range(x.ndim):
                d = drop.get((coll, p, axis))
                if d is not None:
                    x = np.take(x, np.flatnonzero(~d), axis=axis)
            return x
        out[coll] = jax.tree_util.tree_map_with_path(cut, tree)
    return out
