"""lottery.plots and `lottery plot`: seed grouping with mean and min-max, the data behind the
figures, and PNGs of the fixed size that are not blank."""

import json
import os
import shutil
import struct

import matplotlib.image
import numpy as np
import pytest
from _tiny_run import tiny_run

from lottery import checkpoints, cli, plots, runs


def _edit_copy(src, dst, config_changes, acc_shift):
    """A copy of run `src` with config fields changed and every test accuracy shifted."""
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(config_changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    for root, _, files in os.walk(dst):
        if "metrics.jsonl" in files:
            path = os.path.join(root, "metrics.jsonl")
            with open(path) as f:
                recs = [json.loads(line) for line in f]
            with open(path, "w") as f:
                for r in recs:
                    r["test_accuracy"] += acc_shift
                    f.write(json.dumps(r) + "\n")
    return dst


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """seed 0 (the tiny run), a 'seed 1' copy with accuracies 0.1 lower, and an 'lr 0.05' copy."""
    base = tiny_run()
    root = tmp_path_factory.mktemp("plot_runs")
    seed1 = _edit_copy(base, str(root / "seed1"), {"seed": 1}, -0.1)
    other = _edit_copy(base, str(root / "lr"), {"lr": 0.05}, -0.2)
    return base, seed1, other


def _accs(run_dir, level, control=None):
    sub = ["controls", control] if control else []
    with open(os.path.join(run_dir, f"level_{level}", *sub, "metrics.jsonl")) as f:
        return [json.loads(line)["test_accuracy"] for line in f]


def test_runs_differing_only_in_seed_are_one_line(three_runs):
    base, seed1, other = three_runs
    groups = plots.group_runs([base, other, seed1])
    assert [[r.path for r in g] for g in groups] == [[base, seed1], [other]]
    assert plots.group_labels(groups) == ["lr=0.1 (2 seeds)", "lr=0.05 (1 seed)"]
    series = plots.accuracy_series([base, seed1, other], metric="final")
    assert [(s["label"], s["kind"]) for s in series] == [
        ("lr=0.1 (2 seeds)", "ticket"), ("lr=0.1 (2 seeds)", "random_prune"),
        ("lr=0.1 (2 seeds)", "reinit"), ("lr=0.05 (1 seed)", "ticket"),
        ("lr=0.05 (1 seed)", "random_prune"), ("lr=0.05 (1 seed)", "reinit")]
    ticket, rp, _ = series[:3]
    assert ticket["levels"].tolist() == [0, 1, 2] and ticket["n"].tolist() == [2, 2, 2]
    for i, level in enumerate((0, 1, 2)):
        vals = [_accs(base, level)[-1], _accs(seed1, level)[-1]]
        assert ticket["mean"][i] == pytest.approx(np.mean(vals))
        assert (ticket["min"][i], ticket["max"][i]) == (min(vals), max(vals))
        mask = checkpoints.restore(os.path.join(base, f"level_{level}", "mask"))
        kept = sum(int(np.sum(mask[k]["kernel"])) for k in ("fc1", "fc2"))
        assert ticket["density"][i] == kept / (784 * 300 + 300 * 100)
    assert rp["levels"].tolist() == [2] and rp["n"].tolist() == [4]  # 2 runs x 2 control seeds
    vals = [_accs(r, 2, f"random_prune_s{s}")[-1] for r in (base, seed1) for s in (0, 1)]
    assert rp["mean"][0] == pytest.approx(np.mean(vals))
    assert (rp["min"][0], rp["max"][0]) == (min(vals), max(vals))
    best = plots.accuracy_series([base, seed1], metric="best")[0]
    assert best["max"][0] == max(_accs(base, 0))


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_plot_writes_nonblank_pngs_of_fixed_size(three_runs, tmp_path, capsys):
    assert cli.run(["plot", *three_runs, "--out", str(tmp_path / "figs")]) == 0
    printed = capsys.readouterr().out
    names = ("accuracy_vs_density", "layer_density", "training_curves", "first_layer_mask")
    for name in names:
        path = str(tmp_path / "figs" / f"{name}.png")
        assert f"{name}: {path}" in printed
        assert _png_size(path) == plots.SIZE == (640, 480)
        img = matplotlib.image.imread(path)[..., :3]
        assert img.shape == (480, 640, 3)
        assert (img < 0.5).mean() > 0.003, name  # ink: axes, text and lines, not a blank page
    fig = plots.instability_figure(np.linspace(0, 1, 11), np.full(11, 0.1), "flat")
    assert _png_size(plots.save(fig, str(tmp_path / "inst.png"))) == (640, 480)


def test_first_layer_counts_per_pixel():
    run = runs.Run(tiny_run())
    for level in (0, 2):
        kernel = checkpoints.restore(os.path.join(run.path, f"level_{level}", "mask"))["fc1"]
        want = np.asarray(kernel["kernel"]).reshape(28, 28, 300).sum(-1)
        got = plots.first_layer_counts(run, level)
        assert got.shape == (28, 28) and np.array_equal(got, want)
    assert np.all(plots.first_layer_counts(run, 0) == 300)


def test_bad_input(tmp_path, three_runs):
    with pytest.raises(ValueError, match="is not a run directory"):
        plots.plot([str(tmp_path)], str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"metric='last': expected one of \('final', 'best'\)"):
        plots.plot([three_runs[0]], str(tmp_path / "out"), metric="last")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    shutil.copy(os.path.join(three_runs[0], "config.json"), empty / "config.json")
    (empty / "level_0").mkdir()
    with pytest.raises(ValueError, match="has no complete level yet; incomplete levels: 0"):
        plots.plot([str(empty)], str(tmp_path / "out"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="--out .* cannot be created"):
        plots.plot([three_runs[0]], str(blocker / "sub"))
