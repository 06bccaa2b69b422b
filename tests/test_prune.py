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


# ---------------------------------------------------------------------------------------------
# Reference count rules: 'synflow' (Synaptic-Flow Pruner.mask) and 'openlth' (sparse_global).
# Tie-heavy tree: flat scores a = [1 1 2 2 2 3 3 4 5 5], b = [2 2 7 6 1 1] (N = 16). Sorted:
# four 1s, five 2s, 3 3 4 5 5 6 7.

TIE = {"a": {"kernel": np.array([[1, 1, 2, 2, 2], [3, 3, 4, 5, 5]], np.float32)},
       "b": {"kernel": np.array([[2, 2, 7], [6, 1, 1]], np.float32)}}
TIE_FULL = masks.init(TIE)


def total_kept(mask):
    return sum(int(np.asarray(x).sum()) for x in jax.tree.leaves(mask))


def tie_kept(mask):
    return {k: int(np.asarray(mask[k]["kernel"]).sum()) for k in ("a", "b")}


def synflow_ref(scores, alive, d):
    """Synaptic-Flow's Pruner._global_mask in numpy: masked scores -inf, k = int((1 - d) * N),
    prune every score <= the k-th smallest (torch.kthvalue), nothing when k < 1."""
    s = np.where(alive, scores, -np.inf).astype(np.float64)
    k = int((1.0 - d) * s.size)
    if k < 1:
        return alive
    return alive & (s > np.sort(s)[k - 1])


def openlth_ref(scores, alive, remaining, n=None, fraction=None):
    """OpenLTH's sparse_global in numpy: n = ceil(fraction * remaining), threshold = the sorted
    alive scores at index n, keep what is strictly above it."""
    if n is None:
        n = int(np.ceil(fraction * float(remaining)))
    return alive & (scores > np.sort(scores[alive])[n])


def test_synflow_rule_hand_counts():
    # d = 0.5: k = int(0.5 * 16) = 8, the 8th smallest is a 2: all nine <= 2 go (exact keeps 8).
    assert total_kept(prune.to_density(TIE, TIE_FULL, 0.5, count_rule="synflow")) == 7
    assert total_kept(prune.to_density(TIE, TIE_FULL, 0.5)) == 8
    # d = 0.7: k = int(0.30000000000000004 * 16) = 4 -> the four 1s go (exact: round(11.2) = 11).
    assert total_kept(prune.to_density(TIE, TIE_FULL, 0.7, count_rule="synflow")) == 12
    assert total_kept(prune.to_density(TIE, TIE_FULL, 0.7)) == 11
    # 1 - 0.9 = 0.09999999999999998: global k = int(1.5999999999999996) = 1, so all four 1s
    # (tied with the smallest) go; layerwise k = int(0.9999999999999998) = 0 for the 10-weight
    # leaf and int(0.6) = 0 for the other: k < 1, both unchanged. Exact keeps 14 / 9 + 5.
    assert total_kept(prune.to_density(TIE, TIE_FULL, 0.9, count_rule="synflow")) == 12
    out = prune.to_density(TIE, TIE_FULL, 0.9, scope="layerwise", count_rule="synflow")
    assert tie_kept(out) == {"a": 10, "b": 6}
    assert total_kept(prune.to_density(TIE, TIE_FULL, 0.9)) == 14
    assert tie_kept(prune.to_density(TIE, TIE_FULL, 0.9, scope="layerwise")) == {"a": 9, "b": 5}
    # Local (layerwise) d = 0.5: a: k = 5, 5th smallest 2 -> 5 go; b: k = 3, 3rd smallest 2 ->
    # 1 1 2 2 go, 7 and 6 stay.
    out = prune.to_density(TIE, TIE_FULL, 0.5, scope="layerwise", count_rule="synflow")
    assert tie_kept(out) == {"a": 5, "b": 2}
    np.testing.assert_array_equal(out["b"]["kernel"], [[False, False, True], [True, False, False]])


