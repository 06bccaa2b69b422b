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
           training then continues at the final density. The mask update runs inside the
           compiled epoch (`lax.cond` on the step), with kept counts precomputed exactly on the
           host: round-half-up(density * prunable weights), as `prune.to_density` counts them.
           Pruned weights are set to 0.0 when pruned and never revive (masks only shrink).

Units: density = fraction of prunable weights KEPT, in (0, 1]. Step fields are step strings
('40ep', '500it', see lottery.steps).

Run directory `<workdir>/<experiment>_<model>_<dataset>_<hash>/` (hash as `config.run_name`):
  config.json, init/, rewind/ (oneshot only: the fine-tune start needs it, as in imp)
  oneshot: level_0/ (dense) and level_1/ (pruned, fine-tuned), each exactly as an IMP level:
           {mask/, final/, info.json, metrics.jsonl, checkpoint/<step>/, DONE}
  agp:     level_0/{checkpoint/<step>/ ({'state', 'mask'} for resume), metrics.jsonl,
           final/, mask/, info.json, DONE}; final/, mask/ and info.json (density, kept, total,
           layers, as imp writes it) are written at the end, with the final mask.
metrics.jsonl: one line per evaluation: step, train_loss, test_loss, test_accuracy, and for agp
the density of the mask the network had at that step.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from lottery import checkpoints, config as config_lib, imp, masks, models, prune, schedules
from lottery import scorers, steps as steps_lib, train as train_lib

PyTree = Any

EXPERIMENTS = ("oneshot", "agp")
STRUCTURES = ("weights", "units")


