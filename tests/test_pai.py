"""Prune-at-init sweeps end to end on a tiny config: masks, layout, collapse, resume, bad input."""

import json
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from lottery import checkpoints, cli, config, experiments, masks, models, pai, prune, rundir
from lottery import scorers
from lottery import train as train_lib

TINY = '''
from lottery.pai import base_config


def get_config():
    c = base_config()
    c.dataset = "mnist1d"
    c.model = "mlp_mnist1d"
    c.optimizer = "adam"
    c.lr = 1e-2
    c.batch_size = 100
    c.training_steps = "40it"
    c.eval_every = "20it"
    c.scorers = "magnitude,snip,synflow"
    c.compressions = "1,10,10000"
    c.seeds = 2
    c.rounds = "synflow=4"
    c.progress = False
    return c
'''
SCORERS = ("magnitude", "snip", "synflow")
POINTS = ("c1", "c10", "c10000")
PRUNABLE = 15000  # mlp_mnist1d kernels: 40*100 + 100*100 + 100*10 (every kernel is prunable)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "tiny.py"
    path.write_text(TINY)
    return str(path)


@contextlib.contextmanager
def _recording_starts(calls):
    """Wrap `train.train` to append (params, mask) of every state training starts from."""
    real = train_lib.train

    def spy(trainer, state, mask, *args, **kwargs):
        calls.append((jax.tree.map(np.array, state.params), jax.tree.map(np.array, mask)))
        return real(trainer, state, mask, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_lib, "train", spy)
        yield


_BASE_STARTS = []  # (params, mask) of every training the `run` sweep started


@pytest.fixture(scope="module")
def run(tiny_config, tmp_path_factory):
    """An uninterrupted 3 scorers x 3 compressions x 2 seeds sweep."""
    cfg = config.load(tiny_config)
    with _recording_starts(_BASE_STARTS):
        return cfg, pai.sweep(cfg, str(tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="module")
def ablated(run, tiny_config, tmp_path_factory):
    """A copy of the `run` sweep extended with every ablation at compression 10.

    Returns (config, run dir, {file: mtime} of the copy before extending, the recorded starts)."""
    _, ref_dir = run
    work = tmp_path_factory.mktemp("ablated")
    shutil.copytree(ref_dir, work / os.path.basename(ref_dir))
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*")
              if p.is_file() and p.name != rundir.LOCK}  # the run lock: rewritten by each run
    cfg = config.load(tiny_config, ["ablations=invert, shuffle,reinit", "compressions=10"])
    starts = []
    with _recording_starts(starts):
        run_dir = pai.sweep(cfg, str(work))
    return cfg, run_dir, before, starts


_MODEL = models.create("mlp_mnist1d")
# models.init's formula (the init find-ticket uses for a seed), compiled once for the module.
_INIT = jax.jit(lambda k: _MODEL.init(k, jax.numpy.zeros((1, 40, 1)), train=False)["params"])


def _seed_params(seed):
    return _INIT(jax.random.fold_in(jax.random.key(seed), 0))


def _reinit_params(seed):
    """The `reinit` ablation's draw: a fresh init with fold_in(key(seed), 4)."""
    return _INIT(jax.random.fold_in(jax.random.key(seed), 4))


def _mask(run_dir, scorer, point, seed, like):
    return checkpoints.restore(os.path.join(run_dir, scorer, point, f"s{seed}", "mask"), like)


