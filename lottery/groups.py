"""Coupled channel groups of any flax model, found in its traced computation; group scores, group
masks at a density, and their expansion to ordinary weight masks.

A *group* is one channel index space that several parameter slices share, so they are kept or
removed together (the dependency groups of Torch-Pruning's DepGraph, Fang et al. 2023,
arXiv:2301.12900; Distiller's "thinning"): the output axis of every kernel that produces those
channels (all the convs whose outputs meet in one residual sum are ONE group), their biases, batch
norm scale and bias and running mean and var, and the input axis of every kernel that reads them
(through pooling, ReLU, concatenation and flatten: for conv -> flatten -> dense, channel c is the
dense kernel's rows (h * W + w) * C + c). Removing channel c of a group removes slice c of every
member. Units: density = fraction of a group's channels KEPT; scores: HIGHER = KEEP.

How `derive` finds them: it traces `model.apply(variables, x)` with `jax.make_jaxpr`, every
variable leaf an input, and gives every axis of every intermediate value a list of *index
classes* (a union-find): an axis of size H*W*C after a flatten is the row-major product of the
classes of H, W and C; a concatenation's axis is the disjoint union (offsets) of its parts'
classes. Elementwise ops (add, mul, max = ReLU, batch norm arithmetic, select, ...) unify the
classes of corresponding axes, so a residual add couples its two inputs' channels; reshape splits
or merges classes (a merged flatten keeps C as its minor factor); transpose, squeeze, broadcast,
slice, pad, split and concatenate move them; `conv_general_dilated` unifies the input's feature
axis with the kernel's input-feature axis and gives the output the kernel's output-feature
classes (grouped and depthwise convs couple input and output groups); `dot_general` unifies
contracted axes. A *group* is a class that some kernel produces (the free axis of a contraction
operand that is computed from variables only), that is not an axis of the model input or output
(the classifier's outputs are never a group), and that no op mixes across (a reduction, window or
reversal over it, or a strided slice: those classes are listed in `Groups.excluded` with the
reason). Calls (`jit`, `custom_jvp`/`custom_vjp`, `remat`) are followed inside. A primitive the
analysis does not know (gather, scatter, control flow, ...) or a reshape that cannot be mapped
(sizes that do not divide, a concatenation split by a reshape) raises GroupError naming the
primitive, the layer (flax's name stack) and the source line.

Scores (`scorer(G, params, mask, inputs) -> one float vector per group`): `l1`, `l2` (norms of
the producer filters, Li et al. 2017; `norm(ord, members='all')` takes every member, DepGraph's
group norm), `bn_scale` (sum of |gamma| of the group's norm layers: network slimming, Liu et al.
2017) and `taylor` (first-order Taylor importance, Molchanov et al. 2017, arXiv:1611.06440:
|sum over the batch and positions of activation * gradient|, taken at every point a kernel reads
the channel: the first-order loss change of removing it). `weighted_sum` composes them with
per-scorer normalization, as `lottery.scorers.weighted_sum` does for weights.

Group masks are a tuple of bool vectors, one per group (True = channel kept). `to_density` keeps
round-half-up(density * channels) of them, globally over the groups or per group, by
`lottery.prune.to_density`'s rules (score descending, NaN lowest, the lower index wins a tie, a
removed channel never returns). `expand` turns them into a weight mask with the structure of the
params that zeroes every params slice of a removed channel (producer filters, biases, norm scale
and bias, consumer input rows), so the channel is exactly dead (batch norm outputs 0, not its
constant beta - mean * gamma / sqrt(var + eps)) and nothing reads it: usable as an IMP, one-shot
or AGP mask (`expand` works under jit), and `lottery.compact` removes such channels physically.
`prune` is score -> `to_density` -> `expand` in one call; `alive` reads the channel masks back
from a weight mask (a channel lives while a producer weight does); `unread` and `take` are what
compaction uses (channels no reader's row touches; every member sliced).

Known limits: one traced input shape (a model whose groups depend on the input shape needs the
shape it will see); size-1 axes carry no class (a 1-channel layer is not a group); channels read
by a contraction between two activations (attention's q . k) are groups whose masks zero their
producers, but `unread` never reports them removable; ops the analysis does not know raise.
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
try:  # file:line of an equation, for error messages (jax internals: optional)
    from jax._src import source_info_util
except ImportError:  # pragma: no cover
    source_info_util = None
from jax.extend import core as jcore

from lottery import masks, prune as prune_lib
from lottery.scorers import Inputs

PyTree = Any
Channels = tuple  # one bool (or float score) vector per group


class GroupError(ValueError):
    """The analysis cannot decide how channels flow through a primitive."""


# ----------------------------------------------------------------------------------------------
# Index classes: a union-find whose classes may be decomposed into a row-major product of
# classes ('prod', from a reshape) or a disjoint union at offsets ('cat', from a concatenation).

_INPUT, _OUTPUT, _PRODUCED, _ACT = "input", "output", "produced", "act"


class _Classes:
    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.decomp: dict[int, tuple[str, tuple[int, ...]]] = {}
        self.flags: dict[int, set] = {}
        self.reasons: dict[int, list[str]] = {}
        self.order: dict[int, int] = {}

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        return len(self.parent) - 1

    def fresh(self, size: int) -> list[int]:
        """The class list of a new axis: no class for a size-1 axis."""
        return [] if size == 1 else [self.new(size)]

    def find(self, c: int) -> int:
        root = c
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[c] != root:
            self.parent[c], c = root, self.parent[c]
        return root

    def flag(self, c: int, flag: str, reason: str | None = None, order: int | None = None):
        r = self.find(c)
        self.flags.setdefault(r, set()).add(flag)
        if reason is not None:
            self.reasons.setdefault(r, []).append(reason)
        if order is not None:
            self.order[r] = min(self.order.get(r, order), order)

    def _merge_into(self, src: int, dst: int) -> None:
        self.parent[src] = dst
        self.flags.setdefault(dst, set()).update(self.flags.pop(src, set()))
        self.reasons.setdefault(dst, []).extend(self.reasons.pop(src, []))
        if src in self.order:
            self.order[dst] = min(self.order.get(dst, self.order[src]), self.order.pop(src))

    def expand(self, classes) -> list[int]:
        """Roots of `classes` with product decompositions replaced by their factors."""
        out = []
        for c in classes:
            r = self.find(c)
            d = self.decomp.get(r)
            if d is not None and d[0] == "prod":
                out.extend(self.expand(d[1]))
            else:
                out.append(r)
        return out

    def unify(self, a_list, b_list, fail: Callable[[str], GroupError]) -> None:
        """Make two class lists (the same axis, seen twice) describe the same index space."""
        a, b = self.expand(a_list), self.expand(b_list)
        while a and b:
            x, y = a[-1], b[-1]
            sx, sy = self.size[x], self.size[y]
            if sx == sy:
                self._unify_class(x, y, fail)
                a.pop()
                b.pop()
            else:
                big, small, lst = (x, sy, a) if sx > sy else (y, sx, b)
                if self.size[big] % small or big in self.decomp:
                    raise fail(f"cannot match axis factors of sizes {self._sizes(a_list)} and "
                               f"{self._sizes(b_list)}")
                hi, lo = self.new(self.size[big] // small), self.new(small)
                self.decomp[big] = ("prod", (hi, lo))
                lst[-1] = hi
                lst.append(lo)
        if a or b:
            raise fail(f"cannot match axis factors of sizes {self._sizes(a_list)} and "
                       f"{self._sizes(b_list)}")

    def _sizes(self, classes) -> list[int]:
        return [self.size[c] for c in self.expand(classes)]

    def _unify_class(self, x: int, y: int, fail) -> None:
        x, y = self.find(x), self.find(y)
        if x == y:
            return
        dx, dy = self.decomp.get(x), self.decomp.get(y)
        if dx is None:
            self._merge_into(x, y)
        elif dy is None:
            self._merge_into(y, x)
        else:
            sx = [self.size[c] for c in dx[1]]
            sy = [self.size[c] for c in dy[1]]
            if dx[0] != dy[0] or sx != sy:
                raise fail(f"an axis is concatenated from parts of sizes {sx} in one place and "
                           f"{sy} in another")
            for cx, cy in zip(dx[1], dy[1]):
                self.unify([cx], [cy], fail)
            self._merge_into(x, y)
            del self.decomp[x]

    def split_for_reshape(self, c: int, lo_size: int, fail) -> tuple[int, int]:
        r = self.find(c)
        if r in self.decomp or self.size[r] % lo_size:
            raise fail(f"cannot split an axis factor of size {self.size[r]} into (..., {lo_size})")
        hi, lo = self.new(self.size[r] // lo_size), self.new(lo_size)
        self.decomp[r] = ("prod", (hi, lo))
        return hi, lo

    def push_down(self) -> None:
        """Flags and order of decomposed classes hold for their parts too."""
        done = set()

        def visit(r):
            if r in done:
                return
            done.add(r)
            for ch in self.decomp[r][1]:
                cr = self.find(ch)
                for f in self.flags.get(r, ()):
                    self.flags.setdefault(cr, set()).add(f)
                self.reasons.setdefault(cr, []).extend(
                    x for x in self.reasons.get(r, []) if x not in self.reasons.get(cr, []))
                if r in self.order:
                    self.order[cr] = min(self.order.get(cr, self.order[r]), self.order[r])
                if cr in self.decomp:
                    visit(cr)

        for r in list(self.decomp):
            if self.find(r) == r:
                visit(r)

    def tree(self, classes) -> tuple:
        """An axis as ('prod', parts) of ('leaf', root) / ('cat', parts) nodes."""
        return ("prod", tuple(self._node(c) for c in classes))

    def _node(self, c: int) -> tuple:
        r = self.find(c)
        d = self.decomp.get(r)
        if d is None:
            return ("leaf", r, self.size[r])
        return (d[0], tuple(self._node(ch) for ch in d[1]))


def _node_size(node) -> int:
    if node[0] == "leaf":
        return node[2]
    sizes = [_node_size(n) for n in node[1]]
    return int(np.prod(sizes)) if node[0] == "prod" else int(sum(sizes))


def _labels(node, n: int) -> list[tuple[int, np.ndarray]]:
    """[(class root, channel index of each of the n positions, -1 outside)], one entry per place
    the class occupies in the axis (a class concatenated with itself occupies two)."""
    if node[0] == "leaf":
        return [(node[1], np.arange(n))]
    out = []
    offset, stride, pos = 0, n, np.arange(n)
    for child in node[1]:
        s = _node_size(child)
        if node[0] == "prod":
            stride //= s
            digit = (pos // stride) % s
            out.extend((r, lab[digit]) for r, lab in _labels(child, s))
        else:
            for r, lab in _labels(child, s):
                full = np.full(n, -1)
                full[offset:offset + s] = lab
                out.append((r, full))
            offset += s
    return out


def _by_class(node, n: int) -> dict[int, list[np.ndarray]]:
    out: dict[int, list[np.ndarray]] = {}
    for r, lab in _labels(node, n):
        out.setdefault(r, []).append(lab)
    return out


def _positions(labels: list[np.ndarray], size: int, fail) -> np.ndarray:
    """(size, k) positions of each channel over all the class's places; every channel must own
    the same number."""
    pos = np.concatenate([np.flatnonzero(lab >= 0) for lab in labels])
    chan = np.concatenate([lab[lab >= 0] for lab in labels])
    order = np.lexsort((pos, chan))
    counts = np.bincount(chan, minlength=size)
    if len(counts) != size or np.any(counts != counts[0]):
        raise fail(f"channels own unequal numbers of positions ({sorted(set(counts))})")
    return pos[order].reshape(size, counts[0])


# ----------------------------------------------------------------------------------------------
# The analysis of one traced function.

_UNARY = {"neg", "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2", "log", "log1p",
          "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh",
          "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "abs", "square", "erf",
          "erfc", "erf_inv", "lgamma", "digamma", "not", "real", "imag", "conj",
          "population_count", "clz", "integer_pow", "convert_element_type", "copy", "copy_p",
          "reduce_precision", "stop_gradient", "sharding_constraint", "mesh_cast", "reshard",
          "bitcast_convert_type"}
_NARY = {"add", "sub", "mul", "div", "rem", "pow", "max", "min", "atan2", "nextafter", "and",
         "or", "xor", "eq", "ne", "lt", "le", "gt", "ge", "select_n", "clamp", "add_any",
         "complex", "shift_left", "shift_right_logical", "shift_right_arithmetic"}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
           "reduce_xor", "argmax", "argmin"}
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
_WINDOW = {"reduce_window_max", "reduce_window_min", "reduce_window_sum"}
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}


@dataclasses.dataclass
class _State:
    desc: list  # per axis: a class list (row-major factors)
    data: bool  # depends on the model input
    src: tuple | None = None  # (leaf key, per-axis leaf axis or None): a variable, moved as is
    const: bool = False  # computed from literals and constants only: carries no channels


def _sub_jaxpr(eqn) -> tuple[jcore.Jaxpr, list] | None:
    key = _CALLS.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    j = eqn.params[key]
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, list(j.consts)
    return j, []


def _where(eqn, outer=()) -> str:
    """'layer 'stage1_block0/conv2' (file:line), inside resize' for an equation; `outer` are the
    call equations around it (outermost first), whose layer and line stand in for missing ones."""
    eqns = [eqn, *reversed(outer)]
    stacks = [str(e.source_info.name_stack) for e in eqns]
    stack = next((x for x in stacks if "/" in x), "")
    layer = stack.split("/", 1)[1] if stack else ""
    line = ""
    if source_info_util is not None:
        line = next((x for x in (source_info_util.summarize(e.source_info) for e in eqns) if x),
                    "")
    calls = [str(e.params.get("name", e.primitive.name)) for e in outer]
    out = f"layer {layer!r}" if layer else "the model's top level"
    out += f" ({line})" if line else ""
    return out + (f", inside {' > '.join(calls)}" if calls else "")


class _Analysis:
    def __init__(self):
        self.cls = _Classes()
        self.leaf_axes: dict[tuple, list] = {}  # (collection, path) -> class list per axis
        self.roles: dict[tuple, tuple[str, int]] = {}  # (leaf key, axis) -> (role, order)
        self.sites: list[tuple] = []  # (call path, operand, axis, class list)
        self.step = 0
        self.outer: list = []  # call equations being followed, outermost first

    def where(self, eqn) -> str:
        return _where(eqn, self.outer)

    def fail(self, eqn) -> Callable[[str], GroupError]:
        return lambda msg: GroupError(f"cannot derive channel groups at {eqn.primitive.name} in "
                                      f"{self.where(eqn)}: {msg}")

    # -- states

    def leaf_state(self, key, shape, data: bool) -> _State:
        desc = [self.cls.fresh(n) for n in shape]
        if key is not None:
            self.leaf_axes[key] = desc
        return _State(desc, data, (key, tuple(range(len(shape)))) if key is not None else None)

    def const_state(self, shape) -> _State:
        return _State([self.cls.fresh(n) for n in shape], False, None, True)

    # -- the walk

    def run(self, jaxpr: jcore.Jaxpr, consts: list, args: list[_State], path=()) -> list[_State]:
        env: dict = {}

        def read(v):
            if isinstance(v, jcore.Literal):
                return self.const_state(np.shape(v.val))
            if env[v].const:  # a constant used twice does not tie the channels it meets
                return self.const_state(tuple(v.aval.shape))
            return env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = self.const_state(np.shape(c))
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        for i, eqn in enumerate(jaxpr.eqns):
            self.step += 1
            ins = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, ins, path + (i,))
            const = all(s.const for s in ins)
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = dataclasses.replace(o, const=const) if const else o
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, ins: list[_State], path) -> list[_State]:
        name = eqn.primitive.name
        fail = self.fail(eqn)
        shapes = [tuple(v.aval.shape) if hasattr(v.aval, "shape") else () for v in eqn.invars]
        out_shapes = [tuple(v.aval.shape) if hasattr(v.aval, "shape") else ()
                      for v in eqn.outvars]
        data = any(s.data for s in ins)
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            inner, consts = sub
            self.outer.append(eqn)
            try:
                return self.run(inner, consts, ins, path)
            finally:
                self.outer.pop()
        if name in _UNARY or name in _NARY:
            return [self.elementwise(ins, shapes, out_shapes[0], data, fail)]
        if name == "optimization_barrier":
            return list(ins)
        if name == "broadcast_in_dim":
            return [self.broadcast(ins[0], shapes[0], out_shapes[0], eqn.params, data)]
        if name == "reshape":
            if eqn.params.get("dimensions") is not None:
                raise fail("reshape with a dimension permutation")
            return [self.reshape(ins[0], shapes[0], out_shapes[0], data, fail)]
        if name == "squeeze":
            dims = {d % len(shapes[0]) for d in eqn.params["dimensions"]}
            keep = [k for k in range(len(shapes[0])) if k not in dims]
            src = ins[0].src and (ins[0].src[0], tuple(ins[0].src[1][k] for k in keep))
            return [_State([ins[0].desc[k] for k in keep], data, src)]
        if name == "transpose":
            perm = eqn.params["permutation"]
            src = ins[0].src and (ins[0].src[0], tuple(ins[0].src[1][k] for k in perm))
            return [_State([ins[0].desc[k] for k in perm], data, src)]
        if name in _REDUCE:
            axes = set(eqn.params["axes"])
            for k in axes:
                self.block(ins[0].desc[k], f"{name} over it in {self.where(eqn)}")
            return [_State([d for k, d in enumerate(ins[0].desc) if k not in axes], data)]
        if name in _CUMULATIVE or name == "rev":
            axes = eqn.params["dimensions"] if name == "rev" else (eqn.params["axis"],)
            for k in axes:
                self.block(ins[0].desc[k], f"{name} along it in {self.where(eqn)}")
            return [_State(list(ins[0].desc), data)]
        if name in ("sort", "top_k"):
            k = eqn.params.get("dimension", len(shapes[0]) - 1)
            for s in ins:
                self.block(s.desc[k], f"{name} along it in {self.where(eqn)}")
            return [_State([list(d) if out_shapes[j][a] == shapes[0][a]
                            else self.cls.fresh(out_shapes[j][a])
                            for a, d in enumerate(ins[0].desc)], data)
                    for j in range(len(out_shapes))]
        if name in _WINDOW:
            return [self.window(ins[0], shapes[0], out_shapes[0], eqn, data)]
        if name == "concatenate":
            return [self.concatenate(ins, shapes, out_shapes[0], eqn.params["dimension"], data,
                                     fail)]
        if name == "split":
            return self.split(ins[0], shapes[0], out_shapes, eqn.params["axis"], data, fail)
        if name == "slice":
            return [self.slice(ins[0], shapes[0], out_shapes[0], eqn, data, fail)]
        if name == "pad":
            return [self.pad(ins[0], shapes[0], out_shapes[0], eqn, data, fail)]
        if name == "iota":
            return [self.const_state(out_shapes[0])]
        if name == "dot_general":
            return [self.dot_general(ins, shapes, eqn, path, fail)]
        if name == "conv_general_dilated":
            return [self.conv(ins, shapes, out_shapes[0], eqn, path, fail)]
        raise GroupError(f"cannot derive channel groups: primitive {name!r} in "
                         f"{self.where(eqn)}: not one the analysis knows (it follows "
                         f"elementwise ops, reshapes, transposes, broadcasts, slices, pads, "
                         f"concatenation, reductions, pooling windows, dot_general, "
                         f"conv_general_dilated and calls)")

    # -- rules

    def block(self, classes, reason: str) -> None:
        for c in self.cls.expand(classes):
            self.cls.flag(c, "blocked", reason)

    def elementwise(self, ins, shapes, out_shape, data, fail) -> _State:
        desc: list = [None] * len(out_shape)
        for s, shape in zip(ins, shapes):
            if len(shape) == 0:
                continue
            if len(shape) != len(out_shape):
                raise fail(f"operand of rank {len(shape)} for a result of rank {len(out_shape)}")
            for k, n in enumerate(out_shape):
                if shape[k] != n or n == 1:
                    continue
                if desc[k] is None:
                    desc[k] = list(s.desc[k])
                else:
                    self.cls.unify(desc[k], s.desc[k], fail)
        desc = [d if d is not None else self.cls.fresh(n) for d, n in zip(desc, out_shape)]
        moved = [(s, shape) for s, shape in zip(ins, shapes) if s.src is not None]
        src = (moved[0][0].src if len(moved) == 1 and moved[0][1] == tuple(out_shape)
               else None)  # a kernel times a mask (or plus a constant) is still that kernel
        return _State(desc, data, src)

    def broadcast(self, s, shape, out_shape, params, data) -> _State:
        desc = [None] * len(out_shape)
        axes = [None] * len(out_shape)
        for i, d in enumerate(params["broadcast_dimensions"]):
            if shape[i] == out_shape[d]:
                desc[d] = list(s.desc[i])
                axes[d] = s.src[1][i] if s.src else None
        desc = [d if d is not None else self.cls.fresh(n) for d, n in zip(desc, out_shape)]
        return _State(desc, data, (s.src[0], tuple(axes)) if s.src else None)

    def reshape(self, s, shape, out_shape, data, fail) -> _State:
        factors = [c for d in s.desc for c in self.cls.expand(d)]
        desc = []
        for n in reversed(out_shape):
            need, mine = n, []
            while need > 1:
                if not factors:
                    raise fail(f"cannot map shape {shape} onto {out_shape}")
                c = factors[-1]
                sc = self.cls.size[c]
                if sc <= need and need % sc == 0:
                    mine.insert(0, factors.pop())
                    need //= sc
                elif sc > need and sc % need == 0 and c not in self.cls.decomp:
                    hi, lo = self.cls.split_for_reshape(c, need, fail)
                    factors[-1] = hi
                    mine.insert(0, lo)
                    need = 1
                else:
                    raise fail(f"cannot map shape {shape} onto {out_shape} (an axis factor of "
                               f"size {sc} straddles a new axis of size {n})")
            desc.insert(0, mine)
        if factors:
            raise fail(f"cannot map shape {shape} onto {out_shape}")
        src = None
        if s.src and [n for n in shape if n != 1] == [n for n in out_shape if n != 1]:
            it = iter(a for a, n in zip(s.src[1], shape) if n != 1)
            src = (s.src[0], tuple(next(it) if n != 1 else None for n in out_shape))
        return _State(desc, data, src)

    def window(self, s, shape, out_shape, eqn, data) -> _State:
        p = eqn.params
        desc = []
        for k, n in enumerate(shape):
            same = (p["window_dimensions"][k] == 1 and p["window_strides"][k] == 1
                    and tuple(p["padding"][k]) == (0, 0) and p["base_dilation"][k] == 1
                    and p["window_dilation"][k] == 1)
            if same:
                desc.append(list(s.desc[k]))
            else:
                self.block(s.desc[k], f"{eqn.primitive.name} window along it in "
                                      f"{self.where(eqn)}")
                desc.append(self.cls.fresh(out_shape[k]))
        return _State(desc, data)

    def _as_class(self, classes, size: int, fail) -> int:
        """One class standing for an axis given as a class list (a product gets decomposed)."""
        flat = self.cls.expand(classes)
        if len(flat) == 1:
            return flat[0]
        c = self.cls.new(size)
        if flat:
            self.cls.unify([c], flat, fail)
        return c

    def concatenate(self, ins, shapes, out_shape, dim, data, fail) -> _State:
        desc = []
        for k, n in enumerate(out_shape):
            if k == dim:
                parts = tuple(self._as_class(s.desc[k], shape[k], fail)
                              for s, shape in zip(ins, shapes))
                c = self.cls.new(n)
                self.cls.decomp[c] = ("cat", parts)
                desc.append([c])
            else:
                d = list(ins[0].desc[k])
                for s in ins[1:]:
                    self.cls.unify(d, s.desc[k], fail)
                desc.append(d)
        return _State(desc, data)

    def _cut(self, s, axis: int, pieces: list[int], fail) -> list[int]:
        """Make axis `axis` of `s` the concatenation of new classes of sizes `pieces`."""
        parts = tuple(self.cls.new(n) for n in pieces)
        c = self.cls.new(sum(pieces))
        self.cls.decomp[c] = ("cat", parts)
        self.cls.unify(s.desc[axis], [c], fail)
        return list(parts)

    def split(self, s, shape, out_shapes, axis, data, fail) -> list[_State]:
        parts = self._cut(s, axis, [o[axis] for o in out_shapes], fail)
        return [_State([([p] if self.cls.size[p] > 1 else []) if k == axis else list(d)
                        for k, d in enumerate(s.desc)], data) for p in parts]

    def slice(self, s, shape, out_shape, eqn, data, fail) -> _State:
        p = eqn.params
        strides = p["strides"] or (1,) * len(shape)
        desc = []
        for k, n in enumerate(shape):
            lo, hi, st = p["start_indices"][k], p["limit_indices"][k], strides[k]
            if (lo, hi, st) == (0, n, 1):
                desc.append(list(s.desc[k]))
            elif st == 1:
                parts = self._cut(s, k, [x for x in (lo, hi - lo, n - hi) if x > 0], fail)
                desc.append([parts[1 if lo > 0 else 0]] if hi - lo > 1 else [])
            else:
                self.block(s.desc[k], f"strided slice along it in {self.where(eqn)}")
                desc.append(self.cls.fresh(out_shape[k]))
        return _State(desc, data)

    def pad(self, s, shape, out_shape, eqn, data, fail) -> _State:
        desc = []
        for k, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
            if (lo, hi, interior) == (0, 0, 0):
                desc.append(list(s.desc[k]))
            elif interior == 0 and lo >= 0 and hi >= 0:
                mid = self._as_class(s.desc[k], shape[k], fail)
                parts = tuple(x for x in ((self.cls.new(lo),) if lo else ()) + (mid,)
                              + ((self.cls.new(hi),) if hi else ()))
                c = self.cls.new(out_shape[k])
                self.cls.decomp[c] = ("cat", parts)
                desc.append([c])
            else:
                self.block(s.desc[k], f"pad along it in {self.where(eqn)}")
                desc.append(self.cls.fresh(out_shape[k]))
        return _State(desc, data)

    def _mark(self, s: _State, axes, role: str) -> None:
        """Role of the variable axes an operand's axes are (for a kernel moved as is)."""
        if s.src is None:
            return
        for k in axes:
            a = s.src[1][k]
            if a is not None:
                self.roles.setdefault((s.src[0], a), (role, self.step))

    def _produced(self, classes) -> None:
        for c in self.cls.expand(classes):
            self.cls.flag(c, _PRODUCED, order=self.step)

    def _contraction(self, ins, lhs_axes, rhs_axes, lhs_free, rhs_free, path, where) -> None:
        """Sites, roles and flags of a contraction of lhs axes `lhs_axes` with rhs `rhs_axes`."""
        lhs, rhs = ins
        if lhs.data and rhs.data:
            for k in lhs_axes:
                for c in self.cls.expand(lhs.desc[k]):
                    self.cls.flag(c, _ACT, f"contracted between two activations in {where}")
            return
        for j, (s, axes, free) in enumerate(((lhs, lhs_axes, lhs_free),
                                             (rhs, rhs_axes, rhs_free))):
            if s.data:  # an activation read by a kernel: a probe site for `taylor`
                for k in axes:
                    self.sites.append((path, j, k, list(s.desc[k])))
            else:  # a kernel: its free axes produce channels, its contracted axes read them
                for k in free:
                    self._produced(s.desc[k])
                self._mark(s, free, "out")
                self._mark(s, axes, "in")

    def dot_general(self, ins, shapes, eqn, path, fail) -> _State:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        for a, b in list(zip(lc, rc)) + list(zip(lb, rb)):
            self.cls.unify(lhs.desc[a], rhs.desc[b], fail)
        lf = [k for k in range(len(shapes[0])) if k not in lc and k not in lb]
        rf = [k for k in range(len(shapes[1])) if k not in rc and k not in rb]
        self._contraction(ins, lc, rc, lf, rf, path, self.where(eqn))
        desc = ([list(lhs.desc[k]) for k in lb] + [list(lhs.desc[k]) for k in lf]
                + [list(rhs.desc[k]) for k in rf])
        return _State(desc, lhs.data or rhs.data)

    def conv(self, ins, shapes, out_shape, eqn, path, fail) -> _State:
        p = eqn.params
        if p["batch_group_count"] != 1:
            raise fail("batch_group_count > 1")
        dn = p["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        lhs, rhs = ins
        g = p["feature_group_count"]
        lf, rin, rout = lhs_spec[1], rhs_spec[1], rhs_spec[0]
        out_desc: list = [None] * len(out_shape)
        out_desc[out_spec[0]] = list(lhs.desc[lhs_spec[0]])
        if g == 1:
            self.cls.unify(lhs.desc[lf], rhs.desc[rin], fail)
            out_desc[out_spec[1]] = list(rhs.desc[rout])
        else:  # feature groups: input channel (group, i), output channel (group, o)
            groups = self.cls.fresh(g)
            per_out = self.cls.fresh(shapes[1][rout] // g)
            self.cls.unify(lhs.desc[lf], groups + list(rhs.desc[rin]), fail)
            self.cls.unify(rhs.desc[rout], groups + per_out, fail)
            out_desc[out_spec[1]] = groups + per_out
        for k in out_spec[2:]:
            out_desc[k] = self.cls.fresh(out_shape[k])
        self._contraction(ins, [lf], [rin], [], [rout], path, self.where(eqn))
        return _State(out_desc, lhs.data or rhs.data)


# ----------------------------------------------------------------------------------------------
# Groups.


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


def _trace(fn: Callable, args: tuple):
    return jax.make_jaxpr(fn)(*args)


def _analyze(closed, leaf_keys: list, data_flags: list[bool]) -> _Analysis:
    an = _Analysis()
    states = [an.leaf_state(k, tuple(v.aval.shape), d)
              for k, v, d in zip(leaf_keys, closed.jaxpr.invars, data_flags)]
    for s, d in zip(states, data_flags):
        if d:
            for cl in s.desc:
                for c in cl:
                    an.cls.flag(c, _INPUT)
    outs = an.run(closed.jaxpr, list(closed.consts), states)
    for s in outs:
        for cl in s.desc:
            for c in an.cls.expand(cl):
                an.cls.flag(c, _OUTPUT)
    an.cls.push_down()
    return an


def _build(an: _Analysis, shapes: dict[tuple, tuple]) -> tuple[list[Group], list, list[int]]:
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
            for root, labs in _by_class(cls.tree(classes), n).items():
                role = an.roles.get((key, axis), ("other", 0))
                per_class.setdefault(root, []).append(
                    (key, axis, role, _positions(labs, cls.size[root], fail)))
    groups, excluded, group_roots = [], [], []
    roots = sorted(per_class, key=lambda r: (cls.order.get(r, 1 << 60), r))
    for r in roots:
        flags = cls.flags.get(r, set())
        members = per_class[r]
        producers = sorted((m for m in members if m[2][0] == "out"), key=lambda m: m[2][1])
        if _PRODUCED not in flags or not producers:
            continue
        layers = tuple(dict.fromkeys("/".join(m[0][1].split("/")[:-1]) for m in producers))
        name = layers[0] + (f"+{len(layers) - 1}" if len(layers) > 1 else "")
        reason = None
        if _OUTPUT in flags:
            reason = "reaches the model output (the classifier's outputs)"
        elif _INPUT in flags:
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
            reads_activations=_ACT in flags))
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
    closed = _trace(fn, (variables, x))
    keys = [tuple(p.split("/", 1)) for p in masks.paths(variables)]
    shapes = {k: tuple(np.shape(v)) for k, v in zip(keys, jax.tree.leaves(variables))}
    n_x = len(jax.tree.leaves(x))
    an = _analyze(closed, keys + [None] * n_x, [False] * len(keys) + [True] * n_x)
    groups, excluded, _ = _build(an, shapes)
    return Groups(groups, excluded)


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


