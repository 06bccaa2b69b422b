"""The `lottery` command.

    lottery find-ticket --config configs/<name>.py [--config.<field>=<value> ...] [--workdir DIR]
    lottery prune-at-init | oneshot | agp --config ...        other experiment kinds
    lottery inspect | compare | plot | instability | export | sensitivity    what a run saved
    lottery prepare NAME [--data-dir DIR]                       download and prepare a dataset
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from lottery import checkpoints, distributed, experiments, export, imp, plots, report, sensitivity
from lottery.data import cli as data_cli

# Every subcommand, in `lottery --help` order: the experiment kinds, the commands that read their
# run directories, then dataset preparation.
COMMANDS = (*experiments.EXPERIMENTS, *report.COMMANDS, *plots.COMMANDS, *export.COMMANDS,
            experiments.Command("sensitivity", sensitivity.HELP, sensitivity.DESCRIPTION,
                                sensitivity.add_arguments, sensitivity.command),
            experiments.Command("prepare", data_cli.HELP, data_cli.DESCRIPTION,
                                data_cli.add_arguments, data_cli.command))


def _split_overrides(argv):
    """Separate '--config.<field>=<value>' (or '--config.<field> <value>') from other arguments."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            body = a[len("--config."):]
            if "=" not in body and i + 1 < len(argv):
                body, i = f"{body}={argv[i + 1]}", i + 1
            overrides.append(body)
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def _add_experiment_arguments(p: argparse.ArgumentParser, exp: experiments.Experiment) -> None:
    p.add_argument("--config", required=True,
                   help=f"a Python file whose get_config() starts from "
                        f"{experiments.starts_from(exp)}")
    p.add_argument("--workdir", default="runs", help="where run directories go (default: runs)")
    if exp.discard:
        p.add_argument("--discard-level", type=int, default=None, metavar="N",
                       help="delete level N (and later levels) of the run and train it again, "
                            "e.g. after a corrupt checkpoint")
    if exp.add_arguments is not None:
        exp.add_arguments(p)
    if exp.figure is not None:
        p.add_argument("--plot", default=None, metavar="PNG",
                       help=f"where to write the plot (default: <run dir>/{exp.figure_name})")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lottery", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for c in COMMANDS:
        if isinstance(c, experiments.Experiment):
            description = c.description + " Override any config field with " \
                                          "--config.<field>=<value>."
            _add_experiment_arguments(sub.add_parser(c.name, help=c.help,
                                                     description=description), c)
        else:
            c.add_arguments(sub.add_parser(c.name, help=c.help, description=c.description))
    return p


def run_experiment(exp: experiments.Experiment, args: argparse.Namespace,
                   overrides: Sequence[str] = ()) -> int:
    """`lottery <experiment>`: run or resume it, write its figure, print its table."""
    cfg = experiments.load_config(exp, args.config, overrides, args)
    kwargs = {"discard": args.discard_level} if exp.discard else {}
    run_dir = exp.run(cfg, args.workdir, **kwargs)
    if not isinstance(run_dir, str):  # `seeds`: one run directory per seed, one table over them
        print("\nrun directories:\n" + "\n".join(f"  {d}" for d in run_dir))
        print(imp.format_seeds_summary(imp.seeds_summary(run_dir)))
        return 0
    rows = exp.summary(run_dir)
    png = None
    if exp.figure is not None:
        png = args.plot or os.path.join(run_dir, exp.figure_name)
        exp.figure(run_dir, png)
    print(f"\nrun directory: {run_dir}")
    print(exp.format_summary(rows))
    if png is not None:
        print(f"plot: {png}")
    return 0


def _dispatch(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    command = next(c for c in COMMANDS if c.name == args.command)
    if isinstance(command, experiments.Experiment):
        return run_experiment(command, args, overrides)
    if overrides:
        raise ValueError(f"lottery {args.command} takes no --config.<field> overrides (got "
                         f"{', '.join('--config.' + o for o in overrides)})")
    return command.run(args)


def run(argv: Sequence[str]) -> int:
    """Run the command `argv` names (without the program name); errors propagate."""
    rest, overrides = _split_overrides(list(argv))
    return _dispatch(_parser().parse_args(rest), overrides)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = _split_overrides(list(argv))
    args = _parser().parse_args(rest)
    distributed.initialize()  # joins a multi-process job when the environment describes one
    try:
        return _dispatch(args, overrides)
    except (ValueError, OSError, checkpoints.CorruptCheckpointError) as e:
        # bad input, a diverged run (train.DivergenceError), a file that cannot be read or
        # written, a damaged checkpoint: one line naming the thing, exit status 2
        print(f"lottery {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
