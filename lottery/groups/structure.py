"""The groups of one model: `Member` (one slice family), `Group` (channels kept or removed
together), `Groups`, and `derive`, which reads them off the traced model (`of_model`: cached, for
a `lottery.models` module); `summary` prints them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lottery import masks
from lottery.groups.analysis import Analysis, analyze
from lottery.groups.classes import ACT, INPUT, OUTPUT, PRODUCED, GroupError, by_class, positions
from lottery.groups.jaxprs import trace

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
    """One slice family of a group: position `index[c]` along `axis` of a variable is channel c.

    role: 'out' (a kernel's output axis: the channel's producers), 'in' (a kernel's input axis:
    its readers), 'other' (biases, norm scales and running statistics, ...).
    """

    collection: str  # 'params', 'batch_stats', ...
    path: str  # inside the collection, e.g. 'stage1_block0/conv2/kernel'
    axis: int
    role: str
    index: np.ndarray  # (channels, positions per channel)


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
    """Channels kept or removed together: every member loses slice c when channel c goes."""

    name: str  # the first producer layer, '+k' when k more producers share the channels
    size: int
    layers: tuple[str, ...]  # the producer layers (module paths), in computation order
    members: tuple[Member, ...]
    reads_activations: bool = False  # contracted between two activations (attention)

    def describe(self) -> str:
        by = {}
        for m in self.members:
            by.setdefault(m.role, []).append(f"{m.collection}:{m.path}[{m.axis}]"
                                             if m.collection != "params" else
                                             f"{m.path}[{m.axis}]")
        return (f"{self.name}: {self.size} channels; produced by {', '.join(by.get('out', []))}"
                f"; read by {', '.join(by.get('in', [])) or '-'}; also "
                f"{', '.join(by.get('other', [])) or '-'}")


class Groups(Sequence):
    """The groups of one model (a sequence of `Group`), and the produced channel spaces that are
    not groups with the reason (`excluded`). Hashable by identity: a static jit argument."""

    def __init__(self, groups: Sequence[Group], excluded: Sequence[tuple[str, str]] = ()):
        self.groups = tuple(groups)
        self.excluded = tuple(excluded)

    def __getitem__(self, i):
        return self.groups[i]

    def __len__(self) -> int:
        return len(self.groups)

    def __repr__(self) -> str:
        return f"Groups({len(self)} groups: {', '.join(g.name for g in self.groups)})"

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    @property
    def sizes(self) -> list[int]:
        return [g.size for g in self.groups]

    def index(self, pattern: int | str) -> list[int]:
        """Indices of the groups `pattern` names: an index, a group name, a producer layer or a
        regex matched against either."""
        if isinstance(pattern, (int, np.integer)) and not isinstance(pattern, bool):
            if not 0 <= pattern < len(self):
                raise ValueError(f"group index {pattern} out of range (0..{len(self) - 1})")
            return [int(pattern)]
        try:
            hits = [i for i, g in enumerate(self.groups) if any(
                pattern == n or re.fullmatch(pattern, n) for n in (g.name, *g.layers))]
        except re.error:
            hits = [i for i, g in enumerate(self.groups) if pattern in (g.name, *g.layers)]
        if not hits:
            raise ValueError(f"{pattern!r} names no group; groups: {self.names}")
        return hits


def build(an: Analysis, shapes: dict[tuple, tuple]) -> tuple[list[Group], list, list[int]]:
    """Groups, the excluded produced classes, and each group's class, from an analysis."""
    cls = an.cls
    per_class: dict[int, list] = {}
    for key, desc in an.leaf_axes.items():
        for axis, classes in enumerate(desc):
            if not classes:
                continue
            n = shapes[key][axis]
            fail = lambda msg, key=key, axis=axis: GroupError(  # noqa: E731
                f"cannot derive channel groups for {'/'.join(key)} axis {axis}: {msg}")
            for root, labs in by_class(cls.tree(classes), n).items():
                role = an.roles.get((key, axis), ("other", 0))
                per_class.setdefault(root, []).append(
                    (key, axis, role, positions(labs, cls.size[root], fail)))
    groups, excluded, group_roots = [], [], []
    roots = sorted(per_class, key=lambda r: (cls.order.get(r, 1 << 60), r))
    for r in roots:
        flags = cls.flags.get(r, set())
        members = per_class[r]
        producers = sorted((m for m in members if m[2][0] == "out"), key=lambda m: m[2][1])
        if PRODUCED not in flags or not producers:
            continue
        layers = tuple(dict.fromkeys("/".join(m[0][1].split("/")[:-1]) for m in producers))
        name = layers[0] + (f"+{len(layers) - 1}" if len(layers) > 1 else "")
        reason = None
        if OUTPUT in flags:
            reason = "reaches the model output (the classifier's outputs)"
        elif INPUT in flags:
            reason = "is an axis of the model input"
        elif "blocked" in flags:
            reason = "mixed across channels: " + "; ".join(dict.fromkeys(cls.reasons.get(r, [])))
        if reason is not None:
            excluded.append((f"{name} ({cls.size[r]} channels)", reason))
            continue
        ordered = sorted(members, key=lambda m: ({"out": 0, "in": 2}.get(m[2][0], 1), m[2][1]))
        groups.append(Group(
            name=name, size=cls.size[r], layers=layers,
            members=tuple(Member(k[0], k[1], axis, role[0], idx)
                          for k, axis, role, idx in ordered),
            reads_activations=ACT in flags))
        group_roots.append(r)
    return groups, excluded, group_roots


