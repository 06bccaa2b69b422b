"""Tests for lottery.compact: compacted model == masked model, exact units removed, refusals;
ResNet (and VGG) under channel-group masks from lottery.groups."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottery import compact, export, groups, masks, models, prune


pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models (tests/conftest.py)


def _random(tree, seed, scale=0.5):
    """Normal random numpy leaves (biases non-zero too, so dead units have constants to fold)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (scale * rng.normal(size=np.shape(x))).astype(np.float32), tree)


def _variables(model, shape, seed=0):
    v = dict(jax.eval_shape(lambda: models.init(model, jax.random.key(seed), shape)))
    v["params"] = _random(v["params"], seed + 1)
    if "batch_stats" in v:  # running statistics far from (0, 1), so slicing them matters
        v["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda path, x: 0.5 + np.abs(x) if path[-1].key == "var" else x,
            _random(v["batch_stats"], seed + 2))
    return v


def _ones(params):
    return jax.tree.map(lambda x: np.ones(np.shape(x), bool), params)


def _apply(model, v, x):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)


def _check_same(model, v, mask, x):
    c = compact.compact(model, v, mask)
    masked = jax.tree.map(lambda p, m: np.where(m, p, 0.0), v["params"], mask)
    want = _apply(model, {**v, "params": masked}, x)
    got = _apply(c.model, c.variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))
    return c


def _x(shape, n=5):
    return np.random.default_rng(99).normal(size=(n, *shape)).astype(np.float32)


