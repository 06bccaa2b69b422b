"""Masked vs dense step, `lottery` epoch vs a plain-JAX epoch, on-device epoch vs Python loop,
vmapped replicas vs sequential runs.

Prints ratios measured in one process (medians of interleaved repeats); run with
`python benchmarks/train_step.py [--quick]`. Absolute times drift on shared machines: read ratios.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lottery import masks, models
from lottery import train as T


def dense_step(trainer, state, x, y):
    """The physical limit: the same step with no mask anywhere."""
    (loss, bs), grads = jax.value_and_grad(functools.partial(T._loss, trainer), has_aux=True)(
        state.params, state.batch_stats, x, y)
    updates, opt_state = trainer.tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=bs, opt_state=opt_state), loss


def timeit(fn, n, repeats):
    """Median seconds per call of fn() over `repeats` blocks of n calls."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            r = fn()
        jax.block_until_ready(r)
        out.append((time.perf_counter() - t) / n)
    return float(np.median(out))


def interleaved(fns: dict, n, repeats):
    """Medians of per-call times, alternating between the functions to share machine noise."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(timeit(f, n, 1))
    return {k: float(np.median(v)) for k, v in times.items()}


def step_ratio(name, input_shape, batch, n, repeats):
    model = models.create(name)
    variables = models.init(model, jax.random.key(0), input_shape)
    tx = T.optimizer("sgd", 0.01, momentum=0.9)
    trainer = T.Trainer(model, tx, batch)
    mask = jax.tree.map(lambda p: jax.random.bernoulli(jax.random.key(1), 0.2, p.shape)
                        if p.ndim >= 2 else jnp.ones(p.shape, bool), variables["params"])
    state = T.init_state(variables, tx, jax.random.key(2), mask)
    x = jax.random.normal(jax.random.key(3), (batch, *input_shape))
    y = jax.random.randint(jax.random.key(4), (batch,), 0, 10)
    masked = jax.jit(functools.partial(T.train_step, trainer))
    dense = jax.jit(functools.partial(dense_step, trainer))
    fns = {"dense": lambda: dense(state, x, y)[1], "masked": lambda: masked(state, mask, x, y)[1]}
    for f in fns.values():
        jax.block_until_ready(f())
    t = interleaved(fns, n, repeats)
    return t["dense"], t["masked"]


class _Data:
    def __init__(self, n, shape):
        rng = np.random.default_rng(0)
        self.x_train = rng.normal(size=(n, *shape)).astype(np.float32)
        self.y_train = rng.integers(0, 10, n).astype(np.int32)
        self.x_test, self.y_test = self.x_train[:500], self.y_train[:500]


def plain_jax_epochs(repeats, epochs=5):
    """LeNet-300-100 on 4,000 examples, batch 128 (the README main job's shapes): a plain-JAX
    dense epoch (flax apply, optax SGD, one `lax.scan` over a permutation; written here without
    `lottery`) against `lottery`'s masked epoch (20% density), compiled epoch alone and as a
    whole `train()` call of `epochs` epochs with an evaluation of 1,000 test examples after
    each (the plain side evaluates the same way). Returns ms per epoch."""
    n, batch, spe = 4000, 128, 4000 // 128
    data = _Data(n, (28, 28, 1))
    data.x_test, data.y_test = data.x_train[:1000], data.y_train[:1000]
    model = models.create("lenet300_100")
    variables = models.init(model, jax.random.key(0), (28, 28, 1))
    tx = optax.sgd(0.1)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    xt, yt = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    @jax.jit
    def plain_epoch(params, opt_state, key, epoch):
        perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)[:spe * batch]

        def body(carry, idx):
            p, o = carry
            loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
                model.apply({"params": p}, x[idx]), y[idx]).mean()
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), o), loss

        (p, o), losses = jax.lax.scan(body, (params, opt_state), perm.reshape(spe, batch))
        return p, o, losses.sum()

    @jax.jit
    def plain_eval(params):
        logits = model.apply({"params": params}, xt)
        return (optax.softmax_cross_entropy_with_integer_labels(logits, yt).sum(),
                (logits.argmax(-1) == yt).sum())

    def plain_run():
        p, o = variables["params"], tx.init(variables["params"])
        for e in range(epochs):
            p, o, loss = plain_epoch(p, o, jax.random.key(5), e)
            float(loss)
            float(plain_eval(p)[1])
        return p

    mask = jax.tree.map(lambda p: jax.random.bernoulli(jax.random.key(1), 0.2, p.shape)
                        if p.ndim >= 2 else jnp.ones(p.shape, bool), variables["params"])
    trainer = T.Trainer(model, tx, batch, loop="scan")
    state = T.init_state(variables, tx, jax.random.key(2), mask)
    epoch = T._compiled(trainer, False)[1]
    fns = {
        "plain_epoch": lambda: plain_epoch(variables["params"], state.opt_state,
                                           jax.random.key(5), 0)[2],
        "lottery_epoch": lambda: epoch(state, mask, x, y, 0, spe)[2],
        "plain_run": plain_run,
        "lottery_run": lambda: T.train(trainer, state, mask, data, num_steps=epochs * spe,
                                       progress=False)[0].params,
    }
    for f in fns.values():
        jax.block_until_ready(f())
    t = interleaved(fns, 1, max(repeats, 5) * 2)
    return {k: v * 1e3 / (epochs if k.endswith("run") else 1) for k, v in t.items()}


def loops_and_replicas(repeats, k=8):
    """LeNet-300-100 on 4,000 examples, batch 128: epoch as one scan vs one jitted step per
    Python iteration; K vmapped replicas vs K sequential runs (scan path)."""
    data = _Data(4000, (28, 28, 1))
    model = models.create("lenet300_100")
    tx = T.optimizer("sgd", 0.1)
    keys = [jax.random.key(i) for i in range(k)]
    variables = [models.init(model, kk, (28, 28, 1)) for kk in keys]
    mask = masks.init(variables[0]["params"])
    states = [T.init_state(v, tx, kk, mask) for v, kk in zip(variables, keys)]
    spe = 4000 // 128
    res = {}
    for loop in ("scan", "steps"):
        tr = T.Trainer(model, tx, 128, loop=loop)
        T.train(tr, states[0], mask, data, num_steps=spe, eval_every=10**9, progress=False)
    fns = {loop: (lambda loop=loop: T.train(T.Trainer(model, tx, 128, loop=loop), states[0], mask,
                                            data, num_steps=spe, eval_every=10**9,
                                            progress=False)[0].params)
           for loop in ("scan", "steps")}
    t = interleaved(fns, 3, repeats)
    res["epoch_scan"], res["epoch_steps"] = t["scan"], t["steps"]
    tr = T.Trainer(model, tx, 128, loop="scan")
    stacked, smask = T.stack(states), T.stack([mask] * k)
    T.train(tr, stacked, smask, data, num_steps=spe, eval_every=10**9, replicas=True,
            progress=False)
    fns = {
        "vmapped": lambda: T.train(tr, stacked, smask, data, num_steps=spe, eval_every=10**9,
                                   replicas=True, progress=False)[0].params,
        "sequential": lambda: [T.train(tr, s, mask, data, num_steps=spe, eval_every=10**9,
                                       progress=False)[0].params for s in states],
    }
    t = interleaved(fns, 1, repeats)
    res["vmapped"], res["sequential"] = t["vmapped"], t["sequential"]
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    args = p.parse_args()
    repeats = 3 if args.quick else 7
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s)); "
          f"medians of {repeats} interleaved repeats\n")
    print("| measurement | time | ratio |")
    print("|---|---|---|")
    d, m = step_ratio("lenet300_100", (28, 28, 1), 60, 200, repeats)
    print(f"| LeNet-300-100 step, batch 60: dense / masked | {d * 1e3:.3f} / {m * 1e3:.3f} ms "
          f"| masked/dense **{m / d:.3f}** |")
    d, m = step_ratio("conv6", (32, 32, 3), 60, 10, repeats)
    print(f"| Conv-6 step, batch 60, 32x32x3: dense / masked | {d * 1e3:.1f} / {m * 1e3:.1f} ms "
          f"| masked/dense **{m / d:.3f}** |")
    e = plain_jax_epochs(repeats)
    print(f"| LeNet epoch, compiled: plain-JAX dense scan / `lottery` masked | "
          f"{e['plain_epoch']:.1f} / {e['lottery_epoch']:.1f} ms | lottery/plain "
          f"**{e['lottery_epoch'] / e['plain_epoch']:.3f}** |")
    print(f"| LeNet, 5 epochs + eval of 1,000 after each, per epoch: plain JAX / `lottery` "
          f"train() | {e['plain_run']:.1f} / {e['lottery_run']:.1f} ms | lottery/plain "
          f"**{e['lottery_run'] / e['plain_run']:.3f}** |")
    r = loops_and_replicas(repeats)
    print(f"| LeNet epoch (31 steps of 128): scan / Python loop | {r['epoch_scan'] * 1e3:.1f} / "
          f"{r['epoch_steps'] * 1e3:.1f} ms | loop/scan **{r['epoch_steps'] / r['epoch_scan']:.2f}** |")
    print(f"| 8 LeNet replicas, one epoch: vmapped / 8 sequential | {r['vmapped'] * 1e3:.0f} / "
          f"{r['sequential'] * 1e3:.0f} ms | sequential/vmapped "
          f"**{r['sequential'] / r['vmapped']:.2f}** |")


if __name__ == "__main__":
    main()
