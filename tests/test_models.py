"""Tests for lottery.models: exact parameter counts, shapes, names, init, BN, inference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottery import masks
from lottery import models as M

MNIST, CIFAR, MNIST1D, IMAGENET = (28, 28, 1), (32, 32, 3), (40, 1), (224, 224, 3)
SHAPES = {"lenet300_100": MNIST, "mlp_mnist1d": MNIST1D, "cnn_mnist1d": MNIST1D,
          "resnet18": IMAGENET, "resnet50": IMAGENET, "vit_tiny_patch16": IMAGENET}
SHAPES.update({n: CIFAR for n in M.MODELS if n not in SHAPES})
BN_MODELS = {"vgg11", "vgg16", "vgg19", "resnet20", "resnet32", "resnet56", "resnet18", "resnet50"}

# Pinned parameter counts (10 classes, weights + biases + BN gamma/beta; running stats excluded).
COUNTS = {
    # 784*300+300 + 300*100+100 + 100*10+10 (LT paper Fig. 2 / OpenLTH mnist_lenet_300_100)
    "lenet300_100": 266_610,
    # LT paper Fig. 2: Conv-2 4.3M, Conv-4 2.4M; Conv-6 is 2.26M by the same arithmetic (the paper
    # prints 1.7M; its 1.1M conv weights agree). See conv_count below.
    "conv2": 4_301_642,
    "conv4": 2_425_930,
    "conv6": 2_262_602,
    # OpenLTH cifar_vgg plans, conv bias + BN (2 per channel), Linear(512, 10); VGG-19 = LT's 20.0M
    "vgg11": 9_231_114,
    "vgg16": 14_728_266,
    "vgg19": 20_040_522,
    # OpenLTH cifar_resnet_D, bias-free convs, 1x1 projection shortcuts, Linear(64, 10)
    "resnet20": 272_474,
    "resnet32": 466_906,
    "resnet56": 855_770,
    # Greydanus mnist1d notebooks/models.py: MLPBase 40*100+100 + 100*100+100 + 100*10+10
    "mlp_mnist1d": 15_210,
    # ConvBase: (1*5+1)*25 + 2*(25*3*25+25) + 125*10+10
    "cnn_mnist1d": 5_210,
    # torchvision resnet18 / resnet50 (11,689,512 / 25,557,032 for 1000 classes), fc 10 classes
    "resnet18": 11_181_642,
    "resnet50": 23_528_522,
    # timm vit_tiny_patch16_224 (5,717,416 for 1000 classes) at 224x224, head 10 classes
    "vit_tiny_patch16": 5_526_346,
    # the same with 4x4 patches at 32x32: 64 patches + class token = 65 positions
    "vit_tiny_patch4": 5_362_762,
}
# The published counts for 1000 classes at the nominal input (torchvision; timm).
IMAGENET_COUNTS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "vit_tiny_patch16": 5_717_416}


def conv_count(plan, hidden=(256, 256), side=32, c=3, classes=10):
    """Conv-N count by hand: 3x3 convs with bias, 2x2 pools, then dense layers with bias."""
    n = 0
    for spec in plan:
        if spec == "M":
            side //= 2
        else:
            n += 9 * c * spec + spec
            c = spec
    d = side * side * c
    for h in (*hidden, classes):
        n += d * h + h
        d = h
    return n


def vgg_count(plan, classes=10):
    """VGG count by hand: per conv 9*cin*cout + cout (bias) + 2*cout (BN), then the classifier."""
    n, c = 0, 3
    for spec in plan:
        if spec != "M":
            n += 9 * c * spec + spec + 2 * spec
            c = spec
    return n + c * classes + classes


def resnet_count(depth, w=16, classes=10):
    """ResNet count by hand: bias-free convs, BN 2 per channel, projections at stages 2 and 3."""
    nb = (depth - 2) // 6
    n = 9 * 3 * w + 2 * w
    c = w
    for s in range(3):
        f = w * 2**s
        for b in range(nb):
            n += 9 * c * f + 2 * f + 9 * f * f + 2 * f
            if c != f:
                n += c * f + 2 * f
            c = f
    return n + c * classes + classes


def imagenet_resnet_count(blocks, bottleneck, classes=1000):
    """torchvision ResNet count by hand: bias-free convs, BN 2 per channel, 1x1 projections."""
    n = 7 * 7 * 3 * 64 + 2 * 64  # stem
    c = 64
    for s, nb in enumerate(blocks):
        p = 64 * 2**s
        for b in range(nb):
            stride = 2 if s > 0 and b == 0 else 1
            if bottleneck:  # 1x1 p, 3x3 p, 1x1 4p
                out = 4 * p
                n += c * p + 2 * p + 9 * p * p + 2 * p + p * out + 2 * out
            else:  # 3x3 p, 3x3 p
                out = p
                n += 9 * c * p + 2 * p + 9 * p * p + 2 * p
            if stride != 1 or c != out:
                n += c * out + 2 * out
            c = out
    return n + c * classes + classes


def vit_count(patch, side, dim=192, depth=12, mlp=4, classes=1000, channels=3):
    """ViT count by hand: patch conv, class token, positions, blocks, final LN, head."""
    tokens = (side // patch) ** 2 + 1
    block = (2 * dim  # ln1
             + 3 * (dim * dim + dim)  # query, key, value (dim -> heads x head_dim, with bias)
             + dim * dim + dim  # out projection
             + 2 * dim  # ln2
             + dim * mlp * dim + mlp * dim + mlp * dim * dim + dim)  # fc1, fc2
    return (patch * patch * channels * dim + dim + dim + tokens * dim + depth * block + 2 * dim
            + dim * classes + classes)


def test_pinned_counts_match_hand_arithmetic():
    assert 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10 == COUNTS["lenet300_100"]
    conv = {2: [64, 64, "M"], 4: [64, 64, "M", 128, 128, "M"],
            6: [64, 64, "M", 128, 128, "M", 256, 256, "M"]}
    for k, plan in conv.items():
        assert conv_count(plan) == COUNTS[f"conv{k}"]
    vgg = {11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
           16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M"] + [512] * 3 + ["M"] + [512] * 3,
           19: [64, 64, "M", 128, 128, "M"] + [256] * 4 + ["M"] + [512] * 4 + ["M"] + [512] * 4}
    for k, plan in vgg.items():
        assert vgg_count(plan) == COUNTS[f"vgg{k}"]
    for d in (20, 32, 56):
        assert resnet_count(d) == COUNTS[f"resnet{d}"]
    assert 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10 == COUNTS["mlp_mnist1d"]
    assert 6 * 25 + 2 * (25 * 3 * 25 + 25) + 125 * 10 + 10 == COUNTS["cnn_mnist1d"]
    for name, blocks, bottleneck in (("resnet18", (2, 2, 2, 2), False),
                                     ("resnet50", (3, 4, 6, 3), True)):
        assert imagenet_resnet_count(blocks, bottleneck) == IMAGENET_COUNTS[name]
        assert imagenet_resnet_count(blocks, bottleneck, classes=10) == COUNTS[name]
    assert vit_count(16, 224) == IMAGENET_COUNTS["vit_tiny_patch16"]
    assert vit_count(16, 224, classes=10) == COUNTS["vit_tiny_patch16"]
    assert vit_count(4, 32, classes=10) == COUNTS["vit_tiny_patch4"]


def abstract_vars(name, num_classes=10):
    model = M.create(name, num_classes)
    return model, jax.eval_shape(lambda k: M.init(model, k, SHAPES[name]), jax.random.key(0))


def test_registry_names():
    assert set(M.MODELS) == set(COUNTS)
    assert M.INPUT_SHAPES == SHAPES
    assert M.names()[:len(M.MODELS)] == list(M.MODELS)


@pytest.mark.parametrize("name", sorted(IMAGENET_COUNTS))
def test_imagenet_models_match_published_counts(name):
    model = M.create(name, 1000)
    v = jax.eval_shape(lambda k: M.init(model, k, IMAGENET), jax.random.key(0))
    assert M.flat_param_count(v["params"]) == IMAGENET_COUNTS[name]


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_param_count_shapes_and_classifier(name):
    model, v = abstract_vars(name)
    assert isinstance(model, M.nn.Module)
    assert M.flat_param_count(v["params"]) == COUNTS[name]
    assert ("batch_stats" in v) == (name in BN_MODELS)
    paths = masks.paths(v["params"])
    assert "out/kernel" in paths and "out/bias" in paths
    assert v["params"]["out"]["kernel"].shape[-1] == 10
    # Output shape for a batch of 3, in eval and (for BN models, with mutable stats) train mode.
    model7, v7 = abstract_vars(name, num_classes=7)
    x = jax.ShapeDtypeStruct((3, *SHAPES[name]), jnp.float32)
    assert jax.eval_shape(lambda v, x: model7.apply(v, x), v7, x).shape == (3, 7)
    out, _ = jax.eval_shape(
        lambda v, x: model7.apply(v, x, train=True, mutable=["batch_stats"]), v7, x)
    assert out.shape == (3, 7)
    # Configs can address the classifier uniformly.
    rates = masks.prunable(v["params"], rates={"out": 0.5})
    assert {p: r for p, r in zip(paths, jax.tree.leaves(rates)) if r == 0.5} == {"out/kernel": 0.5}
    assert "out/kernel" not in masks.prunable_paths(masks.prunable(v["params"], exclude="out"))


@pytest.fixture(scope="module")
def lenet():
    model = M.create("lenet300_100")
    return model, M.init(model, jax.random.key(1), MNIST)


@pytest.fixture(scope="module")
def resnet20():
    model = M.create("resnet20")
    return model, M.init(model, jax.random.key(2), CIFAR)


def test_lenet_forward_matches_numpy(lenet):
    model, v = lenet
    x = np.asarray(jax.random.normal(jax.random.key(3), (4, 28, 28, 1)))
    p = jax.tree.map(np.asarray, v["params"])
    h = np.maximum(x.reshape(4, -1) @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
    h = np.maximum(h @ p["fc2"]["kernel"] + p["fc2"]["bias"], 0)
    want = h @ p["out"]["kernel"] + p["out"]["bias"]
    np.testing.assert_allclose(model.apply(v, x), want, rtol=1e-4, atol=1e-4)


def test_kaiming_normal_untruncated_and_openlth_bias(lenet):
    _, v = lenet
    w = np.asarray(v["params"]["fc1"]["kernel"])  # 235,200 draws of N(0, 2/784)
    sigma = np.sqrt(2 / 784)
    assert abs(w.std() / sigma - 1) < 0.01
    # An untruncated normal puts 4.55% beyond 2 sigma (a 2-sigma truncated one puts none).
    assert abs(np.mean(np.abs(w) > 2 * sigma) - 0.0455) < 0.003
    # OpenLTH sets only the weights: biases keep PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    for layer, fan_in in (("fc1", 784), ("fc2", 300), ("out", 100)):
        bias = np.asarray(v["params"][layer]["bias"])
        bound = 1 / np.sqrt(fan_in)
        assert np.all(np.abs(bias) <= bound) and np.abs(bias).max() > 0.8 * bound
        assert abs(bias.std() / (bound / np.sqrt(3)) - 1) < 0.35  # uniform: std = bound/sqrt(3)
    zero = M.init(M.create("lenet300_100", bias_init="zeros"), jax.random.key(0), MNIST)
    for layer in ("fc1", "fc2", "out"):
        assert not np.any(np.asarray(zero["params"][layer]["bias"]))


@pytest.mark.parametrize("name, layer, fan_in, default", [
    ("vgg11", "conv2", 9 * 64, "torch"), ("vgg11", "out", 512, "torch"),
    ("resnet20", "out", 64, "torch"), ("conv2", "conv2", 9 * 64, "zeros"),
    ("conv2", "fc1", 16 * 16 * 64, "zeros")])
def test_bias_init_per_model(name, layer, fan_in, default):
    """Each model's default bias init, and the other one on request, with the layer's fan_in."""
    shapes = jax.eval_shape(lambda: M.init(M.create(name), jax.random.key(0), CIFAR))
    assert shapes["params"][layer]["bias"].shape  # the layer has a bias
    other = "zeros" if default == "torch" else "torch"
    for kind in (default, other):
        model = M.create(name) if kind == default else M.create(name, bias_init=kind)
        bias = np.asarray(M.init(model, jax.random.key(1), CIFAR)["params"][layer]["bias"])
        if kind == "zeros":
            assert not np.any(bias)
        else:
            bound = 1 / np.sqrt(fan_in)
            assert np.all(np.abs(bias) <= bound) and np.abs(bias).max() > 0.5 * bound


def test_config_reaches_model_options():
    from lottery import config

    cfg = config.base()
    assert config.model(cfg, 10).bias_init == "torch"
    cfg.bias_init, cfg.bn_init, cfg.model = "zeros", "ones", "vgg11"
    m = config.model(cfg, 10)
    assert (m.bias_init, m.bn_init) == ("zeros", "ones")
    cfg.model = "mlp_mnist1d"  # no such fields: its reference init stays
    assert config.model(cfg, 10).torch_init
    saved = config.base().to_dict()
    del saved["bias_init"], saved["bn_init"]  # a run made before these fields existed
    old = config.from_saved(saved)
    assert (old.bias_init, old.bn_init) == ("zeros", "uniform")  # what older code did
    assert "bias_init" not in config.hashed_fields(old)  # legacy value: same directory name
    with pytest.raises(ValueError, match="bias_init='ones': expected one of torch, zeros"):
        cfg.bias_init = "ones"
        config.validate(cfg)


def test_conv2_glorot_normal():
    model = M.create("conv4")
    v = M.init(model, jax.random.key(4), CIFAR)
    w = np.asarray(v["params"]["fc1"]["kernel"])  # (8*8*128, 256)
    assert w.shape == (8192, 256)
    assert abs(w.std() / np.sqrt(2 / (8192 + 256)) - 1) < 0.01
    w = np.asarray(v["params"]["conv4"]["kernel"])  # fan_in 9*128, fan_out 9*128
    assert abs(w.std() / np.sqrt(2 / (2 * 9 * 128)) - 1) < 0.02
    assert not np.any(np.asarray(v["params"]["conv1"]["bias"]))


@pytest.fixture(scope="module")
def mlp1d():
    model = M.create("mlp_mnist1d")
    return model, M.init(model, jax.random.key(6), MNIST1D)


@pytest.fixture(scope="module")
def cnn1d():
    model = M.create("cnn_mnist1d")
    return model, M.init(model, jax.random.key(8), MNIST1D)


def test_mnist1d_torch_default_init(mlp1d, cnn1d):
    for (_, v), layer, fan_in in [(mlp1d, "fc2", 100), (cnn1d, "conv2", 75)]:
        bound = 1 / np.sqrt(fan_in)
        for leaf in ("kernel", "bias"):
            a = np.asarray(v["params"][layer][leaf])
            assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.8 * bound
    v = M.init(M.create("mlp_mnist1d", torch_init=False), jax.random.key(5), MNIST1D)
    assert not np.any(np.asarray(v["params"]["fc1"]["bias"]))


def test_mlp_mnist1d_residual_forward(mlp1d):
    model, v = mlp1d
    p = jax.tree.map(np.asarray, v["params"])
    x = np.asarray(jax.random.normal(jax.random.key(7), (5, 40, 1)))
    h = np.maximum(x[..., 0] @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
    h = h + np.maximum(h @ p["fc2"]["kernel"] + p["fc2"]["bias"], 0)
    want = h @ p["out"]["kernel"] + p["out"]["bias"]
    np.testing.assert_allclose(model.apply(v, x), want, rtol=1e-4, atol=1e-4)
    plain = M.create("mlp_mnist1d", residual=False).apply(v, x)
    assert not np.allclose(plain, want, atol=1e-3)


def conv1d_np(x, w, b, stride=2, pad=1):
    """PyTorch Conv1d (cross-correlation, zero padding) on channels-last (N, L, C) arrays."""
    k = w.shape[0]
    x = np.pad(x, ((0, 0), (pad, pad), (0, 0)))
    n_out = (x.shape[1] - k) // stride + 1
    return np.stack([np.einsum("nkc,kcf->nf", x[:, i * stride:i * stride + k], w)
                     for i in range(n_out)], axis=1) + b


def test_cnn_mnist1d_forward_matches_numpy(cnn1d):
    model, v = cnn1d
    p = jax.tree.map(np.asarray, v["params"])
    x = np.asarray(jax.random.normal(jax.random.key(9), (3, 40, 1)))
    h = x
    for i, length in zip((1, 2, 3), (19, 10, 5)):  # PyTorch: floor((L + 2 - k) / 2) + 1
        h = np.maximum(conv1d_np(h, p[f"conv{i}"]["kernel"], p[f"conv{i}"]["bias"]), 0)
        assert h.shape == (3, length, 25)
    want = h.reshape(3, -1) @ p["out"]["kernel"] + p["out"]["bias"]
    np.testing.assert_allclose(model.apply(v, x), want, rtol=1e-4, atol=1e-4)


def test_stride2_conv_pads_symmetrically_like_pytorch():
    conv = M.layers.conv3x3(1, "c", stride=2, use_bias=False)
    kernel = jnp.ones((3, 3, 1, 1))
    y = conv.apply({"params": {"kernel": kernel}}, jnp.ones((1, 4, 4, 1)))
    # Windows start at -1 (padding 1 each side): corner sees 2x2 ones, interior 3x3.
    np.testing.assert_array_equal(np.asarray(y)[0, :, :, 0], [[4, 6], [6, 9]])


def test_bn_scale_init(resnet20):
    _, v = resnet20
    g = np.concatenate([np.ravel(x) for p, x in zip(masks.paths(v["params"]),
                                                      jax.tree.leaves(v["params"]))
                        if p.endswith("scale")])
    assert g.size == 16 + 3 * 2 * 16 + 3 * 2 * 32 + 32 + 3 * 2 * 64 + 64  # stem, blocks, shortcuts
    assert np.all((g >= 0) & (g < 1)) and 0.4 < g.mean() < 0.6  # OpenLTH gamma ~ U[0, 1)
    block = M.ResBlock(8, stride=2, bn_init="ones")
    ones = M.init(block, jax.random.key(2), (4, 4, 4))
    assert np.all(np.asarray(ones["params"]["shortcut_bn"]["scale"]) == 1)


def test_bn_updates_batch_stats_only_in_train_mode(resnet20):
    model, v = resnet20
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"]))
    x = jax.random.normal(jax.random.key(10), (4, 32, 32, 3))
    out, upd = train(v, x)
    # Stem BN: new mean = 0.9 * 0 + 0.1 * batch mean of conv(x), conv computed independently.
    k = v["params"]["conv"]["kernel"]
    y = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(upd["batch_stats"]["bn"]["mean"], 0.1 * y.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           v["batch_stats"], upd["batch_stats"])
    assert all(jax.tree.leaves(changed))
    ev, same = evaluate(v, x)
    jax.tree.map(np.testing.assert_array_equal, v["batch_stats"], same["batch_stats"])
    # Changing one example changes the others' logits in train mode (batch statistics) only.
    x2 = x.at[3].set(3.0 * x[3] + 1.0)
    out2, _ = train(v, x2)
    ev2, _ = evaluate(v, x2)
    np.testing.assert_allclose(ev2[:3], ev[:3], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out2[:3], out[:3], atol=1e-4)


@pytest.mark.parametrize("fixture", ["lenet", "resnet20"])
def test_inference_fn_equals_eval_apply(fixture, request):
    model, v = request.getfixturevalue(fixture)
    shape = MNIST if fixture == "lenet" else CIFAR
    x = jax.random.normal(jax.random.key(11), (2, *shape))
    f = M.inference_fn(model, v)
    np.testing.assert_allclose(f(v["params"], x), model.apply(v, x, train=False), rtol=1e-6)
    p2 = jax.tree.map(lambda a: a * 0.5, v["params"])
    want = model.apply({**v, "params": p2}, x, train=False)
    np.testing.assert_allclose(jax.jit(f)(p2, x), want, rtol=1e-4, atol=1e-5)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="nope.*lenet300_100"):
        M.create("nope")
    with pytest.raises(ValueError, match="num_classes"):
        M.create("conv2", num_classes=0)
    with pytest.raises(ValueError, match="depth"):
        jax.eval_shape(lambda k: M.init(M.ResNet(depth=21), k, CIFAR), jax.random.key(0))
    with pytest.raises(ValueError, match="bn_init"):
        jax.eval_shape(lambda k: M.init(M.create("vgg11", bn_init="x"), k, CIFAR),
                       jax.random.key(0))


def test_flat_param_count_concrete():
    assert M.flat_param_count({"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4), 1.0]}) == 11


# ---------------------------------------------------------------------------------------------
# ImageNet ResNets (torchvision layout) and the ViT.


def quick(f, *args):
    """f(*args) jitted without XLA's backend optimizations: the threefry draws of an init take
    ten times longer to optimize than to run on CPU. For the new tests' small models."""
    return jax.jit(f).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def quick_init(model, shape, seed=0):
    return quick(lambda k: model.init(k, jnp.zeros((1, *shape)), train=False),
                 jax.random.key(seed))


