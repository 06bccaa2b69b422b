"""lottery.instability: barrier arithmetic, exact interpolation, the rewind point, identical copies
give barrier 0, and copy A retraces the run's own level."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from _tiny_run import tiny_run

from lottery import cli, instability, runs, train as train_lib


@pytest.fixture(scope="module")
def run():
    return runs.Run(tiny_run())


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_error_barrier():
    assert instability.error_barrier([0.1, 0.3, 0.2]) == pytest.approx(0.3 - 0.15)
    assert instability.error_barrier([0.2, 0.2, 0.2]) == 0.0
    assert instability.error_barrier([0.3, 0.2, 0.1]) == pytest.approx(0.3 - 0.2)
    with pytest.raises(ValueError, match="errors: expected a 1-D array of >= 2 points"):
        instability.error_barrier([0.1])


def test_interpolate_is_exact_at_the_ends():
    rng = np.random.default_rng(0)
    a = {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    b = {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    assert _equal(instability.interpolate(a, b, 0.0), a)
    assert _equal(instability.interpolate(a, b, 1.0), b)
    assert _equal(instability.interpolate(a, a, 0.3), a)  # no rounding when the copies agree
    mid = instability.interpolate(a, b, 0.25)
    np.testing.assert_allclose(mid["w"], 0.75 * a["w"] + 0.25 * b["w"], rtol=1e-6)


def test_rewind_state_trained_from_init_equals_the_saved_one(run, tmp_path):
    setup = instability.setup_for(run)
    saved = instability.rewind_state(run, setup, 20)
    assert int(saved.step) == 20 == run.rewind().step
    copy = tmp_path / "no_rewind"
    shutil.copytree(run.path, copy)
    shutil.rmtree(copy / "rewind")
    retrained = instability.rewind_state(runs.Run(str(copy)), setup, 20)
    assert int(retrained.step) == 20
    assert _equal(retrained.params, saved.params) and _equal(retrained.opt_state, saved.opt_state)
    assert np.array_equal(retrained.key, saved.key)


def test_identical_copies_have_barrier_exactly_zero(run):
    res = instability.instability(run, 2, 20, points=11, same_order=True)
    assert res.barrier == 0.0
    assert np.all(res.errors == res.errors[0])
    assert res.alphas.tolist() == np.linspace(0, 1, 11).tolist()
    assert res.density == 0.64  # level 2 of fraction 0.2: 0.8 ** 2 of the prunable weights


def test_different_orders_copy_a_retraces_the_level(run):
    res = instability.instability(run, 1, "20it", points=5)
    final = run.metrics(1)[-1]["test_accuracy"]
    assert res.errors[0] == pytest.approx(1.0 - final, abs=1e-9)  # copy A is level 1's training
    assert res.errors.shape == (5,) and res.rewind_step == 20 and not res.same_order
    assert res.barrier == pytest.approx(res.errors.max() - (res.errors[0] + res.errors[-1]) / 2)
    setup = instability.setup_for(run)
    start = instability.rewind_state(run, setup, 20)
    mask = jax.tree.map(np.asarray, run.mask(1))
    a, b = instability.train_copies(setup, start, mask)
    assert _equal(a.params, run.weights(1))  # vmapped copy A == the run's own level 1
    assert not _equal(a.params, b.params)
    err_b = 1.0 - float(train_lib.evaluate(setup.trainer, b, mask, setup.data.x_test,
                                           setup.data.y_test)["test_accuracy"])
    assert res.errors[-1] == pytest.approx(err_b, abs=1e-9)


def test_cli_prints_barrier_and_writes_png(run, tmp_path, capsys):
    png = tmp_path / "curve.png"
    assert cli.run(["instability", run.path, "--level", "2", "--rewind-it", "20", "--points", "3",
                    "--same-order", "--out", str(png), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["barrier"] == 0.0 and len(out["errors"]) == 3 and out["png"] == str(png)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 5000


@pytest.mark.parametrize("kwargs, message", [
    ({"level": 7, "rewind_step": 20}, "level 7 does not exist in {run}; complete levels: 0-2"),
    ({"level": 1, "rewind_step": 60}, "--rewind-it 60 (60 iterations): must be before the end "
                                      "of training (60 iterations)"),
    ({"level": 1, "rewind_step": "soon"}, "--rewind-it='soon': expected an int or a string"),
    ({"level": 1, "rewind_step": 20, "points": 1}, "points=1: expected an int >= 2"),
])
def test_bad_input(run, kwargs, message):
    with pytest.raises(ValueError) as e:
        instability.instability(run, **kwargs)
    assert message.format(run=run.path) in str(e.value)
