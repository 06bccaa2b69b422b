"""Coupled channel groups of any flax model, found in its traced computation; group scores, group
masks at a density, and their expansion to ordinary weight masks.

A *group* is one channel index space that several parameter slices share, so they are kept or
removed together (the dependency groups of Torch-Pruning's DepGraph, Fang et al. 2023,
arXiv:2301.12900; Distiller's "thinning"): the output axis of every kernel that produces those
channels (all the convs whose outputs meet in one residual sum are ONE group), their biases, batch
norm scale and bias and running mean and var, and the input axis of every kernel that reads them
(through pooling, ReLU, concatenation and flatten: for conv -> flatten -> dense, channel c is the
dense kernel's rows (h * W + w) * C + c). Removing channel c of a group removes slice c of every
member. Units: density = fraction of a group's channels KEPT; scores: HIGHER = KEEP.

The package, by what each module holds (every name below is importable from `lottery.groups`):

- `structure`: `Member`, `Group`, `Groups` and `derive`, which reads them off the model traced
  with `jax.make_jaxpr` (`analysis` follows index classes, the union-find of `classes`, through
  the jaxpr; `jaxprs` knows its primitives), `of_model` (derive, cached, for a `lottery.models`
  module), `summary`;
- `channels`: channel masks (a tuple of bool vectors, one per group) and weight masks: `init`,
  `alive`, `expand` (every params slice of a removed channel zeroed, under jit), `unread`, `take`
  (what `lottery.compact` uses);
- `scorers`: `scorer(groups, params, mask, inputs) -> one float vector per group`, HIGHER = KEEP:
  `l1`, `l2`, `norm`, `bn_scale`, `taylor`, `weighted_sum`, `get`;
- `density`: `to_density` (round-half-up(density * channels), globally or per group, by
  `lottery.prune.to_density`'s rules), and score -> select -> `expand` in one call: `prune` (to a
  density), `remove_fraction` (an IMP level: round-half-up(fraction * alive channels) go),
  `prune_to_counts` (AGP's precomputed counts, under jit); `random_like` (the random-pruning
  control: random channels at the same count per group), `prunable` / `excluded` (which groups
  are pruned) and `resolve` (a model's groups and exclusions for a config, checked up front).

Known limits: one traced input shape (a model whose groups depend on the input shape needs the
shape it will see); size-1 axes carry no class (a 1-channel layer is not a group); channels read
by a contraction between two activations (attention's q . k) are groups whose masks zero their
producers, but `unread` never reports them removable; ops the analysis does not know raise.
"""

from lottery.groups.channels import Channels, alive, expand, init, take, unread
from lottery.groups.classes import GroupError
from lottery.groups.density import (GROUP_SCOPES, excluded, prunable, prune, prune_to_counts,
                                    random_like, remove_fraction, resolve, to_density)
from lottery.groups.scorers import (MEMBERS, SCORERS, GroupScorer, bn_scale, get, l1, l2, norm,
                                    taylor, weighted_sum)
from lottery.groups.structure import Group, Groups, Member, derive, of_model, summary

__all__ = ["Channels", "GROUP_SCOPES", "GroupError", "GroupScorer", "Group", "Groups", "MEMBERS",
           "Member", "SCORERS", "alive", "bn_scale", "derive", "excluded", "expand", "get", "init",
           "l1", "l2", "norm", "of_model", "prunable", "prune", "prune_to_counts", "random_like",
           "remove_fraction", "resolve", "summary", "take", "taylor", "to_density", "unread",
           "weighted_sum"]
