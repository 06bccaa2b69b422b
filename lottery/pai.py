"""Pruning at initialization: scorers x compression ratios, each sparse network trained, compared.

The experiment of Tanaka et al. 2020 (Synaptic Flow, arXiv:2006.05467, Fig. 6): for every scorer
and compression ratio, build a mask from the network AT INITIALIZATION, check for layer collapse,
train the sparse network from that same initialization, and record its test accuracy.

Units: the sweep axis is the compression ratio over the PRUNABLE weights,
compression = prunable weights / kept prunable weights = 1 / density (>= 1; 10 keeps 10%).
It is not ShrinkBench's ratio (`masks.compression_ratio`), which counts every parameter.
A sweep may be given in densities instead (`densities`, in (0, 1]); never both.
A cell keeps round-half-up(N / compression) of the N prunable weights (`prune.to_density`).

Pruning (defaults follow the Synaptic-Flow code's single-shot paper runs): global scope,
every kernel prunable including the output layer (`exclude = ""`); SynFlow iterative with 100
rounds on the exponential schedule, the other scorers in one shot (`rounds = "synflow=100"`).
SNIP and GraSP score on `prune_examples` training examples (0 = 10 x number of classes), drawn
with `prune_seed`, with the training augmentation applied (`prune_augment`), in batches of
`prune_batch_size` whose gradients are summed. At compression 1 no scorer runs: the mask is dense.

Seeds: `seeds` replicates with seed = cfg.seed, cfg.seed + 1, ...; seed s gives the init
(`fold_in(key(s), 0)`, the same init as `find-ticket` with seed=s), the data order
(`fold_in(key(s), 1)`), the `random` scorer's key (`fold_in(key(s), 2)`) and the draw of the
prune examples (`fold_in(key(prune_seed), s)`). Every scorer sees the same inits, so the
comparison is paired. The seeds of one (scorer, compression) cell train together as vmapped
replicas (`train.train(..., replicas=True)`) with the training recipe of the config (as in
`find-ticket`; its IMP-only fields are ignored).

Sanity checks (Frankle et al. 2021, "Pruning Neural Networks at Initialization: Why Are We
Missing the Mark?", arXiv:2009.08576): `ablations`, a comma-separated subset of ABLATIONS, adds
for every scorer except `random` (its own control) and every point a cell `<scorer>+<ablation>`:
  shuffle  the scorer's mask with each prunable layer's entries randomly permuted within the layer
           (same per-layer counts; layer i of seed s permuted with key fold_in(fold_in(key(s), 3),
           i)), trained from the same init as the unablated cell;
  reinit   the scorer's mask, trained from a fresh init drawn with fold_in(key(s), 4);
  invert   the mask of the negated scores (the highest-scoring weights pruned) at the same
           density, by the same procedure (rounds and schedule) as the scorer.
Every cell starts from the UNMASKED init values of its weights source under its own mask
(`start_states`), with the seed's data order. Ablations are left out of the run hash: they only
extend a sweep.

Run directory `<workdir>/prune-at-init_<model>_<dataset>_<hash>/` (hash of the config, as
`config.run_name`):
  config.json
  <cell>/<point>/              cell = <scorer> or <scorer>+<ablation>;
                               point = c<compression> (or d<density> for a density sweep)
    s<seed>/mask/              orbax bool mask (the params' structure)
    s<seed>/metrics.jsonl      eval records: step, train_loss, test_loss, test_accuracy
    s<seed>/info.json          {density, kept, total, layers: {path: {kept, total}}}
    collapse.json              {scorer, ablation (null for none), init_stream (0: the seed's
                                init, 4: the reinit draw), compression, density, rounds, schedule,
                                reused_from, collapsed: {"<seed>": [prunable layer paths with no
                                weight left]}}
    DONE                       written last: the cell is finished
  accuracy_vs_compression.png  written by the command line (`plot`)
Resume: finished (DONE) cells are skipped; an interrupted cell is deleted and computed again from
its start (masks and training), which gives the same result. A cell whose masks equal those of a
finished cell of another scorer at the same point (always the case at compression 1) with the same
weights source (init or reinit) copies its metrics instead of training again (`reused_from` names
it): training depends only on seed, weights and mask.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from lottery import checkpoints, config as config_lib, imp, masks, models, prune, scorers
from lottery import schedules, train as train_lib

PyTree = Any

EXPERIMENT = "prune-at-init"
PLOT_NAME = "accuracy_vs_compression.png"
ABLATIONS = ("shuffle", "reinit", "invert")  # Frankle et al. 2021's sanity checks, in table order
UNABLATED = ("random",)  # scorers that get no ablation cells: random is its own control
_SHUFFLE_STREAM, _REINIT_STREAM = 3, 4  # fold_in(key(seed), .): 0 init, 1 data, 2 random scorer


def base_config() -> ml_collections.ConfigDict:
    """`config.base()` plus the sweep fields, with the Synaptic-Flow paper's pruning defaults."""
    c = config_lib.base()
    c.experiment = EXPERIMENT
    c.exclude = ""  # the paper prunes every conv and dense kernel, the output layer included
    c.scorers = "snip,grasp,synflow,magnitude,random"  # comma-separated names of scorers.SCORERS
    c.compressions = "1,10,100,1000"  # prunable weights / kept (= 1/density), each >= 1
    c.densities = ""  # or a sweep in densities (fraction kept, in (0, 1]); never both
    c.seeds = 3  # replicates: seeds cfg.seed .. cfg.seed + seeds - 1
    c.rounds = "synflow=100"  # pruning rounds per scorer; scorers not named prune in one shot
    c.prune_schedule = "exponential"  # density per round, see lottery.schedules
    c.prune_examples = 0  # training examples SNIP/GraSP score on; 0 = 10 x number of classes
    c.prune_batch_size = 256  # scoring batch size (gradients are summed over batches)
    c.prune_seed = 0  # with the seed, which examples are drawn (and their augmentation)
    c.prune_augment = True  # apply the config's training augmentation to the prune examples
    c.ablations = ""  # comma-separated subset of shuffle, reinit, invert ('' = none); unhashed
    return c


