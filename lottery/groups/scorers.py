"""Group scorers: `scorer(groups, params, mask, inputs) -> one float32 vector per group`, HIGHER =
KEEP. `l1`, `l2` (norms of the producer filters, Li et al. 2017; `norm(ord, members='all')` takes
every member, DepGraph's group norm), `bn_scale` (sum of |gamma| of the group's norm layers:
network slimming, Liu et al. 2017) and `taylor` (first-order Taylor importance, Molchanov et al.
2017, arXiv:1611.06440: |sum over the batch and positions of activation * gradient|, taken at every
point a kernel reads the channel: the first-order loss change of removing it). `weighted_sum`
composes them with per-scorer normalization, as `lottery.scorers.weighted_sum` does for weights.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from lottery import masks
from lottery.groups.analysis import Analysis, analyze
from lottery.groups.channels import Channels, alive, by_path, channel_slices, init
from lottery.groups.classes import labels, node_size
from lottery.groups.jaxprs import sub_jaxpr, trace
from lottery.groups.structure import Group, Groups, build
from lottery.scorers import Inputs

PyTree = Any

GroupScorer = Callable[[Groups, PyTree, PyTree, Any], Channels]
MEMBERS = ("out", "all")


def norm(ord: int = 1, members: str = "out") -> GroupScorer:
    """Scorer: the L`ord` norm (1 or 2) of each channel's slices of the masked params. `members`
    'out': the producer filters (Li et al. 2017's L1 filter norm, summed over every producer of a
    coupled group); 'all': every params member (producers, readers' rows, biases, norms:
    DepGraph's group norm)."""
    if ord not in (1, 2):
        raise ValueError(f"ord must be 1 or 2, got {ord!r}")
    if members not in MEMBERS:
        raise ValueError(f"members must be one of {MEMBERS}, got {members!r}")

    def scorer(groups, params, mask=None, inputs=None):
        del inputs
        return _norm(groups, params, mask, ord, members)

    scorer.__name__ = f"l{ord}" + ("" if members == "out" else "_all")
    return scorer


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _norm(groups, params, mask, ord, members):
    w = masks.apply(params, mask) if mask is not None else params
    flat = by_path(w)
    out = []
    for g in groups:
        acc = jnp.zeros(g.size, jnp.float32)
        for m in g.members:
            if m.collection == "params" and (members == "all" or m.role == "out"):
                s = channel_slices(flat[m.path], m).astype(jnp.float32)
                acc = acc + (jnp.sum(jnp.abs(s), 1) if ord == 1 else jnp.sum(s * s, 1))
        out.append(acc if ord == 1 else jnp.sqrt(acc))
    return tuple(out)


l1 = norm(1)
l2 = norm(2)


def bn_scale(groups: Groups, params: PyTree, mask: PyTree = None, inputs=None) -> Channels:
    """Network slimming (Liu et al. 2017, arXiv:1708.06519): |gamma| of the group's norm layers
    (params members named '.../scale' that are neither producers nor readers), summed over them.
    ValueError for a group without one."""
    del inputs
    return _bn_scale(groups, params, mask)


@functools.partial(jax.jit, static_argnums=0)
def _bn_scale(groups, params, mask):
    w = masks.apply(params, mask) if mask is not None else params
    flat = by_path(w)
    out, missing = [], []
    for g in groups:
        scales = [m for m in g.members if m.collection == "params" and m.role == "other"
                  and m.path.rsplit("/", 1)[-1] == "scale"]
        if not scales:
            missing.append(g.name)
            continue
        out.append(sum(jnp.sum(jnp.abs(channel_slices(flat[m.path], m)), 1).astype(jnp.float32)
                       for m in scales))
    if missing:
        raise ValueError(f"bn_scale needs a norm layer scale in every group; groups {missing} "
                         f"have none (exclude them, or use l1 / taylor)")
    return tuple(out)


def _probe_edits(groups: Groups, an: Analysis, built: list[Group], roots: list[int]) -> dict:
    """{call path: [(operand, axis, [(index in `groups`, channel labels)])]}: every kernel read of
    a channel of `groups`, located in the analysis `an` whose groups are `built`."""
    key_of = lambda g: frozenset((m.path, m.axis) for m in g.members  # noqa: E731
                                 if m.role == "out" and m.collection == "params")
    ours = {key_of(g): i for i, g in enumerate(groups)}
    mapping = {}
    for g, r in zip(built, roots):
        if key_of(g) in ours:
            mapping[r] = ours.pop(key_of(g))
    if ours:
        raise ValueError(f"groups {[groups[i].name for i in ours.values()]} are not groups of "
                         f"inputs.apply_fn's computation (derive them from the same model)")
    edits: dict = {}
    for path, operand, axis, classes in an.sites:
        tree = an.cls.tree(classes)
        hits = [(mapping[r], lab) for r, lab in labels(tree, node_size(tree)) if r in mapping]
        if hits:
            edits.setdefault(path, []).append((operand, axis, hits))
    return edits


def _eval(jaxpr, consts, args, edits, probes, path=()):
    """Evaluate a jaxpr, multiplying each probed operand by (1 + probe) along its channel axis."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for i, eqn in enumerate(jaxpr.eqns):
        p = path + (i,)
        invals = [read(v) for v in eqn.invars]
        for operand, axis, hits in edits.get(p, ()):
            x = invals[operand]
            scale = 1.0
            for gi, lab in hits:
                scale = scale + jnp.where(lab >= 0, probes[gi][np.maximum(lab, 0)], 0.0)
            shape = [1] * x.ndim
            shape[axis] = x.shape[axis]
            invals[operand] = x * jnp.reshape(scale, shape).astype(x.dtype)
        sub = sub_jaxpr(eqn)
        if sub is not None and any(len(k) > len(p) and k[:len(p)] == p for k in edits):
            outs = _eval(sub[0], sub[1], invals, edits, probes, p)
        else:
            bind = eqn.primitive.get_bind_params(eqn.params)  # (subfuns, params) in older jax
            subfuns, bind = bind if isinstance(bind, tuple) else ((), bind)
            outs = eqn.primitive.bind(*subfuns, *invals, **bind)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def taylor(groups: Groups, params: PyTree, mask: PyTree, inputs: Inputs) -> Channels:
    """First-order Taylor importance (Molchanov et al. 2017): per channel, |sum over the batches,
    examples and positions of a * dL/da| over every activation a that a kernel reads the channel
    from (conv/dense inputs, after ReLU, pooling, flatten), on the masked network. Computed as the
    gradient of the loss w.r.t. a zero probe p multiplying each read as a * (1 + p): one backward
    pass per batch, `inputs.loss_fn` as the loss (a mean over the batch by default, which scales
    all scores alike). The model's jaxpr is re-evaluated with the probes; a call (jit, custom_jvp)
    that holds a probed read is inlined, so a custom derivative rule inside such a call is replaced
    by the derivative of its primal. Needs `inputs.apply_fn(params, x)` and `inputs.batches`."""
    if inputs is None or inputs.apply_fn is None or inputs.batches is None:
        raise ValueError("taylor needs inputs with apply_fn and batches "
                         "(lottery.Inputs.create(apply_fn, batches))")
    return _taylor(groups, params, mask, inputs)


@functools.partial(jax.jit, static_argnums=0)
def _taylor(groups, params, mask, inputs):
    w = masks.apply(params, mask) if mask is not None else params
    keys = [("params", p) for p in masks.paths(w)]
    shapes = {k: tuple(np.shape(v)) for k, v in zip(keys, jax.tree.leaves(w))}
    total = [jnp.zeros(g.size, jnp.float32) for g in groups]
    for x, y in inputs.batches:
        closed = trace(inputs.apply_fn, (w, x))
        n_x = len(jax.tree.leaves(x))
        an = analyze(closed, keys + [None] * n_x, [False] * len(keys) + [True] * n_x)
        built, _, roots = build(an, shapes)
        edits = _probe_edits(groups, an, built, roots)
        args = jax.tree.leaves(w) + jax.tree.leaves(x)

        def loss(probes, args=args, closed=closed, edits=edits, y=y):
            out = _eval(closed.jaxpr, closed.consts, args, edits, probes)
            return inputs.loss_fn(out[0], y)

        grads = jax.grad(loss)([jnp.zeros(g.size, jnp.float32) for g in groups])
        total = [t + g for t, g in zip(total, grads)]
    return tuple(jnp.abs(t) for t in total)


SCORERS: dict[str, GroupScorer] = {"l1": l1, "l2": l2, "l1_all": norm(1, "all"),
                                   "l2_all": norm(2, "all"), "bn_scale": bn_scale,
                                   "taylor": taylor}


def get(name: str) -> GroupScorer:
    """A built-in group scorer by name (`SCORERS`)."""
    if name not in SCORERS:
        raise ValueError(f"group scorer {name!r} is unknown; known: {sorted(SCORERS)}")
    return SCORERS[name]


def weighted_sum(terms: Sequence[tuple[float, GroupScorer]],
                 normalize: bool = True) -> GroupScorer:
    """A group scorer sum_i w_i s_i; with `normalize`, each s_i is first divided by the sum of
    |s_i| over the channels alive in the mask (by 1 if that is 0), so scorers of different scales
    mix by their weights."""
    terms = list(terms)
    if not terms:
        raise ValueError("weighted_sum needs at least one (weight, scorer) pair")
    for w, s in terms:
        if not callable(s) or isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ValueError(f"weighted_sum takes (float weight, scorer) pairs, got {(w, s)!r}")

    def scorer(groups, params, mask=None, inputs=None):
        live = alive(groups, mask) if mask is not None else init(groups)
        total = [jnp.zeros(g.size, jnp.float32) for g in groups]
        for w, s in terms:
            sc = [jnp.asarray(v, jnp.float32) for v in s(groups, params, mask, inputs)]
            if normalize:
                z = sum(jnp.sum(jnp.where(a, jnp.abs(v), 0.0)) for v, a in zip(sc, live))
                sc = [v / jnp.where(z > 0, z, 1.0) for v in sc]
            total = [t + w * v for t, v in zip(total, sc)]
        return tuple(total)

    return scorer