# ----------------------------------------------------------------------------------------------
# Channel masks and weight masks.


def _flat(tree) -> dict[str, Any]:
    return dict(zip(masks.paths(tree), jax.tree.leaves(tree)))


def _check_channels(groups: Groups, channels, what: str = "channels") -> None:
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


def _slices(leaf, m: Member) -> jax.Array:
    """(channels, everything else) view of a member's slices."""
    x = jnp.moveaxis(jnp.asarray(leaf), m.axis, 0)[m.index.reshape(-1)]
    return x.reshape(m.index.shape[0], -1)


def alive(groups: Groups, mask: PyTree) -> Channels:
    """Per group, the channels some producer weight of which `mask` keeps."""
    return _alive(groups, mask)


@functools.partial(jax.jit, static_argnums=0)
def _alive(groups: Groups, mask: PyTree) -> Channels:
    flat = _flat(mask)
    out = []
    for g in groups:
        acc = jnp.zeros(g.size, bool)
        for m in g.members:
            if m.collection == "params" and m.role == "out":
                acc = acc | jnp.any(_slices(flat[m.path], m), axis=1)
        out.append(acc)
    return tuple(out)


def expand(groups: Groups, channels: Channels, mask: PyTree) -> PyTree:
    """`mask` with every params slice of every removed channel set False (producer filters,
    biases, norm scales and biases, readers' input rows). Works under jit."""
    _check_channels(groups, channels)
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
    flat = _flat(params)
    out = []
    for g in groups:
        readers = [m for m in g.members if m.collection == "params" and m.role == "in"]
        if not readers or g.reads_activations:
            out.append(np.zeros(g.size, bool))
            continue
        acc = np.ones(g.size, bool)
        for m in readers:
            acc &= ~np.any(np.asarray(_slices(flat[m.path], m)) != 0, axis=1)
        out.append(acc)
    return tuple(out)


