"""lottery.prune: exact counts, tie rule, no revival, rate multipliers, jit, structured units."""

import math
from decimal import Decimal

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lottery import masks, prune


def ref_round(x: Decimal) -> int:
    return math.floor(x + Decimal("0.5"))


def ref_count(d: float, n: int) -> int:
    """round-half-up(d * n), d read as its decimal form (independent of prune's Fraction code)."""
    return ref_round(Decimal(repr(d)) * n)


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
                 "bias": rng.normal(size=(4,)).astype(np.float32)},
        "fc": {"kernel": rng.normal(size=(12, 8)).astype(np.float32),
               "bias": rng.normal(size=(8,)).astype(np.float32)},
        "out": {"kernel": rng.normal(size=(8, 5)).astype(np.float32),
                "bias": rng.normal(size=(5,)).astype(np.float32)},
    }


PARAMS = make_params()
SCORES = jax.tree.map(np.abs, make_params(1))
FULL = masks.init(PARAMS)
KERNELS = ["conv/kernel", "fc/kernel", "out/kernel"]  # jax.tree.leaves order (sorted dict keys)
SIZES = {"conv/kernel": 72, "fc/kernel": 96, "out/kernel": 40}
N = sum(SIZES.values())


def leaf(tree, path):
    a, b = path.split("/")
    return np.asarray(tree[a][b])


def flat_kernels(tree):
    return np.concatenate([leaf(tree, p).ravel() for p in KERNELS])


def kept(mask):
    return {p: int(leaf(mask, p).sum()) for p in KERNELS}


def ref_top(scores, alive, k):
    """Numpy reference: the k best alive entries, score descending, lower index first."""
    order = np.lexsort((np.arange(scores.size), -scores, ~alive))
    keep = np.zeros(scores.size, bool)
    keep[order[:k]] = True
    return keep & alive


def random_mask(seed, density=0.6):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: rng.random(np.shape(p)) < density if np.ndim(p) >= 2
                        else np.ones(np.shape(p), bool), PARAMS)


# ---------------------------------------------------------------------------------------------
# Exact counts and the selected set.


@pytest.mark.parametrize("d", [0.01, 0.1, 0.15, 0.25, 0.5, 0.77, 1.0])
def test_global_count_and_set(d):
    out = prune.to_density(SCORES, FULL, d)
    assert sum(kept(out).values()) == ref_count(d, N)
    s = flat_kernels(SCORES)
    np.testing.assert_array_equal(flat_kernels(out),
                                  ref_top(s, np.ones(N, bool), ref_count(d, N)))
    for p in ["conv/bias", "fc/bias", "out/bias"]:  # not prunable: untouched
        assert leaf(out, p).all()


@pytest.mark.parametrize("d", [0.05, 0.125, 0.3, 0.9])
def test_layerwise_count_and_set(d):
    out = prune.to_density(SCORES, FULL, d, scope="layerwise")
    for p in KERNELS:
        k = ref_count(d, SIZES[p])
        assert kept(out)[p] == k
        np.testing.assert_array_equal(
            leaf(out, p).ravel(), ref_top(leaf(SCORES, p).ravel(), np.ones(SIZES[p], bool), k))


def test_half_counts_round_up():
    # 0.125 * 40 = 5 exactly; 0.0625 * 72 = 4.5 -> 5 (half up), 0.0625 * 40 = 2.5 -> 3.
    out = prune.to_density(SCORES, FULL, 0.0625, scope="layerwise")
    assert kept(out) == {"conv/kernel": 5, "fc/kernel": 6, "out/kernel": 3}
    # 0.15 is 15/100 (not the binary float just below it): 0.15 * 208 = 31.2, 0.15 * 40 = 6.
    assert kept(prune.to_density(SCORES, FULL, 0.15, scope="layerwise"))["out/kernel"] == 6


# ---------------------------------------------------------------------------------------------
# Ties, NaN and revival.


def test_ties_lower_flat_index_wins():
    equal = jax.tree.map(lambda p: np.ones_like(p), PARAMS)
    k = ref_count(0.3, N)
    out = prune.to_density(equal, FULL, 0.3)
    np.testing.assert_array_equal(flat_kernels(out), np.arange(N) < k)
    out = prune.to_density(equal, FULL, 0.3, scope="layerwise")
    for p in KERNELS:
        np.testing.assert_array_equal(leaf(out, p).ravel(),
                                      np.arange(SIZES[p]) < ref_count(0.3, SIZES[p]))


