"""One-shot prune + fine-tune and AGP: schedule counts, no revival, resume, masks, bad input."""

import json
import os

import jax
import numpy as np
import pytest

from lottery import checkpoints, cli, config, experiment, gradual, imp, masks, rundir, runs
from lottery import train

AGP = '''
from lottery.gradual import base_config


def get_config():
    c = base_config("agp")
    c.dataset = "mnist5k"
    c.model = "lenet300_100"
    c.batch_size = 100          # 40 steps per epoch
    c.training_steps = "90it"
    c.eval_every = "15it"
    c.final_density = 0.1
    c.prune_start = "10it"
    c.prune_end = "70it"
    c.prune_every = "7it"       # events 10, 17, ..., 66 and 70
    c.progress = False
    c.checkpoint_seconds = 0.0
    return c
'''

ONESHOT = '''
from lottery.gradual import base_config


def get_config():
    c = base_config("oneshot")
    c.dataset = "mnist5k"
    c.model = "lenet300_100"
    c.batch_size = 100
    c.training_steps = "40it"
    c.finetune_steps = "30it"
    c.finetune_lr = 0.05
    c.eval_every = "10it"
    c.final_density = 0.1
    c.progress = False
    c.checkpoint_seconds = 0.0
    return c
'''

EVENTS = [10, 17, 24, 31, 38, 45, 52, 59, 66, 70]


def agp_density(t, d_f=0.1, t0=10, t1=70):
    """Zhu & Gupta's cubic schedule, written independently in numpy float64."""
    p = np.clip((t - t0) / (t1 - t0), 0.0, 1.0)
    return d_f + (1.0 - d_f) * (1.0 - p) ** 3


def expected_kept(step, n):
    """Kept weights after `step` steps: the count of the last event before that step."""
    done = [t for t in EVENTS if t < step]
    return n if not done else int(np.floor(agp_density(done[-1]) * n + 0.5))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def trees_equal(a, b):
    la, lb = leaves(a), leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("configs")
    (d / "agp.py").write_text(AGP)
    (d / "oneshot.py").write_text(ONESHOT)
    return str(d / "agp.py"), str(d / "oneshot.py")


@pytest.fixture(scope="module")
def agp_run(configs, tmp_path_factory):
    cfg = config.load(configs[0])
    return cfg, gradual.run_agp(cfg, str(tmp_path_factory.mktemp("agp")))


@pytest.fixture(scope="module")
def oneshot_run(configs, tmp_path_factory):
    cfg = config.load(configs[1])
    return cfg, gradual.run_oneshot(cfg, str(tmp_path_factory.mktemp("oneshot")))


def test_schedule_counts_follow_the_agp_formula():
    params = {"a": {"kernel": np.zeros((30, 20))}, "b": {"kernel": np.zeros((20, 7))},
              "b2": {"bias": np.zeros(7)}}
    mask = masks.init(params)
    n = [600, 140]
    sch = gradual.agp_schedule(mask, None, final_density=0.1, start=10, end=70, every=7)
    assert sch.steps.tolist() == EVENTS
    want = [int(np.floor(agp_density(t) * sum(n) + 0.5)) for t in EVENTS]
    assert sch.counts[:, 0].tolist() == want
    assert want[0] == sum(n) and want[-1] == 74  # dense at the start, 0.1 * 740 at the end
    lw = gradual.agp_schedule(mask, None, final_density=0.1, start=10, end=70, every=7,
                              scope="layerwise")
    assert lw.counts.tolist() == [[int(np.floor(agp_density(t) * k + 0.5)) for k in n]
                                  for t in EVENTS]
    assert gradual.prune_steps(0, 10, 5) == [0, 5, 10]


@pytest.fixture(scope="module")
def agp_setup(agp_run):
    return experiment.Setup(agp_run[0])


