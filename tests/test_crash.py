"""A kill between any two writes of a run leaves a run directory that the next run completes,
bit-identical to a run that was never interrupted.

The writes of a tiny find-ticket run (levels 0-2, rewind to iteration 20, controls reinit and
random_prune on level 2, an in-level checkpoint at every evaluation) are counted by wrapping the
write primitives: `rundir.write_json` (config.json, info.json, DONE), `rundir.append_metrics`,
`rundir.truncate_metrics`, `rundir.rmtree`, `checkpoints.save`, and, when called from lottery's
own modules, `os.replace` (a JSON file's temporary renamed into place), `os.rename` (a finished
checkpoint renamed into place; a directory renamed out of the way before it is deleted) and
`shutil.rmtree` (that directory deleted). A call that would change nothing (deleting what is not
there) is not a write. The uninterrupted reference run has 72 writes of 29 kinds-and-places.

A kill just before write N leaves on disk exactly what the reference run had written before it:
the reference run copies its work directory before every write, and for every N (but level 1's
15, which are level 2's writes at the same places: 57 of 72) a copy of that state is run again,
unpatched, to the end and every file compared with the reference (the same
files and directories, plain files byte for byte, every checkpoint (init, rewind, masks, finals,
control masks) by its per-array SHA-256 checksums). That a copy is what a kill leaves is checked
at two N (one in level 0's training, one in the controls') by real in-process kills: `Crash`, a
BaseException nothing catches, raised in place of write N, leaves exactly the copy's files, and
resuming from it gives the reference. `os.fsync` is a no-op here: a killed process loses
nothing it wrote (the OS still holds it), so syncing only costs time.
"""

import os
import re
import shutil
import sys

import pytest
from _tiny_run import write_config

from lottery import checkpoints, config, experiment, imp, rundir


class Crash(BaseException):
    """The simulated kill: not an Exception, so no handler of the run catches it."""


FIELDS = dict(training_steps="60it", eval_every="20it", levels=2, rewind="iteration",
              rewind_step="20it", controls="reinit,random_prune", control_levels="2",
              control_seeds=1, checkpoint_seconds=0.0)


