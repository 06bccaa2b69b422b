"""Masks: bool pytrees with exactly the structure of the params they prune.

A mask leaf is True where the weight is kept. Leaves that are not prunable are all-True, so
applying a mask is a plain tree map. Which leaves are prunable, and at what rate, is described by a
separate *rates* pytree (see `prunable`): a float per leaf, 0.0 = never pruned, 1.0 = pruned at the
base rate, r = pruned at r times the base rate (the lottery-ticket paper prunes the output layer at
half the rate: r = 0.5).

Units used everywhere in `lottery`: density = fraction of prunable weights kept.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Pattern = str | Callable[[str, Any], bool]


def path_str(path) -> str:
    """'Dense_0/kernel' for a jax key path (dict keys, attributes and indices joined by '/')."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def paths(tree: PyTree) -> list[str]:
    """Path strings of the leaves of `tree`, in leaf order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _matches(pattern: Pattern, path: str, leaf) -> bool:
    if callable(pattern):
        return bool(pattern(path, leaf))
    return (path == pattern or path.startswith(pattern + "/")
            or re.fullmatch(pattern, path) is not None)


def _as_list(patterns) -> list:
    if patterns is None:
        return []
    if isinstance(patterns, (str,)) or callable(patterns):
        return [patterns]
    return list(patterns)


def default_prunable(path: str, leaf) -> bool:
    """Kernels are prunable: leaves named 'kernel' with ndim >= 2 (flax's Dense, Conv,
    DenseGeneral, Einsum and attention weights). Biases, norm scales, embeddings (`nn.Embed`'s
    'embedding'), class tokens and position embeddings are not, whatever their ndim."""
    return path.rsplit("/", 1)[-1] == "kernel" and np.ndim(leaf) >= 2


def prunable(params: PyTree, include: Pattern | Sequence[Pattern] | None = None,
             exclude: Pattern | Sequence[Pattern] | None = None,
             rates: Mapping[str, float] | None = None) -> PyTree:
    """Per-leaf pruning rates: a pytree of Python floats with the structure of `params`.

    A leaf is prunable if it matches `include` (default: `default_prunable`, the kernels) and no
    `exclude` pattern.
    A pattern is a path ('Dense_2/kernel'), a module prefix ('Dense_2'), a regex matched against
    the whole path ('Conv_.*/kernel'), or a predicate `f(path, leaf) -> bool`.
    `rates` maps patterns to multipliers of the pruning rate (first match wins); 0.0 excludes.
    A string pattern of `exclude` or `rates` that matches no otherwise prunable leaf is an error
    (a typo would silently prune, or not scale, what it meant).
    """
    inc, exc = _as_list(include), _as_list(exclude)
    rates = dict(rates or {})
    seen, excluded = set(), set()

    def rate(path, leaf):
        p = path_str(path)
        ok = any(_matches(q, p, leaf) for q in inc) if inc else default_prunable(p, leaf)
        if not ok:
            return 0.0
        hits = [i for i, q in enumerate(exc) if _matches(q, p, leaf)]
        if hits:
            excluded.update(hits)
            return 0.0
        for q, r in rates.items():
            if _matches(q, p, leaf):
                seen.add(q)
                if not 0.0 <= float(r):
                    raise ValueError(f"rates[{q!r}] = {r}: a rate multiplier must be >= 0")
                return float(r)
        return 1.0

    out = jax.tree_util.tree_map_with_path(rate, params)
    unmatched = [q for i, q in enumerate(exc) if isinstance(q, str) and i not in excluded]
    if unmatched:
        candidates = [path_str(p) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
                      if (any(_matches(q, path_str(p), leaf) for q in inc) if inc
                          else default_prunable(path_str(p), leaf))]
        raise ValueError(f"exclude pattern(s) {unmatched} match no prunable leaf; prunable "
                         f"leaves: {candidates}")
    unused = [q for q in rates if q not in seen]
    if unused:
        raise ValueError(f"rates pattern(s) {unused} match no prunable leaf; "
                         f"prunable leaves: {prunable_paths(out)}")
    if not any(r > 0 for r in jax.tree.leaves(out)):
        raise ValueError(f"no prunable leaf left (include={include!r}, exclude={exclude!r}; "
                         f"by default only leaves named 'kernel' with ndim >= 2 are pruned); "
                         f"leaves: {paths(params)}")
    return out


def resolve_rates(params_or_mask: PyTree, rates: PyTree | None) -> PyTree:
    """`rates` itself, or the default `prunable(...)` rates when None."""
    return prunable(params_or_mask) if rates is None else rates


def prunable_paths(rates: PyTree) -> list[str]:
    """Paths of the leaves with a non-zero rate."""
    return [path_str(p) for p, r in jax.tree_util.tree_flatten_with_path(rates)[0] if r > 0]


def init(params: PyTree) -> PyTree:
    """The all-True mask for `params`."""
    return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)


def check(mask: PyTree, params: PyTree, name: str = "mask") -> None:
    """Raise ValueError naming the first path where `mask` and `params` differ in structure or shape."""
    m_leaves, m_def = jax.tree_util.tree_flatten_with_path(mask)
    p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params)
    m_paths = [path_str(p) for p, _ in m_leaves]
    p_paths = [path_str(p) for p, _ in p_leaves]
    if m_paths != p_paths:
        missing = [p for p in p_paths if p not in m_paths]
        extra = [p for p in m_paths if p not in p_paths]
        first = (missing or extra or [next(a for a, b in zip(p_paths, m_paths) if a != b)])[0]
        raise ValueError(f"{name} does not match the params at path {first!r}: "
                         f"params have {'it' if first in p_paths else 'no such leaf'}, "
                         f"{name} has {'it' if first in m_paths else 'no such leaf'}")
    for (path, m), (_, p) in zip(m_leaves, p_leaves):
        if jnp.shape(m) != jnp.shape(p):
            raise ValueError(f"{name} does not match the params at path {path_str(path)!r}: "
                             f"{name} shape {tuple(jnp.shape(m))} vs params shape "
                             f"{tuple(jnp.shape(p))}")


def apply(params: PyTree, mask: PyTree) -> PyTree:
    """Params with masked-out entries set to exactly 0.0."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, mask)