def test_synflow_rule_counts_dead_entries_and_k_below_one():
    mask = jax.tree.map(np.copy, TIE_FULL)
    mask["a"]["kernel"][0, 0] = mask["a"]["kernel"][1, 2] = False  # a 1 and the 4 are dead
    # N stays 16 (dead counted, ranked lowest): k = 8 -> 2 dead, three 1s, then 2s: all <= 2 go.
    out = prune.to_density(TIE, mask, 0.5, count_rule="synflow")
    assert total_kept(out) == 6
    # k = int(0.050000000000000044 * 16) = 0 < 1: the mask comes back unchanged (dead stay dead).
    out = prune.to_density(TIE, mask, 0.95, count_rule="synflow")
    jax.tree.map(np.testing.assert_array_equal, out, mask)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_synflow_rule_matches_numpy_reference(scope):
    rng = np.random.default_rng(11)
    ints = jax.tree.map(lambda p: rng.integers(0, 6, np.shape(p)).astype(np.float32), PARAMS)
    for seed, d in [(0, 0.9), (1, 0.5), (2, 0.33), (3, 0.07), (4, 0.999)]:
        mask = random_mask(seed, 0.8)
        out = prune.to_density(ints, mask, d, scope=scope, count_rule="synflow")
        if scope == "global":
            ref = synflow_ref(flat_kernels(ints), flat_kernels(mask), d)
            np.testing.assert_array_equal(flat_kernels(out), ref, err_msg=str(d))
        else:
            for p in KERNELS:
                ref = synflow_ref(leaf(ints, p).ravel(), leaf(mask, p).ravel(), d)
                np.testing.assert_array_equal(leaf(out, p).ravel(), ref, err_msg=f"{d} {p}")


def test_synflow_rule_remove_fraction_counts_alive():
    # int(f * alive) of the alive weights go, plus ties: f = 0.25 -> int(4.0) = 4: the four 1s.
    assert total_kept(prune.remove_fraction(TIE, TIE_FULL, 0.25, count_rule="synflow")) == 12
    # f = 0.3 -> int(4.8) = 4 (exact: round(4.8) = 5); f = 0.05 -> int(0.8) = 0: unchanged.
    assert total_kept(prune.remove_fraction(TIE, TIE_FULL, 0.3, count_rule="synflow")) == 12
    assert total_kept(prune.remove_fraction(TIE, TIE_FULL, 0.3)) == 11
    assert total_kept(prune.remove_fraction(TIE, TIE_FULL, 0.05, count_rule="synflow")) == 16
    # 0.07 * 100 = 7.000000000000001: int() -> 7 go.
    big = {"w": {"kernel": np.random.default_rng(0).permutation(100).reshape(10, 10)
                 .astype(np.float32)}}
    assert total_kept(prune.remove_fraction(big, masks.init(big), 0.07,
                                            count_rule="synflow")) == 93


def test_iterative_synflow_rule_follows_prune_loop():
    # Synaptic-Flow's prune_loop with a mask-independent (magnitude) scorer, in numpy.
    abs_p = jax.tree.map(np.abs, PARAMS)
    for schedule, d, rounds in [("exponential", 0.1, 7), ("linear", 0.1, 5)]:
        alive = np.ones(N, bool)
        for r in range(rounds):
            sparse = (d ** ((r + 1) / rounds) if schedule == "exponential"
                      else 1.0 - (1.0 - d) * ((r + 1) / rounds))
            alive = synflow_ref(flat_kernels(abs_p), alive, sparse)
        out = prune.iterative(lambda p, m, i: jax.tree.map(jnp.abs, p), PARAMS, FULL, None, d,
                              rounds=rounds, schedule=schedule, count_rule="synflow")
        np.testing.assert_array_equal(flat_kernels(out), alive, err_msg=schedule)


def test_openlth_rule_hand_counts():
    # remaining 16, f = 0.2: n = ceil(3.2) = 4, sorted[4] = 2: nine weights <= 2 go (exact: 3 go).
    assert total_kept(prune.remove_fraction(TIE, TIE_FULL, 0.2, count_rule="openlth")) == 7
    assert total_kept(prune.remove_fraction(TIE, TIE_FULL, 0.2)) == 13
    # f = 0: n = 0, still the smallest and its ties go (the reference's off-by-one).
    assert total_kept(prune.remove_fraction(TIE, TIE_FULL, 0.0, count_rule="openlth")) == 12
    # f = 0.6: n = ceil(9.6) = 10, sorted[10] = 3: eleven go.
    assert total_kept(prune.remove_fraction(TIE, TIE_FULL, 0.6, count_rule="openlth")) == 5
    # 0.07 * 100 = 7.000000000000001: n = 8, so 9 distinct weights go (exact: round(7) = 7).
    big = {"w": {"kernel": np.random.default_rng(0).permutation(100).reshape(10, 10)
                 .astype(np.float32)}}
    assert total_kept(prune.remove_fraction(big, masks.init(big), 0.07,
                                            count_rule="openlth")) == 91
    assert total_kept(prune.remove_fraction(big, masks.init(big), 0.07)) == 93
    # to_density: n = ceil(remaining - d * N) = ceil(16 - 8.0) = 8, sorted[8] = 2: keep 7;
    # d = 1.0: n = 0, nothing to prune, unchanged.
    assert total_kept(prune.to_density(TIE, TIE_FULL, 0.5, count_rule="openlth")) == 7
    assert total_kept(prune.to_density(TIE, TIE_FULL, 1.0, count_rule="openlth")) == 16
    # layerwise: a: n = ceil(2.0) = 2, sorted a[2] = 2 -> five go; b: n = ceil(1.2) = 2,
    # sorted b[2] = 2 -> four go.
    out = prune.remove_fraction(TIE, TIE_FULL, 0.2, scope="layerwise", count_rule="openlth")
    assert tie_kept(out) == {"a": 5, "b": 2}


