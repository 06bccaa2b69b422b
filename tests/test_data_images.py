"""Any TFDS image-classification dataset by name: a real TFDS dataset of JPEG and PNG images of
varying sizes, made here offline, read through `lottery.data`'s generic path; the image policy of
`lottery.data.transforms`; `register`; `lottery prepare` and its one-line messages."""

import functools
import io
import json
import math
import os
import shutil
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from lottery import cli, config, data
from lottery.data import transforms as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "lottery_test_images"  # a name TFDS does not know: found as files in the data dir
CLASSES = ("circle", "square", "stripes", "dots")
N_TRAIN, N_TEST = 240, 60


def _encoded_images(seed, n):
    """n (bytes, label) pairs: RGB and grey images of 17..95 px per side, JPEG or PNG."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(17, 96, 2))
        base = rng.integers(0, 256, (1, 1, 3))
        noise = rng.integers(-60, 61, (h, w, 3))
        image = np.clip(base + noise, 0, 255).astype(np.uint8)
        pil = Image.fromarray(image).convert("L") if i % 7 == 3 else Image.fromarray(image)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG" if i % 2 else "PNG", quality=90)
        out.append((buf.getvalue(), int(rng.integers(len(CLASSES)))))
    return out


TRAIN, TEST = _encoded_images(0, N_TRAIN), _encoded_images(1, N_TEST)


def _decoded(pairs):
    """What the images are, decoded by PIL independently of TFDS and lottery: RGB uint8."""
    return [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b, _ in pairs]


class VaryingImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder like a user's: Image + two ClassLabels, the supervised keys decide; the
    evaluation split is called 'validation'."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "picture": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "shape_class": tfds.features.ClassLabel(names=list(CLASSES)),
                "parity": tfds.features.ClassLabel(num_classes=2),
                "index": tfds.features.Tensor(shape=(), dtype=np.int64),
            }),
            supervised_keys=("picture", "shape_class"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(TRAIN), "validation":
                self._generate_examples(TEST)}

    def _generate_examples(self, pairs):
        for i, (encoded, label) in enumerate(pairs):
            yield i, {"picture": encoded, "shape_class": label, "parity": i % 2, "index": i}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data dir where the test dataset is prepared, as a user's own TFDS dataset would be."""
    path = str(tmp_path_factory.mktemp("image_data"))
    VaryingImages(data_dir=path).download_and_prepare(file_format="array_record")
    return path


def _numpy_stats(images):
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64) / 255.0
    return pixels.mean(axis=0), pixels.std(axis=0)


def _eval_reference(image, size):
    """torchvision's Resize(floor(size / 0.875)) + CenterCrop(size), written out with PIL."""
    h, w = image.shape[:2]
    short = int(math.floor(size / 0.875))
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    top, left = (nh - size) // 2, (nw - size) // 2
    return resized[top:top + size, left:left + size]


# ---------------------------------------------------------------------------------------------
# A TFDS dataset by name.


def test_info_comes_from_dataset_info(root):
    inf = data.info(NAME, data_dir=root)
    assert inf == data.Info(NAME, (None, None, 3), 4, "picture", "shape_class")
    assert data.num_classes(NAME, data_dir=root) == 4
    assert data.input_shape(NAME, data_dir=root) == (data.DEFAULT_IMAGE_SIZE,) * 2 + (3,)
    assert data.input_shape(NAME, data_dir=root, image_size=32) == (32, 32, 3)
    data.check(NAME, data_dir=root)


def test_load_varying_sizes_through_eval_transform(root):
    ds = data.load(NAME, data_dir=root, image_size=32)
    assert ds.name == NAME and ds.num_classes == 4
    assert ds.x_train.shape == (N_TRAIN, 32, 32, 3) and ds.x_test.shape == (N_TEST, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.y_train, [lb for _, lb in TRAIN])
    np.testing.assert_array_equal(ds.y_test, [lb for _, lb in TEST])  # 'validation' split
    mean, std = data.normalization(NAME, data_dir=root)
    for x, pairs in ((ds.x_train, TRAIN), (ds.x_test, TEST)):
        want = np.stack([_eval_reference(im, 32) for im in _decoded(pairs)]) / 255.0
        np.testing.assert_allclose(x, (want - mean) / std, rtol=1e-5, atol=1e-5)