class Point(NamedTuple):
    """One position on the sweep axis: directory name, compression ratio, density."""

    name: str
    compression: float
    density: float


def _fmt(x: float) -> str:
    """The shortest decimal string that reads back as exactly `x` ('1000', '0.05', '3.16...')."""
    return np.format_float_positional(float(x), trim="-")


def _number(token: str, field: str) -> float:
    """A float from '10', '1e3' or '10^0.5'."""
    try:
        if "^" in token:
            b, e = token.split("^", 1)
            value = math.pow(float(b), float(e))
        else:
            value = float(token)
    except (ValueError, OverflowError):
        raise ValueError(f"{field}: {token!r} is not a number (write e.g. 10, 1e3 or "
                         f"10^0.5)") from None
    if not math.isfinite(value):
        raise ValueError(f"{field}: {token!r} is not a finite number")
    return value


def parse_points(compressions: str, densities: str) -> list[Point]:
    """The sweep's points from the comma-separated `compressions` (>= 1) or `densities` (in (0, 1]).

    Exactly one of the two must be non-empty; repeated values are rejected.
    """
    comp, dens = config_lib.split(compressions), config_lib.split(densities)
    if comp and dens:
        raise ValueError(f"compressions={compressions!r} and densities={densities!r}: give the "
                         f"sweep in one unit only (set the other to '')")
    if not comp and not dens:
        raise ValueError("compressions and densities are both empty: give compression ratios "
                         "(e.g. 1,10,100,1000) or densities (e.g. 1,0.1,0.01)")
    points = []
    for token in comp:
        c = _number(token, "compression")
        if not c >= 1.0:
            raise ValueError(f"compression={token}: a compression ratio (prunable weights / kept "
                             f"weights = 1/density) must be >= 1; for a density use --density")
        points.append(Point("c" + _fmt(c), c, 1.0 / c))
    for token in dens:
        d = _number(token, "density")
        if not 0.0 < d <= 1.0:
            raise ValueError(f"density={token}: a density (fraction of prunable weights kept) "
                             f"must be in (0, 1]; for a compression ratio use --compression")
        points.append(Point("d" + _fmt(d), 1.0 / d, d))
    names = [p.name for p in points]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{'compressions' if comp else 'densities'}: {dup[0][1:]} is given twice")
    return points


