"""The flax linen models of the lottery-ticket literature, registered by name, and your own.

Every model maps a channels-last batch (MNIST (N, 28, 28, 1), CIFAR (N, 32, 32, 3), MNIST-1D
(N, 40, 1), ImageNet (N, 224, 224, 3)) to logits (N, num_classes) via
`model.apply(variables, x, train=...)`. `INPUT_SHAPES` gives each registered model's nominal input.
The classifier is always the Dense layer named `out`, so configs can say `exclude="out"` or
`rates={"out": 0.5}`. Batch-norm models keep running statistics in the `batch_stats` collection
(PyTorch's momentum 0.1 is flax's momentum 0.9).

Layer names: dense layers `fc1, fc2, ...`, conv layers `conv1, conv2, ...` with their batch norms
`bn1, bn2, ...`; ResNet blocks are `stage{s}_block{b}` (s = 1..3 for the CIFAR ResNets, 1..4 for
ResNet-18/50; b = 0..n-1) holding `conv1, bn1, conv2, bn2` (and `conv3, bn3` in a bottleneck) and,
where the shape changes, `shortcut_conv, shortcut_bn`; the ResNet stem is `conv, bn`. The ViT has
`patch_embed` (conv), `cls` (class token), `pos_embedding`, blocks `block{i}` holding `ln1`,
`attn/{query,key,value,out}`, `ln2`, `fc1`, `fc2`, then `norm` and `out`.

Your own model: `create` (and a config's `model` field) takes a registered name, a name given to
`register(name, factory)`, or an import path 'package.module:factory' where `factory(num_classes=n)`
returns a `flax.linen.Module` (a Module class with a `num_classes` field is such a factory). The
module must take `(x, train=...)` like the models here. `check` builds it, initializes it on an
input shape and checks the logits' shape, raising a one-line ValueError naming what failed.

Prunable by default (`lottery.masks.prunable`: leaves with ndim >= 2): every Dense and conv kernel,
including `out/kernel`, the ViT's `patch_embed/kernel` and its attention kernels
`attn/{query,key,value}/kernel` (dim, heads, head_dim) and `attn/out/kernel` (heads, head_dim,
dim); not biases, BN and LayerNorm parameters. The ViT's attention biases (heads, head_dim), `cls`
(1, 1, dim) and `pos_embedding` (1, tokens, dim) also have ndim >= 2: exclude them in a ViT
config (`exclude="out,cls,pos_embedding,.*/attn/(query|key|value)/bias"`) until the default rule
prunes only leaves named `kernel`.

Initialisation: Kaiming-normal kernels (fan_in, ReLU gain sqrt(2), untruncated, as PyTorch's
`kaiming_normal_` that OpenLTH uses), except Conv-2/4/6 (Glorot normal, as in the lottery-ticket
paper's TensorFlow code) and the MNIST-1D models (PyTorch's default layer init, as the reference
code). Biases follow the model's `bias_init` (`BIAS_INITS`): 'torch' = PyTorch's default
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which OpenLTH keeps because its `kaiming_normal` initializer
sets only the weights (the default of LeNet-300-100, VGG and ResNet, which follow OpenLTH);
'zeros' (the default of Conv-2/4/6, as TensorFlow's layers; the Synaptic-Flow models). BN scales
follow `bn_init` (`BN_SCALE_INITS`). Configs reach both through the fields of the same names.
ResNet-18/50 follow torchvision: Kaiming-normal conv kernels with fan_out, BN scales 1 (not set by
`bn_init`), PyTorch's default Linear init for `out` (its bias per `bias_init`). The ViT follows
timm: N(0, 0.02) Dense and attention kernels (timm's trunc_normal_(std=.02) cuts at +-2, i.e. 100
std: a plain normal), zero biases, N(0, 0.02) position embedding, N(0, 1e-6) class token, PyTorch's
default Conv2d init for the patch embedding, LayerNorm 1 and 0.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import re
import sys
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


# ---------------------------------------------------------------------------------------------
# ImageNet-style ResNets (torchvision layout) and a small Vision Transformer.

# torchvision's ResNet init: kaiming_normal_(mode='fan_out', nonlinearity='relu') on every conv.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv_nobias(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    """A bias-free conv with PyTorch's symmetric padding kernel // 2 and torchvision's init."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False,
                   kernel_init=kaiming_normal_fan_out, name=name)