def base_config(experiment: str = "agp") -> ml_collections.ConfigDict:
    """`config.base()` plus the schedule fields, for `experiment` 'agp' or 'oneshot'."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment={experiment!r}: expected one of {', '.join(EXPERIMENTS)}")
    c = config_lib.base()
    c.experiment = experiment
    c.final_density = 0.1  # fraction of prunable weights kept at the end, in (0, 1]
    # agp: the cubic schedule runs from prune_start to prune_end, a new mask every prune_every
    c.prune_start = "0it"
    c.prune_end = "30ep"
    c.prune_every = "1ep"
    # oneshot: how the single pruning step ranks weights (scorer and scope are config.base's)
    c.structure = "weights"  # weights | units (whole output units of every prunable kernel)
    c.unit_norm = "l1"  # a unit's score from its weights' scores: l1 | l2 | sum
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
                         f"weights kept)")
    if cfg.controls:
        raise ValueError(f"controls={cfg.controls!r}: controls are not supported for experiment "
                         f"{cfg.experiment!r}; expected ''")
    spe = steps_per_epoch or 1
    total = _parse(cfg, "training_steps", spe)
    if cfg.experiment == "oneshot":
        if cfg.structure not in STRUCTURES:
            raise ValueError(f"structure={cfg.structure!r}: expected one of "
                             f"{', '.join(STRUCTURES)}")
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
    if cfg.structure != "weights":
        raise ValueError(f"structure={cfg.structure!r}: AGP prunes single weights; "
                         f"expected 'weights'")
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
# The AGP schedule and the training step that applies it.


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
    the global count split over the leaves).

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


def _rate_tuple(mask: PyTree, rates: PyTree | None) -> tuple[float, ...]:
    return tuple(float(r) for r in jax.tree.leaves(masks.resolve_rates(mask, rates)))


def agp_step(trainer: train_lib.Trainer, schedule: Schedule, state: train_lib.TrainState,
             mask: PyTree, x, y, *, scope: str = "global",
             rates: tuple[float, ...] | PyTree | None = None):
    """One AGP training step (pure, jittable): if `state.step` is an event of `schedule`, first
    keep the event's count of alive weights with the largest |w| (the newly pruned weights become
    0.0); then one masked step (`train.train_step`). Returns (state, mask, loss).

    `rates` (a rates pytree or its leaves as a tuple of Python floats) must be static under jit.
    """
    rates_l = rates if isinstance(rates, tuple) else _rate_tuple(mask, rates)
    hit = jnp.asarray(schedule.steps) == state.step

    def reprune(carry):
        st, m = carry
        counts = jnp.asarray(schedule.counts)[jnp.argmax(hit)]
        # prune.to_density's selection, with the counts precomputed exactly on the host
        new = prune._prune_to_counts(scorers.magnitude(st.params, m), m, counts,
                                     rates_l=rates_l, scope=scope)
        return st.replace(params=masks.apply(st.params, new)), new

    state, mask = jax.lax.cond(jnp.any(hit), reprune, lambda carry: carry, (state, mask))
    state, loss = train_lib.train_step(trainer, state, mask, x, y)
    return state, mask, loss


def _agp_epoch(trainer, scope, rates_l, schedule, state, mask, x, y, start, stop):
    """Positions [start, stop) of the current epoch as one `lax.scan` (as `train.run_epoch`, with
    the mask in the carry). Returns (state, mask, summed loss)."""
    n = x.shape[0]
    spe = n // trainer.batch_size
    order = train_lib.epoch_order(state.key, state.step // spe, n, trainer.batch_size,
                                  trainer.sampling)

    def body(carry, i):
        state, mask, total = carry

        def do(c):
            idx = order[i]
            return agp_step(trainer, schedule, *c, x[idx], y[idx], scope=scope, rates=rates_l)

        state, mask, loss = jax.lax.cond(
            (i >= start) & (i < stop), do,
            lambda c: (*c, jnp.zeros((), jnp.float32)), (state, mask))
        return (state, mask, total + loss), None

    (state, mask, total), _ = jax.lax.scan(body, (state, mask, jnp.zeros((), jnp.float32)),
                                           jnp.arange(spe))
    return state, mask, total


@functools.lru_cache(maxsize=None)
def _compiled(trainer: train_lib.Trainer, scope: str, rates_l: tuple[float, ...]):
    """The jitted AGP step and epoch for a trainer, scope and rates."""
    step = jax.jit(lambda sch, st, m, x, y: agp_step(trainer, sch, st, m, x, y, scope=scope,
                                                     rates=rates_l))
    epoch = jax.jit(functools.partial(_agp_epoch, trainer, scope, rates_l))
    return step, epoch


def train_agp(trainer: train_lib.Trainer, state: train_lib.TrainState, mask: PyTree, data,
              schedule: Schedule, *, num_steps: int, scope: str = "global",
              rates: PyTree | None = None, eval_every: int | None = None,
              callback: Callable[[train_lib.TrainState, PyTree, dict], None] | None = None,
              progress: bool | str = False):
    """Train from `state.step` to `num_steps` under AGP; returns (state, mask, history).

    Like `train.train`: pauses at epoch ends and every `eval_every` steps (default: an epoch),
    evaluates the test split at eval points and the end, and calls `callback(state, mask,
    record)` at each pause, record = {'step', 'density', 'train_loss', and at eval points
    'test_loss', 'test_accuracy'}. Mask updates happen inside the compiled epoch (or step, for
    `trainer.loop == 'steps'`), so they do not add pauses.
    """
    n = int(data.x_train.shape[0])
    spe = trainer.steps_per_epoch(n)
    if num_steps <= 0:
        raise ValueError(f"num_steps={num_steps}: must be > 0")
    eval_every = spe if eval_every is None else int(eval_every)
    rates = masks.resolve_rates(mask, rates)
    step_fn, epoch_fn = _compiled(trainer, scope, _rate_tuple(mask, rates))
    schedule = Schedule(jnp.asarray(schedule.steps, jnp.int32),
                        jnp.asarray(schedule.counts, jnp.int32))
    start = int(state.step)
    state = state.replace(params=masks.apply(state.params, mask))  # identity when resuming
    loop = trainer.resolved_loop(state.params)
    if loop not in train_lib.LOOPS[1:]:
        raise ValueError(f"loop={trainer.loop!r}: expected one of {train_lib.LOOPS}")
    if loop == "scan":
        x_dev, y_dev = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    history = []
    bar = tqdm(total=num_steps, initial=start, disable=not progress, leave=False, unit="it",
               desc=progress if isinstance(progress, str) else "agp", dynamic_ncols=True)
    pos = start
    for stop in train_lib.boundaries(start, num_steps, spe, eval_every):
        a, b = pos % spe, (stop - 1) % spe + 1
        if loop == "scan":
            state, mask, total = epoch_fn(schedule, state, mask, x_dev, y_dev, a, b)
        else:
            order = np.asarray(train_lib.epoch_order(state.key, pos // spe, n,
                                                     trainer.batch_size, trainer.sampling))
            total = 0.0
            for i in range(a, b):
                state, mask, loss = step_fn(schedule, state, mask, data.x_train[order[i]],
                                            data.y_train[order[i]])
                total = total + loss
        record = {"step": stop, "density": masks.density(mask, rates),
                  "train_loss": float(total) / (stop - pos)}
        if stop % eval_every == 0 or stop == num_steps:
            record.update(train_lib.evaluate(trainer, state, mask, data.x_test, data.y_test))
        history.append(record)
        bar.update(stop - pos)
        bar.set_postfix(density=f"{record['density']:.4f}", refresh=False)
        if callback is not None:
            callback(state, mask, record)
        pos = stop
    bar.close()
    return state, mask, history


# ----------------------------------------------------------------------------------------------
# Run directories.


def _levels(experiment: str) -> tuple[int, ...]:
    return (0, 1) if experiment == "oneshot" else (0,)


def _open_run(cfg: ml_collections.ConfigDict, workdir: str, discard: int | None):
    """Validate everything (data included), then create or reopen the run directory with its
    config.json and init/; returns (Setup, run_dir, initial variables), or (None, run_dir, None)
    for a finished run (nothing to load)."""
    validate(cfg)
    if discard is not None and discard not in _levels(cfg.experiment):
        raise ValueError(f"--discard-level {discard}: expected a level of an experiment="
                         f"{cfg.experiment!r} run: {', '.join(map(str, _levels(cfg.experiment)))}")
    run_dir = imp.prepare_run(cfg, workdir)
    if discard is None and all(imp.is_done(imp.level_dir(run_dir, lv))
                               for lv in _levels(cfg.experiment)):
        return None, run_dir, None
    s = imp.Setup(cfg)
    validate(cfg, s.spe)
    if cfg.experiment == "agp" and getattr(s, "mesh", None) is not None:
        raise ValueError(f"devices={cfg.devices!r}: AGP trains on one device (its in-epoch mask "
                         f"update is not sharded); set --config.devices=1")
    os.makedirs(run_dir, exist_ok=True)
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg_path):
        imp._write_json_atomic(cfg_path, cfg.to_dict())
    if discard is not None:
        imp.discard_level(run_dir, discard)
    init_path = os.path.join(run_dir, "init")
    if not checkpoints.exists(init_path):
        imp._rmtree(init_path)
        checkpoints.save(init_path, s.variables)
    return s, run_dir, checkpoints.restore(init_path, s.variables, hint=imp._hint(run_dir, 0))


def run_agp(cfg: ml_collections.ConfigDict, workdir: str, *, discard: int | None = None,
            callback: Callable[[train_lib.TrainState, PyTree, dict], None] | None = None) -> str:
    """Run (or resume) an AGP experiment; returns its run directory.

    `callback(state, mask, record)` is called at every pause after the run's own bookkeeping
    (metrics line, checkpoint), e.g. for custom logging.
    """
    if cfg.get("experiment") != "agp":
        raise ValueError(f"experiment={cfg.get('experiment')!r}: run_agp needs 'agp'")
    s, run_dir, init_vars = _open_run(cfg, workdir, discard)
    if s is None:
        return run_dir
    ldir = imp.level_dir(run_dir, 0)
    os.makedirs(ldir, exist_ok=True)
    ckdir = os.path.join(ldir, "checkpoint")
    metrics_path = os.path.join(ldir, "metrics.jsonl")
    state = s.fresh_state(init_vars)
    mask = masks.init(state.params)
    schedule = agp_schedule(mask, s.rates, final_density=cfg.final_density,
                            start=_parse(cfg, "prune_start", s.spe),
                            end=_parse(cfg, "prune_end", s.spe),
                            every=_parse(cfg, "prune_every", s.spe), scope=cfg.scope)
    done = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit()) if os.path.isdir(ckdir) else []
    if done:
        saved = checkpoints.restore(os.path.join(ckdir, str(done[-1])),
                                    {"state": state, "mask": mask}, hint=imp._hint(run_dir, 0))
        state, mask = saved["state"], saved["mask"]
        imp._truncate_metrics(metrics_path, done[-1])
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)  # AGP runs in one process (see _open_run)
    last_save = [time.monotonic()]

    def bookkeeping(st, m, record):
        step = int(record["step"])
        if "test_accuracy" in record:
            imp._append_metrics(metrics_path, record)
            if step < s.total and time.monotonic() - last_save[0] >= cfg.checkpoint_seconds:
                checkpoints.save(os.path.join(ckdir, str(step)), {"state": st, "mask": m})
                for old in (d for d in os.listdir(ckdir) if d.isdigit() and int(d) < step):
                    imp._rmtree(os.path.join(ckdir, old))
                last_save[0] = time.monotonic()
        if callback is not None:
            callback(st, m, record)

    state, mask, _ = train_agp(s.trainer, state, mask, s.data, schedule, num_steps=s.total,
                               scope=cfg.scope, rates=s.rates, eval_every=s.eval_every,
                               callback=bookkeeping,
                               progress=f"agp to density {cfg.final_density}"
                               if cfg.progress else False)
    for name in ("final", "mask"):
        imp._rmtree(os.path.join(ldir, name))  # half-written by a kill
    checkpoints.save(os.path.join(ldir, "final"), state)
    checkpoints.save(os.path.join(ldir, "mask"), mask)
    imp.write_info(ldir, mask, s.rates)
    imp._rmtree(ckdir)
    imp._mark_done(ldir)
    return run_dir


def oneshot_mask(params: PyTree, mask: PyTree, inputs: scorers.Inputs | None, *,
                 density: float, scorer: str = "magnitude", scope: str = "global",
                 structure: str = "weights", unit_norm: str = "l1",
                 rates: PyTree | None = None, count_rule: str = "exact",
                 count_basis: PyTree | None = None) -> PyTree:
    """One pruning step to `density` of the prunable weights: the alive weights with the highest
    `scorer` scores (`scope` global or layerwise, exact counts as `prune.to_density`), or with
    structure 'units' whole output units ranked by the `unit_norm` of their weights' scores
    (`prune.units_to_density`; `count_rule` applies to weights only). `inputs` is what the scorer
    needs (None for magnitude)."""
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r}: expected one of {', '.join(STRUCTURES)}")
    scores = scorers.get(scorer)(params, mask, inputs)
    if structure == "units":
        units = prune.unit_scores(scores, masks.resolve_rates(mask, rates), unit_norm)
        return prune.units_to_density(units, mask, density, scope=scope, rates=rates)
    return prune.to_density(scores, mask, density, scope=scope, rates=rates,
                            count_rule=count_rule, count_basis=count_basis)


def _scoring_inputs(s: imp.Setup, trained: train_lib.TrainState) -> scorers.Inputs:
    """What data-dependent scorers see: the first 256 training examples, as IMP scores."""
    x, y = s.data.x_train[:256], s.data.y_train[:256]
    variables = {**s.variables, "batch_stats": trained.batch_stats} \
        if trained.batch_stats else s.variables
    return scorers.Inputs.create(models.inference_fn(s.model, variables),
                                 (jnp.asarray(x), jnp.asarray(y)),
                                 input_shape=(1, *s.input_shape),
                                 key=jax.random.fold_in(s.key, 2), rates=s.rates)


def run_oneshot(cfg: ml_collections.ConfigDict, workdir: str, *,
                discard: int | None = None) -> str:
    """Run (or resume) a one-shot prune + fine-tune experiment; returns its run directory."""
    if cfg.get("experiment") != "oneshot":
        raise ValueError(f"experiment={cfg.get('experiment')!r}: run_oneshot needs 'oneshot'")
    s, run_dir, init_vars = _open_run(cfg, workdir, discard)
    if s is None:
        return run_dir
    rewind_path = os.path.join(run_dir, "rewind")
    if not checkpoints.exists(rewind_path):
        imp._rmtree(rewind_path)
        checkpoints.save(rewind_path, s.fresh_state(init_vars))
    mask, final = masks.init(init_vars["params"]), None
    for level in (0, 1):
        ldir = imp.level_dir(run_dir, level)
        mask_path = os.path.join(ldir, "mask")
        if checkpoints.exists(mask_path):
            mask = checkpoints.restore(mask_path, mask, hint=imp._hint(run_dir, level))
        else:
            if level == 1:
                mask = oneshot_mask(final.params, mask, _scoring_inputs(s, final),
                                    density=cfg.final_density, scorer=cfg.scorer,
                                    scope=cfg.scope, structure=cfg.structure,
                                    unit_norm=cfg.unit_norm, rates=s.rates,
                                    count_rule=cfg.count_rule,
                                    count_basis=config_lib.count_basis(cfg, final.params))
            os.makedirs(ldir, exist_ok=True)
            imp._rmtree(mask_path)
            checkpoints.save(mask_path, mask)
        if not os.path.exists(os.path.join(ldir, "info.json")):
            imp.write_info(ldir, mask, s.rates)
        if imp.is_done(ldir):
            final = checkpoints.restore(os.path.join(ldir, "final"),
                                        s.template(s.ft_tx if level else None),
                                        hint=imp._hint(run_dir, level))
        else:
            desc = "dense training" if level == 0 else \
                f"fine-tune (density {masks.density(mask, s.rates):.3f})"
            final = imp._train_level(s, run_dir, level, mask, final, desc)
    return run_dir


def run_experiment(cfg: ml_collections.ConfigDict, workdir: str, *,
                   discard: int | None = None) -> str:
    """`run_oneshot` or `run_agp`, by `cfg.experiment`."""
    validate(cfg)
    if cfg.experiment == "oneshot":
        return run_oneshot(cfg, workdir, discard=discard)
    return run_agp(cfg, workdir, discard=discard)


def describe(cfg: ml_collections.ConfigDict) -> str:
    """One line on what a oneshot or agp run does, e.g. for `lottery inspect`'s header."""
    if cfg.experiment == "oneshot":
        unit = " whole units by their " + cfg.unit_norm + " norm" \
            if cfg.structure == "units" else ""
        return (f"train {cfg.training_steps}, prune once to density {cfg.final_density:.4g} by "
                f"{cfg.scope} {cfg.scorer}{unit}, fine-tune "
                f"{cfg.finetune_steps or cfg.training_steps} at lr {cfg.finetune_lr}")
    return (f"AGP by {cfg.scope} magnitude: density 1 -> {cfg.final_density:.4g} (cubic) from "
            f"{cfg.prune_start} to {cfg.prune_end}, a new mask every {cfg.prune_every}; "
            f"{cfg.training_steps} in all")