def parse_scorers(value: str) -> list[str]:
    """The scorer names of a comma-separated list; each must be in `scorers.SCORERS`."""
    names = config_lib.split(value)
    if not names:
        raise ValueError(f"scorers={value!r}: give at least one scorer; known scorers: "
                         f"{', '.join(sorted(scorers.SCORERS))}")
    for n in names:
        if n not in scorers.SCORERS:
            raise ValueError(f"scorers: unknown scorer {n!r}; known scorers: "
                             f"{', '.join(sorted(scorers.SCORERS))}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"scorers={value!r}: {dup[0]!r} is given twice")
    return names


def parse_rounds(value: str) -> dict[str, int]:
    """'synflow=100,snip=5' -> {'synflow': 100, 'snip': 5} (pruning rounds, each >= 1)."""
    out = {}
    for item in config_lib.split(value):
        name, _, r = (s.strip() for s in item.partition("="))
        if name not in scorers.SCORERS:
            raise ValueError(f"rounds={value!r}: unknown scorer {name!r}; known scorers: "
                             f"{', '.join(sorted(scorers.SCORERS))}")
        if not r.isdigit() or int(r) < 1:
            raise ValueError(f"rounds={value!r}: expected 'scorer=<rounds >= 1>,...', "
                             f"e.g. 'synflow=100'")
        out[name] = int(r)
    return out


def parse_ablations(value: str) -> list[str]:
    """The ablations of a comma-separated list, in ABLATIONS order ('' = none)."""
    names = config_lib.split(value)
    for n in names:
        if n not in ABLATIONS:
            raise ValueError(f"ablations: unknown ablation {n!r}; expected a comma-separated "
                             f"subset of {', '.join(ABLATIONS)} ('' = none)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"ablations={value!r}: {dup[0]!r} is given twice")
    return [a for a in ABLATIONS if a in names]


def cell_name(scorer: str, ablation: str | None = None) -> str:
    """'snip' for the scorer's own cell, 'snip+shuffle' for an ablation of it."""
    return f"{scorer}+{ablation}" if ablation else scorer


def cells(cfg) -> list[tuple[str, str | None]]:
    """The sweep's (scorer, ablation) cells at every point: each scorer, then its ablations
    (none for the scorers of UNABLATED)."""
    abl = parse_ablations(cfg.get("ablations", ""))
    return [(sc, ab) for sc in parse_scorers(cfg.scorers)
            for ab in [None] + ([] if sc in UNABLATED else abl)]


def normalize(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A validated copy of `cfg` with the sweep fields in canonical form (so equal sweeps hash
    equally). Raises ValueError naming the first bad field. Cheap: no data, no training."""
    if cfg.get("experiment") != EXPERIMENT:
        raise ValueError(f"experiment={cfg.get('experiment')!r}: prune-at-init needs a config "
                         f"built from lottery.pai.base_config() (experiment={EXPERIMENT!r})")
    missing = [k for k in base_config() if k not in cfg]
    if missing:
        raise ValueError(f"config lacks the field(s) {', '.join(missing)}: start it from "
                         f"lottery.pai.base_config()")
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    names = parse_scorers(cfg.scorers)
    points = parse_points(cfg.compressions, cfg.densities)
    rounds = parse_rounds(cfg.rounds)
    ablations = parse_ablations(cfg.ablations)
    if cfg.prune_schedule not in schedules.SCHEDULES:
        raise ValueError(f"prune_schedule={cfg.prune_schedule!r}: expected one of "
                         f"{', '.join(schedules.SCHEDULES)}")
    for field in ("seeds", "prune_batch_size"):
        if cfg[field] < 1:
            raise ValueError(f"{field}={cfg[field]}: must be >= 1")
    if cfg.prune_examples < 0:
        raise ValueError(f"prune_examples={cfg.prune_examples}: must be >= 0 "
                         f"(0 = 10 x number of classes)")
    config_lib.validate(cfg)
    cfg.scorers = ",".join(names)
    field = "compressions" if config_lib.split(cfg.compressions) else "densities"
    cfg[field] = ",".join(_fmt(p.compression if field == "compressions" else p.density)
                          for p in points)
    cfg.rounds = ",".join(f"{k}={v}" for k, v in sorted(rounds.items()))
    cfg.ablations = ",".join(ablations)
    return cfg


def seed_list(cfg) -> list[int]:
    """The seeds of the sweep: cfg.seed, cfg.seed + 1, ..., cfg.seed + cfg.seeds - 1."""
    return [cfg.seed + i for i in range(cfg.seeds)]


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
    augment = train_lib.AUGMENTATIONS[cfg.augment]
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
    fn = inverted(scorer) if invert else scorers.get(scorer)
    return prune.iterative(fn, params, mask, inputs, density, rounds=rounds, schedule=schedule,
                           scope=scope, rates=rates, count_rule=count_rule,
                           count_basis=count_basis)


@functools.lru_cache(maxsize=None)
def inverted(name: str) -> scorers.Scorer:
    """The scorer `name` with its scores negated (higher = keep, so the lowest are kept). One
    function object per name, so `prune.iterative`'s compiled program is cached across calls."""
    base = scorers.get(name)

    def scorer(params, mask, inputs):
        return jax.tree.map(jnp.negative, base(params, mask, inputs))

    scorer.__name__ = scorer.__qualname__ = f"inverted_{name}"
    return scorer


def shuffle_key(seed: int) -> jax.Array:
    """The key of the `shuffle` ablation for `seed`: fold_in(key(seed), 3)."""
    return jax.random.fold_in(jax.random.key(seed), _SHUFFLE_STREAM)


def reinit_key(seed: int) -> jax.Array:
    """The init key of the `reinit` ablation for `seed`: fold_in(key(seed), 4) (the seed's own
    init is fold_in(key(seed), 0))."""
    return jax.random.fold_in(jax.random.key(seed), _REINIT_STREAM)


def shuffle_mask(mask: PyTree, key: jax.Array, rates: PyTree | None = None) -> PyTree:
    """`mask` with the entries of every prunable leaf randomly permuted within the leaf (leaf i,
    in `jax.tree.leaves` order, with `fold_in(key, i)`): the same kept count per layer at random
    positions. Non-prunable leaves are returned unchanged. Numpy bool leaves."""
    rates_l = jax.tree.leaves(masks.resolve_rates(mask, rates))
    leaves, treedef = jax.tree.flatten(mask)
    out = []
    for i, (m, r) in enumerate(zip(leaves, rates_l)):
        m = np.asarray(m, bool)
        if r > 0:
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, i), m.size))
            m = m.ravel()[perm].reshape(m.shape)
        out.append(m)
    return jax.tree.unflatten(treedef, out)


