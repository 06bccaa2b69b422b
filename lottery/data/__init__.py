"""Datasets as plain numpy arrays, read through TFDS data sources (TensorFlow is not needed).

`load(name)` returns a `Dataset` of float32 inputs, channels-last, normalized per channel with
`normalization(name)`, and int32 labels. Batching and shuffling are left to the training engine.

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
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import urllib.parse
import warnings
from typing import Any, NamedTuple

import numpy as np

DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "mnist5k", "mnist1d")
OFFLINE_DATASETS = ("mnist5k", "mnist1d")
ENV_VAR = "LOTTERY_DATA_DIR"
DEFAULT_IMAGE_SIZE = 224  # images of varying size: eval-transformed to this size by default
STATS_FILE = "lottery_normalization.json"  # beside a prepared dataset's dataset_info.json
STATS_MAX_EXAMPLES = 50_000  # training images the statistics are computed from, at most

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


class Info(NamedTuple):
    """What a dataset holds, known without reading its records."""

    name: str
    shape: tuple  # one stored example, channels-last; None where image sizes vary
    num_classes: int
    image_key: str  # feature holding the input in a record
    label_key: str  # feature holding the class id


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
        _check_arrays(name, source)
    else:
        import tensorflow_datasets as tfds  # noqa: PLC0415 - TFDS only where needed

        if not (isinstance(source, type) and issubclass(source, tfds.core.DatasetBuilder)):
            raise ValueError(f"dataset {name!r}: expected a TFDS builder class or a "
                             f"lottery.data.Dataset, got {type(source).__name__}")
    _USER[name] = source


def unregister(name: str) -> None:
    """Remove a dataset given to `register` (KeyError if there is none of that name)."""
    del _USER[name]


def _check_arrays(name: str, ds: Dataset) -> None:
    x, y, xt, yt = (np.asarray(a) for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
    if x.ndim < 2 or x.shape[1:] != xt.shape[1:] or len(x) != len(y) or len(xt) != len(yt):
        raise ValueError(f"dataset {name!r}: x_train {x.shape} / y_train {y.shape} and x_test "
                         f"{xt.shape} / y_test {yt.shape} do not fit (N examples, same shape)")
    k = int(ds.num_classes)
    for a in (y, yt):
        if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= k):
            raise ValueError(f"dataset {name!r}: labels must be integers in [0, {k})")


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
    source = _USER.get(name)
    if isinstance(source, Dataset):
        return Info(name, tuple(np.shape(source.x_train)[1:]), int(source.num_classes), "x", "y")
    return _image_info(name, builder(name, data_dir=data_dir))


def check(name: str, *, data_dir: str | os.PathLike | None = None) -> None:
    """One-line ValueError unless `name` is a dataset `load` can read (or prepare): a built-in or
    registered name, or a TFDS image-classification dataset. Reads no records."""
    info(name, data_dir=data_dir)


def _image_info(name: str, b) -> Info:
    """Info from a TFDS builder: one uint8 Image and one ClassLabel feature (supervised keys
    first where there are several)."""
    from tensorflow_datasets.core import features as tfds_features  # noqa: PLC0415

    feats = b.info.features
    items = dict(feats.items()) if hasattr(feats, "items") else {}
    what = ", ".join(f"{k}: {type(f).__name__}" for k, f in items.items()) or repr(feats)
    sk = b.info.supervised_keys
    sk = sk if isinstance(sk, (tuple, list)) and len(sk) >= 2 else (None, None)

    def pick(kind, pos):
        keys = [k for k, f in items.items() if isinstance(f, kind)]
        if sk[pos] in keys:
            return sk[pos]
        if len(keys) == 1:
            return keys[0]
        raise ValueError(f"dataset {name!r} is not an image-classification dataset lottery can "
                         f"load: it needs one {kind.__name__} feature (or supervised keys naming "
                         f"one), it has {what}")

    image_key = pick(tfds_features.Image, 0)
    label_key = pick(tfds_features.ClassLabel, 1)
    image = items[image_key]
    shape = tuple(None if d is None else int(d) for d in image.shape)
    dtype = np.dtype(getattr(image, "np_dtype", np.uint8))
    if dtype != np.uint8 or len(shape) != 3 or shape[-1] not in (1, 3, 4):
        raise ValueError(f"dataset {name!r}: image feature {image_key!r} is {dtype} of shape "
                         f"{shape}; lottery loads uint8 (H, W, 1 or 3 or 4) images")
    if shape[-1] == 4:  # alpha dropped on reading
        shape = (*shape[:2], 3)
    classes = items[label_key].num_classes
    if not classes:
        raise ValueError(f"dataset {name!r}: label feature {label_key!r} has no number of classes")
    return Info(name, shape, int(classes), image_key, label_key)


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
    if isinstance(_USER.get(name), Dataset) and size is not None:
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
    if isinstance(_USER.get(name), Dataset):
        c = inf.shape[-1] if len(inf.shape) > 1 else 1
        return (0.0,) * c, (1.0,) * c
    return _stats(prepare(name, data_dir=data_dir), inf)


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
    source = _USER.get(name)
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


def _how_to_prepare(name: str, root: str) -> str:
    return (f"run `lottery prepare {name} --data-dir {root}` where the network allows (most TFDS "
            f"builders need TensorFlow to prepare, not to read), or elsewhere python -c \"import "
            f"tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{root}')"
            f".download_and_prepare(file_format='array_record')\" and copy "
            f"{os.path.join(root, name)} here; or pass data_dir= (or set ${ENV_VAR}) to a dir "
            f"where it is prepared, or download=True")


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


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _missing_tensorflow(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, ImportError) and (getattr(e, "name", None) or "").split(".")[0] \
                == "tensorflow" or "No module named 'tensorflow'" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _urls(b) -> list[str]:
    try:
        return sorted((b.url_infos or {}).keys())
    except Exception:  # no checksums file: the URLs are only known to the builder's code
        return []


def _reachable(hosts: list[str], timeout: float = 3.0) -> bool:
    """Whether a TCP connection to any of `hosts` ('name' or 'name:port') can be opened."""
    for host in hosts:
        name, _, port = host.partition(":")
        try:
            socket.create_connection((name, int(port or 443)), timeout=timeout).close()
            return True
        except (OSError, ValueError):
            continue
    return False


def _download(b, name: str, root: str, manual_dir: str | None) -> None:
    """download_and_prepare a TFDS catalog dataset, or a one-line ValueError saying what to do
    where that cannot work: files to place by hand, no network, no TensorFlow."""
    import tensorflow_datasets as tfds

    manual = os.path.expanduser(manual_dir) if manual_dir else os.path.join(root, "downloads",
                                                                             "manual")
    has_files = os.path.isdir(manual) and bool(os.listdir(manual))
    again = f"run `lottery prepare {name} --data-dir {root}"
    again += f" --manual-dir {manual}`" if manual_dir else "`"
    instructions = getattr(b, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if instructions and not has_files:
        what = " ".join(str(instructions).split())
        raise DatasetNotFoundError(
            f"dataset {name!r} must be downloaded by hand: put the files TFDS asks for ({what}) "
            f"in {manual!r} (TFDS's manual_dir) and {again} again")
    urls = _urls(b)
    wanted = [os.path.basename(urllib.parse.urlsplit(u).path) for u in urls]
    if not instructions and not any(os.path.exists(os.path.join(manual, f)) for f in wanted):
        hosts = [urllib.parse.urlsplit(u).netloc for u in urls]
        homepage = urllib.parse.urlsplit(getattr(b.info, "homepage", "") or "").netloc
        hosts = list(dict.fromkeys(hosts or ([homepage] if homepage else [])))[:3]
        if hosts and not _reachable(hosts):
            listed = ", ".join(urls[:2]) + (f" (+{len(urls) - 2} more in TFDS's checksums for "
                                            f"{name})" if len(urls) > 2 else "")
            files = f"download {listed}" if urls else "download its files"
            raise DatasetNotFoundError(
                f"cannot download dataset {name!r}: {hosts[0]} is unreachable from here (no "
                f"network?); either {files} by hand into {manual!r} (TFDS's manual_dir; keep the "
                f"file names) and {again} again, or run it on a machine with network and copy "
                f"the prepared {os.path.join('DATA_DIR', b.name)} into {root!r}")
    config = tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=manual)
    try:
        b.download_and_prepare(file_format="array_record", download_config=config)
    except Exception as e:
        if b.is_prepared():  # another process prepared it at the same time
            return
        if _missing_tensorflow(e):
            raise DatasetNotFoundError(
                f"preparing dataset {name!r} needs TensorFlow (TFDS's builder uses it to write "
                f"the records; reading them does not): pip install tensorflow and {again} again, "
                f"or prepare it on another machine and copy it into {root!r}") from None
        raise ValueError(f"cannot prepare dataset {name!r} in data dir {root!r}: "
                         f"{type(e).__name__}: {_first_line(e)}") from None


def _download_and_prepare(b) -> None:
    import tensorflow_datasets as tfds

    config = tfds.download.DownloadConfig(try_download_gcs=False)
    try:
        b.download_and_prepare(file_format="array_record", download_config=config)
    except Exception:
        if not b.is_prepared():  # else another process prepared it at the same time
            raise


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
    if isinstance(_USER.get(name), Dataset):
        return None
    root = resolve_data_dir(data_dir)
    offline = name in OFFLINE_DATASETS or name in _USER
    folder = getattr(_USER[name], "name", name) if name in _USER else re.split("[:/]", name)[0]
    _check_data_dir(root, folder, writable=offline or download)
    b = builder(name, data_dir=data_dir)
    if not b.is_prepared():
        if offline:
            try:
                _download_and_prepare(b)
            except OSError as e:
                raise ValueError(f"data dir {root!r}: cannot prepare dataset {name!r} there "
                                 f"({e.strerror or e}: {e.filename})") from None
        elif download:
            _download(b, name, root, os.fspath(manual_dir) if manual_dir else None)
        else:
            raise DatasetNotFoundError(
                f"dataset {name!r} is not prepared in data dir {root!r} (no "
                f"{os.path.join(str(b.data_path), 'dataset_info.json')}): "
                + _how_to_prepare(name, root))
    from tensorflow_datasets.core import file_adapters

    formats = set(b.info.available_file_formats())
    if file_adapters.FileFormat.ARRAY_RECORD not in formats:
        found = ", ".join(sorted(f.value for f in formats)) or "none"
        raise DatasetNotFoundError(
            f"dataset {name!r} in data dir {root!r} is prepared as {found}, but reading without "
            f"TensorFlow needs array_record; prepare it again into another data dir: "
            + _how_to_prepare(name, root))
    if name not in _SPECS:
        _stats(b, inf)
    return b


def _splits(b, name: str) -> tuple[str, str]:
    """('train', 'test'), or ('train', 'validation') where there is no 'test' split."""
    have = list(b.info.splits)
    test = "test" if "test" in have else "validation" if "validation" in have else None
    if "train" not in have or test is None:
        raise ValueError(f"dataset {name!r} has splits {have}; lottery needs 'train' and 'test' "
                         f"(or 'validation')")
    return "train", test


def _records(source, keys):
    bulk = getattr(source, "__getitems__", None)  # TFDS sources; plain sequences lack it
    return bulk(keys) if bulk is not None else [source[i] for i in keys]


def _stats(b, inf: Info) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of pixel / 255 over the training split, read from `STATS_FILE`
    beside the prepared dataset, or computed (exact integer sums over every pixel of every image,
    or of `STATS_MAX_EXAMPLES` evenly spaced images) and written there."""
    path = b.data_path / STATS_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        return tuple(saved["mean"]), tuple(saved["std"])
    from lottery.data import transforms  # noqa: PLC0415

    split, _ = _splits(b, inf.name)
    source = b.as_data_source(split=split)
    n = len(source)
    idx = np.arange(n) if n <= STATS_MAX_EXAMPLES else np.unique(
        np.linspace(0, n - 1, STATS_MAX_EXAMPLES).round().astype(np.int64))
    channels = inf.shape[-1]
    total = np.zeros(channels, np.int64)
    squares = np.zeros(channels, np.int64)
    pixels = 0
    from tqdm.auto import tqdm  # noqa: PLC0415

    with tqdm(total=len(idx), desc=f"normalization statistics of {inf.name}", unit="image",
              disable=len(idx) < 20_000, leave=False) as bar:
        for start in range(0, len(idx), _READ_CHUNK // 8):
            keys = [int(i) for i in idx[start:start + _READ_CHUNK // 8]]
            for r in _records(source, keys):
                v = transforms.as_channels(np.asarray(r[inf.image_key]), channels)
                v = v.reshape(-1, channels).astype(np.int64)
                total += v.sum(axis=0)
                squares += np.einsum("pc,pc->c", v, v)
                pixels += v.shape[0]
            bar.update(len(keys))
    if pixels == 0:
        raise ValueError(f"dataset {inf.name!r}: the {split!r} split has no pixels to compute "
                         f"normalization statistics from")
    mean = total / pixels / 255.0
    std = np.sqrt(np.maximum(squares / pixels / 255.0**2 - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)  # a constant channel: leave its scale alone
    stats = {"mean": [float(m) for m in mean], "std": [float(s) for s in std],
             "split": split, "examples": int(len(idx)), "split_examples": int(n),
             "pixels_per_channel": int(pixels), "of": "pixel / 255, population std",
             "dataset": inf.name, "version": str(b.info.version)}
    try:
        tmp = b.data_path / f".{STATS_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(stats, indent=1) + "\n")
        tmp.replace(path)
    except OSError as e:
        warnings.warn(f"dataset {inf.name!r}: cannot cache normalization statistics in {path} "
                      f"({e.strerror or e}); they are computed again on every load", stacklevel=2)
    return tuple(stats["mean"]), tuple(stats["std"])


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
                         f"{have / 2**30:.1f} GiB; load a smaller image_size (streaming "
                         f"loading is not implemented yet)")


def _read(b, split: str, inf: Info, size: int | None, shape: tuple[int, ...], scale: float,
          mean, std) -> tuple[np.ndarray, np.ndarray]:
    """All records of one split as (x float32 normalized, y int32), read in bulk; each image
    eval-transformed to size x size when `size` is set."""
    from lottery.data import transforms  # noqa: PLC0415

    source = b.as_data_source(split=split)
    n = len(source)
    stored = None
    y = np.empty((n,), np.int32)
    images = len(shape) == 3 and inf.name not in _SPECS  # built-ins are stored as loaded

    def example(r):
        x = np.asarray(r[inf.image_key])
        if images:
            x = transforms.as_channels(x, shape[-1])
        return x if size is None else transforms.eval_transform(x, size)

    for start in range(0, n, _READ_CHUNK):
        keys = range(start, min(start + _READ_CHUNK, n))
        records = _records(source, keys)
        xs = np.stack([example(r) for r in records])
        if stored is None:
            stored = np.empty((n,) + xs.shape[1:], xs.dtype)
        stored[start:start + len(keys)] = xs
        y[start:start + len(keys)] = [int(r[inf.label_key]) for r in records]
    if stored is None:
        stored = np.empty((0,) + shape, np.float32)
    x = stored.reshape((n,) + shape).astype(np.float32)
    x /= np.float32(scale)
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
    return x, y


def load(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
         image_size: int | None = None) -> Dataset:
    """Train and test splits of `name` as numpy arrays: a built-in name (`DATASETS`), a name
    given to `register`, or a TFDS image-classification dataset (see the module docstring).

    x is float32 of shape (N,) + `input_shape(name, image_size=...)`, normalized with
    `normalization(name)`; y is int32 in [0, num_classes). Images of varying size, and every
    image when `image_size` differs from the stored size, are eval-transformed (resize + central
    crop) to `image_size` (default `DEFAULT_IMAGE_SIZE` for varying sizes). `download=True` lets
    TFDS download and prepare a missing dataset, as `lottery prepare NAME` does.
    """
    inf = info(name, data_dir=data_dir)
    source = _USER.get(name)
    if isinstance(source, Dataset):
        input_shape(name, image_size=image_size)  # rejects a resize of registered arrays
        return source._replace(name=name)
    size = _size(inf, image_size)
    shape = inf.shape if size is None else (size, size, inf.shape[-1])
    b = prepare(name, data_dir=data_dir, download=download)
    if name in _SPECS:
        spec = _SPECS[name]
        splits, scale, mean, std = ("train", "test"), spec.scale, spec.mean, spec.std
    else:
        splits, scale, (mean, std) = _splits(b, name), 255.0, _stats(b, inf)
    _check_memory(name, [b.info.splits[s].num_examples for s in splits], shape)
    x_train, y_train = _read(b, splits[0], inf, size, shape, scale, mean, std)
    x_test, y_test = _read(b, splits[1], inf, size, shape, scale, mean, std)
    return Dataset(x_train, y_train, x_test, y_test, inf.num_classes, name)
