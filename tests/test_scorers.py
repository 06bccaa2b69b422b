"""Tests for lottery.scorers: each scorer against an independent computation, jit, composition."""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lottery import masks, scorers


class MLP(nn.Module):
    """8-16-12-3 ReLU MLP."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(12)(x))
        return nn.Dense(3)(x)


class CNN(nn.Module):
    """3x3 conv with 4 channels on 8x8x2, then a dense layer to 3 classes."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x))
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


class Chain(nn.Module):
    """A ReLU MLP of the given widths (last layer linear)."""
    widths: tuple

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            x = nn.Dense(w)(x)
            if i < len(self.widths) - 1:
                x = nn.relu(x)
        return x


def mlp_apply(p, x):
    return MLP().apply({"params": p}, x)


def cnn_apply(p, x):
    return CNN().apply({"params": p}, x)


class Case(NamedTuple):
    params: dict
    mask: dict
    rates: dict
    inputs: scorers.Inputs


def _random_mask(params, rates, rng, keep=0.7):
    return jax.tree.map(lambda p, r: jnp.asarray(rng.random(p.shape) < keep) if r > 0
                        else jnp.ones(p.shape, bool), params, rates)


def _make_case(model, apply_fn, in_shape, seed, exclude=None):
    rng = np.random.default_rng(seed)
    params = model.init(jax.random.key(seed), jnp.ones((1, *in_shape)))["params"]
    # Nonzero biases and perturbed kernels, so that every leaf matters.
    params = jax.tree.map(
        lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    rates = masks.prunable(params, exclude=exclude)
    mask = _random_mask(params, rates, rng)
    batches = [(jnp.asarray(rng.standard_normal((6, *in_shape)), jnp.float32),
                jnp.asarray(rng.integers(0, 3, 6))) for _ in range(2)]
    inputs = scorers.Inputs.create(apply_fn, batches, input_shape=(1, *in_shape),
                                   key=jax.random.key(seed + 1),
                                   rates=rates if exclude else None)
    return Case(params, mask, rates, inputs)


CASES = {
    # The MLP excludes its output layer from pruning, to exercise custom rates.
    "mlp": _make_case(MLP(), mlp_apply, (8,), 0, exclude="Dense_2"),
    "cnn": _make_case(CNN(), cnn_apply, (8, 8, 2), 1),
}


JIT = {name: jax.jit(s) for name, s in scorers.SCORERS.items()}


@pytest.fixture(params=sorted(CASES))
def case(request):
    return CASES[request.param]


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _xent(logits, y):
    """Mean cross-entropy written without optax."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(logp[jnp.arange(y.shape[0]), y])


def _assert_trees_close(actual, expected, rtol=1e-5, rel_atol=1e-6):
    for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                            jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        scale = max(1e-30, float(np.abs(e).max()))
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rel_atol * scale,
                                   err_msg=masks.path_str(path))


def _pruned(case):
    """(score leaf index, bool array of pruned entries) for every prunable leaf with pruning."""
    out = []
    for i, (m, r) in enumerate(zip(jax.tree.leaves(case.mask), jax.tree.leaves(case.rates))):
        if r > 0 and not np.asarray(m).all():
            out.append((i, ~np.asarray(m)))
    return out


# ---------------------------------------------------------------------------------------------
# Individual scorers


def test_magnitude_is_abs(case):
    got = JIT["magnitude"](case.params, case.mask, case.inputs)
    for g, p in zip(jax.tree.leaves(got), jax.tree.leaves(_np(case.params))):
        np.testing.assert_array_equal(np.asarray(g), np.abs(p))


def test_random_scores():
    case = CASES["cnn"]  # model-agnostic; one case keeps the RNG compilations few
    p, m, inp = case.params, case.mask, case.inputs
    got = JIT["random"](p, m, inp)
    shapes = [leaf.shape for leaf in jax.tree.leaves(p)]
    expected = jax.jit(lambda key: [jax.random.normal(k, s) for k, s in
                                    zip(jax.random.split(key, len(shapes)), shapes)])(inp.key)
    for g, e in zip(jax.tree.leaves(got), expected):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
    flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(got)])
    assert abs(flat.mean()) < 4 / np.sqrt(flat.size)
    assert abs(flat.std() - 1) < 0.15
    # Independent of the params and the mask; a different key gives different scores.
    doubled = jax.tree.map(lambda a: 2 * a, p)
    same = JIT["random"](doubled, masks.init(p), inp)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(same)))
    other = JIT["random"](p, m, inp.replace(key=jax.random.key(123)))
    assert not np.array_equal(jax.tree.leaves(got)[0], jax.tree.leaves(other)[0])


def _grads_wrt_weights(case):
    """Per-batch ∂L_b/∂w at w = m ⊙ θ, summed in Python."""
    apply_fn = case.inputs.apply_fn

    @jax.jit
    def grads(p, m, batches):
        w = jax.tree.map(lambda a, mm: a * mm, p, m)
        total = None
        for x, y in batches:
            g = jax.grad(lambda ww: _xent(apply_fn(ww, x), y))(w)
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        return total

    return grads(case.params, case.mask, case.inputs.batches)


def test_snip_is_mask_gradient(case):
    p, m, apply_fn = case.params, case.mask, case.inputs.apply_fn

    @jax.jit
    def expected_fn(p, m, batches):
        mf = jax.tree.map(lambda a: a.astype(jnp.float32), m)
        total = None
        for x, y in batches:
            g = jax.grad(lambda mm: _xent(apply_fn(jax.tree.map(jnp.multiply, p, mm), x), y))(mf)
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        return jax.tree.map(jnp.abs, total)

    expected = expected_fn(p, m, case.inputs.batches)
    got = JIT["snip"](p, m, case.inputs)
    _assert_trees_close(got, expected)
    # Documented: on pruned entries SNIP is |θ ⊙ ∂L/∂w| at w = 0, not zero.
    leaves = jax.tree.leaves(got)
    assert any((np.asarray(leaves[i])[pr] > 0).any() for i, pr in _pruned(case))


def test_gradient_magnitude_is_taylor(case):
    gw = _grads_wrt_weights(case)
    expected = jax.tree.map(lambda a, m, g: np.abs(np.asarray(a) * np.asarray(m) * np.asarray(g)),
                            case.params, case.mask, gw)
    got = JIT["gradient_magnitude"](case.params, case.mask, case.inputs)
    _assert_trees_close(got, expected)
    leaves = jax.tree.leaves(got)
    assert _pruned(case)
    for i, pr in _pruned(case):
        assert (np.asarray(leaves[i])[pr] == 0).all()


def _prunable_split(case):
    """(flat prunable params, function flat -> full params) for Hessians on prunable leaves."""
    leaves, treedef = jax.tree.flatten(case.params)
    idx = [i for i, r in enumerate(jax.tree.leaves(case.rates)) if r > 0]
    flat, unravel = ravel_pytree([leaves[i] for i in idx])

    def full(v):
        new = list(leaves)
        for i, a in zip(idx, unravel(v)):
            new[i] = a
        return jax.tree.unflatten(treedef, new)

    return flat, full, idx


def test_grasp_against_explicit_hessian(case):
    flat, full, idx = _prunable_split(case)
    m = case.mask

    def loss(v):
        w = jax.tree.map(lambda a, mm: a * mm, full(v), m)
        return sum(_xent(case.inputs.apply_fn(w, x) / 200.0, y) for x, y in case.inputs.batches)

    g, hess = jax.jit(lambda v: (jax.grad(loss)(v), jax.hessian(loss)(v)))(flat)
    expected = np.asarray(flat) * (np.asarray(hess, np.float64) @ np.asarray(g, np.float64))
    got = jax.tree.leaves(JIT["grasp"](case.params, m, case.inputs))
    got_flat = np.concatenate([np.ravel(got[i]) for i in idx])
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(got_flat, expected, rtol=2e-3, atol=1e-4 * scale)
    for i, pr in _pruned(case):
        assert (np.asarray(got[i])[pr] == 0).all()


def _np_synflow(kernels, biases, kmasks, in_dim):
    """SynFlow scores of a Dense/ReLU chain by explicit forward/backward in float64 numpy."""
    ws = [np.abs(np.asarray(k, np.float64)) * np.asarray(m) for k, m in zip(kernels, kmasks)]
    bs = [np.abs(np.asarray(b, np.float64)) for b in biases]
    acts, zs = [np.ones(in_dim)], []
    for i, (w, b) in enumerate(zip(ws, bs)):
        z = acts[-1] @ w + b
        zs.append(z)
        acts.append(np.maximum(z, 0) if i < len(ws) - 1 else z)
    delta = np.ones(ws[-1].shape[1])  # ∂R/∂z of the linear output layer
    k_scores, b_scores = [None] * len(ws), [None] * len(ws)
    for i in reversed(range(len(ws))):
        grad_w = np.outer(acts[i], delta) * np.asarray(kmasks[i])
        k_scores[i] = np.abs(np.abs(np.asarray(kernels[i], np.float64)) * grad_w)
        b_scores[i] = np.abs(bs[i] * delta)
        if i > 0:
            delta = (ws[i] @ delta) * (zs[i - 1] > 0)
    return k_scores, b_scores, float(acts[-1].sum())


def _chain_case(widths, in_dim, seed, kernel_scale=1.0, bias_scale=0.0, keep=0.8):
    rng = np.random.default_rng(seed)
    model = Chain(tuple(widths))
    dims = (in_dim, *widths)
    params = {f"Dense_{i}": {
        "kernel": jnp.asarray(kernel_scale * rng.standard_normal(dims[i:i + 2]) / np.sqrt(dims[i]),
                              jnp.float32),
        "bias": jnp.asarray(bias_scale * rng.standard_normal(dims[i + 1]), jnp.float32)}
        for i in range(len(widths))}
    mask = _random_mask(params, masks.prunable(params), rng, keep)
    inputs = scorers.Inputs.create(lambda p, x: model.apply({"params": p}, x),
                                   input_shape=(1, in_dim))
    names = [f"Dense_{i}" for i in range(len(widths))]
    ref = _np_synflow([params[n]["kernel"] for n in names], [params[n]["bias"] for n in names],
                      [mask[n]["kernel"] for n in names], in_dim)
    return params, mask, inputs, names, ref


def _flat_scores(scores, names):
    return np.concatenate([np.ravel(np.asarray(scores[n][k], np.float64))
                           for n in names for k in ("kernel", "bias")])


def _flat_ref(ref):
    k_scores, b_scores, _ = ref
    return np.concatenate([np.ravel(a) for k, b in zip(k_scores, b_scores) for a in (k, b)])


def test_synflow_two_layer_numpy():
    params, mask, inputs, names, ref = _chain_case((5, 3), 4, 0, bias_scale=0.5, keep=0.7)
    got = JIT["synflow"](params, mask, inputs)
    k_scores, b_scores, _ = ref
    for n, ks, bsc in zip(names, k_scores, b_scores):
        np.testing.assert_allclose(np.asarray(got[n]["kernel"]), ks, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(got[n]["bias"]), bsc, rtol=1e-5, atol=1e-7)
        assert (np.asarray(got[n]["kernel"])[~np.asarray(mask[n]["kernel"])] == 0).all()
    assert np.asarray(got["Dense_0"]["bias"]).min() > 0  # biases are scored, with |b|


def _naive_r(apply_fn, params, mask, in_dim):
    """R = Σ f(m ⊙ |θ|)(1) in plain float32, without any rescaling."""
    phi = jax.tree.map(jnp.abs, masks.apply(params, mask))
    return float(jax.jit(apply_fn)(phi, jnp.ones((1, in_dim))).sum())


def _assert_proportional_by_power_of_two(got, ref):
    """got = 2^k * ref exactly up to float32 rounding, and zero exactly where ref is zero."""
    assert np.isfinite(got).all()
    zero = ref == 0
    assert (got[zero] == 0).all()
    ratio = got[~zero] / ref[~zero]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
    k = np.log2(ratio[0])
    assert abs(k - round(k)) < 1e-4, k


def _assert_same_ranking(a, b, rtol=1e-4):
    """Sorted by b, a never decreases by more than rtol (ties within rounding may swap)."""
    order = np.argsort(b, kind="stable")
    sa = a[order]
    assert (sa[1:] >= sa[:-1] * (1 - rtol) - 1e-300).all()


@pytest.mark.parametrize("kernel_scale,bias_scale,log2_range", [
    (300.0, 0.3, (70, 110)),   # seed scaling only: exact even with nonzero biases
    (8000.0, 0.0, (130, 230)),  # input + seed scaling: homogeneous net (zero biases)
])
def test_synflow_float32_rescaling_matches_float64(kernel_scale, bias_scale, log2_range):
    widths = (8,) * 9 + (3,)
    params, mask, inputs, names, ref = _chain_case(widths, 8, 3, kernel_scale, bias_scale)
    log2_r = np.log2(ref[2])
    assert log2_range[0] < log2_r < log2_range[1], log2_r
    # Naive float32 would not be usable in the homogeneous case: R itself overflows.
    assert np.isfinite(_naive_r(inputs.apply_fn, params, mask, 8)) == (log2_r < 128)

    got32 = _flat_scores(JIT["synflow"](params, mask, inputs), names)
    assert jax.tree.leaves(JIT["synflow"](params, mask, inputs))[0].dtype == jnp.float32
    expected = _flat_ref(ref)
    _assert_proportional_by_power_of_two(got32, expected)
    if log2_r < 128:  # plain float32 works here: rescaling must change scores by 2^k exactly
        def plain(p):
            phi = jax.tree.map(jnp.abs, p)
            grads = jax.grad(lambda q: inputs.apply_fn(masks.apply(q, mask),
                                                       jnp.ones((1, 8))).sum())(phi)
            return jax.tree.map(lambda a, g: jnp.abs(a * g), phi, grads)

        unscaled = _flat_scores(jax.jit(plain)(params), names)
        assert np.isfinite(unscaled).all()
        nonzero = unscaled != 0
        assert ((got32 == 0) == ~nonzero).all()
        ratios = np.unique(got32[nonzero] / unscaled[nonzero])
        assert ratios.size == 1 and ratios[0] < 1, ratios
        assert np.log2(ratios[0]) == round(np.log2(ratios[0]))
    with jax.enable_x64(True):
        s64 = JIT["synflow"](params, mask, inputs)
        assert jax.tree.leaves(s64)[0].dtype == jnp.float64
        got64 = _flat_scores(s64, names)
    np.testing.assert_allclose(got64, expected, rtol=1e-9)
    _assert_same_ranking(got32, got64)


class BNChain(nn.Module):
    """Dense -> inference batch norm -> ReLU blocks (zero running mean, zero beta at init)."""
    widths: tuple

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            x = nn.Dense(w)(x)
            if i < len(self.widths) - 1:
                x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
        return x


def test_synflow_batchnorm_net_rescaled_matches_float64():
    model = BNChain((8,) * 9 + (3,))
    variables = model.init(jax.random.key(5), jnp.ones((1, 8)))
    params = jax.tree.map(lambda p: p * 8000.0 if p.ndim == 2 else p, variables["params"])
    stats = variables["batch_stats"]
    mask = _random_mask(params, masks.prunable(params), np.random.default_rng(5), 0.8)
    inputs = scorers.Inputs.create(
        lambda p, x: model.apply({"params": p, "batch_stats": stats}, x), input_shape=(1, 8))
    assert not np.isfinite(_naive_r(inputs.apply_fn, params, mask, 8))
    got32 = np.concatenate([np.ravel(a) for a in jax.tree.leaves(
        JIT["synflow"](params, mask, inputs))]).astype(np.float64)
    with jax.enable_x64(True):
        got64 = np.concatenate([np.ravel(a) for a in jax.tree.leaves(
            JIT["synflow"](params, mask, inputs))])
    assert got64.dtype == np.float64 and np.isfinite(got64).all()
    _assert_proportional_by_power_of_two(got32, got64)
    _assert_same_ranking(got32, got64)


# ---------------------------------------------------------------------------------------------
# jit, registry, bad input


@pytest.mark.parametrize("name", sorted(scorers.SCORERS))
def test_jit_matches_eager(name):
    case = CASES["cnn"]  # eager runs op by op: one model keeps this fast; jit runs everywhere
    s = scorers.get(name)
    eager = s(case.params, case.mask, case.inputs)
    jitted = jax.jit(s)(case.params, case.mask, case.inputs)
    assert jax.tree.structure(eager) == jax.tree.structure(case.params)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        assert a.shape == b.shape and np.isfinite(np.asarray(a)).all()
    _assert_trees_close(jitted, eager, rtol=1e-4, rel_atol=1e-6)


def test_get_unknown_name_lists_names():
    with pytest.raises(ValueError, match="synflow") as err:
        scorers.get("snap")
    assert "'snap'" in str(err.value) and "magnitude" in str(err.value)


@pytest.mark.parametrize("name,field,kwargs", [
    ("synflow", "input_shape", dict(apply_fn=mlp_apply)),
    ("synflow", "apply_fn", dict(input_shape=(1, 8))),
    ("snip", "batches", dict(apply_fn=mlp_apply)),
    ("snip", "apply_fn", dict(batches=(jnp.ones((2, 8)), jnp.zeros(2, int)))),
    ("grasp", "batches", dict(apply_fn=mlp_apply)),
    ("gradient_magnitude", "apply_fn", dict(batches=(jnp.ones((2, 8)), jnp.zeros(2, int)))),
    ("random", "key", dict()),
])
def test_missing_field_raises(name, field, kwargs):
    case = CASES["mlp"]
    inputs = scorers.Inputs.create(**kwargs)
    with pytest.raises(ValueError, match=f"inputs.{field}"):
        scorers.get(name)(case.params, case.mask, inputs)


def test_inputs_create_and_validation():
    x, y = jnp.ones((2, 8)), jnp.zeros(2, int)
    one = scorers.Inputs.create(mlp_apply, (x, y))
    assert len(one.batches) == 1 and one.batches[0][0] is x
    two = scorers.Inputs.create(mlp_apply, [(x, y), (x, y)])
    assert len(two.batches) == 2
    case = CASES["mlp"]
    assert scorers.leaf_rates(case.params, case.inputs) == case.rates
    assert scorers.leaf_rates(case.params, one) == masks.prunable(case.params)
    with pytest.raises(ValueError, match="input_shape"):
        scorers.Inputs.create(input_shape=(8,))
    with pytest.raises(ValueError, match=r"batches\[1\]"):
        scorers.Inputs.create(mlp_apply, [(x, y), x])
    bad_mask = dict(case.mask)
    del bad_mask["Dense_1"]
    with pytest.raises(ValueError, match="Dense_1"):
        scorers.snip(case.params, bad_mask, case.inputs)
    with pytest.raises(ValueError, match="tuple of \\(x, y\\) pairs"):
        scorers.snip(case.params, case.mask, scorers.Inputs(apply_fn=mlp_apply, batches=(x, y)))
    with pytest.raises(ValueError, match="inputs.rates has 2 entries"):
        scorers.grasp(case.params, case.mask,
                     scorers.Inputs.create(mlp_apply, (x, y), rates=(1.0, 0.0)))


# ---------------------------------------------------------------------------------------------
# Composition


def squared(params, mask, inputs):
    """A user-defined scorer: θ² on kept entries, -1 on pruned ones."""
    del inputs
    return jax.tree.map(lambda p, m: jnp.where(m, p * p, -1.0), params, mask)


def _prunable_np(case, scores):
    """[(leaf index, scores, kept)] for prunable leaves, as numpy."""
    out = []
    for i, (s, m, r) in enumerate(zip(jax.tree.leaves(scores), jax.tree.leaves(case.mask),
                                      jax.tree.leaves(case.rates))):
        if r > 0:
            out.append((i, np.asarray(s, np.float64), np.asarray(m)))
    return out


def test_weighted_sum_against_numpy(case):
    p, m, inp = case.params, case.mask, case.inputs
    a = np.asarray  # noqa: E731
    mag = [a(x, np.float64) for x in jax.tree.leaves(scorers.magnitude(p, m, inp))]
    sq = [a(x, np.float64) for x in jax.tree.leaves(squared(p, m, inp))]
    prun = [i for i, r in enumerate(jax.tree.leaves(case.rates)) if r > 0]
    kept = [a(x) for x in jax.tree.leaves(m)]
    norm_mag = sum(np.abs(mag[i][kept[i]]).sum() for i in prun)
    norm_sq = sum(np.abs(sq[i][kept[i]]).sum() for i in prun)
    scorer = scorers.weighted_sum([(0.3, scorers.magnitude), (2.0, squared)])
    got = jax.tree.leaves(jax.jit(scorer)(p, m, inp))
    for i in range(len(got)):
        np.testing.assert_allclose(got[i], 0.3 * mag[i] / norm_mag + 2.0 * sq[i] / norm_sq,
                                   rtol=1e-5)
    raw = jax.tree.leaves(scorers.weighted_sum([(0.3, scorers.magnitude), (2.0, squared)],
                                               normalize=False)(p, m, inp))
    for i in range(len(raw)):
        np.testing.assert_allclose(raw[i], 0.3 * mag[i] + 2.0 * sq[i], rtol=1e-6)


def _np_ranks(case, scores):
    """Global stable ranks over prunable entries, pruned entries first."""
    parts = _prunable_np(case, scores)
    flat = np.concatenate([np.where(k, s, -np.inf).ravel() for _, s, k in parts])
    ranks = np.empty(flat.size)
    ranks[np.argsort(flat, kind="stable")] = np.arange(flat.size)
    out, start = {}, 0
    for i, s, _ in parts:
        out[i] = ranks[start:start + s.size].reshape(s.shape)
        start += s.size
    return out


def test_rank_average_against_numpy(case):
    p, m, inp = case.params, case.mask, case.inputs
    scorer = scorers.rank_average([scorers.magnitude, squared, scorers.snip])
    got = jax.tree.leaves(jax.jit(scorer)(p, m, inp))
    rs = [_np_ranks(case, s(p, m, inp)) for s in (JIT["magnitude"], squared, JIT["snip"])]
    for i, g in enumerate(got):
        if i in rs[0]:
            np.testing.assert_allclose(g, (rs[0][i] + rs[1][i] + rs[2][i]) / 3, rtol=1e-6)
        else:
            assert (np.asarray(g) == 0).all()


def test_rank_average_ties_are_deterministic(case):
    # Rounded magnitudes have many ties; ranks must be a permutation in flat-position order.
    rounded = jax.tree.map(lambda a: jnp.round(a * 2) / 2, case.params)
    scorer = jax.jit(scorers.rank_average([scorers.magnitude]))
    got = jax.tree.leaves(scorer(rounded, case.mask, case.inputs))
    expected = _np_ranks(case, JIT["magnitude"](rounded, case.mask, case.inputs))
    flat = np.concatenate([np.ravel(got[i]) for i in expected])
    assert len(np.unique(flat)) == flat.size
    for i, e in expected.items():
        np.testing.assert_array_equal(got[i], e)


def test_product_against_numpy(case):
    p, m, inp = case.params, case.mask, case.inputs
    got = jax.tree.leaves(jax.jit(scorers.product([scorers.magnitude, squared]))(p, m, inp))
    for g, a, mm in zip(got, jax.tree.leaves(_np(p)), jax.tree.leaves(_np(m))):
        np.testing.assert_allclose(g, np.abs(a) * np.where(mm, a * a, -1.0), rtol=1e-6)


def test_composition_bad_input():
    with pytest.raises(ValueError, match=r"terms\[0\]"):
        scorers.weighted_sum([scorers.magnitude])
    with pytest.raises(ValueError, match=r"terms\[1\]\[1\]"):
        scorers.weighted_sum([(1.0, scorers.magnitude), (1.0, "snip")])
    with pytest.raises(ValueError, match="at least one"):
        scorers.rank_average([])
    with pytest.raises(ValueError, match=r"scorers\[0\]"):
        scorers.product([None])