def _shortcut(x: jax.Array, features: int, stride: int, train: bool) -> jax.Array:
    """torchvision's downsample: 1x1 stride-`stride` conv + BN where the shape changes."""
    if stride == 1 and x.shape[-1] == features:
        return x
    x = _conv_nobias(features, 1, stride, "shortcut_conv")(x)
    return _bn(train, "ones", "shortcut_bn")(x)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut, then ReLU."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = _conv_nobias(self.features, 3, self.stride, "conv1")(x)
        y = nn.relu(_bn(train, "ones", "bn1")(y))
        y = _conv_nobias(self.features, 3, 1, "conv2")(y)
        y = _bn(train, "ones", "bn2")(y)
        return nn.relu(y + _shortcut(x, self.features, self.stride, train))


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5): conv1x1(features)-BN-ReLU, conv3x3(features,
    stride)-BN-ReLU, conv1x1(4 * features)-BN, + shortcut, then ReLU. The stride sits on the 3x3
    conv (v1.5), not on the first 1x1 (v1)."""

    features: int
    stride: int = 1
    expansion: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out = self.features * self.expansion
        y = _conv_nobias(self.features, 1, 1, "conv1")(x)
        y = nn.relu(_bn(train, "ones", "bn1")(y))
        y = _conv_nobias(self.features, 3, self.stride, "conv2")(y)
        y = nn.relu(_bn(train, "ones", "bn2")(y))
        y = _conv_nobias(out, 1, 1, "conv3")(y)
        y = _bn(train, "ones", "bn3")(y)
        return nn.relu(y + _shortcut(x, out, self.stride, train))


class ImageNetResNet(nn.Module):
    """ResNet-18 / ResNet-50 in torchvision's layout (He et al. 2016; torchvision v1.5).

    Stem: 7x7 stride-2 conv (pad 3, no bias) `conv`, BN `bn`, ReLU, 3x3 stride-2 max pool (pad 1);
    four stages of `stage_sizes` blocks with `width` x 1, 2, 4, 8 features (stride 2 at the start
    of stages 2-4, projection shortcuts where the shape changes); global average pool; Dense `out`.
    Basic blocks for ResNet-18 (2, 2, 2, 2), bottlenecks for ResNet-50 (3, 4, 6, 3). Nominal input
    224x224x3; any HxW >= 32 works (the global pool takes whatever map is left). Parameters for
    1000 classes: 11,689,512 (ResNet-18) and 25,557,032 (ResNet-50), as torchvision's.
    """

    num_classes: int = 1000
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    bottleneck: bool = False
    width: int = 64
    bias_init: str = "torch"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _conv_nobias(self.width, 7, 2, "conv")(x)
        x = nn.relu(_bn(train, "ones", "bn")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block = Bottleneck if self.bottleneck else BasicBlock
        for s, n in enumerate(self.stage_sizes):
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                x = block(self.width * 2**s, stride, name=f"stage{s + 1}_block{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=torch_default_kernel,
                        bias_init=_bias_init(self.bias_init, x.shape[-1]), name="out")(x)


# timm's trunc_normal_(std=.02) truncates at +-2 (absolute), i.e. at 100 std: a plain normal.
vit_normal = nn.initializers.normal(0.02)
VIT_POOLS = ("cls", "mean")


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)) (GELU, exact)."""

    dim: int
    heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(epsilon=1e-6, name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, qkv_features=self.dim, out_features=self.dim,
            kernel_init=vit_normal, bias_init=zeros, name="attn")(y, y)
        x = x + y
        y = nn.LayerNorm(epsilon=1e-6, name="ln2")(x)
        y = nn.Dense(self.mlp_dim, kernel_init=vit_normal, bias_init=zeros, name="fc1")(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(self.dim, kernel_init=vit_normal, bias_init=zeros, name="fc2")(y)
        return x + y


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al. 2021) in timm's layout, pre-norm blocks.

    `patch_embed`: a `patch` x `patch` stride-`patch` conv to `dim` features (H and W must be
    multiples of `patch`); with `pool='cls'` (the default, as ViT, DeiT and timm) a learned class
    token `cls` is prepended and read out after the final LayerNorm `norm`; with `pool='mean'` the
    tokens are averaged instead. A learned position embedding `pos_embedding` (1, tokens, dim) is
    added; its length is fixed by the input shape at init. `depth` blocks `block{i}` of
    multi-head self-attention (`heads` heads of dim / heads) and an MLP of `mlp_ratio` * dim
    (GELU), LayerNorm eps 1e-6, no dropout; Dense `out`. `vit_tiny_patch16` is timm's
    `vit_tiny_patch16_224` (dim 192, depth 12, heads 3): 5,717,416 parameters for 224x224 input
    and 1000 classes; `vit_tiny_patch4` is the same network with 4x4 patches for 32x32 input.
    """

    num_classes: int = 1000
    patch: int = 16
    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: int = 4
    pool: str = "cls"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout, no batch statistics
        if self.pool not in VIT_POOLS:
            raise ValueError(f"pool={self.pool!r}: must be one of {list(VIT_POOLS)}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not a multiple of heads={self.heads}")
        if x.ndim != 4 or x.shape[1] % self.patch or x.shape[2] % self.patch:
            raise ValueError(f"ViT input {tuple(x.shape)}: expected (N, H, W, C) with H and W "
                             f"multiples of patch={self.patch}")
        fan_in = self.patch * self.patch * x.shape[-1]
        x = nn.Conv(self.dim, (self.patch, self.patch), strides=(self.patch, self.patch),
                    padding="VALID", kernel_init=torch_default_kernel,
                    bias_init=torch_default_bias(fan_in), name="patch_embed")(x)
        x = x.reshape(x.shape[0], -1, self.dim)
        if self.pool == "cls":
            cls = self.param("cls", nn.initializers.normal(1e-6), (1, 1, self.dim))
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], axis=1)
        x = x + self.param("pos_embedding", vit_normal, (1, x.shape[1], self.dim))
        for i in range(self.depth):
            x = ViTBlock(self.dim, self.heads, self.mlp_ratio * self.dim, name=f"block{i}")(x)
        x = nn.LayerNorm(epsilon=1e-6, name="norm")(x)
        x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
        return nn.Dense(self.num_classes, kernel_init=vit_normal, bias_init=zeros, name="out")(x)


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
    "resnet18": _factory(ImageNetResNet, "ResNet-18 (torchvision) for 224x224x3 input, any "
                         "HxW >= 32.", stage_sizes=(2, 2, 2, 2), bottleneck=False),
    "resnet50": _factory(ImageNetResNet, "ResNet-50 (torchvision v1.5) for 224x224x3 input, any "
                         "HxW >= 32.", stage_sizes=(3, 4, 6, 3), bottleneck=True),
    "vit_tiny_patch16": _factory(ViT, "ViT-Tiny, 16x16 patches, for 224x224x3 input (timm's "
                                 "vit_tiny_patch16_224).", patch=16),
    "vit_tiny_patch4": _factory(ViT, "ViT-Tiny, 4x4 patches, for 32x32x3 input.", patch=4),
}

# The nominal input shape (one example, channels-last) of every registered model.
_MNIST, _CIFAR, _MNIST1D, _IMAGENET = (28, 28, 1), (32, 32, 3), (40, 1), (224, 224, 3)
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "lenet300_100": _MNIST, "mlp_mnist1d": _MNIST1D, "cnn_mnist1d": _MNIST1D,
    **{n: _CIFAR for n in ("conv2", "conv4", "conv6", "vgg11", "vgg16", "vgg19", "resnet20",
                           "resnet32", "resnet56", "vit_tiny_patch4")},
    **{n: _IMAGENET for n in ("resnet18", "resnet50", "vit_tiny_patch16")},
}

# Models registered at run time by `register`: name -> factory or module.
_USER: dict[str, Callable[..., nn.Module] | nn.Module] = {}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def is_import_path(name: str) -> bool:
    """Whether `name` has the form 'package.module:factory' (a ':' and no registered name)."""
    return isinstance(name, str) and ":" in name


def names() -> list[str]:
    """The registered model names: the built-in ones, then those given to `register`."""
    return [*MODELS, *_USER]


def register(name: str, factory: Callable[..., nn.Module] | nn.Module, *,
             overwrite: bool = False) -> None:
    """Register a model under `name`, for `create` and a config's `model` field in this process.

    `factory(num_classes=n, **kwargs)` must return a `flax.linen.Module` (a Module class with a
    `num_classes` field qualifies). A Module instance is also accepted: `create` returns it with
    `num_classes` (and kwargs) replaced where it has such fields, else as it is. Names are
    letters, digits, '_' and '-', starting with a letter; a built-in name cannot be replaced, and
    a registered one only with `overwrite=True`.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"model name {name!r}: expected letters, digits, '_' or '-', starting "
                         f"with a letter")
    if name in MODELS:
        raise ValueError(f"model name {name!r} is a built-in model; choose another name")
    if name in _USER and not overwrite:
        raise ValueError(f"model name {name!r} is already registered; pass overwrite=True to "
                         f"replace it")
    if not (isinstance(factory, nn.Module) or callable(factory)):
        raise ValueError(f"model {name!r}: expected a factory(num_classes=...) returning a "
                         f"flax.linen.Module, or a Module, got {type(factory).__name__}")
    _USER[name] = factory
    _checked.cache_clear()


