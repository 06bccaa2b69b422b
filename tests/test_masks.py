"""Masks: structure checks, counts, Jaccard, the random-pruning control, prunable rates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lottery
from lottery import masks


def params():
    k = jax.random.split(jax.random.key(0), 3)
    return {"Dense_0": {"kernel": jax.random.normal(k[0], (6, 5)), "bias": jnp.zeros(5)},
            "Conv_0": {"kernel": jax.random.normal(k[1], (3, 3, 2, 4)), "bias": jnp.ones(4)},
            "out": {"kernel": jax.random.normal(k[2], (5, 3)), "bias": jnp.zeros(3)}}


def test_public_api_is_reexported():
    for name in ("masks", "scorers", "prune", "schedules", "metrics", "train", "models", "data",
                 "imp", "Inputs"):
        assert hasattr(lottery, name), name


def test_init_apply_and_counts():
    p = params()
    m = masks.init(p)
    assert jax.tree.structure(m) == jax.tree.structure(p)
    assert all(x.dtype == bool and x.all() for x in jax.tree.leaves(m))
    m["Dense_0"]["kernel"] = m["Dense_0"]["kernel"].at[0].set(False)
    applied = masks.apply(p, m)
    assert np.all(applied["Dense_0"]["kernel"][0] == 0)
    np.testing.assert_array_equal(applied["Dense_0"]["kernel"][1:], p["Dense_0"]["kernel"][1:])
    c = masks.counts(m)
    assert c == {"Conv_0/kernel": (72, 72), "Dense_0/kernel": (25, 30), "out/kernel": (15, 15)}
    assert masks.density(m) == pytest.approx((72 + 25 + 15) / (72 + 30 + 15))
    assert masks.layer_densities(m)["Dense_0/kernel"] == pytest.approx(25 / 30)
    table = masks.summary(m)
    assert "Dense_0/kernel" in table and "25" in table and "0.8333" in table
    assert table.splitlines()[-1].split()[:3] == ["total", "112", "117"]


def test_prunable_patterns_and_rates():
    p = params()
    r = masks.prunable(p)
    assert masks.prunable_paths(r) == ["Conv_0/kernel", "Dense_0/kernel", "out/kernel"]
    r = masks.prunable(p, exclude="out", rates={"Conv_0": 0.5})
    assert r["out"]["kernel"] == 0.0 and r["Conv_0"]["kernel"] == 0.5
    assert r["Dense_0"]["kernel"] == 1.0 and r["Dense_0"]["bias"] == 0.0
    r = masks.prunable(p, include=r".*_0/kernel")
    assert masks.prunable_paths(r) == ["Conv_0/kernel", "Dense_0/kernel"]
    r = masks.prunable(p, include=lambda path, leaf: leaf.ndim == 4)
    assert masks.prunable_paths(r) == ["Conv_0/kernel"]
    assert "out/kernel" not in masks.counts(masks.init(p), masks.prunable(p, exclude="out"))
    with pytest.raises(ValueError, match="rates pattern.*'nope'.*match no prunable leaf"):
        masks.prunable(p, rates={"nope": 0.5})
    with pytest.raises(ValueError, match="no prunable leaf"):
        masks.prunable(p, exclude=".*")
    with pytest.raises(ValueError, match=r"rates\['out'\] = -1"):
        masks.prunable(p, rates={"out": -1})


def test_check_names_first_bad_path_and_shapes():
    p = params()
    m = masks.init(p)
    m["Dense_0"]["kernel"] = jnp.ones((5, 6), bool)
    with pytest.raises(ValueError, match=r"'Dense_0/kernel'.*\(5, 6\).*\(6, 5\)"):
        masks.check(m, p)
    m = masks.init(p)
    del m["out"]
    with pytest.raises(ValueError, match="'out/bias'"):
        masks.check(m, p)


def test_compression_ratio_counts_all_params():
    p = params()
    m = masks.init(p)
    m["Dense_0"]["kernel"] = jnp.zeros((6, 5), bool)
    total = sum(x.size for x in jax.tree.leaves(p))
    nonzero = sum(int(np.count_nonzero(x)) for x in jax.tree.leaves(masks.apply(p, m)))
    assert masks.compression_ratio(p, m) == pytest.approx(total / nonzero)
    assert nonzero == total - 30 - 5 - 3  # the kernel plus the zero biases


def test_jaccard():
    p = params()
    a = masks.init(p)
    b = masks.init(p)
    b["Dense_0"]["kernel"] = b["Dense_0"]["kernel"].at[:3].set(False)  # 15 of 30 kept
    a["Dense_0"]["kernel"] = a["Dense_0"]["kernel"].at[4:].set(False)  # rows 0..3 kept
    j = masks.jaccard(a, b)
    assert j["Dense_0/kernel"] == pytest.approx(5 / 30)  # row 3 in both; rows 0..5 in either
    assert j["Conv_0/kernel"] == 1.0
    assert masks.jaccard(a, a) == {k: 1.0 for k in j}


@settings(max_examples=25, deadline=None)
@given(st.sampled_from((1, 5, 40)), st.sampled_from((1, 7, 33)), st.floats(0.0, 1.0),
       st.integers(0, 2**31 - 1))  # few shapes: each new one compiles, the counts are the test
def test_random_like_keeps_exact_per_layer_counts(rows, cols, density, seed):
    p = {"a": {"kernel": jnp.zeros((rows, cols))}, "b": {"kernel": jnp.zeros((cols, 3)),
                                                         "bias": jnp.zeros(3)}}
    key = jax.random.key(seed)
    m = jax.tree.map(lambda x: jax.random.uniform(key, x.shape) < density, p)
    m["b"]["bias"] = jnp.ones(3, bool)
    r = masks.random_like(m, jax.random.key(seed + 1))
    assert masks.counts(r) == masks.counts(m)
    assert r["b"]["bias"].all()


def test_random_like_positions_are_fresh_and_uniform():
    p = {"w": {"kernel": jnp.zeros((20, 50))}}
    m = {"w": {"kernel": jnp.zeros((20, 50), bool).at[:2].set(True)}}  # first 100 of 1000
    hits = np.zeros((20, 50))
    for s in range(40):
        hits += np.asarray(masks.random_like(m, jax.random.key(s))["w"]["kernel"])
    assert hits[:2].mean() == pytest.approx(hits[2:].mean(), rel=0.25)  # no bias to old spots
    assert masks.counts(masks.random_like(m, jax.random.key(0)), masks.prunable(p)) == \
        {"w/kernel": (100, 1000)}