def test_sweep_layout_counts_and_magnitude_masks(run):
    cfg, run_dir = run
    assert os.path.basename(run_dir).startswith("prune-at-init_mlp_mnist1d_mnist1d_")
    assert os.path.basename(run_dir).endswith(config.run_hash(pai.normalize(cfg)))
    assert json.load(open(os.path.join(run_dir, "config.json")))["experiment"] == "prune-at-init"
    for seed in (0, 1):
        params = _seed_params(seed)  # the init find-ticket uses for this seed
        like = masks.init(params)
        flat = np.concatenate([np.abs(np.asarray(params[k]["kernel"])).ravel()
                               for k in ("fc1", "fc2", "out")])
        for scorer in SCORERS:
            for point, c in zip(POINTS, (1, 10, 10000)):
                cdir = os.path.join(run_dir, scorer, point)
                assert rundir.is_done(cdir)
                m = _mask(run_dir, scorer, point, seed, like)
                kept = int(np.floor(PRUNABLE / c + 0.5))  # round-half-up(N / compression)
                assert sum(k for k, _ in masks.counts(m).values()) == kept
                assert all(np.all(np.asarray(m[k]["bias"])) for k in ("fc1", "fc2", "out"))
                info = json.load(open(os.path.join(cdir, f"s{seed}", "info.json")))
                assert (info["kept"], info["total"]) == (kept, PRUNABLE)
                steps = [r["step"] for r in rundir.read_metrics(
                    os.path.join(cdir, f"s{seed}", "metrics.jsonl"))]
                assert steps == [20, 40]
                if scorer == "magnitude":  # the kept weights are the top-|θ| ones of this init
                    got = np.concatenate([np.asarray(m[k]["kernel"]).ravel()
                                          for k in ("fc1", "fc2", "out")])
                    want = np.zeros(PRUNABLE, bool)
                    want[np.argsort(-flat, kind="stable")[:kept]] = True
                    np.testing.assert_array_equal(got, want)
    m0 = _mask(run_dir, "snip", "c10", 0, masks.init(_seed_params(0)))
    m1 = _mask(run_dir, "snip", "c10", 1, m0)
    assert masks.jaccard(m0, m1)["fc1/kernel"] < 0.9  # seeds are different inits


def test_dense_point_is_trained_once_and_shared(run):
    _, run_dir = run
    ref = os.path.join(run_dir, "magnitude", "c1")
    for scorer in ("snip", "synflow"):
        rec = json.load(open(os.path.join(run_dir, scorer, "c1", "collapse.json")))
        assert rec["reused_from"] == "magnitude" and rec["density"] == 1.0
        for seed in (0, 1):
            a = open(os.path.join(ref, f"s{seed}", "metrics.jsonl")).read()
            b = os.path.join(run_dir, scorer, "c1", f"s{seed}", "metrics.jsonl")
            assert open(b).read() == a
    rec = json.load(open(os.path.join(run_dir, "snip", "c10", "collapse.json")))
    assert rec["reused_from"] is None and rec["rounds"] == 1
    assert json.load(open(os.path.join(run_dir, "synflow", "c10", "collapse.json")))["rounds"] == 4


