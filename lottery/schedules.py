"""Density schedules: how much of the network is kept after each pruning step.

All values are densities (fraction of prunable weights KEPT). The functions are pure and take
Python numbers or jax arrays: with Python/numpy inputs they compute in numpy float64 (so the end
points are exact and counts derived from them are exact), with jax arrays or tracers they compute
in jnp, so they can be used inside `jit` (e.g. with a traced training step).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _xp(*args):
    """jnp if any argument is a jax array (or tracer), numpy otherwise."""
    return jnp if any(isinstance(a, jax.Array) for a in args) else np


def _static(x) -> float | None:
    """`x` as a Python float when it is a concrete number, None when it is a tracer."""
    try:
        return float(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _check_density(name: str, value) -> None:
    v = _static(value)
    if v is not None and not 0.0 < v <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (fraction of prunable weights kept), "
                         f"got {value}")


def _check_rounds(rounds) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"rounds must be a Python int >= 1, got {rounds!r}")


def imp_density(level, fraction=0.2):
    """Density after `level` IMP levels that each remove `fraction` of the remaining weights."""
    f = _static(fraction)
    if f is not None and not 0.0 <= f < 1.0:
        raise ValueError(f"fraction must be in [0, 1) (share of remaining weights removed), "
                         f"got {fraction}")
    return (1.0 - fraction) ** level


def levels_to_density(density: float, fraction: float = 0.2) -> int:
    """The smallest number of IMP levels whose density (1 - fraction)**levels is <= `density`."""
    _check_density("density", density)
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"fraction must be in (0, 1) to reach a density below 1, got {fraction}")
    density, fraction = float(density), float(fraction)
    level = max(0, math.ceil(math.log(density) / math.log1p(-fraction)))
    # The logarithms may be off by one ulp; settle the boundary with the power itself.
    while (1.0 - fraction) ** level > density:
        level += 1
    while level > 0 and (1.0 - fraction) ** (level - 1) <= density:
        level -= 1
    return level


def exponential(density, rounds: int):
    """Densities of rounds 1..R: density**(r / R) (Synaptic-Flow's default for iterative SynFlow).

    The last value is exactly `density`; `rounds` is a Python int (it fixes the output length).
    """
    _check_density("density", density)
    _check_rounds(rounds)
    xp = _xp(density)
    r = xp.arange(1, rounds + 1)
    return xp.asarray(density) ** (r / rounds)


def linear(density, rounds: int):
    """Densities of rounds 1..R: 1 - (1 - density) * r / R, falling by equal steps.

    Computed as density + (1 - density) * (1 - r / R) so the last value is exactly `density`.
    """
    _check_density("density", density)
    _check_rounds(rounds)
    xp = _xp(density)
    r = xp.arange(1, rounds + 1)
    return density + (1.0 - xp.asarray(density)) * (1.0 - r / rounds)


SCHEDULES: dict[str, Callable] = {"exponential": exponential, "linear": linear}


def get(name: str) -> Callable:
    """The round schedule called `name`: 'exponential' or 'linear'."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {name!r}")
    return SCHEDULES[name]


def agp(step, *, final_density, start_step, end_step, initial_density=1.0):
    """Automated gradual pruning (Zhu & Gupta 2017, arXiv:1710.01878), written in density.

    d_t = d_f + (d_i - d_f) * (1 - clip((t - t0) / (t_end - t0), 0, 1))**3: density falls fast
    right after `start_step` and flattens out at `final_density` from `end_step` on. It equals the
    paper's sparsity form s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3 with s = 1 - d and
    n * dt = t_end - t0. `step` may be traced; the step bounds are Python numbers.
    """
    if not start_step < end_step:
        raise ValueError(f"start_step must be < end_step, got start_step={start_step}, "
                         f"end_step={end_step}")
    _check_density("final_density", final_density)
    _check_density("initial_density", initial_density)
    d_f, d_i = _static(final_density), _static(initial_density)
    if d_f is not None and d_i is not None and d_f > d_i:
        raise ValueError(f"final_density must be <= initial_density, got final_density="
                         f"{final_density}, initial_density={initial_density}")
    xp = _xp(step, final_density, initial_density)
    progress = xp.clip((step - start_step) / (end_step - start_step), 0.0, 1.0)
    return final_density + (initial_density - final_density) * (1.0 - progress) ** 3
