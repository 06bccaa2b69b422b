"""Pruning schedules during training: one-shot prune + fine-tune, and automated gradual pruning.

The baselines a found ticket is compared against, as experiment kinds with the run directory,
resume and `lottery inspect` support of `find-ticket` (lottery.imp):

  oneshot  Train the dense network for `training_steps` (level 0), prune it to `final_density`
           in one step with any scorer (`scorer`, `scope` global or layerwise, `structure`
           'weights' or whole output 'units' ranked by the `unit_norm` of their scores), then
           fine-tune the survivors for `finetune_steps` at constant `finetune_lr` with a fresh
           optimizer (level 1). This is IMP's 'finetune' rewind with a single pruning step.
  agp      Automated gradual pruning (Zhu & Gupta 2017, arXiv:1710.01878): one training run of
           `training_steps`; at steps prune_start, prune_start + prune_every, ... and prune_end,
           before that step, the mask is recomputed by global (or layerwise) magnitude to the
           density `schedules.agp(step)`, which falls as a cubic from 1 to `final_density`;
           training then continues at the final density. The mask update (`agp_update`) runs
           inside `train.train`'s compiled step, on one device or a mesh, with kept counts
           precomputed exactly on the host: round-half-up(density * prunable weights), as
           `prune.to_density` counts them. Pruned weights are set to 0.0 when pruned and never
           revive (masks only shrink).

structure='groups' (both kinds): whole coupled channel groups (`lottery.groups`) ranked by
`group_scorer`, and `final_density` / the schedule count CHANNELS: keep round-half-up(density *
channels) of the groups not excluded (global) or of each group (layerwise). AGP re-ranks them
inside the compiled step too (`agp_update(groups=...)`); that step has no batch, so `taylor` is
for oneshot only.

Units: density = fraction of prunable weights KEPT, in (0, 1] (of channels for groups). Step
fields are step strings ('40ep', '500it', see lottery.steps).

Run directory `<workdir>/<experiment>_<model>_<dataset>_<hash>/` (hash as `config.run_name`):
  config.json, init/, rewind/ (oneshot only: the fine-tune start needs it, as in imp)
  oneshot: level_0/ (dense) and level_1/ (pruned, fine-tuned), each exactly as an IMP level:
           {mask/, final/, info.json, metrics.jsonl, checkpoint/<step>/, DONE}
  agp:     level_0/{checkpoint/<step>/ ({'state', 'mask'} for resume), metrics.jsonl,
           final/, mask/, info.json, DONE}; final/, mask/ and info.json (density, kept, total,
           layers, as imp writes it) are written at the end, with the final mask.
Seeds (`seeds` = K > 0): the K seeds' run directories, each as its seed alone writes it, every
level of all seeds trained together as replicas (`experiment.train_levels`).
metrics.jsonl: one line per evaluation: step, train_loss, test_loss, test_accuracy, and for agp
the density of the mask the network had at that step.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lottery import checkpoints, config as config_lib, groups as groups_lib, masks, models, prune
from lottery import rundir, schedules
from lottery import scorers, steps as steps_lib, train as train_lib
from lottery.experiment import Setup, init_variables, level_final, level_mask, seed_configs
from lottery.experiment import seed_setups, train_levels

PyTree = Any

EXPERIMENTS = ("oneshot", "agp")
STRUCTURES = config_lib.STRUCTURES["oneshot"]


def base_config(experiment: str = "agp") -> ml_collections.ConfigDict:
    """`config.base()` plus the schedule fields, for `experiment` 'agp' or 'oneshot'."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment={experiment!r}: expected one of {', '.join(EXPERIMENTS)}")
    c = config_lib.base()
    c.experiment = experiment
    c.final_density = 0.1  # fraction of prunable weights (structure groups: channels) kept
    # agp: the cubic schedule runs from prune_start to prune_end, a new mask every prune_every
    c.prune_start = "0it"
    c.prune_end = "30ep"
    c.prune_every = "1ep"
    # oneshot, structure='units': a unit's score from its weights' scores: l1 | l2 | sum
    c.unit_norm = "l1"
    if experiment == "oneshot":
        c.rewind = "finetune"  # level 1 fine-tunes the pruned dense weights
        c.levels = 1
    else:
        c.levels = 0
    return c


def _parse(cfg, field: str, spe: int) -> int:
    return steps_lib.parse(cfg[field], spe, name=field)


