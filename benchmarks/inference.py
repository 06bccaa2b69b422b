"""Inference latency of dense vs compacted vs BCOO-sparse pruned networks, beside the theory.

For LeNet-300-100 at each density: an unstructured mask (global magnitude, 'out' not pruned, as
OpenLTH) run with BCOO Dense kernels (`lottery.sparse`), and a structured mask (each hidden layer
keeps `density` of its units by L2 norm, `lottery.prune.units_to_density`, layerwise) run as the
compacted model (`lottery.compact`). For Conv-2 (32x32x3), the structured mask and compaction.
'theory' is `lottery.metrics.theoretical_speedup` of the mask (dense MACs / remaining MACs);
'compact MACs' is dense MACs / the compacted model's MACs (removing a unit also removes the next
layer's inputs, which the mask did not zero). Measured speedup = dense time / variant time, medians
of interleaved repeats in one process, jitted, on whatever devices jax sees (CPU here).

ResNet-20 (32x32x3): a channel-group mask (`lottery.groups`: every group, the three residual
stage groups included, keeps `density` of its channels by the L1 norm of its filters, layerwise;
expanded to filters, batch norms and the readers' rows) run dense-masked and as the compacted
`SlimResNet`. Its 'density' column is the fraction of CHANNELS kept; 'units kept' lists the three
stage widths.

Run `python benchmarks/inference.py [--quick]`. Absolute times drift on shared machines: read
ratios.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lottery import compact, groups, masks, metrics, models, prune, scorers, sparse


def per_call(fn, n: int) -> float:
    """Seconds per call of fn(), over one block of n calls."""
    t = time.perf_counter()
    for _ in range(n):
        r = fn()
    jax.block_until_ready(r)
    return (time.perf_counter() - t) / n


def interleaved(fns: dict, repeats: int, block_seconds: float = 0.05) -> dict:
    """Median seconds per call of each function, alternating between them every block."""
    sizes = {}
    for k, f in fns.items():
        jax.block_until_ready(f())  # compile
        sizes[k] = max(1, int(block_seconds / max(per_call(f, 1), 1e-6)))
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(per_call(f, sizes[k]))
    return {k: float(np.median(v)) for k, v in times.items()}


def structured_mask(params, rates, density):
    """Each prunable layer keeps round(density * units) of its units, by the units' L2 norms."""
    return prune.units_to_density(prune.unit_scores(params, rates, "l2"), masks.init(params),
                                  density, scope="layerwise", rates=rates)


def dense_macs(model, variables, x) -> float:
    return sum(d for d, _ in metrics.flops(model, variables, x, train=False).values())