def test_openlth_count_basis_includes_ignored_layer():
    tree = dict(TIE, c={"kernel": np.ones((2, 2), np.float32)})  # 'c' is ignored (rate 0)
    full = masks.init(tree)
    rates = masks.prunable(tree, exclude="c")
    basis = masks.prunable(tree)
    # With the basis, remaining = 20: n = ceil(0.45 * 20) = ceil(9.0) = 9, sorted[9] = 3: 11 go.
    out = prune.remove_fraction(tree, full, 0.45, rates=rates, count_rule="openlth",
                                count_basis=basis)
    assert tie_kept(out) == {"a": 3, "b": 2} and np.asarray(out["c"]["kernel"]).all()
    # Without, remaining = 16: n = ceil(7.2) = 8, sorted[8] = 2: nine go.
    out = prune.remove_fraction(tree, full, 0.45, rates=rates, count_rule="openlth")
    assert total_kept(out) - 4 == 7
    # to_density over the basis: n = ceil(20 - 0.5 * 20) = 10, sorted[10] = 3: keep 5 of a, b.
    out = prune.to_density(tree, full, 0.5, rates=rates, count_rule="openlth", count_basis=basis)
    assert total_kept(out) - 4 == 5
    # n >= the alive weights in scope (the reference would index past its vector): all of b go.
    only_b = masks.prunable(tree, include="b")
    out = prune.remove_fraction(tree, full, 0.5, rates=only_b, count_rule="openlth",
                                count_basis=basis)
    assert tie_kept(out) == {"a": 10, "b": 0}


def test_openlth_rule_matches_numpy_reference_under_jit():
    rates = masks.prunable(PARAMS, exclude="out")
    basis = masks.prunable(PARAMS)
    rng = np.random.default_rng(5)
    ints = jax.tree.map(lambda p: rng.integers(0, 7, np.shape(p)).astype(np.float32), PARAMS)
    step = jax.jit(lambda s, m: prune.remove_fraction(s, m, 0.2, rates=rates,
                                                      count_rule="openlth", count_basis=basis))
    mask = FULL
    for level in range(4):  # four IMP levels on a traced mask, checked against numpy
        pruned = np.concatenate([leaf(mask, p).ravel() for p in KERNELS[:2]])
        s = np.concatenate([leaf(ints, p).ravel() for p in KERNELS[:2]])
        remaining = int(flat_kernels(mask).sum())
        ref = openlth_ref(s, pruned, remaining, fraction=0.2)
        mask = step(ints, mask)
        got = np.concatenate([leaf(mask, p).ravel() for p in KERNELS[:2]])
        np.testing.assert_array_equal(got, ref, err_msg=str(level))
        np.testing.assert_array_equal(leaf(mask, "out/kernel"), leaf(FULL, "out/kernel"))
    eager = prune.remove_fraction(ints, mask, 0.2, rates=rates, count_rule="openlth",
                                  count_basis=basis)
    jax.tree.map(np.testing.assert_array_equal, step(ints, mask), eager)


