"""Seeds as replicas (issue #14, item 1): `seeds` = K runs K seeds' IMP trajectories as one
program and writes K run directories, each exactly the one its seed alone writes.

The reference is one 2-seed find-ticket run (seeds 1 and 2; test_crash's tiny recipe: levels 0-2,
rewind to iteration 20, controls on level 2, an in-level checkpoint at every evaluation) with
the 'sequential' replica strategy, whose replicas run the single-ticket compiled program: its two
directories must equal, file for file and checkpoint checksum for checkpoint checksum, those of
two single-seed runs made from fresh `Setup`s (so `Setup.with_seed` is checked too). With 'vmap'
they agree up to float32 rounding (tolerances below). Kills are injected as in test_crash.py:
the reference run copies its work directory just before chosen writes (a kill there leaves
exactly that copy), and each copy, run again, must end bit-identical to the reference.
"""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from _tiny_run import write_config
from test_crash import FIELDS, Writes, _check_equal, _snapshot

import lottery.train
from lottery import checkpoints, cli, config, experiment, gradual, imp, masks, pai, rundir

pytestmark = pytest.mark.usefixtures("fast_compile")

SEEDS = (1, 2)  # seed=1, seeds=2: not starting at 0, so the offset is checked too
SEQUENTIAL = dict(FIELDS, replica_strategy="sequential")

# Just before these writes the reference run's work directory is copied (a kill there):
KILLS = {
    "mid-level, seed 1's checkpoint saved, seed 2's not":
        "checkpoints.save s2/level_1/checkpoint/<step>",
    "seed 1's level finished, seed 2's final/ not yet written":
        "checkpoints.save s2/level_1/final",
    "controls: seed 1's checkpoint saved, seed 2's not":
        "checkpoints.save s2/level_2/controls/checkpoint/<step>",
    "controls: seed 1's done, seed 2's masks written, its DONE not":
        "rundir.write_json s2/level_2/controls/DONE",
}


class SeedWrites(Writes):
    """test_crash's write counter, with writes labelled by seed (s<k>/...) and the work directory
    copied only before the first write of each label in `copy_before`."""

    def __init__(self, monkeypatch, root, names, copy_before=(), snapshots=None):
        self.names, self.copy_before, self.copies = names, set(copy_before), {}
        super().__init__(monkeypatch, root)
        self.snapshots_dir = snapshots

    def _where(self, path):
        rel = os.path.relpath(os.path.abspath(path), self.root)
        head, _, rest = rel.partition("/")
        rest = re.sub(r"checkpoint/[0-9]+", "checkpoint/<step>", rest)
        return f"{self.names.get(head, head)}/{rest}"

    def _wrap(self, kind, fn, ours_only=False):
        inner = super()._wrap(kind, fn, ours_only)
        if ours_only:  # os and shutil: never a write to copy before (and the caller must stay)
            return inner

        def wrapper(path, *args, **kwargs):
            label = f"{kind} {self._where(path)}"
            if label in self.copy_before and label not in self.copies:
                dest = os.path.join(self.snapshots_dir, str(len(self.copies)))
                self.copytree(self.root, dest)
                self.copies[label] = dest
            return inner(path, *args, **kwargs)

        return wrapper


_SETUPS = {}


def _setup(c):
    """The runs of one config (any seed) share one `Setup`'s trainer, by which compiled programs
    are cached: the first seed's is made, the others are its `with_seed`."""
    key = json.dumps({k: v for k, v in c.to_dict().items() if k != "seed"}, sort_keys=True)
    if key not in _SETUPS:
        _SETUPS[key] = experiment.Setup(c)
    first = _SETUPS[key]
    return first if first.cfg.seed == c.seed else first.with_seed(c.seed)


