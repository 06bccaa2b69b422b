"""Tests for lottery.groups: channel groups derived from the traced model, scores, group masks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lottery import Inputs, groups, masks, models, prune


pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models (tests/conftest.py)


class Toy(nn.Module):
    """Two convs meeting in a residual add, a conv + batch norm, their concatenation, max pool,
    flatten into a dense layer, the classifier."""

    @nn.compact
    def __call__(self, x, train=False):
        a = nn.relu(nn.Conv(4, (3, 3), name="a")(x))
        b = nn.Conv(4, (1, 1), name="b")(x)
        s = nn.relu(a + b)                                   # couples a's and b's channels
        n = nn.BatchNorm(use_running_average=True, name="bn")(nn.Conv(3, (3, 3), name="c")(s))
        cat = jnp.concatenate([s, nn.relu(n)], -1)          # 7 channels: s's 4, then c's 3
        y = nn.max_pool(cat, (2, 2), (2, 2))                 # (N, 2, 2, 7)
        y = y.reshape(y.shape[0], -1)                        # row (h * 2 + w) * 7 + channel
        h = nn.relu(nn.Dense(5, name="d")(y))
        return nn.Dense(2, name="out")(h)


def _init(model, shape, seed=0, **kwargs):
    """Random numpy variables of `model` for inputs of `shape` (no compilation: eval_shape)."""
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)), **kwargs))
    rng = np.random.default_rng(seed)
    v = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.7).astype(np.float32), dict(v))
    if "batch_stats" in v:
        v["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda path, a: np.abs(a) + 0.5 if path[-1].key == "var" else a, v["batch_stats"])
    return v


def _toy(seed=0):
    model = Toy()
    x = np.random.default_rng(seed).normal(size=(6, 4, 4, 2)).astype(np.float32)
    return model, _init(model, (4, 4, 2), seed + 1), x


def _members(g):
    return {(m.collection, m.path, m.axis, m.role) for m in g.members}


def _rows(flat_channels, channels, h=2, w=2):
    """Rows of the dense kernel after the flatten for the given channel offsets."""
    return np.asarray([[(i * w + j) * flat_channels + c for i in range(h) for j in range(w)]
                       for c in channels])


def test_groups_of_a_handwritten_model_with_add_concat_bn_and_flatten():
    model, v, x = _toy()
    g = groups.derive(model, v, x[:1])
    assert [(grp.name, grp.size) for grp in g] == [("a+1", 4), ("c", 3), ("d", 5)]
    p = "params"
    assert _members(g[0]) == {
        (p, "a/kernel", 3, "out"), (p, "b/kernel", 3, "out"), (p, "a/bias", 0, "other"),
        (p, "b/bias", 0, "other"), (p, "c/kernel", 2, "in"), (p, "d/kernel", 0, "in")}
    assert _members(g[1]) == {
        (p, "c/kernel", 3, "out"), (p, "c/bias", 0, "other"), (p, "bn/scale", 0, "other"),
        (p, "bn/bias", 0, "other"), ("batch_stats", "bn/mean", 0, "other"),
        ("batch_stats", "bn/var", 0, "other"), (p, "d/kernel", 0, "in")}
    assert _members(g[2]) == {(p, "d/kernel", 1, "out"), (p, "d/bias", 0, "other"),
                              (p, "out/kernel", 0, "in")}
    assert g[0].layers == ("a", "b")
    rows = {grp.name: next(m.index for m in grp.members if m.path == "d/kernel" and m.axis == 0)
            for grp in g[:2]}
    np.testing.assert_array_equal(rows["a+1"], _rows(7, range(4)))     # concat offset 0
    np.testing.assert_array_equal(rows["c"], _rows(7, range(4, 7)))    # concat offset 4
    assert g.excluded == (("out (2 channels)", "reaches the model output (the classifier's "
                                               "outputs)"),)


def test_groups_of_resnet20_three_residual_groups_and_nine_inner():
    model = models.create("resnet20")
    v = jax.eval_shape(lambda: models.init(model, jax.random.key(0), (32, 32, 3)))
    g = groups.derive(model, v, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32), train=False)
    assert len(g) == 12
    res = {grp.size: grp for grp in g if len(grp.layers) > 1}
    assert sorted(res) == [16, 32, 64]
    b = [f"stage{s}_block{i}" for s in (1, 2, 3) for i in range(3)]
    # stage 1: the stem and the three identity blocks; stages 2, 3 start at the projection
    assert set(res[16].layers) == {"conv", f"{b[0]}/conv2", f"{b[1]}/conv2", f"{b[2]}/conv2"}
    assert set(res[32].layers) == {f"{b[3]}/conv2", f"{b[3]}/shortcut_conv", f"{b[4]}/conv2",
                                   f"{b[5]}/conv2"}
    assert set(res[64].layers) == {f"{b[6]}/conv2", f"{b[6]}/shortcut_conv", f"{b[7]}/conv2",
                                   f"{b[8]}/conv2"}
    readers = lambda grp: {m.path for m in grp.members if m.role == "in"}  # noqa: E731
    assert readers(res[16]) == {f"{x}/conv1/kernel" for x in b[:4]} | {
        f"{b[3]}/shortcut_conv/kernel"}
    assert readers(res[32]) == {f"{x}/conv1/kernel" for x in b[4:7]} | {
        f"{b[6]}/shortcut_conv/kernel"}
    assert readers(res[64]) == {f"{x}/conv1/kernel" for x in b[7:]} | {"out/kernel"}
    norms = {m.path for m in res[32].members if m.role == "other"}
    assert norms == {f"{x}/{bn}/{leaf}" for x, bn in [(b[3], "bn2"), (b[3], "shortcut_bn"),
                                                      (b[4], "bn2"), (b[5], "bn2")]
                     for leaf in ("scale", "bias", "mean", "var")}
    inner = [grp for grp in g if len(grp.layers) == 1]
    assert sorted(grp.name for grp in inner) == sorted(f"{x}/conv1" for x in b)
    for grp in inner:
        assert readers(grp) == {grp.name.replace("conv1", "conv2") + "/kernel"}
    assert [w for w, _ in g.excluded] == ["out (10 channels)"]


def test_groups_of_vgg11_one_per_conv():
    model = models.create("vgg11")
    v = jax.eval_shape(lambda: models.init(model, jax.random.key(0), (32, 32, 3)))
    g = groups.derive(model, v, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32), train=False)
    widths = [s for s in models.VGG_PLANS[11] if s != "M"]
    assert g.names == [f"conv{i}" for i in range(1, 9)] and g.sizes == widths
    for i, grp in enumerate(g, start=1):
        nxt = f"conv{i + 1}/kernel" if i < 8 else "out/kernel"
        assert {m.path for m in grp.members if m.role == "in"} == {nxt}
        assert {m.path for m in grp.members if m.role == "other"} == {
            f"conv{i}/bias", f"bn{i}/scale", f"bn{i}/bias", f"bn{i}/mean", f"bn{i}/var"}


def test_depthwise_conv_couples_its_input_and_output_channels():
    class DW(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(6, (1,), name="pw")(x))
            x = nn.relu(nn.Conv(6, (3,), feature_group_count=6, name="dw")(x))
            return nn.Dense(2, name="out")(x.reshape(x.shape[0], -1))

    model = DW()
    v = _init(model, (5, 3))
    g = groups.derive(model, v, jnp.zeros((1, 5, 3)))
    assert [(grp.name, grp.size, grp.layers) for grp in g] == [("pw+1", 6, ("pw", "dw"))]


def test_mixing_across_channels_is_not_a_group_and_unknown_primitives_are_named():
    class Norm(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4, name="fc")(x)
            h = h - jnp.mean(h, axis=-1, keepdims=True)    # mixes fc's channels
            return nn.Dense(2, name="out")(h)

    g = groups.derive(Norm(), _init(Norm(), (3,)), jnp.zeros((1, 3)))
    assert len(g) == 0
    assert g.excluded[0][0] == "fc (4 channels)"
    assert "mixed across channels: reduce_sum over it in the model's top level (" in \
        g.excluded[0][1] and "test_groups.py" in g.excluded[0][1]

    class Perm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x[:, jnp.array([2, 0, 1])]

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="out")(Perm(name="perm")(nn.Dense(3, name="fc")(x)))

    with pytest.raises(groups.GroupError, match=r"primitive 'gather' in layer 'perm'.*test_groups"):
        groups.derive(Net(), _init(Net(), (3,)), jnp.zeros((1, 3)))


def test_expand_zeroes_every_params_slice_of_a_removed_channel():
    model, v, x = _toy()
    g = groups.derive(model, v, x[:1])
    p = v["params"]
    channels = (np.array([1, 0, 1, 1], bool), np.array([1, 1, 0], bool), np.ones(5, bool))
    mask = groups.expand(g, channels, masks.init(p))
    want = jax.tree.map(lambda a: np.ones(a.shape, bool), p)
    want["a"]["kernel"][..., 1] = want["b"]["kernel"][..., 1] = False
    want["a"]["bias"][1] = want["b"]["bias"][1] = False
    want["c"]["kernel"][:, :, 1, :] = False
    want["c"]["kernel"][..., 2] = want["c"]["bias"][2] = False
    want["bn"]["scale"][2] = want["bn"]["bias"][2] = False
    want["d"]["kernel"][_rows(7, [1, 6]).reshape(-1), :] = False
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, mask), want)
    # the removed channels are dead and unread: alive/unread report exactly them
    w = masks.apply(p, mask)
    np.testing.assert_array_equal(groups.alive(g, mask)[0], channels[0])
    for u, c in zip(groups.unread(g, w), channels):
        np.testing.assert_array_equal(u, ~c)
    # slicing them away computes the same function as the masked model
    keep = [np.flatnonzero(c) for c in channels]
    small = groups.take(g, {"params": w, "batch_stats": v["batch_stats"]}, keep)
    assert small["params"]["d"]["kernel"].shape == (4 * 5, 5)
    assert small["batch_stats"]["bn"]["mean"].shape == (2,)


def test_to_density_exact_counts_global_and_layerwise():
    model = models.ResNet(depth=8, width=4)
    v = jax.eval_shape(lambda: models.init(model, jax.random.key(0), (8, 8, 3)))
    g = groups.derive(model, v, jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32), train=False)
    rng = np.random.default_rng(0)
    scores = tuple(rng.normal(size=s).astype(np.float32) for s in g.sizes)
    start = groups.init(g)
    total = sum(g.sizes)
    for d in (0.5, 0.3, 0.15):
        out = groups.to_density(g, scores, start, d)
        assert sum(int(np.sum(c)) for c in out) == int(d * total + 0.5)
        lay = groups.to_density(g, scores, start, d, scope="layerwise")
        assert [int(np.sum(c)) for c in lay] == [int(d * n + 0.5) for n in g.sizes]
        # the kept channels are the best-scoring ones of each group
        for c, s in zip(lay, scores):
            assert np.min(s[np.asarray(c)]) >= np.max(s[~np.asarray(c)], initial=-np.inf)
    # removed channels never return; excluded groups are left as they are
    first = groups.to_density(g, scores, start, 0.5, scope="layerwise")
    again = groups.to_density(g, tuple(-s for s in scores), first, 0.5, scope="layerwise",
                              exclude=g.names[0])
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.all(np.asarray(groups.to_density(g, scores, first, 0.25, scope="layerwise",
                                               exclude=0)[0]) == np.asarray(first[0]))


def test_scores_l1_bn_scale_and_weighted_sum():
    model = models.ResNet(depth=8, width=4)
    v = _init(model, (8, 8, 3), train=False)
    g = groups.derive(model, v, jnp.zeros((1, 8, 8, 3)), train=False)
    p = v["params"]
    stage1 = g.index("conv")[0]
    k = [np.asarray(p["conv"]["kernel"]), np.asarray(p["stage1_block0"]["conv2"]["kernel"])]
    np.testing.assert_allclose(groups.l1(g, p, None)[stage1],
                               sum(np.abs(x).sum((0, 1, 2)) for x in k), rtol=1e-5)
    np.testing.assert_allclose(groups.l2(g, p, None)[stage1],
                               np.sqrt(sum((x ** 2).sum((0, 1, 2)) for x in k)), rtol=1e-5)
    gam = np.abs(p["bn"]["scale"]) + np.abs(p["stage1_block0"]["bn2"]["scale"])
    np.testing.assert_allclose(groups.bn_scale(g, p, None)[stage1], gam, rtol=1e-6)
    mixed = groups.weighted_sum([(1.0, groups.l1), (3.0, groups.bn_scale)])(g, p, None, None)
    l1, bn = groups.l1(g, p, None), groups.bn_scale(g, p, None)
    z1, z2 = sum(float(np.sum(s)) for s in l1), sum(float(np.sum(s)) for s in bn)
    np.testing.assert_allclose(mixed[stage1], l1[stage1] / z1 + 3 * bn[stage1] / z2, rtol=1e-5)
    with pytest.raises(ValueError, match=r"bn_scale needs a norm layer scale.*\['fc1'\]"):
        m2 = models.LeNet300100(hidden=(5,))
        v2 = _init(m2, (3,))
        groups.bn_scale(groups.derive(m2, v2, jnp.zeros((1, 3))), v2["params"], None)


def test_taylor_is_activation_times_gradient_at_every_read():
    """For fc1 of an MLP, |sum over the batch of h * dL/dh| with h = relu(fc1(x)), which fc2
    reads; a residual MLP reads its group twice (fc2 reads h1, out reads h1 + relu(fc2(h1)))."""
    model = models.LeNet300100(hidden=(6, 4))
    v = _init(model, (5,))
    p = v["params"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    g = groups.derive(model, v, x[:1])
    inputs = Inputs.create(models.inference_fn(model, v), [(x, y)])
    got = groups.taylor(g, p, masks.init(p), inputs)

    def loss_from(h):
        h2 = jax.nn.relu(h @ p["fc2"]["kernel"] + p["fc2"]["bias"])
        logits = h2 @ p["out"]["kernel"] + p["out"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    np.testing.assert_allclose(got[0], np.abs(np.sum(h * jax.grad(loss_from)(h), 0)),
                               rtol=1e-4, atol=1e-7)

    res = models.MLP1D(hidden=6)
    vr = _init(res, (5,))
    pr = vr["params"]
    gr = groups.derive(res, vr, x[:1])

    def loss2(h1, h2):
        logits = h2 @ pr["out"]["kernel"] + pr["out"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    h1 = jax.nn.relu(x @ pr["fc1"]["kernel"] + pr["fc1"]["bias"])

    def through_fc2(a):  # the loss as a function of what fc2 reads, h2 built from it
        h2 = h1 + jax.nn.relu(a @ pr["fc2"]["kernel"] + pr["fc2"]["bias"])
        return loss2(h1, h2)

    h2 = h1 + jax.nn.relu(h1 @ pr["fc2"]["kernel"] + pr["fc2"]["bias"])
    want = np.abs(np.sum(h1 * jax.grad(through_fc2)(h1), 0)
                  + np.sum(h2 * jax.grad(lambda b: loss2(h1, b))(h2), 0))
    got = groups.taylor(gr, pr, None, Inputs.create(models.inference_fn(res, vr), [(x, y)]))
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-7)


def test_prune_gives_a_mask_imp_can_keep_pruning():
    model = models.VGG(plan=(4, "M", 6))
    v = _init(model, (4, 4, 2), train=False)
    p = v["params"]
    g = groups.derive(model, v, jnp.zeros((1, 4, 4, 2)), train=False)
    mask, channels = groups.prune(g, "l1", p, masks.init(p), 0.5, scope="layerwise")
    assert [int(np.sum(c)) for c in channels] == [2, 3]
    assert int(np.sum(mask["bn1"]["scale"])) == 2 and int(np.sum(mask["conv2"]["kernel"])) == \
        9 * 2 * 3
    # an unstructured IMP step on top keeps the group mask's zeros (norm leaves included)
    rates = masks.prunable(p, exclude="out")
    step = prune.remove_fraction(jax.tree.map(jnp.abs, p), mask, 0.2, rates=rates)
    np.testing.assert_array_equal(step["bn1"]["scale"], mask["bn1"]["scale"])
    assert not np.any(np.asarray(step["conv1"]["kernel"]) & ~np.asarray(mask["conv1"]["kernel"]))
    # and alive() reads the channels back from the weight mask
    for a, c in zip(groups.alive(g, mask), channels):
        np.testing.assert_array_equal(a, c)


def test_a_channel_concatenated_twice_owns_both_rows():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            s = nn.relu(nn.Dense(3, name="a")(x))
            h = nn.relu(nn.Dense(4, name="b")(jnp.concatenate([s, 2.0 * s], -1)))
            return nn.Dense(2, name="out")(h)

    g = groups.derive(Twice(), _init(Twice(), (5,)), jnp.zeros((1, 5)))
    rows = next(m.index for m in g[0].members if m.path == "b/kernel")
    np.testing.assert_array_equal(rows, [[0, 3], [1, 4], [2, 5]])
