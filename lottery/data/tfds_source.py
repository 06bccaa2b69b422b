"""A TFDS dataset as lottery reads it: what its `DatasetInfo` says (`Info`: example shape, classes,
image and label keys; `image_info`), its train and test splits, and its records read in bulk.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

READ_CHUNK = 8192  # records per bulk read; bounds the list of decoded dicts held at once


class Info(NamedTuple):
    """What a dataset holds, known without reading its records."""

    name: str
    shape: tuple  # one stored example, channels-last; None where image sizes vary
    num_classes: int
    image_key: str  # feature holding the input in a record
    label_key: str  # feature holding the class id


# Datasets registered at run time by `register`: name -> a TFDS builder class, or a Dataset.


def image_info(name: str, b) -> Info:
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


def train_test_splits(b, name: str) -> tuple[str, str]:
    """('train', 'test'), or ('train', 'validation') where there is no 'test' split."""
    have = list(b.info.splits)
    test = "test" if "test" in have else "validation" if "validation" in have else None
    if "train" not in have or test is None:
        raise ValueError(f"dataset {name!r} has splits {have}; lottery needs 'train' and 'test' "
                         f"(or 'validation')")
    return "train", test


def read_records(source, keys):
    bulk = getattr(source, "__getitems__", None)  # TFDS sources; plain sequences lack it
    return bulk(keys) if bulk is not None else [source[i] for i in keys]
