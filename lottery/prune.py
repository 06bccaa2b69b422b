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
* Scopes: 'global' ranks all rate-1 leaves together; 'layerwise' rounds every leaf on its own
  (round-half-up(d * n_l), so the total may differ from the global count by up to half a weight
  per leaf). 'uniform' and 'erk' first fix every leaf's kept count, then select by score inside
  each leaf: the total is exactly the global count K = round-half-up(d * N), split in proportion
  to n_l (uniform: every leaf at density K / N) or to the sum of the leaf's dimensions (erk,
  Erdős–Rényi-kernel, Evci et al. 2020: density_l = eps * sum(shape_l) / prod(shape_l); a leaf
  that would exceed density 1 is kept dense and eps re-solved on the rest, the leaves with the
  largest ratio first, as JaxPruner's `get_sparsities_erdos_renyi`). The real-valued shares are
  made integers by largest remainder (floors, then +1 to the largest fractional parts, the
  earlier leaf on a tie), in exact rational arithmetic; a leaf with fewer alive weights than its
  share keeps what is alive. erk and uniform take rates of 0 or 1 only.
* Count rules (`count_rule`, global or layerwise scope, rates 0 or 1): 'exact' is everything
  above. 'synflow' is Synaptic-Flow's `Pruner.mask`: prune k = int((1.0 - d) * N) of the N
  entries in scope, dead ones included (they rank lowest, as the reference's masked scores of
  -inf), and every alive entry tied with the k-th lowest; k < 1 leaves the mask unchanged.
  'openlth' is OpenLTH's `sparse_global` step: n = ceil(fraction * remaining), remaining = alive
  weights of the `count_basis` leaves (default: the pruned leaves; pass all prunable leaves to
  count OpenLTH's `pruning_layers_to_ignore` too), then prune every alive entry scoring <= the
  (n + 1)-th lowest alive score (n + 1 entries plus ties; all of them when n >= alive). The
  float arithmetic is the references' own, in float64 (Python for a static density, the host
  via `jax.pure_callback` when it needs on-device counts), so 1 - 0.9 = 0.0999... and
  0.07 * 100 = 7.000000000000001 count as they do there. Both rules drop ties at the threshold
  and keep lottery's ranking (NaN lowest, dead below all alive scores). A traced density or
  fraction is float32, so those counts are reference-exact only for Python numbers.
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
SCOPES = ("global", "layerwise", "uniform", "erk")
COUNT_RULES = ("exact", "synflow", "openlth")
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


def _check_rates(rates: PyTree, mask: PyTree, name: str = "rates") -> list[float]:
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


