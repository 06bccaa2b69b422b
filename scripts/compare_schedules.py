"""Compare pruning schedules at equal final density: IMP levels, one-shot + fine-tune, AGP.

    python scripts/compare_schedules.py RUN_DIR [RUN_DIR ...] [--kept N]

Every run directory is read as written (nothing is trained). For each one-shot and AGP run the
final mask's kept count is the comparison point; IMP (find-ticket) runs contribute the level with
that same kept count. Runs whose configs differ only in `seed` are one row: final test accuracy
as mean ± standard deviation over seeds, with the seeds' values. Training steps are the total
over the levels that produced the network: IMP level L = level 0 plus L retrainings (from the
rewind step), one-shot = dense + fine-tune, AGP = its one run.
Prints a Markdown table. Units: density = fraction of prunable weights kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import ml_collections

from lottery import checkpoints, config as config_lib, rundir

KINDS = {"find-ticket": "IMP, rewind to init", "oneshot": "one-shot + fine-tune",
         "agp": "AGP (Zhu & Gupta)"}


def _levels(run_dir: str) -> list[int]:
    out = [int(d.split("_")[1]) for d in os.listdir(run_dir)
           if d.startswith("level_") and d.split("_")[1].isdigit()]
    return sorted(lv for lv in out if rundir.is_done(rundir.level_dir(run_dir, lv)))


def _info(run_dir: str, level: int) -> dict:
    with open(os.path.join(rundir.level_dir(run_dir, level), "info.json")) as f:
        return json.load(f)


def _last(run_dir: str, level: int) -> dict:
    recs = [r for r in rundir.read_metrics(os.path.join(rundir.level_dir(run_dir, level),
                                                     "metrics.jsonl")) if "test_accuracy" in r]
    return recs[-1]


def points(run_dir: str) -> list[dict]:
    """One row per finished network of the run: kind, kept, total, density, steps, accuracy."""
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    kind = cfg["experiment"]
    if kind not in KINDS:
        raise ValueError(f"{run_dir}: experiment {kind!r} is not one of {', '.join(KINDS)}")
    levels = _levels(run_dir)
    if kind == "find-ticket":
        start = 0
        if cfg["rewind"] in ("iteration", "lr"):
            start = int(checkpoints.restore(os.path.join(run_dir, "rewind"))["step"])
        chosen, steps = levels, []
        for lv in levels:
            trained = _last(run_dir, lv)["step"] - (start if lv else 0)
            steps.append((steps[-1] if steps else 0) + trained)
    elif kind == "oneshot":
        if levels != [0, 1]:
            return []
        chosen, steps = [1], [_last(run_dir, 0)["step"] + _last(run_dir, 1)["step"]]
    else:
        if levels != [0]:
            return []
        chosen, steps = [0], [_last(run_dir, 0)["step"]]
    fields = {k: v for k, v in config_lib.hashed_fields(
        ml_collections.ConfigDict(cfg)).items() if k != "seed"}
    group = (kind, json.dumps(fields, sort_keys=True))
    rows = []
    for lv, st in zip(chosen, steps):
        info = _info(run_dir, lv)
        rows.append({"kind": kind, "group": group, "level": lv, "seed": cfg["seed"],
                     "kept": info["kept"], "total": info["total"], "density": info["density"],
                     "steps": st, "accuracy": _last(run_dir, lv)["test_accuracy"]})
    return rows


def table(run_dirs: list[str], kept: int | None = None) -> str:
    """The Markdown comparison table (see the module docstring)."""
    rows = [r for d in run_dirs for r in points(d)]
    targets = {r["kept"] for r in rows if r["kind"] != "find-ticket"} if kept is None else {kept}
    rows = [r for r in rows if r["kept"] in targets]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kept"], r["group"], r["level"]), []).append(r)
    lines = ["| schedule | density (kept) | training steps | final test accuracy | seeds |",
             "|---|---|---|---|---|"]
    for (_, _, level), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1][0])):
        accs = [r["accuracy"] for r in sorted(rs, key=lambda r: r["seed"])]
        spread = f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else ""
        steps = sorted({r["steps"] for r in rs})
        name = KINDS[rs[0]["kind"]] + (f", level {level}" if rs[0]["kind"] == "find-ticket"
                                       else "")
        lines.append(f"| {name} | {rs[0]['density']:.4f} ({rs[0]['kept']:,}) | "
                     f"{'/'.join(f'{s:,}' for s in steps)} | {statistics.mean(accs):.4f}{spread} "
                     f"| {', '.join(f'{a:.4f}' for a in accs)} (seeds "
                     f"{', '.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", help="run directories (find-ticket, oneshot, agp)")
    p.add_argument("--kept", type=int, default=None,
                   help="compare at this kept count (default: the one-shot and AGP runs' counts)")
    args = p.parse_args(argv)
    try:
        print(table(args.run_dirs, args.kept))
    except (ValueError, OSError) as e:
        print(f"compare_schedules: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