def test_nan_ranks_below_everything_and_signed_zeros_tie():
    s = jax.tree.map(np.copy, SCORES)
    fc = s["fc"]["kernel"].ravel()
    fc[:] = 1.0
    fc[[3, 7]] = np.nan
    fc[[10, 11]] = -np.inf
    fc[12], fc[13] = -0.0, 0.0
    s["fc"]["kernel"] = fc.reshape(12, 8)
    out = prune.to_density(s, FULL, 1 - 2 / 96, scope="layerwise")
    assert not leaf(out, "fc/kernel").ravel()[[3, 7]].any()
    out = prune.to_density(s, FULL, 1 - 4 / 96, scope="layerwise")
    assert not leaf(out, "fc/kernel").ravel()[[3, 7, 10, 11]].any()
    out = prune.to_density(s, FULL, 1 - 5 / 96, scope="layerwise")  # -0.0 == 0.0: index 13 goes
    np.testing.assert_array_equal(np.flatnonzero(~leaf(out, "fc/kernel").ravel()),
                                  [3, 7, 10, 11, 13])


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_dead_entries_never_come_back(scope):
    mask = random_mask(3, 0.5)
    huge = jax.tree.map(lambda s, m: np.where(m, s, 1e30).astype(np.float32), SCORES, mask)
    for d in [0.2, 0.45, 0.9, 1.0]:
        out = prune.to_density(huge, mask, d, scope=scope)
        for p in KERNELS:
            assert not (leaf(out, p) & ~leaf(mask, p)).any(), (d, p)
    alive = sum(kept(mask).values())
    out = prune.to_density(huge, mask, 0.2, scope="global")
    assert sum(kept(out).values()) == min(ref_count(0.2, N), alive)
    out = prune.to_density(huge, mask, 0.9, scope="global")  # above the current density
    assert kept(out) == kept(mask)


# ---------------------------------------------------------------------------------------------
# remove_fraction (the IMP step) and rate multipliers.


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.5, 0.95])
def test_remove_fraction_counts(fraction):
    mask, s = FULL, flat_kernels(SCORES)
    for _ in range(3):  # three IMP levels
        alive = flat_kernels(mask)
        out = prune.remove_fraction(SCORES, mask, fraction)
        k = alive.sum() - ref_count(fraction, int(alive.sum()))
        np.testing.assert_array_equal(flat_kernels(out), ref_top(s, alive, k))
        lw = prune.remove_fraction(SCORES, mask, fraction, scope="layerwise")
        for p in KERNELS:
            a = int(leaf(mask, p).sum())
            assert kept(lw)[p] == a - ref_count(fraction, a)
        mask = out


def test_rate_zero_leaf_is_untouched():
    mask = random_mask(5)
    rates = masks.prunable(PARAMS, rates={"out": 0.0})
    for out in [prune.to_density(SCORES, mask, 0.1, rates=rates),
                prune.to_density(SCORES, mask, 0.1, rates=rates, scope="layerwise"),
                prune.remove_fraction(SCORES, mask, 0.5, rates=rates)]:
        np.testing.assert_array_equal(leaf(out, "out/kernel"), leaf(mask, "out/kernel"))
    # ... and the others share the whole budget: (72 + 96) * 0.1 = 16.8 -> 17.
    out = prune.to_density(SCORES, FULL, 0.1, rates=rates)
    assert kept(out)["conv/kernel"] + kept(out)["fc/kernel"] == 17


def test_rate_half_removes_half_as_much():
    rates = masks.prunable(PARAMS, rates={"out": 0.5})
    mask = random_mask(6, 0.9)
    a = kept(mask)
    out = prune.remove_fraction(SCORES, mask, 0.2, rates=rates, scope="layerwise")
    assert a["out/kernel"] - kept(out)["out/kernel"] == ref_round(Decimal("0.1") * a["out/kernel"])
    for p in ["conv/kernel", "fc/kernel"]:
        assert a[p] - kept(out)[p] == ref_count(0.2, a[p])
    out = prune.remove_fraction(SCORES, mask, 0.2, rates=rates)  # global: total stays exact
    total = sum(a.values())
    assert total - sum(kept(out).values()) == ref_count(0.2, total)
    assert a["out/kernel"] - kept(out)["out/kernel"] == ref_round(Decimal("0.1") * a["out/kernel"])
    # The rate-1 leaves are one global ranking of the rest of the budget.
    rest = np.concatenate([leaf(mask, p).ravel() for p in KERNELS[:2]])
    s = np.concatenate([leaf(SCORES, p).ravel() for p in KERNELS[:2]])
    k = sum(kept(out)[p] for p in KERNELS[:2])
    got = np.concatenate([leaf(out, p).ravel() for p in KERNELS[:2]])
    np.testing.assert_array_equal(got, ref_top(s, rest, k))


