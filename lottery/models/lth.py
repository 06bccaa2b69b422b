"""The lottery-ticket papers' networks (Frankle & Carbin 2019; OpenLTH): LeNet-300-100 for MNIST,
Conv-2/4/6, VGG-11/16/19 (BN) and ResNet-20/32/56 for CIFAR.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from lottery.models.layers import (batch_norm, conv3x3, dense, flatten, glorot_normal,
                                   kaiming_normal, max_pool)


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
        x = flatten(x)
        for i, h in enumerate(self.hidden, start=1):
            x = nn.relu(dense(h, x, f"fc{i}", self.bias_init))
        return dense(self.num_classes, x, "out", self.bias_init)


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
                x = max_pool(x)
            else:
                i += 1
                x = nn.relu(conv3x3(int(spec), f"conv{i}", kernel_init=glorot_normal,
                                     bias_init=self.bias_init, in_features=x.shape[-1])(x))
        x = flatten(x)
        for j, h in enumerate(self.hidden, start=1):
            x = nn.relu(dense(h, x, f"fc{j}", self.bias_init, glorot_normal))
        return dense(self.num_classes, x, "out", self.bias_init, glorot_normal)


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
                x = max_pool(x)
            else:
                i += 1
                x = conv3x3(int(spec), f"conv{i}", bias_init=self.bias_init,
                             in_features=x.shape[-1])(x)
                x = nn.relu(batch_norm(train, self.bn_init, f"bn{i}")(x))
        x = jnp.mean(x, axis=(1, 2))
        return dense(self.num_classes, x, "out", self.bias_init)


class ResBlock(nn.Module):
    """OpenLTH's CIFAR ResNet block: conv-BN-ReLU-conv-BN + shortcut, then ReLU.

    The shortcut is a 1x1 stride-`stride` conv + BN when the shape changes, else the identity.
    Convs have no bias. `inner` (0: `features`) is conv1/bn1's width, which compaction changes.
    """

    features: int
    stride: int = 1
    bn_init: str = "uniform"
    inner: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = conv3x3(self.inner or self.features, "conv1", stride=self.stride, use_bias=False)(x)
        y = nn.relu(batch_norm(train, self.bn_init, "bn1")(y))
        y = conv3x3(self.features, "conv2", use_bias=False)(y)
        y = batch_norm(train, self.bn_init, "bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides=(self.stride, self.stride),
                        padding="VALID", use_bias=False, kernel_init=kaiming_normal,
                        name="shortcut_conv")(x)
            x = batch_norm(train, self.bn_init, "shortcut_bn")(x)
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
        n = resnet_blocks(self.depth)
        widths = tuple(self.width * 2**s for s in range(3))
        return resnet_layers(x, train, widths, tuple(w for w in widths for _ in range(n)),
                             self.num_classes, self.bn_init, self.bias_init)


def resnet_blocks(depth: int) -> int:
    """Blocks per stage of ResNet-`depth` (depth = 6n + 2)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth={depth}: must be 6n + 2 with n >= 1 (20, 32, 56, ...)")
    return (depth - 2) // 6


def resnet_layers(x: jax.Array, train: bool, widths: Sequence[int], inner: Sequence[int],
                  num_classes: int, bn_init: str, bias_init: str) -> jax.Array:
    """The CIFAR ResNet inside an `nn.compact` method: stem of `widths[0]`, three stages of
    len(inner) // 3 blocks (stage s outputs `widths[s]`, block i's conv1 `inner[i]`, stride 2 and
    a projection shortcut at the start of stages 2 and 3), global average pool, Dense `out`.
    `ResNet` and the compacted `lottery.compact.SlimResNet` are this with their widths."""
    n = len(inner) // 3
    x = conv3x3(widths[0], "conv", use_bias=False)(x)
    x = nn.relu(batch_norm(train, bn_init, "bn")(x))
    for s in range(3):
        for b in range(n):
            stride = 2 if s > 0 and b == 0 else 1
            x = ResBlock(widths[s], stride, bn_init, inner[s * n + b],
                         name=f"stage{s + 1}_block{b}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return dense(num_classes, x, "out", bias_init)
