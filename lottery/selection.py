"""The selection engine of `lottery.prune`: keep the best-ranked alive items within a budget.

An item is a weight (unstructured pruning) or an output unit (structured); its cost is the number
of alive weights it holds (1 for a weight). Ranking follows `lottery.prune`'s header: alive before
dead, score descending (NaN below every number), then the lower index. Selection needs no sort: a
bisection over the bits of an order-preserving integer key (`select`). Everything here is pure and
jittable; leaf rates are static Python floats.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lottery import counting


def rank_key(scores, alive):
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


def select(scores, alive, cost, budget, drop_ties: bool = False):
    """Keep the best-ranked alive items whose cumulative cost (in rank order) stays <= `budget`.

    Rank order: `rank_key`, then the lower index. No sort: a bisection over the key bits finds
    the key T of the first item that no longer fits; items ranked better than T are kept, and
    items with key T are taken in index order while the budget lasts (none of them with
    `drop_ties`: the reference rules prune everything tied with the threshold). Linear in the
    item count per bit, which is several times faster than a stable multi-key sort on CPU.
    """
    key = rank_key(scores, alive)
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


def kept_cost(keep, cost):
    """The alive weights the kept items hold."""
    return jnp.sum(jnp.where(keep, cost, 0))


def finish(items, rates, scope, q_keep, base_target, drop_ties=False):
    """Select items: leaves with rate != 1 keep `q_keep[i]` items each; rate-1 leaves keep
    `base_target` (global: one cost budget for all of them, minus what the others kept; other
    scopes: a list of per-leaf item counts)."""
    out = [None] * len(items)
    for i, (s, a, c) in enumerate(items):
        if rates[i] != 1.0:
            out[i] = select(s, a, jnp.ones_like(c), q_keep[i])
    base = [i for i in range(len(items)) if rates[i] == 1.0]
    if scope != "global":
        for i in base:
            s, a, c = items[i]
            out[i] = select(s, a, jnp.ones_like(c), base_target[i], drop_ties)
    elif base:
        spent = sum((kept_cost(out[i], items[i][2]) for i in range(len(items)) if i not in base),
                    jnp.int32(0))
        budget = jnp.maximum(base_target - spent, 0)
        sizes = [items[i][0].shape[0] for i in base]
        cat = [jnp.concatenate([items[i][k] for i in base]) for k in range(3)]
        keep = select(*cat, budget, drop_ties)
        for i, part in zip(base, jnp.split(keep, np.cumsum(sizes)[:-1])):
            out[i] = part
    return out


def to_counts(items, rates, scope, counts, drop_ties=False):
    """The density step. `counts`: global [K] kept cost over all leaves; other scopes the kept
    item count of each leaf. Rate-r leaves remove round(r * f * alive) items."""
    alive_n = [jnp.sum(a, dtype=jnp.int32) for _, a, _ in items]
    if scope == "global":
        alive_w = sum((kept_cost(a, c) for _, a, c in items), jnp.int32(0))
        k = jnp.minimum(counts[0], alive_w)
        f = jnp.where(alive_w > 0, 1.0 - k / jnp.maximum(alive_w, 1), 0.0)
        q_keep = {i: n - jnp.clip(jnp.floor(rates[i] * f * n + 0.5).astype(jnp.int32), 0, n)
                  for i, n in enumerate(alive_n) if rates[i] != 1.0}
        return finish(items, rates, scope, q_keep, k, drop_ties)
    keep = [jnp.minimum(counts[i], n) for i, n in enumerate(alive_n)]
    # f_l = 1 - keep_l / alive_l, so r * f_l * alive_l = r * (alive_l - keep_l).
    q_keep = {i: n - jnp.clip(counting.scaled_count(counting.exact_rate(rates[i]), n - keep[i],
                                                    items[i][0].shape[0]), 0, n)
              for i, n in enumerate(alive_n) if rates[i] != 1.0}
    return finish(items, rates, scope, q_keep, keep, drop_ties)


def weight_items(scores, mask, rates):
    """(prunable leaf indices, [(flat scores, flat alive, ones)]) of the leaves with rate > 0."""
    s_leaves, m_leaves = jax.tree.leaves(scores), jax.tree.leaves(mask)
    idx = [i for i, r in enumerate(rates) if r > 0]
    items = [(jnp.ravel(s_leaves[i]), jnp.ravel(m_leaves[i]).astype(bool),
              jnp.ones(np.size(m_leaves[i]), jnp.int32)) for i in idx]
    return idx, items


def unflatten_weights(mask, idx, keep):
    """`mask` with its prunable leaves `idx` replaced by the flat `keep` selections (dead stays
    dead)."""
    leaves, treedef = jax.tree.flatten(mask)
    leaves = list(leaves)
    for i, k in zip(idx, keep):
        leaves[i] = k.reshape(jnp.shape(leaves[i])) & leaves[i].astype(bool)
    return jax.tree.unflatten(treedef, leaves)
