"""Layer collapse (Tanaka et al. 2020, arXiv:2006.05467): one-shot SynFlow on LeNet-300-100 at
density 0.01 empties the largest layer; 100 rounds of iterative SynFlow do not."""

import jax
import numpy as np
import pytest

from lottery import masks, models, prune, scorers

DENSITY = 0.01


@pytest.fixture(scope="module")
def lenet():
    model = models.create("lenet300_100")
    variables = models.init(model, jax.random.PRNGKey(0), (28, 28, 1))  # Kaiming-normal kernels
    inputs = scorers.Inputs.create(models.inference_fn(model, variables), None,
                                   input_shape=(1, 28, 28, 1))
    params = variables["params"]
    mask = masks.init(params)
    return params, mask, inputs, jax.jit(scorers.synflow)(params, mask, inputs)


def test_one_shot_synflow_collapses_fc1(lenet):
    params, mask, inputs, scores = lenet
    out = prune.to_density(scores, mask, DENSITY)
    n = sum(t for _, t in masks.counts(mask).values())
    assert sum(k for k, _ in masks.counts(out).values()) == round(DENSITY * n)
    # SynFlow's per-layer score sums are equal (conservation), so the 235,200-weight fc1 has by
    # far the smallest scores per weight and is the layer that goes first.
    assert prune.collapsed(out) == ["fc1/kernel"]
    with pytest.raises(ValueError, match="fc1/kernel"):
        prune.to_density(scores, mask, DENSITY, allow_collapse=False)


def test_conservation_behind_the_collapse(lenet):
    # The mechanism: every layer's SynFlow scores sum to the same R (here with zero biases).
    params, mask, inputs, scores = lenet
    sums = [float(np.sum(np.asarray(scores[k]["kernel"], np.float64)))
            for k in ["fc1", "fc2", "out"]]
    np.testing.assert_allclose(sums, sums[0], rtol=1e-3)


def test_iterative_synflow_keeps_every_layer(lenet):
    params, mask, inputs, _ = lenet
    traces = []

    def synflow(p, m, i):
        traces.append(1)  # Python side effect: once per trace, not once per round
        return scorers.synflow(p, m, i)

    out = prune.iterative(synflow, params, mask, inputs, DENSITY, rounds=100,
                          allow_collapse=False)
    counts = masks.counts(out)
    n = sum(t for _, t in counts.values())
    assert sum(k for k, _ in counts.values()) == round(DENSITY * n)
    assert prune.collapsed(out) == []
    assert all(k > 0 for k, _ in counts.values()), counts
    # The 100 rounds are one compiled program: the scorer was traced once, not 100 times.
    assert len(traces) == 1
