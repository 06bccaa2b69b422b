"""Every bad input is one line on stderr, naming the thing, with exit status 2, and nothing is
written: `lottery.cli.main` in-process on a copy of the tiny run (and one subprocess, for what
only shows when the interpreter exits)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from _tiny_run import TINY, tiny_run

from lottery import checkpoints, cli, rundir, train


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A copy of the tiny finished run (levels 0-2) in its own workdir, its config file, and a
    fresh empty workdir."""
    root = tmp_path_factory.mktemp("errors")
    src = tiny_run()
    work = root / "work"
    work.mkdir()
    run = work / os.path.basename(src)
    shutil.copytree(src, run)
    config = root / "tiny.py"
    config.write_text(TINY)
    (root / "syntax.py").write_text("from lottery.config import base\n\ndef get_config(:\n"
                                    "    return base()\n")
    (root / "raises.py").write_text("from lottery.config import base\n\n\ndef get_config():\n"
                                    "    c = base()\n    c.levels = 1 / 0\n    return c\n")
    (root / "a_file").write_text("not a directory")
    fresh = root / "fresh"
    fresh.mkdir()
    return {"root": root, "run": str(run), "work": str(work), "config": str(config),
            "fresh": str(fresh)}


def _damaged_run(env, name, damage):
    """A copy of the run, in a workdir of its own, with `damage(run_dir)` applied."""
    dst = env["root"] / "damaged" / name / os.path.basename(env["run"])
    if not dst.exists():
        shutil.copytree(env["run"], dst)
        damage(str(dst))
    return str(dst)


def _cut_last_line(run_dir):
    path = os.path.join(run_dir, "level_1", "metrics.jsonl")
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text[:-20])


def _empty_metrics(run_dir):
    open(os.path.join(run_dir, "level_1", "metrics.jsonl"), "w").close()


def _bad_config_json(run_dir):
    path = os.path.join(run_dir, "config.json")
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])


def _other_model(run_dir):
    path = os.path.join(run_dir, "config.json")
    cfg = json.load(open(path))
    cfg.update(model="conv2", dataset="cifar10")
    json.dump(cfg, open(path, "w"))