def _check_rule(count_rule: str, scope: str, rates_l: list[float], count_basis: PyTree | None,
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
    basis = _check_rates(count_basis, mask, "count_basis")
    missing = [p for p, r, b in zip(masks.paths(mask), rates_l, basis) if r > 0 and not b > 0]
    if missing:
        raise ValueError(f"count_basis must count every pruned leaf; it leaves out {missing}")
    return tuple(basis)


def _f64_bits(x) -> np.ndarray:
    """A Python float as two uint32 words: passes its exact float64 value through jit."""
    return np.asarray([float(x)], np.float64).view(np.uint32)


def _host_value(x, static) -> jax.Array | np.ndarray:
    """`x` for the host callbacks: float64 bits if static, else the traced value in float32."""
    return _f64_bits(x) if static is not None else jnp.asarray(x, jnp.float32)


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


def _synflow_keep(density, static, sizes: Sequence[int]):
    """n - int((1.0 - density) * n) per size: Synaptic-Flow's count of pruned entries, in Python
    float64 for a static density (float32 for a traced one)."""
    if static is not None:
        d = float(density)
        return np.asarray([n - int((1.0 - d) * n) for n in sizes], np.int32)
    n = jnp.asarray(sizes, jnp.float32)
    k = jnp.floor((1.0 - jnp.asarray(density, jnp.float32)) * n)
    return (n - k).astype(jnp.int32)


def _allocate(total: int, shapes: Sequence[tuple[int, ...]], scope: str) -> list[int]:
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


def _allocate_on_device(total, shapes: tuple[tuple[int, ...], ...], scope: str):
    """`_allocate` for a traced `total` (int32 scalar): computed on the host, under jit too."""
    def host(t):
        return np.asarray(_allocate(int(t), shapes, scope), np.int32)
    return jax.pure_callback(host, jax.ShapeDtypeStruct((len(shapes),), jnp.int32), total,
                             vmap_method="sequential")


def _host_keep(rule: str, mode: str, sizes: tuple[int, ...], value, alive, basis):
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


def _select(scores, alive, cost, budget, drop_ties: bool = False):
    """Keep the best-ranked alive items whose cumulative cost (in rank order) stays <= `budget`.

    Rank order: `_rank_key`, then the lower index. No sort: a bisection over the key bits finds
    the key T of the first item that no longer fits; items ranked better than T are kept, and
    items with key T are taken in index order while the budget lasts (none of them with
    `drop_ties`: the reference rules prune everything tied with the threshold). Linear in the
    item count per bit, which is several times faster than a stable multi-key sort on CPU.
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
    keep = alive & below if drop_ties else alive & (below | (at & (run <= budget)))
    return jnp.where(spent_up_to(top) <= budget, alive, keep)


def _kept_cost(keep, cost):
    return jnp.sum(jnp.where(keep, cost, 0))


def _finish(items, rates, scope, q_keep, base_target, drop_ties=False):
    """Select items: leaves with rate != 1 keep `q_keep[i]` items each; rate-1 leaves keep
    `base_target` (global: one cost budget for all of them, minus what the others kept; other
    scopes: a list of per-leaf item counts)."""
    out = [None] * len(items)
    for i, (s, a, c) in enumerate(items):
        if rates[i] != 1.0:
            out[i] = _select(s, a, jnp.ones_like(c), q_keep[i])
    base = [i for i in range(len(items)) if rates[i] == 1.0]
    if scope != "global":
        for i in base:
            s, a, c = items[i]
            out[i] = _select(s, a, jnp.ones_like(c), base_target[i], drop_ties)
    elif base:
        spent = sum((_kept_cost(out[i], items[i][2]) for i in range(len(items)) if i not in base),
                    jnp.int32(0))
        budget = jnp.maximum(base_target - spent, 0)
        sizes = [items[i][0].shape[0] for i in base]
        cat = [jnp.concatenate([items[i][k] for i in base]) for k in range(3)]
        keep = _select(*cat, budget, drop_ties)
        for i, part in zip(base, jnp.split(keep, np.cumsum(sizes)[:-1])):
            out[i] = part
    return out


def _to_counts(items, rates, scope, counts, drop_ties=False):
    """The density step. `counts`: global [K] kept cost over all leaves; other scopes the kept
    item count of each leaf. Rate-r leaves remove round(r * f * alive) items."""
    alive_n = [jnp.sum(a, dtype=jnp.int32) for _, a, _ in items]
    if scope == "global":
        alive_w = sum((_kept_cost(a, c) for _, a, c in items), jnp.int32(0))
        k = jnp.minimum(counts[0], alive_w)
        f = jnp.where(alive_w > 0, 1.0 - k / jnp.maximum(alive_w, 1), 0.0)
        q_keep = {i: n - jnp.clip(jnp.floor(rates[i] * f * n + 0.5).astype(jnp.int32), 0, n)
                  for i, n in enumerate(alive_n) if rates[i] != 1.0}
        return _finish(items, rates, scope, q_keep, k, drop_ties)
    keep = [jnp.minimum(counts[i], n) for i, n in enumerate(alive_n)]
    # f_l = 1 - keep_l / alive_l, so r * f_l * alive_l = r * (alive_l - keep_l).
    q_keep = {i: n - jnp.clip(_scaled_count(_exact_rate(rates[i]), n - keep[i],
                                            items[i][0].shape[0]), 0, n)
              for i, n in enumerate(alive_n) if rates[i] != 1.0}
    return _finish(items, rates, scope, q_keep, keep, drop_ties)


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


@functools.partial(jax.jit, static_argnames=("rates_l", "scope", "drop_ties"))
def _prune_to_counts(scores, mask, counts, *, rates_l, scope, drop_ties=False):
    """The density step on weights; one compiled program per tree structure, shapes and rates."""
    idx, items = _weight_items(scores, mask, rates_l)
    keep = _to_counts(items, [rates_l[i] for i in idx], scope, counts, drop_ties)
    return _unflatten_weights(mask, idx, keep)


def _weight_counts(density, exact, mask, rates_l, scope, count_rule="exact"):
    """Kept counts for `_prune_to_counts`: global [K], other scopes one per prunable leaf."""
    shapes = tuple(tuple(np.shape(m)) for m, r in zip(jax.tree.leaves(mask), rates_l) if r > 0)
    sizes = [math.prod(s) for s in shapes]
    if scope in ("uniform", "erk"):
        total = _density_counts(density, exact, [sum(sizes)])[0]
        if exact is not None:
            return np.asarray(_allocate(int(total), shapes, scope), np.int32)
        return _allocate_on_device(total, shapes, scope)
    sizes = [sum(sizes)] if scope == "global" else sizes
    if count_rule == "synflow":
        return _synflow_keep(density, exact, sizes)
    return _density_counts(density, exact, sizes)


def keep_counts(mask: PyTree, density, *, scope: str = "global", rates: PyTree | None = None,
                count_rule: str = "exact") -> np.ndarray:
    """The kept counts `to_density` selects with, for a Python density: [K] in global scope,
    one per prunable leaf (in leaf order) otherwise; synflow: N - int((1 - d) * N). For code that
    precomputes counts on the host (AGP) and prunes with them later."""
    exact = _check_density(density)
    if exact is None:
        raise ValueError("keep_counts needs a Python density (it counts on the host)")
    _check_scope(scope)
    rates_l = _check_rates(masks.resolve_rates(mask, rates), mask)
    _check_rule(count_rule, scope, rates_l, None, mask)
    if count_rule == "openlth":
        raise ValueError("count_rule='openlth' counts from the alive weights: no static counts")
    return _weight_counts(density, exact, mask, rates_l, scope, count_rule)


def _reference_step(scores, mask, value, *, rates_l, basis_l, scope, rule, mode):
    """A 'synflow' remove_fraction or an 'openlth' step: counts from the alive weights, taken in
    the reference's float64 arithmetic on the host (`_host_keep`), then ties dropped."""
    idx, items = _weight_items(scores, mask, rates_l)
    m_leaves = jax.tree.leaves(mask)
    alive = jnp.stack([jnp.sum(a, dtype=jnp.int32) for _, a, _ in items])
    basis, sizes = alive, tuple(int(np.size(m_leaves[i])) for i in idx)
    if scope == "global":
        counted = [i for i, b in enumerate(basis_l) if b > 0]
        alive = jnp.sum(alive, keepdims=True)
        basis = sum((jnp.sum(jnp.asarray(m_leaves[i], bool), dtype=jnp.int32) for i in counted),
                    jnp.int32(0))[None]
        sizes = (sum(int(np.size(m_leaves[i])) for i in counted),)
    host = functools.partial(_host_keep, rule, mode, sizes)
    keep = jax.pure_callback(host, jax.ShapeDtypeStruct(alive.shape, jnp.int32), value, alive,
                             basis, vmap_method="sequential")
    target = keep[0] if scope == "global" else [keep[k] for k in range(len(idx))]
    out = _finish(items, [1.0] * len(idx), scope, {}, target, drop_ties=True)
    return _unflatten_weights(mask, idx, out)


_reference_prune = functools.partial(jax.jit, static_argnames=(
    "rates_l", "basis_l", "scope", "rule", "mode"))(_reference_step)


def to_density(scores: PyTree, mask: PyTree, density, *, scope: str = "global",
               rates: PyTree | None = None, allow_collapse: bool = True,
               count_rule: str = "exact", count_basis: PyTree | None = None) -> PyTree:
    """Keep the highest-scoring alive prunable weights so that the prunable density is `density`.

    Global scope keeps round-half-up(density * N) weights out of the N prunable ones (ranked
    together); layerwise keeps round-half-up(density * n) in every leaf of n weights; uniform and
    erk split the global count over the leaves (header). Weights that are already dead stay dead,
    so a target above the current density keeps what is alive. `count_rule` 'synflow' counts as
    Synaptic-Flow's `Pruner.mask(density)`; 'openlth' runs OpenLTH's step with the count
    n = ceil(remaining - density * N_basis) (the step whose `fraction * remaining` is the excess
    over the target; nothing is pruned when n <= 0), `remaining` and N_basis taken over the
    `count_basis` leaves (a rates-like pytree, leaves > 0 counted; e.g. `masks.prunable(params)`
    when `rates` excludes layers OpenLTH would list in `pruning_layers_to_ignore`).
    `allow_collapse=False` raises ValueError if a prunable leaf ends up empty (needs concrete
    values: not under jit).
    """
    exact = _check_density(density)
    rates_l = _prepare(scores, mask, rates, scope)
    basis_l = _check_rule(count_rule, scope, rates_l, count_basis, mask)
    if count_rule == "openlth":
        out = _reference_prune(scores, mask, _host_value(density, exact), rates_l=tuple(rates_l),
                               basis_l=basis_l, scope=scope, rule="openlth", mode="density")
    else:
        counts = _weight_counts(density, exact, mask, rates_l, scope, count_rule)
        out = _prune_to_counts(scores, mask, counts, rates_l=tuple(rates_l), scope=scope,
                               drop_ties=count_rule == "synflow")
    return _maybe_refuse_collapse(out, rates, allow_collapse)


def remove_fraction(scores: PyTree, mask: PyTree, fraction, *, scope: str = "global",
                    rates: PyTree | None = None, allow_collapse: bool = True,
                    count_rule: str = "exact", count_basis: PyTree | None = None) -> PyTree:
    """One IMP step: remove the round-half-up(fraction * alive) lowest-scoring alive weights.

    Global scope counts `alive` over all prunable leaves; layerwise per leaf. A rate-r leaf
    removes round-half-up(r * fraction * alive) of its own. Uniform and erk keep the global
    count, K = alive - round-half-up(fraction * alive), split over the leaves as `to_density`
    splits it (by their full sizes, so an erk run stays on the erk distribution; a leaf with
    fewer alive weights than its share keeps them all and the total falls short).
    `count_rule` 'openlth' is OpenLTH's `sparse_global` step (header; `count_basis` as in
    `to_density`); 'synflow' applies Synaptic-Flow's mask rule to the alive weights: int(fraction
    * alive) of them go, plus ties, none when that is < 1.
    """
    exact = _check_fraction(fraction)
    rates_l = _prepare(scores, mask, rates, scope)
    basis_l = _check_rule(count_rule, scope, rates_l, count_basis, mask)
    if count_rule != "exact":
        out = _reference_prune(scores, mask, _host_value(fraction, exact), rates_l=tuple(rates_l),
                               basis_l=basis_l, scope=scope, rule=count_rule, mode="fraction")
        return _maybe_refuse_collapse(out, rates, allow_collapse)
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
    if scope == "layerwise":
        target = [n - removed(1 + k, 1.0, n) for k, n in enumerate(alive_n)]
    else:
        total = sum(alive_n, jnp.int32(0))
        target = total - removed(0, 1.0, total)
    if scope in ("uniform", "erk"):
        shapes = tuple(tuple(np.shape(jax.tree.leaves(mask)[i])) for i in idx)
        counts = _allocate_on_device(target, shapes, scope)
        target = [counts[k] for k in range(len(idx))]
    keep = _finish(items, rates_p, scope, q_keep, target)
    return _unflatten_weights(mask, idx, keep)


# ----------------------------------------------------------------------------------------------
# Iterative pruning at initialization (SynFlow-style), all rounds in one compiled program.

# Synaptic-Flow's `prune_loop` densities for round r of R (0-based), in its float arithmetic.
_SYNFLOW_SCHEDULES = {"exponential": lambda d, r, R: d ** ((r + 1) / R),
                      "linear": lambda d, r, R: 1.0 - (1.0 - d) * ((r + 1) / R)}


@functools.partial(jax.jit, static_argnames=("scorer", "scope", "rates_l", "rule", "basis_l"))
def _iterate(scorer, scope, rates_l, params, mask, inputs, counts, rule="exact", basis_l=None):
    """All rounds; `counts[r]`: round r's kept counts, or (openlth) its density for the host."""
    def body(r, m):
        s = scorer(params, m, inputs)
        if rule == "openlth":
            return _reference_step(s, m, counts[r], rates_l=rates_l, basis_l=basis_l, scope=scope,
                                   rule=rule, mode="density")
        return _prune_to_counts(s, m, counts[r], rates_l=rates_l, scope=scope,
                                drop_ties=rule == "synflow")
    return jax.lax.fori_loop(0, counts.shape[0], body, mask)


def iterative(scorer: Callable, params: PyTree, mask: PyTree, inputs: Any, density, *,
              rounds: int = 100, schedule: str = "exponential", scope: str = "global",
              rates: PyTree | None = None, allow_collapse: bool = True,
              count_rule: str = "exact", count_basis: PyTree | None = None) -> PyTree:
    """Prune at init in `rounds` rounds, rescoring the masked network before every round.

    Round r prunes to `schedules.get(schedule)(density, rounds)[r - 1]` (exponential:
    density**(r / R), Synaptic-Flow's choice for SynFlow with R = 100), so the last round lands on
    exactly the `to_density(..., density)` count. `scorer(params, mask, inputs) -> scores` (higher
    = keep) is traced once: the rounds are a `lax.fori_loop` inside one jitted program, cached
    across calls with the same scorer, scope, rates and rounds. Every round counts by
    `count_rule` (see `to_density`); with 'synflow' and a Python density the round densities are
    those of Synaptic-Flow's `prune_loop` (d**((r + 1) / R), or 1.0 - (1.0 - d) * ((r + 1) / R)
    for linear) in its float64 arithmetic, the last round included.
    """
    exact = _check_density(density)
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"rounds must be a Python int >= 1, got {rounds!r}")
    sched = schedules.get(schedule)
    _check_scope(scope)
    masks.check(mask, params, "mask")
    rates_l = _check_rates(masks.resolve_rates(mask, rates), mask)
    basis_l = _check_rule(count_rule, scope, rates_l, count_basis, mask)
    rounds = int(rounds)
    if count_rule == "synflow" and exact is not None and schedule in _SYNFLOW_SCHEDULES:
        targets = [_SYNFLOW_SCHEDULES[schedule](float(density), r, rounds) for r in range(rounds)]
    else:
        targets = sched(density, rounds)
    if count_rule == "openlth":
        if exact is not None:
            counts = np.stack([_f64_bits(d) for d in np.asarray(targets)[:-1]]
                              + [_f64_bits(density)])
        else:
            counts = jnp.asarray(targets, jnp.float32)
    elif exact is not None:
        counts = np.stack([_weight_counts(float(d), _static(float(d)), mask, rates_l, scope,
                                          count_rule) for d in np.asarray(targets)])
        if count_rule == "exact":
            # The last round must hit the same count as to_density(density) exactly.
            counts[-1] = _weight_counts(density, exact, mask, rates_l, scope)
    else:
        counts = jax.vmap(lambda d: _weight_counts(d, None, mask, rates_l, scope, count_rule))(
            targets)
    out = _iterate(scorer, scope, tuple(rates_l), params, mask, inputs, counts, count_rule, basis_l)
    return _maybe_refuse_collapse(out, rates, allow_collapse)


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
# weight density when the leaf's units are whole (all units of a layer have the same size);
# uniform and erk keep round-half-up(kept_l / unit size) units of a leaf whose share of the
# weights is kept_l (the header's split), the leaf's share in whole units.


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
    _check_rule("exact", scope, rates_l, None, mask)
    _check_unit_shapes(unit_scores, mask, rates_l)
    m_leaves = jax.tree.leaves(mask)
    idx = [i for i, r in enumerate(rates_l) if r > 0]
    if scope in ("uniform", "erk"):
        kept = _weight_counts(density, exact, mask, rates_l, scope)
        unit = [max(1, int(np.size(m_leaves[i])) // max(1, np.shape(m_leaves[i])[-1]))
                for i in idx]
        if exact is not None:
            counts = np.asarray([_round_half_up(Fraction(int(k), u)) for k, u in zip(kept, unit)],
                                np.int32)
        else:
            u = jnp.asarray(unit, jnp.int32)
            counts = (2 * kept + u) // (2 * u)
    else:
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
