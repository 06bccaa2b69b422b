"""What every experiment kind shares: a config's setup in memory, and training one level.

`Setup(cfg)` loads the data and builds the model, optimizer, trainer, pruning rates and step
counts of a config (IMP, one-shot, AGP, the prune-at-init cells and instability all start from
it). `start_state` is the state a level starts from by the config's rewind mode, and
`train_level` trains one level of a run directory to completion: resuming from its in-level
checkpoint, writing its metrics, marking it done (`lottery.rundir` holds the layout).

Seeds as replicas: a config with `seeds` = K > 0 is K configs (`seed_configs`: seed, seed+1, ...,
each with seeds = 0, so each names the run directory that seed alone would), one `Setup` each
(`Setup.with_seed`: data, model, optimizer and trainer shared, so one compiled program serves
them), and `train_levels` trains a level of all of them as replicas of one program.
"""

from __future__ import annotations

import collections
import copy
import contextlib
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lottery import checkpoints, config as config_lib, data as data_lib, distributed
from lottery import groups as groups_lib, masks
from lottery import models, optim, rundir, steps as steps_lib, train as train_lib

PyTree = Any


class Setup:
    """What a run needs in memory: data, model, optimizer, trainer, rates and step counts."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        self.data = data_lib.load(cfg.dataset, data_dir=cfg.data_dir or None,
                                  download=cfg.get("download", False),
                                  image_size=cfg.get("image_size") or None,
                                  input=cfg.get("input", "auto"))
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

    def with_seed(self, seed: int) -> "Setup":
        """This setup for `seed` (`seed_config`): its own key and initial variables; data, model,
        optimizer and trainers are shared, so the seeds share compiled programs."""
        s = copy.copy(self)
        s.cfg = seed_config(self.cfg, seed)
        s.key = jax.random.key(seed)
        s.variables = models.init(s.model, jax.random.fold_in(s.key, 0), s.input_shape)
        return s

    def groups(self):
        """(channel groups, excluded group indices) of the model, for structure='groups': the
        config's `group_scorer` and rates (`lottery.groups.resolve`; the derivation is cached)."""
        return groups_lib.resolve(self.model, self.variables, self.input_shape,
                                  scorer=self.cfg.group_scorer, rates=self.rates)

    def fresh_state(self, variables, tx=None, mask=None):
        return train_lib.init_state(variables, tx or self.tx, jax.random.fold_in(self.key, 1), mask)

    def template(self, tx=None):
        return self.fresh_state(self.variables, tx)


