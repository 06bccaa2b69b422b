"""Datasets as plain numpy arrays, read through TFDS data sources (TensorFlow is not needed).

`load(name)` returns a `Dataset` of float32 inputs, channels-last, normalized per channel with
`normalization(name)`, and int32 labels. Batching and shuffling are left to the training engine.
Datasets too large for memory (`input='stream'`, or 'auto' above `STREAM_ABOVE` bytes) come as
`stream.Column`s in place of the arrays, read by grain while training runs (`lottery.data.stream`).

Every dataset is read with `builder.as_data_source(...)` from ArrayRecord files in a data dir:
the `data_dir` argument, else the `LOTTERY_DATA_DIR` environment variable, else TFDS's default
(`TFDS_DATA_DIR` or ~/tensorflow_datasets).

* mnist, fashion_mnist, cifar10, cifar100: the TFDS datasets, normalized with the published
  constants of `normalization(name)`. They must already be prepared in the data dir in
  array_record format; nothing is downloaded unless `download=True` (or `lottery prepare NAME`).
* mnist5k, mnist1d: offline datasets (builders in `lottery.data.mnist5k` and
  `lottery.data.mnist1d`), prepared into the data dir on first use, with no network.
* Any other TFDS image-classification dataset by name ('imagenet2012', 'imagenette/320px',
  'cifar10:3.0.2', or one you prepared yourself into the data dir): input shape, number of
  classes and the image and label keys come from its `DatasetInfo` (one uint8 `Image` feature,
  one `ClassLabel`; the supervised keys decide if there are several); the splits are 'train' and
  'test', or 'validation' where there is no 'test'. Its per-channel mean and std (of pixel / 255)
  are computed once from the training split (every image, or `STATS_MAX_EXAMPLES` evenly spaced
  ones in larger sets) when it is prepared, and cached beside it in `STATS_FILE`.
* Your own: `register(name, source)` with a TFDS builder class (prepared on first use, like
  mnist5k) or a `Dataset` of arrays (used as given).

Image size: datasets whose images vary in size are brought to one shape by the eval transform of
`lottery.data.transforms` (resize the shorter side to size / 0.875, central size x size crop), with
size = `image_size` (default `DEFAULT_IMAGE_SIZE`, 224); `image_size` also resizes a fixed-size
dataset to another size the same way. The random train policy of that module
(`random_resized_crop_flip`) is for the training engine.

The package, by what each module holds (every public name is importable from `lottery.data`):
this `__init__` holds `load`, `info`, `input_shape`, `normalization`, `builder` and `prepare`;
`registry` the names, `Dataset` and `register`; `tfds_source` what a TFDS dataset's
`DatasetInfo` says (`Info`) and reading its records; `stats` its cached normalization statistics;
`download` the data dir and downloading; `mnist5k`, `mnist1d` the offline builders;
`transforms` resizing and augmenting images; `stream` reading records into what `load` returns,
and streaming them with grain; `cli` `lottery prepare`.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, NamedTuple

import numpy as np

from lottery.data.download import (ENV_VAR, DatasetNotFoundError, check_data_dir,
                                   download_and_prepare, download_tfds, how_to_prepare,
                                   resolve_data_dir)
from lottery.data.registry import (DATASETS, OFFLINE_DATASETS, Dataset, names, register,
                                   registered, unregister)
from lottery.data.stats import STATS_FILE, normalization_stats
from lottery.data.tfds_source import READ_CHUNK, Info, image_info, read_records, train_test_splits

DEFAULT_IMAGE_SIZE = 224  # images of varying size: eval-transformed to this size by default
STATS_MAX_EXAMPLES = 50_000  # training images the statistics are computed from, at most
INPUTS = ("auto", "memory", "stream")  # how `load` gives the splits: see `load`
STREAM_ABOVE = 4 * 2**30  # input='auto' streams datasets whose float32 arrays exceed this

__all__ = ["DATASETS", "DEFAULT_IMAGE_SIZE", "ENV_VAR", "INPUTS", "OFFLINE_DATASETS",
           "STATS_FILE", "STATS_MAX_EXAMPLES", "STREAM_ABOVE", "Dataset", "DatasetNotFoundError",
           "Info", "builder", "check", "info", "input_shape", "load", "names", "normalization",
           "num_classes", "prepare", "register", "resolve_data_dir", "unregister"]


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


def _unknown(name: str, root: str, hint: str = "") -> str:
    known = ", ".join(repr(n) for n in names())
    return (f"dataset={name!r}: expected one of {known} (built-in or registered names), or the "
            f"name of a TFDS image-classification dataset, registered with TFDS or prepared in "
            f"data dir {root!r}{hint}")


def info(name: str, *, data_dir: str | os.PathLike | None = None) -> Info:
    """Shape of one stored example, number of classes and the image and label keys of `name`,
    from the built-in table, the registered arrays, or the dataset's TFDS `DatasetInfo`; no
    records are read. One-line ValueError for an unknown name or a dataset lottery cannot load."""
    if name in _SPECS:
        spec = _SPECS[name]
        return Info(name, spec.shape, spec.num_classes, spec.key, "label")
    source = registered(name)
    if isinstance(source, Dataset):
        return Info(name, tuple(np.shape(source.x_train)[1:]), int(source.num_classes), "x", "y")
    return image_info(name, builder(name, data_dir=data_dir))


def check(name: str, *, data_dir: str | os.PathLike | None = None) -> None:
    """One-line ValueError unless `name` is a dataset `load` can read (or prepare): a built-in or
    registered name, or a TFDS image-classification dataset. Reads no records."""
    info(name, data_dir=data_dir)


def _size(inf: Info, image_size: int | None) -> int | None:
    """The side images are brought to, or None to keep the stored shape."""
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
                or image_size < 1:
            raise ValueError(f"image_size={image_size!r}: must be a positive int")
        if len(inf.shape) != 3:
            raise ValueError(f"image_size={image_size}: dataset {inf.name!r} does not hold "
                             f"images (example shape {inf.shape})")
        if inf.shape[:2] == (image_size, image_size):
            return None
        return int(image_size)
    return DEFAULT_IMAGE_SIZE if None in inf.shape else None


def input_shape(name: str, *, data_dir: str | os.PathLike | None = None,
                image_size: int | None = None) -> tuple[int, ...]:
    """Shape of one example of `name` after `load` (channels-last), without loading anything:
    the stored shape, or (size, size, channels) for images of varying size or an `image_size`."""
    inf = info(name, data_dir=data_dir)
    size = _size(inf, image_size)
    if isinstance(registered(name), Dataset) and size is not None:
        raise ValueError(f"image_size={image_size}: dataset {name!r} is registered as arrays, "
                         f"which are used as given")
    return inf.shape if size is None else (size, size, inf.shape[-1])


def num_classes(name: str, *, data_dir: str | os.PathLike | None = None) -> int:
    """Number of classes of `name`, without loading anything."""
    return info(name, data_dir=data_dir).num_classes


def normalization(name: str, *, data_dir: str | os.PathLike | None = None
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel used by `load`: x = (stored / scale - mean) / std, where scale is
    255 for images (stored uint8 pixels) and 1 for mnist1d. Built-in datasets have published
    constants; other TFDS datasets the statistics of their training split, computed when they are
    prepared and cached in `STATS_FILE` (the dataset must be prepared); registered arrays the
    identity."""
    if name in _SPECS:
        return _SPECS[name].mean, _SPECS[name].std
    inf = info(name, data_dir=data_dir)
    if isinstance(registered(name), Dataset):
        c = inf.shape[-1] if len(inf.shape) > 1 else 1
        return (0.0,) * c, (1.0,) * c
    return normalization_stats(prepare(name, data_dir=data_dir), inf, STATS_MAX_EXAMPLES)