def validate(cfg: ml_collections.ConfigDict, steps_per_epoch: int | None = None) -> None:
    """Raise ValueError naming the first bad field and its allowed values; with the data's
    `steps_per_epoch`, also check the step fields against each other."""
    if cfg.get("experiment") not in EXPERIMENTS:
        raise ValueError(f"experiment={cfg.get('experiment')!r}: expected one of "
                         f"{', '.join(EXPERIMENTS)} (start the config from "
                         f"lottery.gradual.base_config)")
    missing = [f for f in ("final_density", "prune_start", "prune_end", "prune_every",
                           "structure", "unit_norm") if f not in cfg]
    if missing:
        raise ValueError(f"config has no field {missing[0]!r}: start it from "
                         f"lottery.gradual.base_config({cfg.experiment!r})")
    config_lib.validate(cfg, steps_per_epoch)
    d = cfg.final_density
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
        raise ValueError(f"final_density={d!r}: must be in (0, 1] (fraction of prunable "
                         f"weights, or channels for structure='groups', kept)")
    if cfg.controls:
        raise ValueError(f"controls={cfg.controls!r}: controls are not supported for experiment "
                         f"{cfg.experiment!r}; expected ''")
    spe = steps_per_epoch or 1
    total = _parse(cfg, "training_steps", spe)
    if cfg.experiment == "oneshot":  # config.validate checked `structure`
        if cfg.unit_norm not in prune.NORMS:
            raise ValueError(f"unit_norm={cfg.unit_norm!r}: expected one of "
                             f"{', '.join(prune.NORMS)}")
        if cfg.rewind != "finetune":
            raise ValueError(f"rewind={cfg.rewind!r}: a one-shot run fine-tunes after pruning; "
                             f"expected 'finetune'")
        if cfg.finetune_steps and not _parse(cfg, "finetune_steps", spe) > 0:
            raise ValueError(f"finetune_steps={cfg.finetune_steps!r}: must be > 0")
        return
    if cfg.scorer != "magnitude":
        raise ValueError(f"scorer={cfg.scorer!r}: AGP prunes by magnitude; expected 'magnitude'")
    if cfg.structure == "groups" and cfg.group_scorer == "taylor":
        raise ValueError(f"group_scorer={cfg.group_scorer!r}: AGP re-ranks channels inside the "
                         f"compiled step, which has no batch for it; expected one of "
                         f"{', '.join(k for k in groups_lib.SCORERS if k != 'taylor')}")
    if cfg.count_rule != "exact":
        raise ValueError(f"count_rule={cfg.count_rule!r}: AGP counts as lottery does (neither "
                         f"reference has AGP); expected 'exact'")
    start, end = _parse(cfg, "prune_start", spe), _parse(cfg, "prune_end", spe)
    every = _parse(cfg, "prune_every", spe)
    # Without the data's epoch length, only compare lengths that do not depend on it.
    def known(*fields):
        return steps_per_epoch or all(_parse(cfg, f, 1) == _parse(cfg, f, 2) for f in fields)

    if known("prune_start", "prune_end") and not start < end:
        raise ValueError(f"prune_start={cfg.prune_start!r} must be before prune_end="
                         f"{cfg.prune_end!r}" + (f" ({start} vs {end} iterations)"
                                                 if steps_per_epoch else ""))
    if not every > 0:
        raise ValueError(f"prune_every={cfg.prune_every!r}: must be > 0 iterations")
    if known("prune_end", "training_steps") and not end < total:
        raise ValueError(f"prune_end={cfg.prune_end!r} ({end} iterations) must be before the end "
                         f"of training (training_steps={cfg.training_steps!r}, {total} "
                         f"iterations): training continues at the final density")


# ----------------------------------------------------------------------------------------------
# The AGP schedule, as a mask update of the training loop.


class Schedule(NamedTuple):
    """When the mask is recomputed and to how many weights: `steps` int32 [K] (ascending), and
    `counts` int32 [K, S] kept weights per event (S = 1 for global scope, one per prunable leaf
    for layerwise)."""

    steps: np.ndarray
    counts: np.ndarray


def prune_steps(start: int, end: int, every: int) -> list[int]:
    """The steps at which AGP prunes: start, start + every, ... below end, and end itself."""
    if not start < end:
        raise ValueError(f"prune_start={start} must be before prune_end={end}")
    if not every > 0:
        raise ValueError(f"prune_every={every}: must be > 0")
    return sorted(set(range(start, end, every)) | {end})