def test_summary_matches_metrics_files(run):
    _, run_dir = run
    rows = pai.summary(run_dir)
    assert [(r["scorer"], r["compression"]) for r in rows] == [
        (s, c) for s in SCORERS for c in (1.0, 10.0, 10000.0)]
    for r in rows:
        point = "c" + {1.0: "1", 10.0: "10", 10000.0: "10000"}[r["compression"]]
        accs = [rundir.read_metrics(os.path.join(run_dir, r["scorer"], point, f"s{s}",
                                              "metrics.jsonl"))[-1]["test_accuracy"]
                for s in (0, 1)]
        assert r["seeds"] == [0, 1] and r["accuracies"] == accs
        assert r["accuracy_mean"] == pytest.approx(np.mean(accs))
        assert r["accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
        assert r["density"] == pytest.approx(1 / r["compression"])
    assert rows[0]["accuracy_mean"] > 0.3  # 40 Adam steps on MNIST-1D beat chance (0.1)
    table = pai.format_table(rows)
    assert table.count("\n") == len(rows)


def test_collapse_marker_fires_on_constructed_case(run, tmp_path):
    # Compression 10000 keeps round(1.5) = 2 of the 15,000 weights spread over 3 layers, so at
    # least one layer is empty; for magnitude, which ones follows from the init alone.
    _, run_dir = run
    for seed in (0, 1):
        params = _seed_params(seed)
        sizes = {k: np.size(params[k]["kernel"]) for k in ("fc1", "fc2", "out")}
        flat = np.concatenate([np.abs(np.asarray(params[k]["kernel"])).ravel() for k in sizes])
        top = np.argsort(-flat)[:2]
        edges = np.cumsum([0] + list(sizes.values()))
        owners = {list(sizes)[np.searchsorted(edges, i, side="right") - 1] for i in top}
        want = [f"{k}/kernel" for k in sizes if k not in owners]
        rec = json.load(open(os.path.join(run_dir, "magnitude", "c10000", "collapse.json")))
        assert rec["collapsed"][str(seed)] == want and want
    # Every cell's record lists exactly the kernels its saved mask leaves empty.
    like = masks.init(_seed_params(0))
    expected_marks = []
    for scorer in SCORERS:
        for point, c in zip(POINTS, (1.0, 10.0, 10000.0)):
            rec = json.load(open(os.path.join(run_dir, scorer, point, "collapse.json")))
            for seed in (0, 1):
                m = _mask(run_dir, scorer, point, seed, like)
                empty = [f"{k}/kernel" for k in ("fc1", "fc2", "out")
                         if not np.asarray(m[k]["kernel"]).any()]
                assert rec["collapsed"][str(seed)] == empty
                assert bool(empty) == (c == 10000.0) or (scorer == "magnitude" and c == 10.0)
            if any(rec["collapsed"].values()):
                expected_marks.append((scorer, c))
    rows = pai.summary(run_dir)
    assert sorted((r["scorer"], r["compression"]) for r in rows if r["collapsed_seeds"]) == \
        sorted(expected_marks)
    assert "/kernel (2/2)" in pai.format_table(rows)
    png = tmp_path / "plot.png"
    assert sorted(pai.plot(run_dir, str(png))) == sorted(expected_marks)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kill_and_resume_equals_uninterrupted(run, tiny_config, tmp_path):
    _, ref_dir = run
    work = tmp_path / "killed"
    code = (f"import sys; from lottery import config, pai; "
            f"pai.sweep(config.load({tiny_config!r}), {str(work)!r})")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(work.glob("*/*/*/DONE")):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    (run_dir,) = list(work.glob("prune-at-init_*"))
    assert run_dir.name == os.path.basename(ref_dir)
    done = sorted(p.parent for p in run_dir.glob("*/*/DONE"))
    assert 1 <= len(done) < len(SCORERS) * len(POINTS)
    before = {p: p.stat().st_mtime_ns for d in done for p in d.rglob("*")}
    assert pai.sweep(config.load(tiny_config), str(work)) == str(run_dir)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished cells untouched
    for scorer in SCORERS:
        for point in POINTS:
            for seed in (0, 1):
                rel = os.path.join(scorer, point, f"s{seed}")
                a = open(os.path.join(ref_dir, rel, "metrics.jsonl")).read()
                assert open(os.path.join(run_dir, rel, "metrics.jsonl")).read() == a
                ma = checkpoints.restore(os.path.join(ref_dir, rel, "mask"))
                mb = checkpoints.restore(os.path.join(run_dir, rel, "mask"))
                assert all(np.array_equal(x, y)
                           for x, y in zip(jax.tree.leaves(ma), jax.tree.leaves(mb)))


PAI = experiments.get("prune-at-init")


def _parse(argv):
    p = cli._parser()
    return p, p.parse_args(["prune-at-init", *argv])


def _config(args, overrides=()):
    return experiments.load_config(PAI, args.config, overrides, args)


@pytest.mark.parametrize("flags, message", [
    (["--scorers", "snip,obd"], "unknown scorer 'obd'; known scorers: gradient_magnitude, "
                                "grasp, magnitude, random, snip, synflow"),
    (["--compression", "1,0.5"], "compression=0.5: a compression ratio"),
    (["--compression", "10^-1"], "must be >= 1"),
    (["--density", "0.1,1.5"], "density=1.5: a density (fraction of prunable weights kept) "
                               "must be in (0, 1]"),
    (["--density", "0"], "must be in (0, 1]"),
    (["--compression", "10,10"], "10 is given twice"),
    (["--seeds", "0"], "seeds=0: must be >= 1"),
])
def test_bad_input_is_one_line_before_any_work(tiny_config, tmp_path, flags, message):
    workdir = tmp_path / "never"
    _, args = _parse(["--config", tiny_config, "--workdir", str(workdir), *flags])
    with pytest.raises(ValueError) as e:
        cli.run_experiment(PAI, args)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not workdir.exists()


def test_flags_override_config_and_units_never_mix(tiny_config, tmp_path):
    parser, args = _parse(["--config", tiny_config, "--scorers", "random", "--density", "0.5"])
    cfg = pai.normalize(_config(args, ["seeds=1", "compressions=3"]))
    assert (cfg.scorers, cfg.compressions, cfg.densities, cfg.seeds) == ("random", "", "0.5", 1)
    _, args = _parse(["--config", tiny_config, "--compression", "10^1,1e2"])
    cfg = pai.normalize(_config(args))
    assert (cfg.compressions, cfg.densities) == ("10,100", "")
    assert [p.name for p in pai.parse_points(cfg.compressions, "")] == ["c10", "c100"]
    with pytest.raises(SystemExit):  # argparse: not allowed with argument --compression
        parser.parse_args(["prune-at-init", "--config", "x", "--compression", "10",
                           "--density", "0.1"])
    with pytest.raises(ValueError, match="one unit only"):
        pai.normalize(config.load(tiny_config, ["densities=0.1"]))
    help_text = parser._subparsers._group_actions[0].choices["prune-at-init"].format_help()
    assert "1/density" in help_text and ">= 1" in help_text and "PRUNABLE" in help_text
    ticket = tmp_path / "ticket.py"
    ticket.write_text("from lottery.config import base\n\ndef get_config():\n    return base()\n")
    _, args = _parse(["--config", str(ticket)])
    with pytest.raises(ValueError, match="'find-ticket' config"):
        cli.run_experiment(PAI, args)


def test_prune_examples_are_distinct_training_rows_per_seed(tiny_config):
    from lottery import data as data_lib
    cfg = config.load(tiny_config)
    d = data_lib.load("mnist1d")
    b0, b1 = pai.prune_batches(cfg, d, 0), pai.prune_batches(cfg, d, 1)
    x0 = np.asarray(b0[0][0]).reshape(100, -1)
    assert len(b0) == 1 and x0.shape[0] == 100  # 10 x 10 classes, one batch of <= 256
    rows = {r.tobytes(): i for i, r in enumerate(np.asarray(d.x_train).reshape(len(d.x_train), -1))}
    idx = [rows[r.tobytes()] for r in x0]
    assert len(set(idx)) == 100
    np.testing.assert_array_equal(np.asarray(b0[0][1]), np.asarray(d.y_train)[idx])
    assert not np.array_equal(np.asarray(b1[0][0]), np.asarray(b0[0][0]))
    cfg.prune_examples, cfg.prune_batch_size = 30, 16
    assert [len(b[1]) for b in pai.prune_batches(cfg, d, 0)] == [16, 14]


@pytest.mark.parametrize("name", ["pai_lenet300_mnist5k", "pai_cnn_mnist1d", "pai_vgg16_cifar10"])
def test_shipped_configs_validate(name):
    cfg = pai.normalize(config.load(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                 f"{name}.py")))
    points = pai.parse_points(cfg.compressions, cfg.densities)
    assert points[0].compression == 1.0 and all(p.compression >= 1 for p in points)
    assert pai.parse_rounds(cfg.rounds) == {"synflow": 100} and cfg.exclude == ""
    assert set(pai.parse_scorers(cfg.scorers)) == {"snip", "grasp", "synflow", "magnitude",
                                                   "random"}