def unregister(name: str) -> None:
    """Remove a model given to `register` (KeyError if there is none of that name)."""
    del _USER[name]
    _checked.cache_clear()


def _unknown(name) -> str:
    return (f"model={name!r}: expected one of {', '.join(names())} (registered names), or an "
            f"import path 'package.module:factory'")


def resolve(name: str) -> Callable[..., nn.Module] | nn.Module:
    """The factory (or Module) that `name` stands for: a built-in name, a name given to
    `register`, or an import path 'package.module:factory' (the current directory is searched
    after sys.path). Raises a one-line ValueError naming what failed; nothing is built."""
    if not isinstance(name, str):
        raise ValueError(f"model={name!r}: expected a model name or an import path")
    if name in MODELS:
        return MODELS[name]
    if name in _USER:
        return _USER[name]
    if not is_import_path(name):
        raise ValueError(_unknown(name))
    module_name, _, attr = name.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"model={name!r}: expected an import path 'package.module:factory'")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # anything importing user code can raise: one line
        raise ValueError(f"model={name!r}: cannot import module {module_name!r} "
                         f"({type(e).__name__}: {_first_line(e)})") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model={name!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not (isinstance(obj, nn.Module) or callable(obj)):
        raise ValueError(f"model={name!r}: {attr} is a {type(obj).__name__}, expected a "
                         f"factory(num_classes=...) returning a flax.linen.Module")
    return obj


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def create(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """The model `name` (see `resolve`) with `num_classes` outputs; kwargs go to the module."""
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) \
            or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: must be a positive int")
    factory = resolve(name)
    if name in MODELS:
        return factory(num_classes=int(num_classes), **kwargs)
    if isinstance(factory, nn.Module):
        fields = {f.name for f in dataclasses.fields(factory)}
        opts = {k: v for k, v in {"num_classes": int(num_classes), **kwargs}.items()
                if k in fields}
        unknown = set(kwargs) - fields
        if unknown:
            raise ValueError(f"model={name!r}: the module has no field(s) {sorted(unknown)}")
        return factory.clone(**opts) if opts else factory
    try:
        model = factory(num_classes=int(num_classes), **kwargs)
    except Exception as e:
        raise ValueError(f"model={name!r}: calling it with num_classes={int(num_classes)} failed "
                         f"({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={name!r}: factory(num_classes={int(num_classes)}) returned "
                         f"{type(model).__name__}, expected a flax.linen.Module")
    return model


def check(name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The model `name` with `num_classes` outputs, checked: it resolves, builds a flax Module,
    initializes on one example of `input_shape` (abstractly: nothing is computed) and returns
    logits of shape (1, num_classes) in eval mode. Raises a one-line ValueError naming `name` and
    what failed. Results are cached per (name, shape, classes)."""
    return _checked(name, tuple(int(d) for d in input_shape), int(num_classes))


@functools.lru_cache(maxsize=64)
def _checked(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    model = create(name, num_classes)
    what = f"model={name!r}"
    try:
        variables = jax.eval_shape(lambda k: init(model, k, input_shape), jax.random.key(0))
    except Exception as e:
        raise ValueError(f"{what}: initializing on input shape {input_shape} failed "
                         f"({type(e).__name__}: {_first_line(e)})") from None
    if "params" not in variables:
        raise ValueError(f"{what}: init on input shape {input_shape} made no 'params'")
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    try:
        out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    except Exception as e:
        raise ValueError(f"{what}: apply(variables, x, train=False) on input shape "
                         f"{input_shape} failed ({type(e).__name__}: {_first_line(e)})") from None
    if getattr(out, "shape", None) != (1, num_classes):
        raise ValueError(f"{what}: logits for one example of shape {input_shape} have shape "
                         f"{getattr(out, 'shape', type(out).__name__)}, expected "
                         f"(1, {num_classes})")
    return model


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