def agp_schedule(mask: PyTree, rates: PyTree | None, *, final_density: float, start: int,
                 end: int, every: int, scope: str = "global",
                 initial_density: float = 1.0) -> Schedule:
    """The events of an AGP run on `mask`'s prunable weights: at step t keep
    the counts `prune.keep_counts` gives for density schedules.agp(t) in `scope` (global:
    round-half-up(d * n) of all n prunable weights; layerwise: of each leaf's; uniform / erk:
    the global count split over the leaves). Channel masks (`groups.init`) with per-group rates
    (`groups.prunable`) give the counts of channels, for `agp_update(groups=...)`.

    The density at each event is computed in float64 on the host and rounded exactly (read as its
    shortest decimal, as `prune.to_density` reads a Python density).
    """
    if scope not in prune.SCOPES:
        raise ValueError(f"scope={scope!r}: expected one of {', '.join(prune.SCOPES)}")
    steps = prune_steps(start, end, every)
    counts = []
    for t in steps:
        d = float(schedules.agp(t, final_density=final_density, start_step=start, end_step=end,
                                initial_density=initial_density))
        counts.append(np.atleast_1d(prune.keep_counts(mask, d, scope=scope, rates=rates)))
    return Schedule(np.asarray(steps, np.int32), np.asarray(counts, np.int32))


@functools.lru_cache(maxsize=None)
def _agp_fn(scope: str, rates_l: tuple[float, ...], groups: groups_lib.Groups | None = None,
            group_scorer: str = "l1", exclude: tuple[int, ...] = ()):
    """The AGP mask update for one scope and tuple of leaf rates (or channel groups, their
    scorer and the excluded ones): one function object each, so one compiled training program
    serves every run that shares them."""

    def update(schedule: Schedule, state: train_lib.TrainState, mask: PyTree):
        hit = schedule.steps == state.step

        def reprune(carry):
            st, m = carry
            counts = schedule.counts[jnp.argmax(hit)]
            if groups is not None:  # whole channels, re-ranked on device
                new, _ = groups_lib.prune_to_counts(groups, group_scorer, st.params, m, counts,
                                                    scope=scope, exclude=exclude)
            else:
                rates = jax.tree.unflatten(jax.tree.structure(m), rates_l)
                new = prune.to_counts(scorers.magnitude(st.params, m), m, counts, scope=scope,
                                      rates=rates)
            return st.replace(params=masks.apply(st.params, new)), new

        return jax.lax.cond(jnp.any(hit), reprune, lambda carry: carry, (state, mask))

    return update


def agp_update(schedule: Schedule, mask: PyTree, rates: PyTree | None = None,
               scope: str = "global", *, groups: groups_lib.Groups | None = None,
               group_scorer: str = "l1") -> train_lib.MaskUpdate:
    """AGP as a `train.MaskUpdate`: before a step of `schedule`, keep the event's count of alive
    weights with the largest |w| (the newly pruned ones become 0.0). Pass it to `train.train`
    (`mask_update=`); `rates` and `scope` as given to `agp_schedule`. With `groups`, keep the
    event's count of alive channels by `group_scorer` (not taylor: no batch here), the groups
    with a producer at rate 0 left whole: the schedule is `agp_schedule(groups.init(groups),
    groups.prunable(groups, excluded))`."""
    rates = masks.resolve_rates(mask, rates)
    rates_l = tuple(float(r) for r in jax.tree.leaves(rates))
    skip = tuple(groups_lib.excluded(groups, rates)) if groups is not None else ()
    args = Schedule(jnp.asarray(schedule.steps, jnp.int32), jnp.asarray(schedule.counts, jnp.int32))
    return train_lib.MaskUpdate(_agp_fn(scope, rates_l, groups, group_scorer, skip), args)


# ----------------------------------------------------------------------------------------------
# Run directories.


def _levels(experiment: str) -> tuple[int, ...]:
    return (0, 1) if experiment == "oneshot" else (0,)


@contextlib.contextmanager
def _open_run(cfg: ml_collections.ConfigDict, workdir: str, discard: int | None):
    """Validate everything (data included), then lock (`rundir.writing_all`) and create or reopen
    the run directories of the config's seeds (`experiment.seed_configs`; one without `seeds`)
    with their config.json and init/; yields lists, one entry per seed, (setups, run_dirs,
    initial variables) with the locks held, or (None, run_dirs, None) when every run is finished
    (nothing to load or write)."""
    validate(cfg)
    if discard is not None and discard not in _levels(cfg.experiment):
        raise ValueError(f"--discard-level {discard}: expected a level of an experiment="
                         f"{cfg.experiment!r} run: {', '.join(map(str, _levels(cfg.experiment)))}")
    cfgs = seed_configs(cfg)
    run_dirs = [rundir.prepare(c, workdir) for c in cfgs]
    if discard is None and all(rundir.is_done(rundir.level_dir(run_dir, lv))
                               for run_dir in run_dirs for lv in _levels(cfg.experiment)):
        yield None, run_dirs, None
        return
    setups = seed_setups(Setup(cfgs[0]), cfgs)
    validate(cfgs[0], setups[0].spe)
    with rundir.writing_all(run_dirs, cfgs):
        if discard is not None:
            for run_dir in run_dirs:
                rundir.discard_level(run_dir, discard)
        yield setups, run_dirs, [init_variables(s, d) for s, d in zip(setups, run_dirs)]