def builder(name: str, *, data_dir: str | os.PathLike | None = None) -> Any:
    """The TFDS builder of `name` on the resolved data dir (nothing is prepared or read)."""
    root = resolve_data_dir(data_dir)
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"data dir {root!r} is not a directory (the data_dir argument, "
                         f"--config.data_dir or ${ENV_VAR})")
    if name == "mnist5k":
        from lottery.data.mnist5k import Mnist5k

        return Mnist5k(data_dir=root, file_format="array_record")
    if name == "mnist1d":
        from lottery.data.mnist1d import Mnist1d

        return Mnist1d(data_dir=root, file_format="array_record")
    source = registered(name)
    if isinstance(source, Dataset):
        raise ValueError(f"dataset {name!r} is registered as arrays: it has no TFDS builder")
    if source is not None:
        return source(data_dir=root, file_format="array_record")
    import tensorflow_datasets as tfds

    if not isinstance(name, str) or not name:
        raise ValueError(_unknown(name, root))
    try:
        return tfds.builder(name, data_dir=root)
    except tfds.core.registered.DatasetNotFoundError as e:
        hint = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("Did you mean")]
        raise ValueError(_unknown(name, root, f" (TFDS: {hint[0]})" if hint else "")) from None
    except ValueError:  # TFDS cannot parse the name
        raise ValueError(_unknown(name, root)) from None


