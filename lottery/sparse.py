"""Sparse inference: the pruned model's Dense layers multiply by `jax.experimental.sparse` BCOO
matrices holding only the kept weights.

`to_bcoo(params, mask)` replaces every pruned Dense kernel (a 2-D 'kernel' leaf whose mask drops
at least one entry) by a BCOO matrix of its kept entries; `apply_fn(model, variables)` runs the
model with those kernels: each `nn.Dense` call whose kernel is a BCOO matrix is intercepted and
computed as `x @ kernel + bias` with a sparse-dense product. Conv layers (and Dense kernels that
nothing pruned) stay dense, with their masked weights. Outputs equal the masked dense model's up
to float rounding. On CPU a BCOO product is a gather and a scatter-add per stored entry, which
is slower than a dense matmul until the density is low (see benchmarks/inference.py).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from lottery import masks

PyTree = Any


def is_bcoo(x) -> bool:
    """True for a BCOO matrix (treat it as one leaf when mapping over sparse params)."""
    return isinstance(x, jsparse.BCOO)


def bcoo_from_mask(kernel, mask) -> jsparse.BCOO:
    """The kept entries (`mask` True) of a 2-D `kernel` as a BCOO matrix, indices row-major."""
    m = np.asarray(mask, bool)
    idx = np.argwhere(m).astype(np.int32)
    data = np.asarray(kernel)[m]
    return jsparse.BCOO((jnp.asarray(data), jnp.asarray(idx)), shape=tuple(np.shape(kernel)),
                        indices_sorted=True, unique_indices=True)


def to_bcoo(params: PyTree, mask: PyTree | None = None) -> PyTree:
    """`params` with each pruned Dense kernel (2-D leaf named 'kernel' with a False in `mask`) a
    BCOO matrix of its kept entries; every other leaf masked and dense. With `mask` None the
    pruned entries are the exact zeros of the 2-D kernels."""
    if mask is None:
        mask = jax.tree.map(lambda p: np.asarray(p) != 0 if np.ndim(p) == 2
                            else np.ones(np.shape(p), bool), params)
    masks.check(mask, params)
    masked = masks.apply(params, mask)

    def convert(path, p, m):
        if masks.path_str(path).split("/")[-1] == "kernel" and np.ndim(p) == 2 \
                and not np.all(np.asarray(m)):
            return bcoo_from_mask(p, m)
        return p

    return jax.tree_util.tree_map_with_path(convert, masked, mask)


def _lookup(tree: PyTree, path: tuple[str, ...]):
    node = tree
    for name in path:
        if not hasattr(node, "keys") or name not in node:
            return None
        node = node[name]
    return node


def _sparse_dense(module: nn.Dense, kernel: jsparse.BCOO, bias, x):
    """nn.Dense's computation with a BCOO kernel: x @ kernel (+ bias), over the last axis of x."""
    dtype = module.dtype or jnp.result_type(x, kernel.dtype)
    lead = x.shape[:-1]
    y = jnp.asarray(x, dtype).reshape(-1, x.shape[-1]) @ kernel.astype(dtype)
    y = y.reshape(*lead, kernel.shape[-1])
    return y + jnp.asarray(bias, dtype) if bias is not None else y


def apply_fn(model: nn.Module, variables: dict) -> Callable[[PyTree, jax.Array], jax.Array]:
    """`apply(sparse_params, x) -> logits` in eval mode, BCOO kernels multiplied sparsely.

    `sparse_params` comes from `to_bcoo`; `variables` supplies the other collections (batch
    norm statistics). Raises ValueError naming a BCOO leaf that no `nn.Dense` call used.
    """
    rest = {k: v for k, v in variables.items() if k != "params"}

    def apply(sparse_params: PyTree, x: jax.Array) -> jax.Array:
        used = set()
        dense_params = jax.tree.map(
            lambda p: jnp.zeros((0,), p.dtype) if is_bcoo(p) else p, sparse_params,
            is_leaf=is_bcoo)

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            own = _lookup(sparse_params, tuple(mod.path))
            own = {k: v for k, v in own.items() if is_bcoo(v)} if hasattr(own, "keys") else {}
            if context.method_name == "__call__" and isinstance(mod, nn.Dense) and \
                    is_bcoo(own.get("kernel")):
                used.add("/".join(mod.path))
                bias = _lookup(sparse_params, tuple(mod.path) + ("bias",)) \
                    if mod.use_bias else None
                return _sparse_dense(mod, own["kernel"], bias, args[0])
            if own:
                raise ValueError(f"sparse_params[{'/'.join((*mod.path, next(iter(own))))!r}] "
                                 f"is a BCOO matrix but belongs to a {type(mod).__name__}; "
                                 f"only nn.Dense kernels can be sparse (conv kernels stay "
                                 f"dense)")
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            out = model.apply({"params": dense_params, **rest}, x, train=False)
        for path, leaf in jax.tree_util.tree_flatten_with_path(sparse_params, is_leaf=is_bcoo)[0]:
            name = masks.path_str(path)
            if is_bcoo(leaf) and name.rsplit("/", 1)[0] not in used:
                raise ValueError(f"sparse_params[{name!r}] is a BCOO matrix but no nn.Dense "
                                 f"call of {type(model).__name__} reads it; only Dense kernels "
                                 f"can be sparse (conv kernels stay dense)")
        return out

    return apply


def stored_count(sparse_params: PyTree) -> int:
    """Numbers stored: a BCOO matrix counts its kept values (not its indices), a dense leaf its
    size."""
    return sum(int(x.nse) if is_bcoo(x) else int(np.size(x))
               for x in jax.tree.leaves(sparse_params, is_leaf=is_bcoo))