@pytest.mark.parametrize("loop", ["scan", "steps"])
def test_agp_every_step_density_and_no_revival(agp_run, agp_setup, loop):
    """AGP as a mask update of `train.train`, pausing after every step (eval_every=1): the kept
    count after every step is the formula's, masks only shrink, pruned weights are exactly 0.0;
    and the result equals the run directory's (bit for bit for the same scanned epochs paused
    elsewhere, allclose for per-step jit)."""
    _, run_dir = agp_run
    s = agp_setup
    n = 784 * 300 + 300 * 100  # 'out' is excluded
    init = checkpoints.restore(os.path.join(run_dir, "init"), s.variables)
    state = s.fresh_state(init)
    mask = masks.init(state.params)
    sch = gradual.agp_schedule(mask, s.rates, final_density=0.1, start=10, end=70, every=7)
    prev = [mask]

    def check(st, m, record):
        assert masks.density(m, s.rates) == expected_kept(record["step"], n) / n, record["step"]
        assert sum(k for k, _ in masks.counts(m, s.rates).values()) == \
            expected_kept(record["step"], n)
        for a, b in zip(leaves(m), leaves(prev[0])):
            assert not np.any(a & ~b)  # never revived
        for w, mk in zip(leaves(st.params), leaves(m)):
            assert np.all(w[~mk] == 0.0)
        assert np.all(np.asarray(m["out"]["kernel"]))  # excluded layer untouched
        prev[0] = m

    state, mask, hist = train.train(s.trainer._replace(loop=loop), state, mask, s.data,
                                    num_steps=90, eval_every=1, callback=check, progress=False,
                                    mask_update=gradual.agp_update(sch, mask, s.rates))
    assert [r["step"] for r in hist] == list(range(1, 91))
    final = checkpoints.restore(os.path.join(run_dir, "level_0", "final"), s.template())
    saved_mask = checkpoints.restore(os.path.join(run_dir, "level_0", "mask"), mask)
    if loop == "scan":
        assert trees_equal(saved_mask, mask) and trees_equal(final, state)
    else:
        assert trees_equal(saved_mask, mask)
        for a, b in zip(leaves(final.params), leaves(state.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_agp_run_directory(agp_run):
    cfg, run_dir = agp_run
    assert os.path.basename(run_dir).startswith("agp_lenet300_100_mnist5k_")
    ldir = os.path.join(run_dir, "level_0")
    assert sorted(os.listdir(ldir)) == ["DONE", "final", "info.json", "mask", "metrics.jsonl"]
    recs = rundir.read_metrics(os.path.join(ldir, "metrics.jsonl"))
    assert [r["step"] for r in recs] == [15, 30, 45, 60, 75, 90]
    n = 784 * 300 + 300 * 100  # 'out' is excluded
    for r in recs:
        assert r["density"] == expected_kept(r["step"], n) / n
        assert set(r) == {"step", "density", "train_loss", "test_loss", "test_accuracy"}
    with open(os.path.join(ldir, "info.json")) as f:
        info = json.load(f)
    assert info["kept"] == round(0.1 * n) and info["total"] == n
    assert info["layers"]["fc1/kernel"]["total"] == 784 * 300
    assert sum(v["kept"] for v in info["layers"].values()) == info["kept"]
    row = runs.Run(run_dir).level_info(0)  # what `lottery inspect` shows
    assert row["density"] == info["density"] and row["final_step"] == 90
    assert gradual.describe(cfg) == ("AGP by global magnitude: density 1 -> 0.1 (cubic) from "
                                     "10it to 70it, a new mask every 7it; 90it in all")


class Interrupt(Exception):
    pass


def test_resume_mid_schedule_equals_uninterrupted(configs, agp_run, tmp_path):
    _, ref_dir = agp_run
    cfg = config.load(configs[0])
    seen = []

    def kill_at_45(state, mask, record):
        seen.append(record["step"])
        if record["step"] == 45:  # mid-epoch (40 per epoch), events 45..70 still to come
            raise Interrupt

    with pytest.raises(Interrupt):
        gradual.run_agp(cfg, str(tmp_path), callback=kill_at_45)
    run_dir = os.path.join(str(tmp_path), os.path.basename(ref_dir))
    ldir = os.path.join(run_dir, "level_0")
    assert not os.path.exists(os.path.join(ldir, "DONE"))
    assert os.listdir(os.path.join(ldir, "checkpoint")) == ["45"]
    assert gradual.run_agp(cfg, str(tmp_path), callback=lambda st, m, r: seen.append(r["step"])) \
        == run_dir
    assert seen == [15, 30, 40, 45, 60, 75, 80, 90]  # resumed at 45, not from the start
    for name in ("metrics.jsonl", "info.json"):
        with open(os.path.join(ref_dir, "level_0", name)) as a, \
                open(os.path.join(ldir, name)) as b:
            assert a.read() == b.read()
    for name in ("final", "mask"):
        assert trees_equal(checkpoints.restore(os.path.join(ref_dir, "level_0", name)),
                           checkpoints.restore(os.path.join(ldir, name)))


def restore(run_dir, level, name):
    return checkpoints.restore(os.path.join(run_dir, f"level_{level}", name))


def test_oneshot_global_magnitude(oneshot_run):
    cfg, run_dir = oneshot_run
    final0, mask1 = restore(run_dir, 0, "final"), restore(run_dir, 1, "mask")
    # independent: the top round(0.1 * N) |w| of fc1 and fc2 together ('out' is excluded)
    w = np.concatenate([np.abs(final0["params"][k]["kernel"]).ravel() for k in ("fc1", "fc2")])
    m = np.concatenate([np.asarray(mask1[k]["kernel"], bool).ravel() for k in ("fc1", "fc2")])
    assert m.sum() == int(np.floor(0.1 * w.size + 0.5))
    assert w[m].min() >= w[~m].max()
    assert np.all(mask1["out"]["kernel"])
    final1 = restore(run_dir, 1, "final")
    assert int(final1["step"]) == 30  # fine-tuning counts its own steps
    for p, mk in zip(leaves(final1["params"]), leaves(mask1)):
        assert np.all(p[~mk.astype(bool)] == 0.0)
    tuned = np.concatenate([np.abs(final1["params"][k]["kernel"]).ravel() for k in ("fc1", "fc2")])
    assert not np.allclose(tuned[m], w[m])  # it did fine-tune the survivors
    rows = imp.summary(run_dir)
    assert [r["level"] for r in rows] == [0, 1]
    assert rows[0]["density"] == 1.0 and rows[1]["kept"] == m.sum()
    assert [r["step"] for r in rundir.read_metrics(os.path.join(run_dir, "level_1",
                                                             "metrics.jsonl"))] == [10, 20, 30]
    assert runs.Run(run_dir).levels == [0, 1]  # what `lottery inspect` lists
    assert gradual.describe(cfg) == ("train 40it, prune once to density 0.1 by global magnitude, "
                                     "fine-tune 30it at lr 0.05")


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_oneshot_mask_structured_layerwise(oneshot_run, norm):
    _, run_dir = oneshot_run
    params = restore(run_dir, 0, "final")["params"]
    rates = masks.prunable(params, exclude="out")
    mask = gradual.oneshot_mask(params, masks.init(params), None, density=0.1,
                                scope="layerwise", structure="units", unit_norm=norm,
                                rates=rates)
    for k, units in (("fc1", 300), ("fc2", 100)):
        col = np.asarray(mask[k]["kernel"])
        kept = col.all(axis=0)
        assert np.array_equal(kept, col.any(axis=0))  # whole units
        assert kept.sum() == int(np.floor(0.1 * units + 0.5))
        norms = np.linalg.norm(params[k]["kernel"], ord=1 if norm == "l1" else 2, axis=0)
        assert norms[kept].min() >= norms[~kept].max()
    assert np.all(np.asarray(mask["out"]["kernel"]))


def run_cli(command, path, workdir, *extra):
    """`lottery <command> --config path --workdir workdir *extra` (errors propagate)."""
    return cli.run([command, "--config", path, "--workdir", str(workdir), *extra])


@pytest.mark.parametrize("which, override, message", [
    (0, "prune_start=70it", "prune_start='70it' must be before prune_end='70it'"),
    (0, "prune_start=2ep", "prune_start='2ep' must be before prune_end='70it' (80 vs 70"),
    (0, "prune_end=90it", "prune_end='90it' (90 iterations) must be before the end of training"),
    (0, "final_density=0.0", "final_density=0.0: must be in (0, 1]"),
    (1, "final_density=1.5", "final_density=1.5: must be in (0, 1]"),
    (0, "prune_every=0it", "prune_every='0it': must be > 0"),
    (0, "scorer=snip", "scorer='snip': AGP prunes by magnitude"),
    (1, "structure=channels", "structure='channels': expected one of weights, units"),
    (0, "seed=0 --discard-level 1",
     "--discard-level 1: expected a level of an experiment='agp' run: 0"),
])
def test_bad_input_is_one_line_before_any_work(configs, tmp_path, which, override, message):
    command = ("agp", "oneshot")[which]
    with pytest.raises(ValueError) as e:
        run_cli(command, configs[which], tmp_path / "w", *override.split()[1:],
                f"--config.{override.split()[0]}")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not list((tmp_path / "w").glob("*")), "nothing may be written"


def test_cli_handler_reopens_finished_run(configs, agp_run, capsys):
    cfg, run_dir = agp_run
    final = os.path.join(run_dir, "level_0", "final")
    before = os.path.getmtime(final)
    assert run_cli("agp", configs[0], os.path.dirname(run_dir)) == 0
    out = capsys.readouterr().out
    assert run_dir in out and "0.1000" in out
    assert os.path.getmtime(final) == before  # nothing retrained
    with pytest.raises(ValueError, match="is a 'oneshot' config; `lottery agp` needs"):
        run_cli("agp", configs[1], os.path.dirname(run_dir))


def test_inspect_and_plot_work_on_agp_and_oneshot_runs(agp_run, oneshot_run, tmp_path, capsys):
    from lottery import cli

    for _, run_dir in (agp_run, oneshot_run):
        assert cli.main(["inspect", run_dir]) == 0
        out = capsys.readouterr().out
        assert "density" in out and "rewind init, global magnitude" not in out
        figs = tmp_path / os.path.basename(run_dir)
        assert cli.main(["plot", run_dir, "--out", str(figs)]) == 0
        assert (figs / "accuracy_vs_density.png").stat().st_size > 10_000


def test_count_rule_reaches_the_oneshot_mask_and_agp_refuses_reference_rules():
    """oneshot with count_rule='synflow' prunes int((1 - d) * N) weights and every weight tied
    with the last of them; AGP has no reference rule to follow."""
    from lottery import gradual, masks

    params = {"a": {"kernel": np.array([[1.0, 2.0], [2.0, 2.0]], np.float32)},
              "out": {"kernel": np.ones((2, 2), np.float32)}}
    rates = masks.prunable(params, exclude=["out"])
    mask = masks.init(params)
    # d = 0.5 of N = 4: synflow prunes int(0.5 * 4) = 2 -> threshold 2.0, all three 2s go too
    got = gradual.oneshot_mask(params, mask, None, density=0.5, rates=rates, count_rule="synflow")
    assert np.asarray(got["a"]["kernel"]).sum() == 0
    exact = gradual.oneshot_mask(params, mask, None, density=0.5, rates=rates)
    assert np.asarray(exact["a"]["kernel"]).sum() == 2  # round-half-up(0.5 * 4), index ties
    cfg = gradual.base_config("agp")
    cfg.count_rule = "openlth"
    with pytest.raises(ValueError, match="count_rule='openlth'.*expected 'exact'"):
        gradual.validate(cfg)