def counts(mask: PyTree, rates: PyTree | None = None) -> dict[str, tuple[int, int]]:
    """{path: (kept, total)} for every prunable leaf."""
    rates = resolve_rates(mask, rates)
    out = {}
    for (path, m), r in zip(jax.tree_util.tree_flatten_with_path(mask)[0], jax.tree.leaves(rates)):
        if r > 0:
            out[path_str(path)] = (int(np.asarray(m).sum()), int(np.size(m)))
    return out


def density(mask: PyTree, rates: PyTree | None = None) -> float:
    """Overall density: kept / total over the prunable leaves."""
    c = counts(mask, rates).values()
    return sum(k for k, _ in c) / max(1, sum(t for _, t in c))


def layer_densities(mask: PyTree, rates: PyTree | None = None) -> dict[str, float]:
    """{path: kept / total} for every prunable leaf."""
    return {p: k / t for p, (k, t) in counts(mask, rates).items()}


def compression_ratio(params: PyTree, mask: PyTree | None = None) -> float:
    """ShrinkBench's compression ratio: all parameters / non-zero parameters (masked if given)."""
    if mask is not None:
        params = apply(params, mask)
    leaves = jax.tree.leaves(params)
    total = sum(int(np.size(x)) for x in leaves)
    nonzero = sum(int(np.count_nonzero(np.asarray(x))) for x in leaves)
    return total / max(1, nonzero)


def jaccard(a: PyTree, b: PyTree, rates: PyTree | None = None) -> dict[str, float]:
    """Per-layer Jaccard overlap |a AND b| / |a OR b| of the kept entries (1.0 for two empty layers)."""
    rates = resolve_rates(a, rates)
    check(b, a, "second mask")
    out = {}
    for (path, x), y, r in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b),
                               jax.tree.leaves(rates)):
        if r > 0:
            x, y = np.asarray(x, bool), np.asarray(y, bool)
            union = np.logical_or(x, y).sum()
            out[path_str(path)] = float(np.logical_and(x, y).sum() / union) if union else 1.0
    return out


def random_like(mask: PyTree, key: jax.Array, rates: PyTree | None = None) -> PyTree:
    """A random mask with exactly the per-layer kept counts of `mask` (the random-pruning control).

    Non-prunable leaves stay all-True. Works under jit (counts are taken on device).
    """
    rates = resolve_rates(mask, rates)
    leaves, treedef = jax.tree.flatten(mask)
    keys = jax.random.split(key, len(leaves))
    out = []
    for m, r, k in zip(leaves, jax.tree.leaves(rates), keys):
        if r > 0:
            n = jnp.sum(m)
            ranks = jnp.argsort(jax.random.permutation(k, m.size))  # a uniformly random ranking
            out.append((ranks < n).reshape(m.shape))
        else:
            out.append(m)
    return jax.tree.unflatten(treedef, out)


def summary(mask: PyTree, rates: PyTree | None = None) -> str:
    """A per-layer table: kept / total / density, and the overall line."""
    c = counts(mask, rates)
    width = max([len("layer")] + [len(p) for p in c])
    lines = [f"{'layer':<{width}}  {'kept':>10}  {'total':>10}  {'density':>8}"]
    for p, (k, t) in c.items():
        lines.append(f"{p:<{width}}  {k:>10,}  {t:>10,}  {k / t:>8.4f}")
    kept, total = sum(k for k, _ in c.values()), sum(t for _, t in c.values())
    lines.append(f"{'total':<{width}}  {kept:>10,}  {total:>10,}  {kept / max(1, total):>8.4f}")
    return "\n".join(lines)
