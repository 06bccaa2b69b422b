"""One tiny finished IMP run, made once per test session and shared by test_runs, test_plots and
test_instability (it is only read; tests that damage a run work on a copy)."""

import atexit
import os
import shutil
import tempfile

TINY = '''
from lottery.config import base


def get_config():
    c = base()
    c.dataset = "mnist5k"
    c.model = "lenet300_100"
    c.batch_size = 100
    c.training_steps = "60it"
    c.eval_every = "20it"
    c.levels = 2
    c.rewind = "iteration"
    c.rewind_step = "20it"
    c.controls = "reinit,random_prune"
    c.control_levels = "2"
    c.control_seeds = 2
    c.progress = False
    c.checkpoint_seconds = 1000.0
    return c
'''

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
