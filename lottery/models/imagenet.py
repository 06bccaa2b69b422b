"""ImageNet-style ResNets in torchvision's layout: ResNet-18 (`BasicBlock`) and ResNet-50
(`Bottleneck`, v1.5: the stride in the 3x3 conv).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from lottery.models.layers import batch_norm, bias_initializer, torch_default_kernel


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
    return batch_norm(train, "ones", "shortcut_bn")(x)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut, then ReLU."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = _conv_nobias(self.features, 3, self.stride, "conv1")(x)
        y = nn.relu(batch_norm(train, "ones", "bn1")(y))
        y = _conv_nobias(self.features, 3, 1, "conv2")(y)
        y = batch_norm(train, "ones", "bn2")(y)
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
        y = nn.relu(batch_norm(train, "ones", "bn1")(y))
        y = _conv_nobias(self.features, 3, self.stride, "conv2")(y)
        y = nn.relu(batch_norm(train, "ones", "bn2")(y))
        y = _conv_nobias(out, 1, 1, "conv3")(y)
        y = batch_norm(train, "ones", "bn3")(y)
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
        x = nn.relu(batch_norm(train, "ones", "bn")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block = Bottleneck if self.bottleneck else BasicBlock
        for s, n in enumerate(self.stage_sizes):
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                x = block(self.width * 2**s, stride, name=f"stage{s + 1}_block{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=torch_default_kernel,
                        bias_init=bias_initializer(self.bias_init, x.shape[-1]), name="out")(x)

