"""Running a prune-at-init sweep: each cell's masks built at initialization, trained, written.

`sweep(cfg, workdir)` runs (or resumes) every (scorer, ablation, point) cell of a config in its
run directory (layout in the `lottery.pai` docstring): masks from the seeds' inits
(`prune_at_init`, or an ablation of them), the seeds trained together as vmapped replicas, then
masks, metrics, info.json, collapse.json and DONE written through `lottery.rundir`.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from lottery import batches, checkpoints, config as config_lib, masks, models, prune, rundir
from lottery import scorers, train as train_lib
from lottery.experiment import Setup, progress
from lottery.pai import ablations, spec
from lottery.pai.spec import Point

PyTree = Any


def prune_batches(cfg, data, seed: int) -> tuple:
    """The (x, y) batches SNIP/GraSP score on for `seed`: `prune_examples` training examples
    (0 = 10 x classes) drawn without replacement, augmented as in training if `prune_augment`."""
    n = cfg.prune_examples or 10 * data.num_classes
    if n > data.x_train.shape[0]:
        raise ValueError(f"prune_examples={n}: the training split has only "
                         f"{data.x_train.shape[0]} examples")
    key = jax.random.fold_in(jax.random.key(cfg.prune_seed), seed)
    idx = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0),
                                            data.x_train.shape[0]))[:n]
    x, y = jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
    augment = batches.AUGMENTATIONS[cfg.augment]
    if cfg.prune_augment and augment is not None:
        x = augment(jax.random.fold_in(key, 1), x)
    bs = cfg.prune_batch_size
    return tuple((x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs))


def prune_at_init(scorer: str, params: PyTree, inputs: scorers.Inputs, density: float, *,
                  rounds: int = 1, schedule: str = "exponential", scope: str = "global",
                  rates: PyTree | None = None, invert: bool = False, count_rule: str = "exact",
                  count_basis: PyTree | None = None) -> PyTree:
    """The mask of `scorer` at `density` (fraction of prunable weights kept) from `params`.

    `rounds` = 1 is one-shot; more rounds rescore the masked network before each round
    (`prune.iterative`). Density 1 returns the all-True mask without scoring. `invert` ranks by
    the negated scores (`inverted`): the highest-scoring weights are pruned instead, by the same
    procedure and to the same count. `count_rule` / `count_basis`: whose counting and tie
    rule (`prune.COUNT_RULES`; 'synflow' reproduces the Synaptic-Flow code's masks).
    """
    mask = masks.init(params)
    if density == 1.0:
        return mask
    fn = ablations.inverted(scorer) if invert else scorers.get(scorer)
    return prune.iterative(fn, params, mask, inputs, density, rounds=rounds, schedule=schedule,
                           scope=scope, rates=rates, count_rule=count_rule,
                           count_basis=count_basis)


class _Sweep(NamedTuple):
    """What the cells of a sweep share: the run's Setup and one init and prune data per seed."""

    s: Setup
    seeds: list[int]
    variables: dict  # seed -> model variables at init
    reinit_variables: dict  # seed -> model variables of the reinit draw (empty: no reinit cell)
    batches: dict  # seed -> prune batches
    apply_fn: Any  # one function object, so scorer programs compile once


@functools.lru_cache(maxsize=None)
def _init_fn(model, input_shape: tuple):
    """`models.init`'s computation as one compiled function of the key, shared by every seed and
    sweep of the process (models.init compiles again on every call)."""
    x = jnp.zeros((1, *input_shape), jnp.float32)
    return jax.jit(lambda k: model.init(k, x, train=False))


def _prepare(s: Setup) -> _Sweep:
    seeds = spec.seed_list(s.cfg)
    init = _init_fn(s.model, s.input_shape)
    variables = {sd: dict(init(jax.random.fold_in(jax.random.key(sd), 0))) for sd in seeds}
    reinit = {sd: dict(init(ablations.reinit_key(sd))) for sd in seeds} \
        if "reinit" in spec.parse_ablations(s.cfg.ablations) else {}
    batches = {sd: prune_batches(s.cfg, s.data, sd) for sd in seeds}
    # Non-param collections (BN statistics) are the same for every seed at init.
    return _Sweep(s, seeds, variables, reinit, batches,
                  models.inference_fn(s.model, variables[seeds[0]]))


def _scorer_masks(sw: _Sweep, scorer: str, point: Point, invert: bool = False) -> list[PyTree]:
    """Per seed, the mask `scorer` (negated if `invert`) builds at `point` from the seed's init."""
    cfg = sw.s.cfg
    rounds = spec.parse_rounds(cfg.rounds).get(scorer, 1)
    out = []
    for sd in sw.seeds:
        inputs = scorers.Inputs.create(sw.apply_fn, sw.batches[sd],
                                       input_shape=(1, *sw.s.input_shape),
                                       key=jax.random.fold_in(jax.random.key(sd), 2),
                                       rates=sw.s.rates)
        m = prune_at_init(scorer, sw.variables[sd]["params"], inputs, point.density,
                          rounds=rounds, schedule=cfg.prune_schedule, scope=cfg.scope,
                          rates=sw.s.rates, invert=invert, count_rule=cfg.count_rule,
                          count_basis=config_lib.count_basis(cfg, sw.variables[sd]["params"]))
        out.append(jax.tree.map(np.asarray, m))
    return out


def _base_masks(run_dir: str, sw: _Sweep, scorer: str, point: Point) -> list[PyTree]:
    """The scorer's own masks at `point`: read from its finished cell, else computed (equal)."""
    cdir = cell_dir(run_dir, scorer, point)
    if not rundir.is_done(cdir):
        return _scorer_masks(sw, scorer, point)
    return [jax.tree.map(lambda x: np.asarray(x, bool), checkpoints.restore(
        os.path.join(cdir, f"s{sd}", "mask"), masks.init(sw.variables[sd]["params"])))
        for sd in sw.seeds]


def cell_masks(run_dir: str, sw: _Sweep, scorer: str, ablation: str | None,
               point: Point) -> list[PyTree]:
    """Per seed, the mask of the (scorer, ablation) cell at `point`."""
    if ablation is None:
        return _scorer_masks(sw, scorer, point)
    if ablation == "invert":
        return _scorer_masks(sw, scorer, point, invert=True)
    base = _base_masks(run_dir, sw, scorer, point)
    if ablation == "reinit":
        return base
    if ablation == "shuffle":
        return [ablations.shuffle_mask(m, ablations.shuffle_key(sd), sw.s.rates)
                for sd, m in zip(sw.seeds, base)]
    raise ValueError(f"unknown ablation {ablation!r}; expected one of {', '.join(spec.ABLATIONS)}")


def cell_variables(sw: _Sweep, ablation: str | None) -> list[dict]:
    """Per seed, the UNMASKED model variables the cell's training starts from (before its mask):
    the seed's init, or for `reinit` the fresh draw."""
    src = sw.reinit_variables if ablation == "reinit" else sw.variables
    return [src[sd] for sd in sw.seeds]


def start_states(sw: _Sweep, ablation: str | None, cell_masks: Sequence[PyTree]) -> list:
    """Per seed, the train state the cell starts from: the cell's unmasked init values
    (`cell_variables`) under its own mask, with the seed's data key."""
    return [train_lib.init_state(v, sw.s.tx, jax.random.fold_in(jax.random.key(sd), 1), m)
            for sd, v, m in zip(sw.seeds, cell_variables(sw, ablation), cell_masks)]


def _trees_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _twin(run_dir: str, sw: _Sweep, scorer: str, ablation: str | None, point: Point,
          cell_masks) -> str | None:
    """Another finished cell at `point` with the same weights source and exactly these masks."""
    counts = [masks.counts(m, sw.s.rates) for m in cell_masks]
    for other, ab in spec.cells(sw.s.cfg):
        cdir = cell_dir(run_dir, other, point, ab)
        if (other, ab) == (scorer, ablation) or not rundir.is_done(cdir) or \
                ablations.init_stream(ab) != ablations.init_stream(ablation):
            continue
        same = True
        for sd, m, c in zip(sw.seeds, cell_masks, counts):
            layers = rundir.read_json(os.path.join(cdir, f"s{sd}", rundir.INFO))["layers"]
            if layers != {p: {"kept": k, "total": t} for p, (k, t) in c.items()} or \
                    not _trees_equal(m, checkpoints.restore(os.path.join(cdir, f"s{sd}", "mask"),
                                                            m)):
                same = False
                break
        if same:
            return spec.cell_name(other, ab)
    return None


def cell_dir(run_dir: str, scorer: str, point: Point, ablation: str | None = None) -> str:
    """`<run_dir>/<scorer>/<point.name>`, or `<run_dir>/<scorer>+<ablation>/<point.name>`."""
    return os.path.join(run_dir, spec.cell_name(scorer, ablation), point.name)


def _train_cell(sw: _Sweep, states, cell_masks, desc) -> list[list[dict]]:
    """Train the seeds' sparse networks as vmapped replicas; per seed its eval records."""
    s = sw.s
    _, hist = train_lib.train(s.trainer, train_lib.stack(states), train_lib.stack(cell_masks),
                              s.data, num_steps=s.total, eval_every=s.eval_every, replicas=True,
                              progress=desc if progress(s.cfg) else False)
    return [[{k: (v[i] if np.ndim(v) else v) for k, v in rec.items()}
             for rec in hist if "test_accuracy" in rec] for i in range(len(sw.seeds))]


def _run_cell(run_dir: str, sw: _Sweep, scorer: str, ablation: str | None, point: Point) -> dict:
    """Compute, train and write one (scorer, ablation, point) cell; returns its collapse record."""
    cdir = cell_dir(run_dir, scorer, point, ablation)
    rundir.rmtree(cdir)  # an interrupted cell starts again
    ms = cell_masks(run_dir, sw, scorer, ablation, point)
    twin = _twin(run_dir, sw, scorer, ablation, point, ms)
    if twin is None:
        records = _train_cell(sw, start_states(sw, ablation, ms), ms,
                              f"{spec.cell_name(scorer, ablation)} {point.name}")
    else:
        tdir = os.path.join(run_dir, twin, point.name)
        records = [rundir.read_metrics(os.path.join(tdir, f"s{sd}", rundir.METRICS))
                   for sd in sw.seeds]
    collapsed = {}
    for sd, m, recs in zip(sw.seeds, ms, records):
        sdir = os.path.join(cdir, f"s{sd}")
        os.makedirs(sdir, exist_ok=True)
        checkpoints.save(os.path.join(sdir, "mask"), m)
        for rec in recs:
            rundir.append_metrics(os.path.join(sdir, rundir.METRICS), rec)
        rundir.write_info(sdir, m, sw.s.rates)
        collapsed[str(sd)] = prune.collapsed(m, sw.s.rates)
    record = {"scorer": scorer, "ablation": ablation,
              "init_stream": ablations.init_stream(ablation),
              "compression": point.compression, "density": point.density,
              "rounds": spec.parse_rounds(sw.s.cfg.rounds).get(scorer, 1),
              "schedule": sw.s.cfg.prune_schedule, "reused_from": twin, "collapsed": collapsed}
    rundir.write_json(os.path.join(cdir, "collapse.json"), record)
    rundir.mark_done(cdir)
    return record


def sweep(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """Run (or resume) a prune-at-init sweep; returns its run directory.

    Every input is validated before anything is written (`normalize`, then the data-dependent
    checks of `Setup`).
    """
    cfg = spec.normalize(cfg)
    run_dir = rundir.prepare(cfg, workdir)
    s = Setup(cfg)
    prune_batches(cfg, s.data, cfg.seed)  # prune_examples must fit the training split
    points = spec.parse_points(cfg.compressions, cfg.densities)
    with rundir.writing(run_dir, cfg):  # one process at a time; nothing written before it
        _run_cells(run_dir, s, points)
    return run_dir


def _run_cells(run_dir: str, s: Setup, points) -> None:
    """sweep's work, under the run lock: every cell not done yet."""
    cfg = s.cfg
    todo = [(sc, ab, p) for p in points for sc, ab in spec.cells(cfg)
            if not rundir.is_done(cell_dir(run_dir, sc, p, ab))]
    if not todo:
        return
    sw = _prepare(s)
    bar = tqdm(todo, desc="cells", unit="cell", disable=not cfg.progress)
    for scorer, ablation, point in bar:
        name = spec.cell_name(scorer, ablation)
        bar.set_postfix(cell=name, compression=spec.fmt(point.compression), refresh=False)
        rec = _run_cell(run_dir, sw, scorer, ablation, point)
        dead = {sd: v for sd, v in rec["collapsed"].items() if v}
        if dead and cfg.progress:
            tqdm.write(f"layer collapse: {name} at compression {spec.fmt(point.compression)}: "
                       + "; ".join(f"seed {sd}: {', '.join(v)}" for sd, v in dead.items()))
    bar.close()
