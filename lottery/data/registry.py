"""Datasets by name: the built-in names (`DATASETS`, the `OFFLINE_DATASETS` among them), the
`Dataset` arrays `lottery.data.load` returns, and your own, given to `register` as a TFDS builder
class or as a `Dataset` of arrays (`registered` looks one up).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import numpy as np

DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "mnist5k", "mnist1d")
OFFLINE_DATASETS = ("mnist5k", "mnist1d")


class Dataset(NamedTuple):
    """Train and test arrays: x float32 normalized, channels-last; y int32 class ids."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str


# Datasets registered at run time by `register`: name -> a TFDS builder class, or a Dataset.
_USER: dict[str, Any] = {}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def names() -> list[str]:
    """The dataset names known without TFDS: the built-in ones, then those given to `register`."""
    return [*DATASETS, *_USER]


def register(name: str, source: Any, *, overwrite: bool = False) -> None:
    """Register a dataset under `name`, for `load`, `input_shape`, ... and a config's `dataset`
    field in this process.

    `source` is a TFDS builder class (a `tfds.core.GeneratorBasedBuilder` subclass with an `Image`
    and a `ClassLabel` feature, 'train' and 'test' or 'validation' splits), which is prepared in
    the data dir on first use as the offline datasets are, or a `Dataset` of arrays, which `load`
    returns as given (normalize them yourself; `normalization` reports the identity). Names are
    letters, digits, '_' and '-', starting with a letter; a built-in name cannot be replaced, and
    a registered one only with `overwrite=True`.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"dataset name {name!r}: expected letters, digits, '_' or '-', "
                         f"starting with a letter")
    if name in DATASETS:
        raise ValueError(f"dataset name {name!r} is a built-in dataset; choose another name")
    if name in _USER and not overwrite:
        raise ValueError(f"dataset name {name!r} is already registered; pass overwrite=True to "
                         f"replace it")
    if isinstance(source, Dataset):
        check_arrays(name, source)
    else:
        import tensorflow_datasets as tfds  # noqa: PLC0415 - TFDS only where needed

        if not (isinstance(source, type) and issubclass(source, tfds.core.DatasetBuilder)):
            raise ValueError(f"dataset {name!r}: expected a TFDS builder class or a "
                             f"lottery.data.Dataset, got {type(source).__name__}")
    _USER[name] = source


def unregister(name: str) -> None:
    """Remove a dataset given to `register` (KeyError if there is none of that name)."""
    del _USER[name]


def registered(name: str) -> Any:
    """What `name` was registered as (a TFDS builder class or a `Dataset`), or None."""
    return _USER.get(name)


def check_arrays(name: str, ds: Dataset) -> None:
    x, y, xt, yt = (np.asarray(a) for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
    if x.ndim < 2 or x.shape[1:] != xt.shape[1:] or len(x) != len(y) or len(xt) != len(yt):
        raise ValueError(f"dataset {name!r}: x_train {x.shape} / y_train {y.shape} and x_test "
                         f"{xt.shape} / y_test {yt.shape} do not fit (N examples, same shape)")
    k = int(ds.num_classes)
    for a in (y, yt):
        if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= k):
            raise ValueError(f"dataset {name!r}: labels must be integers in [0, {k})")
