"""The default prunable rule (`masks.default_prunable`): leaves named 'kernel' with ndim >= 2.

It replaced "every leaf with ndim >= 2"; on every built-in model but the ViTs the two prune the
same leaves, so runs of those models keep their results (and names). A run directory made under
the older rule whose model it pruned differently is refused (`rundir.prepare`), and the config
field `include` prunes other leaves."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from lottery import config, masks, models, rundir


def _params(name):
    model = models.create(name, num_classes=10)
    return jax.eval_shape(lambda: models.init(model, jax.random.key(0),
                                              models.INPUT_SHAPES[name]))["params"]


def _older_rule(params) -> set[str]:
    return {p for p, leaf in zip(masks.paths(params), jax.tree.leaves(params))
            if len(leaf.shape) >= 2}


@pytest.mark.parametrize("name", list(models.MODELS))
def test_kernel_rule_equals_the_older_rule_but_on_the_vits(name):
    params = _params(name)
    kernels = set(masks.prunable_paths(masks.prunable(params)))
    assert kernels and all(p.rsplit("/", 1)[-1] == "kernel" for p in kernels)
    if not name.startswith("vit"):
        assert kernels == _older_rule(params)
    else:  # the class token, position embedding and (heads, head_dim) q/k/v biases are not
        assert _older_rule(params) - kernels == {"cls", "pos_embedding"} | {
            f"block{i}/attn/{k}/bias" for i in range(12) for k in ("query", "key", "value")}


class Layers(nn.Module):
    """One of each flax layer with a weight, and a hand-made 2-D parameter."""

    @nn.compact
    def __call__(self, x, train=False):
        tokens = nn.Embed(11, 8, name="embed")(jnp.zeros(x.shape[:1], jnp.int32))
        x = nn.Conv(8, (3, 3), name="conv")(x).mean(axis=(1, 2)) + tokens
        x = nn.BatchNorm(use_running_average=True, name="bn")(x)
        x = nn.DenseGeneral((2, 4), name="general")(x).reshape(x.shape[0], 8)
        x = nn.Einsum((8, 8), "bi,ij->bj", name="einsum")(x)
        x = nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x[:, None, :])[:, 0]
        x = nn.LayerNorm(name="ln")(x) @ self.param("w", nn.initializers.ones, (8, 8))
        return nn.Dense(10, name="out")(x)


def _layer_params():
    return jax.eval_shape(lambda: Layers().init(jax.random.key(0), jnp.ones((1, 6, 6, 3))))[
        "params"]


def test_default_rule_on_flax_layers():
    params = _layer_params()
    assert set(masks.prunable_paths(masks.prunable(params))) == {
        "conv/kernel", "general/kernel", "einsum/kernel", "attn/query/kernel", "attn/key/kernel",
        "attn/value/kernel", "attn/out/kernel", "out/kernel"}
    assert {"embed/embedding", "w", "attn/query/bias"} <= _older_rule(params)


def test_include_field_prunes_other_leaves():
    params = _layer_params()
    cfg = config.base()
    cfg.include = "(.*/)?kernel,embed/embedding,w"
    assert set(masks.prunable_paths(config.prunable(cfg, params))) == {
        "conv/kernel", "general/kernel", "einsum/kernel", "attn/query/kernel", "attn/key/kernel",
        "attn/value/kernel", "attn/out/kernel", "embed/embedding", "w"}  # 'out' excluded
    assert config.run_name(cfg) != config.run_name(config.base())
    cfg.include = ""  # the default: left out of the run hash, as before the field existed
    assert config.hashed_fields(cfg) == config.hashed_fields(config.from_saved(
        {k: v for k, v in cfg.to_dict().items() if k != "include"}))


def _older_run(tmp_path, **fields):
    """A run directory whose config.json was written before the field `include` existed."""
    cfg = config.base()
    cfg.update(fields)
    run_dir = os.path.join(tmp_path, config.run_name(cfg))
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, rundir.CONFIG), "w") as f:
        json.dump({k: v for k, v in cfg.to_dict().items() if k != "include"}, f)
    return cfg


def test_an_older_run_is_refused_only_where_the_rules_differ(tmp_path):
    cfg = _older_run(tmp_path)  # LeNet: the same leaves either way
    assert rundir.prepare(cfg, str(tmp_path)).startswith(str(tmp_path))
    cfg = _older_run(tmp_path, model="vit_tiny_patch4", exclude="out")  # 28x28: 7x7 patches
    with pytest.raises(ValueError, match=r"was pruned by lottery's older default rule .* 38 "
                                         r"leaves of vit_tiny_patch4 that the default \(the "
                                         r"kernels\) does not \(block0/attn/key/bias, "):
        rundir.prepare(cfg, str(tmp_path))