def _run(cfg, workdir, module=imp, run=imp.find_ticket):
    """`run` (of `module`) in this process, without fsync, with cached Setups."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        mp.setattr(module, "Setup", _setup)
        return run(cfg, workdir)


def _cfg(path, **fields):
    cfg = config.load(path)
    for k, v in fields.items():
        cfg[k] = v
    return cfg


def _names(cfg):
    """{run directory name: 's<seed>'} for the seeds of `cfg`."""
    return {config.run_name(c): f"s{c.seed}" for c in experiment.seed_configs(cfg)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 2-seed sequential run: config path, run dirs, {seed: snapshot}, labels, copies
    before the KILLS, and what `lottery.train.train` was called with."""
    root = tmp_path_factory.mktemp("seeds")
    path = write_config(root / "tiny.py", **SEQUENTIAL, seed=SEEDS[0])
    cfg = _cfg(path, seeds=len(SEEDS))
    calls, real = [], lottery.train.train

    def spy(trainer, state, mask, data, **kw):
        calls.append((kw.get("replicas", False), np.shape(state.step), kw["num_steps"]))
        return real(trainer, state, mask, data, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lottery.train, "train", spy)
        writes = SeedWrites(mp, str(root / "ref"), _names(cfg), KILLS.values(),
                            str(root / "copies"))
        run_dirs = _run(cfg, str(root / "ref"))
    snaps = {seed: _snapshot(d) for seed, d in zip(SEEDS, run_dirs)}
    return path, run_dirs, snaps, writes.labels, writes.copies, calls


def test_seed_dirs_are_the_single_seed_dirs_bitwise_with_sequential(reference, tmp_path):
    path, run_dirs, snaps, labels, _, calls = reference
    # one program per level: both seeds as replicas (levels: 2, controls: 2 seeds x 2 controls)
    assert calls == [(True, (2,), 60)] * 3 + [(True, (4,), 60)], calls
    for seed, run_dir in zip(SEEDS, run_dirs):
        single = _cfg(path, seed=seed)
        # the second seed from a fresh Setup: the multi-seed run's came from `with_seed`
        single_dir = (_run if seed == SEEDS[0] else imp.find_ticket)(
            single, str(tmp_path / f"single{seed}"))
        assert os.path.basename(single_dir) == os.path.basename(run_dir) == config.run_name(single)
        _check_equal(snaps[seed], _snapshot(single_dir), ("seed", seed))
        saved = json.load(open(os.path.join(run_dir, rundir.CONFIG)))
        assert saved["seed"] == seed and saved["seeds"] == 0
    # each seed's directory gets the same writes
    per_seed = [sorted(lb.replace(f" s{k}/", " s/") for lb in labels if f" s{k}/" in lb)
                for k in SEEDS]
    assert per_seed[0] == per_seed[1] and len(per_seed[0]) > 50


def test_with_seed_is_the_setup_of_that_seed(reference):
    path = reference[0]
    first = experiment.Setup(_cfg(path, seed=1))
    other, fresh = first.with_seed(5), experiment.Setup(_cfg(path, seed=5))
    assert other.data is first.data and other.trainer is first.trainer
    assert other.cfg.to_dict() == fresh.cfg.to_dict()
    for a, b in zip(jax.tree.leaves((other.variables, jax.random.key_data(other.key))),
                    jax.tree.leaves((fresh.variables, jax.random.key_data(fresh.key)))):
        np.testing.assert_array_equal(a, b)


def test_vmapped_seeds_agree_with_single_runs_up_to_rounding(reference, tmp_path):
    """'vmap' batches the seeds' matmuls, which changes float32 rounding: finals agree within
    atol 1e-4, evaluations within 2 test digits (of 1,000) and rtol 1e-3 on the training loss,
    and the masks pruned from them keep the same weights (Jaccard >= 0.999 per layer)."""
    path, run_dirs, snaps = reference[:3]
    cfg = _cfg(path, seeds=len(SEEDS), replica_strategy="vmap")
    vdirs = _run(cfg, str(tmp_path))
    for vdir, rdir in zip(vdirs, run_dirs):
        assert os.path.basename(vdir) == os.path.basename(rdir)
        assert sorted(_snapshot(vdir)) == sorted(_snapshot(rdir))  # the same files
        saved = [json.load(open(os.path.join(d, rundir.CONFIG))) for d in (vdir, rdir)]
        assert saved[0] == {**saved[1], "replica_strategy": "vmap"}
        s = _setup(experiment.seed_configs(cfg)[0])
        for level in range(3):
            a = imp.level_final(s, vdir, level)
            b = imp.level_final(s, rdir, level)
            for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
                np.testing.assert_allclose(x, y, atol=1e-4)
            like = masks.init(a.params)
            ma = checkpoints.restore(os.path.join(vdir, f"level_{level}", "mask"), like)
            mb = checkpoints.restore(os.path.join(rdir, f"level_{level}", "mask"), like)
            assert min(masks.jaccard(ma, mb).values()) >= 0.999
            ra = rundir.read_metrics(os.path.join(vdir, f"level_{level}", rundir.METRICS))
            rb = rundir.read_metrics(os.path.join(rdir, f"level_{level}", rundir.METRICS))
            assert [r["step"] for r in ra] == [r["step"] for r in rb]
            for x, y in zip(ra, rb):
                assert abs(x["test_accuracy"] - y["test_accuracy"]) <= 0.002
                np.testing.assert_allclose(x["train_loss"], y["train_loss"], rtol=1e-3)


