"""What the commands that read run directories print: level tables, per-layer tables, mask
comparisons, instability results (`lottery inspect`, `compare`, `instability`).

The numbers come from `lottery.runs` (and `lottery.instability`); every function here only
formats them. `COMMANDS` are these commands, in the shape of `lottery.experiments.Command`.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from lottery import experiments, instability, plots
from lottery.experiments import Command
from lottery.runs import Run, compare_runs, format_levels


def format_table(rows: list[dict]) -> str:
    """Levels table: density, compression, speedup, best/final accuracy, control means."""
    kinds = sorted({k for r in rows for k in r["controls"]})
    head = (f"{'level':>5}  {'density':>8}  {'compression':>11}  {'speedup':>8}  "
            f"{'best acc':>8}  {'at step':>7}  {'final acc':>9}")
    head += "".join(f"  {k:>12}" for k in kinds)
    lines = [head]
    for r in rows:
        line = (f"{r['level']:>5}  {r['density']:>8.4f}  {r['compression_ratio']:>11.4f}  "
                f"{r['theoretical_speedup']:>8.4f}  {r['best_accuracy']:>8.4f}  "
                f"{r['best_step']:>7}  {r['final_accuracy']:>9.4f}")
        for k in kinds:
            v = r["controls"].get(k)
            line += f"  {float(np.mean(v)):>12.4f}" if v else f"  {'':>12}"
        lines.append(line)
    if kinds:
        lines.append("(control columns: final test accuracy, mean over control seeds)")
    return "\n".join(lines)


def format_layers(info: dict, layers: list[dict]) -> str:
    """One level's header line and per-layer table: kept, total, density, MACs."""
    width = max([len("layer"), len("total")] + [len(r["layer"]) for r in layers])
    lines = [f"level {info['level']}: density {info['density']:.4f}, compression "
             f"{info['compression_ratio']:.4f}, theoretical speedup "
             f"{info['theoretical_speedup']:.4f}, best acc {info['best_accuracy']:.4f} at step "
             f"{info['best_step']}, final acc {info['final_accuracy']:.4f}",
             f"{'layer':<{width}}  {'kept':>10}  {'total':>10}  {'density':>8}  {'MACs':>12}  "
             f"{'remaining MACs':>14}"]
    for r in layers:
        macs = (f"{r['macs']:>12,.0f}  {r['remaining_macs']:>14,.0f}" if "macs" in r
                else f"{'':>12}  {'':>14}")
        lines.append(f"{r['layer']:<{width}}  {r['kept']:>10,}  {r['total']:>10,}  "
                     f"{r['density']:>8.4f}  {macs}")
    lines.append(f"{'total':<{width}}  {info['kept']:>10,}  {info['total']:>10,}  "
                 f"{info['density']:>8.4f}")
    for kind, accs in sorted(info["controls"].items()):
        lines.append(f"control {kind}: final acc " + ", ".join(f"{a:.4f}" for a in accs)
                     + f" (mean {float(np.mean(accs)):.4f})")
    return "\n".join(lines)


def format_comparison(result: dict[str, dict], title: str) -> str:
    """Per-layer overlap table of `compare_masks`."""
    width = max(len(p) for p in result)
    lines = [title, f"{'layer':<{width}}  {'jaccard':>8}  {'survival':>8}  {'kept A':>10}  "
                    f"{'kept B':>10}  {'both':>10}"]
    for p, r in result.items():
        lines.append(f"{p:<{width}}  {r['jaccard']:>8.4f}  {r['survival']:>8.4f}  "
                     f"{r['kept_a']:>10,}  {r['kept_b']:>10,}  {r['both']:>10,}")
    return "\n".join(lines)


def _header(run: Run) -> str:
    return f"run {run.path}\n({experiments.describe(run.config)})"


def _incomplete_lines(run: Run) -> list[str]:
    lines = []
    for lv in run.incomplete_levels:
        p = run.progress(lv)
        if p["last_step"] is None:
            lines.append(f"level {lv}: incomplete (mask {'saved' if p['has_mask'] else 'missing'}"
                         f", no evaluation yet)")
        else:
            lines.append(f"level {lv}: incomplete (last evaluation at step {p['last_step']}: "
                         f"test accuracy {p['test_accuracy']:.4f})")
    for lv in run.incomplete_controls:
        lines.append(f"level {lv}: controls incomplete (training or interrupted)")
    return lines


def inspect_text(run_dir: str, level: int | None = None, *, as_json: bool = False) -> str:
    """What `lottery inspect` prints."""
    r = Run(run_dir)
    if level is not None:
        r.check_level(level)
    rows = r.table()
    if as_json:
        out = {"run_dir": r.path, "config": r.config.to_dict(), "levels": rows,
               "incomplete_levels": [r.progress(lv) for lv in r.incomplete_levels],
               "incomplete_controls": r.incomplete_controls}
        if level is not None:
            out["level"] = level
            out["layers"] = r.layers(level)
        return json.dumps(out, indent=2)
    parts = [_header(r)]
    parts.append(format_table(rows) if rows else "no complete level yet")
    parts += _incomplete_lines(r)
    if level is not None:
        info = next((row for row in rows if row["level"] == level), None) or r.level_info(level)
        parts += ["", format_layers(info, r.layers(level))]
    return "\n".join(parts)


