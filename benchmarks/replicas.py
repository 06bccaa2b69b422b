"""Many tickets per device: ticket-epochs per second for K replicas by replica strategy.

`python benchmarks/replicas.py [--repeats 5] [--ks 1,2,4,8] [--models lenet,conv6,resnet20]`
prints, in one process, for each model and K = 1, 2, 4, 8 replicas (different seeds and masks),
how many ticket-epochs per second `train.train(..., replicas=True)` reaches with each
`replica_strategy` ('vmap', 'map', 'sequential'): medians of interleaved repeats, after one
untimed call that compiles. An "epoch" is one `train()` call of `steps` steps ending in an
evaluation of a small test split (as a control's level does), with the trainer's default loop
('auto': whole epochs on device, except conv nets on CPU). On CPU the conv nets' epochs are
reduced to one small step so that the run ends in minutes (said in the output), and 'map' is
left out for them there (`--cpu-map` to include it): a convolution inside an XLA loop body is
50-150x slower on CPU (jax-ml/jax#12868), so 'map' is not a choice for conv nets on CPU (measured
once at K=2, 2 steps of batch 60/32: Conv-6 0.01 ticket-epochs/s vs 0.53 sequential, ResNet-20
0.13 vs 1.87). Absolute times drift on shared machines: compare within a row.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from lottery import masks, models
from lottery import train as T

STRATEGIES = ("vmap", "map", "sequential")


class _Data:
    def __init__(self, n, shape, n_test):
        rng = np.random.default_rng(0)
        self.x_train = rng.normal(size=(n, *shape)).astype(np.float32)
        self.y_train = rng.integers(0, 10, n).astype(np.int32)
        self.x_test, self.y_test = self.x_train[:n_test], self.y_train[:n_test]


def cases(cpu: bool):
    """(label, model name, input shape, batch, steps per epoch, test examples, tx)."""
    sgd = T.optimizer("sgd", 0.1)
    mom = T.optimizer("sgd", 0.05, momentum=0.9, weight_decay=1e-4)
    return {
        "lenet": ("LeNet-300-100", "lenet300_100", (28, 28, 1), 128, 31, 1000, sgd),
        "conv6": ("Conv-6", "conv6", (32, 32, 3), 16 if cpu else 60, 1 if cpu else 16,
                  32 if cpu else 60, mom),
        "resnet20": ("ResNet-20", "resnet20", (32, 32, 3), 16 if cpu else 128, 1 if cpu else 16,
                     32 if cpu else 128, mom),
    }


def setup(name, shape, batch, spe, n_test, tx, k):
    data = _Data(batch * spe, shape, n_test)
    model = models.create(name)
    keys = [jax.random.key(i) for i in range(k)]
    variables = [models.init(model, kk, shape) for kk in keys]
    rmasks = [masks.random_like(masks.init(v["params"]), kk) for v, kk in zip(variables, keys)]
    states = [T.init_state(v, tx, kk, m) for v, kk, m in zip(variables, keys, rmasks)]
    trainer = T.Trainer(model, tx, batch)
    return data, trainer, T.stack(states), T.stack(rmasks)


def timed(fn):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def measure(case, ks, repeats, strategies, all_strategies):
    label, name, shape, batch, spe, n_test, tx = case
    rows = {}
    for k in ks:
        data, trainer, states, rmasks = setup(name, shape, batch, spe, n_test, tx, k)
        fns = {s: (lambda s=s: T.train(trainer._replace(replica_strategy=s), states, rmasks, data,
                                       num_steps=spe, replicas=True, progress=False)[0].params)
               for s in strategies}
        for f in fns.values():  # compile
            f()
        times = {s: [] for s in strategies}
        for _ in range(repeats):  # interleaved
            for s, f in fns.items():
                times[s].append(timed(f))
        rows[k] = {s: k / float(np.median(v)) for s, v in times.items()}
        auto = trainer.resolved_replica_strategy(states.params)
        cell = lambda s: "–" if s not in rows[k] else (  # noqa: E731
            f"**{rows[k][s]:.2f}**" if s == auto else f"{rows[k][s]:.2f}")
        print(f"| {label} | {k} | " + " | ".join(cell(s) for s in all_strategies) + " |",
              flush=True)
    return rows


def vmapped_conv_groups(k: int = 4) -> list[tuple[int, int]]:
    """(feature_group_count, batch_group_count) of every convolution XLA is given for the
    gradient of a conv layer's loss vmapped over K replicas' weights and inputs: the forward
    conv and the weight gradient both become grouped convolutions (K groups)."""
    import re  # noqa: PLC0415

    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (y ** 2).sum()

    w, x = jax.numpy.ones((k, 3, 3, 16, 16)), jax.numpy.ones((k, 8, 32, 32, 16))
    text = jax.jit(jax.vmap(jax.grad(loss))).lower(w, x).as_text()
    return [(int(re.search(r"feature_group_count = (\d+)", line).group(1)),
             int(re.search(r"batch_group_count = (\d+)", line).group(1)))
            for line in text.splitlines() if "convolution(" in line]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ks", default="1,2,4,8")
    p.add_argument("--models", default="lenet,conv6,resnet20")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--cpu-map", action="store_true",
                   help="also time 'map' for the conv nets on CPU (very slow there)")
    args = p.parse_args()
    cpu = jax.default_backend() == "cpu"
    ks = [int(k) for k in args.ks.split(",")]
    strategies = args.strategies.split(",")
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, {jax.default_backend()}: {dev.device_kind} "
          f"({jax.device_count()} device(s)); medians of {args.repeats} interleaved repeats")
    table = cases(cpu)
    for key in args.models.split(","):
        label, name, shape, batch, spe, n_test, _ = table[key]
        print(f"- {label}: an epoch is {spe} steps of batch {batch} ({shape}) + eval of {n_test}"
              + (" (reduced on CPU)" if cpu and key != "lenet" else ""))
    print("\nticket-epochs per second (K replicas / seconds per epoch); bold: what "
          "replica_strategy='auto' picks\n")
    print("| model | K | " + " | ".join(strategies) + " |")
    print("|---|---|" + "---|" * len(strategies))
    for key in args.models.split(","):
        skip = cpu and key != "lenet" and not args.cpu_map
        measure(table[key], ks, args.repeats,
                [s for s in strategies if not (skip and s == "map")], strategies)
    groups = vmapped_conv_groups()
    print(f"\nXLA input for the weight gradient of one conv layer vmapped over 4 replicas: "
          f"{len(groups)} convolutions, (feature_group_count, batch_group_count) = {groups} "
          f"(the forward conv and the weight gradient are grouped convolutions)")
    if cpu and not args.cpu_map:
        print("\n–: 'map' not timed for conv nets on CPU (a conv in an XLA loop body, "
              "jax-ml/jax#12868; --cpu-map times it)")


if __name__ == "__main__":
    main()