def derive(model: nn.Module | Callable, variables: PyTree, x, **apply_kwargs) -> Groups:
    """The coupled channel groups of `model` (see the module docstring).

    `model`: a flax module, applied as `model.apply(variables, x, **apply_kwargs)` (pass
    `train=False` to the lottery.models zoo), or any function `fn(variables, x)`. `variables`:
    the variable dict ({'params': ..., 'batch_stats': ...}); arrays or `jax.ShapeDtypeStruct`s
    (shapes are all it needs). `x`: an input batch or its ShapeDtypeStruct; the groups are those of
    this input shape. Raises GroupError naming the primitive and layer it cannot follow.
    """
    if not hasattr(variables, "keys"):
        raise ValueError("variables must be the model's variable dict ({'params': ...}), as "
                         "returned by model.init")
    if isinstance(model, nn.Module):
        fn = lambda v, inp: model.apply(v, inp, **apply_kwargs)  # noqa: E731
    elif apply_kwargs:
        raise ValueError("apply_kwargs are for a flax module; bind them into the function")
    else:
        fn = model
    variables = {k: variables[k] for k in variables}
    closed = trace(fn, (variables, x))
    keys = [tuple(p.split("/", 1)) for p in masks.paths(variables)]
    shapes = {k: tuple(np.shape(v)) for k, v in zip(keys, jax.tree.leaves(variables))}
    n_x = len(jax.tree.leaves(x))
    an = analyze(closed, keys + [None] * n_x, [False] * len(keys) + [True] * n_x)
    groups, excluded, _ = build(an, shapes)
    return Groups(groups, excluded)


def of_model(model: nn.Module, variables: PyTree, input_shape: Sequence[int]) -> Groups:
    """`derive` for a `lottery.models`-style module (applied with train=False) on one example of
    `input_shape`, abstractly. Cached per (model, variable shapes, input shape): a run's levels
    share one `Groups`, so the group functions jitted on it compile once."""
    leaves, treedef = jax.tree.flatten(variables)
    shapes = tuple(tuple(np.shape(x)) for x in leaves)
    try:
        hash(model)
    except TypeError:  # a module with an unhashable field: derive it every time
        return _of_model.__wrapped__(model, treedef, shapes, tuple(input_shape))
    return _of_model(model, treedef, shapes, tuple(int(d) for d in input_shape))


@functools.lru_cache(maxsize=32)
def _of_model(model, treedef, shapes, input_shape) -> Groups:
    variables = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, jnp.float32)
                                             for s in shapes])
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return derive(model, variables, x, train=False)


def summary(groups: Groups) -> str:
    """One line per group (index, channels, producers, readers, other members), then the
    produced channel spaces that are not groups."""
    lines = [f"{'#':>3}  {'group':<28} {'channels':>8}  members"]
    for i, g in enumerate(groups):
        roles = {r: [m for m in g.members if m.role == r] for r in ("out", "in", "other")}
        lines.append(f"{i:>3}  {g.name:<28} {g.size:>8}  {len(roles['out'])} producer, "
                     f"{len(roles['in'])} reader, {len(roles['other'])} other slices"
                     f"{'; read by an activation contraction' if g.reads_activations else ''}")
    for what, why in groups.excluded:
        lines.append(f"  not a group: {what}: {why}")
    return "\n".join(lines)