def conv2d_np(x, w, stride=1, pad=0):
    """PyTorch Conv2d (cross-correlation, zero padding) on NHWC arrays with HWIO kernels."""
    kh, kw = w.shape[:2]
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * ho:stride, j:j + stride * wo:stride]
            out += patch @ w[i, j]
    return out


def bn_eval_np(x, p, s, eps=1e-5):
    return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


@pytest.mark.parametrize("bottleneck, stride, cin", [(False, 2, 4), (False, 1, 8), (True, 2, 8)])
def test_imagenet_blocks_match_numpy(bottleneck, stride, cin):
    """torchvision's BasicBlock / Bottleneck (v1.5: the stride on the 3x3 conv), eval mode."""
    block = M.Bottleneck(4, stride) if bottleneck else M.BasicBlock(8, stride)
    v = quick_init(block, (8, 8, cin))
    # Non-trivial running statistics, so eval-mode BN is really exercised.
    v = {**v, "batch_stats": jax.tree.map(
        lambda a: a + 0.5 * jax.random.uniform(jax.random.key(a.size), a.shape),
        v["batch_stats"])}
    p, s = jax.tree.map(np.asarray, v["params"]), jax.tree.map(np.asarray, v["batch_stats"])
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 8, 8, cin)), np.float64)
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    if bottleneck:
        y = relu(bn_eval_np(conv2d_np(x, p["conv1"]["kernel"]), p["bn1"], s["bn1"]))
        y = relu(bn_eval_np(conv2d_np(y, p["conv2"]["kernel"], stride, 1), p["bn2"], s["bn2"]))
        y = bn_eval_np(conv2d_np(y, p["conv3"]["kernel"]), p["bn3"], s["bn3"])
        assert p["conv1"]["kernel"].shape[:2] == (1, 1) and y.shape[-1] == 16
    else:
        y = relu(bn_eval_np(conv2d_np(x, p["conv1"]["kernel"], stride, 1), p["bn1"], s["bn1"]))
        y = bn_eval_np(conv2d_np(y, p["conv2"]["kernel"], 1, 1), p["bn2"], s["bn2"])
    if "shortcut_conv" in p:
        short = bn_eval_np(conv2d_np(x, p["shortcut_conv"]["kernel"], stride),
                           p["shortcut_bn"], s["shortcut_bn"])
    else:
        short = x
    assert ("shortcut_conv" in p) == (stride != 1 or cin != y.shape[-1])
    want = relu(y + short)
    got = quick(block.apply, v, x.astype(np.float32))
    assert got.shape == (2, 8 // stride, 8 // stride, want.shape[-1])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _intermediate_shapes(name, side):
    model = M.create(name, 10)
    v = jax.eval_shape(lambda k: M.init(model, k, (side, side, 3)), jax.random.key(0))
    x = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
    _, st = jax.eval_shape(lambda v, x: model.apply(
        v, x, capture_intermediates=True, mutable=["intermediates"]), v, x)
    return jax.tree.map(lambda a: a.shape[1:3], st["intermediates"],
                        is_leaf=lambda a: hasattr(a, "shape"))


def test_imagenet_resnet_layout():
    """Stem 7x7/2 + 3x3/2 max pool, stage strides, v1.5 stride placement, global pool."""
    shapes = _intermediate_shapes("resnet50", 224)
    assert shapes["conv"]["__call__"][0] == (112, 112)
    # After the max pool: stage 1 at 56x56, no stride; stages 2-4 halve on the 3x3 conv.
    for s, side in ((1, 56), (2, 28), (3, 14), (4, 7)):
        first = shapes[f"stage{s}_block0"]
        before = side if s == 1 else 2 * side
        assert first["conv1"]["__call__"][0] == (before, before)  # 1x1 keeps the size
        assert first["conv2"]["__call__"][0] == (side, side)  # the stride is here (v1.5)
        assert first["shortcut_conv"]["__call__"][0] == (side, side)
    r18 = _intermediate_shapes("resnet18", 224)
    assert r18["stage2_block0"]["conv1"]["__call__"][0] == (28, 28)
    assert "shortcut_conv" not in r18["stage1_block0"]  # 64 -> 64, stride 1: identity
    v = jax.eval_shape(lambda k: M.init(M.create("resnet50"), k, IMAGENET), jax.random.key(0))
    assert v["params"]["stage1_block0"]["conv3"]["kernel"].shape == (1, 1, 64, 256)
    assert v["params"]["out"]["kernel"].shape == (2048, 10)


@pytest.mark.parametrize("shape", [(32, 32, 3), (40, 56, 3), (97, 64, 3)])
def test_imagenet_resnets_take_any_size_from_32(shape):
    for name in ("resnet18", "resnet50"):
        model = M.create(name, 5)
        v = jax.eval_shape(lambda k: M.init(model, k, shape), jax.random.key(0))
        x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
        assert jax.eval_shape(lambda v, x: model.apply(v, x), v, x).shape == (2, 5)


def test_imagenet_resnet_torchvision_init_and_forward():
    """A narrow ResNet (width 8) runs for real: torchvision's init, BN stats in train mode."""
    model = M.ImageNetResNet(num_classes=3, stage_sizes=(1, 1, 1, 1), width=8)
    v = quick_init(model, (32, 32, 3))
    k = np.asarray(v["params"]["stage4_block0"]["conv2"]["kernel"])  # 3x3, 64 -> 64
    assert abs(k.std() / np.sqrt(2 / (9 * 64)) - 1) < 0.05  # Kaiming normal, fan_out = 9 * 64
    scales = [np.asarray(x) for p, x in zip(masks.paths(v["params"]), jax.tree.leaves(v["params"]))
              if p.endswith("scale")]
    assert all(np.all(s == 1) for s in scales)  # torchvision BN: weight 1
    bound = 1 / np.sqrt(64)  # out: PyTorch's default Linear init, fan_in 64
    assert np.abs(np.asarray(v["params"]["out"]["kernel"])).max() <= bound
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    out, upd = quick(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), v, x)
    assert out.shape == (2, 3) and np.all(np.isfinite(out))
    assert not np.allclose(upd["batch_stats"]["bn"]["mean"], v["batch_stats"]["bn"]["mean"])