@pytest.mark.parametrize("where", list(KILLS))
def test_a_kill_resumes_bit_identical(reference, tmp_path, where):
    """A multi-seed run killed at `where` resumes (seeds at different steps in groups, one per
    step) to the uninterrupted result; a single-seed run resumes the other seed's directory."""
    path, run_dirs, snaps, _, copies, _ = reference
    copy = copies[KILLS[where]]
    work = str(tmp_path / "multi")
    shutil.copytree(copy, work)
    starts, real = [], lottery.train.train
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lottery.train, "train", lambda trainer, state, *a, **kw: (
            starts.append(np.asarray(state.step).tolist()), real(trainer, state, *a, **kw))[1])
        resumed = _run(_cfg(path, seeds=len(SEEDS)), work)
    for seed, d in zip(SEEDS, resumed):
        _check_equal(_snapshot(d), snaps[seed], (where, seed))
    if where.startswith("mid-level"):
        # level 1: seed 2 from its start (20), then seed 1 from its checkpoint (40), each alone;
        # level 2 both from 20, then their controls (2 x 2 replicas)
        assert starts == [20, 40, [20, 20], [20] * 4], starts
        # each directory resumes on its own, too
        work = str(tmp_path / "single")
        shutil.copytree(copy, work)
        d = _run(_cfg(path, seed=SEEDS[1]), work)
        _check_equal(_snapshot(d), snaps[SEEDS[1]], (where, "single"))


def test_a_multi_seed_run_resumes_a_killed_single_seed_run(reference, tmp_path):
    """Seed 1 alone, killed in level 1 after its in-level checkpoint; then both seeds in one
    command: seed 1 resumes mid-level 1 while seed 2 starts at level 0, and both end equal to the
    reference."""
    path, run_dirs, snaps = reference[:3]
    single = _cfg(path, seed=SEEDS[0])
    root = str(tmp_path / "w")
    with pytest.MonkeyPatch.context() as mp:
        writes = SeedWrites(mp, root, _names(single), ["checkpoints.save s1/level_1/final"],
                            str(tmp_path / "copies"))
        _run(single, root)
    work = writes.copies["checkpoints.save s1/level_1/final"]
    assert sorted(os.listdir(work)) == [config.run_name(single)]
    resumed = _run(_cfg(path, seeds=len(SEEDS)), work)
    for seed, d in zip(SEEDS, resumed):
        _check_equal(_snapshot(d), snaps[seed], ("resumed", seed))


def test_a_refused_lock_writes_nothing(reference, tmp_path):
    path = reference[0]
    cfg = _cfg(path, seeds=len(SEEDS))
    first, second = (os.path.join(str(tmp_path), config.run_name(c))
                     for c in experiment.seed_configs(cfg))
    with rundir.lock(second):  # another process's lock: flock refuses a second open file
        with pytest.raises(ValueError, match=f"run directory {re.escape(second)} is in use"):
            _run(cfg, str(tmp_path))
        assert not os.path.exists(first)
        assert os.listdir(second) == [rundir.LOCK]


