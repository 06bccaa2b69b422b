"""Every shipped config loads, validates and resolves its layer patterns against its model."""

import glob
import os

import jax
import pytest

from lottery import config, data, masks, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def test_the_documented_configs_exist():
    names = {os.path.basename(p)[:-3] for p in CONFIGS}
    assert {"lenet300_mnist5k", "lenet300_mnist", "conv2_cifar10", "conv4_cifar10",
            "conv6_cifar10", "vgg19_cifar10", "resnet20_cifar10", "mlp_mnist1d",
            "cnn_mnist1d"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_is_valid(path):
    cfg = config.load(path)
    with open(path) as f:
        assert f.read().lstrip().startswith('"""'), "each config cites where its numbers come from"
    if cfg.experiment != "find-ticket":
        return  # other experiment kinds validate in their own tests
    config.validate(cfg)
    model = models.create(cfg.model, num_classes=data.num_classes(cfg.dataset))
    shapes = jax.eval_shape(lambda: models.init(model, jax.random.key(0),
                                                data.input_shape(cfg.dataset)))
    rates = config.prunable(cfg, shapes["params"])
    assert masks.prunable_paths(rates)
    if "out" in config.split(cfg.exclude):
        assert "out/kernel" not in masks.prunable_paths(rates)


def test_saved_configs_of_older_runs_get_new_fields_defaults():
    saved = config.base().to_dict()
    del saved["devices"]  # a run saved before the field existed
    saved["lr"] = 0.05
    cfg = config.from_saved(saved)
    assert cfg.devices == "all" and cfg.lr == 0.05
    config.validate(cfg)
    assert config.hashed_fields(cfg) == config.hashed_fields(config.from_saved(cfg.to_dict()))