def vit_np(p, x, heads, patch, pool="cls"):
    """The documented ViT in numpy: patches, [cls], + positions, pre-norm blocks, LN, head."""
    n, h, w, c = x.shape
    t = x.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    kernel = p["patch_embed"]["kernel"]  # (patch, patch, c, dim): the patch's (row, col, c)
    t = t.reshape(n, -1, patch * patch * c) @ kernel.reshape(-1, kernel.shape[-1])
    t = t + p["patch_embed"]["bias"]
    if pool == "cls":
        t = np.concatenate([np.broadcast_to(p["cls"], (n, 1, t.shape[-1])), t], axis=1)
    t = t + p["pos_embedding"]

    def ln(a, q):
        mu, var = a.mean(-1, keepdims=True), a.var(-1, keepdims=True)
        return (a - mu) / np.sqrt(var + 1e-6) * q["scale"] + q["bias"]

    from scipy.special import erf
    i = 0
    while f"block{i}" in p:
        b = p[f"block{i}"]
        y = ln(t, b["ln1"])
        a = b["attn"]
        q, k, v = (np.einsum("ntd,dhe->nthe", y, a[z]["kernel"]) + a[z]["bias"]
                   for z in ("query", "key", "value"))
        logits = np.einsum("nqhe,nkhe->nhqk", q, k) / np.sqrt(q.shape[-1])
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("nhqk,nkhe->nqhe", att, v)
        t = t + np.einsum("nqhe,hed->nqd", o, a["out"]["kernel"]) + a["out"]["bias"]
        y = ln(t, b["ln2"]) @ b["fc1"]["kernel"] + b["fc1"]["bias"]
        y = 0.5 * y * (1 + erf(y / np.sqrt(2)))  # exact GELU
        t = t + y @ b["fc2"]["kernel"] + b["fc2"]["bias"]
        i += 1
    t = ln(t, p["norm"])
    t = t[:, 0] if pool == "cls" else t.mean(1)
    return t @ p["out"]["kernel"] + p["out"]["bias"]


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_forward_matches_numpy(pool):
    pytest.importorskip("scipy")
    model = M.ViT(num_classes=5, patch=4, dim=8, depth=2 if pool == "cls" else 1, heads=2,
                  pool=pool)
    v = quick_init(model, (8, 12, 3))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    # Make the (tiny) class token and zero biases matter in the comparison.
    p = jax.tree.map(lambda a: a + 0.1 * np.random.default_rng(a.size).normal(size=a.shape), p)
    assert ("cls" in p) == (pool == "cls")
    assert p["pos_embedding"].shape == (1, 6 + (pool == "cls"), 8)
    assert p["block0"]["attn"]["query"]["kernel"].shape == (8, 2, 4)
    assert p["block0"]["attn"]["out"]["kernel"].shape == (2, 4, 8)
    x = np.asarray(jax.random.normal(jax.random.key(1), (3, 8, 12, 3)), np.float64)
    got = quick(model.apply, {"params": jax.tree.map(np.float32, p)}, x.astype(np.float32))
    np.testing.assert_allclose(got, vit_np(p, x, 2, 4, pool), rtol=1e-4, atol=1e-4)