def test_normalization_stats_computed_once_and_cached(root, tmp_path):
    data.prepare(NAME, data_dir=root)
    path = os.path.join(root, NAME, "1.0.0", data.STATS_FILE)
    saved = json.loads(open(path).read())
    mean, std = _numpy_stats(_decoded(TRAIN))
    np.testing.assert_allclose(saved["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(saved["std"], std, rtol=1e-12)
    assert saved["split"] == "train" and saved["examples"] == N_TRAIN
    assert saved["pixels_per_channel"] == sum(im.shape[0] * im.shape[1]
                                              for im in _decoded(TRAIN))
    assert data.normalization(NAME, data_dir=root) == (tuple(saved["mean"]), tuple(saved["std"]))
    # Read from the cache from then on: a changed file is what load uses.
    shutil.copytree(os.path.join(root, NAME), tmp_path / NAME)
    stats = tmp_path / NAME / "1.0.0" / data.STATS_FILE
    stats.write_text(json.dumps({**saved, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}))
    assert data.normalization(NAME, data_dir=str(tmp_path)) == ((0.5,) * 3, (0.25,) * 3)


def test_stats_on_evenly_spaced_subset_of_large_splits(root, tmp_path, monkeypatch):
    shutil.copytree(os.path.join(root, NAME), tmp_path / NAME)
    os.remove(tmp_path / NAME / "1.0.0" / data.STATS_FILE)
    monkeypatch.setattr(data, "STATS_MAX_EXAMPLES", 50)
    mean, std = data.normalization(NAME, data_dir=str(tmp_path))
    idx = np.unique(np.linspace(0, N_TRAIN - 1, 50).round().astype(int))
    want = _numpy_stats([_decoded(TRAIN)[i] for i in idx])
    np.testing.assert_allclose(mean, want[0], rtol=1e-12)
    np.testing.assert_allclose(std, want[1], rtol=1e-12)
    assert json.loads((tmp_path / NAME / "1.0.0" / data.STATS_FILE).read_text())["examples"] == 50


def test_too_large_for_memory_is_one_line(root, monkeypatch):
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda k: 1 if k == "SC_PHYS_PAGES" else real(k))
    with pytest.raises(ValueError) as err:
        data.load(NAME, data_dir=root, image_size=8)
    assert len(str(err.value).splitlines()) == 1 and "GiB in memory" in str(err.value)


@pytest.mark.parametrize("name", ["no_such_dataset_xyz", "cifar_10", "bad name!"])
def test_bad_dataset_name_is_one_line(root, name):
    for fn in (data.load, data.info, data.input_shape, data.num_classes, data.check):
        with pytest.raises(ValueError) as err:
            fn(name, data_dir=root)
        text = str(err.value)
        assert len(text.splitlines()) == 1, text
        assert f"dataset={name!r}: expected one of 'mnist'" in text and root in text
    if name == "cifar_10":
        assert "Did you mean: cifar_10 -> cifar10" in text
    cfg = config.base()
    cfg.dataset, cfg.data_dir = name, root
    with pytest.raises(ValueError) as err:
        config.validate(cfg)
    assert len(str(err.value).splitlines()) == 1 and str(err.value).startswith(
        f"dataset={name!r}: expected one of")


def test_config_validates_tfds_dataset_and_imported_model(root):
    cfg = config.base()
    cfg.dataset, cfg.data_dir = NAME, root
    cfg.model = "lottery.models:LeNet300100"  # any import path; checked on (224, 224, 3)
    config.validate(cfg)
    cfg.model = "lottery.models:ResBlock"  # not a factory(num_classes=...)
    with pytest.raises(ValueError, match="calling it with num_classes=4 failed"):
        config.validate(cfg)


# ---------------------------------------------------------------------------------------------
# register(): a builder class, prepared on first use; arrays, used as given.


class FixedImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "lottery_fixed_images"
    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=(
            tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(8, 8, 1)),
                                        "label": tfds.features.ClassLabel(num_classes=3)})))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(20, 0), "test": self._generate_examples(10, 1)}

    def _generate_examples(self, n, seed):
        rng = np.random.default_rng(seed)
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(buf, "PNG")
            yield i, {"image": buf.getvalue(), "label": i % 3}


class NoImages(FixedImages):
    name = "lottery_no_images"

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "x": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=3)}))


