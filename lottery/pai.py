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

Run directory `<workdir>/prune-at-init_<model>_<dataset>_<hash>/` (hash of the config, as
`config.run_name`):
  config.json
  <scorer>/<point>/            point = c<compression> (or d<density> for a density sweep)
    s<seed>/mask/              orbax bool mask (the params' structure)
    s<seed>/metrics.jsonl      eval records: step, train_loss, test_loss, test_accuracy
    s<seed>/info.json          {density, kept, total, layers: {path: {kept, total}}}
    collapse.json              {scorer, compression, density, rounds, schedule, reused_from,
                                collapsed: {"<seed>": [prunable layer paths with no weight left]}}
    DONE                       written last: the cell is finished
  accuracy_vs_compression.png  written by the command line (`plot`)
Resume: finished (DONE) cells are skipped; an interrupted cell is deleted and computed again from
its start (masks and training), which gives the same result. A cell whose masks equal those of a
finished cell of another scorer at the same point (always the case at compression 1) copies its
metrics instead of training again (`reused_from` names it): training depends only on seed and mask.
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
                  rates: PyTree | None = None) -> PyTree:
    """The mask of `scorer` at `density` (fraction of prunable weights kept) from `params`.

    `rounds` = 1 is one-shot; more rounds rescore the masked network before each round
    (`prune.iterative`). Density 1 returns the all-True mask without scoring.
    """
    mask = masks.init(params)
    if density == 1.0:
        return mask
    return prune.iterative(scorers.get(scorer), params, mask, inputs, density, rounds=rounds,
                           schedule=schedule, scope=scope, rates=rates)


class _Sweep(NamedTuple):
    """What the cells of a sweep share: the run's Setup and one init and prune data per seed."""

    s: imp.Setup
    seeds: list[int]
    variables: dict  # seed -> model variables at init
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
    batches = {sd: prune_batches(s.cfg, s.data, sd) for sd in seeds}
    # Non-param collections (BN statistics) are the same for every seed at init.
    return _Sweep(s, seeds, variables, batches, models.inference_fn(s.model, variables[seeds[0]]))


def _cell_masks(sw: _Sweep, scorer: str, point: Point) -> list[PyTree]:
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
                          rates=sw.s.rates)
        out.append(jax.tree.map(np.asarray, m))
    return out


def _trees_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _twin(run_dir: str, sw: _Sweep, scorer: str, point: Point, cell_masks) -> str | None:
    """Another scorer whose finished cell at `point` has exactly these masks, if any."""
    for other in parse_scorers(sw.s.cfg.scorers):
        cdir = cell_dir(run_dir, other, point)
        if other == scorer or not imp.is_done(cdir):
            continue
        same = all(_trees_equal(m, checkpoints.restore(os.path.join(cdir, f"s{sd}", "mask"), m))
                   for sd, m in zip(sw.seeds, cell_masks))
        if same:
            return other
    return None


def cell_dir(run_dir: str, scorer: str, point: Point) -> str:
    """`<run_dir>/<scorer>/<point.name>`."""
    return os.path.join(run_dir, scorer, point.name)


def _train_cell(sw: _Sweep, cell_masks, desc) -> list[list[dict]]:
    """Train the seeds' sparse networks as vmapped replicas; per seed its eval records."""
    s = sw.s
    states = [train_lib.init_state(sw.variables[sd], s.tx,
                                   jax.random.fold_in(jax.random.key(sd), 1), m)
              for sd, m in zip(sw.seeds, cell_masks)]
    _, hist = train_lib.train(s.trainer, train_lib.stack(states), train_lib.stack(cell_masks),
                              s.data, num_steps=s.total, eval_every=s.eval_every, replicas=True,
                              progress=desc if s.cfg.progress else False)
    return [[{k: (v[i] if np.ndim(v) else v) for k, v in rec.items()}
             for rec in hist if "test_accuracy" in rec] for i in range(len(sw.seeds))]


