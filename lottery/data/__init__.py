"""Datasets as plain numpy arrays, read through TFDS data sources (TensorFlow is not needed).

`load(name)` returns a `Dataset` of float32 inputs, channels-last, normalized per channel with
the documented constants of `normalization(name)`, and int32 labels. Batching and shuffling are
left to the training engine.

Every dataset is read with `builder.as_data_source(...)` from ArrayRecord files in a data dir:
the `data_dir` argument, else the `LOTTERY_DATA_DIR` environment variable, else TFDS's default
(`TFDS_DATA_DIR` or ~/tensorflow_datasets).

* mnist, fashion_mnist, cifar10, cifar100: the TFDS datasets. They must already be prepared in
  the data dir in array_record format; nothing is downloaded unless `download=True`.
* mnist5k, mnist1d: offline datasets (builders in `lottery.data.mnist5k` and
  `lottery.data.mnist1d`), prepared into the data dir on first use, with no network.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "mnist5k", "mnist1d")
OFFLINE_DATASETS = ("mnist5k", "mnist1d")
ENV_VAR = "LOTTERY_DATA_DIR"

_READ_CHUNK = 8192  # records per bulk read; bounds the list of decoded dicts held at once


class Dataset(NamedTuple):
    """Train and test arrays: x float32 normalized, channels-last; y int32 class ids."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str


class DatasetNotFoundError(ValueError):
    """A real dataset is not prepared (in a readable format) in the data dir searched."""


class _Spec(NamedTuple):
    shape: tuple[int, ...]  # one example, channels-last
    num_classes: int
    key: str  # feature holding the input in a record
    scale: float  # stored value / scale is what mean and std describe
    mean: tuple[float, ...]  # per channel
    std: tuple[float, ...]


