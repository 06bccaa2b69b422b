"""Read what a run saved: config, levels, masks, weights, metrics, and mask comparisons.

`Run(path)` opens a run directory (layout in `lottery.rundir`, which it reads through) and loads
everything on first use, so opening is instant and works while the run is still going: a level
counts as complete once its DONE file exists; other level directories are listed as incomplete.
Nothing here writes to the run directory.

Per level (`Run.level_info`): kept/total/density of the prunable weights, ShrinkBench's
compression ratio (all parameters / non-zero parameters of the masked final weights) and
theoretical speedup (dense MACs / remaining MACs of the Dense and Conv layers, see
`lottery.metrics`), best and final test accuracy, and the final accuracies of the controls.

Units: density = fraction of prunable weights kept; accuracies are fractions in [0, 1].
`lottery inspect` and `lottery compare` print these numbers (`lottery.report`).
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from lottery import checkpoints, config as config_lib, data as data_lib, masks
from lottery import metrics as metrics_lib, models, rundir

PyTree = Any


class RewindPoint(NamedTuple):
    """The state later levels rewind to: weights, optimizer state and step (raw pytrees)."""

    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    step: int
    key: np.ndarray  # raw uint32 key data of the data order


def format_levels(levels) -> str:
    """'0-3, 5, 7-8' for [0, 1, 2, 3, 5, 7, 8]; 'none' for []."""
    levels, parts, i = sorted(levels), [], 0
    while i < len(levels):
        j = i
        while j + 1 < len(levels) and levels[j + 1] == levels[j] + 1:
            j += 1
        parts.append(str(levels[i]) if i == j else f"{levels[i]}-{levels[j]}")
        i = j + 1
    return ", ".join(parts) or "none"


def _check_run_dir(path: str) -> str:
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path!r} is a file, not a run directory")
    if not os.path.isdir(path):
        raise ValueError(f"run directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, rundir.CONFIG)):
        inside = sorted(d for d in os.listdir(path)
                        if os.path.isfile(os.path.join(path, d, rundir.CONFIG)))
        hint = (f"; it holds run directories: {', '.join(inside[:5])}"
                f"{' ...' if len(inside) > 5 else ''}") if inside else ""
        raise ValueError(f"{path!r} is not a run directory (no config.json){hint}")
    return path


class Run:
    """A run directory opened for reading; config and weights are loaded when first asked for.

    `levels` and `incomplete_levels` are read from disk on every access, so a Run object keeps
    up with a run that is still training.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _check_run_dir(path)
        self.name = os.path.basename(self.path)
        self._cache: dict[tuple, PyTree] = {}

    def __repr__(self) -> str:
        return (f"Run({self.path!r}: levels {format_levels(self.levels)} complete, "
                f"incomplete {format_levels(self.incomplete_levels)})")

    # ---- config and model ----

    @functools.cached_property
    def config(self) -> ml_collections.ConfigDict:
        """The resolved config the run was started with (config.json)."""
        return config_lib.from_saved(rundir.read_json(os.path.join(self.path, rundir.CONFIG)))

    @functools.cached_property
    def model(self):
        """The flax model, rebuilt from the config (no data is loaded)."""
        return config_lib.model(self.config, data_lib.num_classes(
            self.config.dataset, data_dir=self.config.get("data_dir") or None))

    @functools.cached_property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example of the run's dataset (channels-last)."""
        c = self.config
        return tuple(data_lib.input_shape(c.dataset, data_dir=c.get("data_dir") or None,
                                          image_size=c.get("image_size") or None))

    @functools.cached_property
    def rates(self) -> PyTree:
        """Per-leaf pruning rates as the run used them (from config `exclude` and `rates`)."""
        return config_lib.prunable(self.config, self.init()["params"])

    @functools.cached_property
    def dense_macs(self) -> dict[str, float]:
        """{kernel path: multiply-accumulates per example} of every Dense and Conv layer."""
        self.check_model()
        x = np.zeros((1, *self.input_shape), np.float32)
        return {p: d for p, (d, _) in
                metrics_lib.flops(self.model, self.init(), x, train=False).items()}

    def check_model(self) -> None:
        """ValueError (one line) unless the saved init holds exactly the params (paths, shapes)
        of the model config.json names: a config.json edited or copied from another run would
        otherwise fail deep inside flax."""
        if "model_ok" in self._cache:
            return
        want = jax.eval_shape(lambda k: models.init(self.model, k, self.input_shape),
                              jax.random.key(0))["params"]
        want = {masks.path_str(p): tuple(x.shape)
                for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
        got = {masks.path_str(p): tuple(np.shape(x))
               for p, x in jax.tree_util.tree_flatten_with_path(self.init()["params"])[0]}
        if want != got:
            diff = sorted(set(want.items()) ^ set(got.items()))
            first = next(p for p, _ in diff)
            if first not in got:
                what = f"the model has {first} {want[first]}, init/ does not"
            elif first not in want:
                what = f"init/ has {first} {got[first]}, the model does not"
            else:
                what = f"{first} is {got[first]} in init/, {want[first]} in the model"
            raise ValueError(
                f"the checkpoints of {self.path} do not match the model its config.json names "
                f"({self.config.model} on {self.config.dataset}): {what}")
        self._cache["model_ok"] = True

    # ---- levels ----

    def level_dir(self, level: int) -> str:
        return rundir.level_dir(self.path, level)

    @property
    def levels(self) -> list[int]:
        """Levels whose training finished (their DONE file exists)."""
        return rundir.done_levels(self.path)

    @property
    def incomplete_levels(self) -> list[int]:
        """Level directories without a DONE file: in progress, interrupted or half-written."""
        done = set(self.levels)
        return [lv for lv in rundir.levels(self.path) if lv not in done]

    def _what_exists(self) -> str:
        return (f"complete levels: {format_levels(self.levels)}; "
                f"incomplete levels: {format_levels(self.incomplete_levels)}")

    def check_level(self, level: int, *, complete: bool = True) -> int:
        """`level` as an int; ValueError naming the levels that exist if it is absent (or, with
        `complete`, not finished)."""
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
            raise ValueError(f"level={level!r}: expected an int; {self._what_exists()}")
        level = int(level)
        if level in self.levels:
            return level
        if level in self.incomplete_levels:
            if not complete:
                return level
            raise ValueError(f"level {level} of {self.path} is incomplete (no DONE file: still "
                             f"training, interrupted or half-written); {self._what_exists()}")
        raise ValueError(f"level {level} does not exist in {self.path}; {self._what_exists()}")

    # ---- pytrees ----

    def _restore(self, path: str, what: str) -> PyTree:
        return checkpoints.restore(path, hint=f"({what} of run {self.path})")

    def init(self) -> dict:
        """The initial variables ({'params', optional 'batch_stats'}) every level starts from."""
        if "init" not in self._cache:
            self._cache["init"] = self._restore(os.path.join(self.path, "init"), "init")
        return self._cache["init"]

    def rewind(self) -> RewindPoint:
        """The saved rewind point (the state of level 0 at `rewind_step`, or step 0)."""
        raw = self._restore(os.path.join(self.path, "rewind"), "rewind point")
        return RewindPoint(raw["params"], raw.get("batch_stats", {}), raw["opt_state"],
                           int(raw["step"]), np.asarray(raw["key"]))

    def mask(self, level: int) -> PyTree:
        """The bool mask of `level` (True = kept), with the structure of the params.

        Needs only the level's mask checkpoint, which is written before the level trains.
        """
        level = self.check_level(level, complete=False)
        path = os.path.join(self.level_dir(level), "mask")
        if not checkpoints.exists(path):
            raise ValueError(f"level {level} of {self.path} has no saved mask yet (half-written "
                             f"level); {self._what_exists()}")
        if ("mask", level) not in self._cache:
            self._cache[("mask", level)] = jax.tree.map(
                lambda m: np.asarray(m, bool),
                self._restore(path, f"mask of level {level}"))
        return self._cache[("mask", level)]

    def final_state(self, level: int) -> dict:
        """The trained state of a complete level: {'step', 'params', 'batch_stats', 'opt_state',
        'key'} as raw pytrees."""
        level = self.check_level(level)
        return self._restore(os.path.join(self.level_dir(level), "final"),
                             f"final weights of level {level}")

    def weights(self, level: int) -> PyTree:
        """The final params of a complete level (pruned entries are exactly 0.0)."""
        return self.final_state(level)["params"]

    def metrics(self, level: int) -> list[dict]:
        """The level's evaluation records ({'step', 'train_loss', 'test_loss', 'test_accuracy'});
        partial for a level still training."""
        level = self.check_level(level, complete=False)
        return rundir.read_jsonl(os.path.join(self.level_dir(level), rundir.METRICS),
                                 complete=level in self.levels)

    # ---- controls ----

    def controls(self, level: int) -> list[str]:
        """Names ('reinit_s0', 'random_prune_s1', ...) of the finished controls of a level."""
        cdir = os.path.join(self.level_dir(self.check_level(level)), "controls")
        if not rundir.is_done(cdir):
            return []
        return sorted(d for d in os.listdir(cdir) if os.path.isdir(os.path.join(cdir, d)))

    def _control_dir(self, level: int, name: str) -> str:
        names = self.controls(level)
        if name not in names:
            raise ValueError(f"control {name!r} does not exist at level {level} of {self.path}; "
                             f"finished controls there: {', '.join(names) or 'none'}")
        return os.path.join(self.level_dir(level), "controls", name)

    def control_mask(self, level: int, name: str) -> PyTree:
        """The mask control `name` of `level` trained with (the ticket's mask for 'reinit_*')."""
        path = os.path.join(self._control_dir(level, name), "mask")
        return jax.tree.map(lambda m: np.asarray(m, bool),
                            self._restore(path, f"mask of control {name} at level {level}"))

    def control_metrics(self, level: int, name: str) -> list[dict]:
        """The evaluation records of control `name` of `level`."""
        return rundir.read_jsonl(os.path.join(self._control_dir(level, name), rundir.METRICS),
                                 complete=True)

    # ---- summaries ----

    def layers(self, level: int) -> list[dict]:
        """Per prunable layer of `level`: kept, total, density and (for Dense/Conv kernels)
        dense and remaining MACs per example."""
        mask = self.mask(level)
        rows = []
        for path, (kept, total) in masks.counts(mask, self.rates).items():
            row = {"layer": path, "kept": kept, "total": total, "density": kept / total}
            if path in self.dense_macs:
                d = self.dense_macs[path]
                row.update(macs=d, remaining_macs=d * float(kept) / total)
            rows.append(row)
        return rows

    def speedup(self, mask: PyTree) -> float:
        """ShrinkBench's theoretical speedup of `mask` on this run's model (see lottery.metrics)."""
        kept = dict(zip(masks.paths(mask), (int(np.sum(m)) for m in jax.tree.leaves(mask))))
        sizes = dict(zip(masks.paths(mask), (int(np.size(m)) for m in jax.tree.leaves(mask))))
        dense = sum(self.dense_macs.values())
        remaining = sum(d * float(kept[p]) / sizes[p] for p, d in self.dense_macs.items())
        return dense / remaining if remaining > 0 else float("inf")

    def level_info(self, level: int) -> dict:
        """The summary of a complete level (see the module docstring for each number)."""
        level = self.check_level(level)
        mask = self.mask(level)
        counts = masks.counts(mask, self.rates)
        kept, total = sum(k for k, _ in counts.values()), sum(t for _, t in counts.values())
        recs = [r for r in self.metrics(level) if "test_accuracy" in r]
        if not recs:
            raise ValueError(f"{os.path.join(self.level_dir(level), rundir.METRICS)} has no "
                             f"evaluation records, but level {level} is marked done; "
                             f"{self._what_exists()}")
        best = max(recs, key=lambda r: r["test_accuracy"])  # first maximum: earliest step
        info = {"level": level, "density": kept / total, "kept": kept, "total": total,
                "compression_ratio": masks.compression_ratio(self.weights(level), mask),
                "theoretical_speedup": self.speedup(mask),
                "best_accuracy": best["test_accuracy"], "best_step": best["step"],
                "final_accuracy": recs[-1]["test_accuracy"], "final_step": recs[-1]["step"],
                "controls": {}}
        for name in self.controls(level):
            kind = name.rsplit("_s", 1)[0]
            crecs = [r for r in self.control_metrics(level, name) if "test_accuracy" in r]
            if crecs:
                info["controls"].setdefault(kind, []).append(crecs[-1]["test_accuracy"])
        return info

    def table(self) -> list[dict]:
        """`level_info` of every complete level."""
        return [self.level_info(lv) for lv in self.levels]

    @property
    def incomplete_controls(self) -> list[int]:
        """Complete levels whose controls started but did not finish."""
        return [lv for lv in self.levels
                if os.path.isdir(os.path.join(self.level_dir(lv), "controls"))
                and not rundir.is_done(os.path.join(self.level_dir(lv), "controls"))]

    def progress(self, level: int) -> dict:
        """What an incomplete level has so far: {'level', 'has_mask', 'last_step',
        'test_accuracy'} (the last two None before its first evaluation)."""
        level = self.check_level(level, complete=False)
        recs = [r for r in self.metrics(level) if "test_accuracy" in r]
        return {"level": level,
                "has_mask": checkpoints.exists(os.path.join(self.level_dir(level), "mask")),
                "last_step": recs[-1]["step"] if recs else None,
                "test_accuracy": recs[-1]["test_accuracy"] if recs else None}


# ---- mask comparison ----

def compare_masks(a: PyTree, b: PyTree, rates: PyTree | None = None) -> dict[str, dict]:
    """Per prunable layer, and 'total' over all of them: Jaccard overlap |a & b| / |a | b| (1.0
    when both are empty), survival |a & b| / |a| (share of a's kept weights that b keeps too;
    1.0 when a keeps none), and the counts kept_a, kept_b, both."""
    rates = masks.resolve_rates(a, rates)
    masks.check(b, a, "second mask")
    out, sums = {}, np.zeros(4, np.int64)
    for path, x, y, r in zip(masks.paths(a), jax.tree.leaves(a), jax.tree.leaves(b),
                             jax.tree.leaves(rates)):
        if r > 0:
            x, y = np.asarray(x, bool), np.asarray(y, bool)
            c = np.array([x.sum(), y.sum(), (x & y).sum(), (x | y).sum()], np.int64)
            out[path] = _overlap_row(c)
            sums += c
    out["total"] = _overlap_row(sums)
    return out


def _overlap_row(c) -> dict:
    ka, kb, both, union = (int(v) for v in c)
    return {"jaccard": both / union if union else 1.0, "survival": both / ka if ka else 1.0,
            "kept_a": ka, "kept_b": kb, "both": both}


def compare_runs(a: Run, b: Run, level_a: int, level_b: int | None = None) -> dict[str, dict]:
    """`compare_masks` of `a`'s mask at `level_a` and `b`'s at `level_b` (default the same)."""
    level_b = level_a if level_b is None else level_b
    return compare_masks(a.mask(level_a), b.mask(level_b), a.rates)


def survival(run: Run, level: int) -> dict[str, dict]:
    """How much of `level`'s mask survives into `level + 1` (`compare_masks` of the two)."""
    return compare_runs(run, run, level, level + 1)


def control_overlap(run: Run, level: int) -> dict[str, dict[str, dict]]:
    """{control name: compare_masks(ticket mask, control mask)} for the controls of `level`."""
    ticket = run.mask(level)
    return {name: compare_masks(ticket, run.control_mask(level, name), run.rates)
            for name in run.controls(level)}