# (id, argv from env, what the one line must contain, directory that must not change)
CASES = [
    ("config syntax error",
     lambda e: ["find-ticket", "--config", f"{e['root']}/syntax.py", "--workdir", e["fresh"]],
     ["{root}/syntax.py: syntax error at line 3"], "fresh"),
    ("get_config raises",
     lambda e: ["find-ticket", "--config", f"{e['root']}/raises.py", "--workdir", e["fresh"]],
     ["{root}/raises.py: get_config() failed at line 6: ZeroDivisionError"], "fresh"),
    ("data_dir is a file",
     lambda e: ["find-ticket", "--config", e["config"], f"--config.data_dir={e['root']}/a_file",
                "--workdir", e["fresh"]],
     ["data dir '{root}/a_file' is not a directory", "--config.data_dir"], "fresh"),
    ("data_dir cannot be created",
     lambda e: ["find-ticket", "--config", e["config"],
                f"--config.data_dir={e['root']}/a_file/data", "--workdir", e["fresh"]],
     ["data dir '{root}/a_file/data' cannot be created or written"], "fresh"),
    ("exclude matches nothing",
     lambda e: ["find-ticket", "--config", e["config"], "--config.exclude=outt",
                "--workdir", e["fresh"]],
     ["exclude pattern(s) ['outt'] match no prunable leaf", "out/kernel"], "fresh"),
    ("rates match nothing",
     lambda e: ["find-ticket", "--config", e["config"], "--config.rates=outt=0.5",
                "--workdir", e["fresh"]],
     ["rates pattern(s) ['outt']"], "fresh"),
    ("lr is infinite",
     lambda e: ["find-ticket", "--config", e["config"], "--config.lr=inf",
                "--workdir", e["fresh"]],
     ["lr=inf: must be a finite number > 0"], "fresh"),
    ("override grammar",
     lambda e: ["find-ticket", "--config", e["config"], "--config.levels=x",
                "--workdir", e["fresh"]],
     ["--config.levels='x': expected an int"], "fresh"),
    ("discard level -1",
     lambda e: ["find-ticket", "--config", e["config"], "--discard-level", "-1",
                "--workdir", e["work"]],
     ["--discard-level -1: expected a level in 0..2"], "work"),
    ("discard level 99",
     lambda e: ["find-ticket", "--config", e["config"], "--discard-level", "99",
                "--workdir", e["work"]],
     ["--discard-level 99: expected a level in 0..2", "{run}"], "work"),
    ("discard level of no run",
     lambda e: ["find-ticket", "--config", e["config"], "--discard-level", "0",
                "--workdir", e["fresh"]],
     ["--discard-level 0: there is no run to discard from"], "fresh"),
    ("inspect a file",
     lambda e: ["inspect", f"{e['root']}/a_file"],
     ["'{root}/a_file' is a file, not a run directory"], "root"),
    ("inspect another model's config",
     lambda e: ["inspect", _damaged_run(e, "model", _other_model)],
     ["do not match the model its config.json names (conv2 on cifar10)", "conv1/"],
     "root"),
    ("inspect cut metrics line",
     lambda e: ["inspect", _damaged_run(e, "cut", _cut_last_line)],
     ["{root}/damaged/cut/{name}/level_1/metrics.jsonl: record 2 of 2 is not valid JSON"],
     "root"),
    ("inspect empty metrics",
     lambda e: ["inspect", _damaged_run(e, "empty", _empty_metrics)],
     ["{root}/damaged/empty/{name}/level_1/metrics.jsonl has no evaluation records"], "root"),
    ("finished run, empty metrics",
     lambda e: ["find-ticket", "--config", e["config"], "--workdir",
                os.path.dirname(_damaged_run(e, "empty2", _empty_metrics))],
     ["{root}/damaged/empty2/{name}/level_1/metrics.jsonl has no evaluation records",
      "--discard-level 1"], "root"),
    ("inspect invalid config.json",
     lambda e: ["inspect", _damaged_run(e, "config", _bad_config_json)],
     ["{root}/damaged/config/{name}/config.json is not valid JSON"], "root"),
]


def _listing(path):
    return sorted((os.path.relpath(os.path.join(r, f), path), os.path.getsize(os.path.join(r, f)))
                  for r, ds, fs in os.walk(path) for f in fs + ds)


@pytest.mark.parametrize("argv, wanted, watched", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(env, capsys, argv, wanted, watched):
    args = argv(env)
    before = _listing(env[watched])
    capsys.readouterr()
    rc = cli.main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"lottery {args[0]}: error: ")
    fmt = {"root": env["root"], "run": env["run"], "name": os.path.basename(env["run"])}
    for w in wanted:
        assert w.format(**fmt) in lines[0], lines[0]
    assert _listing(env[watched]) == before


def test_cut_last_line_of_a_level_being_resumed_is_dropped(tmp_path):
    """A kill can leave the last line of metrics.jsonl half-written: resuming drops it (it is
    written again); anywhere else, or reading a finished level, it is an error naming the file."""
    path = str(tmp_path / "metrics.jsonl")
    recs = [{"step": 10, "test_accuracy": 0.5}, {"step": 20, "test_accuracy": 0.6}]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
        f.write('{"step": 30, "test_acc')
    with pytest.raises(ValueError, match=f"{path}: record 3 of 3 is not valid JSON"):
        rundir.read_metrics(path)
    assert rundir.read_metrics(path, partial_last=True) == recs
    rundir.truncate_metrics(path, 20)  # what resuming from the checkpoint at step 20 does
    assert rundir.read_metrics(path) == recs
    with open(path, "w") as f:
        f.write('{"step": 10, "test_acc\n' + json.dumps(recs[1]) + "\n")
    with pytest.raises(ValueError, match="record 1 of 2"):
        rundir.read_metrics(path, partial_last=True)  # only the last line may be cut


