"""Pruning: scores and a mask in, a smaller mask out.

Every function here is pure and works under `jit` (densities and fractions may be traced; the
`rates` pytree of Python floats must stay static). Units: density = fraction of prunable weights
KEPT; fraction = share of the currently alive prunable weights removed in one step. Scores are a
float pytree like the params: HIGHER = KEEP.

Rules shared by all functions:

* A dead entry (False in `mask`) is never kept, whatever its score: masks only shrink.
* Ranking: alive before dead, then score descending (NaN below every number, -0.0 == 0.0, and
  subnormal scores equal to 0.0: XLA flushes them to zero on CPU), then
  the lower flat index wins a tie. Global scope ranks the concatenation of the rate-1 leaves in
  `jax.tree.leaves` order (row-major inside a leaf), so with all-equal scores the first entries
  of the first leaves are kept.
* Counts round half up. For a Python (or numpy) number the product is taken exactly, reading the
  number as its shortest decimal form (0.15 means 15/100); a traced density is multiplied in
  float32, exact while density * count stays below 2**24 apart from float32's rounding of the
  density itself.
* Rates (see `lottery.masks.prunable`): rate 0 leaves are untouched. Let f be the fraction of the
  alive prunable weights a step removes. A leaf with rate r != 1 removes round(r * f * alive)
  of its alive weights (clipped to [0, alive]); the rate-1 leaves take what is left of the budget,
  so in global scope the total count stays exact (as long as the rate-1 leaves can absorb it).
  In layerwise scope every leaf uses its own f.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lottery import masks, schedules

PyTree = Any
SCOPES = ("global", "layerwise")
NORMS = ("l1", "l2", "sum")
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# Argument checks and exact counting.


def _static(x) -> Fraction | None:
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


def _check_density(density) -> Fraction | None:
    d = _static(density)
    if d is not None and not 0 < d <= 1:
        raise ValueError(f"density must be in (0, 1] (fraction of prunable weights kept), "
                         f"got {density}")
    return d


def _check_fraction(fraction) -> Fraction | None:
    f = _static(fraction)
    if f is not None and not 0 <= f < 1:
        raise ValueError(f"fraction must be in [0, 1) (share of the alive weights removed), "
                         f"got {fraction}")
    return f


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {scope!r}")


def _check_rates(rates: PyTree, mask: PyTree) -> list[float]:
    """The rate leaves, after checking that `rates` has the leaves of `mask`."""
    r_paths, m_paths = masks.paths(rates), masks.paths(mask)
    if r_paths != m_paths:
        diff = [p for p in m_paths if p not in r_paths] + [p for p in r_paths if p not in m_paths]
        first = diff[0] if diff else next(a for a, b in zip(m_paths, r_paths) if a != b)
        raise ValueError(f"rates does not match the mask at path {first!r}")
    leaves = jax.tree.leaves(rates)
    for p, r in zip(r_paths, leaves):
        if isinstance(r, jax.core.Tracer):
            raise ValueError(f"rates must be Python floats (static), got a traced value at {p!r}")
        if not float(r) >= 0.0:
            raise ValueError(f"rates at {p!r} must be >= 0, got {r}")
    return [float(r) for r in leaves]


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def _scaled_count(factor, count, bound: int):
    """round-half-up(factor * count) as int32; `count` is an int32 array in [0, bound].

    Exact integer arithmetic when `factor` is a static Fraction p/q with 2*p*bound + q < 2**31,
    float32 otherwise.
    """
    if isinstance(factor, Fraction) and 2 * factor.numerator * bound + factor.denominator \
            <= _INT32_MAX:
        p, q = factor.numerator, factor.denominator
        return (2 * p * count + q) // (2 * q)
    return jnp.floor(jnp.float32(float(factor)) * count + 0.5).astype(jnp.int32)


def _density_counts(density, exact: Fraction | None, sizes: Sequence[int]):
    """round-half-up(density * size) per size: exact (numpy int32) for a static density, float32
    arithmetic (jnp int32) for a traced one."""
    if exact is not None:
        return np.asarray([_round_half_up(exact * n) for n in sizes], np.int32)
    d = jnp.asarray(density, jnp.float32)
    return jnp.floor(d * jnp.asarray(sizes, jnp.float32) + 0.5).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# The selection engine. An "item" is a weight (unstructured) or an output unit (structured); its
# cost is the number of alive weights it holds (1 for a weight).


def _rank_key(scores, alive):
    """Unsigned keys, smaller = better: alive scores descending, then alive NaNs, then dead items.

    Float bits are mapped to an order-preserving unsigned integer (flip all bits of negatives,
    the sign bit of positives), then inverted for descending order; -0.0 counts as 0.0. float64
    scores (only under jax_enable_x64) keep their precision; other floats are ranked in float32.
    """
    wide = scores.dtype == jnp.float64
    ftype, utype = (jnp.float64, jnp.uint64) if wide else (jnp.float32, jnp.uint32)
    top = jnp.iinfo(utype).max
    s = scores.astype(ftype)
    s = jnp.where(s == 0, jnp.zeros((), ftype), s)
    bits = jax.lax.bitcast_convert_type(s, utype)
    sign = jnp.asarray(1, utype) << (8 * jnp.dtype(utype).itemsize - 1)
    ascending = jnp.where((bits & sign) != 0, ~bits, bits | sign)
    key = jnp.where(jnp.isnan(s), jnp.asarray(top - 1, utype), ~ascending)
    return jnp.where(alive, key, jnp.asarray(top, utype))


def _select(scores, alive, cost, budget):
    """Keep the best-ranked alive items whose cumulative cost (in rank order) stays <= `budget`.

    Rank order: `_rank_key`, then the lower index. No sort: a bisection over the key bits finds
    the key T of the first item that no longer fits; items ranked better than T are kept, and
    items with key T are taken in index order while the budget lasts. Linear in the item count
    per bit, which is several times faster than a stable multi-key sort on CPU.
    """
    key = _rank_key(scores, alive)
    utype = key.dtype
    cost = jnp.where(alive, cost, 0)

    def spent_up_to(t):
        return jnp.sum(jnp.where(key <= t, cost, 0))

    def bisect(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        over = spent_up_to(mid) > budget
        return jnp.where(over, lo, mid + 1), jnp.where(over, mid, hi)

    nbits = 8 * jnp.dtype(utype).itemsize
    top = jnp.asarray(jnp.iinfo(utype).max, utype)
    t, _ = jax.lax.fori_loop(0, nbits, bisect, (jnp.zeros((), utype), top))
    below = key < t
    at = key == t
    run = jnp.sum(jnp.where(below, cost, 0)) + jnp.cumsum(jnp.where(at, cost, 0))
    keep = alive & (below | (at & (run <= budget)))
    return jnp.where(spent_up_to(top) <= budget, alive, keep)


def _kept_cost(keep, cost):
    return jnp.sum(jnp.where(keep, cost, 0))


def _finish(items, rates, scope, q_keep, base_target):
    """Select items: leaves with rate != 1 keep `q_keep[i]` items each; rate-1 leaves keep
    `base_target` (global: one cost budget for all of them, minus what the others kept;
    layerwise: a list of per-leaf item counts)."""
    out = [None] * len(items)
    for i, (s, a, c) in enumerate(items):
        if rates[i] != 1.0:
            out[i] = _select(s, a, jnp.ones_like(c), q_keep[i])
    base = [i for i in range(len(items)) if rates[i] == 1.0]
    if scope == "layerwise":
        for i in base:
            s, a, c = items[i]
            out[i] = _select(s, a, jnp.ones_like(c), base_target[i])
    elif base:
        spent = sum((_kept_cost(out[i], items[i][2]) for i in range(len(items)) if i not in base),
                    jnp.int32(0))
        budget = jnp.maximum(base_target - spent, 0)
        sizes = [items[i][0].shape[0] for i in base]
        cat = [jnp.concatenate([items[i][k] for i in base]) for k in range(3)]
        keep = _select(*cat, budget)
        for i, part in zip(base, jnp.split(keep, np.cumsum(sizes)[:-1])):
            out[i] = part
    return out


def _to_counts(items, rates, scope, counts):
    """The density step. `counts`: global [K] kept cost over all leaves; layerwise the kept item
    count of each leaf. Rate-r leaves remove round(r * f * alive) items."""
    alive_n = [jnp.sum(a, dtype=jnp.int32) for _, a, _ in items]
    if scope == "global":
        alive_w = sum((_kept_cost(a, c) for _, a, c in items), jnp.int32(0))
        k = jnp.minimum(counts[0], alive_w)
        f = jnp.where(alive_w > 0, 1.0 - k / jnp.maximum(alive_w, 1), 0.0)
        q_keep = {i: n - jnp.clip(jnp.floor(rates[i] * f * n + 0.5).astype(jnp.int32), 0, n)
                  for i, n in enumerate(alive_n) if rates[i] != 1.0}
        return _finish(items, rates, scope, q_keep, k)
    keep = [jnp.minimum(counts[i], n) for i, n in enumerate(alive_n)]
    # f_l = 1 - keep_l / alive_l, so r * f_l * alive_l = r * (alive_l - keep_l).
    q_keep = {i: n - jnp.clip(_scaled_count(_exact_rate(rates[i]), n - keep[i],
                                            items[i][0].shape[0]), 0, n)
              for i, n in enumerate(alive_n) if rates[i] != 1.0}
    return _finish(items, rates, scope, q_keep, keep)


def _exact_rate(r: float) -> Fraction:
    return Fraction(repr(float(r)))


# ----------------------------------------------------------------------------------------------
# Unstructured pruning.


def _weight_items(scores, mask, rates):
    """(prunable leaf indices, [(flat scores, flat alive, ones)]) of the leaves with rate > 0."""
    s_leaves, m_leaves = jax.tree.leaves(scores), jax.tree.leaves(mask)
    idx = [i for i, r in enumerate(rates) if r > 0]
    items = [(jnp.ravel(s_leaves[i]), jnp.ravel(m_leaves[i]).astype(bool),
              jnp.ones(np.size(m_leaves[i]), jnp.int32)) for i in idx]
    return idx, items


def _unflatten_weights(mask, idx, keep):
    leaves, treedef = jax.tree.flatten(mask)
    leaves = list(leaves)
    for i, k in zip(idx, keep):
        leaves[i] = k.reshape(jnp.shape(leaves[i])) & leaves[i].astype(bool)
    return jax.tree.unflatten(treedef, leaves)


def _prepare(scores, mask, rates, scope):
    _check_scope(scope)
    masks.check(mask, scores, "mask")
    rates = masks.resolve_rates(mask, rates)
    return _check_rates(rates, mask)


@functools.partial(jax.jit, static_argnames=("rates_l", "scope"))
def _prune_to_counts(scores, mask, counts, *, rates_l, scope):
    """The density step on weights; one compiled program per tree structure, shapes and rates."""
    idx, items = _weight_items(scores, mask, rates_l)
    keep = _to_counts(items, [rates_l[i] for i in idx], scope, counts)
    return _unflatten_weights(mask, idx, keep)


def _weight_counts(density, exact, mask, rates_l, scope):
    sizes = [int(np.size(m)) for m, r in zip(jax.tree.leaves(mask), rates_l) if r > 0]
    return _density_counts(density, exact, [sum(sizes)] if scope == "global" else sizes)


def to_density(scores: PyTree, mask: PyTree, density, *, scope: str = "global",
               rates: PyTree | None = None, allow_collapse: bool = True) -> PyTree:
    """Keep the highest-scoring alive prunable weights so that the prunable density is `density`.

    Global scope keeps round-half-up(density * N) weights out of the N prunable ones (ranked
    together); layerwise keeps round-half-up(density * n) in every leaf of n weights. Weights that
    are already dead stay dead, so a target above the current density keeps what is alive.
    `allow_collapse=False` raises ValueError if a prunable leaf ends up empty (needs concrete
    values: not under jit).
    """
    exact = _check_density(density)
    rates_l = _prepare(scores, mask, rates, scope)
    counts = _weight_counts(density, exact, mask, rates_l, scope)
    out = _prune_to_counts(scores, mask, counts, rates_l=tuple(rates_l), scope=scope)
    return _maybe_refuse_collapse(out, rates, allow_collapse)


def remove_fraction(scores: PyTree, mask: PyTree, fraction, *, scope: str = "global",
                    rates: PyTree | None = None, allow_collapse: bool = True) -> PyTree:
    """One IMP step: remove the round-half-up(fraction * alive) lowest-scoring alive weights.

    Global scope counts `alive` over all prunable leaves; layerwise per leaf. A rate-r leaf
    removes round-half-up(r * fraction * alive) of its own.
    """
    exact = _check_fraction(fraction)
    rates_l = _prepare(scores, mask, rates, scope)
    fits, pq = None, None
    if exact is not None:
        # Slot 0: the total (fraction, bound N); slot 1 + k: prunable leaf k (rate * fraction).
        sizes = [int(np.size(m)) for m, r in zip(jax.tree.leaves(mask), rates_l) if r > 0]
        factors = [exact] + [_exact_rate(r) * exact for r in rates_l if r > 0]
        bounds = [sum(sizes)] + sizes
        fits = tuple(2 * f.numerator * b + f.denominator <= _INT32_MAX
                     for f, b in zip(factors, bounds))
        pq = np.asarray([(f.numerator, f.denominator) if ok else (0, 1)
                         for f, ok in zip(factors, fits)], np.int32)
    out = _remove(scores, mask, fraction, pq, rates_l=tuple(rates_l), scope=scope, fits=fits)
    return _maybe_refuse_collapse(out, rates, allow_collapse)


@functools.partial(jax.jit, static_argnames=("rates_l", "scope", "fits"))
def _remove(scores, mask, fraction, pq, *, rates_l, scope, fits):
    """remove_fraction's body. `fits[j]`: slot j's factor is the exact ratio pq[j] (integer
    arithmetic); otherwise (or with `fits` None, a traced fraction) it is multiplied in float32."""
    idx, items = _weight_items(scores, mask, rates_l)
    rates_p = [rates_l[i] for i in idx]
    alive_n = [jnp.sum(a, dtype=jnp.int32) for _, a, _ in items]

    def removed(slot, rate, n):
        if fits is not None and fits[slot]:
            p, q = pq[slot, 0], pq[slot, 1]
            r = (2 * p * n + q) // (2 * q)
        else:
            r = jnp.floor(rate * jnp.asarray(fraction, jnp.float32) * n + 0.5).astype(jnp.int32)
        return jnp.clip(r, 0, n)

    q_keep = {k: n - removed(1 + k, rates_p[k], n)
              for k, n in enumerate(alive_n) if rates_p[k] != 1.0}
    if scope == "global":
        total = sum(alive_n, jnp.int32(0))
        target = total - removed(0, 1.0, total)
    else:
        target = [n - removed(1 + k, 1.0, n) for k, n in enumerate(alive_n)]
    keep = _finish(items, rates_p, scope, q_keep, target)
    return _unflatten_weights(mask, idx, keep)


# ----------------------------------------------------------------------------------------------
# Iterative pruning at initialization (SynFlow-style), all rounds in one compiled program.


@functools.partial(jax.jit, static_argnames=("scorer", "scope", "rates_l"))
def _iterate(scorer, scope, rates_l, params, mask, inputs, counts):
    def body(r, m):
        return _prune_to_counts(scorer(params, m, inputs), m, counts[r], rates_l=rates_l,
                                scope=scope)
    return jax.lax.fori_loop(0, counts.shape[0], body, mask)


def iterative(scorer: Callable, params: PyTree, mask: PyTree, inputs: Any, density, *,
              rounds: int = 100, schedule: str = "exponential", scope: str = "global",
              rates: PyTree | None = None, allow_collapse: bool = True) -> PyTree:
    """Prune at init in `rounds` rounds, rescoring the masked network before every round.

    Round r prunes to `schedules.get(schedule)(density, rounds)[r - 1]` (exponential:
    density**(r / R), Synaptic-Flow's choice for SynFlow with R = 100), so the last round lands on
    exactly the `to_density(..., density)` count. `scorer(params, mask, inputs) -> scores` (higher
    = keep) is traced once: the rounds are a `lax.fori_loop` inside one jitted program, cached
    across calls with the same scorer, scope, rates and rounds.
    """
    exact = _check_density(density)
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"rounds must be a Python int >= 1, got {rounds!r}")
    sched = schedules.get(schedule)
    _check_scope(scope)
    masks.check(mask, params, "mask")
    rates_l = _check_rates(masks.resolve_rates(mask, rates), mask)
    targets = sched(density, int(rounds))
    if exact is not None:
        counts = np.stack([_weight_counts(float(d), _static(float(d)), mask, rates_l, scope)
                           for d in np.asarray(targets)])
        # The last round must hit the same count as to_density(density) exactly.
        counts[-1] = _weight_counts(density, exact, mask, rates_l, scope)
    else:
        counts = jax.vmap(lambda d: _weight_counts(d, None, mask, rates_l, scope))(targets)
    out = _iterate(scorer, scope, tuple(rates_l), params, mask, inputs, counts)
    return _maybe_refuse_collapse(out, rates, allow_collapse)


# ----------------------------------------------------------------------------------------------
# Layer collapse.


def collapsed(mask: PyTree, rates: PyTree | None = None) -> list[str]:
    """Paths of the prunable leaves with no weight left (layer collapse); needs a concrete mask."""
    return [p for p, (kept, _) in masks.counts(mask, rates).items() if kept == 0]


def _maybe_refuse_collapse(mask: PyTree, rates: PyTree | None, allow: bool) -> PyTree:
    if allow:
        return mask
    if any(isinstance(m, jax.core.Tracer) for m in jax.tree.leaves(mask)):
        raise ValueError("allow_collapse=False needs concrete values: call outside jit, or check "
                         "lottery.prune.collapsed(mask) on the result")
    dead = collapsed(mask, rates)
    if dead:
        raise ValueError(f"pruning collapsed layer(s) {dead} (no weight left); pass "
                         f"allow_collapse=True to accept this, or prune iteratively")
    return mask


# ----------------------------------------------------------------------------------------------
# Structured pruning: whole output units (last axis of a Dense (in, out) or conv (kh, kw, in, out)
# kernel). Density still counts weights: global scope keeps units, best first, while the kept
# weights stay <= round-half-up(density * N), so it may fall short of the target by less than one
# unit; layerwise keeps round-half-up(density * units) units per leaf, which is exactly that
# weight density when the leaf's units are whole (all units of a layer have the same size).


def unit_scores(params_or_scores: PyTree, rates: PyTree | None = None,
                norm: str = "l1") -> PyTree:
    """One score per output unit (last axis) of every prunable leaf: its weights' L1 or L2 norm, or
    the 'sum' of per-weight scores. Non-prunable leaves give zeros of shape (last axis,)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")
    rates_l = _check_rates(masks.resolve_rates(params_or_scores, rates), params_or_scores)
    reduce = {"l1": lambda x, ax: jnp.sum(jnp.abs(x), ax),
              "l2": lambda x, ax: jnp.sqrt(jnp.sum(jnp.square(x), ax)),
              "sum": lambda x, ax: jnp.sum(x, ax)}[norm]
    leaves, treedef = jax.tree.flatten(params_or_scores)
    out = []
    for x, r in zip(leaves, rates_l):
        units = jnp.shape(x)[-1:] if jnp.ndim(x) else ()
        if r > 0:
            out.append(reduce(jnp.asarray(x, jnp.float32), tuple(range(jnp.ndim(x) - 1))))
        else:
            out.append(jnp.zeros(units, jnp.float32))
    return jax.tree.unflatten(treedef, out)


def units_to_density(unit_scores: PyTree, mask: PyTree, density, *, scope: str = "global",
                     rates: PyTree | None = None, allow_collapse: bool = True) -> PyTree:
    """Zero whole output units (every weight of a unit) so the prunable weight density is about
    `density`: see the section comment above for how the counts are taken. A unit is alive while
    any of its weights is; kept units keep their current mask, removed ones never come back."""
    exact = _check_density(density)
    _check_scope(scope)
    rates_l = _check_rates(masks.resolve_rates(mask, rates), mask)
    _check_unit_shapes(unit_scores, mask, rates_l)
    m_leaves = jax.tree.leaves(mask)
    idx = [i for i, r in enumerate(rates_l) if r > 0]
    if scope == "global":
        sizes = [sum(int(np.size(m_leaves[i])) for i in idx)]
    else:
        sizes = [int(np.shape(m_leaves[i])[-1]) for i in idx]
    counts = _density_counts(density, exact, sizes)
    out = _units(unit_scores, mask, counts, rates_l=tuple(rates_l), scope=scope)
    return _maybe_refuse_collapse(out, rates, allow_collapse)


@functools.partial(jax.jit, static_argnames=("rates_l", "scope"))
def _units(unit_scores, mask, counts, *, rates_l, scope):
    """units_to_density's body: items are units, their cost the alive weights they hold."""
    u_leaves, m_leaves = jax.tree.leaves(unit_scores), jax.tree.leaves(mask)
    idx = [i for i, r in enumerate(rates_l) if r > 0]
    items = []
    for i in idx:
        per_unit = jnp.asarray(m_leaves[i], bool).reshape(-1, jnp.shape(m_leaves[i])[-1])
        items.append((u_leaves[i], jnp.any(per_unit, 0), jnp.sum(per_unit, 0, dtype=jnp.int32)))
    keep = _to_counts(items, [rates_l[i] for i in idx], scope, counts)
    leaves, treedef = jax.tree.flatten(mask)
    leaves = list(leaves)
    for i, k in zip(idx, keep):
        leaves[i] = jnp.asarray(leaves[i], bool) & k
    return jax.tree.unflatten(treedef, leaves)


def _check_unit_shapes(unit_scores, mask, rates_l) -> None:
    u_paths, m_paths = masks.paths(unit_scores), masks.paths(mask)
    if u_paths != m_paths:
        diff = [p for p in m_paths if p not in u_paths] + [p for p in u_paths if p not in m_paths]
        first = diff[0] if diff else next(a for a, b in zip(m_paths, u_paths) if a != b)
        raise ValueError(f"unit_scores does not match the mask at path {first!r}")
    for p, u, m, r in zip(m_paths, jax.tree.leaves(unit_scores), jax.tree.leaves(mask), rates_l):
        if r > 0 and jnp.shape(u) != jnp.shape(m)[-1:]:
            raise ValueError(f"unit_scores at {p!r} must have shape {tuple(jnp.shape(m)[-1:])} "
                             f"(one score per output unit), got {tuple(jnp.shape(u))}")
