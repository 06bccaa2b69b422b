"""Group masks: `to_density` keeps round-half-up(density * channels) of them, globally over the
groups or per group, by `lottery.prune.to_density`'s rules (score descending, NaN lowest, the
lower index wins a tie, a removed channel never returns); `prune` (to a density),
`remove_fraction` (an IMP level) and `prune_to_counts` (AGP's precomputed counts, under jit) are
score -> select -> `expand` in one call; `random_like` is the random-pruning control. `prunable`
and `excluded` say which groups are pruned; `resolve` checks what a config asks for.

Counting is in channels, never in weights: an IMP level removes round-half-up(fraction * alive)
of the alive channels of the pruned groups (all of them ranked together, or each group's own),
as `lottery.prune.remove_fraction` counts weights. The weights a channel takes with it depend on
which channels of the neighbouring groups are left, so a count of weights could only be met
approximately; the weight density a run reaches is what its masks report.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from lottery import masks, prune as prune_lib
from lottery.groups.channels import Channels, alive, check_channels, expand
from lottery.groups.scorers import GroupScorer, get
from lottery.groups.structure import Groups, of_model
from lottery.scorers import Inputs

PyTree = Any

GROUP_SCOPES = ("global", "layerwise")


def prunable(groups: Groups, exclude=None) -> tuple[float, ...]:
    """Per group 1.0 (pruned) or 0.0 (left as it is): `exclude` names the latter (group indices,
    names, producer layers or regexes, as `Groups.index` reads them)."""
    out = [1.0] * len(groups)
    pats = [exclude] if isinstance(exclude, (str, int)) else list(exclude or ())
    for p in pats:
        for i in groups.index(p):
            out[i] = 0.0
    if not any(out):
        raise ValueError(f"exclude={exclude!r} leaves no group to prune")
    return tuple(out)


def excluded(groups: Groups, rates: PyTree) -> list[int]:
    """The groups a weight-rates pytree (`lottery.masks.prunable`, e.g. a config's `exclude`)
    leaves alone: those a producer kernel of which has rate 0, so an excluded layer keeps all its
    filters (its input rows still go with the channels it reads, as in Torch-Pruning's
    `ignored_layers`). Producer rates other than 0 and 1 raise ValueError."""
    flat = dict(zip(masks.paths(rates), jax.tree.leaves(rates)))
    out = []
    for i, g in enumerate(groups):
        rs = {float(flat[m.path]) for m in g.members if m.collection == "params"
              and m.role == "out"}
        if rs - {0.0, 1.0}:
            raise ValueError(f"group {g.name!r}: producer rates {sorted(rs)}; group pruning "
                             f"takes rates 0 (excluded) or 1")
        if 0.0 in rs:
            out.append(i)
    return out


def resolve(model, variables: PyTree, input_shape: Sequence[int], *, scorer: str = "l1",
            rates: PyTree | None = None) -> tuple[Groups, list[int]]:
    """(groups, excluded group indices) of structured pruning of a `lottery.models`-style model
    (`of_model`), with the groups `rates` excludes (`excluded`), checked before any work: the model
    has a group left to prune, and the scorer (by name) scores its groups (abstractly; `taylor`
    needs data and is checked when it runs). One-line ValueError (a GroupError where the analysis
    cannot follow the model)."""
    score = get(scorer)
    groups = of_model(model, variables, input_shape)
    if not len(groups):
        why = "; ".join(f"{w}: {r}" for w, r in groups.excluded) or "no kernel produces channels"
        raise ValueError(f"{type(model).__name__} has no channel group to prune ({why})")
    params = variables["params"]
    skip = excluded(groups, masks.resolve_rates(params, rates))
    if len(skip) == len(groups):
        raise ValueError(f"every group has an excluded producer layer; groups: {groups.names}")
    if scorer != "taylor":
        shapes = lambda dtype: jax.tree.map(  # noqa: E731
            lambda x: jax.ShapeDtypeStruct(jnp.shape(x), dtype), params)
        jax.eval_shape(lambda p, m: score(groups, p, m, None), shapes(jnp.float32),
                       shapes(jnp.bool_))
    return groups, skip


def to_density(groups: Groups, scores: Channels, channels: Channels, density, *,
               scope: str = "global", exclude=None) -> Channels:
    """Channel masks keeping round-half-up(density * N) channels: N over all groups not excluded
    ('global', ranked together) or each group's own ('layerwise'), by `lottery.prune.to_density`'s
    ranking (score descending, NaN lowest, lower index first on a tie; a removed channel stays
    removed). `exclude`: group indices, names, producer layers or regexes left as they are."""
    _check(groups, scores, channels, scope)
    out = prune_lib.to_density(_floats(scores), _bools(channels), density, scope=scope,
                               rates=prunable(groups, exclude))
    return tuple(out)


def _check(groups, scores, channels, scope) -> None:
    if scope not in GROUP_SCOPES:
        raise ValueError(f"scope must be one of {GROUP_SCOPES}, got {scope!r}")
    check_channels(groups, channels)
    check_channels(groups, scores, "scores")


def _floats(scores):
    return tuple(jnp.asarray(s, jnp.float32) for s in scores)


def _bools(channels):
    return tuple(jnp.asarray(c, bool) for c in channels)


def _step(groups: Groups, scorer: GroupScorer | str, params: PyTree, mask: PyTree,
          inputs: Inputs | None, scope: str,
          select: Callable[[Channels, Channels], Channels]) -> tuple[PyTree, Channels]:
    """Score the channels alive in `mask`, `select(scores, alive)`, and expand: (mask, channels)."""
    scorer = get(scorer) if isinstance(scorer, str) else scorer
    masks.check(mask, params)
    live = alive(groups, mask)
    scores = scorer(groups, params, mask, inputs)
    _check(groups, scores, live, scope)
    channels = tuple(select(_floats(scores), _bools(live)))
    return expand(groups, channels, mask), channels


def prune(groups: Groups, scorer: GroupScorer | str, params: PyTree, mask: PyTree,
          density, *, inputs: Inputs | None = None, scope: str = "global",
          exclude=None) -> tuple[PyTree, Channels]:
    """One step of structured pruning: score the channels alive in `mask`, keep `density` of them
    (`to_density`), and return (the expanded weight mask, the channel masks)."""
    return _step(groups, scorer, params, mask, inputs, scope, lambda s, c: prune_lib.to_density(
        s, c, density, scope=scope, rates=prunable(groups, exclude)))


def remove_fraction(groups: Groups, scorer: GroupScorer | str, params: PyTree, mask: PyTree,
                    fraction, *, inputs: Inputs | None = None, scope: str = "global",
                    exclude=None) -> tuple[PyTree, Channels]:
    """One IMP level of structured pruning: remove round-half-up(fraction * alive) of the channels
    alive in `mask`, lowest scores first (alive over all groups not excluded, ranked together, or
    per group: `lottery.prune.remove_fraction` on channels). Returns (weight mask, channels)."""
    return _step(groups, scorer, params, mask, inputs, scope,
                 lambda s, c: prune_lib.remove_fraction(s, c, fraction, scope=scope,
                                                        rates=prunable(groups, exclude)))


def prune_to_counts(groups: Groups, scorer: GroupScorer | str, params: PyTree, mask: PyTree,
                    counts, *, inputs: Inputs | None = None, scope: str = "global",
                    exclude=None) -> tuple[PyTree, Channels]:
    """`prune` with kept channel counts instead of a density (global: [K]; layerwise: one per
    group not excluded), as `lottery.prune.keep_counts(init(groups), d, rates=prunable(...))`
    gives them. `counts` may be traced: AGP prunes with it inside the compiled step."""
    return _step(groups, scorer, params, mask, inputs, scope, lambda s, c: prune_lib.to_counts(
        s, c, counts, scope=scope, rates=prunable(groups, exclude)))


def random_like(groups: Groups, mask: PyTree, key: jax.Array, exclude=None) -> PyTree:
    """The random-pruning control of a group-pruned `mask`: in every group not excluded, as many
    channels as `mask` keeps alive, drawn uniformly from all of the group's channels, expanded on
    an all-kept mask (excluded groups keep every channel). For a mask made of whole channels (a
    structured run), every layer keeps the ticket's numbers of input and output channels, hence
    its weight count. Works under jit."""
    live = alive(groups, mask)
    rates = prunable(groups, exclude)
    keys = jax.random.split(key, len(groups))
    out = []
    for g, a, r, k in zip(groups, live, rates, keys):
        ranks = jnp.argsort(jax.random.permutation(k, g.size))  # a uniformly random ranking
        out.append(ranks < jnp.sum(a) if r > 0 else jnp.ones(g.size, bool))
    return expand(groups, tuple(out), jax.tree.map(lambda m: jnp.ones(jnp.shape(m), bool), mask))
