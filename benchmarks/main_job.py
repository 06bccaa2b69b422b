"""Wall time of the README's main command from nothing: empty data dir, empty workdir.

`python benchmarks/main_job.py [--repeats 1] [-- extra --config.<field>=<value> ...]` runs
`lottery find-ticket --config configs/lenet300_mnist5k.py` in a fresh process per repeat, with a
new temporary `LOTTERY_DATA_DIR` (so the offline dataset is prepared again) and workdir, and prints
each wall time and their median: start-up, dataset preparation, 21 levels and the controls of 10
levels included. A fresh clone adds only `pip install` to this.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                      "lenet300_mnist5k.py")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("extra", nargs="*", help="more arguments for `lottery find-ticket`")
    args = p.parse_args()
    times = []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "LOTTERY_DATA_DIR": os.path.join(tmp, "data")}
            cmd = [sys.executable, "-m", "lottery.cli", "find-ticket", "--config", CONFIG,
                   "--workdir", os.path.join(tmp, "runs"), "--config.progress=false", *args.extra]
            t = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - t)
        print(f"run {r + 1}: {times[-1]:.1f} s", flush=True)
    print(f"main job wall time, fresh data dir: median {np.median(times):.1f} s "
          f"over {len(times)} run(s)")


if __name__ == "__main__":
    main()
