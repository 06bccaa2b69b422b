"""Compaction of the CIFAR ResNets through the channel groups of `lottery.groups`: a channel of a
group goes when nothing reads it, and the result is a `SlimResNet`, ResNet's layers and names with
a width per stage and per block (see `lottery.compact`'s docstring).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lottery import groups as groups_lib, models
from lottery.models import lth
from lottery.compact.units import Compacted

PyTree = Any


class SlimResNet(nn.Module):
    """A compacted `lottery.models.ResNet`: the same layers, names and computation, with a width
    per stage (`widths`: the stem and every block output of the stage, one channel group) and per
    block (`inner`: conv1/bn1, stage-major). Projection shortcuts at the start of stages 2 and 3,
    as ResNet. With `widths` (W, 2W, 4W) and every inner width equal to its stage's it has
    exactly ResNet-D's parameters."""

    num_classes: int = 10
    depth: int = 20
    widths: Sequence[int] = (16, 32, 64)
    inner: Sequence[int] = ()
    bn_init: str = "uniform"
    bias_init: str = "torch"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        n = lth.resnet_blocks(self.depth)
        inner = tuple(self.inner) or tuple(w for w in self.widths for _ in range(n))
        if len(self.widths) != 3 or len(inner) != 3 * n:
            raise ValueError(f"SlimResNet(depth={self.depth}) needs 3 stage widths and {3 * n} "
                             f"inner widths, got {tuple(self.widths)} and {inner}")
        return lth.resnet_layers(x, train, tuple(self.widths), inner, self.num_classes,
                                 self.bn_init, self.bias_init)


MODULES = (SlimResNet,)  # module classes compaction builds, besides lottery.models' own


def _resnet_fields(model: nn.Module) -> tuple[dict, int]:
    """SlimResNet fields of a ResNet or SlimResNet (before compaction) and its blocks per stage."""
    n = lth.resnet_blocks(model.depth)
    if isinstance(model, SlimResNet):
        return {"widths": tuple(model.widths), "inner": tuple(model.inner)}, n
    widths = tuple(model.width * 2**s for s in range(3))
    return {"widths": widths, "inner": tuple(w for w in widths for _ in range(n))}, n


def compact_resnet(model: nn.Module, variables: dict, params: PyTree) -> Compacted:
    """Remove the channels of every ResNet group that nothing reads (see the module docstring)."""
    cin = np.shape(params["conv"]["kernel"])[2]
    shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype),
                          dict(variables))
    # ResNet's channel groups do not depend on the spatial size (global mean pool): any will do
    x = jax.ShapeDtypeStruct((1, 32, 32, cin), jnp.float32)
    g = groups_lib.derive(model, shapes, x, train=False)
    unread = groups_lib.unread(g, params)
    if not any(u.any() for u in unread):
        raise ValueError(
            f"no removable channel in {type(model).__name__}: every channel of its "
            f"{len(g)} groups is read by some kernel (a ResNet channel goes when every reader's "
            f"input rows are zero, its batch norm constant otherwise stays in use); prune whole "
            f"groups with lottery.groups (prune, or to_density + expand), or use "
            f"lottery.sparse for unstructured masks")
    keep = [np.flatnonzero(~u) if not u.all() else np.arange(1) for u in unread]
    kept = [np.flatnonzero(~u) for u in unread]
    rest = {k: v for k, v in variables.items() if k != "params"}
    sliced = groups_lib.take(g, {"params": params, **rest}, keep)
    p = sliced["params"]
    fields, n = _resnet_fields(model)
    fields["widths"] = tuple(int(np.shape(p[f"stage{s + 1}_block0"]["conv2"]["kernel"])[-1])
                             for s in range(3))
    fields["inner"] = tuple(int(np.shape(p[f"stage{s + 1}_block{b}"]["conv1"]["kernel"])[-1])
                            for s in range(3) for b in range(n))
    new = SlimResNet(num_classes=model.num_classes, depth=model.depth, bn_init=model.bn_init,
                     bias_init=model.bias_init, **fields)
    want = jax.eval_shape(lambda: models.init(new, jax.random.key(0), (8, 8, cin)))
    got = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype), sliced)
    if jax.tree.map(lambda a: a.shape, dict(want)) != jax.tree.map(lambda a: a.shape, got):
        raise ValueError(f"cannot rebuild {type(model).__name__} from its sliced variables: the "
                         f"channel groups do not match SlimResNet's widths {fields}")
    out = {"params": jax.tree.map(jnp.asarray, p)}
    if "batch_stats" in sliced:
        out["batch_stats"] = jax.tree.map(jnp.asarray, sliced["batch_stats"])
    k_map, w_map, o_map = {}, {}, {}
    for grp, k, kk in zip(g, kept, keep):
        for layer in grp.layers:
            k_map[layer], w_map[layer], o_map[layer] = k, len(kk), grp.size
    return Compacted(new, out, k_map, w_map, o_map)