def test_count_rule_validation():
    for f in (lambda: prune.to_density(SCORES, FULL, 0.5, count_rule="torch"),
              lambda: prune.remove_fraction(SCORES, FULL, 0.5, count_rule="Exact"),
              lambda: prune.iterative(lambda p, m, i: p, PARAMS, FULL, None, 0.5,
                                      count_rule="shrinkbench")):
        with pytest.raises(ValueError, match="count_rule must be one of 'exact', 'synflow', "
                                             "'openlth'"):
            f()
    with pytest.raises(ValueError, match="count_rule='synflow' counts in scope"):
        prune.to_density(SCORES, FULL, 0.5, scope="erk", count_rule="synflow")
    half = masks.prunable(PARAMS, rates={"out": 0.5})
    with pytest.raises(ValueError, match="count_rule='openlth' takes rates of 0 or 1"):
        prune.remove_fraction(SCORES, FULL, 0.2, rates=half, count_rule="openlth")
    with pytest.raises(ValueError, match="count_basis is used by count_rule='openlth'"):
        prune.to_density(SCORES, FULL, 0.5, count_basis=masks.prunable(PARAMS))
    with pytest.raises(ValueError, match="leaves out \\['out/kernel'\\]"):
        prune.remove_fraction(SCORES, FULL, 0.2, count_rule="openlth",
                              count_basis=masks.prunable(PARAMS, exclude="out"))


# ---------------------------------------------------------------------------------------------
# Layer-density scopes: uniform and erk.

MODEL = {"Conv_0": {"kernel": (3, 3, 1, 8), "bias": (8,)},
         "Conv_1": {"kernel": (3, 3, 8, 16), "bias": (16,)},
         "Dense_0": {"kernel": (64, 32), "bias": (32,)},
         "Dense_1": {"kernel": (32, 10), "bias": (10,)}}
MODEL_KERNELS = ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]  # leaf order
MODEL_SCORES = jax.tree.map(
    lambda s: np.abs(np.random.default_rng(len(s) * 7 + sum(s)).normal(size=s)).astype(np.float32),
    MODEL, is_leaf=lambda x: isinstance(x, tuple))
MODEL_FULL = masks.init(MODEL_SCORES)


def erk_ref(shapes, K):
    """ERK densities in numpy float64, written from the formula (JaxPruner's loop: make the
    largest-ratio layers dense while eps * ratio > 1)."""
    n = np.array([np.prod(s) for s in shapes], float)
    ratio = np.array([np.sum(s) / np.prod(s) for s in shapes])
    dense = np.zeros(len(shapes), bool)
    while True:
        eps = (K - n[dense].sum()) / (ratio[~dense] * n[~dense]).sum()
        if ratio[~dense].max() * eps <= 1:
            break
        dense |= ~dense & (ratio == ratio[~dense].max())
    return np.where(dense, 1.0, eps * ratio), dense


def largest_remainder(real, K):
    """Floors, then +1 to the K - sum(floors) largest fractional parts (float64: whole numbers
    snapped, and the cut must not fall between two near-equal remainders)."""
    real = np.where(np.abs(real - np.round(real)) < 1e-9, np.round(real), real)
    floor = np.floor(real).astype(int)
    frac = real - floor
    order = np.argsort(-frac, kind="stable")
    extra = K - floor.sum()
    if 0 < extra < len(real):
        assert frac[order[extra - 1]] - frac[order[extra]] > 1e-9, "float64 cut not decisive"
    floor[order[:extra]] += 1
    return floor


@pytest.mark.parametrize("d,saturated", [(0.05, []), (0.3, ["Conv_0"]),
                                         (0.6, ["Conv_0", "Dense_1"])])
def test_erk_layer_densities(d, saturated):
    shapes = [MODEL[k]["kernel"] for k in MODEL_KERNELS]
    n = np.array([np.prod(s) for s in shapes])
    K = ref_count(d, int(n.sum()))
    dens, dense = erk_ref(shapes, K)
    assert [MODEL_KERNELS[i] for i in np.flatnonzero(dense)] == saturated
    expected = largest_remainder(dens * n, K)
    out = prune.to_density(MODEL_SCORES, MODEL_FULL, d, scope="erk")
    got = np.array([int(np.asarray(out[k]["kernel"]).sum()) for k in MODEL_KERNELS])
    np.testing.assert_array_equal(got, expected)
    assert got.sum() == K  # the global count, exactly
    np.testing.assert_array_equal(got[dense], n[dense])
    assert np.all(np.abs(got - dens * n) < 1)
    for k, c in zip(MODEL_KERNELS, got):  # inside a layer: the best scores, lower index on ties
        s = np.asarray(MODEL_SCORES[k]["kernel"]).ravel()
        np.testing.assert_array_equal(np.asarray(out[k]["kernel"]).ravel(),
                                      ref_top(s, np.ones(s.size, bool), c))
        assert np.asarray(out[k]["bias"]).all()
    np.testing.assert_array_equal(prune.keep_counts(MODEL_FULL, d, scope="erk"), expected)