class Writes:
    """Wraps the write primitives; counts and labels the writes, copies `root` to
    `snapshots/<N>` before write N, raises Crash in place of write `crash_at`."""

    def __init__(self, monkeypatch, root: str, crash_at: int | None = None,
                 snapshots: str | None = None):
        self.root, self.crash_at, self.snapshots, self.labels = root, crash_at, snapshots, []
        self.copytree = shutil.copytree
        for mod, name in ((rundir, "write_json"), (rundir, "append_metrics"),
                          (rundir, "truncate_metrics"), (rundir, "rmtree"),
                          (checkpoints, "save")):
            monkeypatch.setattr(mod, name, self._wrap(f"{mod.__name__[8:]}.{name}",
                                                      getattr(mod, name)))
        for mod, name in ((os, "replace"), (os, "rename"), (shutil, "rmtree")):
            monkeypatch.setattr(mod, name, self._wrap(f"{mod.__name__}.{name}",
                                                      getattr(mod, name), ours_only=True))

    def _wrap(self, kind, fn, ours_only=False):
        def wrapper(path, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if (not ours_only or caller.startswith("lottery")) and self._changes(kind, path):
                self.labels.append(f"{kind} {self._where(path)}")
                if self.snapshots is not None:
                    self.copytree(self.root, os.path.join(self.snapshots, str(len(self.labels))))
                if len(self.labels) == self.crash_at:
                    raise Crash(self.labels[-1])
            return fn(path, *args, **kwargs)

        return wrapper

    @staticmethod
    def _changes(kind, path):
        if kind in ("rundir.rmtree", "rundir.truncate_metrics"):
            return os.path.lexists(path) or os.path.lexists(path + ".deleting")
        if kind in ("shutil.rmtree", "os.rename"):
            return os.path.lexists(path)
        return True

    def _where(self, path):
        rel = os.path.relpath(os.path.abspath(path), self.root)
        rel = re.sub(r"^[^/]*/", "", rel)  # the run directory's name
        return re.sub(r"checkpoint/\d+", "checkpoint/<step>", rel)


_SETUPS = {}


def _run(cfg_path, workdir):
    """find_ticket in this process, with one `Setup` per config (its trainer is what compiled
    programs are cached by: every run after the first reuses them, as a new process would
    recompile the same ones)."""
    cfg = config.load(cfg_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        mp.setattr(imp, "Setup", lambda c: _SETUPS.setdefault(
            config.run_name(c), experiment.Setup(c)))
        return imp.find_ticket(cfg, workdir)


def _snapshot(run_dir):
    """{relative path: content}: plain files' bytes, each checkpoint's checksums (the SHA-256 of
    every array, its dtype and shape), every other directory as None (so leftovers show)."""
    out = {}
    for root, dirs, files in os.walk(run_dir):
        rel = os.path.relpath(root, run_dir)
        if checkpoints.exists(root):
            with open(os.path.join(root, checkpoints.CHECKSUMS), "rb") as f:
                out[rel] = f.read()
            dirs[:] = []
            continue
        out[rel] = None
        for f in files:
            if f != rundir.LOCK:
                with open(os.path.join(root, f), "rb") as fh:
                    out[os.path.join(rel, f)] = fh.read()
    return out


def _only_run(workdir):
    (name,) = [d for d in os.listdir(workdir) if os.path.isdir(os.path.join(workdir, d))]
    return os.path.join(workdir, name)


def _check_equal(got, want, what):
    assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want)))
    for k in want:
        assert got[k] == want[k], (what, k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The config, the uninterrupted run's snapshot, its labelled writes and the copies of its
    work directory before each write."""
    root = tmp_path_factory.mktemp("crash")
    cfg_path = write_config(root / "tiny.py", **FIELDS)
    snaps = str(root / "before")
    with pytest.MonkeyPatch.context() as mp:
        writes = Writes(mp, str(root / "ref"), snapshots=snaps)
        run_dir = _run(cfg_path, str(root / "ref"))
    return cfg_path, _snapshot(run_dir), writes.labels, snaps


def test_a_kill_before_any_write_resumes_bit_identical(reference, tmp_path):
    cfg_path, want, labels, snaps = reference
    kinds = {lb.split()[0] for lb in labels}
    assert kinds == {"rundir.write_json", "rundir.append_metrics", "rundir.rmtree",
                     "checkpoints.save", "os.replace", "os.rename", "shutil.rmtree"}, kinds
    chosen = [n for n in range(1, len(labels) + 1) if "level_1/" not in labels[n - 1]]
    assert {labels[n - 1] for n in chosen} >= {lb.replace("level_1/", "level_2/") for lb in labels}
    for n in chosen:
        work = str(tmp_path / f"n{n}")
        shutil.copytree(os.path.join(snaps, str(n)), work)
        _check_equal(_snapshot(_run(cfg_path, work)), want, (n, labels[n - 1]))
        shutil.rmtree(work)


@pytest.mark.parametrize("where", ["level_0/checkpoint/<step>.partial",
                                   "level_2/controls/reinit_s0/metrics.jsonl"])
def test_a_real_kill_leaves_what_the_copy_holds(reference, tmp_path, where):
    cfg_path, want, labels, snaps = reference
    n = labels.index(next(lb for lb in labels if lb.endswith(where))) + 2  # the write after it: a kill just after it
    work = str(tmp_path / "w")
    with pytest.MonkeyPatch.context() as mp:
        Writes(mp, work, crash_at=n)
        with pytest.raises(Crash):
            _run(cfg_path, work)
    _check_equal(_snapshot(_only_run(work)), _snapshot(_only_run(os.path.join(snaps, str(n)))),
                 ("killed", n))
    _check_equal(_snapshot(_run(cfg_path, work)), want, ("resumed", n))
