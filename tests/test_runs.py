"""lottery.runs and lottery.report (`lottery inspect`, `lottery compare`) on a tiny finished run:
every number against a direct computation from the saved files, mask overlaps, and bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from _tiny_run import tiny_run

from lottery import checkpoints, cli, report, runs

PRUNABLE = ("fc1/kernel", "fc2/kernel")  # the tiny config excludes 'out'
LENET_MACS = {"fc1/kernel": 784 * 300, "fc2/kernel": 300 * 100, "out/kernel": 100 * 10}


@pytest.fixture(scope="module")
def run_dir():
    return tiny_run()


def _raw(run_dir, *parts):
    return checkpoints.restore(os.path.join(run_dir, *parts))


def _leaf(tree, path):
    for p in path.split("/"):
        tree = tree[p]
    return np.asarray(tree)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _direct(run_dir, level):
    """Every number of a level, from the raw checkpoints and JSON files with numpy."""
    mask = _raw(run_dir, f"level_{level}", "mask")
    params = _raw(run_dir, f"level_{level}", "final")["params"]
    layers = {p: (int(_leaf(mask, p).sum()), _leaf(mask, p).size) for p in PRUNABLE}
    kept, total = sum(k for k, _ in layers.values()), sum(t for _, t in layers.values())
    leaves = [(p, _leaf(params, f"{p}/{w}"), _leaf(mask, f"{p}/{w}"))
              for p in ("fc1", "fc2", "out") for w in ("kernel", "bias")]
    n_all = sum(x.size for _, x, _ in leaves)
    n_nonzero = sum(int(np.count_nonzero(x * m)) for _, x, m in leaves)
    remaining = sum(macs * _leaf(mask, p).mean() for p, macs in LENET_MACS.items())
    recs = _jsonl(os.path.join(run_dir, f"level_{level}", "metrics.jsonl"))
    accs = np.array([r["test_accuracy"] for r in recs])
    controls = {}
    cdir = os.path.join(run_dir, f"level_{level}", "controls")
    if os.path.isdir(cdir):
        for name in sorted(os.listdir(cdir)):
            if name != "DONE":
                acc = _jsonl(os.path.join(cdir, name, "metrics.jsonl"))[-1]["test_accuracy"]
                controls.setdefault(name.rsplit("_s", 1)[0], []).append(acc)
    return {"level": level, "density": kept / total, "kept": kept, "total": total,
            "compression_ratio": n_all / n_nonzero,
            "theoretical_speedup": sum(LENET_MACS.values()) / remaining,
            "best_accuracy": accs.max(), "best_step": recs[int(np.argmax(accs))]["step"],
            "final_accuracy": accs[-1], "final_step": recs[-1]["step"], "controls": controls,
            "layers": layers}


def test_inspect_json_equals_direct_computation(run_dir):
    out = json.loads(report.inspect_text(run_dir, level=2, as_json=True))
    assert [r["level"] for r in out["levels"]] == [0, 1, 2]
    assert out["incomplete_levels"] == []
    for row in out["levels"]:
        d = _direct(run_dir, row["level"])
        for key in ("density", "kept", "total", "best_accuracy", "best_step", "final_accuracy",
                    "final_step", "controls"):
            assert row[key] == d[key], key
        assert row["compression_ratio"] == pytest.approx(d["compression_ratio"], rel=1e-12)
        assert row["theoretical_speedup"] == pytest.approx(d["theoretical_speedup"], rel=1e-12)
    assert out["levels"][0]["density"] == 1.0 and out["levels"][0]["theoretical_speedup"] == 1.0
    assert sorted(out["levels"][2]["controls"]) == ["random_prune", "reinit"]
    assert all(len(v) == 2 for v in out["levels"][2]["controls"].values())
    d = _direct(run_dir, 2)
    assert [r["layer"] for r in out["layers"]] == list(PRUNABLE)
    for r in out["layers"]:
        kept, total = d["layers"][r["layer"]]
        assert (r["kept"], r["total"], r["density"]) == (kept, total, kept / total)
        assert r["macs"] == LENET_MACS[r["layer"]]
        assert r["remaining_macs"] == pytest.approx(LENET_MACS[r["layer"]] * kept / total)
    assert out["config"]["seed"] == 0 and out["config"]["levels"] == 2


def test_inspect_text_prints_the_same_numbers(run_dir):
    text = report.inspect_text(run_dir, level=2)
    lines = text.splitlines()
    for level in (0, 1, 2):
        d = _direct(run_dir, level)
        (row,) = [ln.split() for ln in lines if ln.split()[:1] == [str(level)]
                  and len(ln.split()) >= 7]
        got = [float(v) for v in row[1:]]
        want = [d["density"], d["compression_ratio"], d["theoretical_speedup"],
                d["best_accuracy"], d["best_step"], d["final_accuracy"]]
        want += [np.mean(d["controls"][k]) for k in sorted(d["controls"])]  # random_prune, reinit
        assert got == pytest.approx(want, abs=5e-5), (level, row)
    d = _direct(run_dir, 2)
    for layer in PRUNABLE:
        (row,) = [ln.split() for ln in lines if ln.startswith(layer)]
        kept, total = d["layers"][layer]
        assert row[1:4] == [f"{kept:,}", f"{total:,}", f"{kept / total:.4f}"]
    (row,) = [ln.split() for ln in lines if ln.startswith("total")]
    assert row[1:4] == [f"{d['kept']:,}", f"{d['total']:,}", f"{d['density']:.4f}"]


def test_run_api_gives_the_saved_pytrees(run_dir):
    r = runs.Run(run_dir)
    assert r.levels == [0, 1, 2] and r.incomplete_levels == []
    with open(os.path.join(run_dir, "config.json")) as f:
        assert r.config.to_dict() == json.load(f)
    rw = r.rewind()
    raw = _raw(run_dir, "rewind")
    assert rw.step == 20 == int(raw["step"])
    assert np.array_equal(rw.params["fc1"]["kernel"], raw["params"]["fc1"]["kernel"])
    mask = r.mask(2)
    assert mask["fc1"]["kernel"].dtype == bool
    w = r.weights(2)
    assert np.all(w["fc1"]["kernel"][~mask["fc1"]["kernel"]] == 0.0)
    final = _raw(run_dir, "level_2", "final")
    assert np.array_equal(w["fc2"]["kernel"], final["params"]["fc2"]["kernel"])
    assert np.array_equal(r.init()["params"]["out"]["kernel"],
                          _raw(run_dir, "init")["params"]["out"]["kernel"])
    assert [m["step"] for m in r.metrics(0)] == [20, 40, 60]
    assert [m["step"] for m in r.metrics(1)] == [40, 60]  # rewound to iteration 20
    assert r.controls(1) == []
    assert r.controls(2) == ["random_prune_s0", "random_prune_s1", "reinit_s0", "reinit_s1"]


def test_compare_run_with_itself_is_one(run_dir):
    out = json.loads(report.compare_text(run_dir, run_dir, as_json=True))
    assert [(c["level_a"], c["level_b"]) for c in out["comparisons"]] == [(0, 0), (1, 1), (2, 2)]
    for c in out["comparisons"]:
        assert set(c["layers"]) == {*PRUNABLE, "total"}
        for row in c["layers"].values():
            assert row["jaccard"] == 1.0 and row["survival"] == 1.0
            assert row["kept_a"] == row["kept_b"] == row["both"]
    text = report.compare_text(run_dir, run_dir)
    assert text.count("1.0000") == 9  # 3 levels x (2 layers + total)


def test_survival_into_next_level_and_control_overlap(run_dir):
    r = runs.Run(run_dir)
    m1, m2 = (_raw(run_dir, f"level_{lv}", "mask") for lv in (1, 2))
    res = runs.survival(r, 1)
    for p in PRUNABLE:
        a, b = _leaf(m1, p), _leaf(m2, p)
        both = int((a & b).sum())
        assert res[p]["jaccard"] == both / int((a | b).sum())
        assert res[p]["survival"] == both / int(a.sum())
        assert both == int(b.sum())  # IMP never revives a weight
    assert res["total"]["survival"] == pytest.approx(0.8, abs=1e-5)  # fraction 0.2 removed
    ov = runs.control_overlap(r, 2)
    assert all(row["jaccard"] == 1.0 for row in ov["reinit_s0"].values())  # same mask
    for name in ("random_prune_s0", "random_prune_s1"):
        ctrl = _raw(run_dir, "level_2", "controls", name, "mask")
        for p in PRUNABLE:
            a, b = _leaf(m2, p), _leaf(ctrl, p)
            assert ov[name][p]["kept_a"] == ov[name][p]["kept_b"] == int(a.sum())
            assert ov[name][p]["jaccard"] == int((a & b).sum()) / int((a | b).sum()) < 0.9
    single = report.compare_text(run_dir, run_dir, level=1, level_b=2)
    assert "A level 1 vs B level 2" in single and f"{res['total']['jaccard']:.4f}" in single


@pytest.fixture(scope="module")
def broken(run_dir, tmp_path_factory):
    """A copy of the run where level 2 is half-written (no DONE, metrics cut mid-line) and
    level 3 is a directory with nothing in it yet."""
    dst = str(tmp_path_factory.mktemp("broken") / os.path.basename(run_dir))
    shutil.copytree(run_dir, dst)
    os.remove(os.path.join(dst, "level_2", "DONE"))
    with open(os.path.join(dst, "level_2", "metrics.jsonl"), "a") as f:
        f.write('{"step": 80, "test_acc')
    os.makedirs(os.path.join(dst, "level_3"))
    os.makedirs(os.path.join(dst, "level_1", "controls", "reinit_s0"))  # controls cut short
    return dst


def test_interrupted_run_shows_what_is_complete(broken):
    r = runs.Run(broken)
    assert r.levels == [0, 1] and r.incomplete_levels == [2, 3]
    text = report.inspect_text(broken)
    assert runs.Run(broken).controls(1) == []
    assert "level 2: incomplete (last evaluation at step 60" in text
    assert "level 3: incomplete (mask missing, no evaluation yet)" in text
    assert "level 1: controls incomplete" in text
    out = json.loads(report.inspect_text(broken, as_json=True))
    assert [x["level"] for x in out["levels"]] == [0, 1]
    assert out["levels"][1]["controls"] == {} and out["incomplete_controls"] == [1]
    assert [p["last_step"] for p in out["incomplete_levels"]] == [60, None]
    assert r.mask(2)["fc1"]["kernel"].sum() > 0  # its mask was written before training


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("workdir", "is not a run directory (no config.json); it holds run directories: "),
    ("level", "level 7 does not exist in {run}; complete levels: 0-1; incomplete levels: 2-3"),
    ("half", "level 2 of {run} is incomplete (no DONE file"),
    ("nomask", "level 3 of {run} has no saved mask yet"),
])
def test_bad_input_is_one_clear_line(broken, case, message):
    calls = {"missing": lambda: report.inspect_text(broken + "_nope"),
             "workdir": lambda: report.inspect_text(os.path.dirname(broken)),
             "level": lambda: report.inspect_text(broken, level=7),
             "half": lambda: report.inspect_text(broken, level=2),
             "nomask": lambda: report.compare_text(broken, broken, level=3)}
    with pytest.raises(ValueError) as e:
        calls[case]()
    assert message.format(run=broken) in str(e.value)
    assert "\n" not in str(e.value)
    if case in ("half", "level"):
        assert "complete levels: 0-1; incomplete levels: 2-3" in str(e.value)


def test_handlers_print_tables(run_dir, capsys):
    assert cli.run(["inspect", run_dir, "--level", "1"]) == 0
    out = capsys.readouterr().out
    assert "level 1: density 0.8000" in out and "fc2/kernel" in out
    assert cli.run(["compare", run_dir, run_dir, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["comparisons"]) == 3
    with pytest.raises(ValueError, match="takes no --config"):
        cli.run(["inspect", run_dir, "--config.seed=1"])


def test_script_and_cli_exit_codes(broken, run_dir):
    """scripts/inspect_run.py runs `lottery inspect`."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "inspect_run.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ok = subprocess.run([sys.executable, script, run_dir, "--level", "2"], capture_output=True,
                        text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "level 2: density 0.6400" in ok.stdout
    bad = subprocess.run([sys.executable, script, broken, "--level", "2"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lottery inspect: error: level 2 of")
    assert "incomplete levels: 2-3" in lines[0]
