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

Prunable by default (`lottery.masks.default_prunable`: leaves named `kernel` with ndim >= 2):
every Dense and conv kernel, including `out/kernel` (configs exclude it by default), the ViT's
`patch_embed/kernel` and its attention kernels `attn/{query,key,value}/kernel` (dim, heads,
head_dim) and `attn/out/kernel` (heads, head_dim, dim); not biases, BN and LayerNorm parameters,
nor the ViT's `cls` (1, 1, dim), `pos_embedding` (1, tokens, dim) and attention biases (heads,
head_dim), although they have ndim >= 2. A config's `include` prunes other leaves.

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

The package, by what each module holds (every name is importable from `lottery.models`): this
`__init__` holds the registry (`MODELS`, `INPUT_SHAPES`, `register`, `resolve`, `create`,
`check`, `init`, `inference_fn`); `layers` the shared initializers and layers; `lth`
LeNet-300-100, Conv-2/4/6, VGG and the CIFAR ResNets; `imagenet` ResNet-18/50; `vit` the ViT;
`mnist1d` the MNIST-1D MLP and CNN.
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

from lottery.models.imagenet import (BasicBlock, Bottleneck, ImageNetResNet,
                                     kaiming_normal_fan_out)
from lottery.models.layers import (BIAS_INITS, BN_SCALE_INITS, glorot_normal, kaiming_normal,
                                   torch_default_bias, torch_default_kernel, zeros)
from lottery.models.lth import CONV_PLANS, VGG_PLANS, VGG, ConvNet, LeNet300100, ResBlock, ResNet
from lottery.models.mnist1d import CNN1D, MLP1D
from lottery.models.vit import VIT_POOLS, ViT, ViTBlock, vit_normal

__all__ = ["BIAS_INITS", "BN_SCALE_INITS", "CONV_PLANS", "INPUT_SHAPES", "MODELS", "VGG_PLANS",
           "VIT_POOLS", "BasicBlock", "Bottleneck", "CNN1D", "ConvNet", "ImageNetResNet",
           "LeNet300100", "MLP1D", "ResBlock", "ResNet", "VGG", "ViT", "ViTBlock", "check",
           "create", "flat_param_count", "glorot_normal", "inference_fn", "init",
           "is_import_path", "kaiming_normal", "kaiming_normal_fan_out", "names", "register",
           "resolve", "torch_default_bias", "torch_default_kernel", "unregister", "vit_normal",
           "zeros"]

PyTree = Any


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
