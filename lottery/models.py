"""The flax linen models of the lottery-ticket literature, registered by name.

Every model maps a channels-last batch (MNIST (N, 28, 28, 1), CIFAR (N, 32, 32, 3), MNIST-1D
(N, 40, 1)) to logits (N, num_classes) via `model.apply(variables, x, train=...)`. The classifier is
always the Dense layer named `out`, so configs can say `exclude="out"` or `rates={"out": 0.5}`.
Batch-norm models keep running statistics in the `batch_stats` collection (PyTorch's momentum 0.1
is flax's momentum 0.9).

Layer names: dense layers `fc1, fc2, ...`, conv layers `conv1, conv2, ...` with their batch norms
`bn1, bn2, ...`; ResNet blocks are `stage{s}_block{b}` (s = 1..3, b = 0..n-1) holding `conv1,
bn1, conv2, bn2` and, where the shape changes, `shortcut_conv, shortcut_bn`; the ResNet stem is
`conv, bn`.

Initialisation: Kaiming-normal kernels (fan_in, ReLU gain sqrt(2), untruncated, as PyTorch's
`kaiming_normal_` that OpenLTH uses), except Conv-2/4/6 (Glorot normal, as in the lottery-ticket
paper's TensorFlow code) and the MNIST-1D models (PyTorch's default layer init, as the reference
code). Biases follow the model's `bias_init` (`BIAS_INITS`): 'torch' = PyTorch's default
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which OpenLTH keeps because its `kaiming_normal` initializer
sets only the weights (the default of LeNet-300-100, VGG and ResNet, which follow OpenLTH);
'zeros' (the default of Conv-2/4/6, as TensorFlow's layers; the Synaptic-Flow models). BN scales
follow `bn_init` (`BN_SCALE_INITS`). Configs reach both through the fields of the same names.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

PyTree = Any

# PyTorch's kaiming_normal_(mode='fan_in', nonlinearity='relu'): N(0, 2 / fan_in), not truncated.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# Frankle & Carbin's Conv-2/4/6 use Glorot (Xavier) normal; TensorFlow's is a truncated normal
# rescaled to variance 2 / (fan_in + fan_out), which is what jax's glorot_normal is too.
glorot_normal = nn.initializers.glorot_normal()
# PyTorch's default nn.Linear / nn.Conv1d kernel init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros = nn.initializers.zeros


def torch_default_bias(fan_in: int) -> Callable:
    """PyTorch's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for a layer with `fan_in`."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


BIAS_INITS = ("torch", "zeros")


def _bias_init(kind: str, fan_in: int) -> Callable:
    if kind not in BIAS_INITS:
        raise ValueError(f"bias_init={kind!r}: must be one of {list(BIAS_INITS)}")
    return torch_default_bias(fan_in) if kind == "torch" else zeros


def _dense(features: int, x: jax.Array, name: str, bias_init: str,
           kernel_init: Callable = None) -> jax.Array:
    """Dense layer applied to `x`, bias init by kind with fan_in = x's last dimension."""
    return nn.Dense(features, kernel_init=kernel_init or kaiming_normal,
                    bias_init=_bias_init(bias_init, x.shape[-1]), name=name)(x)


BN_SCALE_INITS = {
    "uniform": nn.initializers.uniform(1.0),  # OpenLTH's default batchnorm_init: gamma ~ U[0, 1)
    "ones": nn.initializers.ones,  # the usual PyTorch / flax default
}


def _bn(train: bool, bn_init: str, name: str) -> nn.BatchNorm:
    if bn_init not in BN_SCALE_INITS:
        raise ValueError(f"bn_init={bn_init!r}: must be one of {sorted(BN_SCALE_INITS)}")
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        scale_init=BN_SCALE_INITS[bn_init], name=name)