class _Sweep(NamedTuple):
    """What the cells of a sweep share: the run's Setup and one init and prune data per seed."""

    s: imp.Setup
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


def _prepare(s: imp.Setup) -> _Sweep:
    seeds = seed_list(s.cfg)
    init = _init_fn(s.model, s.input_shape)
    variables = {sd: dict(init(jax.random.fold_in(jax.random.key(sd), 0))) for sd in seeds}
    reinit = {sd: dict(init(reinit_key(sd))) for sd in seeds} \
        if "reinit" in parse_ablations(s.cfg.ablations) else {}
    batches = {sd: prune_batches(s.cfg, s.data, sd) for sd in seeds}
    # Non-param collections (BN statistics) are the same for every seed at init.
    return _Sweep(s, seeds, variables, reinit, batches,
                  models.inference_fn(s.model, variables[seeds[0]]))


def _scorer_masks(sw: _Sweep, scorer: str, point: Point, invert: bool = False) -> list[PyTree]:
    """Per seed, the mask `scorer` (negated if `invert`) builds at `point` from the seed's init."""
    cfg = sw.s.cfg
    rounds = parse_rounds(cfg.rounds).get(scorer, 1)
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
    if not imp.is_done(cdir):
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
        return [shuffle_mask(m, shuffle_key(sd), sw.s.rates) for sd, m in zip(sw.seeds, base)]
    raise ValueError(f"unknown ablation {ablation!r}; expected one of {', '.join(ABLATIONS)}")


