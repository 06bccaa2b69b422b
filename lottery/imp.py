"""Iterative magnitude pruning (`lottery find-ticket`): levels, rewinding, controls.

Level 0 trains the dense network. Level L >= 1 removes `fraction` of the remaining prunable
weights (by `scorer`, default global magnitude of level L-1's final weights), rewinds the
survivors and retrains under the mask. Rewind modes (`experiment.start_state`):
  init       weights and optimizer of step 0 (Frankle & Carbin 2019)
  iteration  weights and optimizer state at `rewind_step` of level 0 (Frankle et al. 2020)
  lr         keep level L-1's trained weights, replay the LR schedule from `rewind_step`
             with the optimizer state saved there (Renda et al. 2020)
  finetune   keep level L-1's trained weights, train `finetune_steps` at constant `finetune_lr`
Controls (`control_starts`) train beside chosen levels as vmapped replicas.

Run directory (`lottery.rundir`; a level is complete once its DONE file exists):
  config.json, init/, rewind/,
  level_<L>/{mask/, final/, checkpoint/<step>/, info.json, metrics.jsonl, DONE}
  level_<L>/controls/<control>_s<seed>/{mask/, metrics.jsonl}, level_<L>/controls/DONE
  (and level_<L>/controls/checkpoint/<step>/ while the controls train)
`summary` reads it back as one row per level (also for oneshot and agp runs).

Seeds (`seeds` = K > 0): the K seeds' run directories, each exactly as its seed alone writes it;
every level, and every level's controls, of all seeds trains as one replica program
(`experiment.train_levels`, `_run_controls`); `seeds_summary` is the table over them.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from lottery import checkpoints, config as config_lib, distributed, masks, models, prune
from lottery import experiment, groups, rundir, scorers, train as train_lib
from lottery.experiment import Setup, init_variables, level_final, level_mask, progress
from lottery.experiment import start_state, train_levels

PyTree = Any


def _prune_mask(s: Setup, run_dir: str, level: int, prev_final: train_lib.TrainState,
                prev_mask: PyTree) -> PyTree:
    """Level L's mask: remove `fraction` of level L-1's surviving weights by the scorer. Refuses
    to prune from non-finite weights (e.g. a level that diverged under an older version, which
    saved it as finished)."""
    if not bool(train_lib.all_finite(prev_final.params)):
        raise train_lib.DivergenceError(
            f"level {level - 1}: its final weights are not finite (training diverged; likely "
            f"cause: the learning rate is too high); not pruning from them. "
            f"{rundir.hint(run_dir, level - 1)}", int(np.asarray(prev_final.step).reshape(-1)[0]))
    scorer = scorers.get(s.cfg.scorer)
    n = 256 // s.mesh.size * s.mesh.size if s.mesh is not None else 256  # devices divide it
    x, y = s.data.x_train[:n], s.data.y_train[:n]
    variables = {**s.variables, "batch_stats": prev_final.batch_stats} \
        if prev_final.batch_stats else s.variables
    inputs = scorers.Inputs.create(models.inference_fn(s.model, variables),
                                   ((jnp.asarray(x), jnp.asarray(y)),),
                                   input_shape=(1, *s.input_shape),
                                   key=jax.random.fold_in(s.key, 2), rates=s.rates)
    params, mask = prev_final.params, prev_mask
    if s.mesh is not None:  # scorer gradients over the batch split across devices
        inputs = distributed.shard_inputs(inputs, s.mesh)
        params, mask = distributed.replicate((params, mask), s.mesh)
    if s.cfg.structure == "groups":  # whole channel groups: lottery.groups.remove_fraction
        g, skip = s.groups()
        out, _ = groups.remove_fraction(g, s.cfg.group_scorer, params, mask, s.cfg.fraction,
                                        inputs=inputs, scope=s.cfg.scope, exclude=skip)
        return jax.tree.map(np.asarray, out) if s.mesh is not None else out
    scores = scorer(params, mask, inputs)
    if s.mesh is not None:
        scores = jax.tree.map(np.asarray, scores)  # prune on host, as with one device
    return prune.remove_fraction(scores, prev_mask, s.cfg.fraction, scope=s.cfg.scope,
                                 rates=s.rates, count_rule=s.cfg.count_rule,
                                 count_basis=config_lib.count_basis(s.cfg, s.variables["params"]))


def _random_mask(s: Setup, mask: PyTree, key: jax.Array) -> PyTree:
    """The random-pruning control's mask: the ticket's weight count in every layer, drawn at
    random; for structure='groups', random whole channels, as many per group as the ticket keeps
    (so every layer keeps the ticket's input and output channel counts)."""
    if s.cfg.structure == "groups":
        g, skip = s.groups()
        return groups.random_like(g, mask, key, exclude=skip)
    return masks.random_like(mask, key, s.rates)


def control_source(s: Setup, run_dir: str, level: int, start: train_lib.TrainState):
    """The full, unmasked (params, batch_stats) the random-pruning control takes its kept weights
    from: the rewind point's values at every position.

      init, iteration  the rewind checkpoint (step 0 or `rewind_step` of level 0), unmasked
      lr, finetune     level 0's final weights (the dense trained network): level L-1's weights
                       hold zeros wherever an earlier level pruned, so they cannot be the source
    """
    if s.cfg.rewind in ("init", "iteration"):
        rewind = checkpoints.restore(os.path.join(run_dir, "rewind"), s.template(),
                                     hint=rundir.hint(run_dir, 0))
        return rewind.params, rewind.batch_stats
    dense = level_final(s, run_dir, 0)
    return dense.params, dense.batch_stats


def control_starts(s: Setup, run_dir: str, level: int, mask, prev_final):
    """(names, start states, masks) of level `level`'s controls, all from the level's start state
    (same step, trainer and length as the ticket):

      reinit_s<k>        the ticket's mask; weights of a fresh initialization (its own key per
                         level and seed); step, optimizer state and batch statistics of the start
      random_prune_s<k>  a random mask with the ticket's per-layer counts (`_random_mask`: whole
                         channels per group for structure='groups'); every kept weight starts
                         at its value at the rewind point (`control_source`), not at the ticket's
                         masked value (which is 0.0 outside the ticket's mask)
    """
    start, trainer, total = start_state(s, run_dir, level, mask, prev_final)
    source = None
    names, states, cmasks = [], [], []
    for kind in config_lib.split(s.cfg.controls):
        for seed in range(s.cfg.control_seeds):
            key = jax.random.fold_in(jax.random.fold_in(s.key, 1000 + level), seed)
            if kind == "reinit":
                fresh = models.init(s.model, jax.random.fold_in(key, 0), s.input_shape)
                m = mask
                st = start.replace(params=masks.apply(fresh["params"], mask))
            else:
                if source is None:
                    source = control_source(s, run_dir, level, start)
                m = _random_mask(s, mask, jax.random.fold_in(key, 1))
                st = start.replace(params=masks.apply(source[0], m), batch_stats=source[1])
            names.append(f"{kind}_s{seed}")
            states.append(st)
            cmasks.append(m)
    return names, states, cmasks, trainer, total


def _run_controls(runs: Sequence[tuple[Setup, str, PyTree, Any]], level: int) -> None:
    """Train the level's controls (`control_starts`) of every run, (setup, run_dir, mask,
    prev_final) each (one, or the seeds of a multi-seed run), together as replicas.

    Like a level: every evaluation appends one line to each control's metrics.jsonl and, at most
    every `checkpoint_seconds`, each run's stacked controls are saved in its
    `controls/checkpoint/<step>/`; a rerun resumes from the latest one (dropping the lines written
    after it), runs resuming from different steps in groups, one per step. Once every control's
    metrics reach the last step, each control's mask/ (fixed before training) and then the
    controls' DONE are written, run by run; a rerun after a kill there only writes what is
    missing.
    """
    todo, groups = [], collections.defaultdict(list)  # start step -> [todo index]
    for s, run_dir, mask, prev_final in runs:
        cdir = os.path.join(rundir.level_dir(run_dir, level), "controls")
        if rundir.is_done(cdir):
            continue
        names, states, cmasks, trainer, total = control_starts(s, run_dir, level, mask, prev_final)
        if not names:
            continue
        paths = [os.path.join(cdir, name, rundir.METRICS) for name in names]
        todo.append((s, run_dir, cdir, names, cmasks, paths))
        if all(rundir.ends_at(p, total) for p in paths):
            continue
        for name in names:
            os.makedirs(os.path.join(cdir, name), exist_ok=True)
        state = train_lib.stack(states)
        latest = rundir.latest_checkpoint(cdir)
        if latest is not None:
            state = checkpoints.restore(latest[1], state, hint=rundir.hint(run_dir, level))
        for p in paths:
            rundir.truncate_metrics(p, None if latest is None else latest[0])
        groups[int(np.asarray(state.step).reshape(-1)[0])].append((len(todo) - 1, state))
    for _, group in sorted(groups.items()):
        _train_controls([todo[i] for i, _ in group], [st for _, st in group], trainer, total,
                        level)
    for s, run_dir, cdir, names, cmasks, _ in todo:
        for name, m in zip(names, cmasks):
            path = os.path.join(cdir, name, "mask")
            if not checkpoints.exists(path):
                rundir.rmtree(path)
                checkpoints.save(path, m)
        rundir.rmtree(os.path.join(cdir, rundir.CHECKPOINT))
        rundir.mark_done(cdir)


def _train_controls(runs, states, trainer, total: int, level: int) -> None:
    """Train one group of `_run_controls` (runs resuming from the same step): each run's stacked
    controls `states`, all runs' joined into one replica program."""
    s = runs[0][0]
    sizes = [len(r[3]) for r in runs]
    last_save = [time.monotonic()]

    def pause(st, record):
        if "test_accuracy" not in record:
            return
        step = int(record["step"])
        due = step < total and time.monotonic() - last_save[0] >= s.cfg.checkpoint_seconds
        for j, (_, _, cdir, _, _, paths) in enumerate(runs):
            rec = experiment.take_record(record, sizes, j)
            for i, p in enumerate(paths):
                rundir.append_metrics(p, {k: (v[i] if np.ndim(v) else v) for k, v in rec.items()})
            if due:
                rundir.save_in_level(cdir, step, experiment.take(st, sizes, j))
        if due:
            last_save[0] = time.monotonic()

    seeds = f", seeds {', '.join(str(r[0].cfg.seed) for r in runs)}" if len(runs) > 1 else ""
    with experiment.name_replicas([f"seed {r[0].cfg.seed}" for r in runs], sizes):
        train_lib.train(trainer, experiment.join(states, sizes),
                        experiment.join([train_lib.stack(r[4]) for r in runs], sizes), s.data,
                        num_steps=total, eval_every=s.eval_every, replicas=True, callback=pause,
                        progress=f"level {level} controls{seeds}" if progress(s.cfg) else False)


def find_ticket(cfg: ml_collections.ConfigDict, workdir: str, *,
                discard: int | None = None) -> str | list[str]:
    """Run (or resume, or extend) an IMP experiment; returns its run directory. With `seeds`
    = K > 0: the K seeds' run directories (each the one its seed alone makes), trained together
    level by level (`experiment.train_levels`), their controls too."""
    if cfg.experiment != "find-ticket":
        raise ValueError(f"experiment={cfg.experiment!r}: this config is for `lottery "
                         f"{cfg.experiment}`, not `lottery find-ticket`")
    config_lib.validate(cfg)
    cfgs = experiment.seed_configs(cfg)
    run_dirs = [rundir.prepare(c, workdir) for c in cfgs]
    if discard is not None:
        for run_dir in run_dirs:
            rundir.check_discard(run_dir, discard)
    # loads data and validates everything that needs its size, before writing
    setups = experiment.seed_setups(Setup(cfgs[0]), cfgs)
    with rundir.writing_all(run_dirs, cfgs):  # one process at a time; nothing written before it
        _run_levels(setups, run_dirs, discard)
    return run_dirs if cfg.get("seeds", 0) else run_dirs[0]


def _run_levels(setups: Sequence[Setup], run_dirs: Sequence[str], discard: int | None) -> None:
    """find_ticket's work, under the run locks: discard, init, rewind, then level by level, each
    level of all seeds together (masks first, then training, then controls)."""
    cfg = setups[0].cfg
    runs = list(zip(setups, run_dirs))
    level_masks = []
    for s, run_dir in runs:
        if discard is not None:
            rundir.discard_level(run_dir, discard)
        init_vars = init_variables(s, run_dir)
        rewind_path = os.path.join(run_dir, "rewind")
        if s.rewind_step == 0 and not checkpoints.exists(rewind_path):
            checkpoints.save(rewind_path, s.fresh_state(init_vars))
        level_masks.append(masks.init(init_vars["params"]))
    control_levels = {int(v) for v in config_lib.split(cfg.control_levels)}
    prev_finals = [None] * len(runs)
    levels = tqdm(range(cfg.levels + 1), desc="levels", disable=not progress(cfg), unit="level")
    for level in levels:
        level_masks = [level_mask(s, run_dir, level, mask, lambda: mask if level == 0 else
                                  _prune_mask(s, run_dir, level, prev_final, mask))
                       for (s, run_dir), mask, prev_final in zip(runs, level_masks, prev_finals)]
        density = masks.density(level_masks[0], setups[0].rates)
        levels.set_postfix(density=f"{density:.4f}", refresh=False)
        here = [(s, run_dir, mask, prev_final) for (s, run_dir), mask, prev_final in
                zip(runs, level_masks, prev_finals)]
        done = [rundir.is_done(rundir.level_dir(run_dir, level)) for run_dir in run_dirs]
        finals = [level_final(s, run_dir, level) if d else None
                  for (s, run_dir), d in zip(runs, done)]
        todo = [i for i, d in enumerate(done) if not d]
        if todo:
            with _name_level(f"level {level}"):
                trained = train_levels([here[i] for i in todo], level,
                                       f"level {level} (density {density:.3f})")
            for i, final in zip(todo, trained):
                finals[i] = final
        if level > 0 and config_lib.split(cfg.controls) and (
                not control_levels or level in control_levels):
            with _name_level(f"level {level} controls"):
                _run_controls(here, level)
        prev_finals = finals
    levels.close()


@contextlib.contextmanager
def _name_level(what: str):
    """Re-raise a DivergenceError of training with `what` (e.g. 'level 3') in front: the run
    stops there, nothing of the diverged training is saved (its DONE and final are never
    written), and no later level is pruned from it."""
    try:
        yield
    except train_lib.DivergenceError as e:
        raise train_lib.DivergenceError(f"{what}: {e}", e.step, e.replica) from None


def summary(run_dir: str) -> list[dict]:
    """Per finished level: density, final and best test accuracy, control accuracies."""
    rows, level = [], 0
    while rundir.is_done(rundir.level_dir(run_dir, level)):
        rows.append(_level_row(run_dir, level))
        level += 1
    return rows


def _evaluations(path: str, run_dir: str, level: int) -> list[dict]:
    """The evaluation records of a finished level's metrics file; ValueError naming the file
    if there are none."""
    recs = [r for r in rundir.read_metrics(path) if "test_accuracy" in r]
    if not recs:
        raise ValueError(f"{path} has no evaluation records, but level {level} is marked done; "
                         f"{rundir.hint(run_dir, level)}")
    return recs


def _level_row(run_dir: str, level: int) -> dict:
    ldir = rundir.level_dir(run_dir, level)
    metrics = _evaluations(os.path.join(ldir, "metrics.jsonl"), run_dir, level)
    best = max(metrics, key=lambda r: r["test_accuracy"])
    info = rundir.read_json(os.path.join(ldir, "info.json"))
    row = {"level": level, "density": info["density"], "kept": info["kept"],
           "total": info["total"], "final_accuracy": metrics[-1]["test_accuracy"],
           "best_accuracy": best["test_accuracy"], "best_step": best["step"]}
    cdir = os.path.join(ldir, "controls")
    if rundir.is_done(cdir):
        for name in sorted(os.listdir(cdir)):
            if os.path.isdir(os.path.join(cdir, name)):
                kind = name.rsplit("_s", 1)[0]
                acc = _evaluations(os.path.join(cdir, name, "metrics.jsonl"), run_dir,
                                   level)[-1]["test_accuracy"]
                row.setdefault(f"{kind}_accuracy", []).append(acc)
    return row


def format_summary(rows: Sequence[dict]) -> str:
    """`summary` rows as a table: density, final and best test accuracy (with its step), and
    the mean final accuracy of each control kind."""
    controls = sorted({k for r in rows for k in r if k.endswith("_accuracy")
                       and k not in ("final_accuracy", "best_accuracy")})
    head = f"{'level':>5}  {'density':>8}  {'final acc':>9}  {'best acc':>8}  {'best step':>9}"
    head += "".join(f"  {c.replace('_accuracy', ''):>14}" for c in controls)
    lines = [head]
    for r in rows:
        line = (f"{r['level']:>5}  {r['density']:>8.4f}  {r['final_accuracy']:>9.4f}  "
                f"{r['best_accuracy']:>8.4f}  {r['best_step']:>9}")
        for c in controls:
            v = r.get(c)
            line += f"  {(sum(v) / len(v)):>14.4f}" if v else f"  {'':>14}"
        lines.append(line)
    return "\n".join(lines)


def seeds_summary(run_dirs: Sequence[str]) -> list[dict]:
    """Per level finished in every one of `run_dirs` (the seeds of a multi-seed run): its level,
    density, number of runs, and (mean, std) over the runs of the final and best test accuracy,
    and of each control kind's final accuracy over runs x control seeds (population std)."""
    per_run = [summary(d) for d in run_dirs]
    rows = []
    for level in range(min(len(r) for r in per_run)):
        here = [r[level] for r in per_run]
        row = {"level": level, "density": here[0]["density"], "runs": len(here)}
        for key in sorted({k for r in here for k in r if k.endswith("_accuracy")}):
            values = [v for r in here for v in np.atleast_1d(r.get(key, []))]
            row[key] = (float(np.mean(values)), float(np.std(values)))
        rows.append(row)
    return rows


def format_seeds_summary(rows: Sequence[dict]) -> str:
    """`seeds_summary` rows as a table: test accuracies in %, mean +- std over the runs."""
    if not rows:
        return "no level is finished in every run yet"
    keys = ["final_accuracy", "best_accuracy"] + sorted(
        {k for r in rows for k in r if k.endswith("_accuracy")} - {"final_accuracy",
                                                                 "best_accuracy"})
    names = [{"final_accuracy": "ticket", "best_accuracy": "ticket best"}.get(k, k[:-9])
             for k in keys]
    lines = [f"test accuracy (%), mean +- std over {rows[0]['runs']} runs (controls: over runs "
             f"x control seeds)",
             f"{'level':>5}  {'density':>8}" + "".join(f"  {n:>15}" for n in names)]
    for r in rows:
        cells = [f"{100 * r[k][0]:6.2f} +- {100 * r[k][1]:5.2f}" if k in r else "" for k in keys]
        lines.append((f"{r['level']:>5}  {r['density']:>8.4f}" +
                      "".join(f"  {c:>15}" for c in cells)).rstrip())
    return "\n".join(lines)


def describe(cfg: ml_collections.ConfigDict) -> str:
    """One line on what an IMP run does, e.g. for `lottery inspect`'s header."""
    what = f"{cfg.group_scorer} channel-group" if cfg.get("structure") == "groups" \
        else cfg.scorer
    return (f"{cfg.model} on {cfg.dataset}, seed {cfg.seed}, rewind {cfg.rewind}"
            f"{' at ' + str(cfg.rewind_step) if cfg.rewind in ('iteration', 'lr') else ''}, "
            f"{cfg.scope} {what} pruning of fraction {cfg.fraction} per level")

