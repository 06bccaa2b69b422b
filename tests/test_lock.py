"""One writer per run directory: a second process on a run directory in use is refused with one
line and writes nothing; a killed holder's lock never blocks the next run."""

import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from _tiny_run import write_config

from lottery import checkpoints, cli, config, imp, rundir


def _listing(path):
    """Every file and directory under `path` with its size, and the lock file's bytes."""
    out = sorted((os.path.relpath(os.path.join(r, f), path), os.path.getsize(os.path.join(r, f)))
                 for r, ds, fs in os.walk(path) for f in fs + ds)
    lock = os.path.join(path, rundir.LOCK)
    return out, open(lock, "rb").read() if os.path.exists(lock) else None


def _trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _holder(run_dir):
    """A process that takes the run lock through `rundir.lock` and sleeps holding it."""
    code = ("import sys, time\nfrom lottery import rundir\n"
            "with rundir.lock(sys.argv[1]):\n    print('locked', flush=True)\n"
            "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, run_dir], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_and_a_killed_holder_does_not_block(tmp_path, capsys):
    cfg_path = write_config(tmp_path / "tiny.py", training_steps="40it", eval_every="20it",
                            levels=1, checkpoint_seconds=0.0)
    solo = imp.find_ticket(config.load(cfg_path), str(tmp_path / "solo"))
    work = str(tmp_path / "work")
    run_dir = rundir.prepare(config.load(cfg_path), work)  # writes nothing in the run directory
    holder = _holder(run_dir)
    try:
        before = _listing(work)
        capsys.readouterr()
        rc = cli.main(["find-ticket", "--config", cfg_path, "--workdir", work])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, err
        assert (f"run directory {run_dir} is in use by process {holder.pid} on host "
                f"{socket.gethostname()} (lock {os.path.join(run_dir, rundir.LOCK)}); wait for "
                f"it or stop it") in lines[0]
        assert _listing(work) == before  # nothing written, not even the lock file
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert os.path.exists(os.path.join(run_dir, rundir.LOCK))  # stale, but not held
    rc = cli.main(["find-ticket", "--config", cfg_path, "--workdir", work])
    assert rc == 0, capsys.readouterr().err
    assert str(os.getpid()) in open(os.path.join(run_dir, rundir.LOCK)).read()
    for level in (0, 1):
        for name in ("mask", "final"):
            a = checkpoints.restore(os.path.join(solo, f"level_{level}", name))
            b = checkpoints.restore(os.path.join(run_dir, f"level_{level}", name))
            assert _trees_equal(a, b), (level, name)
        metrics = os.path.join(f"level_{level}", rundir.METRICS)
        assert open(os.path.join(solo, metrics)).read() == open(
            os.path.join(run_dir, metrics)).read()


def test_lock_is_exclusive_and_released(tmp_path):
    """Within one process too (flock is per open file): held, a second `lock` is a ValueError
    naming this process; released (also by an exception), it can be taken again."""
    run_dir = str(tmp_path / "run")
    with rundir.lock(run_dir):
        with pytest.raises(ValueError, match=f"in use by process {os.getpid()} on host"):
            with rundir.lock(run_dir):
                pass
    with pytest.raises(KeyboardInterrupt):
        with rundir.lock(run_dir):
            raise KeyboardInterrupt
    with rundir.lock(run_dir):
        pass
