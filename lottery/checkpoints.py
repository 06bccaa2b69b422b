"""Orbax checkpoints of pytrees: atomic writes, no silent overwrite, clear errors on corruption."""

from __future__ import annotations

import os
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


class CorruptCheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read; the message names its path and what to do."""


_CHECKPOINTER = None


def _checkpointer():
    global _CHECKPOINTER
    if _CHECKPOINTER is None:
        _CHECKPOINTER = ocp.StandardCheckpointer()
    return _CHECKPOINTER


def exists(path: str) -> bool:
    """True if a finished checkpoint is at `path` (orbax renames its temporary dir when done)."""
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA"))


def save(path: str, tree: PyTree) -> None:
    """Write `tree` to `path` atomically (orbax writes a temporary dir and renames it).

    Refuses to overwrite an existing checkpoint: results are never silently replaced.
    """
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"checkpoint {path} already exists; not overwriting it")
    tree = flax.serialization.to_state_dict(tree)
    tree = jax.tree.map(np.asarray, tree)
    ck = _checkpointer()
    ck.save(path, tree)
    ck.wait_until_finished()


def restore(path: str, like: PyTree | None = None, *, hint: str = "") -> PyTree:
    """Read the checkpoint at `path`; with `like`, into that structure (e.g. a TrainState).

    Any failure to read is a CorruptCheckpointError naming the path and `hint` (what to do).
    """
    path = os.path.abspath(path)
    if not exists(path):
        raise CorruptCheckpointError(f"checkpoint {path} is missing or incomplete. {hint}".strip())
    try:
        raw = _checkpointer().restore(path)
        if like is None:
            return raw
        template = flax.serialization.to_state_dict(like)
        _check_shapes(template, raw, path)
        return flax.serialization.from_state_dict(like, jax.tree.map(np.asarray, raw))
    except CorruptCheckpointError:
        raise
    except Exception as e:  # orbax/tensorstore raise many kinds; all mean "cannot read"
        raise CorruptCheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})."
            f" {hint}".strip()) from e


def _check_shapes(template, raw, path):
    t_leaves = jax.tree_util.tree_flatten_with_path(template)[0]
    r_leaves = jax.tree_util.tree_flatten_with_path(raw)[0]
    if len(t_leaves) != len(r_leaves):
        raise CorruptCheckpointError(f"checkpoint {path} has {len(r_leaves)} arrays, expected "
                                     f"{len(t_leaves)}")
    for (tp, t), (_, r) in zip(t_leaves, r_leaves):
        if np.shape(t) != np.shape(r):
            raise CorruptCheckpointError(
                f"checkpoint {path}: {jax.tree_util.keystr(tp)} has shape {np.shape(r)}, "
                f"expected {np.shape(t)}")
