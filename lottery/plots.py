"""The figures of lottery-ticket papers, from run directories, as fixed-size PNGs.

- `accuracy_vs_density`: test accuracy against density (log x-axis, sparser to the right), one
  line per experiment and per control (random re-init, random pruning). Runs whose configs differ
  only in `seed` are one experiment: the line is the mean over seeds and the band spans min to
  max (controls: over every run seed and control seed).
- `layer_density`: density of each prunable layer per level.
- `first_layer_mask`: for an MLP on images (LeNet on MNIST), how many first-layer connections
  each input pixel keeps, as an image per level.
- `training_curves`: test accuracy over training steps, one line per level.
- `instability_curve`: test error along the linear path between two trained copies.

Every `*_figure` function returns a matplotlib Figure (no pyplot state, so it works in scripts,
tests and notebooks); `save` writes it as a PNG of exactly SIZE pixels. `lottery plot` is
`plot_command` below. Units: density = fraction of prunable weights kept.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from lottery import config as config_lib, experiments, masks, rundir
from lottery.experiments import Command
from lottery.runs import Run

FIGSIZE = (6.4, 4.8)  # inches
DPI = 100
SIZE = (640, 480)  # pixels (width, height) of every PNG written by `save`
METRICS = ("final", "best")
CONTROL_LABELS = {"reinit": "random reinit", "random_prune": "random pruning"}


def _figure() -> Figure:
    return Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")


def save(fig: Figure, path: str) -> str:
    """Write `fig` to `path` as a PNG of SIZE pixels; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _open(runs) -> list[Run]:
    runs = [r if isinstance(r, Run) else Run(r) for r in runs]
    if not runs:
        raise ValueError("no run directory given")
    return runs


def group_runs(runs: Sequence[Run | str]) -> list[list[Run]]:
    """Runs grouped by config with `seed` ignored, in the order first seen."""
    groups: dict[str, list[Run]] = {}
    for r in _open(runs):
        fields = config_lib.hashed_fields(r.config)
        fields.pop("seed", None)
        groups.setdefault(repr(sorted(fields.items())), []).append(r)
    return list(groups.values())


def group_labels(groups: list[list[Run]]) -> list[str]:
    """A short label per group: the config fields in which the groups differ (or model/dataset)."""
    fields = [{k: v for k, v in config_lib.hashed_fields(g[0].config).items() if k != "seed"}
              for g in groups]
    differ = sorted(k for k in fields[0] if len({repr(f.get(k)) for f in fields}) > 1)
    labels = []
    for f, g in zip(fields, groups):
        text = ", ".join(f"{k}={f[k]}" for k in differ) or f"{f['model']} on {f['dataset']}"
        labels.append(f"{text} ({len(g)} seed{'s' if len(g) > 1 else ''})")
    return labels


def _accuracy(records: list[dict], metric: str) -> float:
    accs = [r["test_accuracy"] for r in records if "test_accuracy" in r]
    if not accs:
        raise ValueError("a metrics.jsonl without evaluations")
    return max(accs) if metric == "best" else accs[-1]


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {METRICS}")


def accuracy_series(runs: Sequence[Run | str], metric: str = "final") -> list[dict]:
    """The lines of `accuracy_vs_density_figure`: per group, the ticket and each control kind as
    {'label', 'kind', 'levels', 'density', 'mean', 'min', 'max', 'n'} (arrays over levels;
    n = number of values averaged at each level). `metric`: 'final' or 'best' test accuracy."""
    _check_metric(metric)
    groups = group_runs(runs)
    out = []
    for group, label in zip(groups, group_labels(groups)):
        values: dict[str, dict[int, list]] = {"ticket": {}}
        density: dict[int, float] = {}
        for r in group:
            for lv in r.levels:
                density[lv] = masks.density(r.mask(lv), r.rates)
                values["ticket"].setdefault(lv, []).append(_accuracy(r.metrics(lv), metric))
                for name in r.controls(lv):
                    kind = name.rsplit("_s", 1)[0]
                    values.setdefault(kind, {}).setdefault(lv, []).append(
                        _accuracy(r.control_metrics(lv, name), metric))
        for kind in ["ticket"] + sorted(k for k in values if k != "ticket"):
            levels = sorted(values[kind])
            v = [np.asarray(values[kind][lv], float) for lv in levels]
            out.append({"label": label, "kind": kind, "levels": np.array(levels),
                        "density": np.array([density[lv] for lv in levels]),
                        "mean": np.array([x.mean() for x in v]),
                        "min": np.array([x.min() for x in v]),
                        "max": np.array([x.max() for x in v]),
                        "n": np.array([x.size for x in v])})
    if not any(s["levels"].size for s in out):
        raise ValueError(f"no complete level in {', '.join(r.path for g in groups for r in g)}")
    return out


