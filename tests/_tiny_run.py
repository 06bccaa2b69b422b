"""The tiny LeNet configs of the tests, written in one place, and one tiny finished IMP run made
once per test session and shared by test_runs, test_plots, test_instability and test_errors (it
is only read; tests that damage a run work on a copy)."""

import atexit
import os
import shutil
import tempfile

# The recipe every tiny test run shares: LeNet-300-100 on mnist5k, batches of 100, 60 iterations
# evaluated every 20, two pruned levels, no progress bars.
BASE = {"dataset": "mnist5k", "model": "lenet300_100", "batch_size": 100,
        "training_steps": "60it", "eval_every": "20it", "levels": 2, "progress": False}


def tiny_config(**fields) -> str:
    """The text of a config file: `BASE` with `fields` added or changed."""
    lines = "".join(f"    c.{k} = {v!r}\n" for k, v in {**BASE, **fields}.items())
    return ("from lottery.config import base\n\n\ndef get_config():\n    c = base()\n"
            f"{lines}    return c\n")


def write_config(path, **fields) -> str:
    """Write `tiny_config(**fields)` to `path`; returns the path as a string."""
    with open(path, "w") as f:
        f.write(tiny_config(**fields))
    return str(path)


# The shared run: rewinding to iteration 20, controls reinit and random_prune (2 seeds) on level 2.
TINY = tiny_config(rewind="iteration", rewind_step="20it", controls="reinit,random_prune",
                   control_levels="2", control_seeds=2, checkpoint_seconds=1000.0)

_RUN = []


def tiny_run() -> str:
    """The run directory of a finished 3-level LeNet run (levels 0-2, rewind to iteration 20,
    controls reinit and random_prune with 2 seeds each on level 2)."""
    if not _RUN:
        from lottery import config, imp

        root = tempfile.mkdtemp(prefix="lottery_tiny_run_")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        path = os.path.join(root, "tiny.py")
        with open(path, "w") as f:
            f.write(TINY)
        _RUN.append(imp.find_ticket(config.load(path), os.path.join(root, "runs")))
    return _RUN[0]