# Image statistics are those of the TRAINING split of pixel / 255, per channel: the commonly
# published values for MNIST, Fashion-MNIST and CIFAR (population std over all training
# pixels), and for mnist5k computed here from its 4,000 training digits. MNIST-1D comes
# standardized (mean 0, std 1 over all 5,000 signals) from `make_dataset`, so it is left as is.
_SPECS = {
    "mnist": _Spec((28, 28, 1), 10, "image", 255.0, (0.1307,), (0.3081,)),
    "fashion_mnist": _Spec((28, 28, 1), 10, "image", 255.0, (0.2860,), (0.3530,)),
    "cifar10": _Spec((32, 32, 3), 10, "image", 255.0,
                     (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": _Spec((32, 32, 3), 100, "image", 255.0,
                      (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist5k": _Spec((28, 28, 1), 10, "image", 255.0, (0.1315,), (0.3088,)),
    "mnist1d": _Spec((40, 1), 10, "x", 1.0, (0.0,), (1.0,)),
}


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    return _SPECS[name]


def input_shape(name: str) -> tuple[int, ...]:
    """Shape of one example of `name` after `load` (channels-last), without loading anything."""
    return _spec(name).shape


def num_classes(name: str) -> int:
    """Number of classes of `name`, without loading anything."""
    return _spec(name).num_classes


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel used by `load`: x = (stored / scale - mean) / std, where scale is
    255 for images (stored uint8 pixels) and 1 for mnist1d."""
    spec = _spec(name)
    return spec.mean, spec.std


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> str:
    """The data dir used: `data_dir`, else $LOTTERY_DATA_DIR, else TFDS's default."""
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR) or None
    if data_dir is None:
        from tensorflow_datasets.core import constants

        data_dir = constants.get_default_data_dir()
    return os.path.expanduser(os.fspath(data_dir))


def builder(name: str, *, data_dir: str | os.PathLike | None = None) -> Any:
    """The TFDS builder of `name` on the resolved data dir (nothing is prepared or read)."""
    _spec(name)
    root = resolve_data_dir(data_dir)
    if name == "mnist5k":
        from lottery.data.mnist5k import Mnist5k

        return Mnist5k(data_dir=root, file_format="array_record")
    if name == "mnist1d":
        from lottery.data.mnist1d import Mnist1d

        return Mnist1d(data_dir=root, file_format="array_record")
    import tensorflow_datasets as tfds

    return tfds.builder(name, data_dir=root)


def _how_to_prepare(name: str, root: str) -> str:
    return (
        "Nothing is downloaded at run time. To prepare it, on a machine with network access and "
        "TensorFlow (TFDS needs it to prepare the data, not to read it) run\n"
        f"  python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
        f"data_dir='{root}').download_and_prepare(file_format='array_record')\"\n"
        f"and copy {os.path.join(root, name)} here if that is another machine. Or pass data_dir= "
        f"(or set ${ENV_VAR}) to a dir where it is prepared, or download=True to let TFDS try."
    )


def _check_data_dir(root: str, name: str, *, writable: bool) -> None:
    """ValueError naming the data dir if it is not a directory, or if `name` is not there yet and
    must be prepared (`writable`) but the dir cannot be created or written. Checked before TFDS
    looks at it, so the error is one line."""
    where = f"(the data_dir argument, --config.data_dir or ${ENV_VAR})"
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"data dir {root!r} is not a directory {where}")
    if not writable or os.path.isdir(os.path.join(root, name)):
        return  # prepared (or being prepared) there: reading needs no write access
    probe = os.path.join(root, f".lottery_write_test_{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"data dir {root!r} cannot be created or written ({e.strerror}), and "
                         f"dataset {name!r} must be prepared there {where}") from None


def _download_and_prepare(b) -> None:
    import tensorflow_datasets as tfds

    config = tfds.download.DownloadConfig(try_download_gcs=False)
    try:
        b.download_and_prepare(file_format="array_record", download_config=config)
    except Exception:
        if not b.is_prepared():  # else another process prepared it at the same time
            raise


def prepare(name: str, *, data_dir: str | os.PathLike | None = None,
            download: bool = False) -> Any:
    """The builder of `name`, prepared in array_record format; returns it.

    Offline datasets are generated if missing. Real ones raise `DatasetNotFoundError` if missing,
    unless `download=True` (TFDS then downloads, which needs network and TensorFlow).
    """
    _spec(name)
    root = resolve_data_dir(data_dir)
    _check_data_dir(root, name, writable=name in OFFLINE_DATASETS or download)
    b = builder(name, data_dir=data_dir)
    if not b.is_prepared():
        if name in OFFLINE_DATASETS or download:
            try:
                _download_and_prepare(b)
            except OSError as e:
                raise ValueError(f"data dir {root!r}: cannot prepare dataset {name!r} there "
                                 f"({e.strerror or e}: {e.filename})") from None
        else:
            raise DatasetNotFoundError(
                f"Dataset {name!r} is not prepared in data dir {root!r} (no "
                f"{os.path.join(str(b.data_path), 'dataset_info.json')}).\n"
                + _how_to_prepare(name, root))
    from tensorflow_datasets.core import file_adapters

    formats = set(b.info.available_file_formats())
    if file_adapters.FileFormat.ARRAY_RECORD not in formats:
        found = ", ".join(sorted(f.value for f in formats)) or "none"
        raise DatasetNotFoundError(
            f"Dataset {name!r} in data dir {root!r} is prepared as {found}, but reading without "
            "TensorFlow needs array_record. Prepare it again into another data dir:\n"
            + _how_to_prepare(name, root))
    return b


def _read_split(b, split: str, spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    """All records of one split as (x float32 normalized, y int32), read in bulk."""
    source = b.as_data_source(split=split)
    n = len(source)
    stored = None
    y = np.empty((n,), np.int32)
    bulk = getattr(source, "__getitems__", None)  # TFDS sources; plain sequences lack it
    for start in range(0, n, _READ_CHUNK):
        keys = range(start, min(start + _READ_CHUNK, n))
        records = bulk(keys) if bulk is not None else [source[i] for i in keys]
        xs = np.stack([np.asarray(r[spec.key]) for r in records])
        if stored is None:
            stored = np.empty((n,) + xs.shape[1:], xs.dtype)
        stored[start:start + len(keys)] = xs
        y[start:start + len(keys)] = [int(r["label"]) for r in records]
    if stored is None:
        stored = np.empty((0,) + spec.shape, np.float32)
    x = stored.reshape((n,) + spec.shape).astype(np.float32)
    x /= np.float32(spec.scale)
    x -= np.asarray(spec.mean, np.float32)
    x /= np.asarray(spec.std, np.float32)
    return x, y


def load(name: str, *, data_dir: str | os.PathLike | None = None,
         download: bool = False) -> Dataset:
    """Train and test splits of `name` (one of `DATASETS`) as numpy arrays.

    x is float32 of shape (N,) + `input_shape(name)`, normalized with `normalization(name)`;
    y is int32 in [0, num_classes). See the module docstring for data dirs and downloads.
    """
    spec = _spec(name)
    b = prepare(name, data_dir=data_dir, download=download)
    x_train, y_train = _read_split(b, "train", spec)
    x_test, y_test = _read_split(b, "test", spec)
    return Dataset(x_train, y_train, x_test, y_test, spec.num_classes, name)
