"""The optimizers and learning-rate schedules of the training recipes, as optax transformations.

SGD (optional momentum, Nesterov), Adam and AdamW; constant, step-decay and cosine schedules
after an optional linear warmup. Lengths are iterations (the configs' step strings are parsed by
`lottery.steps` before they get here). Weight decay follows PyTorch and OpenLTH: L2 added to the
gradient for SGD and Adam, decoupled for AdamW.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "step", "cosine")


def learning_rate(lr: float, *, schedule: str = "constant", total_steps: int | None = None,
                  warmup_steps: int = 0, milestones: Sequence[int] = (), gamma: float = 0.1):
    """An optax schedule: constant, step decay by `gamma` at `milestones` (iterations) or cosine,
    after a linear warmup of `warmup_steps`."""
    if not lr > 0:
        raise ValueError(f"lr={lr}: the learning rate must be > 0")
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: expected one of {LR_SCHEDULES}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps}: must be >= 0")
    if schedule == "constant":
        main = optax.constant_schedule(lr)
    elif schedule == "step":
        main = optax.piecewise_constant_schedule(lr, {int(m): gamma for m in milestones})
    else:
        if not total_steps:
            raise ValueError("schedule='cosine' needs total_steps > 0")
        main = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup_steps))
    if schedule == "step" and warmup_steps:
        # milestones count from step 0, also during warmup
        warm = optax.linear_schedule(0.0, lr, warmup_steps)
        return lambda t: jnp.where(t < warmup_steps, warm(t), main(t))
    if warmup_steps:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main],
                                    [warmup_steps])
    return main


def optimizer(name: str = "sgd", lr=0.1, *, momentum: float = 0.0, nesterov: bool = False,
              weight_decay: float = 0.0) -> optax.GradientTransformation:
    """SGD (with optional momentum / Nesterov), Adam or AdamW; `lr` a float or an optax schedule.

    SGD and Adam apply `weight_decay` as L2 added to the gradient (as PyTorch and OpenLTH do);
    AdamW decouples it.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r}: expected one of {OPTIMIZERS}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay}: must be >= 0")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum={momentum}: must be in [0, 1)")
    if name == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay)
    inner = (optax.sgd(lr, momentum=momentum or None, nesterov=nesterov) if name == "sgd"
             else optax.adam(lr))
    return optax.chain(optax.add_decayed_weights(weight_decay), inner) if weight_decay else inner
