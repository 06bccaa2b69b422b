"""The layers and initializers the model families share: PyTorch's and TensorFlow's kernel and bias
inits (`kaiming_normal`, `glorot_normal`, `torch_default_kernel`, `torch_default_bias`; a model's
`bias_init` kind in `BIAS_INITS`, its `bn_init` in `BN_SCALE_INITS`), and the Dense, BatchNorm,
3x3 conv, flatten and 2x2 max-pool layers built from them.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn


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


def bias_initializer(kind: str, fan_in: int) -> Callable:
    if kind not in BIAS_INITS:
        raise ValueError(f"bias_init={kind!r}: must be one of {list(BIAS_INITS)}")
    return torch_default_bias(fan_in) if kind == "torch" else zeros


def dense(features: int, x: jax.Array, name: str, bias_init: str,
           kernel_init: Callable = None) -> jax.Array:
    """Dense layer applied to `x`, bias init by kind with fan_in = x's last dimension."""
    return nn.Dense(features, kernel_init=kernel_init or kaiming_normal,
                    bias_init=bias_initializer(bias_init, x.shape[-1]), name=name)(x)


BN_SCALE_INITS = {
    "uniform": nn.initializers.uniform(1.0),  # OpenLTH's default batchnorm_init: gamma ~ U[0, 1)
    "ones": nn.initializers.ones,  # the usual PyTorch / flax default
}


BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1
BN_EPSILON = 1e-5


def batch_norm(train: bool, bn_init: str, name: str) -> nn.BatchNorm:
    if bn_init not in BN_SCALE_INITS:
        raise ValueError(f"bn_init={bn_init!r}: must be one of {sorted(BN_SCALE_INITS)}")
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        scale_init=BN_SCALE_INITS[bn_init], name=name)


def conv3x3(features: int, name: str, stride: int = 1, use_bias: bool = True,
             kernel_init: Callable = kaiming_normal, bias_init: str = "zeros",
             in_features: int = 1) -> nn.Conv:
    """3x3 conv, PyTorch's symmetric padding 1 (flax 'SAME' pads stride-2 convs asymmetrically)."""
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                   use_bias=use_bias, kernel_init=kernel_init,
                   bias_init=bias_initializer(bias_init, 9 * in_features), name=name)


def flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def max_pool(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (2, 2), strides=(2, 2))