def take(groups: Groups, variables: PyTree, keep: Sequence[np.ndarray]) -> PyTree:
    """`variables` (a {'params', 'batch_stats', ...} dict) with only channels `keep[i]` (indices)
    of group i: every member sliced. Numpy leaves out."""
    if len(keep) != len(groups):
        raise ValueError(f"keep has {len(keep)} entries for {len(groups)} groups")
    flat = {c: _flat(t) for c, t in variables.items()}
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


# ----------------------------------------------------------------------------------------------
# Scores: scorer(groups, params, mask, inputs) -> one float32 vector per group, HIGHER = KEEP.

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
    flat = _flat(w)
    out = []
    for g in groups:
        acc = jnp.zeros(g.size, jnp.float32)
        for m in g.members:
            if m.collection == "params" and (members == "all" or m.role == "out"):
                s = _slices(flat[m.path], m).astype(jnp.float32)
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
    flat = _flat(w)
    out, missing = [], []
    for g in groups:
        scales = [m for m in g.members if m.collection == "params" and m.role == "other"
                  and m.path.rsplit("/", 1)[-1] == "scale"]
        if not scales:
            missing.append(g.name)
            continue
        out.append(sum(jnp.sum(jnp.abs(_slices(flat[m.path], m)), 1).astype(jnp.float32)
                       for m in scales))
    if missing:
        raise ValueError(f"bn_scale needs a norm layer scale in every group; groups {missing} "
                         f"have none (exclude them, or use l1 / taylor)")
    return tuple(out)


