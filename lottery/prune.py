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

The arithmetic behind these rules has modules of its own: `lottery.counting` (exact counts, the
uniform / erk split), `lottery.count_rules` (synflow, openlth) and `lottery.selection` (ranking
and selection without a sort). This module is the API over them.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lottery import count_rules, counting, masks, schedules, selection

PyTree = Any
SCOPES = ("global", "layerwise", "uniform", "erk")
COUNT_RULES = count_rules.COUNT_RULES
NORMS = ("l1", "l2", "sum")


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {scope!r}")


# ----------------------------------------------------------------------------------------------
# Unstructured pruning.


def _prepare(scores, mask, rates, scope):
    _check_scope(scope)
    masks.check(mask, scores, "mask")
    rates = masks.resolve_rates(mask, rates)
    return counting.check_rates(rates, mask)


@functools.partial(jax.jit, static_argnames=("rates_l", "scope", "drop_ties"))
def _prune_to_counts(scores, mask, counts, *, rates_l, scope, drop_ties=False):
    """The density step on weights; one compiled program per tree structure, shapes and rates."""
    idx, items = selection.weight_items(scores, mask, rates_l)
    keep = selection.to_counts(items, [rates_l[i] for i in idx], scope, counts, drop_ties)
    return selection.unflatten_weights(mask, idx, keep)


def _weight_counts(density, exact, mask, rates_l, scope, count_rule="exact"):
    """Kept counts for `_prune_to_counts`: global [K], other scopes one per prunable leaf."""
    shapes = tuple(tuple(np.shape(m)) for m, r in zip(jax.tree.leaves(mask), rates_l) if r > 0)
    sizes = [math.prod(s) for s in shapes]
    if scope in ("uniform", "erk"):
        total = counting.density_counts(density, exact, [sum(sizes)])[0]
        if exact is not None:
            return np.asarray(counting.allocate(int(total), shapes, scope), np.int32)
        return counting.allocate_on_device(total, shapes, scope)
    sizes = [sum(sizes)] if scope == "global" else sizes
    if count_rule == "synflow":
        return count_rules.synflow_keep(density, exact, sizes)
    return counting.density_counts(density, exact, sizes)


def keep_counts(mask: PyTree, density, *, scope: str = "global", rates: PyTree | None = None,
                count_rule: str = "exact") -> np.ndarray:
    """The kept counts `to_density` selects with, for a Python density: [K] in global scope,
    one per prunable leaf (in leaf order) otherwise; synflow: N - int((1 - d) * N). For code that
    precomputes counts on the host (AGP) and prunes with them later."""
    exact = counting.check_density(density)
    if exact is None:
        raise ValueError("keep_counts needs a Python density (it counts on the host)")
    _check_scope(scope)
    rates_l = counting.check_rates(masks.resolve_rates(mask, rates), mask)
    count_rules.check_rule(count_rule, scope, rates_l, None, mask)
    if count_rule == "openlth":
        raise ValueError("count_rule='openlth' counts from the alive weights: no static counts")
    return _weight_counts(density, exact, mask, rates_l, scope, count_rule)