def _init_stream(ablation: str | None) -> int:
    return _REINIT_STREAM if ablation == "reinit" else 0


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
    for other, ab in cells(sw.s.cfg):
        cdir = cell_dir(run_dir, other, point, ab)
        if (other, ab) == (scorer, ablation) or _init_stream(ab) != _init_stream(ablation) \
                or not imp.is_done(cdir):
            continue
        same = True
        for sd, m, c in zip(sw.seeds, cell_masks, counts):
            layers = _read_json(os.path.join(cdir, f"s{sd}", "info.json"))["layers"]
            if layers != {p: {"kept": k, "total": t} for p, (k, t) in c.items()} or \
                    not _trees_equal(m, checkpoints.restore(os.path.join(cdir, f"s{sd}", "mask"),
                                                            m)):
                same = False
                break
        if same:
            return cell_name(other, ab)
    return None


def cell_dir(run_dir: str, scorer: str, point: Point, ablation: str | None = None) -> str:
    """`<run_dir>/<scorer>/<point.name>`, or `<run_dir>/<scorer>+<ablation>/<point.name>`."""
    return os.path.join(run_dir, cell_name(scorer, ablation), point.name)


def _train_cell(sw: _Sweep, states, cell_masks, desc) -> list[list[dict]]:
    """Train the seeds' sparse networks as vmapped replicas; per seed its eval records."""
    s = sw.s
    _, hist = train_lib.train(s.trainer, train_lib.stack(states), train_lib.stack(cell_masks),
                              s.data, num_steps=s.total, eval_every=s.eval_every, replicas=True,
                              progress=desc if s.cfg.progress else False)
    return [[{k: (v[i] if np.ndim(v) else v) for k, v in rec.items()}
             for rec in hist if "test_accuracy" in rec] for i in range(len(sw.seeds))]


def _run_cell(run_dir: str, sw: _Sweep, scorer: str, ablation: str | None, point: Point) -> dict:
    """Compute, train and write one (scorer, ablation, point) cell; returns its collapse record."""
    cdir = cell_dir(run_dir, scorer, point, ablation)
    shutil.rmtree(cdir, ignore_errors=True)  # an interrupted cell starts again
    ms = cell_masks(run_dir, sw, scorer, ablation, point)
    twin = _twin(run_dir, sw, scorer, ablation, point, ms)
    if twin is None:
        records = _train_cell(sw, start_states(sw, ablation, ms), ms,
                              f"{cell_name(scorer, ablation)} {point.name}")
    else:
        tdir = os.path.join(run_dir, twin, point.name)
        records = [imp.read_metrics(os.path.join(tdir, f"s{sd}", "metrics.jsonl"))
                   for sd in sw.seeds]
    collapsed = {}
    for sd, m, recs in zip(sw.seeds, ms, records):
        sdir = os.path.join(cdir, f"s{sd}")
        os.makedirs(sdir, exist_ok=True)
        checkpoints.save(os.path.join(sdir, "mask"), m)
        for rec in recs:
            imp._append_metrics(os.path.join(sdir, "metrics.jsonl"), rec)
        c = masks.counts(m, sw.s.rates)
        kept, total = (sum(v[i] for v in c.values()) for i in (0, 1))
        imp._write_json_atomic(os.path.join(sdir, "info.json"), {
            "density": kept / total, "kept": kept, "total": total,
            "layers": {p: {"kept": k, "total": t} for p, (k, t) in c.items()}})
        collapsed[str(sd)] = prune.collapsed(m, sw.s.rates)
    record = {"scorer": scorer, "ablation": ablation, "init_stream": _init_stream(ablation),
              "compression": point.compression, "density": point.density,
              "rounds": parse_rounds(sw.s.cfg.rounds).get(scorer, 1),
              "schedule": sw.s.cfg.prune_schedule, "reused_from": twin, "collapsed": collapsed}
    imp._write_json_atomic(os.path.join(cdir, "collapse.json"), record)
    imp._mark_done(cdir)
    return record