def test_vit_init_follows_timm():
    model = M.ViT(num_classes=10, patch=4, dim=64, depth=1, heads=4)
    v = quick_init(model, (32, 32, 3))["params"]
    fc1 = np.asarray(v["block0"]["fc1"]["kernel"])  # 64 x 256 draws of N(0, 0.02)
    assert abs(fc1.std() / 0.02 - 1) < 0.03 and np.abs(fc1).max() > 3 * 0.02  # untruncated
    assert not np.any(np.asarray(v["block0"]["attn"]["query"]["bias"]))
    assert abs(np.asarray(v["pos_embedding"]).std() / 0.02 - 1) < 0.05
    assert np.abs(np.asarray(v["cls"])).max() < 1e-5
    bound = 1 / np.sqrt(4 * 4 * 3)  # patch embedding: PyTorch's default Conv2d init
    pe = np.asarray(v["patch_embed"]["kernel"])
    assert np.abs(pe).max() <= bound and np.abs(pe).max() > 0.9 * bound


def test_vit_bad_input():
    with pytest.raises(ValueError, match="multiples of patch=4"):
        jax.eval_shape(lambda k: M.init(M.create("vit_tiny_patch4"), k, (30, 32, 3)),
                       jax.random.key(0))
    with pytest.raises(ValueError, match="pool='max'"):
        jax.eval_shape(lambda k: M.init(M.ViT(pool="max"), k, (32, 32, 3)), jax.random.key(0))