def to_counts(scores: PyTree, mask: PyTree, counts, *, scope: str = "global",
              rates: PyTree | None = None) -> PyTree:
    """Keep precomputed `counts` of the highest-scoring alive prunable weights: `to_density`'s
    selection with the counts `keep_counts` returns ([K] global, one per prunable leaf
    otherwise) instead of a density. `counts` may be traced, so code that fixes its counts on the
    host once (AGP's schedule) can prune with them inside a compiled loop."""
    rates_l = _prepare(scores, mask, rates, scope)
    return _prune_to_counts(scores, mask, counts, rates_l=tuple(rates_l), scope=scope)


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
    exact = counting.check_density(density)
    rates_l = _prepare(scores, mask, rates, scope)
    basis_l = count_rules.check_rule(count_rule, scope, rates_l, count_basis, mask)
    if count_rule == "openlth":
        out = count_rules.reference_prune(
            scores, mask, count_rules.host_value(density, exact), rates_l=tuple(rates_l),
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
    exact = counting.check_fraction(fraction)
    rates_l = _prepare(scores, mask, rates, scope)
    basis_l = count_rules.check_rule(count_rule, scope, rates_l, count_basis, mask)
    if count_rule != "exact":
        out = count_rules.reference_prune(
            scores, mask, count_rules.host_value(fraction, exact), rates_l=tuple(rates_l),
            basis_l=basis_l, scope=scope, rule=count_rule, mode="fraction")
        return _maybe_refuse_collapse(out, rates, allow_collapse)
    fits, pq = None, None
    if exact is not None:
        # Slot 0: the total (fraction, bound N); slot 1 + k: prunable leaf k (rate * fraction).
        sizes = [int(np.size(m)) for m, r in zip(jax.tree.leaves(mask), rates_l) if r > 0]
        factors = [exact] + [counting.exact_rate(r) * exact for r in rates_l if r > 0]
        bounds = [sum(sizes)] + sizes
        fits = tuple(2 * f.numerator * b + f.denominator <= counting.INT32_MAX
                     for f, b in zip(factors, bounds))
        pq = np.asarray([(f.numerator, f.denominator) if ok else (0, 1)
                         for f, ok in zip(factors, fits)], np.int32)
    out = _remove(scores, mask, fraction, pq, rates_l=tuple(rates_l), scope=scope, fits=fits)
    return _maybe_refuse_collapse(out, rates, allow_collapse)


@functools.partial(jax.jit, static_argnames=("rates_l", "scope", "fits"))
def _remove(scores, mask, fraction, pq, *, rates_l, scope, fits):
    """remove_fraction's body. `fits[j]`: slot j's factor is the exact ratio pq[j] (integer
    arithmetic); otherwise (or with `fits` None, a traced fraction) it is multiplied in float32."""
    idx, items = selection.weight_items(scores, mask, rates_l)
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
        counts = counting.allocate_on_device(target, shapes, scope)
        target = [counts[k] for k in range(len(idx))]
    keep = selection.finish(items, rates_p, scope, q_keep, target)
    return selection.unflatten_weights(mask, idx, keep)


# ----------------------------------------------------------------------------------------------
# Iterative pruning at initialization (SynFlow-style), all rounds in one compiled program.

@functools.partial(jax.jit, static_argnames=("scorer", "scope", "rates_l", "rule", "basis_l"))
def _iterate(scorer, scope, rates_l, params, mask, inputs, counts, rule="exact", basis_l=None):
    """All rounds; `counts[r]`: round r's kept counts, or (openlth) its density for the host."""
    def body(r, m):
        s = scorer(params, m, inputs)
        if rule == "openlth":
            return count_rules.reference_step(s, m, counts[r], rates_l=rates_l, basis_l=basis_l,
                                              scope=scope, rule=rule, mode="density")
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
    exact = counting.check_density(density)
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"rounds must be a Python int >= 1, got {rounds!r}")
    sched = schedules.get(schedule)
    _check_scope(scope)
    masks.check(mask, params, "mask")
    rates_l = counting.check_rates(masks.resolve_rates(mask, rates), mask)
    basis_l = count_rules.check_rule(count_rule, scope, rates_l, count_basis, mask)
    rounds = int(rounds)
    if count_rule == "synflow" and exact is not None and schedule in count_rules.SYNFLOW_SCHEDULES:
        targets = [count_rules.SYNFLOW_SCHEDULES[schedule](float(density), r, rounds)
                   for r in range(rounds)]
    else:
        targets = sched(density, rounds)
    if count_rule == "openlth":
        if exact is not None:
            counts = np.stack([count_rules.f64_bits(d) for d in np.asarray(targets)[:-1]]
                              + [count_rules.f64_bits(density)])
        else:
            counts = jnp.asarray(targets, jnp.float32)
    elif exact is not None:
        counts = np.stack([_weight_counts(float(d), counting.exact(float(d)), mask, rates_l, scope,
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
    rates_l = counting.check_rates(masks.resolve_rates(params_or_scores, rates), params_or_scores)
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
    exact = counting.check_density(density)
    _check_scope(scope)
    rates_l = counting.check_rates(masks.resolve_rates(mask, rates), mask)
    count_rules.check_rule("exact", scope, rates_l, None, mask)
    _check_unit_shapes(unit_scores, mask, rates_l)
    m_leaves = jax.tree.leaves(mask)
    idx = [i for i, r in enumerate(rates_l) if r > 0]
    if scope in ("uniform", "erk"):
        kept = _weight_counts(density, exact, mask, rates_l, scope)
        unit = [max(1, int(np.size(m_leaves[i])) // max(1, np.shape(m_leaves[i])[-1]))
                for i in idx]
        if exact is not None:
            counts = np.asarray([counting.round_half_up(Fraction(int(k), u))
                                 for k, u in zip(kept, unit)],
                                np.int32)
        else:
            u = jnp.asarray(unit, jnp.int32)
            counts = (2 * kept + u) // (2 * u)
    else:
        if scope == "global":
            sizes = [sum(int(np.size(m_leaves[i])) for i in idx)]
        else:
            sizes = [int(np.shape(m_leaves[i])[-1]) for i in idx]
        counts = counting.density_counts(density, exact, sizes)
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
    keep = selection.to_counts(items, [rates_l[i] for i in idx], scope, counts)
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