def test_lottery_plot_draws_sweeps(run, tmp_path):
    from lottery import cli

    _, run_dir = run
    assert cli.main(["plot", run_dir, "--out", str(tmp_path / "figs")]) == 0
    (png,) = (tmp_path / "figs").glob("accuracy_vs_compression_*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------
# Sanity checks of Frankle et al. 2021: shuffle, reinit, invert.

ABLATIONS = ("shuffle", "reinit", "invert")
KERNELS = ("fc1", "fc2", "out")


def _flat_kernels(tree):
    return np.concatenate([np.asarray(tree[k]["kernel"]).ravel() for k in KERNELS])


def test_ablations_extend_the_same_run_and_leave_finished_cells_alone(run, ablated,
                                                                       tmp_path):
    base_cfg, ref_dir = run
    cfg, run_dir, before, _ = ablated
    assert os.path.basename(run_dir) == os.path.basename(ref_dir)
    old = pai.normalize(base_cfg).to_dict()
    del old["ablations"]  # the config as it was before the field existed
    before_field = config.run_hash(ml_collections.ConfigDict(old))
    assert config.run_hash(pai.normalize(cfg)) == before_field == \
        config.run_hash(pai.normalize(base_cfg))
    assert pai.normalize(cfg).ablations == "shuffle,reinit,invert"
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished cells untouched
    for scorer in SCORERS:
        for ab in ABLATIONS:
            assert rundir.is_done(os.path.join(run_dir, f"{scorer}+{ab}", "c10"))
            assert not os.path.exists(os.path.join(run_dir, f"{scorer}+{ab}", "c1"))
            rec = json.load(open(os.path.join(run_dir, f"{scorer}+{ab}", "c10", "collapse.json")))
            assert (rec["scorer"], rec["ablation"]) == (scorer, ab)
            assert rec["init_stream"] == (4 if ab == "reinit" else 0)
            assert rec["rounds"] == (4 if scorer == "synflow" else 1)
    rows = pai.summary(run_dir)
    assert [(r["label"], r["compression"]) for r in rows] == [
        (lab, c) for s in SCORERS
        for lab, cs in [(s, (1.0, 10.0, 10000.0))] + [(f"{s}+{a}", (10.0,)) for a in ABLATIONS]
        for c in cs]
    assert all(r["ablation"] == (r["label"].split("+") + [""])[1] for r in rows)
    table = pai.format_table(rows)
    assert "\nsynflow+shuffle " in table and table.count("\n") == len(rows)
    marked = pai.plot(run_dir, str(tmp_path / "p.png"))
    assert sorted(marked) == sorted((r["label"], r["compression"]) for r in rows
                                    if r["collapsed_seeds"])
    # magnitude empties a layer at c10; shuffle and reinit keep its layer counts, so they do too
    assert {("magnitude", 10.0), ("magnitude+shuffle", 10.0), ("magnitude+reinit", 10.0)} <= \
        set(marked)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shuffle_mask_permutes_each_layer_with_its_own_key():
    m = np.zeros((40, 50), bool)
    m[:5] = True  # 250 kept entries, all in the first rows
    tree = {"a": {"bias": np.ones(50, bool), "kernel": m}, "b": {"kernel": m.copy()}}
    s0 = pai.shuffle_mask(tree, pai.shuffle_key(0))
    s1 = pai.shuffle_mask(tree, pai.shuffle_key(1))
    for sh in (s0, s1):
        assert sh["a"]["bias"].all()  # not prunable: untouched
        for k in ("a", "b"):
            assert sh[k]["kernel"].sum() == 250 and sh[k]["kernel"][5:].any()
        assert not np.array_equal(sh["a"]["kernel"], sh["b"]["kernel"])  # same shape, own key
    assert not np.array_equal(s0["a"]["kernel"], s1["a"]["kernel"])  # seeds differ
    assert not np.array_equal(s0["b"]["kernel"], s1["b"]["kernel"])
    again = pai.shuffle_mask(tree, pai.shuffle_key(0))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(s0), jax.tree.leaves(again)))