VIT_KERNELS = {"patch_embed/kernel", "out/kernel"} | {
    f"block{i}/{k}/kernel" for i in range(12)
    for k in ("attn/query", "attn/key", "attn/value", "attn/out", "fc1", "fc2")}


def _vit_params():
    model = M.create("vit_tiny_patch4")
    return jax.eval_shape(lambda k: M.init(model, k, CIFAR), jax.random.key(0))["params"]


def test_vit_attention_and_mlp_kernels_prunable_by_default():
    """Default rule: the 3-D attention kernels, MLP, patch and head kernels are prunable, the
    LayerNorm parameters are not; a config's default `exclude='out'` keeps the head dense."""
    from lottery import config

    params = _vit_params()
    prunable = set(masks.prunable_paths(masks.prunable(params)))
    assert VIT_KERNELS <= prunable
    assert not any("/ln" in p or p.startswith("norm/") for p in prunable)
    rates = config.prunable(config.base(), params)
    assert set(masks.prunable_paths(rates)) == VIT_KERNELS - {"out/kernel"}


def test_vit_default_rule_prunes_only_kernels():
    """Not the class token, the position embedding or the 2-D (heads, head_dim) attention
    biases, although they have ndim >= 2."""
    params = _vit_params()
    assert set(masks.prunable_paths(masks.prunable(params))) == VIT_KERNELS
    assert {"cls", "pos_embedding", "block0/attn/query/bias"} <= \
        {p for p in masks.paths(params) if np.ndim(_leaf(params, p)) >= 2}


