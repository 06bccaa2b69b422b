"""What a prune-at-init sweep found: one row per cell, its text table, its figure.

`summary(run_dir)` reads the finished cells of a sweep's run directory (through
`lottery.rundir`); `format_table` is what `lottery prune-at-init` prints and `plot` the
accuracy-vs-compression figure it writes (matplotlib is imported only to draw it).
"""

from __future__ import annotations

import os
from typing import Sequence

import ml_collections
import numpy as np

from lottery import config as config_lib, rundir
from lottery.pai import spec

PLOT_NAME = "accuracy_vs_compression.png"


def summary(run_dir: str) -> list[dict]:
    """One row per finished cell, in the config's scorer order, then ablation (none, then
    ABLATIONS order), then by compression.

    Row: label ('snip' or 'snip+shuffle'), scorer, ablation ('' for none), compression, density
    (target), kept_density (achieved, mean over seeds), seeds,
    accuracies (final test accuracy per seed), accuracy_mean, accuracy_std (sample std, ddof=1;
    0 for one seed), collapsed ({layer path: number of seeds where it has no weight left}),
    collapsed_seeds (seeds with any collapsed layer).
    """
    path = os.path.join(run_dir, rundir.CONFIG)
    if not os.path.exists(path):
        raise ValueError(f"run_dir {run_dir!r}: no config.json (not a run directory)")
    cfg = rundir.read_json(path)
    if cfg.get("experiment") != spec.EXPERIMENT:
        raise ValueError(f"run_dir {run_dir!r} holds a {cfg.get('experiment')!r} run, not "
                         f"{spec.EXPERIMENT!r}")
    order = config_lib.split(cfg["scorers"])
    found = [d for d in sorted(os.listdir(run_dir)) if os.path.isdir(os.path.join(run_dir, d))]
    rows = []
    for label in found:
        for name in sorted(os.listdir(os.path.join(run_dir, label))):
            cdir = os.path.join(run_dir, label, name)
            if rundir.is_done(cdir):
                rows.append(_cell_row(cdir))
    rank = {n: i for i, n in enumerate(order)}
    ab_rank = {a: i for i, a in enumerate(("",) + spec.ABLATIONS)}
    rows.sort(key=lambda r: (rank.get(r["scorer"], len(rank)), r["scorer"],
                             ab_rank.get(r["ablation"], len(ab_rank)), r["ablation"],
                             r["compression"]))
    return rows


def _cell_row(cdir: str) -> dict:
    rec = rundir.read_json(os.path.join(cdir, "collapse.json"))
    seeds = sorted(rec["collapsed"], key=int)
    accs, dens = [], []
    for sd in seeds:
        metrics = rundir.read_metrics(os.path.join(cdir, f"s{sd}", rundir.METRICS))
        accs.append(metrics[-1]["test_accuracy"])
        dens.append(rundir.read_json(os.path.join(cdir, f"s{sd}", rundir.INFO))["density"])
    layers = {}
    for sd in seeds:
        for p in rec["collapsed"][sd]:
            layers[p] = layers.get(p, 0) + 1
    ablation = rec.get("ablation") or ""  # runs made before ablations existed have none
    return {"label": spec.cell_name(rec["scorer"], ablation), "scorer": rec["scorer"],
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
        lines.append(f"{r['label']:<{w}}  {spec.fmt(round(r['compression'], 6)):>11}  "
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
    cfg = rundir.read_json(os.path.join(run_dir, rundir.CONFIG))
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


def describe(cfg: ml_collections.ConfigDict) -> str:
    """One line on what a sweep does, e.g. for `lottery inspect`'s header."""
    axis = f"compressions {cfg.compressions}" if cfg.compressions else \
        f"densities {cfg.densities}"
    ablations = f" with ablations {cfg.ablations}" if cfg.get("ablations") else ""
    return (f"prune at init: {cfg.model} on {cfg.dataset}, scorers {cfg.scorers}{ablations} at "
            f"{axis}, {cfg.seeds} seed{'s' if cfg.seeds > 1 else ''} from seed {cfg.seed}")