def test_shuffle_cells_keep_layer_counts_at_new_positions(ablated):
    _, run_dir, _, _ = ablated
    for seed in (0, 1):
        like = masks.init(_seed_params(seed))
        for scorer in SCORERS:
            base = _mask(run_dir, scorer, "c10", seed, like)
            sh = _mask(run_dir, f"{scorer}+shuffle", "c10", seed, like)
            assert masks.counts(sh) == masks.counts(base)
            assert all(np.all(np.asarray(sh[k]["bias"])) for k in KERNELS)
            for path, j in masks.jaccard(sh, base).items():
                kept, total = masks.counts(base)[path]
                if 0 < kept < total:
                    assert j < 0.5, (scorer, seed, path, j)  # random positions, not the scorer's
            want = pai.shuffle_mask(base, pai.shuffle_key(seed))
            assert all(np.array_equal(x, y)
                       for x, y in zip(jax.tree.leaves(sh), jax.tree.leaves(want)))
    a = _mask(run_dir, "magnitude+shuffle", "c10", 0, like)
    b = _mask(run_dir, "magnitude+shuffle", "c10", 1, like)
    assert min(masks.jaccard(a, b).values()) < 0.5


def test_reinit_cells_keep_the_mask_and_draw_a_new_init(ablated):
    _, run_dir, _, _ = ablated
    for seed in (0, 1):
        like = masks.init(_seed_params(seed))
        for scorer in SCORERS:
            a = _mask(run_dir, scorer, "c10", seed, like)
            b = _mask(run_dir, f"{scorer}+reinit", "c10", seed, like)
            assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                            jax.tree.leaves(b)))
        fresh, orig = _flat_kernels(_reinit_params(seed)), _flat_kernels(_seed_params(seed))
        assert np.mean(fresh == orig) < 1e-3 and np.std(fresh) == pytest.approx(np.std(orig),
                                                                                 rel=0.05)