def test_rates_in_to_density():
    rates = masks.prunable(PARAMS, rates={"out": 0.5})
    out = prune.to_density(SCORES, FULL, 0.2, rates=rates)
    # f = 1 - 0.2 = 0.8 of everything goes; the out layer removes 0.4 * 40 = 16.
    assert kept(out)["out/kernel"] == 24
    assert sum(kept(out).values()) == ref_count(0.2, N)
    out = prune.to_density(SCORES, FULL, 0.2, rates=rates, scope="layerwise")
    assert kept(out) == {"conv/kernel": ref_count(0.2, 72), "fc/kernel": ref_count(0.2, 96),
                         "out/kernel": 40 - ref_round(Decimal("0.5") * (40 - 8))}


# ---------------------------------------------------------------------------------------------
# jit with a traced density / fraction.


def test_jit_traced_density_equals_eager():
    mask = random_mask(7, 0.8)
    rates = masks.prunable(PARAMS, rates={"out": 0.5})
    for scope in ["global", "layerwise"]:
        f = jax.jit(lambda s, m, d: prune.to_density(s, m, d, scope=scope, rates=rates))
        g = jax.jit(lambda s, m, x: prune.remove_fraction(s, m, x, scope=scope, rates=rates))
        for d in [0.05, 0.3, 0.6]:
            eager = prune.to_density(SCORES, mask, d, scope=scope, rates=rates)
            jax.tree.map(np.testing.assert_array_equal, f(SCORES, mask, d), eager)
            eager = prune.remove_fraction(SCORES, mask, d, scope=scope, rates=rates)
            jax.tree.map(np.testing.assert_array_equal, g(SCORES, mask, d), eager)
        assert f._cache_size() == 1 and g._cache_size() == 1  # one trace for all values


# ---------------------------------------------------------------------------------------------
# Iterative pruning: one compiled program.


def test_iterative_traces_scorer_once_and_lands_on_count():
    traces = []

    def scorer(params, mask, inputs):
        traces.append(1)  # a Python side effect: runs once per trace, not per round
        return jax.tree.map(lambda p, m: jnp.abs(p) * m, params, mask)

    out = prune.iterative(scorer, PARAMS, FULL, None, 0.05, rounds=20)
    out2 = prune.iterative(scorer, PARAMS, FULL, None, 0.3, rounds=20)
    assert len(traces) == 1
    assert sum(kept(out).values()) == ref_count(0.05, N)
    assert sum(kept(out2).values()) == ref_count(0.3, N)
    # Magnitude scores do not change with the mask, so the rounds nest to one-shot pruning.
    abs_p = jax.tree.map(np.abs, PARAMS)
    jax.tree.map(np.testing.assert_array_equal, out, prune.to_density(abs_p, FULL, 0.05))
    # A traced density (float32 schedule and counts) gives the same mask here.
    traced = jax.jit(lambda d: prune.iterative(scorer, PARAMS, FULL, None, d, rounds=20))(0.05)
    jax.tree.map(np.testing.assert_array_equal, traced, out)
    lw = prune.iterative(scorer, PARAMS, FULL, None, 0.05, rounds=4, schedule="linear",
                         scope="layerwise")
    jax.tree.map(np.testing.assert_array_equal, lw,
                 prune.to_density(abs_p, FULL, 0.05, scope="layerwise"))


def test_iterative_rescoring_changes_the_result():
    # Score = |w| * (number of alive entries in the same row): pruning a row makes its other
    # entries less valuable, so rescoring every round prunes differently from one shot.
    def scorer(params, mask, inputs):
        def f(p, m):
            if p.ndim < 2:
                return jnp.abs(p)
            rows = jnp.sum(m, axis=-1, keepdims=True)
            return jnp.abs(p) * rows * m
        return jax.tree.map(f, params, mask)

    one = prune.iterative(scorer, PARAMS, FULL, None, 0.1, rounds=1)
    many = prune.iterative(scorer, PARAMS, FULL, None, 0.1, rounds=10)
    assert sum(kept(one).values()) == sum(kept(many).values()) == ref_count(0.1, N)
    assert any((leaf(one, p) != leaf(many, p)).any() for p in KERNELS)
    jax.tree.map(np.testing.assert_array_equal, one,
                 prune.to_density(scorer(PARAMS, FULL, None), FULL, 0.1))