def test_divergence_stops_the_run_naming_level_and_step(env, tmp_path, capsys):
    work = str(tmp_path / "w")
    rc = cli.main(["find-ticket", "--config", env["config"], "--config.lr=1e30",
                   "--config.levels=1", "--workdir", work])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "level 0: training diverged by step 20" in lines[0]
    assert "learning rate is too high" in lines[0]
    (run_dir,) = os.listdir(work)
    level0 = os.path.join(work, run_dir, "level_0")
    assert not os.path.exists(os.path.join(level0, "DONE"))
    assert not os.path.exists(os.path.join(level0, "final"))
    assert not os.path.exists(os.path.join(level0, "metrics.jsonl"))  # no NaN record kept
    assert not os.path.exists(os.path.join(work, run_dir, "level_1"))  # no mask pruned from NaN


def test_divergence_of_replicas_names_the_replica():
    """train.train on 2 replicas where only replica 1 diverges (its weights are NaN)."""
    import flax.linen as nn
    import optax

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    model = Tiny()
    variables = model.init(jax.random.key(0), np.zeros((1, 8), np.float32))
    rng = np.random.default_rng(0)
    data = type("D", (), dict(x_train=rng.normal(size=(40, 8)).astype(np.float32),
                              y_train=rng.integers(0, 10, 40).astype(np.int32),
                              x_test=np.zeros((10, 8), np.float32), y_test=np.zeros(10, np.int32)))
    tx = optax.sgd(0.1)
    trainer = train.Trainer(model, tx, 20, loop="steps")
    states = [train.init_state(variables, tx, jax.random.key(i)) for i in range(2)]
    states[1] = states[1].replace(params=jax.tree.map(lambda p: p + np.nan, states[1].params))
    mask = jax.tree.map(lambda p: np.ones(p.shape, bool), variables["params"])
    state, masks_ = train.stack(states), train.stack([mask, mask])
    with pytest.raises(train.DivergenceError, match=r"by step 2 \(replica 1\)") as e:
        train.train(trainer, state, masks_, data, num_steps=4, replicas=True, progress=False)
    assert e.value.replica == 1 and e.value.step == 2 and "\n" not in str(e.value)
    out, hist = train.train(trainer, state, masks_, data, num_steps=4, replicas=True,
                            progress=False, check_finite=False)  # the option turns it off
    assert len(hist) == 2 and np.isnan(hist[-1]["train_loss"][1])


def test_never_prunes_from_non_finite_weights(env, tmp_path, capsys):
    """A finished level whose final weights are NaN (as an older version saved a diverged level)
    stops the run before the next level's mask is computed."""
    work = tmp_path / "w"
    run = work / os.path.basename(env["run"])
    shutil.copytree(env["run"], run)
    final = str(run / "level_2" / "final")
    state = checkpoints.restore(final)
    state["params"] = jax.tree.map(lambda p: np.full_like(p, np.nan), state["params"])
    shutil.rmtree(final)
    checkpoints.save(final, state)
    rc = cli.main(["find-ticket", "--config", env["config"], "--config.levels=3",
                   "--workdir", str(work)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "level 2: its final weights are not finite" in err and "--discard-level 2" in err
    assert not (run / "level_3").exists()


def test_truncated_checkpoint_is_one_line_without_event_loop_noise(env):
    """Orbax's failed concurrent reads used to print 'RuntimeError: Event loop is closed'
    tracebacks after the error; a subprocess shows what is printed up to interpreter exit."""
    run = _damaged_run(env, "truncated", lambda d: [
        os.truncate(os.path.join(r, f), 10)
        for r, _, fs in os.walk(os.path.join(d, "level_0", "final")) for f in fs
        if os.path.getsize(os.path.join(r, f)) > 5000])
    out = subprocess.run([sys.executable, "-m", "lottery.cli", "inspect", run, "--level", "0"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert os.path.join(run, "level_0", "final") in lines[0] and "Traceback" not in out.stderr