def test_register_builder_class_prepared_on_first_use(tmp_path):
    data.register("fixed", FixedImages)
    data.register("noimg", NoImages)
    try:
        assert data.input_shape("fixed", data_dir=str(tmp_path)) == (8, 8, 1)
        ds = data.load("fixed", data_dir=str(tmp_path))  # no download flag: it is offline
        assert ds.x_train.shape == (20, 8, 8, 1) and ds.num_classes == 3 and ds.name == "fixed"
        assert (tmp_path / "lottery_fixed_images" / "1.0.0" / data.STATS_FILE).exists()
        assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 1e-5
        big = data.load("fixed", data_dir=str(tmp_path), image_size=12)  # fixed size, resized
        assert big.x_train.shape == (20, 12, 12, 1)
        with pytest.raises(ValueError) as err:
            data.info("noimg", data_dir=str(tmp_path))
        assert len(str(err.value).splitlines()) == 1
        assert "needs one Image feature" in str(err.value) and "x: Tensor" in str(err.value)
        with pytest.raises(ValueError, match="already registered"):
            data.register("fixed", FixedImages)
    finally:
        data.unregister("fixed")
        data.unregister("noimg")
    assert "fixed" not in data.names()


def test_register_arrays():
    rng = np.random.default_rng(0)
    arrays = data.Dataset(rng.normal(size=(6, 5, 2)).astype(np.float32), np.arange(6) % 3,
                          rng.normal(size=(4, 5, 2)).astype(np.float32), np.arange(4) % 3, 3, "")
    data.register("signals", arrays)
    try:
        ds = data.load("signals")
        assert ds.name == "signals" and ds.x_train is arrays.x_train
        assert data.input_shape("signals") == (5, 2) and data.num_classes("signals") == 3
        assert data.normalization("signals") == ((0.0, 0.0), (1.0, 1.0))
        assert data.prepare("signals") is None
        cfg = config.base()
        cfg.dataset = "signals"
        config.validate(cfg)
        with pytest.raises(ValueError, match="image_size"):
            data.load("signals", image_size=8)
    finally:
        data.unregister("signals")
    with pytest.raises(ValueError, match="labels must be integers in \\[0, 2\\)"):
        data.register("bad", arrays._replace(num_classes=2))
    with pytest.raises(ValueError, match="built-in"):
        data.register("mnist", arrays)
    with pytest.raises(ValueError, match="letters, digits"):
        data.register("a/b", arrays)
    with pytest.raises(ValueError, match="TFDS builder class or a lottery.data.Dataset"):
        data.register("thing", object())


# ---------------------------------------------------------------------------------------------
# `lottery prepare` and downloads: one line where the network or TensorFlow is missing.


def _prepare(argv):
    return cli.run(["prepare", *argv])


@pytest.fixture
def no_download(monkeypatch):
    """No host is reachable, and TFDS must not try to download."""
    def refuse(*args, **kwargs):
        raise AssertionError("TFDS was asked to download")

    monkeypatch.setattr(data.download, "reachable", lambda hosts, timeout=3.0: False)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)