def _conv3x3(features: int, name: str, stride: int = 1, use_bias: bool = True,
             kernel_init: Callable = kaiming_normal, bias_init: str = "zeros",
             in_features: int = 1) -> nn.Conv:
    """3x3 conv, PyTorch's symmetric padding 1 (flax 'SAME' pads stride-2 convs asymmetrically)."""
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                   use_bias=use_bias, kernel_init=kernel_init,
                   bias_init=_bias_init(bias_init, 9 * in_features), name=name)


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def _max_pool(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class LeNet300100(nn.Module):
    """LeNet-300-100: 784-300-100-classes, ReLU (OpenLTH `mnist_lenet_300_100`; LT paper Fig. 2).

    266,610 parameters for 28x28 input. Layers `fc1`, `fc2`, `out`. OpenLTH's init: Kaiming-normal
    kernels, PyTorch-default biases (`bias_init='torch'`).
    """

    num_classes: int = 10
    hidden: Sequence[int] = (300, 100)
    bias_init: str = "torch"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = _flatten(x)
        for i, h in enumerate(self.hidden, start=1):
            x = nn.relu(_dense(h, x, f"fc{i}", self.bias_init))
        return _dense(self.num_classes, x, "out", self.bias_init)


CONV_PLANS: dict[int, tuple] = {
    2: (64, 64, "M"),
    4: (64, 64, "M", 128, 128, "M"),
    6: (64, 64, "M", 128, 128, "M", 256, 256, "M"),
}


class ConvNet(nn.Module):
    """Conv-2 / Conv-4 / Conv-6 for CIFAR-10 (Frankle & Carbin 2019, Fig. 2 and Appendix).

    3x3 'SAME' convs with ReLU and bias, 2x2 max pools ('M' in `plan`), then FC 256, 256, classes;
    Glorot-normal kernels, zero biases (`bias_init='zeros'`, TensorFlow's default, as the paper's
    code). For 32x32x3 input: Conv-2 4,301,642 and Conv-4 2,425,930
    parameters (the paper's 4.3M and 2.4M); Conv-6 2,262,602 (the paper's table says 1.7M, which
    these layer sizes cannot give; its 1.1M conv weights do match). Layers `conv1..`, `fc1`,
    `fc2`, `out`.
    """

    num_classes: int = 10
    plan: Sequence[int | str] = CONV_PLANS[2]
    hidden: Sequence[int] = (256, 256)
    bias_init: str = "zeros"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        i = 0
        for spec in self.plan:
            if spec == "M":
                x = _max_pool(x)
            else:
                i += 1
                x = nn.relu(_conv3x3(int(spec), f"conv{i}", kernel_init=glorot_normal,
                                     bias_init=self.bias_init, in_features=x.shape[-1])(x))
        x = _flatten(x)
        for j, h in enumerate(self.hidden, start=1):
            x = nn.relu(_dense(h, x, f"fc{j}", self.bias_init, glorot_normal))
        return _dense(self.num_classes, x, "out", self.bias_init, glorot_normal)


VGG_PLANS: dict[int, tuple] = {  # OpenLTH models/cifar_vgg.py (no max pool after the last stage)
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512),
}


class VGG(nn.Module):
    """VGG-11/16/19 with batch norm for CIFAR (OpenLTH `cifar_vgg_N`).

    Each conv: 3x3 pad 1 with bias, BN, ReLU; 'M' = 2x2 max pool. The last stage has no max pool;
    OpenLTH then average-pools the 2x2 map (for 32x32 input), done here as a global average pool,
    then one Dense(classes) `out` (OpenLTH's `fc`). Kaiming-normal kernels, biases per `bias_init`
    (OpenLTH: 'torch'), BN gamma per `bn_init` (OpenLTH: 'uniform' = U[0, 1)); the Synaptic-Flow
    reference VGG uses `bias_init='zeros', bn_init='ones'`. Parameters for 10 classes: VGG-11
    9,231,114, VGG-16 14,728,266, VGG-19 20,040,522 (the LT paper's 20.0M). Layers `conv{i}`,
    `bn{i}`, `out`.
    """

    num_classes: int = 10
    plan: Sequence[int | str] = VGG_PLANS[16]
    bn_init: str = "uniform"
    bias_init: str = "torch"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        i = 0
        for spec in self.plan:
            if spec == "M":
                x = _max_pool(x)
            else:
                i += 1
                x = _conv3x3(int(spec), f"conv{i}", bias_init=self.bias_init,
                             in_features=x.shape[-1])(x)
                x = nn.relu(_bn(train, self.bn_init, f"bn{i}")(x))
        x = jnp.mean(x, axis=(1, 2))
        return _dense(self.num_classes, x, "out", self.bias_init)


