"""Tests for lottery.metrics: MACs by hand arithmetic, speedup, compression ratio."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottery import masks, metrics


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(4, (3, 3), feature_group_count=2, padding="VALID")(x))


class Net(nn.Module):
    """Convs (plain, grouped in a submodule, strided 1x1), batch norm, a Dense called twice."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(4, (3, 3), padding="SAME")(x)               # 8x8x2 -> 8x8x4
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = Block()(x)                                          # -> 6x6x4, 2 groups
        x = nn.Conv(2, (1, 1), strides=2)(x)                    # -> 3x3x2
        x = nn.Dense(6)(x.reshape((x.shape[0], -1)))            # 18 -> 6
        shared = nn.Dense(6, name="shared")
        x = shared(nn.relu(shared(x)))                          # 6 -> 6, twice
        return nn.Dense(2)(x)                                   # 6 -> 2


# MACs per example, by hand: output positions x kernel entries.
HAND = {
    "Conv_0/kernel": 8 * 8 * (3 * 3 * 2 * 4),
    "Block_0/Conv_0/kernel": 6 * 6 * (3 * 3 * (4 // 2) * 4),
    "Conv_1/kernel": 3 * 3 * (1 * 1 * 4 * 2),
    "Dense_0/kernel": 18 * 6,
    "shared/kernel": 2 * 6 * 6,
    "Dense_1/kernel": 6 * 2,
}
MODEL = Net()
X = jnp.ones((3, 8, 8, 2))
VARIABLES = MODEL.init(jax.random.key(0), X, train=False)
PARAMS = VARIABLES["params"]


def _half_mask(params, seed=0):
    """Exactly half of every kernel kept (random positions); other leaves all-True."""
    rng = np.random.default_rng(seed)

    def half(p, r):
        if r == 0:
            return jnp.ones(p.shape, bool)
        keep = np.zeros(p.size, bool)
        keep[rng.permutation(p.size)[:p.size // 2]] = True
        return jnp.asarray(keep.reshape(p.shape))

    return jax.tree.map(half, params, masks.prunable(params))


def test_flops_match_hand_arithmetic():
    f = metrics.flops(MODEL, VARIABLES, X, train=False)
    assert set(f) == set(HAND)
    for path, macs in HAND.items():
        assert f[path] == (macs, macs), path
    assert sum(HAND.values()) == 7464
    # Per example: a different batch size gives the same counts.
    assert metrics.flops(MODEL, VARIABLES, jnp.ones((1, 8, 8, 2)), train=False) == f


def test_speedup_dense_is_one_and_half_mask_is_two():
    full = masks.init(PARAMS)
    assert metrics.theoretical_speedup(MODEL, VARIABLES, X, full, train=False) == 1.0
    assert metrics.theoretical_speedup(MODEL, VARIABLES, X, None, train=False) == 1.0
    half = _half_mask(PARAMS)
    assert metrics.theoretical_speedup(MODEL, VARIABLES, X, half, train=False) == 2.0
    f = metrics.flops(MODEL, VARIABLES, X, half, train=False)
    assert all(r == d / 2 for d, r in f.values())


def test_remaining_macs_scale_with_layer_density():
    mask = masks.init(PARAMS)
    k = np.zeros(PARAMS["Conv_0"]["kernel"].shape, bool)
    k.reshape(-1)[:18] = True                              # Conv_0 keeps 18 / 72 = 1/4
    mask["Conv_0"]["kernel"] = jnp.asarray(k)
    f = metrics.flops(MODEL, VARIABLES, X, mask, train=False)
    assert f["Conv_0/kernel"] == (4608, 4608 / 4)
    total = sum(HAND.values())
    expected = total / (total - 4608 * 3 / 4)
    assert metrics.theoretical_speedup(MODEL, VARIABLES, X, mask, train=False) == pytest.approx(
        expected, rel=1e-12)
    # Without a mask, the kernel's non-zero fraction counts (ShrinkBench on zeroed weights).
    zeroed = {**VARIABLES, "params": masks.apply(PARAMS, mask)}
    assert metrics.flops(MODEL, zeroed, X, train=False)["Conv_0/kernel"] == (4608, 4608 / 4)


def test_compression_ratio_counts_all_params():
    # Nonzero biases and batch-norm params, so that every entry is a nonzero parameter.
    params = jax.tree.map(lambda p: p + 0.5, PARAMS)
    kernels = sum(p.size for p in jax.tree.leaves(params) if p.ndim >= 2)
    total = sum(p.size for p in jax.tree.leaves(params))
    assert kernels == 72 + 72 + 8 + 108 + 36 + 12
    assert total == kernels + (4 + 4 + 4 + 4 + 2 + 6 + 6 + 2)  # biases, BN scale and bias
    assert metrics.compression_ratio(params) == 1.0
    ratio = metrics.compression_ratio(params, _half_mask(params))
    assert ratio == total / (total - kernels // 2)


def test_summary_table():
    text = metrics.summary(MODEL, VARIABLES, X, _half_mask(PARAMS), train=False)
    lines = text.splitlines()
    assert len(lines) == 1 + len(HAND) + 2
    assert "Block_0/Conv_0/kernel" in text and "7,464" in text and "3,732" in text
    assert "theoretical speedup 2.0000" in lines[-1]


def test_bad_input():
    class NoLayers(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * self.param("w", nn.initializers.ones, (1,))

    v = NoLayers().init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="no nn.Dense or nn.Conv"):
        metrics.flops(NoLayers(), v, X)
    with pytest.raises(ValueError, match="'params'"):
        metrics.flops(MODEL, PARAMS, X, train=False)
    bad = masks.init(PARAMS)
    del bad["shared"]
    with pytest.raises(ValueError, match="shared"):
        metrics.flops(MODEL, VARIABLES, X, bad, train=False)
