"""Instability analysis: are two copies trained from a rewind point linearly mode connected?

Frankle, Dziugaite, Roy & Carbin 2020, "Linear Mode Connectivity and the Lottery Ticket
Hypothesis" (https://arxiv.org/abs/1912.05671): take the network at iteration k of dense training
(level 0), apply a level's mask, train two copies to the end with different data orders, and
evaluate the masked network on the straight line between their final weights. The error barrier
is the highest test error on that line minus the mean of the two end points' errors; a network
is "stable" at k when the barrier is about 0. This is how the rewind iteration is chosen.

Copy A keeps the rewind point's data-order key, so for a run that rewound to the same iteration
it retraces that level's own training; copy B's key is derived from it. The two copies train as
one vmapped program (`lottery.train.train(..., replicas=True)`). With `same_order=True` both use
copy A's key, which must give a barrier of exactly 0.

`lottery instability RUN_DIR --level N --rewind-it K` prints and draws it (`lottery.report`).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lottery import checkpoints, config as config_lib, masks, steps as steps_lib
from lottery import train as train_lib
from lottery.experiment import Setup
from lottery.runs import Run

PyTree = Any


class Result(NamedTuple):
    """An instability measurement: the test error at each alpha along the path A -> B."""

    level: int
    rewind_step: int  # iterations
    density: float  # fraction of prunable weights kept by the level's mask
    alphas: np.ndarray  # 0 = copy A, 1 = copy B
    errors: np.ndarray  # test error (1 - accuracy) at each alpha
    barrier: float  # max(errors) - (errors[0] + errors[-1]) / 2
    same_order: bool

    def to_json(self) -> dict:
        return {"level": self.level, "rewind_step": self.rewind_step, "density": self.density,
                "alphas": self.alphas.tolist(), "errors": self.errors.tolist(),
                "barrier": self.barrier, "same_order": self.same_order}


def error_barrier(errors) -> float:
    """Max error on the path minus the mean of the end points' errors (Frankle et al. 2020)."""
    errors = np.asarray(errors, float)
    if errors.ndim != 1 or errors.size < 2:
        raise ValueError(f"errors: expected a 1-D array of >= 2 points, got shape {errors.shape}")
    return float(errors.max() - (errors[0] + errors[-1]) / 2)


def interpolate(a: PyTree, b: PyTree, alpha: float) -> PyTree:
    """(1 - alpha) * a + alpha * b per leaf; exactly a at 0, b at 1, and wherever a == b."""
    return jax.tree.map(lambda x, y: jnp.where(x == y, x, (1 - alpha) * x + alpha * y), a, b)


def rewind_state(run: Run, setup, step: int) -> train_lib.TrainState:
    """Level 0's unmasked training state at iteration `step`: the run's saved rewind point if it
    is at `step`, else level 0's init trained for `step` iterations with the run's recipe."""
    rewind_path = os.path.join(run.path, "rewind")
    if checkpoints.exists(rewind_path) and run.rewind().step == step:
        return checkpoints.restore(rewind_path, setup.template(),
                                   hint=f"(rewind point of run {run.path})")
    init = checkpoints.restore(os.path.join(run.path, "init"), setup.variables,
                               hint=f"(init of run {run.path})")
    state = setup.fresh_state(init)
    if step > 0:
        state, _ = train_lib.train(setup.trainer, state, masks.init(init["params"]), setup.data,
                                   num_steps=step, eval_every=step, progress=False)
    return state


def train_copies(setup, start: train_lib.TrainState, mask: PyTree, *,
                 same_order: bool = False, progress: bool = False):
    """Train two copies of `start` under `mask` to the recipe's end as vmapped replicas.

    Copy A keeps start's data-order key; copy B gets one derived from it (or the same key with
    `same_order`). Returns the two final states.
    """
    start = start.replace(params=masks.apply(start.params, mask))
    key_b = start.key if same_order else jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(start.key), 1))
    pair = train_lib.stack([start, start.replace(key=key_b)])
    final, _ = train_lib.train(setup.trainer, pair, train_lib.stack([mask, mask]), setup.data,
                               num_steps=setup.total, eval_every=setup.total, replicas=True,
                               progress="instability copies" if progress else False)
    return tuple(train_lib.unstack(final))


def path_errors(trainer: train_lib.Trainer, a: train_lib.TrainState, b: train_lib.TrainState,
                mask: PyTree, x, y, alphas, *, batch_size: int = 1000) -> np.ndarray:
    """Test error of the masked network at each alpha on the line from `a` to `b` (params and
    batch-norm statistics interpolated)."""
    errors = []
    for alpha in np.asarray(alphas, float):
        st = a.replace(params=interpolate(a.params, b.params, alpha),
                       batch_stats=interpolate(a.batch_stats, b.batch_stats, alpha))
        acc = train_lib.evaluate(trainer, st, mask, x, y, batch_size=batch_size)["test_accuracy"]
        errors.append(1.0 - float(acc))
    return np.asarray(errors)


@functools.lru_cache(maxsize=1)
def _setup(config_json: str) -> Setup:
    return Setup(config_lib.from_saved(json.loads(config_json)))


def setup_for(run: Run) -> Setup:
    """The run's `experiment.Setup` (data, model, trainer, step counts); the last one is kept,
    so repeated analyses of a run reuse its loaded data and compiled steps."""
    return _setup(json.dumps(run.config.to_dict(), sort_keys=True))


def instability(run_dir: str | Run, level: int, rewind_step: int | str, *, points: int = 11,
                same_order: bool = False, progress: bool = False) -> Result:
    """The error barrier of `level`'s mask with rewinding to `rewind_step` (iterations or a step
    string like '1ep'), on `points` evenly spaced alphas in [0, 1]."""
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    level = run.check_level(level, complete=False)
    mask = run.mask(level)  # fails early, naming the levels, if the level has no mask
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points={points!r}: expected an int >= 2 (the path's end points "
                         f"included)")
    setup = setup_for(run)
    k = steps_lib.parse(rewind_step, setup.spe, name="--rewind-it")
    if not k < setup.total:
        raise ValueError(f"--rewind-it {rewind_step!r} ({k} iterations): must be before the end "
                         f"of training ({setup.total} iterations)")
    mask = jax.tree.map(jnp.asarray, mask)
    start = rewind_state(run, setup, k)
    a, b = train_copies(setup, start, mask, same_order=same_order, progress=progress)
    alphas = np.linspace(0.0, 1.0, points)
    errors = path_errors(setup.trainer, a, b, mask, setup.data.x_test, setup.data.y_test, alphas,
                         batch_size=setup.cfg.eval_batch_size)
    return Result(level, k, masks.density(mask, run.rates), alphas, errors,
                  error_barrier(errors), same_order)