CASES = {  # name: (model, input shape)
    "lenet": (models.LeNet300100(hidden=(30, 20)), (6, 6, 1)),
    "conv": (models.ConvNet(plan=(8, "M", 12, "M"), hidden=(16, 12)), (8, 8, 3)),
    "vgg_bn": (models.VGG(plan=(8, "M", 12, 12)), (8, 8, 3)),
    "mlp1d_residual": (models.MLP1D(hidden=20), (40, 1)),
    "mlp1d_plain": (models.MLP1D(hidden=20, residual=False), (40, 1)),
    "cnn1d": (models.CNN1D(channels=10), (40, 1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_structured_mask_compacts_to_the_same_function(name):
    model, shape = CASES[name]
    v = _variables(model, shape)
    p = v["params"]
    rates = masks.prunable(p, exclude="out")
    mask = prune.units_to_density(prune.unit_scores(p, rates), masks.init(p), 0.4,
                                  scope="layerwise", rates=rates)
    # plus unstructured holes inside the kept units: they stay (as zeros) in the compact model
    rng = np.random.default_rng(7)
    holes = jax.tree.map(lambda m, r: np.asarray(m) & (rng.random(m.shape) > 0.1) if r > 0
                         else np.asarray(m), mask, rates)
    c = _check_same(model, v, holes, _x(shape))
    assert type(c.model) is type(model)
    assert models.flat_param_count(c.variables["params"]) < models.flat_param_count(p)
    for layer, n in c.original.items():
        assert len(c.kept[layer]) <= c.widths[layer] <= n
        assert c.variables["params"][layer]["kernel"].shape[-1] == c.widths[layer]
    if name in ("mlp1d_residual", "mlp1d_plain", "cnn1d"):  # one width field: all layers equal
        assert len(set(c.widths.values())) == 1


def test_exact_units_removed_and_bias_folded():
    model = models.LeNet300100(hidden=(6, 5))
    v = _variables(model, (4,))
    p = jax.tree.map(np.asarray, v["params"])
    mask = _ones(p)
    mask["fc1"]["kernel"][:, [1, 4]] = False   # fc1 units 1, 4: no inputs -> constants
    mask["out"]["kernel"][2, :] = False        # fc2 unit 2: no outputs
    mask["fc2"]["kernel"][:, 3] = False        # fc2 unit 3: no inputs
    c = _check_same(model, v, mask, _x((4,), 7))
    np.testing.assert_array_equal(c.kept["fc1"], [0, 2, 3, 5])
    np.testing.assert_array_equal(c.kept["fc2"], [0, 1, 4])
    assert c.model.hidden == (4, 3)
    cp = c.variables["params"]
    np.testing.assert_array_equal(cp["fc2"]["kernel"], p["fc2"]["kernel"][np.ix_([0, 2, 3, 5],
                                                                              [0, 1, 4])])
    # fc2's bias absorbs relu(b1) of fc1 units 1 and 4 times their weights (numpy formula)
    a = np.maximum(p["fc1"]["bias"][[1, 4]], 0.0)
    k2 = np.where(mask["fc2"]["kernel"], p["fc2"]["kernel"], 0.0)
    want = p["fc2"]["bias"] + a @ k2[[1, 4], :]
    np.testing.assert_allclose(cp["fc2"]["bias"], want[[0, 1, 4]], rtol=1e-6)
    # out's bias absorbs relu(b2_3) times out's row 3 (fc2 unit 2 had no outputs: no term)
    want_out = p["out"]["bias"] + np.maximum(want[3], 0.0) * p["out"]["kernel"][3]
    np.testing.assert_allclose(cp["out"]["bias"], want_out, rtol=1e-6)


def test_removal_cascades_until_nothing_changes():
    model = models.LeNet300100(hidden=(4, 3))
    v = _variables(model, (5,))
    mask = _ones(v["params"])
    mask["fc1"]["kernel"][:, 0] = False      # fc1 unit 0: no inputs
    mask["fc2"]["kernel"][1:, 2] = False     # fc2 unit 2 reads only fc1 unit 0 ...
    mask["fc2"]["kernel"][:, 1] = False      # ... and fc2 unit 1 nothing
    c = _check_same(model, v, mask, _x((5,), 6))
    np.testing.assert_array_equal(c.kept["fc1"], [1, 2, 3])
    np.testing.assert_array_equal(c.kept["fc2"], [0])  # unit 2 became constant once 0 went


def test_conv_constants_only_fold_into_dense():
    """A dead-input conv channel with a positive constant is kept before a padded conv (its
    border contribution differs) but removed when its constant is 0."""
    model = models.ConvNet(plan=(4, 4), hidden=(3,))
    v = _variables(model, (5, 5, 2))
    v["params"]["conv1"]["bias"] = np.float32([0.7, -0.4, 0.3, 0.2])
    v["params"]["conv2"]["bias"] = np.float32([0.9, -0.8, 0.1, 0.2])
    mask = _ones(v["params"])
    mask["conv1"]["kernel"][..., [0, 1]] = False  # constants relu(0.7) > 0 and relu(-0.4) = 0
    mask["conv2"]["kernel"][..., [0, 1]] = False  # constants fold into fc1 after the flatten
    c = _check_same(model, v, mask, _x((5, 5, 2), 3))
    np.testing.assert_array_equal(c.kept["conv1"], [0, 2, 3])
    np.testing.assert_array_equal(c.kept["conv2"], [2, 3])
    assert c.model.plan == (3, 2)


def test_flatten_rows_are_channels_last():
    """conv2 channel j feeds fc1 rows (h * W + w) * C + j: all of them zero removes it, all but
    one position zero keeps it."""
    model = models.ConvNet(plan=(3, "M"), hidden=(4,))
    v = _variables(model, (4, 4, 2))
    mask = _ones(v["params"])
    c_out = 3
    rows = np.arange(2 * 2) * c_out
    mask["fc1"]["kernel"][rows + 1, :] = False        # channel 1: every position zero
    mask["fc1"]["kernel"][rows[1:] + 2, :] = False    # channel 2: position 0 still read
    c = _check_same(model, v, mask, _x((4, 4, 2), 3))
    np.testing.assert_array_equal(c.kept["conv1"], [0, 2])
    assert c.variables["params"]["fc1"]["kernel"].shape == (4 * 2, 4)


def test_batch_norm_is_sliced_with_its_conv():
    model = models.VGG(plan=(4, "M", 3))
    v = _variables(model, (4, 4, 1))
    mask = _ones(v["params"])
    mask["conv2"]["kernel"][:, :, 2, :] = False  # conv1 channel 2 is read by nobody
    c = _check_same(model, v, mask, _x((4, 4, 1), 3))
    np.testing.assert_array_equal(c.kept["conv1"], [0, 1, 3])
    for leaf in ("scale", "bias"):
        np.testing.assert_array_equal(c.variables["params"]["bn1"][leaf],
                                      np.asarray(v["params"]["bn1"][leaf])[[0, 1, 3]])
    np.testing.assert_array_equal(c.variables["batch_stats"]["bn1"]["var"],
                                  np.asarray(v["batch_stats"]["bn1"]["var"])[[0, 1, 3]])


def test_residual_mlp_keeps_tied_units_together():
    model = models.MLP1D(hidden=4)
    v = _variables(model, (6,))
    mask = _ones(v["params"])
    mask["fc1"]["kernel"][:, [0, 1]] = False  # h1_0, h1_1 constant ...
    mask["fc2"]["kernel"][:, 1] = False       # ... but only g_1 is: h2_0 = h1_0 + g_0 varies
    c = _check_same(model, v, mask, _x((6,), 5))
    np.testing.assert_array_equal(c.kept["fc1"], [0, 2, 3])
    np.testing.assert_array_equal(c.kept["fc2"], [0, 2, 3])
    assert c.model.hidden == 3


def test_no_removable_unit_says_so():
    model = models.LeNet300100(hidden=(5, 4))
    v = _variables(model, (3,))
    mask = _ones(v["params"])
    mask["fc1"]["kernel"][0, :] = False  # unstructured: every unit keeps inputs and outputs
    with pytest.raises(ValueError, match="no removable unit in LeNet300100.*units_to_density"):
        compact.compact(model, v, mask)


def _group_mask(model, v, shape, density, scope="layerwise"):
    g = groups.derive(model, v, jnp.zeros((1, *shape)), train=False)
    p = v["params"]
    mask, channels = groups.prune(g, "l1", p, masks.init(p), density, scope=scope)
    return g, mask, channels


def test_resnet20_at_half_the_channels_compacts_to_the_same_function():
    model = models.create("resnet20")
    v = _variables(model, (8, 8, 3))
    g, mask, channels = _group_mask(model, v, (8, 8, 3), 0.5)
    c = _check_same(model, v, mask, _x((16, 16, 3), 2))
    assert type(c.model) is compact.SlimResNet
    assert c.model.widths == (8, 16, 32) and c.model.inner == (8,) * 3 + (16,) * 3 + (32,) * 3
    before = models.flat_param_count(v["params"])
    after = models.flat_param_count(c.variables["params"])
    assert after < 0.3 * before  # about a quarter: both axes of most kernels halve
    # every producer of a coupled group keeps the same channels, and the batch norms with it
    stage2 = g[g.index("stage2_block0/conv2")[0]]
    kept = np.flatnonzero(np.asarray(channels[g.index("stage2_block0/conv2")[0]]))
    for layer in stage2.layers:
        np.testing.assert_array_equal(c.kept[layer], kept)
    np.testing.assert_array_equal(c.variables["batch_stats"]["stage2_block0"]["shortcut_bn"]["var"],
                                  v["batch_stats"]["stage2_block0"]["shortcut_bn"]["var"][kept])


def test_resnet_group_left_empty_keeps_one_unread_channel():
    model = models.ResNet(depth=8, width=4)
    v = _variables(model, (8, 8, 3))
    g = groups.derive(model, v, jnp.zeros((1, 8, 8, 3)), train=False)
    channels = [np.ones(n, bool) for n in g.sizes]
    channels[g.index("stage1_block0/conv1")[0]][:] = False  # the whole inner group of block 0
    channels[g.index("conv")[0]][[0, 2]] = False
    mask = groups.expand(g, tuple(channels), masks.init(v["params"]))
    c = _check_same(model, v, jax.tree.map(np.asarray, mask), _x((8, 8, 3), 3))
    assert c.model.inner[0] == 1 and len(c.kept["stage1_block0/conv1"]) == 0
    assert c.model.widths == (2, 8, 16)
    np.testing.assert_array_equal(c.kept["conv"], [1, 3])


def test_resnet_mask_of_filters_alone_is_refused():
    """Zeroing conv filters leaves their batch norm's constant read by the next layers."""
    model = models.ResNet(depth=8, width=4)
    v = _variables(model, (8, 8, 3))
    mask = _ones(v["params"])
    for layer in ("conv", "stage1_block0/conv1", "stage2_block0/conv2"):
        node = mask
        for k in layer.split("/"):
            node = node[k]
        node["kernel"][..., ::2] = False  # half the filters, as prune.units_to_density does
    with pytest.raises(ValueError, match=r"no removable channel in ResNet.*lottery.groups"):
        compact.compact(model, v, mask)


def test_vgg_group_mask_compacts_and_resnet_exports(tmp_path):
    model = models.VGG(plan=(8, "M", 12, 12))
    v = _variables(model, (8, 8, 3))
    _, mask, _ = _group_mask(model, v, (8, 8, 3), 0.5)
    c = _check_same(model, v, mask, _x((8, 8, 3)))
    assert c.model.plan == (4, "M", 6, 6)
    # ResNet through `lottery export --format compact`'s function and back with export.load
    model = models.ResNet(depth=8, width=4)
    v = _variables(model, (8, 8, 3))
    _, mask, _ = _group_mask(model, v, (8, 8, 3), 0.5)
    meta = export.export(model, v, mask, str(tmp_path / "out"), "compact",
                         {"input_shape": [8, 8, 3]})
    assert meta["architecture"]["class"] == "SlimResNet"
    assert meta["stored_params"] < meta["source_params"]
    apply_fn, params = export.load(str(tmp_path / "out"))
    x = _x((8, 8, 3), 3)
    masked = jax.tree.map(lambda p, m: np.where(m, p, 0.0), v["params"], mask)
    want = _apply(model, {**v, "params": masked}, x)
    np.testing.assert_allclose(apply_fn(params, x), want, rtol=1e-4,
                               atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_unknown_layer_and_model_are_named():
    model = models.LeNet300100(hidden=(5,))
    v = _variables(model, (3,))
    extra = {"params": {**v["params"], "attn": {"query": jnp.ones((5, 5))}}}
    with pytest.raises(ValueError, match=r"layer 'attn'.*supports Dense and Conv"):
        compact.compact(model, extra)
    with pytest.raises(ValueError, match=r"model Dense.*LeNet300100, ConvNet, VGG.*groups.take"):
        compact.compact(nn.Dense(3), {"params": {"kernel": jnp.ones((2, 3))}})
