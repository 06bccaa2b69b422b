"""Cost metrics of pruned networks, with ShrinkBench's definitions.

- `compression_ratio`: all parameters / non-zero parameters (biases and norms included).
- `flops`: multiply-accumulates (MACs) per example of every `nn.Dense` and `nn.Conv` call, dense and
  remaining, found by tracing the model abstractly (`jax.eval_shape`, no FLOPs spent).
- `theoretical_speedup`: Σ dense MACs / Σ remaining MACs, where a layer's remaining MACs are its
  dense MACs times the density (fraction kept) of its kernel.

Only Dense and Conv multiply-adds are counted (no biases, activations, norms or pooling), as in
ShrinkBench. Masks are bool pytrees with the structure of `variables['params']`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from lottery import masks
from lottery.masks import compression_ratio

PyTree = Any

__all__ = ["compression_ratio", "flops", "theoretical_speedup", "summary"]


def _lookup(tree: PyTree, path: tuple[str, ...], what: str):
    node = tree
    for i, name in enumerate(path):
        if not hasattr(node, "keys") or name not in node:
            raise ValueError(f"{what} has no entry at {'/'.join(path[:i + 1])!r} "
                             f"(looking for {'/'.join(path)!r}); its paths: {masks.paths(tree)}")
        node = node[name]
    return node


def _layer_calls(model: nn.Module, variables: PyTree, x, apply_kwargs) -> list[tuple]:
    """(module path, output shape) of every Dense/Conv call, in call order, by abstract tracing."""
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
            calls.append((tuple(context.module.path), tuple(np.shape(out))))
        return out

    def run(v, inp):
        with nn.intercept_methods(interceptor):
            return model.apply(v, inp, **apply_kwargs)

    jax.eval_shape(run, variables, x)
    return calls


def flops(model: nn.Module, variables: PyTree, x, mask: PyTree | None = None,
          **apply_kwargs) -> dict[str, tuple[float, float]]:
    """{kernel path: (dense MACs, remaining MACs)} per example, for every Dense and Conv layer.

    `x` is an example input whose leading axis is the batch (any batch size); `apply_kwargs` go to
    `model.apply` (e.g. `train=False`). A layer's MACs are (output positions, batch axes included)
    × kernel size / batch size: Dense = in × out, Conv = output pixels × kh × kw × in/groups × out.
    Remaining MACs = dense MACs × the kernel's kept fraction in `mask` (or its non-zero fraction
    when `mask` is None). A module called several times sums its calls.
    """
    if not hasattr(variables, "keys") or "params" not in variables:
        raise ValueError("variables must be the model's variable dict with a 'params' entry "
                         "(as returned by model.init)")
    batch = np.shape(jax.tree.leaves(x)[0])[0]
    params = variables["params"]
    if mask is not None:
        masks.check(mask, params)
    out: dict[str, tuple[float, float]] = {}
    for path, out_shape in _layer_calls(model, variables, x, apply_kwargs):
        kernel_path = path + ("kernel",)
        kernel = _lookup(params, kernel_path, "variables['params']")
        if mask is None:
            kept = np.count_nonzero(np.asarray(kernel))
        else:
            kept = int(np.asarray(_lookup(mask, kernel_path, "mask")).sum())
        positions = int(np.prod(out_shape[:-1]))
        dense = positions * int(np.size(kernel)) / int(batch)
        name = "/".join(kernel_path)
        prev = out.get(name, (0.0, 0.0))
        out[name] = (prev[0] + dense, prev[1] + dense * float(kept) / int(np.size(kernel)))
    if not out:
        raise ValueError(f"model {type(model).__name__} calls no nn.Dense or nn.Conv; "
                         f"nothing to count")
    return out


def theoretical_speedup(model: nn.Module, variables: PyTree, x, mask: PyTree | None = None,
                        **apply_kwargs) -> float:
    """ShrinkBench's theoretical speedup: Σ dense MACs / Σ remaining MACs (inf if none remain)."""
    f = flops(model, variables, x, mask, **apply_kwargs).values()
    dense, remaining = sum(d for d, _ in f), sum(r for _, r in f)
    return dense / remaining if remaining > 0 else float("inf")


def summary(model: nn.Module, variables: PyTree, x, mask: PyTree | None = None,
            **apply_kwargs) -> str:
    """A per-layer table of dense and remaining MACs and kernel density, with totals, the
    theoretical speedup and the compression ratio."""
    f = flops(model, variables, x, mask, **apply_kwargs)
    width = max([len("layer")] + [len(p) for p in f])
    lines = [f"{'layer':<{width}}  {'MACs':>14}  {'remaining':>14}  {'density':>8}"]
    for p, (d, r) in f.items():
        lines.append(f"{p:<{width}}  {d:>14,.0f}  {r:>14,.0f}  {r / d if d else 1.0:>8.4f}")
    dense, remaining = sum(d for d, _ in f.values()), sum(r for _, r in f.values())
    lines.append(f"{'total':<{width}}  {dense:>14,.0f}  {remaining:>14,.0f}  "
                 f"{remaining / dense if dense else 1.0:>8.4f}")
    speedup = dense / remaining if remaining > 0 else float("inf")
    lines.append(f"theoretical speedup {speedup:.4f}, compression ratio "
                 f"{compression_ratio(variables['params'], mask):.4f}")
    return "\n".join(lines)