def test_cli_prints_every_seed_dir_and_a_table_over_seeds(reference, capsys):
    """On the finished reference (nothing to train): the run directories, then mean +- std
    (population) over the seeds, computed here from the metrics files."""
    path, run_dirs = reference[:2]
    workdir = os.path.dirname(run_dirs[0])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imp, "Setup", _setup)
        assert cli.run(["find-ticket", "--config", path, f"--config.seeds={len(SEEDS)}",
                        "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    assert all(f"  {d}\n" in out for d in run_dirs)
    rows = {int(line.split()[0]): line for line in out.splitlines()
            if re.match(r"\s+\d+\s+[01]\.\d{4}\s", line)}
    assert sorted(rows) == [0, 1, 2]

    def last(p):
        return rundir.read_metrics(p)[-1]["test_accuracy"]

    for level, line in rows.items():
        ticket = [last(os.path.join(d, f"level_{level}", rundir.METRICS)) for d in run_dirs]
        cells = re.findall(r"(\d+\.\d\d) \+- +(\d+\.\d\d)", line)
        assert (float(cells[0][0]), float(cells[0][1])) == pytest.approx(
            (100 * np.mean(ticket), 100 * np.std(ticket)), abs=0.006)
        if level == 2:  # controls: over seeds x control seeds, sorted by kind
            for (mean, std), kind in zip(cells[2:], ("random_prune", "reinit")):
                accs = [last(os.path.join(d, "level_2", "controls", f"{kind}_s0",
                                          rundir.METRICS)) for d in run_dirs]
                assert (float(mean), float(std)) == pytest.approx(
                    (100 * np.mean(accs), 100 * np.std(accs)), abs=0.006)


@pytest.mark.parametrize("experiment_kind", ["oneshot", "agp"])
def test_gradual_seeds_are_the_single_seed_runs(tmp_path, experiment_kind):
    """oneshot and AGP with `seeds`: every level of both seeds trained together (AGP: the mask
    update runs inside the replicas' program), the directories bitwise those of single runs."""
    path = str(tmp_path / "g.py")
    with open(path, "w") as f:
        f.write("from lottery.gradual import base_config\n\n\ndef get_config():\n"
                f"    c = base_config({experiment_kind!r})\n"
                "    c.batch_size, c.training_steps, c.eval_every = 100, '40it', '20it'\n"
                "    c.finetune_steps, c.prune_start, c.prune_end, c.prune_every = "
                "'20it', '0it', '20it', '10it'\n"
                "    c.final_density, c.progress, c.checkpoint_seconds = 0.3, False, 0.0\n"
                "    c.replica_strategy = 'sequential'\n    return c\n")
    run = gradual.run_oneshot if experiment_kind == "oneshot" else gradual.run_agp
    multi = _run(_cfg(path, seed=3, seeds=2), str(tmp_path / "m"), module=gradual, run=run)
    for seed, d in zip((3, 4), multi):
        single = _run(_cfg(path, seed=seed), str(tmp_path / f"s{seed}"), module=gradual,
                      run=run)
        assert os.path.basename(single) == os.path.basename(d)
        _check_equal(_snapshot(d), _snapshot(single), (experiment_kind, seed))


def test_seeds_field_validation_and_hashes(reference):
    path = reference[0]
    cfg = config.load(path)
    cfg.seeds = -1
    with pytest.raises(ValueError, match=r"^seeds=-1: must be >= 0 "):
        config.validate(cfg)
    with pytest.raises(ValueError, match=r"^--config.seeds='0,1,2': expected an int$"):
        config.apply_override(config.load(path), "seeds=0,1,2")
    # left out of the hash at 0, so older runs (no such field) keep their names
    cfg = config.load(path)
    old = {k: v for k, v in cfg.to_dict().items() if k != "seeds"}
    assert config.run_hash(config.from_saved(old)) == config.run_hash(cfg)
    cfg.seed, cfg.seeds = 4, 3
    assert [c.seed for c in experiment.seed_configs(cfg)] == [4, 5, 6]
    alone = config.load(path)
    alone.seed = 5
    assert config.run_hash(experiment.seed_configs(cfg)[1]) == config.run_hash(alone)
    assert config.run_hash(cfg) != config.run_hash(alone)  # the K-seed config names no run
    # prune-at-init keeps its own count of seeds, hashed as before
    p = pai.base_config()
    assert p.seeds == 3 and config.hashed_fields(p)["seeds"] == 3