class ResBlock(nn.Module):
    """OpenLTH's CIFAR ResNet block: conv-BN-ReLU-conv-BN + shortcut, then ReLU.

    The shortcut is a 1x1 stride-`stride` conv + BN when the shape changes, else the identity.
    Convs have no bias.
    """

    features: int
    stride: int = 1
    bn_init: str = "uniform"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = _conv3x3(self.features, "conv1", stride=self.stride, use_bias=False)(x)
        y = nn.relu(_bn(train, self.bn_init, "bn1")(y))
        y = _conv3x3(self.features, "conv2", use_bias=False)(y)
        y = _bn(train, self.bn_init, "bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides=(self.stride, self.stride),
                        padding="VALID", use_bias=False, kernel_init=kaiming_normal,
                        name="shortcut_conv")(x)
            x = _bn(train, self.bn_init, "shortcut_bn")(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """ResNet-D for CIFAR, D = 6n + 2 (He et al. 2016 sec. 4.2, as OpenLTH `cifar_resnet_D[_W]`).

    Stem conv3x3(W)+BN+ReLU, three stages of n blocks with W, 2W, 4W filters (stride 2 at the start
    of stages 2 and 3, projection shortcuts there), global average pool, Dense `out`. W = 16 by
    default. Parameters for 10 classes: ResNet-20 272,474, ResNet-32 466,906, ResNet-56 855,770.
    Convs have no bias; the bias of `out` follows `bias_init` (OpenLTH: 'torch').
    """

    num_classes: int = 10
    depth: int = 20
    width: int = 16
    bn_init: str = "uniform"
    bias_init: str = "torch"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"depth={self.depth}: must be 6n + 2 with n >= 1 (20, 32, 56, ...)")
        n = (self.depth - 2) // 6
        x = _conv3x3(self.width, "conv", use_bias=False)(x)
        x = nn.relu(_bn(train, self.bn_init, "bn")(x))
        for s in range(3):
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                x = ResBlock(self.width * 2**s, stride, self.bn_init,
                             name=f"stage{s + 1}_block{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return _dense(self.num_classes, x, "out", self.bias_init)


def _torch_dense(features: int, fan_in: int, name: str, torch_init: bool) -> nn.Dense:
    if torch_init:
        return nn.Dense(features, kernel_init=torch_default_kernel,
                        bias_init=torch_default_bias(fan_in), name=name)
    return nn.Dense(features, kernel_init=kaiming_normal, bias_init=zeros, name=name)


class MLP1D(nn.Module):
    """MNIST-1D MLP 40-100-100-classes (Greydanus 2020, `notebooks/models.py` MLPBase).

    As the reference: h1 = relu(fc1(x)); h2 = h1 + relu(fc2(h1)) when `residual` (its default);
    out(h2). 15,210 parameters. PyTorch default init when `torch_init`, else Kaiming normal and
    zero biases. Layers `fc1`, `fc2`, `out`.
    """

    num_classes: int = 10
    hidden: int = 100
    residual: bool = True
    torch_init: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = _flatten(x)
        h = nn.relu(_torch_dense(self.hidden, x.shape[-1], "fc1", self.torch_init)(x))
        g = nn.relu(_torch_dense(self.hidden, self.hidden, "fc2", self.torch_init)(h))
        h = h + g if self.residual else g
        return _torch_dense(self.num_classes, self.hidden, "out", self.torch_init)(h)


class CNN1D(nn.Module):
    """MNIST-1D CNN (Greydanus 2020, `notebooks/models.py` ConvBase).

    Three 1D convs of `channels` (25) filters, stride 2, padding 1, kernels 5, 3, 3, each with ReLU
    (length 40 -> 19 -> 10 -> 5), flatten (125), Dense `out`. 5,210 parameters. PyTorch default
    init when `torch_init`, else Kaiming normal and zero biases. Layers `conv1..3`, `out`.
    The flatten is length-major (channels-last), a fixed permutation of PyTorch's channel-major one.
    """

    num_classes: int = 10
    channels: int = 25
    kernels: Sequence[int] = (5, 3, 3)
    torch_init: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        if x.ndim == 2:
            x = x[..., None]
        for i, k in enumerate(self.kernels, start=1):
            fan_in = x.shape[-1] * k
            inits = ((torch_default_kernel, torch_default_bias(fan_in)) if self.torch_init
                     else (kaiming_normal, zeros))
            x = nn.Conv(self.channels, (k,), strides=(2,), padding=((1, 1),),
                        kernel_init=inits[0], bias_init=inits[1], name=f"conv{i}")(x)
            x = nn.relu(x)
        x = _flatten(x)
        return _torch_dense(self.num_classes, x.shape[-1], "out", self.torch_init)(x)


def _factory(cls: type[nn.Module], doc: str, **fixed) -> Callable[..., nn.Module]:
    def make(num_classes: int = 10, **kwargs) -> nn.Module:
        return cls(num_classes=num_classes, **fixed, **kwargs)

    make.__doc__ = doc
    return make


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300_100": _factory(LeNet300100, "LeNet-300-100 for 28x28x1 input."),
    "conv2": _factory(ConvNet, "Conv-2 for 32x32x3 input.", plan=CONV_PLANS[2]),
    "conv4": _factory(ConvNet, "Conv-4 for 32x32x3 input.", plan=CONV_PLANS[4]),
    "conv6": _factory(ConvNet, "Conv-6 for 32x32x3 input.", plan=CONV_PLANS[6]),
    "vgg11": _factory(VGG, "VGG-11 (BN) for 32x32x3 input.", plan=VGG_PLANS[11]),
    "vgg16": _factory(VGG, "VGG-16 (BN) for 32x32x3 input.", plan=VGG_PLANS[16]),
    "vgg19": _factory(VGG, "VGG-19 (BN) for 32x32x3 input.", plan=VGG_PLANS[19]),
    "resnet20": _factory(ResNet, "ResNet-20 for 32x32x3 input.", depth=20),
    "resnet32": _factory(ResNet, "ResNet-32 for 32x32x3 input.", depth=32),
    "resnet56": _factory(ResNet, "ResNet-56 for 32x32x3 input.", depth=56),
    "mlp_mnist1d": _factory(MLP1D, "MNIST-1D MLP for (40, 1) input."),
    "cnn_mnist1d": _factory(CNN1D, "MNIST-1D CNN for (40, 1) input."),
}


