"""Group masks at a density: `to_density` keeps round-half-up(density * channels) of them, globally
over the groups or per group, by `lottery.prune.to_density`'s rules (score descending, NaN lowest,
the lower index wins a tie, a removed channel never returns); `prune` is score -> `to_density` ->
`expand` in one call.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from lottery import masks, prune as prune_lib
from lottery.groups.channels import Channels, alive, check_channels, expand
from lottery.groups.scorers import GroupScorer, get
from lottery.groups.structure import Groups
from lottery.scorers import Inputs

PyTree = Any

GROUP_SCOPES = ("global", "layerwise")


def _rates(groups: Groups, exclude) -> tuple[float, ...]:
    out = [1.0] * len(groups)
    pats = [exclude] if isinstance(exclude, (str, int)) else list(exclude or ())
    for p in pats:
        for i in groups.index(p):
            out[i] = 0.0
    if not any(out):
        raise ValueError(f"exclude={exclude!r} leaves no group to prune")
    return tuple(out)


def to_density(groups: Groups, scores: Channels, channels: Channels, density, *,
               scope: str = "global", exclude=None) -> Channels:
    """Channel masks keeping round-half-up(density * N) channels: N over all groups not excluded
    ('global', ranked together) or each group's own ('layerwise'), by `lottery.prune.to_density`'s
    ranking (score descending, NaN lowest, lower index first on a tie; a removed channel stays
    removed). `exclude`: group indices, names, producer layers or regexes left as they are."""
    if scope not in GROUP_SCOPES:
        raise ValueError(f"scope must be one of {GROUP_SCOPES}, got {scope!r}")
    check_channels(groups, channels)
    check_channels(groups, scores, "scores")
    rates = _rates(groups, exclude)
    out = prune_lib.to_density(tuple(jnp.asarray(s, jnp.float32) for s in scores),
                           tuple(jnp.asarray(c, bool) for c in channels), density, scope=scope,
                           rates=rates)
    return tuple(out)


def prune(groups: Groups, scorer: GroupScorer | str, params: PyTree, mask: PyTree,
                 density, *, inputs: Inputs | None = None, scope: str = "global",
                 exclude=None) -> tuple[PyTree, Channels]:
    """One step of structured pruning: score the channels alive in `mask`, keep `density` of them
    (`to_density`), and return (the expanded weight mask, the channel masks)."""
    scorer = get(scorer) if isinstance(scorer, str) else scorer
    masks.check(mask, params)
    live = alive(groups, mask)
    scores = scorer(groups, params, mask, inputs)
    channels = to_density(groups, scores, live, density, scope=scope, exclude=exclude)
    return expand(groups, channels, mask), channels