def test_invert_magnitude_keeps_the_smallest_weights(ablated):
    _, run_dir, _, _ = ablated
    kept = int(np.floor(PRUNABLE / 10 + 0.5))  # round-half-up(N / compression): 1500
    for seed in (0, 1):
        params = _seed_params(seed)
        flat = np.abs(_flat_kernels(params))
        want = np.zeros(PRUNABLE, bool)
        want[np.argsort(flat, kind="stable")[:kept]] = True  # smallest |w|; ties: lower index
        m = _mask(run_dir, "magnitude+invert", "c10", seed, masks.init(params))
        np.testing.assert_array_equal(_flat_kernels(m), want)
        assert flat[want].max() <= flat[~want].min()
        info = json.load(open(os.path.join(run_dir, "magnitude+invert", "c10", f"s{seed}",
                                           "info.json")))
        assert (info["kept"], info["total"]) == (kept, PRUNABLE)


def _negated(fn):
    return lambda p, m, i: jax.tree.map(lambda x: -x, fn(p, m, i))


# One function object each, so prune.iterative compiles once for both seeds.
_NEG_SNIP, _NEG_SYNFLOW = jax.jit(_negated(scorers.snip)), _negated(scorers.synflow)


def test_invert_snip_and_synflow_prune_the_negated_scores_by_their_own_procedure(ablated):
    from lottery import data as data_lib

    cfg, run_dir, _, _ = ablated
    d = data_lib.load("mnist1d")
    for seed in (0, 1):
        params = _seed_params(seed)
        inputs = scorers.Inputs.create(models.inference_fn(_MODEL, {"params": params}),
                                       pai.prune_batches(cfg, d, seed), input_shape=(1, 40, 1))
        dense = masks.init(params)
        snip_inv = prune.to_density(_NEG_SNIP(params, dense, inputs), dense, 0.1)
        syn_inv = prune.iterative(_NEG_SYNFLOW, params, dense, inputs, 0.1, rounds=4,
                                  schedule="exponential")
        syn_inv_1 = prune.iterative(_NEG_SYNFLOW, params, dense, inputs, 0.1, rounds=1)
        for label, want in (("snip+invert", snip_inv), ("synflow+invert", syn_inv)):
            got = _mask(run_dir, label, "c10", seed, dense)
            np.testing.assert_array_equal(_flat_kernels(got), _flat_kernels(want))
            base = _mask(run_dir, label.split("+")[0], "c10", seed, dense)
            assert masks.counts(got) != masks.counts(base) or \
                min(masks.jaccard(got, base).values()) < 0.5
        assert not np.array_equal(_flat_kernels(syn_inv), _flat_kernels(syn_inv_1))  # 4 rounds


