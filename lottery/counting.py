"""How many weights a pruning step keeps: the counting behind `lottery.prune`.

The rules are stated once, in `lottery.prune`'s header; this module holds their arithmetic.
Counts of a Python (or numpy) number are exact: the number is read as its shortest decimal
(`exact`), multiplied as a Fraction and rounded half up; a traced number is counted in float32.
`allocate` splits a global count over leaves (uniform, erk) by largest remainder, exactly. The
reference count rules ('synflow', 'openlth') are `lottery.count_rules`.
Units: density = fraction of prunable weights kept; fraction = share of the alive ones removed.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lottery import masks

PyTree = Any
INT32_MAX = 2**31 - 1


def exact(x) -> Fraction | None:
    """`x` as an exact Fraction (of its shortest decimal form) if concrete, None if traced."""
    if isinstance(x, jax.core.Tracer):
        return None
    if np.ndim(x) != 0:
        raise ValueError(f"expected a scalar, got an array of shape {np.shape(x)}")
    if isinstance(x, (bool, np.bool_)):
        raise ValueError(f"expected a number, got {x!r}")
    if isinstance(x, (int, np.integer)):
        return Fraction(int(x))
    return Fraction(repr(float(x)))


def check_density(density) -> Fraction | None:
    """`exact(density)`, after checking a concrete density is in (0, 1]."""
    d = exact(density)
    if d is not None and not 0 < d <= 1:
        raise ValueError(f"density must be in (0, 1] (fraction of prunable weights kept), "
                         f"got {density}")
    return d


def check_fraction(fraction) -> Fraction | None:
    """`exact(fraction)`, after checking a concrete fraction is in [0, 1)."""
    f = exact(fraction)
    if f is not None and not 0 <= f < 1:
        raise ValueError(f"fraction must be in [0, 1) (share of the alive weights removed), "
                         f"got {fraction}")
    return f


def check_rates(rates: PyTree, mask: PyTree, name: str = "rates") -> list[float]:
    """The rate leaves, after checking that `rates` has the leaves of `mask`."""
    r_paths, m_paths = masks.paths(rates), masks.paths(mask)
    if r_paths != m_paths:
        diff = [p for p in m_paths if p not in r_paths] + [p for p in r_paths if p not in m_paths]
        first = diff[0] if diff else next(a for a, b in zip(m_paths, r_paths) if a != b)
        raise ValueError(f"{name} does not match the mask at path {first!r}")
    leaves = jax.tree.leaves(rates)
    for p, r in zip(r_paths, leaves):
        if isinstance(r, jax.core.Tracer):
            raise ValueError(f"{name} must be Python floats (static), got a traced value at {p!r}")
        if not float(r) >= 0.0:
            raise ValueError(f"{name} at {p!r} must be >= 0, got {r}")
    return [float(r) for r in leaves]


def round_half_up(x: Fraction) -> int:
    """floor(x + 1/2): the rounding of every count."""
    return math.floor(x + Fraction(1, 2))


def scaled_count(factor, count, bound: int):
    """round-half-up(factor * count) as int32; `count` is an int32 array in [0, bound].

    Exact integer arithmetic when `factor` is a static Fraction p/q with 2*p*bound + q < 2**31,
    float32 otherwise.
    """
    if isinstance(factor, Fraction) and 2 * factor.numerator * bound + factor.denominator \
            <= INT32_MAX:
        p, q = factor.numerator, factor.denominator
        return (2 * p * count + q) // (2 * q)
    return jnp.floor(jnp.float32(float(factor)) * count + 0.5).astype(jnp.int32)


def density_counts(density, exact: Fraction | None, sizes: Sequence[int]):
    """round-half-up(density * size) per size: exact (numpy int32) for a static density, float32
    arithmetic (jnp int32) for a traced one."""
    if exact is not None:
        return np.asarray([round_half_up(exact * n) for n in sizes], np.int32)
    d = jnp.asarray(density, jnp.float32)
    return jnp.floor(d * jnp.asarray(sizes, jnp.float32) + 0.5).astype(jnp.int32)


def allocate(total: int, shapes: Sequence[tuple[int, ...]], scope: str) -> list[int]:
    """Split `total` kept weights over leaves of `shapes` (see the header: uniform / erk, largest
    remainder), in exact rational arithmetic. `total` <= the sum of the sizes."""
    sizes = [math.prod(s) for s in shapes]
    live = [i for i, n in enumerate(sizes) if n > 0]
    real = [Fraction(0)] * len(shapes)
    if scope == "uniform":
        for i in live:
            real[i] = Fraction(total * sizes[i], sum(sizes))
    elif live:
        ratio = {i: Fraction(sum(shapes[i]), sizes[i]) for i in live}
        dense: set[int] = set()
        while True:  # JaxPruner's loop: densify the largest ratio while its density exceeds 1
            rest = [i for i in live if i not in dense]
            eps = Fraction(total - sum(sizes[i] for i in dense),
                           sum(ratio[i] * sizes[i] for i in rest))
            top = max(ratio[i] for i in rest)
            if top * eps <= 1:
                break
            dense |= {i for i in rest if ratio[i] == top}
        for i in live:
            real[i] = Fraction(sizes[i]) if i in dense else eps * ratio[i] * sizes[i]
    counts = [math.floor(r) for r in real]
    order = sorted(range(len(real)), key=lambda i: (counts[i] - real[i], i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


def allocate_on_device(total, shapes: tuple[tuple[int, ...], ...], scope: str):
    """`allocate` for a traced `total` (int32 scalar): computed on the host, under jit too."""
    def host(t):
        return np.asarray(allocate(int(t), shapes, scope), np.int32)
    return jax.pure_callback(host, jax.ShapeDtypeStruct((len(shapes),), jnp.int32), total,
                             vmap_method="sequential")


def exact_rate(r: float) -> Fraction:
    """A leaf's rate multiplier as the Fraction of its shortest decimal."""
    return Fraction(repr(float(r)))