def test_uniform_equal_densities_exact_total():
    # 0.25 of 72, 96, 40 is whole: every layer at exactly 0.25.
    out = prune.to_density(SCORES, FULL, 0.25, scope="uniform")
    assert kept(out) == {"conv/kernel": 18, "fc/kernel": 24, "out/kernel": 10}
    # 0.3: K = round(62.4) = 62, shares 62 * n / 208 = 21.46, 28.62, 11.92: floors 21, 28, 11,
    # the two spare weights to the largest remainders (out, fc). Layerwise: 22, 29, 12 = 63.
    out = prune.to_density(SCORES, FULL, 0.3, scope="uniform")
    assert kept(out) == {"conv/kernel": 21, "fc/kernel": 29, "out/kernel": 12}
    assert sum(kept(prune.to_density(SCORES, FULL, 0.3, scope="layerwise")).values()) == 63
    for d in [0.01, 0.17, 0.5, 0.93]:
        k = kept(prune.to_density(SCORES, FULL, d, scope="uniform"))
        assert sum(k.values()) == ref_count(d, N)
        for p in KERNELS:
            assert abs(k[p] - d * SIZES[p]) < 1, (d, p)


def test_erk_and_uniform_remove_fraction_and_rates():
    shapes = [MODEL[k]["kernel"] for k in MODEL_KERNELS]
    n = np.array([np.prod(s) for s in shapes])
    mask = MODEL_FULL
    for level in range(3):  # IMP on the ERK distribution: K = alive - round(0.4 * alive)
        alive = sum(int(np.asarray(mask[k]["kernel"]).sum()) for k in MODEL_KERNELS)
        K = alive - ref_count(0.4, alive)
        dens, _ = erk_ref(shapes, K)
        expected = np.minimum(largest_remainder(dens * n, K),
                              [int(np.asarray(mask[k]["kernel"]).sum()) for k in MODEL_KERNELS])
        mask = prune.remove_fraction(MODEL_SCORES, mask, 0.4, scope="erk")
        got = [int(np.asarray(mask[k]["kernel"]).sum()) for k in MODEL_KERNELS]
        np.testing.assert_array_equal(got, expected, err_msg=str(level))
    # A rate-0 leaf is outside the split; a multiplier is refused.
    rates = masks.prunable(PARAMS, exclude="out")
    out = prune.to_density(SCORES, FULL, 0.25, scope="uniform", rates=rates)
    assert kept(out) == {"conv/kernel": 18, "fc/kernel": 24, "out/kernel": 40}
    with pytest.raises(ValueError, match="scope='erk' takes rates of 0 or 1"):
        prune.to_density(SCORES, FULL, 0.5, scope="erk",
                         rates=masks.prunable(PARAMS, rates={"out": 0.5}))


def test_erk_traced_density_iterative_and_units():
    f = jax.jit(lambda d: prune.to_density(MODEL_SCORES, MODEL_FULL, d, scope="erk"))
    for d in [0.05, 0.3, 0.6]:
        jax.tree.map(np.testing.assert_array_equal, f(d),
                     prune.to_density(MODEL_SCORES, MODEL_FULL, d, scope="erk"))
    # Magnitude rounds nest: iterative lands on the one-shot erk mask.
    out = prune.iterative(lambda p, m, i: jax.tree.map(jnp.abs, p), MODEL_SCORES, MODEL_FULL,
                          None, 0.1, rounds=3, scope="erk")
    jax.tree.map(np.testing.assert_array_equal, out,
                 prune.to_density(MODEL_SCORES, MODEL_FULL, 0.1, scope="erk"))
    # Units: the leaf's erk share in whole units, round-half-up(kept_l / unit size).
    kept_w = prune.keep_counts(MODEL_FULL, 0.3, scope="erk")
    out = prune.units_to_density(prune.unit_scores(MODEL_SCORES), MODEL_FULL, 0.3, scope="erk")
    for k, c in zip(MODEL_KERNELS, kept_w):
        shape = MODEL[k]["kernel"]
        unit = int(np.prod(shape[:-1]))
        assert units_kept(out, k + "/kernel").sum() == ref_round(Decimal(int(c)) / unit)