def _density_axis(ax) -> None:
    ax.set_xscale("log")
    ax.invert_xaxis()  # sparser to the right, as in the lottery-ticket papers
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("density (fraction of prunable weights kept, log scale)")


def accuracy_vs_density_figure(runs: Sequence[Run | str], metric: str = "final") -> Figure:
    """Test accuracy against density with the controls: line = mean over seeds, band = min-max."""
    series = accuracy_series(runs, metric)
    labels = list(dict.fromkeys(s["label"] for s in series))
    fig = _figure()
    ax = fig.add_subplot()
    styles = {"ticket": ("-", "o"), "reinit": ("--", "s"), "random_prune": (":", "^")}
    for i, s in enumerate(series):
        if not s["levels"].size:
            continue
        g = labels.index(s["label"])
        kinds = [t["kind"] for t in series if t["label"] == s["label"]]
        color = f"C{kinds.index(s['kind'])}" if len(labels) == 1 else f"C{g % 10}"
        ls, marker = styles.get(s["kind"], ("-.", "x"))
        name = "IMP ticket" if s["kind"] == "ticket" else CONTROL_LABELS.get(s["kind"], s["kind"])
        label = name if len(labels) == 1 else f"{name}: {s['label']}"
        ax.plot(s["density"], s["mean"], ls, marker=marker, ms=4, color=color, label=label)
        if np.any(s["n"] > 1):
            ax.fill_between(s["density"], s["min"], s["max"], color=color, alpha=0.2, lw=0)
    _density_axis(ax)
    ax.set_ylabel(f"{metric} test accuracy")
    title = labels[0] if len(labels) == 1 else "accuracy vs density"
    ax.set_title(f"{title}\nline: mean over seeds; band: min-max", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def layer_density_figure(run: Run | str) -> Figure:
    """Density of each prunable layer (and overall) per complete level, log y-axis."""
    run = _open([run])[0]
    levels = run.levels
    if not levels:
        raise ValueError(f"no complete level in {run.path}")
    per_layer = [run.layers(lv) for lv in levels]
    fig = _figure()
    ax = fig.add_subplot()
    for j, row in enumerate(per_layer[0]):
        ax.plot(levels, [rows[j]["density"] for rows in per_layer], "-o", ms=3,
                label=row["layer"])
    overall = [masks.density(run.mask(lv), run.rates) for lv in levels]
    ax.plot(levels, overall, "k--", label="overall")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("level")
    ax.set_ylabel("density (fraction kept, log scale)")
    ax.set_title(f"per-layer density: {run.name}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _leaf(tree, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def first_layer_counts(run: Run | str, level: int) -> np.ndarray:
    """(H, W) array: how many first-layer connections each input pixel keeps at `level`.

    Needs a model whose first layer is Dense on the flattened (H, W, C) input (e.g. LeNet on
    MNIST); connections of all C channels of a pixel are added up.
    """
    run = _open([run])[0]
    first = next(iter(run.dense_macs))  # Dense/Conv kernels in call order
    kernel = _leaf(run.mask(level), first)
    shape = run.input_shape
    if kernel.ndim != 2 or len(shape) != 3 or kernel.shape[0] != int(np.prod(shape)):
        raise ValueError(f"first-layer mask images need a first Dense layer on flattened image "
                         f"input; {run.config.model}'s first layer {first} has shape "
                         f"{tuple(kernel.shape)} for input {shape}")
    return np.asarray(kernel, np.int64).reshape(*shape, -1).sum(axis=(2, 3))


def first_layer_mask_figure(run: Run | str, levels: Sequence[int] | None = None) -> Figure:
    """Images of `first_layer_counts` for up to 6 levels (default: spread over complete ones)."""
    run = _open([run])[0]
    if levels is None:
        done = run.levels
        if not done:
            raise ValueError(f"no complete level in {run.path}")
        idx = np.unique(np.linspace(0, len(done) - 1, min(6, len(done))).round().astype(int))
        levels = [done[i] for i in idx]
    levels = [run.check_level(lv, complete=False) for lv in levels][:6]
    counts = [first_layer_counts(run, lv) for lv in levels]
    first = next(iter(run.dense_macs))
    per_pixel = int(np.size(_leaf(run.mask(levels[0]), first))) // counts[0].size
    fig = _figure()
    cols = min(3, len(levels))
    rows = -(-len(levels) // cols)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, lv, c in zip(axes.flat, levels, counts):
        # each level on its own scale, so structure stays visible as the counts shrink
        im = ax.imshow(c, cmap="viridis", vmin=0, vmax=max(1, int(c.max())),
                       interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
        ax.set_title(f"level {lv}, density {masks.density(run.mask(lv), run.rates):.3f}",
                     fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(levels):]:
        ax.axis("off")
    fig.suptitle(f"{first}: connections kept per input pixel (of {per_pixel}), each level on "
                 f"its own scale\n{run.name}", fontsize=9)
    return fig


def training_curves_figure(run: Run | str) -> Figure:
    """Test accuracy over training steps, one line per complete level, colored by level."""
    run = _open([run])[0]
    levels = run.levels
    if not levels:
        raise ValueError(f"no complete level in {run.path}")
    fig = _figure()
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"]
    top = max(1, levels[-1])
    for lv in levels:
        recs = [r for r in run.metrics(lv) if "test_accuracy" in r]
        d = masks.density(run.mask(lv), run.rates)
        ax.plot([r["step"] for r in recs], [r["test_accuracy"] for r in recs], "-",
                color=cmap(0.9 * lv / top), lw=1.2,
                label=f"level {lv} ({d:.3f})" if len(levels) <= 8 or lv in
                (levels[0], levels[len(levels) // 2], levels[-1]) else None)
    ax.set_xlabel("training step (iteration)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"test accuracy during training: {run.name}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, title="level (density)", title_fontsize=7)
    return fig


def instability_figure(alphas, errors, title: str = "") -> Figure:
    """Test error along the linear path between two trained copies (alpha 0 = copy A)."""
    alphas, errors = np.asarray(alphas), np.asarray(errors)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(alphas, errors, "-o", ms=4)
    ax.axhline((errors[0] + errors[-1]) / 2, color="gray", ls="--", lw=1,
               label="mean of the end points")
    ax.set_xlabel("interpolation alpha (0 = copy A, 1 = copy B)")
    ax.set_ylabel("test error")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _experiment(run_dir: str) -> str | None:
    path = os.path.join(run_dir, rundir.CONFIG)
    return rundir.read_json(path).get("experiment") if os.path.isfile(path) else None


def plot(run_dirs: Sequence[str], out_dir: str, metric: str = "final") -> dict[str, str]:
    """Write every figure for `run_dirs` into `out_dir`; returns {figure name: PNG path}.

    Accuracy vs density uses every run; the per-run figures use the first run. The first-layer
    mask figure is left out for models it does not apply to.
    """
    _check_metric(metric)
    pai = experiments.get("prune-at-init")
    pai_runs = [d for d in run_dirs if _experiment(d) == pai.name]
    if pai_runs:
        if len(pai_runs) != len(run_dirs):
            raise ValueError("plot prune-at-init runs apart from other runs: their x-axis is the "
                             "compression ratio of each scorer, not the IMP level's density")
        os.makedirs(out_dir, exist_ok=True)
        out = {}
        for d in pai_runs:
            name = f"{os.path.splitext(pai.figure_name)[0]}_{os.path.basename(os.path.abspath(d))}"
            path = os.path.join(out_dir, f"{name}.png")
            pai.figure(d, path)
            out[name] = path
        return out
    runs = _open(run_dirs)
    for r in runs:
        if not r.levels:
            raise ValueError(f"{r.path} has no complete level yet; incomplete levels: "
                             f"{', '.join(map(str, r.incomplete_levels)) or 'none'}")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out_dir!r} cannot be created ({e.strerror})") from None
    figures = {"accuracy_vs_density": lambda: accuracy_vs_density_figure(runs, metric),
               "layer_density": lambda: layer_density_figure(runs[0]),
               "training_curves": lambda: training_curves_figure(runs[0])}
    try:
        first_layer_counts(runs[0], runs[0].levels[0])
        figures["first_layer_mask"] = lambda: first_layer_mask_figure(runs[0])
    except ValueError:
        pass
    return {name: save(make(), os.path.join(out_dir, f"{name}.png"))
            for name, make in figures.items()}


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the PNG files")
    p.add_argument("--metric", choices=METRICS, default="final",
                   help="test accuracy at the end of training or the best one (default: final)")


def plot_command(args: argparse.Namespace) -> int:
    """`lottery plot`: writes the PNGs and prints their paths."""
    for name, path in plot(args.run_dirs, args.out, args.metric).items():
        print(f"{name}: {path}")
    return 0


COMMANDS = (
    Command("plot", "lottery-ticket figures (PNG) from run directories",
            "Write accuracy_vs_density.png (every run; runs differing only in seed are averaged, "
            "band = min-max), and layer_density.png, training_curves.png, first_layer_mask.png "
            "(MLPs on images) for the first run, into --out.", _add_arguments, plot_command),
)