# ---------------------------------------------------------------------------------------------
# Layer collapse.


def test_collapse_detected_and_refused():
    s = jax.tree.map(np.copy, SCORES)
    s["out"]["kernel"] = np.full((8, 5), 1e-6, np.float32)  # out ranks last
    k = 72 + 96
    out = prune.to_density(s, FULL, k / N)
    assert prune.collapsed(out) == ["out/kernel"]
    assert prune.collapsed(FULL) == []
    with pytest.raises(ValueError, match="out/kernel"):
        prune.to_density(s, FULL, k / N, allow_collapse=False)
    with pytest.raises(ValueError, match="out/kernel"):
        prune.remove_fraction(s, FULL, 40 / N, allow_collapse=False)
    prune.to_density(s, FULL, k / N, scope="layerwise", allow_collapse=False)  # no collapse
    with pytest.raises(ValueError, match="allow_collapse=False needs concrete values"):
        jax.jit(lambda d: prune.to_density(s, FULL, d, allow_collapse=False))(0.5)


# ---------------------------------------------------------------------------------------------
# Structured: whole output units.


@pytest.mark.parametrize("norm", ["l1", "l2", "sum"])
def test_unit_scores(norm):
    u = prune.unit_scores(PARAMS, norm=norm)
    for p in KERNELS:
        w = leaf(PARAMS, p).astype(np.float64)
        w2 = w.reshape(-1, w.shape[-1])
        ref = {"l1": np.abs(w2).sum(0), "l2": np.sqrt((w2**2).sum(0)), "sum": w2.sum(0)}[norm]
        np.testing.assert_allclose(leaf(u, p), ref, rtol=1e-5)


def units_kept(mask, p):
    m = leaf(mask, p)
    per = m.reshape(-1, m.shape[-1])
    assert (per.all(0) | ~per.any(0)).all(), "a unit is partly pruned"
    return per.all(0)


@pytest.mark.parametrize("d", [0.1, 0.5, 0.8])
def test_units_layerwise_exact_counts(d):
    u = prune.unit_scores(SCORES)
    out = prune.units_to_density(u, FULL, d, scope="layerwise")
    for p in KERNELS:
        units = leaf(PARAMS, p).shape[-1]
        keep = units_kept(out, p)
        k = ref_count(d, units)
        assert keep.sum() == k
        np.testing.assert_array_equal(keep, ref_top(leaf(u, p), np.ones(units, bool), k))
        assert kept(out)[p] == k * SIZES[p] // units


def test_units_global_greedy_weight_budget():
    u = prune.unit_scores(SCORES, norm="l2")
    d = 0.4
    out = prune.units_to_density(u, FULL, d)
    # Numpy reference: best units first while the kept weights stay <= round(d * N).
    rows = [(float(leaf(u, p)[j]), i, j, SIZES[p] // leaf(u, p).size)
            for i, p in enumerate(KERNELS) for j in range(leaf(u, p).size)]
    rows.sort(key=lambda r: -r[0])
    budget, spent, ref = ref_count(d, N), 0, {p: np.zeros(leaf(u, p).size, bool) for p in KERNELS}
    for _, i, j, cost in rows:
        if spent + cost > budget:
            break
        spent += cost
        ref[KERNELS[i]][j] = True
    for p in KERNELS:
        np.testing.assert_array_equal(units_kept(out, p), ref[p])
    assert sum(kept(out).values()) == spent


def test_units_no_revival():
    mask = jax.tree.map(np.copy, FULL)
    mask["fc"]["kernel"][:, [0, 5]] = False  # two dead units
    u = prune.unit_scores(SCORES)
    u["fc"]["kernel"] = np.asarray(u["fc"]["kernel"]).copy()
    u["fc"]["kernel"][[0, 5]] = 1e30
    out = prune.units_to_density(u, mask, 0.5, scope="layerwise")
    keep = units_kept(out, "fc/kernel")
    assert not keep[[0, 5]].any() and keep.sum() == 4


# ---------------------------------------------------------------------------------------------
# Property tests.


@st.composite
def problems(draw):
    shapes = draw(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1,
                           max_size=3))
    # No subnormal scores: XLA on CPU flushes them to zero, so they tie with 0.0 (documented in
    # lottery.prune), while the numpy reference would rank them apart.
    scores = {f"l{i}": {"kernel": draw(hnp.arrays(np.float32, s, elements=st.floats(
        -4, 4, width=32, allow_subnormal=False)))} for i, s in enumerate(shapes)}
    mask = {k: {"kernel": draw(hnp.arrays(bool, v["kernel"].shape))} for k, v in scores.items()}
    return scores, mask