def sweep(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """Run (or resume) a prune-at-init sweep; returns its run directory.

    Every input is validated before anything is written (`normalize`, then the data-dependent
    checks of `imp.Setup`).
    """
    cfg = normalize(cfg)
    run_dir = imp.prepare_run(cfg, workdir)
    s = imp.Setup(cfg)
    prune_batches(cfg, s.data, cfg.seed)  # prune_examples must fit the training split
    points = parse_points(cfg.compressions, cfg.densities)
    os.makedirs(run_dir, exist_ok=True)
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg_path):
        imp._write_json_atomic(cfg_path, cfg.to_dict())
    todo = [(sc, ab, p) for p in points for sc, ab in cells(cfg)
            if not imp.is_done(cell_dir(run_dir, sc, p, ab))]
    if not todo:
        return run_dir
    sw = _prepare(s)
    bar = tqdm(todo, desc="cells", unit="cell", disable=not cfg.progress)
    for scorer, ablation, point in bar:
        name = cell_name(scorer, ablation)
        bar.set_postfix(cell=name, compression=_fmt(point.compression), refresh=False)
        rec = _run_cell(run_dir, sw, scorer, ablation, point)
        dead = {sd: v for sd, v in rec["collapsed"].items() if v}
        if dead and cfg.progress:
            tqdm.write(f"layer collapse: {name} at compression {_fmt(point.compression)}: "
                       + "; ".join(f"seed {sd}: {', '.join(v)}" for sd, v in dead.items()))
    bar.close()
    return run_dir


# ---------------------------------------------------------------------------------------------
# Results


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def summary(run_dir: str) -> list[dict]:
    """One row per finished cell, in the config's scorer order, then ablation (none, then
    ABLATIONS order), then by compression.

    Row: label ('snip' or 'snip+shuffle'), scorer, ablation ('' for none), compression, density
    (target), kept_density (achieved, mean over seeds), seeds,
    accuracies (final test accuracy per seed), accuracy_mean, accuracy_std (sample std, ddof=1;
    0 for one seed), collapsed ({layer path: number of seeds where it has no weight left}),
    collapsed_seeds (seeds with any collapsed layer).
    """
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"run_dir {run_dir!r}: no config.json (not a run directory)")
    cfg = _read_json(path)
    if cfg.get("experiment") != EXPERIMENT:
        raise ValueError(f"run_dir {run_dir!r} holds a {cfg.get('experiment')!r} run, not "
                         f"{EXPERIMENT!r}")
    order = config_lib.split(cfg["scorers"])
    found = [d for d in sorted(os.listdir(run_dir)) if os.path.isdir(os.path.join(run_dir, d))]
    rows = []
    for label in found:
        for name in sorted(os.listdir(os.path.join(run_dir, label))):
            cdir = os.path.join(run_dir, label, name)
            if imp.is_done(cdir):
                rows.append(_cell_row(cdir))
    rank = {n: i for i, n in enumerate(order)}
    ab_rank = {a: i for i, a in enumerate(("",) + ABLATIONS)}
    rows.sort(key=lambda r: (rank.get(r["scorer"], len(rank)), r["scorer"],
                             ab_rank.get(r["ablation"], len(ab_rank)), r["ablation"],
                             r["compression"]))
    return rows