def _run_cell(run_dir: str, sw: _Sweep, scorer: str, point: Point) -> dict:
    """Compute, train and write one (scorer, point) cell; returns its collapse record."""
    cdir = cell_dir(run_dir, scorer, point)
    shutil.rmtree(cdir, ignore_errors=True)  # an interrupted cell starts again
    cell_masks = _cell_masks(sw, scorer, point)
    twin = _twin(run_dir, sw, scorer, point, cell_masks)
    if twin is None:
        records = _train_cell(sw, cell_masks, f"{scorer} {point.name}")
    else:
        tdir = cell_dir(run_dir, twin, point)
        records = [imp.read_metrics(os.path.join(tdir, f"s{sd}", "metrics.jsonl"))
                   for sd in sw.seeds]
    collapsed = {}
    for sd, m, recs in zip(sw.seeds, cell_masks, records):
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
    record = {"scorer": scorer, "compression": point.compression, "density": point.density,
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
    points, names = parse_points(cfg.compressions, cfg.densities), parse_scorers(cfg.scorers)
    os.makedirs(run_dir, exist_ok=True)
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg_path):
        imp._write_json_atomic(cfg_path, cfg.to_dict())
    todo = [(sc, p) for p in points for sc in names if not imp.is_done(cell_dir(run_dir, sc, p))]
    if not todo:
        return run_dir
    sw = _prepare(s)
    bar = tqdm(todo, desc="cells", unit="cell", disable=not cfg.progress)
    for scorer, point in bar:
        bar.set_postfix(scorer=scorer, compression=_fmt(point.compression), refresh=False)
        rec = _run_cell(run_dir, sw, scorer, point)
        dead = {sd: v for sd, v in rec["collapsed"].items() if v}
        if dead and cfg.progress:
            tqdm.write(f"layer collapse: {scorer} at compression {_fmt(point.compression)}: "
                       + "; ".join(f"seed {sd}: {', '.join(v)}" for sd, v in dead.items()))
    bar.close()
    return run_dir


# ---------------------------------------------------------------------------------------------
# Results


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def summary(run_dir: str) -> list[dict]:
    """One row per finished cell, in the config's scorer order then by compression.

    Row: scorer, compression, density (target), kept_density (achieved, mean over seeds), seeds,
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
    for scorer in [n for n in order if n in found] + [n for n in found if n not in order]:
        for name in os.listdir(os.path.join(run_dir, scorer)):
            cdir = os.path.join(run_dir, scorer, name)
            if imp.is_done(cdir):
                rows.append(_cell_row(cdir))
    rank = {n: i for i, n in enumerate(order)}
    rows.sort(key=lambda r: (rank.get(r["scorer"], len(rank)), r["scorer"], r["compression"]))
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
    return {"scorer": rec["scorer"], "compression": rec["compression"],
            "density": rec["density"], "kept_density": float(np.mean(dens)),
            "seeds": [int(sd) for sd in seeds], "accuracies": accs,
            "accuracy_mean": float(np.mean(accs)),
            "accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            "collapsed": layers,
            "collapsed_seeds": sum(1 for sd in seeds if rec["collapsed"][sd])}


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table of `summary` rows: accuracy mean +- std over seeds, collapsed layers."""
    head = (f"{'scorer':<18}  {'compression':>11}  {'density':>9}  {'accuracy':>8}  "
            f"{'+- std':>7}  {'seeds':>5}  collapsed layers (seeds)")
    lines = [head]
    for r in rows:
        dead = ", ".join(f"{p} ({n}/{len(r['seeds'])})" for p, n in r["collapsed"].items())
        lines.append(f"{r['scorer']:<18}  {_fmt(round(r['compression'], 6)):>11}  "
                     f"{r['kept_density']:>9.5f}  {r['accuracy_mean']:>8.4f}  "
                     f"{r['accuracy_std']:>7.4f}  {len(r['seeds']):>5}  {dead or '-'}")
    return "\n".join(lines)


def plot(run_dir: str, out_png: str) -> list[tuple[str, float]]:
    """Final test accuracy vs compression ratio per scorer (log x-axis, mean +- std over seeds),
    written to `out_png` (6.4 x 4.4 in, 150 dpi). Cells where any seed collapsed a layer get an
    'x' marker. Scorers are shifted sideways by at most +-3% so equal points stay visible.
    Returns the (scorer, compression) points marked as collapsed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - slow import
    from matplotlib.figure import Figure  # noqa: PLC0415

    rows = summary(run_dir)
    cfg = _read_json(os.path.join(run_dir, "config.json"))
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    marked = []
    names = list(dict.fromkeys(r["scorer"] for r in rows))
    for i, scorer in enumerate(names):
        rs = [r for r in rows if r["scorer"] == scorer]
        dodge = 10 ** (0.012 * (i - (len(names) - 1) / 2))  # keep equal points apart
        x = [r["compression"] * dodge for r in rs]
        line = ax.errorbar(x, [r["accuracy_mean"] for r in rs],
                           yerr=[r["accuracy_std"] for r in rs], marker="o", markersize=4,
                           capsize=2, label=scorer)
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