def create(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """The registered model `name` with `num_classes` outputs; kwargs go to the module."""
    if name not in MODELS:
        raise ValueError(f"model name {name!r} is unknown; known names: {sorted(MODELS)}")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: must be a positive int")
    return MODELS[name](num_classes=int(num_classes), **kwargs)


def init(model: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> dict:
    """Variables ('params' and, for BN models, 'batch_stats') for one example of `input_shape`."""
    return dict(_init(model, key, tuple(int(d) for d in input_shape)))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> dict:
    """Compiled once per (model, input shape): models are hashable flax dataclasses."""
    return model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)


def inference_fn(model: nn.Module, variables: dict) -> Callable[[PyTree, jax.Array], jax.Array]:
    """`apply_fn(params, x) -> logits` in eval mode, with the non-param collections bound."""
    rest = {k: v for k, v in variables.items() if k != "params"}

    def apply_fn(params: PyTree, x: jax.Array) -> jax.Array:
        return model.apply({"params": params, **rest}, x, train=False)

    return apply_fn


def flat_param_count(params: PyTree) -> int:
    """Total number of scalars in `params` (arrays or `jax.ShapeDtypeStruct` leaves)."""
    return sum(math.prod(x.shape) if hasattr(x, "shape") else int(np.size(x))
               for x in jax.tree.leaves(params))
