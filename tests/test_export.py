"""Tests for lottery.export: a real tiny run exported, loaded without the run, same outputs."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from _tiny_run import write_config

from lottery import checkpoints, cli, config, experiment, export, imp, masks, models, prune



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-level IMP run (levels 0 and 1, density 0.2 at level 1)."""
    path = write_config(tmp_path_factory.mktemp("configs") / "tiny.py", training_steps="20it",
                        levels=1, fraction=0.8)
    cfg = config.load(path)
    return cfg, imp.find_ticket(cfg, str(tmp_path_factory.mktemp("runs")))


def _level(cfg, run_dir, level):
    """The level's final params and mask, restored through the TrainState template (the path
    `lottery find-ticket` itself uses), independent of export.read_level."""
    s = experiment.Setup(cfg)
    final = checkpoints.restore(os.path.join(run_dir, f"level_{level}", "final"), s.template())
    mask = checkpoints.restore(os.path.join(run_dir, f"level_{level}", "mask"),
                               masks.init(s.variables["params"]))
    return s, final.params, mask


def _export(run_dir, level, fmt, out, *extra):
    """`lottery export ...` through the command table (errors propagate)."""
    return cli.run(["export", run_dir, "--level", str(level), "--format", fmt, "--out", out,
                    *extra])


def _x(n=6):
    return np.random.default_rng(0).normal(size=(n, 28, 28, 1)).astype(np.float32)


def test_sparse_export_loads_without_the_run(run, tmp_path, capsys):
    cfg, run_dir = run
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy)
    out = str(tmp_path / "sparse")
    assert _export(copy, 1, "sparse", out) == 0
    assert "exported level 1 (sparse" in capsys.readouterr().out
    s, params, mask = _level(cfg, copy, 1)
    want = models.inference_fn(s.model, s.variables)(masks.apply(params, mask), _x())
    shutil.rmtree(copy)
    apply_fn, loaded = export.load(out)
    np.testing.assert_allclose(apply_fn(loaded, _x()), want, rtol=1e-5, atol=1e-5)
    with open(os.path.join(out, "model.json")) as f:
        meta = json.load(f)
    with open(os.path.join(run_dir, "level_1", "info.json")) as f:
        assert meta["density"] == pytest.approx(json.load(f)["density"])
    assert meta["format"] == "sparse" and meta["input_shape"] == [28, 28, 1]
    assert sorted(meta["sparse_kernels"]) == ["fc1/kernel", "fc2/kernel"]  # 'out' not pruned
    for path, info in meta["sparse_kernels"].items():
        layer = path.split("/")[0]
        assert info["nse"] == int(np.sum(mask[layer]["kernel"]))
        assert loaded[layer]["kernel"].nse == info["nse"]


def test_compact_export_of_a_structured_mask(run, tmp_path):
    """Level 1 of a copy of the run gets a unit mask; the export is smaller and computes the
    masked model's outputs."""
    cfg, run_dir = run
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy)
    s, params, _ = _level(cfg, copy, 1)
    unit_mask = prune.units_to_density(prune.unit_scores(params, s.rates), masks.init(params),
                                       0.25, scope="layerwise", rates=s.rates)
    shutil.rmtree(os.path.join(copy, "level_1", "mask"))
    checkpoints.save(os.path.join(copy, "level_1", "mask"), unit_mask)
    want = models.inference_fn(s.model, s.variables)(masks.apply(params, unit_mask), _x())
    out = str(tmp_path / "compact")
    assert _export(copy, 1, "compact", out) == 0
    shutil.rmtree(copy)
    apply_fn, loaded = export.load(out)
    np.testing.assert_allclose(apply_fn(loaded, _x()), want, rtol=1e-4, atol=1e-4)
    assert loaded["fc1"]["kernel"].shape == (784, 75)  # round(0.25 * 300) units kept
    assert loaded["fc2"]["kernel"].shape == (75, 25)
    with open(os.path.join(out, "model.json")) as f:
        meta = json.load(f)
    assert meta["architecture"] == {"class": "LeNet300100",
                                    "fields": {"bias_init": "torch", "hidden": [75, 25],
                                               "num_classes": 10}}
    assert meta["stored_params"] == models.flat_param_count(loaded) < meta["source_params"]


def test_bad_input(run, tmp_path):
    cfg, run_dir = run
    with pytest.raises(ValueError, match=r"--level 5: not a finished level.*\[0, 1\]"):
        _export(run_dir, 5, "sparse", str(tmp_path / "a"))
    with pytest.raises(ValueError, match="no removable unit"):  # unstructured IMP mask
        _export(run_dir, 1, "compact", str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("keep me")
    with pytest.raises(ValueError, match=r"--out .* exists"):
        _export(run_dir, 1, "sparse", str(tmp_path / "c"))
    with pytest.raises(ValueError, match="no --config"):
        _export(run_dir, 1, "sparse", str(tmp_path / "d"), "--config.lr=1")
    with pytest.raises(ValueError, match="no config.json"):
        _export(str(tmp_path), 1, "sparse", str(tmp_path / "e"))
    with pytest.raises(ValueError, match="no model.json"):
        export.load(str(tmp_path))
    with pytest.raises(SystemExit):  # argparse: --format must be compact or sparse
        _export(run_dir, 1, "dense", str(tmp_path / "f"))


def test_architecture_round_trip():
    for model in (models.create("conv4"), models.create("vgg11"), models.create("cnn_mnist1d"),
                  models.create("mlp_mnist1d", residual=False)):
        arch = json.loads(json.dumps(export.architecture(model)))
        assert export.build(arch) == model
    with pytest.raises(ValueError, match="class 'Nope' is unknown"):
        export.build({"class": "Nope", "fields": {}})


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_batch_norm_model_round_trip(tmp_path, fmt):
    """A VGG with batch-norm statistics: saved beside the params, used by the loaded model."""
    model = models.VGG(plan=(4, "M", 6))
    rng = np.random.default_rng(0)
    v = jax.eval_shape(lambda: models.init(model, jax.random.key(0), (4, 4, 3)))
    v = jax.tree.map(lambda a: (0.5 * rng.normal(size=a.shape)).astype(np.float32), v)
    v["batch_stats"] = jax.tree.map(lambda a: np.abs(a) + 0.5, v["batch_stats"])
    mask = jax.tree.map(lambda a: np.ones(a.shape, bool), v["params"])
    mask["out"]["kernel"][[1, 4], :] = False  # conv2 channels 1 and 4 are read by nobody
    mask["conv1"]["kernel"][:, :, 0, :] = False
    meta = export.export(model, v, mask, str(tmp_path / fmt), fmt)
    apply_fn, params = export.load(str(tmp_path / fmt))
    x = rng.normal(size=(3, 4, 4, 3)).astype(np.float32)
    want = model.apply({**v, "params": masks.apply(v["params"], mask)}, x, train=False)
    np.testing.assert_allclose(apply_fn(params, x), want, rtol=1e-5, atol=1e-5)
    assert os.path.isdir(tmp_path / fmt / "batch_stats")
    if fmt == "compact":
        assert meta["architecture"]["fields"]["plan"] == [4, "M", 4]
