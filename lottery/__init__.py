"""lottery: lottery tickets and pruning experiments in JAX.

Units everywhere: density = fraction of prunable weights kept; fraction = share of the currently
remaining weights removed in one pruning step. Nothing takes percentages.

    mask = lottery.masks.init(params)
    scores = lottery.scorers.synflow(params, mask, lottery.Inputs.create(apply_fn, input_shape=...))
    mask = lottery.prune.to_density(scores, mask, 0.01)
    print(lottery.masks.summary(mask))
"""

from lottery import (checkpoints, compact, config, data, distributed, experiment, experiments,
                     export, gradual, groups, imp, instability, masks, metrics, models, pai,
                     prune, rundir, runs, schedules, scorers, sensitivity, sparse, steps, train)
from lottery.scorers import Inputs

__all__ = ["checkpoints", "compact", "config", "data", "distributed", "experiment",
           "experiments", "export", "gradual", "groups", "imp", "instability", "masks", "metrics",
           "models", "pai", "prune", "rundir", "runs", "schedules", "scorers", "sensitivity",
           "sparse", "steps", "train", "Inputs"]
__version__ = "0.1.0"