def prepare(name: str, *, data_dir: str | os.PathLike | None = None,
            download: bool = False, manual_dir: str | os.PathLike | None = None) -> Any:
    """The builder of `name`, prepared in array_record format; returns it (None for registered
    arrays, which need no preparing).

    Offline datasets (mnist5k, mnist1d, registered builder classes) are generated if missing.
    TFDS datasets raise `DatasetNotFoundError` (one line, saying how to prepare them) if missing,
    unless `download=True`: TFDS then downloads where the network allows, using files placed by
    hand in `manual_dir` (default DATA_DIR/downloads/manual) first; where it cannot, the error
    says what to do. For TFDS datasets other than the built-in four, the normalization statistics
    are computed and cached (`STATS_FILE`) once prepared.
    """
    inf = info(name, data_dir=data_dir)
    if isinstance(registered(name), Dataset):
        return None
    root = resolve_data_dir(data_dir)
    mine = registered(name)
    offline = name in OFFLINE_DATASETS or mine is not None
    folder = getattr(mine, "name", name) if mine is not None else re.split("[:/]", name)[0]
    check_data_dir(root, folder, writable=offline or download)
    b = builder(name, data_dir=data_dir)
    if not b.is_prepared():
        if offline:
            try:
                download_and_prepare(b)
            except OSError as e:
                raise ValueError(f"data dir {root!r}: cannot prepare dataset {name!r} there "
                                 f"({e.strerror or e}: {e.filename})") from None
        elif download:
            download_tfds(b, name, root, os.fspath(manual_dir) if manual_dir else None)
        else:
            raise DatasetNotFoundError(
                f"dataset {name!r} is not prepared in data dir {root!r} (no "
                f"{os.path.join(str(b.data_path), 'dataset_info.json')}): "
                + how_to_prepare(name, root))
    from tensorflow_datasets.core import file_adapters

    formats = set(b.info.available_file_formats())
    if file_adapters.FileFormat.ARRAY_RECORD not in formats:
        found = ", ".join(sorted(f.value for f in formats)) or "none"
        raise DatasetNotFoundError(
            f"dataset {name!r} in data dir {root!r} is prepared as {found}, but reading without "
            f"TensorFlow needs array_record; prepare it again into another data dir: "
            + how_to_prepare(name, root))
    if name not in _SPECS:
        normalization_stats(b, inf, STATS_MAX_EXAMPLES)
    return b


