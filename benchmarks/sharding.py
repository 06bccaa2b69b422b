"""Data-parallel training steps/s on 1 vs 2 forced host (CPU) devices.

Runs itself in one subprocess per device count (XLA_FLAGS must be set before jax starts):
1 device = the plain single-device path (`Trainer(mesh=None)`), 2 devices = `Trainer(mesh=
distributed.data_mesh('all'))`, the same global batch. Forced host devices share this machine's
cores, which XLA already uses for one device, so expect little or no gain: the numbers show the
cost of the partitioned step, not a GPU speed-up. Run `python benchmarks/sharding.py [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASES = {  # name: (model, input shape, global batch, loop, steps per timed call)
    "LeNet-300-100, batch 128, on-device epoch": ("lenet300_100", (28, 28, 1), 128, "scan", 31),
    "Conv-2, batch 60, one jitted step per iteration": ("conv2", (32, 32, 3), 60, "steps", 5),
}


def measure(repeats: int) -> dict:
    """Steps/s per case in this process (median of `repeats` timed calls after a warm-up)."""
    import jax  # noqa: PLC0415 - imported after XLA_FLAGS is set by the parent
    import numpy as np  # noqa: PLC0415

    from lottery import distributed, masks, models  # noqa: PLC0415
    from lottery import train as T  # noqa: PLC0415

    class Data:
        def __init__(self, n, shape):
            rng = np.random.default_rng(0)
            self.x_train = rng.normal(size=(n, *shape)).astype(np.float32)
            self.y_train = rng.integers(0, 10, n).astype(np.int32)
            self.x_test, self.y_test = self.x_train[:100], self.y_train[:100]

    out = {}
    for name, (model_name, shape, batch, loop, steps) in CASES.items():
        model = models.create(model_name)
        variables = models.init(model, jax.random.key(0), shape)
        tx = T.optimizer("sgd", 0.01, momentum=0.9)
        mask = masks.init(variables["params"])
        state = T.init_state(variables, tx, jax.random.key(1), mask)
        data = Data(batch * steps, shape)
        trainer = T.Trainer(model, tx, batch, loop=loop,
                            mesh=distributed.data_mesh("all", batch))

        def run():
            s, _ = T.train(trainer, state, mask, data, num_steps=steps, eval_every=10**9,
                           progress=False)
            return jax.block_until_ready(s.params)

        run()  # compile
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        out[name] = steps / float(np.median(times))
    return out


def child(devices: int, repeats: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, __file__, "--child", str(repeats)], env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    repeats = 3 if args.quick else 7
    one, two = child(1, repeats), child(2, repeats)
    print(f"{os.cpu_count()} CPU cores; medians of {repeats} timed calls; steps/s of training "
          f"(no evaluation)\n")
    print("| case | 1 device | 2 forced host devices | 2 / 1 |")
    print("|---|---|---|---|")
    for name in CASES:
        print(f"| {name} | {one[name]:.1f} | {two[name]:.1f} | **{two[name] / one[name]:.2f}** |")


if __name__ == "__main__":
    main()