def _leaf(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def test_resnet50_prunable_leaves_are_the_conv_and_dense_kernels():
    model = M.create("resnet50")
    params = jax.eval_shape(lambda k: M.init(model, k, IMAGENET), jax.random.key(0))["params"]
    prunable = masks.prunable_paths(masks.prunable(params))
    assert len(prunable) == 1 + 16 * 3 + 4 + 1  # stem, 16 bottlenecks, 4 projections, out
    assert all(p.endswith("kernel") for p in prunable)


# ---------------------------------------------------------------------------------------------
# Your own model: register(name, factory), import paths 'package.module:factory', check().

USER_MODULE = '''
import flax.linen as nn


class Tiny(nn.Module):
    num_classes: int = 10
    bias_init: object = None  # a field of the same name as a config option, another meaning

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(self.num_classes, name="out")(x.reshape(x.shape[0], -1))


def make(num_classes):
    return Tiny(num_classes=num_classes)


def not_a_module(num_classes):
    return 3


def raises(num_classes):
    raise RuntimeError("boom\\nsecond line")


class Reshapes(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(self.num_classes, name="out")(x.reshape(x.shape[0], 7))


class Fixed(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3, name="out")(x.reshape(x.shape[0], -1))


NUMBER = 4
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A package `usermodels.nets` in a fresh directory that is the current directory."""
    pkg = tmp_path / "usermodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    yield "usermodels.nets"
    import sys
    for m in ("usermodels", "usermodels.nets"):
        sys.modules.pop(m, None)


def test_import_path_model(user_module):
    import sys

    before = list(sys.path)
    model = M.create(f"{user_module}:make", 7)
    assert type(model).__name__ == "Tiny" and model.num_classes == 7
    assert sys.path == before  # the current directory was searched, not added for good
    assert M.create(f"{user_module}:Tiny", 5).num_classes == 5  # a Module class is a factory
    assert M.is_import_path(f"{user_module}:make") and not M.is_import_path("resnet18")
    checked = M.check(f"{user_module}:make", MNIST, 4)
    assert checked.num_classes == 4


@pytest.mark.parametrize("attr, message", [
    ("nope.module:make", "cannot import module 'nope.module' (ModuleNotFoundError"),
    ("{m}:missing", "has no attribute 'missing'"),
    ("{m}:NUMBER", "NUMBER is a int, expected a factory"),
    ("{m}:not_a_module", "returned int, expected a flax.linen.Module"),
    ("{m}:raises", "failed (RuntimeError: boom)"),
    ("{m}:Reshapes", "initializing on input shape (28, 28, 1) failed"),
    ("{m}:Fixed", "logits for one example of shape (28, 28, 1) have shape (1, 3), "
                  "expected (1, 10)"),
    ("{m}:", "expected an import path 'package.module:factory'"),
])
def test_import_path_errors_are_one_line(user_module, attr, message):
    path = attr.format(m=user_module)
    with pytest.raises(ValueError) as err:
        M.check(path, MNIST, 10)
    text = str(err.value)
    assert len(text.splitlines()) == 1 and message in text and f"model={path!r}" in text


def test_register_model():
    def factory(num_classes=10, hidden=16):
        return M.LeNet300100(num_classes=num_classes, hidden=(hidden,))

    M.register("my_mlp", factory)
    try:
        assert "my_mlp" in M.names() and "my_mlp" not in M.MODELS
        model = M.create("my_mlp", 3, hidden=8)
        assert model.hidden == (8,) and model.num_classes == 3
        with pytest.raises(ValueError, match="already registered"):
            M.register("my_mlp", factory)
        M.register("my_mlp", M.LeNet300100(hidden=(5,)), overwrite=True)  # a Module instance
        assert M.create("my_mlp", 4) == M.LeNet300100(num_classes=4, hidden=(5,))
        assert M.check("my_mlp", MNIST, 4).num_classes == 4
        with pytest.raises(ValueError, match="no field"):
            M.create("my_mlp", 4, width=3)
    finally:
        M.unregister("my_mlp")
    assert "my_mlp" not in M.names()
    with pytest.raises(ValueError, match="built-in"):
        M.register("resnet18", factory)
    for bad in ("my:net", "1net", "a/b", ""):
        with pytest.raises(ValueError, match="letters, digits"):
            M.register(bad, factory)
    with pytest.raises(ValueError, match="expected a factory"):
        M.register("thing", 3)


def test_config_accepts_import_path_and_registered_models(user_module):
    from lottery import config

    cfg = config.base()  # mnist5k: (28, 28, 1), 10 classes; static info, nothing is loaded
    cfg.model = f"{user_module}:make"
    config.validate(cfg)
    m = config.model(cfg, 10)
    assert m.bias_init is None  # config options are for the built-in models only
    safe = user_module.replace(".", "-")  # a directory name: no '.', ':' or '/'
    assert config.run_name(cfg).startswith(f"find-ticket_{safe}-make_mnist5k_")
    cfg.model = f"{user_module}:Fixed"
    with pytest.raises(ValueError) as err:
        config.validate(cfg)
    assert len(str(err.value).splitlines()) == 1 and "have shape (1, 3)" in str(err.value)
    cfg.model = "resnet1000"
    with pytest.raises(ValueError, match="model='resnet1000': expected one of lenet300_100"):
        config.validate(cfg)
    M.register("my_net", M.LeNet300100)
    try:
        cfg.model = "my_net"
        config.validate(cfg)
        assert isinstance(config.model(cfg, 10), M.LeNet300100)
    finally:
        M.unregister("my_net")
    cfg.model = "lenet300_100"  # registered names keep their exact run names
    assert config.run_name(cfg) == f"find-ticket_lenet300_100_mnist5k_{config.run_hash(cfg)}"
