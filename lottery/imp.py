"""Iterative magnitude pruning with rewinding, controls and resumable run directories.

Level 0 trains the dense network. Level L >= 1 removes `fraction` of the remaining prunable
weights (by `scorer`, default global magnitude of level L-1's final weights), rewinds the
survivors and retrains under the mask. Rewind modes:
  init       weights and optimizer of step 0 (Frankle & Carbin 2019)
  iteration  weights and optimizer state at `rewind_step` of level 0 (Frankle et al. 2020)
  lr         keep level L-1's trained weights, replay the LR schedule from `rewind_step`
             with the optimizer state saved there (Renda et al. 2020)
  finetune   keep level L-1's trained weights, train `finetune_steps` at constant `finetune_lr`

Run directory (everything via orbax; a level is complete once its DONE file exists):
  config.json, init/, rewind/,
  level_<L>/{mask/, final/, checkpoint/<step>/, metrics.jsonl, DONE}
  level_<L>/controls/<control>_s<seed>/{mask/, metrics.jsonl}, level_<L>/controls/DONE
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from lottery import checkpoints, config as config_lib, data as data_lib, distributed, masks
from lottery import models, prune, runs as runs_lib
from lottery import scorers, steps as steps_lib, train as train_lib

PyTree = Any


def _write_json_atomic(path: str, obj) -> None:
    if not distributed.is_main_process():  # plain files: process 0 only
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _to_py(v):
    v = np.asarray(v)
    return v.tolist() if v.ndim else v.item()


def read_metrics(path: str, *, partial_last: bool = False) -> list[dict]:
    """The JSON lines of a metrics file ([] if it does not exist). An invalid line is a
    ValueError naming the file, except, with `partial_last`, a last line cut short (what a
    kill leaves in a level being resumed; it is written again), which is dropped."""
    return runs_lib.read_jsonl(path, complete=not partial_last)


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drop lines written after the checkpoint we resume from (they will be written again)."""
    if not distributed.is_main_process():
        return
    kept = [r for r in read_metrics(path, partial_last=True) if r["step"] <= last_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)


def _rmtree(path: str) -> None:
    """Delete a directory if it exists (process 0 only: the others share its filesystem)."""
    if distributed.is_main_process():
        shutil.rmtree(path, ignore_errors=True)


def _append_metrics(path: str, record: dict) -> None:
    if not distributed.is_main_process():
        return
    with open(path, "a") as f:
        f.write(json.dumps({k: _to_py(v) for k, v in record.items()}) + "\n")
        f.flush()
        os.fsync(f.fileno())


class Setup:
    """What a run needs in memory: data, model, optimizer, trainer, rates and step counts."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        self.data = data_lib.load(cfg.dataset, data_dir=cfg.data_dir or None)
        self.spe = train_lib.Trainer(None, None, cfg.batch_size).steps_per_epoch(
            self.data.x_train.shape[0])
        config_lib.validate(cfg, self.spe)
        parse = lambda v, name: steps_lib.parse(v, self.spe, name=name)  # noqa: E731
        self.total = parse(cfg.training_steps, "training_steps")
        self.rewind_step = parse(cfg.rewind_step, "rewind_step") \
            if cfg.rewind in ("iteration", "lr") else 0
        self.eval_every = parse(cfg.eval_every, "eval_every") or self.spe
        self.model = config_lib.model(cfg, self.data.num_classes)
        lr = train_lib.learning_rate(
            cfg.lr, schedule=cfg.lr_schedule, total_steps=self.total,
            warmup_steps=parse(cfg.warmup_steps, "warmup_steps"),
            milestones=[parse(m, "milestones") for m in config_lib.split(cfg.milestones)],
            gamma=cfg.gamma)
        self.tx = train_lib.optimizer(cfg.optimizer, lr, momentum=cfg.momentum,
                                      nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self.mesh = distributed.data_mesh(cfg.devices, cfg.batch_size)  # None: one device
        self.trainer = train_lib.Trainer(self.model, self.tx, cfg.batch_size, cfg.augment, cfg.loop,
                                         mesh=self.mesh, sampling=cfg.sampling)
        if cfg.rewind == "finetune":
            self.finetune_steps = parse(cfg.finetune_steps or cfg.training_steps, "finetune_steps")
            self.ft_tx = train_lib.optimizer(cfg.optimizer, cfg.finetune_lr, momentum=cfg.momentum,
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


def check_workdir(workdir: str) -> None:
    """Fail early, with the path, if `workdir` cannot be created or written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--workdir {workdir!r} is not writable ({e.strerror})") from None