def _check_starts(run_dir, starts, cells):
    """Every recorded training start is the init of its cell, unmasked values under the cell's
    own mask, and every trained (not reused) cell of `cells` [(label, point)] has one."""
    inits = {(sd, stream): jax.tree.map(np.asarray, _INIT(jax.random.fold_in(
        jax.random.key(sd), stream))) for sd in (0, 1) for stream in (0, 4)}
    like = masks.init(inits[(0, 0)])
    unmatched = list(range(len(starts)))
    trained = 0
    for label, point in cells:
        rec = json.load(open(os.path.join(run_dir, label, point, "collapse.json")))
        if rec["reused_from"] is not None:
            continue
        trained += 1
        stream = 4 if label.endswith("+reinit") else 0
        ms = [_mask(run_dir, label, point, sd, like) for sd in (0, 1)]
        want = jax.tree.map(lambda *xs: np.stack(xs), *[
            jax.tree.map(lambda p, m: np.where(m, p, 0.0), inits[(sd, stream)], m)
            for sd, m in zip((0, 1), ms)])
        hits = [i for i in unmatched
                if all(np.array_equal(x, np.stack([y, z])) for x, y, z in zip(
                    jax.tree.leaves(starts[i][1]), jax.tree.leaves(ms[0]),
                    jax.tree.leaves(ms[1])))
                and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(starts[i][0]),
                                                             jax.tree.leaves(want)))]
        assert hits, f"{label} {point}: no training started from its init under its mask"
        unmatched.remove(hits[0])
        params, mask = starts[hits[0]]
        for k in KERNELS:  # the kept weights are the init's values, never a zeroed product
            kept = np.asarray(params[k]["kernel"])[np.asarray(mask[k]["kernel"])]
            assert np.all(kept != 0)
    assert not unmatched and trained == len(starts)


def test_every_cell_starts_from_its_init_under_its_own_mask(run, ablated):
    _, ref_dir = run
    _, run_dir, _, starts = ablated
    _check_starts(ref_dir, _BASE_STARTS, [(s, p) for s in SCORERS for p in POINTS])
    _check_starts(run_dir, starts, [(f"{s}+{a}", "c10") for s in SCORERS for a in ABLATIONS])
    assert len(_BASE_STARTS) == 7  # c1 once (shared), c10 and c10000 per scorer
    assert len(starts) == 9


def test_bad_ablation_is_one_line_before_any_work(tiny_config, tmp_path):
    for flags, message in ((["--ablations", "shuffle,flip"], "unknown ablation 'flip'"),
                           (["--ablations", "invert,invert"], "'invert' is given twice")):
        workdir = tmp_path / "never"
        _, args = _parse(["--config", tiny_config, "--workdir", str(workdir), *flags])
        with pytest.raises(ValueError) as e:
            cli.run_experiment(PAI, args)
        assert message in str(e.value) and "\n" not in str(e.value)
        assert not workdir.exists()
    _, args = _parse(["--config", tiny_config, "--ablations", "reinit"])
    assert pai.normalize(_config(args)).ablations == "reinit"
    assert pai.cells(pai.normalize(_config(args, ["scorers=random,snip"]))) == [
        ("random", None), ("snip", None), ("snip", "reinit")]


def test_prune_at_init_follows_the_synflow_count_rule():
    """count_rule='synflow': prune int((1 - d) * N) weights and every weight tied with the last
    of them (the reference's kthvalue threshold); the default rule keeps round(d * N)."""
    from lottery import masks as masks_lib, pai as pai_lib

    params = {"fc": {"kernel": np.array([[3.0, 1.0], [1.0, 1.0], [2.0, 1.0]], np.float32)}}
    rates = masks_lib.prunable(params)
    # d = 0.5, N = 6: synflow prunes int(3.0) = 3, threshold 1.0 -> all four 1s pruned
    got = pai_lib.prune_at_init("magnitude", params, None, 0.5, rates=rates, count_rule="synflow")
    assert np.asarray(got["fc"]["kernel"]).tolist() == [[True, False], [False, False],
                                                         [True, False]]
    exact = pai_lib.prune_at_init("magnitude", params, None, 0.5, rates=rates)
    assert np.asarray(exact["fc"]["kernel"]).sum() == 3