def run_agp(cfg: ml_collections.ConfigDict, workdir: str, *, discard: int | None = None,
            callback: Callable[[train_lib.TrainState, PyTree, dict], None] | None = None
            ) -> str | list[str]:
    """Run (or resume) an AGP experiment; returns its run directory, or with `seeds` the
    seeds' run directories (their AGP runs trained together as replicas of one program).

    `callback(state, mask, record)` is called at every pause after the run's own bookkeeping
    (metrics line, checkpoint), e.g. for custom logging (once per seed, with its share).
    """
    if cfg.get("experiment") != "agp":
        raise ValueError(f"experiment={cfg.get('experiment')!r}: run_agp needs 'agp'")
    with _open_run(cfg, workdir, discard) as (setups, run_dirs, inits):
        if setups is not None:
            _agp_level(setups, run_dirs, inits, callback)
    return run_dirs if cfg.get("seeds", 0) else run_dirs[0]


def _agp_level(setups, run_dirs, inits, callback) -> None:
    """Level 0 of every seed's AGP run; the seeds share the schedule (it depends on shapes and
    rates only), so they train as replicas sharing the mask update's arguments."""
    s, cfg = setups[0], setups[0].cfg
    mask = masks.init(inits[0]["params"])
    units, rates, g = mask, s.rates, None
    if cfg.structure == "groups":  # the schedule counts channels
        g, skip = s.groups()
        units, rates = groups_lib.init(g), groups_lib.prunable(g, skip)
    schedule = agp_schedule(units, rates, final_density=cfg.final_density,
                            start=_parse(cfg, "prune_start", s.spe),
                            end=_parse(cfg, "prune_end", s.spe),
                            every=_parse(cfg, "prune_every", s.spe), scope=cfg.scope)
    update = agp_update(schedule, mask, s.rates, cfg.scope, groups=g,
                        group_scorer=cfg.group_scorer)
    train_levels([(sk, d, mask, None) for sk, d in zip(setups, run_dirs)], 0,
                 f"agp to density {cfg.final_density}", mask_update=update, callback=callback)


def oneshot_mask(params: PyTree, mask: PyTree, inputs: scorers.Inputs | None, *,
                 density: float, scorer: str = "magnitude", scope: str = "global",
                 structure: str = "weights", unit_norm: str = "l1",
                 rates: PyTree | None = None, count_rule: str = "exact",
                 count_basis: PyTree | None = None, groups: groups_lib.Groups | None = None,
                 group_scorer: str = "l1") -> PyTree:
    """One pruning step to `density` of the prunable weights: the alive weights with the highest
    `scorer` scores (`scope` global or layerwise, exact counts as `prune.to_density`), or with
    structure 'units' whole output units ranked by the `unit_norm` of their weights' scores
    (`prune.units_to_density`; `count_rule` applies to weights only), or with structure 'groups'
    round-half-up(density * channels) of the model's `groups` by `group_scorer`
    (`lottery.groups.prune`; groups with a producer at rate 0 are left whole). `inputs` is what
    the scorer needs (None for magnitude)."""
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r}: expected one of {', '.join(STRUCTURES)}")
    if structure == "groups":
        if groups is None:
            raise ValueError("structure='groups' needs the model's groups (lottery.groups.derive)")
        skip = groups_lib.excluded(groups, masks.resolve_rates(mask, rates))
        return groups_lib.prune(groups, group_scorer, params, mask, density, inputs=inputs,
                                scope=scope, exclude=skip)[0]
    scores = scorers.get(scorer)(params, mask, inputs)
    if structure == "units":
        units = prune.unit_scores(scores, masks.resolve_rates(mask, rates), unit_norm)
        return prune.units_to_density(units, mask, density, scope=scope, rates=rates)
    return prune.to_density(scores, mask, density, scope=scope, rates=rates,
                            count_rule=count_rule, count_basis=count_basis)


