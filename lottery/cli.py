"""The `lottery` command.

    lottery find-ticket --config configs/<name>.py [--config.<field>=<value> ...] [--workdir DIR]
    lottery prune-at-init | oneshot | agp --config ...        other experiment kinds
    lottery inspect | compare | plot | instability | export    what a run saved
"""

from __future__ import annotations

import argparse
import sys

from lottery import checkpoints, export, gradual, instability, pai, plots, runs

# Modules that contribute subcommands: each has add_parser(subparsers) and run(args, overrides).
COMMAND_MODULES = (pai, gradual, runs, plots, instability, export)


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lottery", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("find-ticket", help="iterative magnitude pruning with rewinding",
                       description="Find lottery tickets by IMP. Override any config field with "
                                   "--config.<field>=<value>.")
    f.add_argument("--config", required=True, help="a Python file with get_config()")
    f.add_argument("--workdir", default="runs", help="where run directories go (default: runs)")
    f.add_argument("--discard-level", type=int, default=None, metavar="N",
                   help="delete level N (and later levels) of the run and train it again, e.g. "
                        "after a corrupt checkpoint")
    handlers = {"find-ticket": find_ticket}
    for module in COMMAND_MODULES:
        before = set(sub.choices)
        module.add_parser(sub)
        handlers.update({name: module.run for name in set(sub.choices) - before})
    p.set_defaults(handlers=handlers)
    return p


def find_ticket(args, overrides) -> int:
    from lottery import config as config_lib, imp  # noqa: PLC0415 - jax import is slow

    cfg = config_lib.load(args.config, overrides)
    run_dir = imp.find_ticket(cfg, args.workdir, discard=args.discard_level)
    print(f"\nrun directory: {run_dir}")
    print(format_summary(imp.summary(run_dir)))
    return 0


def format_summary(rows) -> str:
    """Level table: density, final and best test accuracy (with its step), control means."""
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    from lottery import distributed  # noqa: PLC0415
    distributed.initialize()  # joins a multi-process job when the environment describes one
    try:
        return args.handlers[args.command](args, overrides)
    except (ValueError, OSError, checkpoints.CorruptCheckpointError) as e:
        # bad input, a diverged run (train.DivergenceError), a file that cannot be read or
        # written, a damaged checkpoint: one line naming the thing, exit status 2
        print(f"lottery {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