def prepare_run(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """The run directory of a validated config (not created yet). ValueError if `workdir` is not
    writable or the directory holds a run whose result-determining fields differ."""
    check_workdir(workdir)
    run_dir = os.path.join(workdir, config_lib.run_name(cfg))
    path = os.path.join(run_dir, "config.json")
    fields = config_lib.hashed_fields(cfg)
    if os.path.exists(path):
        saved = runs_lib.read_json(path)
        if config_lib.hashed_fields(config_lib.from_saved(saved)) != fields:
            raise ValueError(f"{run_dir} holds a run with a different config; refusing to write "
                             f"into it (compare {path})")
    return run_dir


def write_info(ldir: str, mask: PyTree, rates: PyTree) -> None:
    """level_dir/info.json: density, kept, total and per-layer {path: {kept, total}} of a mask."""
    counts = masks.counts(mask, rates)
    kept, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
    _write_json_atomic(os.path.join(ldir, "info.json"), {
        "density": kept / total, "kept": kept, "total": total,
        "layers": {p: {"kept": k, "total": t} for p, (k, t) in counts.items()}})


def level_dir(run_dir: str, level: int) -> str:
    return os.path.join(run_dir, f"level_{level}")


def is_done(path: str) -> bool:
    return os.path.exists(os.path.join(path, "DONE"))


def _mark_done(path: str) -> None:
    _write_json_atomic(os.path.join(path, "DONE"), {"done": True})


def _prune_mask(s: Setup, prev_final: train_lib.TrainState, prev_mask: PyTree) -> PyTree:
    """Level L's mask: remove `fraction` of level L-1's surviving weights by the scorer."""
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
    scores = scorer(params, mask, inputs)
    if s.mesh is not None:
        scores = jax.tree.map(np.asarray, scores)  # prune on host, as with one device
    return prune.remove_fraction(scores, prev_mask, s.cfg.fraction, scope=s.cfg.scope,
                                 rates=s.rates, count_rule=s.cfg.count_rule,
                                 count_basis=config_lib.count_basis(s.cfg, s.variables["params"]))


def _start_state(s: Setup, run_dir: str, level: int, mask, prev_final):
    """The state level `level` starts from, by rewind mode, and the trainer and length it uses."""
    mode = s.cfg.rewind
    if level == 0:
        init = checkpoints.restore(os.path.join(run_dir, "init"), s.variables,
                                   hint=_hint(run_dir, 0))
        return s.fresh_state(init, mask=mask), s.trainer, s.total
    rewind = checkpoints.restore(os.path.join(run_dir, "rewind"), s.template(),
                                 hint=_hint(run_dir, 0))
    if mode in ("init", "iteration"):
        return rewind.replace(params=masks.apply(rewind.params, mask)), s.trainer, s.total
    if mode == "lr":
        return (rewind.replace(params=masks.apply(prev_final.params, mask),
                               batch_stats=prev_final.batch_stats), s.trainer, s.total)
    state = s.fresh_state({"params": prev_final.params, "batch_stats": prev_final.batch_stats},
                          s.ft_tx, mask)
    return state, s.ft_trainer, s.finetune_steps


def _hint(run_dir: str, level: int) -> str:
    return (f"Rerun with --discard-level {level} to delete level {level} of {run_dir} and "
            f"train it again (levels after it are deleted too).")


def _existing_levels(run_dir: str) -> list[int]:
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    return sorted(int(n[6:]) for n in names if n.startswith("level_") and n[6:].isdigit())


def check_discard(run_dir: str, level: int) -> None:
    """ValueError, before anything is deleted, unless `level` is in 0..the last level of
    `run_dir` (0 also discards init and rewind, so it is valid once the run directory exists)."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"--discard-level {level}: there is no run to discard from ({run_dir} "
                         f"does not exist)")
    last = max(_existing_levels(run_dir), default=0)
    if not 0 <= level <= last:
        raise ValueError(f"--discard-level {level}: expected a level in 0..{last} (the levels of "
                         f"{run_dir})")


def discard_level(run_dir: str, level: int) -> None:
    """Delete level `level` and every later level (and the rewind point if level is 0)."""
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        if name.startswith("level_") and int(name.split("_")[1]) >= level:
            _rmtree(os.path.join(run_dir, name))
    if level == 0:
        for name in ("rewind", "init"):
            _rmtree(os.path.join(run_dir, name))


def _train_level(s: Setup, run_dir: str, level: int, mask, prev_final, bar_desc: str):
    """Train one level to completion, resuming from its latest in-level checkpoint if any."""
    ldir = level_dir(run_dir, level)
    ckdir = os.path.join(ldir, "checkpoint")
    metrics_path = os.path.join(ldir, "metrics.jsonl")
    state, trainer, total = _start_state(s, run_dir, level, mask, prev_final)
    template = state
    done = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit()) if os.path.isdir(ckdir) else []
    if done:
        state = checkpoints.restore(os.path.join(ckdir, str(done[-1])), template,
                                    hint=_hint(run_dir, level))
        _truncate_metrics(metrics_path, done[-1])
    elif os.path.exists(metrics_path) and distributed.is_main_process():
        os.remove(metrics_path)
    rewind_path = os.path.join(run_dir, "rewind")
    need_rewind = level == 0 and s.rewind_step > 0 and not checkpoints.exists(rewind_path)
    last_save = [time.monotonic()]

    def callback(st, record):
        step = int(record["step"])
        if need_rewind and step == s.rewind_step:
            checkpoints.save(rewind_path, st)
        if "test_accuracy" in record:
            _append_metrics(metrics_path, record)
            if step < total and time.monotonic() - last_save[0] >= s.cfg.checkpoint_seconds:
                checkpoints.save(os.path.join(ckdir, str(step)), st)
                for old in (d for d in os.listdir(ckdir) if d.isdigit() and int(d) < step):
                    _rmtree(os.path.join(ckdir, old))
                last_save[0] = time.monotonic()

    stops = (s.rewind_step,) if need_rewind else ()
    state, _ = train_lib.train(trainer, state, mask, s.data, num_steps=total,
                               eval_every=s.eval_every, stops=stops, callback=callback,
                               progress=bar_desc if _progress(s.cfg) else False)
    checkpoints.save(os.path.join(ldir, "final"), state)
    _rmtree(ckdir)
    _mark_done(ldir)
    return state


def _progress(cfg) -> bool:
    return cfg.progress and distributed.is_main_process()


def control_source(s: Setup, run_dir: str, level: int, start: train_lib.TrainState):
    """The full, unmasked (params, batch_stats) the random-pruning control takes its kept weights
    from: the rewind point's values at every position.

      init, iteration  the rewind checkpoint (step 0 or `rewind_step` of level 0), unmasked
      lr, finetune     level 0's final weights (the dense trained network): level L-1's weights
                       hold zeros wherever an earlier level pruned, so they cannot be the source
    """
    if s.cfg.rewind in ("init", "iteration"):
        rewind = checkpoints.restore(os.path.join(run_dir, "rewind"), s.template(),
                                     hint=_hint(run_dir, 0))
        return rewind.params, rewind.batch_stats
    dense = checkpoints.restore(os.path.join(level_dir(run_dir, 0), "final"), s.template(),
                                hint=_hint(run_dir, 0))
    return dense.params, dense.batch_stats


def control_starts(s: Setup, run_dir: str, level: int, mask, prev_final):
    """(names, start states, masks) of level `level`'s controls, all from the level's start state
    (same step, trainer and length as the ticket):

      reinit_s<k>        the ticket's mask; weights of a fresh initialization (its own key per
                         level and seed); step, optimizer state and batch statistics of the start
      random_prune_s<k>  a random mask with the ticket's per-layer counts; every kept weight starts
                         at its value at the rewind point (`control_source`), not at the ticket's
                         masked value (which is 0.0 outside the ticket's mask)
    """
    start, trainer, total = _start_state(s, run_dir, level, mask, prev_final)
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
                m = masks.random_like(mask, jax.random.fold_in(key, 1), s.rates)
                st = start.replace(params=masks.apply(source[0], m), batch_stats=source[1])
            names.append(f"{kind}_s{seed}")
            states.append(st)
            cmasks.append(m)
    return names, states, cmasks, trainer, total


def _run_controls(s: Setup, run_dir: str, level: int, mask, prev_final) -> None:
    """Train the level's controls (`control_starts`) together as vmapped replicas."""
    cdir = os.path.join(level_dir(run_dir, level), "controls")
    if is_done(cdir):
        return
    _rmtree(cdir)
    names, states, cmasks, trainer, total = control_starts(s, run_dir, level, mask, prev_final)
    if not names:
        return
    _, hist = train_lib.train(trainer, train_lib.stack(states), train_lib.stack(cmasks), s.data,
                              num_steps=total, eval_every=s.eval_every, replicas=True,
                              progress=f"level {level} controls" if _progress(s.cfg) else False)
    for i, (name, m) in enumerate(zip(names, cmasks)):
        d = os.path.join(cdir, name)
        os.makedirs(d, exist_ok=True)
        checkpoints.save(os.path.join(d, "mask"), m)
        for rec in hist:
            if "test_accuracy" in rec:
                _append_metrics(os.path.join(d, "metrics.jsonl"),
                                {k: (v[i] if np.ndim(v) else v) for k, v in rec.items()})
    _mark_done(cdir)


def find_ticket(cfg: ml_collections.ConfigDict, workdir: str, *,
                discard: int | None = None) -> str:
    """Run (or resume, or extend) an IMP experiment; returns its run directory."""
    if cfg.experiment != "find-ticket":
        raise ValueError(f"experiment={cfg.experiment!r}: this config is for `lottery "
                         f"{cfg.experiment}`, not `lottery find-ticket`")
    config_lib.validate(cfg)
    run_dir = prepare_run(cfg, workdir)
    if discard is not None:
        check_discard(run_dir, discard)
    s = Setup(cfg)  # loads data and validates everything that needs its size, before writing
    os.makedirs(run_dir, exist_ok=True)
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg_path):
        _write_json_atomic(cfg_path, cfg.to_dict())
    if discard is not None:
        discard_level(run_dir, discard)
    init_path = os.path.join(run_dir, "init")
    if not checkpoints.exists(init_path):
        _rmtree(init_path)
        checkpoints.save(init_path, s.variables)
    init_vars = checkpoints.restore(init_path, s.variables, hint=_hint(run_dir, 0))
    rewind_path = os.path.join(run_dir, "rewind")
    if s.rewind_step == 0 and not checkpoints.exists(rewind_path):
        checkpoints.save(rewind_path, s.fresh_state(init_vars))
    control_levels = {int(v) for v in config_lib.split(cfg.control_levels)}
    mask, prev_final = masks.init(init_vars["params"]), None
    levels = tqdm(range(cfg.levels + 1), desc="levels", disable=not _progress(cfg), unit="level")
    for level in levels:
        ldir = level_dir(run_dir, level)
        mask_path = os.path.join(ldir, "mask")
        if level > 0:
            if checkpoints.exists(mask_path):
                mask = checkpoints.restore(mask_path, mask, hint=_hint(run_dir, level))
            else:
                _check_finite_final(run_dir, level - 1, prev_final)
                mask = _prune_mask(s, prev_final, mask)
        if not checkpoints.exists(mask_path):
            os.makedirs(ldir, exist_ok=True)
            _rmtree(mask_path)
            checkpoints.save(mask_path, mask)
        if not os.path.exists(os.path.join(ldir, "info.json")):
            write_info(ldir, mask, s.rates)
        density = masks.density(mask, s.rates)
        levels.set_postfix(density=f"{density:.4f}", refresh=False)
        if is_done(ldir):
            final = checkpoints.restore(os.path.join(ldir, "final"), s.template(
                s.ft_tx if cfg.rewind == "finetune" and level > 0 else None),
                hint=_hint(run_dir, level))
        else:
            with _name_level(f"level {level}"):
                final = _train_level(s, run_dir, level, mask, prev_final,
                                     f"level {level} (density {density:.3f})")
        if level > 0 and config_lib.split(cfg.controls) and (
                not control_levels or level in control_levels):
            with _name_level(f"level {level} controls"):
                _run_controls(s, run_dir, level, mask, prev_final)
        prev_final = final
    levels.close()
    return run_dir


