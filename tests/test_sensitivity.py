"""Tests for lottery.sensitivity: exact single-layer densities, every variant evaluates the mask it
claims, the `lottery sensitivity` command."""

import os
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lottery import cli, groups, masks, models, prune, scorers, sensitivity


pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models (tests/conftest.py)


def _init(model, shape, seed=0):
    v = jax.eval_shape(lambda: models.init(model, jax.random.key(0), shape))
    rng = np.random.default_rng(seed)
    v = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), dict(v))
    if "batch_stats" in v:
        v["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda path, a: np.abs(a) + 0.5 if path[-1].key == "var" else a, v["batch_stats"])
    return v


def _data(shape, n, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, 10, n)


def _direct(model, v, mask, x, y):
    """Accuracy and mean loss of the masked model, evaluated plainly."""
    w = masks.apply(v["params"], mask)
    logits = model.apply({**v, "params": w}, x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return float(np.mean(np.argmax(logits, -1) == y)), float(loss)


def _half_up(d, n):
    return int(Fraction(repr(d)) * n + Fraction(1, 2))


def test_weight_densities_match_the_request_exactly():
    model = models.LeNet300100(hidden=(30, 20))
    v = _init(model, (6,))
    x, y = _data((6,), 37)
    p = v["params"]
    rates = masks.prunable(p, exclude="out")
    ds = (0.5, 0.25, 0.1, 0.07)
    res = sensitivity.analyze(model, v, x, y, ds, kind="weights", rates=rates, batch_size=16)
    assert res.names == ("fc1/kernel", "fc2/kernel") and res.sizes == (180, 600)
    np.testing.assert_array_equal(res.kept, [[_half_up(d, n) for d in ds] for n in res.sizes])
    np.testing.assert_array_equal(res.realized, res.kept / np.array([[180], [600]]))
    assert res.examples == 37
    # the baseline and a variant are what evaluating their masks directly gives
    base = _direct(model, v, masks.init(p), x, y)
    np.testing.assert_allclose((res.base_accuracy, res.base_loss), base, rtol=1e-5)
    only_fc2 = masks.prunable(p, include="fc2/kernel")
    m = prune.to_density(scorers.magnitude(p, masks.init(p)), masks.init(p), 0.1,
                         scope="layerwise", rates=only_fc2)
    np.testing.assert_allclose((res.accuracy[1, 2], res.loss[1, 2]), _direct(model, v, m, x, y),
                               rtol=1e-5)
    # a layer the given mask already pruned below a density keeps what it had (marked '*')
    sparse = prune.to_density(scorers.magnitude(p, masks.init(p)), masks.init(p), 0.2,
                              scope="layerwise", rates=masks.prunable(p, include="fc1/kernel"))
    res2 = sensitivity.analyze(model, v, x, y, (0.5, 0.1), mask=sparse, kind="weights",
                               rates=rates)
    np.testing.assert_array_equal(res2.kept[0], [36, 18])
    np.testing.assert_array_equal(res2.current, [36, 600])
    table = sensitivity.format_table(res2)
    assert "fc1/kernel" in table and "*" in table.splitlines()[2]


def test_group_variants_vmapped_in_chunks_evaluate_their_expanded_masks():
    model = models.VGG(plan=(4, "M", 6))
    v = _init(model, (4, 4, 2))
    x, y = _data((4, 4, 2), 20)
    ds = (0.5, 0.25)
    res = sensitivity.analyze(model, v, x, y, ds, replicas=3, batch_size=8)
    assert res.names == ("conv1", "conv2") and res.sizes == (4, 6)
    np.testing.assert_array_equal(res.kept, [[2, 1], [3, 2]])
    g = groups.derive(model, v, jnp.zeros((1, 4, 4, 2)), train=False)
    p = v["params"]
    scores = groups.l1(g, p, None)
    pruned = groups.to_density(g, scores, groups.init(g), 0.25, scope="layerwise")
    channels = (np.ones(4, bool), pruned[1])
    mask = groups.expand(g, channels, masks.init(p))
    np.testing.assert_allclose((res.accuracy[1, 1], res.loss[1, 1]),
                               _direct(model, v, mask, x, y), rtol=1e-5)
    np.testing.assert_allclose(res.base_loss, _direct(model, v, masks.init(p), x, y)[1],
                               rtol=1e-5)


def test_bad_arguments():
    model = models.LeNet300100(hidden=(4,))
    v = _init(model, (3,))
    x, y = _data((3,), 4)
    with pytest.raises(ValueError, match=r"densities must be numbers in \(0, 1\]"):
        sensitivity.analyze(model, v, x, y, (0.5, 1.5))
    with pytest.raises(ValueError, match="kind must be one of"):
        sensitivity.analyze(model, v, x, y, kind="filters")
    with pytest.raises(ValueError, match="same number"):
        sensitivity.analyze(model, v, x, y[:2])


def test_command_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    from _tiny_run import tiny_run

    run = tiny_run()
    out = str(tmp_path / "s.png")
    assert cli.run(["sensitivity", run, "--level", "1", "--kind", "weights",
                    "--densities", "0.5,0.1", "--examples", "100", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "level 1" in text and "fc1/kernel" in text and "fc2/kernel" in text
    assert "out/kernel" not in text  # the run's config excludes the classifier
    assert os.path.getsize(out) > 0
    assert cli.run(["sensitivity", run, "--checkpoint", os.path.join(run, "level_0", "final"),
                    "--densities", "0.5", "--examples", "50", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "fc1  " in text and "fc2  " in text and "channels" in text
    with pytest.raises(ValueError, match="--densities '0,5'"):
        cli.run(["sensitivity", run, "--level", "0", "--densities", "0,5"])