def cat(tree, names):
    return np.concatenate([np.asarray(tree[name]["kernel"]).ravel() for name in names])


# Each example compiles one program (new shapes), then checks three values with it.
@settings(max_examples=20, deadline=None)
@given(problems(), st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3),
       st.sampled_from(["global", "layerwise"]))
def test_property_to_density(problem, densities, scope):
    scores, mask = problem
    for d in densities:
        out = prune.to_density(scores, mask, d, scope=scope)
        for name in scores:
            m, o = mask[name]["kernel"], np.asarray(out[name]["kernel"])
            assert not (o & ~m).any()
            if scope == "layerwise":
                k = min(ref_count(d, m.size), int(m.sum()))
                np.testing.assert_array_equal(
                    o.ravel(), ref_top(scores[name]["kernel"].ravel(), m.ravel(), k))
        if scope == "global":
            m, o = cat(mask, scores), cat(out, scores)
            k = min(ref_count(d, m.size), int(m.sum()))
            assert o.sum() == k
            np.testing.assert_array_equal(o, ref_top(cat(scores, scores), m, k))


@settings(max_examples=20, deadline=None)
@given(problems(), st.lists(st.floats(0.0, 0.99), min_size=3, max_size=3),
       st.sampled_from(["global", "layerwise"]))
def test_property_remove_fraction(problem, fractions, scope):
    scores, mask = problem
    for f in fractions:
        out = prune.remove_fraction(scores, mask, f, scope=scope)
        for name in scores:
            m, o = mask[name]["kernel"], np.asarray(out[name]["kernel"])
            assert not (o & ~m).any()
            if scope == "layerwise":
                assert o.sum() == m.sum() - ref_count(f, int(m.sum()))
        if scope == "global":
            m, o = cat(mask, scores), cat(out, scores)
            k = int(m.sum()) - ref_count(f, int(m.sum()))
            np.testing.assert_array_equal(o, ref_top(cat(scores, scores), m, k))


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("d", [0, 0.0, 1.5, -0.1])
def test_bad_density(d):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        prune.to_density(SCORES, FULL, d)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        prune.units_to_density(prune.unit_scores(SCORES), FULL, d)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        prune.iterative(lambda p, m, i: p, PARAMS, FULL, None, d, rounds=2)


@pytest.mark.parametrize("f", [1.0, -0.1, 2])
def test_bad_fraction(f):
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        prune.remove_fraction(SCORES, FULL, f)


def test_bad_scope_schedule_rounds_norm():
    with pytest.raises(ValueError, match="scope must be one of 'global', 'layerwise'"):
        prune.to_density(SCORES, FULL, 0.5, scope="per_layer")
    with pytest.raises(ValueError, match="scope must be one of 'global', 'layerwise'"):
        prune.remove_fraction(SCORES, FULL, 0.5, scope="local")
    with pytest.raises(ValueError, match="schedule must be one of 'exponential', 'linear'"):
        prune.iterative(lambda p, m, i: p, PARAMS, FULL, None, 0.5, schedule="cubic")
    with pytest.raises(ValueError, match="rounds must be"):
        prune.iterative(lambda p, m, i: p, PARAMS, FULL, None, 0.5, rounds=0)
    with pytest.raises(ValueError, match="norm must be one of 'l1', 'l2', 'sum'"):
        prune.unit_scores(PARAMS, norm="linf")


def test_mismatched_mask_names_the_path():
    bad = jax.tree.map(np.copy, FULL)
    bad["fc"]["kernel"] = np.ones((8, 12), bool)
    with pytest.raises(ValueError, match="fc/kernel"):
        prune.to_density(SCORES, bad, 0.5)
    del bad["fc"]["kernel"]
    with pytest.raises(ValueError, match="fc/kernel"):
        prune.remove_fraction(SCORES, bad, 0.5)
    u = prune.unit_scores(SCORES)
    u["out"]["kernel"] = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="out/kernel"):
        prune.units_to_density(u, FULL, 0.5)
    rates = masks.prunable(PARAMS)
    del rates["conv"]
    with pytest.raises(ValueError, match="rates does not match the mask at path 'conv/bias'"):
        prune.to_density(SCORES, FULL, 0.5, rates=rates)