def _check_memory(name: str, counts: list[int], shape: tuple[int, ...]) -> None:
    """ValueError if the float32 arrays of the splits would not fit in this machine's memory."""
    need = sum(counts) * math.prod(shape) * 5  # float32 arrays + the uint8 pixels read first
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        raise ValueError(f"dataset {name!r}: {sum(counts):,} examples of shape {shape} need "
                         f"{need / 2**30:.1f} GiB in memory, more than this machine's "
                         f"{have / 2**30:.1f} GiB; stream it (input='stream') or load a "
                         f"smaller image_size")


def _read(reader) -> tuple[np.ndarray, np.ndarray]:
    """All records of a `stream.Reader`'s split as (x float32 normalized, y int32), read in
    bulk chunks; the inputs are held as stored (uint8 pixels) until the end."""
    n = len(reader)
    stored = None
    y = np.empty((n,), np.int32)
    for start in range(0, n, READ_CHUNK):
        keys = range(start, min(start + READ_CHUNK, n))
        records = read_records(reader.source(), keys)
        xs = reader.decode(records)
        if stored is None:
            stored = np.empty((n,) + xs.shape[1:], xs.dtype)
        stored[start:start + len(keys)] = xs
        y[start:start + len(keys)] = reader.labels(records)
    if stored is None:
        return np.empty((0,) + reader.shape, np.float32), y
    return reader.normalize(stored, (n,)), y


def load(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
         image_size: int | None = None, input: str = "auto",
         workers: int | None = None) -> Dataset:
    """Train and test splits of `name`: a built-in name (`DATASETS`), a name given to
    `register`, or a TFDS image-classification dataset (see the module docstring).

    x is float32 of shape (N,) + `input_shape(name, image_size=...)`, normalized with
    `normalization(name)`; y is int32 in [0, num_classes). Images of varying size, and every
    image when `image_size` differs from the stored size, are eval-transformed (resize + central
    crop) to `image_size` (default `DEFAULT_IMAGE_SIZE` for varying sizes). `download=True` lets
    TFDS download and prepare a missing dataset, as `lottery prepare NAME` does.

    `input` (`INPUTS`): 'memory' reads every split into numpy arrays; 'stream' returns
    `lottery.data.stream.Column`s in their place, read while training runs (by grain, in
    `workers` processes, default `stream.WORKERS`); 'auto' streams when the float32 arrays
    would take more than `STREAM_ABOVE` bytes. Registered arrays are always in memory.
    """
    if input not in INPUTS:
        raise ValueError(f"input={input!r}: expected one of {', '.join(INPUTS)}")
    inf = info(name, data_dir=data_dir)
    source = registered(name)
    if isinstance(source, Dataset):
        if input == "stream":
            raise ValueError(f"input='stream': dataset {name!r} is registered as arrays, "
                             f"which are held in memory")
        input_shape(name, image_size=image_size)  # rejects a resize of registered arrays
        return source._replace(name=name)
    from lottery.data import stream  # noqa: PLC0415

    size = _size(inf, image_size)
    shape = inf.shape if size is None else (size, size, inf.shape[-1])
    b = prepare(name, data_dir=data_dir, download=download)
    if name in _SPECS:
        spec = _SPECS[name]
        splits, scale, mean, std = ("train", "test"), spec.scale, spec.mean, spec.std
    else:
        splits, scale = train_test_splits(b, name), 255.0
        mean, std = normalization_stats(b, inf, STATS_MAX_EXAMPLES)
    images = len(shape) == 3 and name not in _SPECS  # built-ins are stored as loaded
    train, test = (stream.Reader(b, s, inf, shape, size, scale, mean, std, images)
                   for s in splits)
    counts = [len(train), len(test)]
    if input == "stream" or (input == "auto" and
                             sum(counts) * math.prod(shape) * 4 > STREAM_ABOVE):
        return stream.dataset(train, test, inf.num_classes, name, workers)
    _check_memory(name, counts, shape)
    x_train, y_train = _read(train)
    x_test, y_test = _read(test)
    return Dataset(x_train, y_train, x_test, y_test, inf.num_classes, name)
