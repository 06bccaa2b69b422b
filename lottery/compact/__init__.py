"""Structured compaction: a physically smaller flax model computing what a masked one computes.

A *unit* is an output neuron of a Dense layer or an output channel of a Conv. The masked network
does not need a unit when
  * every weight reading it is zero (no outputs): it is dropped;
  * every weight feeding it is zero (no inputs): it then outputs a constant, relu of its bias
    (through its batch norm's running averages when it has one). The constant is folded into the
    bias of the Dense layer that reads it (max pools, the flatten and the mean pool keep a
    constant constant) and the unit is dropped. A zero-padded conv sees a constant channel
    differently at the border, so a unit with a non-zero constant that a conv reads is kept.
Dropping a unit drops the matching inputs of the layers reading it (for conv -> flatten -> dense,
rows (h * W + w) * C + c of the dense kernel for channel c), which can free more units: this
repeats until nothing changes. Output classes and input features are never removed.

Supported (the registry's sequential models): LeNet300100, ConvNet (Conv-2/4/6), VGG (batch norm
sliced with its conv), MLP1D (its residual h + relu(fc2(h)) ties unit j of fc1 and fc2: they go
together or not at all) and CNN1D. MLP1D and CNN1D have one width for several layers, so they get
the widest layer's kept count; narrower layers are padded with zero units, which compute exactly 0.
A layer left with no unit keeps one zero unit. Compaction is for inference: batch norm is
evaluated with its running averages (train=False).

ResNet goes through `lottery.groups`: its channels are the coupled groups derived from the traced
model (the stem and every block output of a stage are one group, through the residual adds; each
block's inner conv1/bn1 channels another). A channel of a group is removed when nothing reads it
(every reader's input rows zero), which is what `lottery.groups.expand` makes of a removed channel;
then every member goes (producer filters, batch norm scale, bias, mean and var, readers' rows).
No constant is folded here: a ResNet mask that zeroes a conv's filters but not the rows that read
them leaves its batch norm's constant beta - mean * gamma / sqrt(var + eps) in use, and that
channel stays. A group left with nothing read keeps one channel (its readers' rows are zero). The
result is a `SlimResNet`: ResNet's layers and names with a width per stage and per block.

The package, by what each module holds (every name is importable from `lottery.compact`): this
`__init__` holds `compact`, which masks and dispatches; `units` the cascade of the sequential
models and `Compacted`, `summary`; `resnet` `SlimResNet` and the compaction through groups.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from lottery import masks, models
from lottery.compact.resnet import MODULES, SlimResNet, compact_resnet
from lottery.compact.units import (BN_EPSILON, BN_MOMENTUM, SUPPORTED, Compacted, compact_units,
                                   summary)

__all__ = ["BN_EPSILON", "BN_MOMENTUM", "MODULES", "SUPPORTED", "Compacted", "SlimResNet",
           "compact", "summary"]

PyTree = Any


def compact(model: nn.Module, variables: dict, mask: PyTree | None = None) -> Compacted:
    """The smaller model of the same class (a `SlimResNet` for a ResNet), with the units the
    masked network does not need removed.

    `variables` are the model's ('params' and, for VGG and ResNet, 'batch_stats'); `mask` a bool
    pytree like the params (None: exact zeros in the params are the pruned weights). The compacted
    model's outputs equal `model.apply(masked variables, x, train=False)` up to float rounding.
    Raises ValueError if nothing can be removed, or for a model or layer it does not support.
    """
    if not hasattr(variables, "keys") or "params" not in variables:
        raise ValueError("variables must be the model's variable dict with a 'params' entry "
                         "(as returned by model.init)")
    params = variables["params"]
    if mask is not None:
        masks.check(mask, params)
        params = jax.tree.map(lambda p, m: np.where(np.asarray(m, bool), np.asarray(p), 0)
                              .astype(np.asarray(p).dtype), params, mask)
    if isinstance(model, (models.ResNet, SlimResNet)):
        return compact_resnet(model, variables, params)
    return compact_units(model, variables, params)