def _probe_edits(groups: Groups, an: _Analysis, built: list[Group], roots: list[int]) -> dict:
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
        hits = [(mapping[r], lab) for r, lab in _labels(tree, _node_size(tree)) if r in mapping]
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
        sub = _sub_jaxpr(eqn)
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
        closed = _trace(inputs.apply_fn, (w, x))
        n_x = len(jax.tree.leaves(x))
        an = _analyze(closed, keys + [None] * n_x, [False] * len(keys) + [True] * n_x)
        built, _, roots = _build(an, shapes)
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


# ----------------------------------------------------------------------------------------------
# Group masks at a density.

GROUP_SCOPES = ("global", "layerwise")


def _rates(groups: Groups, exclude) -> tuple[float, ...]:
    out = [1.0] * len(groups)
    pats = [exclude] if isinstance(exclude, (str, int)) else list(exclude or ())
    for p in pats:
        for i in groups.index(p):
            out[i] = 0.0
    if not any(out):
        raise ValueError(f"exclude={exclude!r} leaves no group to prune")
    return tuple(out)


def to_density(groups: Groups, scores: Channels, channels: Channels, density, *,
               scope: str = "global", exclude=None) -> Channels:
    """Channel masks keeping round-half-up(density * N) channels: N over all groups not excluded
    ('global', ranked together) or each group's own ('layerwise'), by `lottery.prune.to_density`'s
    ranking (score descending, NaN lowest, lower index first on a tie; a removed channel stays
    removed). `exclude`: group indices, names, producer layers or regexes left as they are."""
    if scope not in GROUP_SCOPES:
        raise ValueError(f"scope must be one of {GROUP_SCOPES}, got {scope!r}")
    _check_channels(groups, channels)
    _check_channels(groups, scores, "scores")
    rates = _rates(groups, exclude)
    out = prune_lib.to_density(tuple(jnp.asarray(s, jnp.float32) for s in scores),
                           tuple(jnp.asarray(c, bool) for c in channels), density, scope=scope,
                           rates=rates)
    return tuple(out)


def prune(groups: Groups, scorer: GroupScorer | str, params: PyTree, mask: PyTree,
                 density, *, inputs: Inputs | None = None, scope: str = "global",
                 exclude=None) -> tuple[PyTree, Channels]:
    """One step of structured pruning: score the channels alive in `mask`, keep `density` of them
    (`to_density`), and return (the expanded weight mask, the channel masks)."""
    scorer = get(scorer) if isinstance(scorer, str) else scorer
    masks.check(mask, params)
    live = alive(groups, mask)
    scores = scorer(groups, params, mask, inputs)
    channels = to_density(groups, scores, live, density, scope=scope, exclude=exclude)
    return expand(groups, channels, mask), channels
