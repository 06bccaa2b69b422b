"""What a prune-at-init sweep is: its config fields, points, scorers, rounds and cells.

A sweep runs every cell (a scorer, or a scorer with an ablation) at every point of its axis
(compression ratios or densities). `normalize` validates a config and writes its sweep fields in
canonical form, so equal sweeps hash equally; `add_arguments` / `apply_arguments` are the flags
of `lottery prune-at-init` that override them. The package docstring (`lottery.pai`) has the
whole experiment.
"""

from __future__ import annotations

import argparse
import math
from typing import NamedTuple

import ml_collections
import numpy as np

from lottery import config as config_lib, schedules, scorers

EXPERIMENT = "prune-at-init"
ABLATIONS = ("shuffle", "reinit", "invert")  # Frankle et al. 2021's sanity checks, in table order
UNABLATED = ("random",)  # scorers that get no ablation cells: random is its own control


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


def fmt(x: float) -> str:
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
        points.append(Point("c" + fmt(c), c, 1.0 / c))
    for token in dens:
        d = _number(token, "density")
        if not 0.0 < d <= 1.0:
            raise ValueError(f"density={token}: a density (fraction of prunable weights kept) "
                             f"must be in (0, 1]; for a compression ratio use --compression")
        points.append(Point("d" + fmt(d), 1.0 / d, d))
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
    cfg[field] = ",".join(fmt(p.compression if field == "compressions" else p.density)
                          for p in points)
    cfg.rounds = ",".join(f"{k}={v}" for k, v in sorted(rounds.items()))
    cfg.ablations = ",".join(ablations)
    return cfg


def seed_list(cfg) -> list[int]:
    """The seeds of the sweep: cfg.seed, cfg.seed + 1, ..., cfg.seed + cfg.seeds - 1."""
    return [cfg.seed + i for i in range(cfg.seeds)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `lottery prune-at-init` that override the config's sweep fields."""
    known = ", ".join(sorted(scorers.SCORERS))
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


def apply_arguments(cfg: ml_collections.ConfigDict, args: argparse.Namespace) -> None:
    """Set the sweep fields the flags of `add_arguments` give (after --config.<field> overrides)."""
    if args.scorers is not None:
        cfg.scorers = args.scorers
    if args.compression is not None:
        cfg.compressions, cfg.densities = args.compression, ""
    if args.density is not None:
        cfg.compressions, cfg.densities = "", args.density
    if args.seeds is not None:
        cfg.seeds = args.seeds
    if args.ablations is not None:
        cfg.ablations = args.ablations
