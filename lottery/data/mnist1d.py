"""`mnist1d`: MNIST-1D (Greydanus 2020) generated locally, as an offline TFDS builder.

The data are `mnist1d.data.make_dataset(get_dataset_args())`: the package's standard settings
(5,000 signals of length 40, seed 42, first 4,000 train, last 1,000 test), which never
downloads (only `get_dataset` can). `make_dataset` already standardizes the whole set to mean 0
and std 1; the builder stores those values as float32 (40,) features, unchanged.

Reference: Greydanus, "Scaling down deep learning", 2020, https://arxiv.org/abs/2011.14439
"""

from __future__ import annotations

import random

import numpy as np
import tensorflow_datasets as tfds
from etils import epath


def generate() -> dict[str, np.ndarray]:
    """`make_dataset(get_dataset_args())` as {'x', 'y', 'x_test', 'y_test'} arrays.

    `make_dataset` reseeds numpy's and Python's global RNGs; their states are restored after.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


class Mnist1d(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder for `mnist1d` (kept out of TFDS's global registry to avoid name clashes)."""

    name = "mnist1d"
    VERSION = tfds.core.Version("1.0.0")
    # TFDS derives `code_path` (where it looks for checksums.tsv) via importlib_resources, which
    # is not installed; pin it to this file instead.
    code_path = epath.Path(__file__)
    RELEASE_NOTES = {"1.0.0": "make_dataset(get_dataset_args()) of the mnist1d package."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="MNIST-1D: 1-D signals of length 40 in 10 classes, 4,000/1,000 split.",
            features=tfds.features.FeaturesDict({
                "x": tfds.features.Tensor(shape=(40,), dtype=np.float32),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("x", "label"),
            disable_shuffling=True,  # records stay in make_dataset's order
            homepage="https://github.com/greydanus/mnist1d",
            citation="Greydanus, Scaling down deep learning, arXiv:2011.14439, 2020.",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        data = generate()
        return {"train": self._generate_examples(data["x"], data["y"]),
                "test": self._generate_examples(data["x_test"], data["y_test"])}

    def _generate_examples(self, xs, ys):
        for i, (x, y) in enumerate(zip(xs, ys)):
            yield i, {"x": x.astype(np.float32), "label": int(y)}