def seed_config(cfg: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The config of one seed of `cfg`: `seed` set, `seeds` 0, so its run directory (name, hash,
    config.json) is the one `--config.seed=<seed>` alone makes."""
    c = cfg.copy_and_resolve_references()
    c.seed = seed
    if "seeds" in c:
        c.seeds = 0
    return c


def seed_configs(cfg: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """[cfg] without `seeds`; with `seeds` = K > 0 the configs of seeds seed, ..., seed+K-1."""
    k = cfg.get("seeds", 0)
    return [seed_config(cfg, cfg.seed + i) for i in range(k)] if k else [cfg]


def seed_setups(first: Setup, cfgs: Sequence[ml_collections.ConfigDict]) -> list[Setup]:
    """The setups of `seed_configs`, from the first one's (`Setup(cfgs[0])`): data loaded once."""
    return [first, *(first.with_seed(c.seed) for c in cfgs[1:])]


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
    return train_levels([(s, run_dir, mask, prev_final)], level, desc, mask_update=mask_update,
                        callback=callback)[0]


def train_levels(runs: Sequence[tuple[Setup, str, PyTree, Any]], level: int, desc: str, *,
                 mask_update: train_lib.MaskUpdate | None = None,
                 callback: Callable[[train_lib.TrainState, PyTree, dict], None] | None = None
                 ) -> list[train_lib.TrainState]:
    """`train_level` of several runs, (setup, run_dir, mask, prev_final) each (the seeds of a
    multi-seed run, `Setup.with_seed`), trained together as replicas of one program; returns
    their final states. Every run directory gets exactly the writes it gets alone, each run's in
    its own files (checkpoints at the same steps). Runs that resume from different steps (a kill
    between two seeds' checkpoints) train in groups, one per step; one run trains alone, without
    a replica axis. `callback` is called for every run with its own state, mask and record."""
    finals = [None] * len(runs)
    groups = collections.defaultdict(list)  # start step -> [(index, state, mask)]
    for i, (s, run_dir, mask, prev_final) in enumerate(runs):
        ldir = rundir.level_dir(run_dir, level)
        os.makedirs(ldir, exist_ok=True)
        state, trainer, total = start_state(s, run_dir, level, mask, prev_final)
        trained = _trained(run_dir, level, _written(mask_update), total, state, mask)
        if trained is not None:  # a kill came after final/ was written: only complete the level
            _complete(s, ldir, *trained, mask_update, write=False)
            finals[i] = trained[0]
            continue
        metrics = os.path.join(ldir, rundir.METRICS)
        latest = rundir.latest_checkpoint(ldir)
        if latest is None:
            rundir.truncate_metrics(metrics, None)  # starting over: no record is kept
        else:
            like = {"state": state, "mask": mask} if mask_update else state
            saved = checkpoints.restore(latest[1], like, hint=rundir.hint(run_dir, level))
            state, mask = (saved["state"], saved["mask"]) if mask_update else (saved, mask)
            rundir.truncate_metrics(metrics, latest[0])
        groups[int(np.asarray(state.step))].append((i, state, mask))
    for _, group in sorted(groups.items()):
        members = [runs[i] for i, _, _ in group]
        label = f", seeds {', '.join(str(m[0].cfg.seed) for m in members)}" if len(group) > 1 \
            else ""
        out = _train_level_group(members, [g[1] for g in group], [g[2] for g in group], trainer,
                                 total, level, desc + label, mask_update, callback)
        for (i, _, _), (st, m), (s, run_dir, *_) in zip(group, out, members):
            _complete(s, rundir.level_dir(run_dir, level), st, m, mask_update, write=True)
            finals[i] = st
    return finals


def _written(mask_update) -> tuple[str, ...]:
    """The checkpoints a finished level writes: final/ (and mask/ for a changing mask)."""
    return ("final", "mask") if mask_update else ("final",)


def _complete(s: Setup, ldir: str, state, mask, mask_update, *, write: bool) -> None:
    """Finish a trained level: (`write`) its final/ (and mask/ and info.json for a changing
    mask), replacing what a kill left, else only the info.json a kill left missing; then delete
    its in-level checkpoints and mark it done."""
    if write:
        for name in _written(mask_update):
            rundir.rmtree(os.path.join(ldir, name))  # what a kill left (see `_trained`)
        checkpoints.save(os.path.join(ldir, "final"), state)
    if mask_update is not None:
        if write:
            checkpoints.save(os.path.join(ldir, "mask"), mask)
        if write or not os.path.exists(os.path.join(ldir, rundir.INFO)):
            rundir.write_info(ldir, mask, s.rates)
    rundir.rmtree(os.path.join(ldir, rundir.CHECKPOINT))
    rundir.mark_done(ldir)


def _train_level_group(runs, states, level_masks, trainer, total, level, desc, mask_update,
                       callback):
    """Train one group of `train_levels` (runs resuming from the same step) from `states` under
    `level_masks`; returns each run's final (state, mask). The bookkeeping of `train_level`, per
    run: metrics, in-level checkpoints (all runs' at the same pauses), the rewind point."""
    s = runs[0][0]
    sizes = [0] * len(runs)
    rewinds = [os.path.join(run_dir, "rewind") for _, run_dir, *_ in runs]
    need_rewind = [level == 0 and s.rewind_step > 0 and not checkpoints.exists(p) for p in rewinds]
    last_save = [time.monotonic()]

    def pause(st, m, record):
        step = int(record["step"])
        due = "test_accuracy" in record and step < total and \
            time.monotonic() - last_save[0] >= s.cfg.checkpoint_seconds
        for j, (sj, run_dir, *_) in enumerate(runs):
            rec = take_record(record, sizes, j)
            if need_rewind[j] and step == s.rewind_step:
                checkpoints.save(rewinds[j], take(st, sizes, j))
            if mask_update is not None:
                rec["density"] = masks.density(take(m, sizes, j), sj.rates)
            if "test_accuracy" in record:
                rundir.append_metrics(os.path.join(rundir.level_dir(run_dir, level),
                                                   rundir.METRICS), rec)
            if due:
                st_j = take(st, sizes, j)
                rundir.save_in_level(rundir.level_dir(run_dir, level), step, {
                    "state": st_j, "mask": take(m, sizes, j)} if mask_update else st_j)
            if callback is not None:
                callback(take(st, sizes, j), take(m, sizes, j), rec)
        if due:
            last_save[0] = time.monotonic()

    mask = join(level_masks, sizes)
    with name_replicas([f"seed {r[0].cfg.seed}" for r in runs], sizes):
        out = train_lib.train(
            trainer, join(states, sizes), mask, s.data, num_steps=total,
            eval_every=s.eval_every, stops=(s.rewind_step,) if any(need_rewind) else (),
            mask_update=mask_update, replicas=sizes != [0],
            callback=pause if mask_update else lambda st, record: pause(st, mask, record),
            progress=desc if progress(s.cfg) else False)
    state, mask = (out[0], out[1]) if mask_update else (out[0], mask)
    return [(take(state, sizes, j), take(mask, sizes, j)) for j in range(len(runs))]


# ---- parts of one replica program: `sizes[i]` 0 is one network, C is C stacked networks ----

def join(trees: Sequence[PyTree], sizes: Sequence[int]) -> PyTree:
    """The parts `trees` as one replica-stacked pytree (a lone part as it is)."""
    if len(trees) == 1:
        return trees[0]
    return jax.tree.map(lambda *xs: jnp.concatenate([x if n else x[None] for x, n in
                                                     zip(xs, sizes)]), *trees)


def _span(sizes: Sequence[int], i: int) -> tuple[int, int]:
    start = sum(max(n, 1) for n in sizes[:i])
    return start, start + max(sizes[i], 1)


def take(tree: PyTree, sizes: Sequence[int], i: int) -> PyTree:
    """Part `i` of a pytree `join`ed from parts of `sizes`."""
    if len(sizes) == 1:
        return tree
    a, b = _span(sizes, i)
    return jax.tree.map(lambda x: x[a] if sizes[i] == 0 else x[a:b], tree)


def take_record(record: dict, sizes: Sequence[int], i: int) -> dict:
    """Part `i` of a training record of a `join`ed program (its values per replica)."""
    if len(sizes) == 1:
        return record
    a, b = _span(sizes, i)
    return {k: (v[a] if sizes[i] == 0 else v[a:b]) if np.ndim(v) else v
            for k, v in record.items()}


@contextlib.contextmanager
def name_replicas(names: Sequence[str], sizes: Sequence[int]):
    """Re-raise a DivergenceError of a `join`ed program with the name of the part its replica
    belongs to in front (e.g. 'seed 2: ...'); a lone part's error as it is."""
    try:
        yield
    except train_lib.DivergenceError as e:
        if len(sizes) == 1 or e.replica is None:
            raise
        part = next(i for i in range(len(sizes)) if e.replica < _span(sizes, i)[1])
        raise train_lib.DivergenceError(f"{names[part]}: {e}", e.step, e.replica) from None


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
