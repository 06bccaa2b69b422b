"""The sanity checks of Frankle et al. 2021 ("Pruning Neural Networks at Initialization: Why Are
We Missing the Mark?", arXiv:2009.08576) as operations on a scorer's masks and weights.

  shuffle  each prunable layer's mask entries randomly permuted within the layer (`shuffle_mask`)
  reinit   the scorer's mask on a fresh init (`reinit_key`)
  invert   the mask of the negated scores, the same procedure and density (`inverted`)
Keys: fold_in(key(seed), i) with i = 0 init, 1 data order, 2 the random scorer, 3 shuffle,
4 reinit.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lottery import masks, scorers

PyTree = Any
SHUFFLE_STREAM, REINIT_STREAM = 3, 4  # fold_in(key(seed), .): 0 init, 1 data, 2 random scorer


@functools.lru_cache(maxsize=None)
def inverted(name: str) -> scorers.Scorer:
    """The scorer `name` with its scores negated (higher = keep, so the lowest are kept). One
    function object per name, so `prune.iterative`'s compiled program is cached across calls."""
    base = scorers.get(name)

    def scorer(params, mask, inputs):
        return jax.tree.map(jnp.negative, base(params, mask, inputs))

    scorer.__name__ = scorer.__qualname__ = f"inverted_{name}"
    return scorer


def shuffle_key(seed: int) -> jax.Array:
    """The key of the `shuffle` ablation for `seed`: fold_in(key(seed), 3)."""
    return jax.random.fold_in(jax.random.key(seed), SHUFFLE_STREAM)


def reinit_key(seed: int) -> jax.Array:
    """The init key of the `reinit` ablation for `seed`: fold_in(key(seed), 4) (the seed's own
    init is fold_in(key(seed), 0))."""
    return jax.random.fold_in(jax.random.key(seed), REINIT_STREAM)


def shuffle_mask(mask: PyTree, key: jax.Array, rates: PyTree | None = None) -> PyTree:
    """`mask` with the entries of every prunable leaf randomly permuted within the leaf (leaf i,
    in `jax.tree.leaves` order, with `fold_in(key, i)`): the same kept count per layer at random
    positions. Non-prunable leaves are returned unchanged. Numpy bool leaves."""
    rates_l = jax.tree.leaves(masks.resolve_rates(mask, rates))
    leaves, treedef = jax.tree.flatten(mask)
    out = []
    for i, (m, r) in enumerate(zip(leaves, rates_l)):
        m = np.asarray(m, bool)
        if r > 0:
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, i), m.size))
            m = m.ravel()[perm].reshape(m.shape)
        out.append(m)
    return jax.tree.unflatten(treedef, out)


def init_stream(ablation: str | None) -> int:
    """Which draw of the seed's key a cell's weights come from: 4 (reinit), else 0 (the init)."""
    return REINIT_STREAM if ablation == "reinit" else 0