def compare_text(run_a: str, run_b: str, level: int | None = None, level_b: int | None = None,
                 *, as_json: bool = False) -> str:
    """What `lottery compare` prints."""
    a, b = Run(run_a), Run(run_b)
    if level is None and level_b is not None:
        raise ValueError("--level-b needs --level (RUN_A's level)")
    if level is None:
        pairs = [(lv, lv) for lv in a.levels if lv in b.levels]
        if not pairs:
            raise ValueError(f"RUN_A and RUN_B have no complete level in common (RUN_A: "
                             f"{format_levels(a.levels)}; RUN_B: {format_levels(b.levels)})")
    else:
        pairs = [(a.check_level(level, complete=False),
                  b.check_level(level if level_b is None else level_b, complete=False))]
    results = [(la, lb, compare_runs(a, b, la, lb)) for la, lb in pairs]
    if as_json:
        return json.dumps({"run_a": a.path, "run_b": b.path,
                           "comparisons": [{"level_a": la, "level_b": lb, "layers": res}
                                           for la, lb, res in results]}, indent=2)
    lines = [f"A = {a.path}", f"B = {b.path}"]
    if len(results) == 1:
        la, lb, res = results[0]
        lines += ["", format_comparison(res, f"A level {la} vs B level {lb}")]
        return "\n".join(lines)
    names = list(results[0][2])
    width = max(8, *(len(n) for n in names))
    lines += ["", "Jaccard overlap |A & B| / |A | B| per layer, level by level",
              f"{'level':>5}" + "".join(f"  {n:>{width}}" for n in names)]
    for la, _, res in results:
        lines.append(f"{la:>5}" + "".join(f"  {res[n]['jaccard']:>{width}.4f}" for n in names))
    return "\n".join(lines)


def _add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--level", type=int, default=None, metavar="N",
                   help="show the per-layer table of level N")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument("--level", type=int, default=None, metavar="N", help="RUN_A's level")
    p.add_argument("--level-b", type=int, default=None, metavar="M",
                   help="RUN_B's level (default: N)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _add_instability_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--level", type=int, required=True, metavar="N", help="whose mask to use")
    p.add_argument("--rewind-it", required=True, metavar="K",
                   help="rewind iteration: an int or a step string such as '1ep' or '100it'")
    p.add_argument("--points", type=int, default=11, help="points on the path (default 11)")
    p.add_argument("--same-order", action="store_true",
                   help="give both copies the same data order (a check: barrier exactly 0)")
    p.add_argument("--out", default=None, metavar="PNG",
                   help="where to write the curve (default: "
                        "instability_<run>_level<N>_it<K>.png in the current directory)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def inspect_command(args: argparse.Namespace) -> int:
    """`lottery inspect`: prints `inspect_text`."""
    print(inspect_text(args.run_dir, args.level, as_json=args.json))
    return 0


def compare_command(args: argparse.Namespace) -> int:
    """`lottery compare`: prints `compare_text`."""
    print(compare_text(args.run_a, args.run_b, args.level, args.level_b, as_json=args.json))
    return 0


def instability_command(args: argparse.Namespace) -> int:
    """`lottery instability`: prints the error barrier and writes the curve as a PNG."""
    r = Run(args.run_dir)
    rewind = int(args.rewind_it) if str(args.rewind_it).isdigit() else args.rewind_it
    res = instability.instability(r, args.level, rewind, points=args.points,
                                  same_order=args.same_order, progress=not args.json)
    out = args.out or f"instability_{r.name}_level{res.level}_it{res.rewind_step}.png"
    title = (f"level {res.level} (density {res.density:.4f}), rewind to iteration "
             f"{res.rewind_step}: barrier {res.barrier:.4f}\n{r.name}")
    plots.save(plots.instability_figure(res.alphas, res.errors, title), out)
    if args.json:
        print(json.dumps({**res.to_json(), "run_dir": r.path, "png": os.path.abspath(out)}))
        return 0
    i = int(np.argmax(res.errors))
    print(f"level {res.level} (density {res.density:.4f}), rewind to iteration "
          f"{res.rewind_step}: error barrier {res.barrier:.4f}")
    print(f"end-point test errors {res.errors[0]:.4f} and {res.errors[-1]:.4f}; max "
          f"{res.errors[i]:.4f} at alpha {res.alphas[i]:.2f}")
    print("alpha  " + "  ".join(f"{x:6.2f}" for x in res.alphas))
    print("error  " + "  ".join(f"{x:6.4f}" for x in res.errors))
    print(f"curve: {os.path.abspath(out)}")
    return 0


COMMANDS = (
    Command("inspect", "levels of a run: density, compression, speedup, accuracies",
            "Show what a run directory holds: one line per complete level (density, compression "
            "ratio, theoretical speedup, best and final test accuracy, control accuracies) and "
            "the levels still incomplete.", _add_inspect_arguments, inspect_command),
    Command("compare", "per-layer mask overlap of two runs (or two levels)",
            "Per-layer Jaccard overlap |A & B| / |A | B| and survival |A & B| / |A| of the masks "
            "of RUN_A and RUN_B, level by level (levels present in both), or of RUN_A's level N "
            "and RUN_B's level M.", _add_compare_arguments, compare_command),
    Command("instability", "linear mode connectivity (error barrier) from a rewind point",
            "Train two copies of level N's masked network from iteration K of level 0 with "
            "different data orders, evaluate test error on the line between them and print the "
            "error barrier (max error minus mean of the end points; Frankle et al. 2020). The "
            "curve is written as a PNG.", _add_instability_arguments, instability_command),
)
