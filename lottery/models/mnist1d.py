"""The MNIST-1D models (Greydanus 2020): an MLP and a CNN, PyTorch's default layer init by default.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import linen as nn

from lottery.models.layers import (flatten, kaiming_normal, torch_default_bias,
                                   torch_default_kernel, zeros)


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
        x = flatten(x)
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
        x = flatten(x)
        return _torch_dense(self.num_classes, x.shape[-1], "out", self.torch_init)(x)