def _cell_row(cdir: str) -> dict:
    rec = _read_json(os.path.join(cdir, "collapse.json"))
    seeds = sorted(rec["collapsed"], key=int)
    accs, dens = [], []
    for sd in seeds:
        metrics = imp.read_metrics(os.path.join(cdir, f"s{sd}", "metrics.jsonl"))
        accs.append(metrics[-1]["test_accuracy"])
        dens.append(_read_json(os.path.join(cdir, f"s{sd}", "info.json"))["density"])
    layers = {}
    for sd in seeds:
        for p in rec["collapsed"][sd]:
            layers[p] = layers.get(p, 0) + 1
    ablation = rec.get("ablation") or ""  # runs made before ablations existed have none
    return {"label": cell_name(rec["scorer"], ablation), "scorer": rec["scorer"],
            "ablation": ablation, "compression": rec["compression"],
            "density": rec["density"], "kept_density": float(np.mean(dens)),
            "seeds": [int(sd) for sd in seeds], "accuracies": accs,
            "accuracy_mean": float(np.mean(accs)),
            "accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            "collapsed": layers,
            "collapsed_seeds": sum(1 for sd in seeds if rec["collapsed"][sd])}


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table of `summary` rows: accuracy mean +- std over seeds, collapsed layers."""
    w = max([18] + [len(r["label"]) for r in rows])
    head = (f"{'scorer':<{w}}  {'compression':>11}  {'density':>9}  {'accuracy':>8}  "
            f"{'+- std':>7}  {'seeds':>5}  collapsed layers (seeds)")
    lines = [head]
    for r in rows:
        dead = ", ".join(f"{p} ({n}/{len(r['seeds'])})" for p, n in r["collapsed"].items())
        lines.append(f"{r['label']:<{w}}  {_fmt(round(r['compression'], 6)):>11}  "
                     f"{r['kept_density']:>9.5f}  {r['accuracy_mean']:>8.4f}  "
                     f"{r['accuracy_std']:>7.4f}  {len(r['seeds']):>5}  {dead or '-'}")
    return "\n".join(lines)


_LINESTYLES = {"": "-", "shuffle": "--", "reinit": ":", "invert": "-."}


def plot(run_dir: str, out_png: str) -> list[tuple[str, float]]:
    """Final test accuracy vs compression ratio per cell label (log x-axis, mean +- std over
    seeds), written to `out_png` (6.4 x 4.4 in, 150 dpi; 9.6 in wide with the legend outside
    when there are more than 6 lines). A scorer's ablations share its color with their own line
    style. Cells where any seed collapsed a layer get an 'x' marker. Lines are shifted sideways
    by at most 10^+-0.024 (+-6%) so equal points stay visible.
    Returns the (label, compression) points marked as collapsed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - slow import
    from matplotlib.figure import Figure  # noqa: PLC0415

    rows = summary(run_dir)
    cfg = _read_json(os.path.join(run_dir, "config.json"))
    names = list(dict.fromkeys(r["label"] for r in rows))
    fig = Figure(figsize=(9.6 if len(names) > 6 else 6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    marked = []
    methods = list(dict.fromkeys(r["scorer"] for r in rows))
    spread = 0.012 * min(1.0, 4 / max(1, len(names) - 1))  # the same span for any count
    for i, scorer in enumerate(names):
        rs = [r for r in rows if r["label"] == scorer]
        dodge = 10 ** (spread * (i - (len(names) - 1) / 2))  # keep equal points apart
        x = [r["compression"] * dodge for r in rs]
        line = ax.errorbar(x, [r["accuracy_mean"] for r in rs],
                           yerr=[r["accuracy_std"] for r in rs], marker="o", markersize=4,
                           capsize=2, label=scorer,
                           color=f"C{methods.index(rs[0]['scorer']) % 10}",
                           linestyle=_LINESTYLES.get(rs[0]["ablation"], "-"))
        dead = [r for r in rs if r["collapsed_seeds"]]
        if dead:
            ax.scatter([r["compression"] * dodge for r in dead],
                       [r["accuracy_mean"] for r in dead],
                       marker="x", s=90, linewidths=2, color=line[0].get_color(), zorder=5)
            marked += [(scorer, r["compression"]) for r in dead]
    if marked:
        ax.scatter([], [], marker="x", s=90, linewidths=2, color="black",
                   label="layer collapse (any seed)")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (prunable weights / kept = 1 / density)")
    ax.set_ylabel("final test accuracy")
    seeds = max((len(r["seeds"]) for r in rows), default=0)
    ax.set_title(f"prune at init: {cfg['model']} on {cfg['dataset']} "
                 f"(mean +- std, {seeds} seeds)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if len(names) > 6:  # ablation sweeps: keep the data visible, show the line styles
        ax.legend(fontsize=7, handlelength=3, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  ncol=2 if len(names) > 14 else 1)
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=150)
    return marked


# ---------------------------------------------------------------------------------------------
# Command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The `prune-at-init` subcommand's arguments."""
    known = ", ".join(sorted(scorers.SCORERS))
    p = subparsers.add_parser(
        "prune-at-init", help="prune at init with several scorers over a compression sweep",
        description="Prune at initialization with each scorer at each compression ratio, train "
                    "the sparse networks (several seeds) and compare test accuracy. Override any "
                    "config field with --config.<field>=<value>; the flags below override the "
                    "config's sweep fields.")
    p.add_argument("--config", required=True,
                   help="a Python file whose get_config() starts from lottery.pai.base_config()")
    p.add_argument("--workdir", default="runs", help="where run directories go (default: runs)")
    p.add_argument("--scorers", default=None,
                   help=f"comma-separated scorers (known: {known})")
    unit = p.add_mutually_exclusive_group()
    unit.add_argument("--compression", default=None, metavar="RATIOS",
                      help="comma-separated compression ratios over the PRUNABLE weights: "
                           "prunable / kept = 1/density, each >= 1 (10 keeps 10%%), e.g. "
                           "1,10,100,1000 or 10^0.5. Not a density, not a log10 exponent.")
    unit.add_argument("--density", default=None, metavar="DENSITIES",
                      help="instead of --compression: comma-separated densities = fraction of "
                           "prunable weights kept, each in (0, 1], e.g. 1,0.1,0.01")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (replicates)")
    p.add_argument("--ablations", default=None, metavar="NAMES",
                   help=f"comma-separated sanity checks of Frankle et al. 2021 added as cells "
                        f"<scorer>+<name> for every scorer but random: {', '.join(ABLATIONS)} "
                        f"('' = none; same as --config.ablations)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help=f"where to write the plot (default: <run dir>/{PLOT_NAME})")
    return p


def config_from_args(args, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config file's config, then `--config.<field>=<value>` overrides, then the flags."""
    cfg = config_lib.load(args.config)
    if cfg.get("experiment") != EXPERIMENT:
        raise ValueError(f"--config {args.config!r} is a {cfg.get('experiment')!r} config; "
                         f"prune-at-init needs one built from lottery.pai.base_config()")
    for item in overrides:
        config_lib.apply_override(cfg, item)
    if args.scorers is not None:
        cfg.scorers = args.scorers
    if args.compression is not None:
        cfg.compressions, cfg.densities = args.compression, ""
    if args.density is not None:
        cfg.compressions, cfg.densities = "", args.density
    if args.seeds is not None:
        cfg.seeds = args.seeds
    if getattr(args, "ablations", None) is not None:
        cfg.ablations = args.ablations
    return cfg


def run(args, overrides: Sequence[str] = ()) -> int:
    """`lottery prune-at-init`: run or resume the sweep, print the table, write the plot."""
    cfg = config_from_args(args, overrides)
    run_dir = sweep(cfg, args.workdir)
    rows = summary(run_dir)
    png = args.plot or os.path.join(run_dir, PLOT_NAME)
    plot(run_dir, png)
    print(f"\nrun directory: {run_dir}")
    print(format_table(rows))
    print(f"plot: {png}")
    return 0