def row_fmt(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def bench_model(name, model, input_shape, densities, batches, repeats, unstructured=True):
    """Rows of the table for one model: per density and batch, times and speedups."""
    variables = models.init(model, jax.random.key(0), input_shape)
    params = variables["params"]
    rates = masks.prunable(params, exclude="out")
    apply = jax.jit(models.inference_fn(model, variables))
    sparse_apply = jax.jit(sparse.apply_fn(model, variables))
    x1 = jnp.zeros((1, *input_shape))
    base_macs = dense_macs(model, variables, x1)
    rows = []
    for d in densities:
        u_mask = prune.to_density(scorers.magnitude(params, masks.init(params)), masks.init(params),
                                  d, rates=rates) if unstructured else None
        s_mask = structured_mask(params, rates, d) if d < 1 else masks.init(params)
        theory_u = metrics.theoretical_speedup(model, variables, x1, u_mask, train=False) \
            if unstructured else None
        theory_s = metrics.theoretical_speedup(model, variables, x1, s_mask, train=False)
        c = compact.compact(model, variables, s_mask) if d < 1 else None
        c_apply = jax.jit(models.inference_fn(c.model, c.variables)) if c else None
        c_macs = base_macs / dense_macs(c.model, c.variables, x1) if c else 1.0
        sp = sparse.to_bcoo(params, u_mask) if unstructured and d < 1 else None
        kept = "/".join(str(len(v)) for v in c.kept.values()) if c else "all"
        for b in batches:
            x = jax.random.normal(jax.random.key(b), (b, *input_shape))
            fns = {"dense": lambda: apply(params, x)}
            if c:
                fns["compact"] = lambda: c_apply(c.variables["params"], x)
            if sp is not None:
                fns["bcoo"] = lambda: sparse_apply(sp, x)
            t = interleaved(fns, repeats)
            cell = lambda k: (f"{t[k] * 1e6:,.0f} ({t['dense'] / t[k]:.2f}x)"  # noqa: E731
                              if k in t else "-")
            rows.append([name, f"{d:g}", str(b), f"{t['dense'] * 1e6:,.0f}",
                         cell("bcoo"), f"{theory_u:.2f}x" if unstructured else "-",
                         cell("compact"), kept, f"{theory_s:.2f}x", f"{c_macs:.2f}x"])
            print(row_fmt(rows[-1]), flush=True)
    return rows


def bench_resnet(name, model, input_shape, densities, batches, repeats):
    """Rows for a ResNet: channel-group masks at each density, dense vs compacted."""
    variables = models.init(model, jax.random.key(0), input_shape)
    params = variables["params"]
    x1 = jnp.zeros((1, *input_shape))
    g = groups.derive(model, variables, x1, train=False)
    apply = jax.jit(models.inference_fn(model, variables))
    base_macs = dense_macs(model, variables, x1)
    rows = []
    for d in densities:
        mask, _ = groups.prune(g, groups.l1, params, masks.init(params), d, scope="layerwise")
        theory = metrics.theoretical_speedup(model, variables, x1, mask, train=False)
        c = compact.compact(model, variables, mask)
        c_apply = jax.jit(models.inference_fn(c.model, c.variables))
        c_macs = base_macs / dense_macs(c.model, c.variables, x1)
        for b in batches:
            x = jax.random.normal(jax.random.key(b), (b, *input_shape))
            t = interleaved({"dense": lambda: apply(params, x),
                             "compact": lambda: c_apply(c.variables["params"], x)}, repeats)
            rows.append([name, f"{d:g} (channels)", str(b), f"{t['dense'] * 1e6:,.0f}", "-", "-",
                         f"{t['compact'] * 1e6:,.0f} ({t['dense'] / t['compact']:.2f}x)",
                         "/".join(map(str, c.model.widths)), f"{theory:.2f}x", f"{c_macs:.2f}x"])
            print(row_fmt(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer densities and repeats")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats per cell")
    ap.add_argument("--only", choices=("lenet", "conv2", "resnet20"), default=None,
                    help="one model's rows only")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    repeats = args.repeats or (5 if args.quick else 15)
    lenet_d = (1.0, 0.2, 0.05, 0.01) if args.quick else (1.0, 0.5, 0.2, 0.1, 0.05, 0.01)
    conv_d = (1.0, 0.2) if args.quick else (1.0, 0.5, 0.2, 0.1)
    ident = jax.jit(lambda x: x)
    x1 = jnp.zeros((1, 28, 28, 1))
    floor = interleaved({"identity": lambda: ident(x1)}, repeats)["identity"]
    print(f"devices: {jax.devices()}; times in microseconds per call (speedup vs dense); "
          f"a jitted identity on one example takes {floor * 1e6:.0f} us (the dispatch floor)\n")
    print(row_fmt(["model", "density", "batch", "dense", "BCOO", "theory (unstructured)",
                   "compact", "units kept", "theory (structured)", "compact MACs"]))
    print(row_fmt(["---"] * 10))
    resnet_d = (0.5,) if args.quick else (0.75, 0.5, 0.25)
    if args.only in (None, "lenet"):
        bench_model("LeNet-300-100", models.create("lenet300_100"), (28, 28, 1), lenet_d,
                    (1, 256), repeats)
    if args.only in (None, "conv2"):
        bench_model("Conv-2", models.create("conv2"), (32, 32, 3), conv_d, (1, 16), repeats,
                    unstructured=False)
    if args.only in (None, "resnet20"):
        bench_resnet("ResNet-20", models.create("resnet20"), (32, 32, 3), resnet_d,
                     (1, 16) if args.quick else (1, 16, 128), repeats)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