def _scoring_inputs(s: Setup, trained: train_lib.TrainState) -> scorers.Inputs:
    """What data-dependent scorers see: the first 256 training examples, as IMP scores."""
    x, y = s.data.x_train[:256], s.data.y_train[:256]
    variables = {**s.variables, "batch_stats": trained.batch_stats} \
        if trained.batch_stats else s.variables
    return scorers.Inputs.create(models.inference_fn(s.model, variables),
                                 (jnp.asarray(x), jnp.asarray(y)),
                                 input_shape=(1, *s.input_shape),
                                 key=jax.random.fold_in(s.key, 2), rates=s.rates)


def _prune_once(s: Setup, trained: train_lib.TrainState, mask: PyTree) -> PyTree:
    """Level 1's mask: `oneshot_mask` of level 0's trained weights, as the config asks."""
    cfg = s.cfg
    g = s.groups()[0] if cfg.structure == "groups" else None
    return oneshot_mask(trained.params, mask, _scoring_inputs(s, trained),
                        density=cfg.final_density, scorer=cfg.scorer, scope=cfg.scope,
                        structure=cfg.structure, unit_norm=cfg.unit_norm, rates=s.rates,
                        count_rule=cfg.count_rule,
                        count_basis=config_lib.count_basis(cfg, trained.params), groups=g,
                        group_scorer=cfg.group_scorer)


def run_oneshot(cfg: ml_collections.ConfigDict, workdir: str, *,
                discard: int | None = None) -> str | list[str]:
    """Run (or resume) a one-shot prune + fine-tune experiment; returns its run directory, or
    with `seeds` the seeds' run directories (each level of all seeds trained together)."""
    if cfg.get("experiment") != "oneshot":
        raise ValueError(f"experiment={cfg.get('experiment')!r}: run_oneshot needs 'oneshot'")
    with _open_run(cfg, workdir, discard) as (setups, run_dirs, inits):
        if setups is not None:
            _oneshot_levels(setups, run_dirs, inits)
    return run_dirs if cfg.get("seeds", 0) else run_dirs[0]


def _oneshot_levels(setups, run_dirs, inits) -> None:
    runs = list(zip(setups, run_dirs))
    for (s, run_dir), init_vars in zip(runs, inits):
        rewind_path = os.path.join(run_dir, "rewind")
        if not checkpoints.exists(rewind_path):
            rundir.rmtree(rewind_path)
            checkpoints.save(rewind_path, s.fresh_state(init_vars))
    level_masks, finals = [masks.init(v["params"]) for v in inits], [None] * len(runs)
    for level in (0, 1):
        level_masks = [level_mask(s, run_dir, level, mask, lambda: mask if level == 0 else
                                  _prune_once(s, final, mask))
                       for (s, run_dir), mask, final in zip(runs, level_masks, finals)]
        prev, todo = finals, [i for i, (_, run_dir) in enumerate(runs)
                              if not rundir.is_done(rundir.level_dir(run_dir, level))]
        finals = [None if i in todo else level_final(s, run_dir, level)
                  for i, (s, run_dir) in enumerate(runs)]
        desc = "dense training" if level == 0 else \
            f"fine-tune (density {masks.density(level_masks[0], setups[0].rates):.3f})"
        trained = train_levels([(*runs[i], level_masks[i], prev[i]) for i in todo], level, desc)
        for i, final in zip(todo, trained):
            finals[i] = final


def describe(cfg: ml_collections.ConfigDict) -> str:
    """One line on what a oneshot or agp run does, e.g. for `lottery inspect`'s header."""
    groups = cfg.structure == "groups"
    by = f"{cfg.scope} {cfg.group_scorer} of channel groups" if groups else \
        f"{cfg.scope} {cfg.scorer if cfg.experiment == 'oneshot' else 'magnitude'}"
    density = "channel density" if groups else "density"
    if cfg.experiment == "oneshot":
        unit = " whole units by their " + cfg.unit_norm + " norm" \
            if cfg.structure == "units" else ""
        return (f"train {cfg.training_steps}, prune once to {density} {cfg.final_density:.4g} "
                f"by {by}{unit}, fine-tune "
                f"{cfg.finetune_steps or cfg.training_steps} at lr {cfg.finetune_lr}")
    return (f"AGP by {by}: {density} 1 -> {cfg.final_density:.4g} (cubic) from "
            f"{cfg.prune_start} to {cfg.prune_end}, a new mask every {cfg.prune_every}; "
            f"{cfg.training_steps} in all")
