"""The reference count rules of `lottery.prune`: Synaptic-Flow's and OpenLTH's own arithmetic.

`count_rule='synflow'` is Synaptic-Flow's `Pruner.mask`, `'openlth'` OpenLTH's `sparse_global`
step (the rules are stated in `lottery.prune`'s header). Their counts are taken as the references
take them, in float64 (`host_keep`): for a Python number on the host, and through
`jax.pure_callback` when they depend on the alive weights of a traced mask (`reference_step`).
Both drop every weight tied with the threshold, with lottery's ranking (`lottery.selection`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lottery import counting, masks, selection

PyTree = Any
COUNT_RULES = ("exact", "synflow", "openlth")


def check_rule(count_rule: str, scope: str, rates_l: list[float], count_basis: PyTree | None,
               mask: PyTree) -> tuple[float, ...]:
    """Validate `count_rule` against scope and rates; the count-basis leaves (openlth's
    `remaining` is counted over the leaves > 0: by default the pruned ones)."""
    if count_rule not in COUNT_RULES:
        raise ValueError(f"count_rule must be one of {', '.join(map(repr, COUNT_RULES))}, "
                         f"got {count_rule!r}")
    if count_rule != "exact" and scope not in ("global", "layerwise"):
        raise ValueError(f"count_rule={count_rule!r} counts in scope 'global' or 'layerwise' (the "
                         f"reference's global and local), got scope {scope!r}")
    if count_rule != "exact" or scope in ("uniform", "erk"):
        odd = [p for p, r in zip(masks.paths(mask), rates_l) if r not in (0.0, 1.0)]
        if odd:
            what = f"count_rule={count_rule!r}" if count_rule != "exact" else f"scope={scope!r}"
            raise ValueError(f"{what} takes rates of 0 or 1 only (no rate multipliers), got "
                             f"{rates_l[masks.paths(mask).index(odd[0])]} at {odd[0]!r}")
    if count_basis is None:
        return tuple(rates_l)
    if count_rule != "openlth" or scope != "global":
        raise ValueError(f"count_basis is used by count_rule='openlth' in global scope only, got "
                         f"count_rule={count_rule!r}, scope={scope!r}")
    basis = counting.check_rates(count_basis, mask, "count_basis")
    missing = [p for p, r, b in zip(masks.paths(mask), rates_l, basis) if r > 0 and not b > 0]
    if missing:
        raise ValueError(f"count_basis must count every pruned leaf; it leaves out {missing}")
    return tuple(basis)


def f64_bits(x) -> np.ndarray:
    """A Python float as two uint32 words: passes its exact float64 value through jit."""
    return np.asarray([float(x)], np.float64).view(np.uint32)


def host_value(x, static) -> jax.Array | np.ndarray:
    """`x` for the host callbacks: float64 bits if static, else the traced value in float32."""
    return f64_bits(x) if static is not None else jnp.asarray(x, jnp.float32)


def synflow_keep(density, static, sizes: Sequence[int]):
    """n - int((1.0 - density) * n) per size: Synaptic-Flow's count of pruned entries, in Python
    float64 for a static density (float32 for a traced one)."""
    if static is not None:
        d = float(density)
        return np.asarray([n - int((1.0 - d) * n) for n in sizes], np.int32)
    n = jnp.asarray(sizes, jnp.float32)
    k = jnp.floor((1.0 - jnp.asarray(density, jnp.float32)) * n)
    return (n - k).astype(jnp.int32)


def host_keep(rule: str, mode: str, sizes: tuple[int, ...], value, alive, basis):
    """Kept counts of the reference rules, in their float64 arithmetic (host side).

    `value`: the density or fraction (float64 bits, or a float32 from a traced value); `alive`:
    alive entries in each scope unit; `basis`: openlth's `remaining` per unit; `sizes`: all
    entries of the basis per unit (openlth densities).
    """
    v = np.asarray(value)
    x = v.view(np.float64)[0] if v.dtype == np.uint32 else np.float64(v)
    a = np.asarray(alive).astype(np.float64)
    if rule == "synflow":  # remove_fraction: int(f * alive) of the alive entries go
        keep = a - np.floor(x * a)
    else:
        b = np.asarray(basis).astype(np.float64)
        n = np.ceil(x * b) if mode == "fraction" else np.ceil(b - x * np.asarray(sizes, float))
        keep = np.maximum(a - n - 1, 0)
        if mode == "density":  # nothing to prune: the target is at or above the density
            keep = np.where(n <= 0, a, keep)
    return keep.astype(np.int32)


def reference_step(scores, mask, value, *, rates_l, basis_l, scope, rule, mode):
    """A 'synflow' remove_fraction or an 'openlth' step: counts from the alive weights, taken in
    the reference's float64 arithmetic on the host (`host_keep`), then ties dropped."""
    idx, items = selection.weight_items(scores, mask, rates_l)
    m_leaves = jax.tree.leaves(mask)
    alive = jnp.stack([jnp.sum(a, dtype=jnp.int32) for _, a, _ in items])
    basis, sizes = alive, tuple(int(np.size(m_leaves[i])) for i in idx)
    if scope == "global":
        counted = [i for i, b in enumerate(basis_l) if b > 0]
        alive = jnp.sum(alive, keepdims=True)
        basis = sum((jnp.sum(jnp.asarray(m_leaves[i], bool), dtype=jnp.int32) for i in counted),
                    jnp.int32(0))[None]
        sizes = (sum(int(np.size(m_leaves[i])) for i in counted),)
    host = functools.partial(host_keep, rule, mode, sizes)
    keep = jax.pure_callback(host, jax.ShapeDtypeStruct(alive.shape, jnp.int32), value, alive,
                             basis, vmap_method="sequential")
    target = keep[0] if scope == "global" else [keep[k] for k in range(len(idx))]
    out = selection.finish(items, [1.0] * len(idx), scope, {}, target, drop_ties=True)
    return selection.unflatten_weights(mask, idx, out)


reference_prune = functools.partial(jax.jit, static_argnames=(
    "rates_l", "basis_l", "scope", "rule", "mode"))(reference_step)


# Synaptic-Flow's `prune_loop` densities for round r of R (0-based), in its float arithmetic.
SYNFLOW_SCHEDULES = {"exponential": lambda d, r, R: d ** ((r + 1) / R),
                      "linear": lambda d, r, R: 1.0 - (1.0 - d) * ((r + 1) / R)}
