"""Which examples each training step sees, and how they are augmented, all from the state's key.

The data order of epoch e is drawn from fold_in(key, e) (`epoch_order`: a permutation per epoch,
or independent draws), augmentation on device at step s from fold_in(key, s) ('cifar': padded
crop + flip; 'imagenet': `data.transforms.random_resized_crop_flip` of the fixed-size arrays): a
state restored from a checkpoint continues with exactly the batches it would have seen. With a
device mesh, every batch is split over its 'batch' axis: on host (`host_batch`, each process its
own rows; `place` for rows read elsewhere, e.g. streamed) or inside jit (`split`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lottery import distributed
from lottery.data import transforms

SAMPLINGS = ("epochs", "random")


def epoch_order(key, epoch, n: int, batch_size: int, sampling: str = "epochs"):
    """(steps_per_epoch, batch_size) example indices of `epoch`, drawn from fold_in(key, epoch).

    'epochs': a permutation per epoch (every example once, the usual data loader). 'random': every
    step's batch drawn independently and uniformly with replacement, as the MNIST-1D reference
    code samples `randint(0, n, batch_size)` per step (an "epoch" is then just n // batch_size
    steps).
    """
    k = jax.random.fold_in(jax.random.wrap_key_data(key), epoch)
    spe = n // batch_size
    if sampling == "random":
        return jax.random.randint(k, (spe, batch_size), 0, n)
    if sampling != "epochs":
        raise ValueError(f"sampling={sampling!r}: expected one of {SAMPLINGS}")
    return jax.random.permutation(k, n)[: spe * batch_size].reshape(spe, batch_size)


def augment_cifar(key, x):
    """Random crop with 4-pixel zero padding and random horizontal flip, per example, on device."""
    n, h, w, _ = x.shape
    k1, k2, k3 = jax.random.split(key, 3)
    padded = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    dy = jax.random.randint(k1, (n,), 0, 9)
    dx = jax.random.randint(k2, (n,), 0, 9)
    crop = jax.vmap(lambda im, a, b: jax.lax.dynamic_slice(im, (a, b, 0), (h, w, im.shape[-1])))
    x = crop(padded, dy, dx)
    flip = jax.random.bernoulli(k3, 0.5, (n,))
    return jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)


AUGMENTATIONS: dict[str, Callable | None] = {
    "none": None, "cifar": augment_cifar, "imagenet": transforms.random_resized_crop_flip}


def split(mesh, x):
    """Inside jit: `x` split over the mesh's 'batch' axis along its first axis (no-op without)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, distributed.batch_sharding(mesh))


def host_batch(data, idx, mesh, rows):
    """The training examples at `idx` ((B,) or (K, B) for replicas): this process's rows of
    them, split over `mesh`'s devices, or all rows as host arrays without a mesh."""
    if mesh is None:
        return data.x_train[idx], data.y_train[idx]
    local = idx[..., rows]
    return place(data.x_train[local], data.y_train[local], mesh, idx.shape[-1])


def place(x, y, mesh, size: int):
    """This process's rows of a batch of `size` (x (..., rows, ...), y (..., rows), the rows
    `distributed.local_rows(mesh, size)` of it) as the global batch split over `mesh`; the host
    arrays as they are without a mesh."""
    if mesh is None:
        return x, y
    axis = np.ndim(y) - 1
    return tuple(distributed.batch_from_local(a, mesh, size, axis) for a in (x, y))