@contextlib.contextmanager
def _name_level(what: str):
    """Re-raise a DivergenceError of training with `what` (e.g. 'level 3') in front: the run
    stops there, nothing of the diverged training is saved (its DONE and final are never
    written), and no later level is pruned from it."""
    try:
        yield
    except train_lib.DivergenceError as e:
        raise train_lib.DivergenceError(f"{what}: {e}", e.step, e.replica) from None


def _check_finite_final(run_dir: str, level: int, final: train_lib.TrainState) -> None:
    """Refuse to prune from non-finite weights (e.g. a level that diverged under an older
    version, which saved it as finished)."""
    if not bool(train_lib.all_finite(final.params)):
        raise train_lib.DivergenceError(
            f"level {level}: its final weights are not finite (training diverged; likely cause: "
            f"the learning rate is too high); not pruning from them. {_hint(run_dir, level)}",
            int(np.asarray(final.step).reshape(-1)[0]))


def summary(run_dir: str) -> list[dict]:
    """Per finished level: density, final and best test accuracy, control accuracies."""
    rows, level = [], 0
    while is_done(level_dir(run_dir, level)):
        rows.append(_level_row(run_dir, level))
        level += 1
    return rows


def _evaluations(path: str, run_dir: str, level: int) -> list[dict]:
    """The evaluation records of a finished level's metrics file; ValueError naming the file
    if there are none."""
    recs = [r for r in read_metrics(path) if "test_accuracy" in r]
    if not recs:
        raise ValueError(f"{path} has no evaluation records, but level {level} is marked done; "
                         f"{_hint(run_dir, level)}")
    return recs


def _level_row(run_dir: str, level: int) -> dict:
    ldir = level_dir(run_dir, level)
    metrics = _evaluations(os.path.join(ldir, "metrics.jsonl"), run_dir, level)
    best = max(metrics, key=lambda r: r["test_accuracy"])
    info = runs_lib.read_json(os.path.join(ldir, "info.json"))
    row = {"level": level, "density": info["density"], "kept": info["kept"],
           "total": info["total"], "final_accuracy": metrics[-1]["test_accuracy"],
           "best_accuracy": best["test_accuracy"], "best_step": best["step"]}
    cdir = os.path.join(ldir, "controls")
    if is_done(cdir):
        for name in sorted(os.listdir(cdir)):
            if os.path.isdir(os.path.join(cdir, name)):
                kind = name.rsplit("_s", 1)[0]
                acc = _evaluations(os.path.join(cdir, name, "metrics.jsonl"), run_dir,
                                   level)[-1]["test_accuracy"]
                row.setdefault(f"{kind}_accuracy", []).append(acc)
    return row