# ----------------------------------------------------------------------------------------------
# Command line: `lottery oneshot` and `lottery agp`.


def add_parser(subparsers) -> None:
    """The `oneshot` and `agp` subcommands (one handler, `run`; the config's experiment must
    match the command)."""
    helps = {"oneshot": ("train, prune once to a target density, fine-tune",
                         "Train the dense network, prune it to final_density in one step "
                         "(any scorer, global or layerwise, weights or whole units) and "
                         "fine-tune it."),
             "agp": ("automated gradual pruning (Zhu & Gupta 2017) during training",
                     "Train while the density follows the cubic AGP schedule from prune_start "
                     "to prune_end (a new magnitude mask every prune_every), then train on at "
                     "final_density.")}
    for name, (short, long) in helps.items():
        p = subparsers.add_parser(name, help=short, description=long + " Override any config "
                                  "field with --config.<field>=<value>.")
        p.add_argument("--config", required=True,
                       help=f"a Python file whose get_config() starts from "
                            f"lottery.gradual.base_config({name!r})")
        p.add_argument("--workdir", default="runs", help="where run directories go (default: "
                                                          "runs)")
        p.add_argument("--discard-level", type=int, default=None, metavar="N",
                       help="delete level N (and later levels) of the run and train it again, "
                            "e.g. after a corrupt checkpoint")


def run(args, overrides: Sequence[str] = ()) -> int:
    """`lottery oneshot` / `lottery agp`: run or resume the experiment and print its levels."""
    from lottery import cli  # noqa: PLC0415 - cli imports this module lazily

    cfg = config_lib.load(args.config, overrides)
    if cfg.get("experiment") != args.command:
        raise ValueError(f"--config {args.config!r} is a {cfg.get('experiment')!r} config; "
                         f"`lottery {args.command}` needs experiment={args.command!r} (start "
                         f"it from lottery.gradual.base_config({args.command!r}))")
    run_dir = run_experiment(cfg, args.workdir, discard=args.discard_level)
    print(f"\nrun directory: {run_dir}")
    print(cli.format_summary(imp.summary(run_dir)))
    return 0

