"""Index classes, the union-find under `lottery.groups.derive`: every axis of every traced value
is a list of classes (row-major factors); a class may be decomposed into a row-major product of
classes ('prod', from a reshape) or a disjoint union at offsets ('cat', from a concatenation).
`labels` reads a class's channel index off every position of an axis.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


class GroupError(ValueError):
    """The analysis cannot decide how channels flow through a primitive."""


# Flags of a class: an axis of the model input / output, produced by a kernel, contracted between
# two activations.
INPUT, OUTPUT, PRODUCED, ACT = "input", "output", "produced", "act"


class Classes:
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


def node_size(node) -> int:
    if node[0] == "leaf":
        return node[2]
    sizes = [node_size(n) for n in node[1]]
    return int(np.prod(sizes)) if node[0] == "prod" else int(sum(sizes))


def labels(node, n: int) -> list[tuple[int, np.ndarray]]:
    """[(class root, channel index of each of the n positions, -1 outside)], one entry per place
    the class occupies in the axis (a class concatenated with itself occupies two)."""
    if node[0] == "leaf":
        return [(node[1], np.arange(n))]
    out = []
    offset, stride, pos = 0, n, np.arange(n)
    for child in node[1]:
        s = node_size(child)
        if node[0] == "prod":
            stride //= s
            digit = (pos // stride) % s
            out.extend((r, lab[digit]) for r, lab in labels(child, s))
        else:
            for r, lab in labels(child, s):
                full = np.full(n, -1)
                full[offset:offset + s] = lab
                out.append((r, full))
            offset += s
    return out


def by_class(node, n: int) -> dict[int, list[np.ndarray]]:
    out: dict[int, list[np.ndarray]] = {}
    for r, lab in labels(node, n):
        out.setdefault(r, []).append(lab)
    return out


def positions(labels: list[np.ndarray], size: int, fail) -> np.ndarray:
    """(size, k) positions of each channel over all the class's places; every channel must own
    the same number."""
    pos = np.concatenate([np.flatnonzero(lab >= 0) for lab in labels])
    chan = np.concatenate([lab[lab >= 0] for lab in labels])
    order = np.lexsort((pos, chan))
    counts = np.bincount(chan, minlength=size)
    if len(counts) != size or np.any(counts != counts[0]):
        raise fail(f"channels own unequal numbers of positions ({sorted(set(counts))})")
    return pos[order].reshape(size, counts[0])

