"""What every experiment kind shares: a config's setup in memory, and training one level.

`Setup(cfg)` loads the data and builds the model, optimizer, trainer, pruning rates and step
counts of a config (IMP, one-shot, AGP, the prune-at-init cells and instability all start from
it). `start_state` is the state a level starts from by the config's rewind mode, and
`train_level` trains one level of a run directory to completion: resuming from its in-level
checkpoint, writing its metrics, marking it done (`lottery.rundir` holds the layout).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import ml_collections

from lottery import checkpoints, config as config_lib, data as data_lib, distributed, masks
from lottery import models, optim, rundir, steps as steps_lib, train as train_lib

PyTree = Any


class Setup:
    """What a run needs in memory: data, model, optimizer, trainer, rates and step counts."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        self.data = data_lib.load(cfg.dataset, data_dir=cfg.data_dir or None,
                                  image_size=cfg.get("image_size") or None)
        self.spe = train_lib.Trainer(None, None, cfg.batch_size).steps_per_epoch(
            self.data.x_train.shape[0])
        config_lib.validate(cfg, self.spe)
        parse = lambda v, name: steps_lib.parse(v, self.spe, name=name)  # noqa: E731
        self.total = parse(cfg.training_steps, "training_steps")
        self.rewind_step = parse(cfg.rewind_step, "rewind_step") \
            if cfg.rewind in ("iteration", "lr") else 0
        self.eval_every = parse(cfg.eval_every, "eval_every") or self.spe
        self.model = config_lib.model(cfg, self.data.num_classes)
        lr = optim.learning_rate(
            cfg.lr, schedule=cfg.lr_schedule, total_steps=self.total,
            warmup_steps=parse(cfg.warmup_steps, "warmup_steps"),
            milestones=[parse(m, "milestones") for m in config_lib.split(cfg.milestones)],
            gamma=cfg.gamma)
        self.tx = optim.optimizer(cfg.optimizer, lr, momentum=cfg.momentum,
                                  nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self.mesh = distributed.data_mesh(cfg.devices, cfg.batch_size)  # None: one device
        self.trainer = train_lib.Trainer(self.model, self.tx, cfg.batch_size, cfg.augment, cfg.loop,
                                         mesh=self.mesh, sampling=cfg.sampling,
                                         compute_dtype=cfg.get("compute_dtype", "float32"),
                                         replica_strategy=cfg.get("replica_strategy", "auto"))
        if cfg.rewind == "finetune":
            self.finetune_steps = parse(cfg.finetune_steps or cfg.training_steps, "finetune_steps")
            self.ft_tx = optim.optimizer(cfg.optimizer, cfg.finetune_lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
            self.ft_trainer = self.trainer._replace(tx=self.ft_tx)
        self.key = jax.random.key(cfg.seed)
        self.input_shape = tuple(self.data.x_train.shape[1:])
        self.variables = models.init(self.model, jax.random.fold_in(self.key, 0), self.input_shape)
        self.rates = config_lib.prunable(cfg, self.variables["params"])

    def fresh_state(self, variables, tx=None, mask=None):
        return train_lib.init_state(variables, tx or self.tx, jax.random.fold_in(self.key, 1), mask)

    def template(self, tx=None):
        return self.fresh_state(self.variables, tx)


def progress(cfg: ml_collections.ConfigDict) -> bool:
    """Whether to show progress bars: the config asks for them and this is process 0."""
    return cfg.progress and distributed.is_main_process()


def init_variables(s: Setup, run_dir: str) -> PyTree:
    """The run's initial variables: saved to init/ on first use, read back from it after."""
    path = os.path.join(run_dir, "init")
    if not checkpoints.exists(path):
        rundir.rmtree(path)
        checkpoints.save(path, s.variables)
    return checkpoints.restore(path, s.variables, hint=rundir.hint(run_dir, 0))


def start_state(s: Setup, run_dir: str, level: int, mask, prev_final):
    """The state level `level` starts from, by rewind mode, and the trainer and length it uses:
    (state, trainer, steps). Level 0 starts from init/; later levels from

      init, iteration  the rewind point (rewind/), masked
      lr               level L-1's trained weights, with rewind/'s step and optimizer state
      finetune         level L-1's trained weights with a fresh optimizer at `finetune_lr`
    """
    mode = s.cfg.rewind
    if level == 0:
        init = checkpoints.restore(os.path.join(run_dir, "init"), s.variables,
                                   hint=rundir.hint(run_dir, 0))
        return s.fresh_state(init, mask=mask), s.trainer, s.total
    rewind = checkpoints.restore(os.path.join(run_dir, "rewind"), s.template(),
                                 hint=rundir.hint(run_dir, 0))
    if mode in ("init", "iteration"):
        return rewind.replace(params=masks.apply(rewind.params, mask)), s.trainer, s.total
    if mode == "lr":
        return (rewind.replace(params=masks.apply(prev_final.params, mask),
                               batch_stats=prev_final.batch_stats), s.trainer, s.total)
    state = s.fresh_state({"params": prev_final.params, "batch_stats": prev_final.batch_stats},
                          s.ft_tx, mask)
    return state, s.ft_trainer, s.finetune_steps


def train_level(s: Setup, run_dir: str, level: int, mask, prev_final, desc: str, *,
                mask_update: train_lib.MaskUpdate | None = None,
                callback: Callable[[train_lib.TrainState, PyTree, dict], None] | None = None):
    """Train level `level` of `run_dir` to completion and mark it done; returns its final state.

    Resumes from the level's latest in-level checkpoint (the metrics written after it are
    dropped), else starts from `start_state`. Every evaluation record is appended to the level's
    metrics.jsonl and, at most every `checkpoint_seconds`, the state is saved as the in-level
    checkpoint; level 0 saves the rewind point at `rewind_step`. With `mask_update` (AGP) the mask
    changes during training: records carry its 'density', checkpoints hold {'state', 'mask'},
    and mask/ and info.json are written at the end. `callback(state, mask, record)` is called at
    every pause, after this bookkeeping. A level whose final/ a kill left without its DONE is
    completed without training again (`_trained`).
    """
    ldir = rundir.level_dir(run_dir, level)
    os.makedirs(ldir, exist_ok=True)
    metrics = os.path.join(ldir, rundir.METRICS)
    state, trainer, total = start_state(s, run_dir, level, mask, prev_final)
    written = ("final", "mask") if mask_update else ("final",)
    trained = _trained(run_dir, level, written, total, state, mask)
    if trained is not None:  # a kill came after final/ was written: only complete the level
        state, mask = trained
        if mask_update is not None and not os.path.exists(os.path.join(ldir, rundir.INFO)):
            rundir.write_info(ldir, mask, s.rates)
        rundir.rmtree(os.path.join(ldir, rundir.CHECKPOINT))
        rundir.mark_done(ldir)
        return state
    latest = rundir.latest_checkpoint(ldir)
    if latest is None:
        rundir.truncate_metrics(metrics, None)  # starting over: no record is kept
    else:
        like = {"state": state, "mask": mask} if mask_update else state
        saved = checkpoints.restore(latest[1], like, hint=rundir.hint(run_dir, level))
        state, mask = (saved["state"], saved["mask"]) if mask_update else (saved, mask)
        rundir.truncate_metrics(metrics, latest[0])
    rewind_path = os.path.join(run_dir, "rewind")
    need_rewind = level == 0 and s.rewind_step > 0 and not checkpoints.exists(rewind_path)
    last_save = [time.monotonic()]

    def pause(st, m, record):
        step = int(record["step"])
        if need_rewind and step == s.rewind_step:
            checkpoints.save(rewind_path, st)
        if mask_update is not None:
            record["density"] = masks.density(m, s.rates)
        if "test_accuracy" in record:
            rundir.append_metrics(metrics, record)
            if step < total and time.monotonic() - last_save[0] >= s.cfg.checkpoint_seconds:
                rundir.save_in_level(ldir, step, {"state": st, "mask": m} if mask_update else st)
                last_save[0] = time.monotonic()
        if callback is not None:
            callback(st, m, record)

    out = train_lib.train(
        trainer, state, mask, s.data, num_steps=total, eval_every=s.eval_every,
        stops=(s.rewind_step,) if need_rewind else (), mask_update=mask_update,
        callback=pause if mask_update else lambda st, record: pause(st, mask, record),
        progress=desc if progress(s.cfg) else False)
    state = out[0]
    for name in written:
        rundir.rmtree(os.path.join(ldir, name))  # what a kill left (see `_trained`)
    checkpoints.save(os.path.join(ldir, "final"), state)
    if mask_update is not None:
        checkpoints.save(os.path.join(ldir, "mask"), out[1])
        rundir.write_info(ldir, out[1], s.rates)
    rundir.rmtree(os.path.join(ldir, rundir.CHECKPOINT))
    rundir.mark_done(ldir)
    return state


def _trained(run_dir: str, level: int, written: tuple[str, ...], total: int, like_state,
             like_mask):
    """(final state, mask) of a level that finished training but was not marked DONE (a kill
    came between its final/ and its DONE): its `written` checkpoints (final/, and mask/ for AGP)
    exist and verify and its metrics.jsonl ends at step `total`. Else None: the level trains
    (resuming from its latest in-level checkpoint), and replaces what is there."""
    ldir = rundir.level_dir(run_dir, level)
    if not all(checkpoints.exists(os.path.join(ldir, n)) for n in written):
        return None
    if not rundir.ends_at(os.path.join(ldir, rundir.METRICS), total):
        return None
    hint = rundir.hint(run_dir, level)
    try:
        state = checkpoints.restore(os.path.join(ldir, "final"), like_state, hint=hint)
        mask = checkpoints.restore(os.path.join(ldir, "mask"), like_mask, hint=hint) \
            if "mask" in written else like_mask
    except checkpoints.CorruptCheckpointError:
        return None  # not done yet, so nothing depends on it: train the level again
    return state, mask


def level_mask(s: Setup, run_dir: str, level: int, like: PyTree,
               compute: Callable[[], PyTree]) -> PyTree:
    """Level `level`'s mask: restored from its mask/ (into the structure of `like`) when saved,
    else `compute()`d and saved, with its info.json, before the level trains."""
    ldir = rundir.level_dir(run_dir, level)
    path = os.path.join(ldir, "mask")
    if checkpoints.exists(path):
        mask = checkpoints.restore(path, like, hint=rundir.hint(run_dir, level))
    else:
        mask = compute()
        os.makedirs(ldir, exist_ok=True)
        rundir.rmtree(path)
        checkpoints.save(path, mask)
    if not os.path.exists(os.path.join(ldir, rundir.INFO)):
        rundir.write_info(ldir, mask, s.rates)
    return mask


def level_final(s: Setup, run_dir: str, level: int) -> train_lib.TrainState:
    """The trained state of a complete level (with fine-tuning's optimizer state after level 0
    of a 'finetune' run)."""
    tx = s.ft_tx if s.cfg.rewind == "finetune" and level > 0 else None
    return checkpoints.restore(os.path.join(rundir.level_dir(run_dir, level), "final"),
                               s.template(tx), hint=rundir.hint(run_dir, level))