def test_prepare_command_prints_one_line(root, capsys):
    assert _prepare([NAME, "--data-dir", root]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith(f"{NAME}: {os.path.join(root, NAME, '1.0.0')}; train 240, validation 60")
    assert "4 classes" in out and "(224, 224, 3)" in out and "normalization mean (" in out


def test_prepare_without_network_says_where_to_put_files(tmp_path, no_download):
    with pytest.raises(ValueError) as err:
        _prepare(["cifar10", "--data-dir", str(tmp_path)])
    text = str(err.value)
    manual = os.path.join(str(tmp_path), "downloads", "manual")
    assert len(text.splitlines()) == 1 and "unreachable" in text
    assert "cifar-10-binary.tar.gz" in text and repr(manual) in text
    assert f"`lottery prepare cifar10 --data-dir {tmp_path}`" in text
    with pytest.raises(data.DatasetNotFoundError) as err:  # the same from load(download=True)
        data.load("cifar10", data_dir=str(tmp_path), download=True)
    assert len(str(err.value).splitlines()) == 1 and "unreachable" in str(err.value)
    with pytest.raises(ValueError) as err:  # datasets TFDS cannot download at all
        _prepare(["imagenet2012", "--data-dir", str(tmp_path), "--manual-dir",
                  str(tmp_path / "manual")])
    text = str(err.value)
    assert len(text.splitlines()) == 1 and "must be downloaded by hand" in text
    assert "ILSVRC2012_img_train.tar" in text and "--manual-dir" in text


def test_not_prepared_is_one_line(tmp_path, no_download):
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load("cifar100", data_dir=str(tmp_path))
    text = str(err.value)
    assert len(text.splitlines()) == 1
    assert f"`lottery prepare cifar100 --data-dir {tmp_path}`" in text


def test_prepare_without_tensorflow_is_one_line(tmp_path, monkeypatch):
    def needs_tf(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

    monkeypatch.setattr(data.download, "reachable", lambda hosts, timeout=3.0: True)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", needs_tf)
    with pytest.raises(ValueError) as err:
        _prepare(["cifar10", "--data-dir", str(tmp_path)])
    assert len(str(err.value).splitlines()) == 1 and "needs TensorFlow" in str(err.value)


# ---------------------------------------------------------------------------------------------
# The image policy.


def test_eval_transform_resize_and_center_crop():
    rng = np.random.default_rng(0)
    for h, w in ((50, 80), (90, 33), (20, 20), (32, 40)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out = T.eval_transform(image, 32)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, _eval_reference(image, 32))
    assert T.eval_size(224) == 256 and T.eval_size(32) == 36
    assert T.resize_shorter(np.zeros((50, 80, 1), np.uint8), 36).shape == (36, 57, 1)
    image = np.arange(7 * 9).reshape(7, 9, 1)
    np.testing.assert_array_equal(T.center_crop(image, 3), image[2:5, 3:6])
    with pytest.raises(ValueError, match="smaller than the crop"):
        T.center_crop(image, 8)
    grey = T.as_channels(np.full((4, 5), 7, np.uint8), 3)
    assert grey.shape == (4, 5, 3) and np.all(grey == 7)
    rgba = rng.integers(0, 256, (4, 5, 4), dtype=np.uint8)
    np.testing.assert_array_equal(T.as_channels(rgba, 3), rgba[..., :3])
    luma = T.as_channels(rgba[..., :3], 1)  # PIL's 'L': ITU-R 601 weights
    want = rgba[..., :3].astype(float) @ [0.299, 0.587, 0.114]
    assert luma.shape == (4, 5, 1) and np.abs(luma[..., 0] - want).max() <= 1


def test_train_transform_is_torchvisions_random_resized_crop_and_flip():
    rng = np.random.default_rng(0)
    boxes = [T.crop_box(rng, 60, 90) for _ in range(400)]
    for top, left, h, w in boxes:
        assert 0 <= top <= 60 - h and 0 <= left <= 90 - w
        assert 0.08 * 5400 * 0.9 <= h * w <= 5400 and 0.7 <= w / h <= 1.45
    # When 10 tries fail (a crop larger than the image), the central crop, aspect clamped.
    assert T.crop_box(rng, 40, 100, scale=(1.0, 1.0), ratio=(1.0, 1.0)) == (0, 30, 40, 40)
    image = rng.integers(0, 256, (40, 100, 3), dtype=np.uint8)
    centre = np.asarray(Image.fromarray(image[:, 30:70]).resize((16, 16), Image.BILINEAR))
    flips = 0
    for seed in range(40):
        out = T.train_transform(np.random.default_rng(seed), image, 16, scale=(1.0, 1.0),
                                ratio=(1.0, 1.0))
        assert out.shape == (16, 16, 3)
        flipped = np.array_equal(out, centre[:, ::-1])
        assert flipped or np.array_equal(out, centre)
        flips += flipped
    assert 10 <= flips <= 30
    a = T.train_transform(np.random.default_rng(5), image, 16)
    np.testing.assert_array_equal(a, T.train_transform(np.random.default_rng(5), image, 16))


def test_random_resized_crop_flip_on_device():
    x = jax.random.uniform(jax.random.key(0), (32, 16, 20, 3))

    @functools.cache
    def compiled(shape, **kw):  # without XLA's backend optimizations: 3x faster to build
        fn = functools.partial(T.random_resized_crop_flip, **kw)
        return jax.jit(fn).lower(jax.random.key(0), jax.ShapeDtypeStruct(shape, np.float32)
                                 ).compile({"xla_backend_optimization_level": 0})

    def f(key, x, **kw):
        return compiled(x.shape, **kw)(key, x)

    same = f(jax.random.key(1), x, scale=(1.0, 1.0), ratio=(1.25, 1.25))  # the whole image
    flipped = [bool(np.allclose(o, i[:, ::-1], atol=1e-5)) for o, i in zip(same, x)]
    kept = [bool(np.allclose(o, i, atol=1e-5)) for o, i in zip(same, x)]
    assert all(a or b for a, b in zip(flipped, kept)) and 8 <= sum(flipped) <= 24
    # A crop of a quarter of the area, scaled back up 2x: row and column ramps stay ramps of
    # slope 1/2 that start at an integer offset inside the image.
    rows = np.broadcast_to(np.arange(16, dtype=np.float32)[:, None, None], (16, 16, 1))
    ramp = np.stack([rows, rows.transpose(1, 0, 2)] * 4).astype(np.float32)  # 4 rows, 4 columns
    out = np.asarray(f(jax.random.key(2), ramp, scale=(0.25, 0.25), ratio=(1.0, 1.0)))
    for o in out:
        line = o[2:14, 8, 0] if np.ptp(o[2:14, 8, 0]) > 1 else o[8, 2:14, 0]
        line = line if line[-1] > line[0] else line[::-1]  # a flipped column ramp
        np.testing.assert_allclose(np.diff(line), 0.5, atol=1e-4)
        top = line[0] - 2 / 2 + 0.25  # output row r shows input row top + (r + 0.5) / 2 - 0.5
        assert abs(top - round(top)) < 1e-4 and 0 <= round(top) <= 8
    other = f(jax.random.key(3), x)
    assert other.shape == x.shape and not np.allclose(other, f(jax.random.key(4), x))
    np.testing.assert_array_equal(other, f(jax.random.key(3), x))


# ---------------------------------------------------------------------------------------------
# A user's model (import path) on a user's TFDS dataset (by name), end to end.

USER_NET = '''
import flax.linen as nn


class Net(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32, name="fc1")(x))
        return nn.Dense(self.num_classes, name="out")(x)


def make(num_classes):
    return Net(num_classes)
'''


def test_user_model_and_dataset_run_find_ticket_and_prune_at_init(root, tmp_path, monkeypatch):
    """`model='usernet:make'` and the TFDS dataset by name, resized to 16x16: IMP prunes the
    user's Dense kernels (not `out`), prune-at-init sweeps them, the runs read back."""
    from lottery import imp, pai, runs

    (tmp_path / "usernet.py").write_text(USER_NET)
    monkeypatch.chdir(tmp_path)
    try:
        cfg = config.base()
        cfg.update(dict(dataset=NAME, data_dir=root, image_size=16, model="usernet:make",
                        batch_size=20, training_steps="6it", eval_every="3it", levels=1,
                        progress=False))
        run_dir = imp.find_ticket(cfg, str(tmp_path / "runs"))
        assert os.path.basename(run_dir).startswith(f"find-ticket_usernet-make_{NAME}_")
        r = runs.Run(run_dir)
        assert r.input_shape == (16, 16, 3)
        mask = r.mask(1)
        fc1 = np.asarray(mask["fc1"]["kernel"])
        assert fc1.shape == (16 * 16 * 3, 32) and fc1.sum() == round(0.8 * fc1.size)
        assert np.all(np.asarray(mask["out"]["kernel"]))  # base config excludes `out`
        p = pai.base_config()
        p.update(dict(dataset=NAME, data_dir=root, image_size=16, model="usernet:make",
                      batch_size=20, training_steps="3it", eval_every="3it", seeds=1,
                      scorers="magnitude,snip", compressions="1,10", progress=False))
        sweep_dir = pai.sweep(p, str(tmp_path / "runs"))
        rows = pai.summary(sweep_dir)
        assert {(row["scorer"], round(row["compression"])) for row in rows} == {
            ("magnitude", 1), ("magnitude", 10), ("snip", 1), ("snip", 10)}
    finally:
        sys.modules.pop("usernet", None)


def test_config_download_prepares_on_first_use(tmp_path, no_download, capsys):
    """`--config.download=true` asks TFDS to download a dataset that is not prepared (offline:
    the one line saying where to put the files), without it the one line says how to prepare;
    either way before anything is written."""
    work = tmp_path / "runs"
    base = ["find-ticket", "--config", os.path.join(ROOT, "configs", "conv2_cifar10.py"),
            f"--config.data_dir={tmp_path / 'data'}", "--workdir", str(work)]
    assert cli.main(base) == 2
    assert "`lottery prepare cifar10" in capsys.readouterr().err
    assert cli.main([*base, "--config.download=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unreachable" in err and "cifar-10-binary" in err
    assert not work.exists() or not os.listdir(work)  # no run directory
