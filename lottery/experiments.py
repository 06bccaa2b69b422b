"""Every experiment kind `lottery` runs, in one table, and the shape of a command.

An experiment kind is an `Experiment`: its command (also its configs' `experiment` field), where
its configs start, how to validate and run one, and how its run directory reads back (summary
rows, their table, a one-line description, an optional figure). `lottery.cli` makes a command of
each entry of EXPERIMENTS; `lottery inspect` and `lottery plot` look kinds up here (`get`). To add
a kind, write its module and add one entry below. A `Command` is the same shape for commands that
only read run directories (inspect, compare, plot, instability, export).
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Callable, NamedTuple, Sequence

import ml_collections

from lottery import config as config_lib, gradual, imp, pai


class Experiment(NamedTuple):
    """An experiment kind: `run(cfg, workdir[, discard]) -> run directory` and how to read it."""

    name: str  # the command, and the `experiment` field of its configs
    help: str  # one line, for `lottery --help`
    description: str  # a paragraph, for `lottery <name> --help`
    base_config: Callable[[], ml_collections.ConfigDict]  # where its config files start
    validate: Callable[[ml_collections.ConfigDict], Any]  # ValueError naming a bad field; no data
    # run(cfg, workdir[, discard=level]): create or resume -> run dir (a list with cfg.seeds > 0)
    run: Callable[..., str | list[str]]
    summary: Callable[[str], list[dict]]  # the rows of a run directory
    format_summary: Callable[[Sequence[dict]], str]  # the table the command prints
    describe: Callable[[ml_collections.ConfigDict], str]  # one line: what a run of cfg does
    figure: Callable[[str, str], Any] | None = None  # figure(run_dir, png) writes its figure
    figure_name: str = ""  # the figure's file in the run directory, unless --plot says otherwise
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None  # its own flags
    apply_arguments: Callable[[ml_collections.ConfigDict, argparse.Namespace], None] | None = None
    discard: bool = True  # its run directory has levels: run(..., discard=N), --discard-level N


class Command(NamedTuple):
    """A command that reads run directories: `run(args) -> exit status`."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


EXPERIMENTS = (
    Experiment("find-ticket", "iterative magnitude pruning with rewinding",
               "Find lottery tickets by IMP.", config_lib.base, config_lib.validate,
               imp.find_ticket, imp.summary, imp.format_summary, imp.describe),
    Experiment("prune-at-init", "prune at init with several scorers over a compression sweep",
               "Prune at initialization with each scorer at each compression ratio, train the "
               "sparse networks (several seeds) and compare test accuracy. The flags below "
               "override the config's sweep fields.", pai.base_config, pai.normalize, pai.sweep,
               pai.summary, pai.format_table, pai.describe, figure=pai.plot,
               figure_name=pai.PLOT_NAME, add_arguments=pai.add_arguments,
               apply_arguments=pai.apply_arguments, discard=False),
    Experiment("oneshot", "train, prune once to a target density, fine-tune",
               "Train the dense network, prune it to final_density in one step (any scorer, "
               "global or layerwise, weights, whole units or channel groups) and fine-tune it.",
               functools.partial(gradual.base_config, "oneshot"), gradual.validate,
               gradual.run_oneshot, imp.summary, imp.format_summary, gradual.describe),
    Experiment("agp", "automated gradual pruning (Zhu & Gupta 2017) during training",
               "Train while the density follows the cubic AGP schedule from prune_start to "
               "prune_end (a new magnitude mask every prune_every), then train on at "
               "final_density.", functools.partial(gradual.base_config, "agp"), gradual.validate,
               gradual.run_agp, imp.summary, imp.format_summary, gradual.describe),
)


def get(name: str) -> Experiment:
    """The experiment kind called `name`; ValueError naming the known ones."""
    for e in EXPERIMENTS:
        if e.name == name:
            return e
    raise ValueError(f"experiment={name!r}: expected one of "
                     f"{', '.join(e.name for e in EXPERIMENTS)}")


def describe(cfg: ml_collections.ConfigDict) -> str:
    """One line on what a run of `cfg` does, by its experiment kind."""
    return get(cfg.experiment).describe(cfg)


def starts_from(exp: Experiment) -> str:
    """How a config file of `exp` starts, for messages: 'lottery.gradual.base_config('agp')'."""
    fn, args = exp.base_config, ()
    if isinstance(fn, functools.partial):
        fn, args = fn.func, fn.args
    module = fn.__module__
    package = module.rpartition(".")[0]
    if getattr(sys.modules.get(package), fn.__name__, None) is fn:  # re-exported: the short name
        module = package
    return f"{module}.{fn.__name__}({', '.join(map(repr, args))})"


def load_config(exp: Experiment, path: str, overrides: Sequence[str] = (),
                args: argparse.Namespace | None = None) -> ml_collections.ConfigDict:
    """The config of `lottery <exp.name> --config path`: the file's get_config(), checked to be a
    config of `exp`, then the `field=value` overrides, then the command's own flags (`args`)."""
    cfg = config_lib.load(path)
    if cfg.get("experiment") != exp.name:
        raise ValueError(f"--config {path!r} is a {cfg.get('experiment')!r} config; `lottery "
                         f"{exp.name}` needs experiment={exp.name!r} (start it from "
                         f"{starts_from(exp)})")
    for item in overrides:
        config_lib.apply_override(cfg, item)
    if args is not None and exp.apply_arguments is not None:
        exp.apply_arguments(cfg, args)
    return cfg
