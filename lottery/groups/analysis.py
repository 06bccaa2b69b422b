"""The analysis of one traced function: channel index classes followed through its jaxpr.

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
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from jax.extend import core as jcore

from lottery.groups.classes import ACT, INPUT, OUTPUT, PRODUCED, Classes, GroupError
from lottery.groups.jaxprs import (CUMULATIVE, NARY, REDUCE, UNARY, WINDOW, State, location,
                                   sub_jaxpr)


class Analysis:
    def __init__(self):
        self.cls = Classes()
        self.leaf_axes: dict[tuple, list] = {}  # (collection, path) -> class list per axis
        self.roles: dict[tuple, tuple[str, int]] = {}  # (leaf key, axis) -> (role, order)
        self.sites: list[tuple] = []  # (call path, operand, axis, class list)
        self.step = 0
        self.outer: list = []  # call equations being followed, outermost first

    def where(self, eqn) -> str:
        return location(eqn, self.outer)

    def fail(self, eqn) -> Callable[[str], GroupError]:
        return lambda msg: GroupError(f"cannot derive channel groups at {eqn.primitive.name} in "
                                      f"{self.where(eqn)}: {msg}")

    # -- states

    def leaf_state(self, key, shape, data: bool) -> State:
        desc = [self.cls.fresh(n) for n in shape]
        if key is not None:
            self.leaf_axes[key] = desc
        return State(desc, data, (key, tuple(range(len(shape)))) if key is not None else None)

    def const_state(self, shape) -> State:
        return State([self.cls.fresh(n) for n in shape], False, None, True)

    # -- the walk

    def run(self, jaxpr: jcore.Jaxpr, consts: list, args: list[State], path=()) -> list[State]:
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

    def eqn(self, eqn, ins: list[State], path) -> list[State]:
        name = eqn.primitive.name
        fail = self.fail(eqn)
        shapes = [tuple(v.aval.shape) if hasattr(v.aval, "shape") else () for v in eqn.invars]
        out_shapes = [tuple(v.aval.shape) if hasattr(v.aval, "shape") else ()
                      for v in eqn.outvars]
        data = any(s.data for s in ins)
        sub = sub_jaxpr(eqn)
        if sub is not None:
            inner, consts = sub
            self.outer.append(eqn)
            try:
                return self.run(inner, consts, ins, path)
            finally:
                self.outer.pop()
        if name in UNARY or name in NARY:
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
            return [State([ins[0].desc[k] for k in keep], data, src)]
        if name == "transpose":
            perm = eqn.params["permutation"]
            src = ins[0].src and (ins[0].src[0], tuple(ins[0].src[1][k] for k in perm))
            return [State([ins[0].desc[k] for k in perm], data, src)]
        if name in REDUCE:
            axes = set(eqn.params["axes"])
            for k in axes:
                self.block(ins[0].desc[k], f"{name} over it in {self.where(eqn)}")
            return [State([d for k, d in enumerate(ins[0].desc) if k not in axes], data)]
        if name in CUMULATIVE or name == "rev":
            axes = eqn.params["dimensions"] if name == "rev" else (eqn.params["axis"],)
            for k in axes:
                self.block(ins[0].desc[k], f"{name} along it in {self.where(eqn)}")
            return [State(list(ins[0].desc), data)]
        if name in ("sort", "top_k"):
            k = eqn.params.get("dimension", len(shapes[0]) - 1)
            for s in ins:
                self.block(s.desc[k], f"{name} along it in {self.where(eqn)}")
            return [State([list(d) if out_shapes[j][a] == shapes[0][a]
                            else self.cls.fresh(out_shapes[j][a])
                            for a, d in enumerate(ins[0].desc)], data)
                    for j in range(len(out_shapes))]
        if name in WINDOW:
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

    def elementwise(self, ins, shapes, out_shape, data, fail) -> State:
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
        return State(desc, data, src)

    def broadcast(self, s, shape, out_shape, params, data) -> State:
        desc = [None] * len(out_shape)
        axes = [None] * len(out_shape)
        for i, d in enumerate(params["broadcast_dimensions"]):
            if shape[i] == out_shape[d]:
                desc[d] = list(s.desc[i])
                axes[d] = s.src[1][i] if s.src else None
        desc = [d if d is not None else self.cls.fresh(n) for d, n in zip(desc, out_shape)]
        return State(desc, data, (s.src[0], tuple(axes)) if s.src else None)

    def reshape(self, s, shape, out_shape, data, fail) -> State:
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
        return State(desc, data, src)

    def window(self, s, shape, out_shape, eqn, data) -> State:
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
        return State(desc, data)

    def _as_class(self, classes, size: int, fail) -> int:
        """One class standing for an axis given as a class list (a product gets decomposed)."""
        flat = self.cls.expand(classes)
        if len(flat) == 1:
            return flat[0]
        c = self.cls.new(size)
        if flat:
            self.cls.unify([c], flat, fail)
        return c

    def concatenate(self, ins, shapes, out_shape, dim, data, fail) -> State:
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
        return State(desc, data)

    def _cut(self, s, axis: int, pieces: list[int], fail) -> list[int]:
        """Make axis `axis` of `s` the concatenation of new classes of sizes `pieces`."""
        parts = tuple(self.cls.new(n) for n in pieces)
        c = self.cls.new(sum(pieces))
        self.cls.decomp[c] = ("cat", parts)
        self.cls.unify(s.desc[axis], [c], fail)
        return list(parts)

    def split(self, s, shape, out_shapes, axis, data, fail) -> list[State]:
        parts = self._cut(s, axis, [o[axis] for o in out_shapes], fail)
        return [State([([p] if self.cls.size[p] > 1 else []) if k == axis else list(d)
                        for k, d in enumerate(s.desc)], data) for p in parts]

    def slice(self, s, shape, out_shape, eqn, data, fail) -> State:
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
        return State(desc, data)

    def pad(self, s, shape, out_shape, eqn, data, fail) -> State:
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
        return State(desc, data)

    def _mark(self, s: State, axes, role: str) -> None:
        """Role of the variable axes an operand's axes are (for a kernel moved as is)."""
        if s.src is None:
            return
        for k in axes:
            a = s.src[1][k]
            if a is not None:
                self.roles.setdefault((s.src[0], a), (role, self.step))

    def _produced(self, classes) -> None:
        for c in self.cls.expand(classes):
            self.cls.flag(c, PRODUCED, order=self.step)

    def _contraction(self, ins, lhs_axes, rhs_axes, lhs_free, rhs_free, path, where) -> None:
        """Sites, roles and flags of a contraction of lhs axes `lhs_axes` with rhs `rhs_axes`."""
        lhs, rhs = ins
        if lhs.data and rhs.data:
            for k in lhs_axes:
                for c in self.cls.expand(lhs.desc[k]):
                    self.cls.flag(c, ACT, f"contracted between two activations in {where}")
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

    def dot_general(self, ins, shapes, eqn, path, fail) -> State:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        for a, b in list(zip(lc, rc)) + list(zip(lb, rb)):
            self.cls.unify(lhs.desc[a], rhs.desc[b], fail)
        lf = [k for k in range(len(shapes[0])) if k not in lc and k not in lb]
        rf = [k for k in range(len(shapes[1])) if k not in rc and k not in rb]
        self._contraction(ins, lc, rc, lf, rf, path, self.where(eqn))
        desc = ([list(lhs.desc[k]) for k in lb] + [list(lhs.desc[k]) for k in lf]
                + [list(rhs.desc[k]) for k in rf])
        return State(desc, lhs.data or rhs.data)

    def conv(self, ins, shapes, out_shape, eqn, path, fail) -> State:
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
        return State(out_desc, lhs.data or rhs.data)



def analyze(closed, leaf_keys: list, data_flags: list[bool]) -> Analysis:
    """The analysis of a closed jaxpr whose inputs are `leaf_keys` ((collection, path), None for
    the model input) flagged by `data_flags` (depends on the model input)."""
    an = Analysis()
    states = [an.leaf_state(k, tuple(v.aval.shape), d)
              for k, v, d in zip(leaf_keys, closed.jaxpr.invars, data_flags)]
    for s, d in zip(states, data_flags):
        if d:
            for cl in s.desc:
                for c in cl:
                    an.cls.flag(c, INPUT)
    outs = an.run(closed.jaxpr, list(closed.consts), states)
    for s in outs:
        for cl in s.desc:
            for c in an.cls.expand(cl):
                an.cls.flag(c, OUTPUT)
    an.cls.push_down()
    return an

