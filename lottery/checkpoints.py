"""Orbax checkpoints of pytrees: atomic writes, no silent overwrite, clear errors on corruption.

Every checkpoint carries the SHA-256 of each array's bytes (with its dtype and shape) in
`checksums.json` inside its directory, and `restore` recomputes them: a flipped byte in any data
file is a `CorruptCheckpointError`, never a resume from damaged weights. A save is atomic as a
whole: orbax writes `<path>.partial`, the checksums are added to it, and only then is it renamed
to `<path>`, so a checkpoint exists (`exists`) only once everything, checksums included, is
complete. A crash at any point leaves at most a `<path>.partial*` directory, which the next save
of `<path>` removes.

Checkpoints written by older versions have no `checksums.json`: they restore as before,
unverified (a flip in their data may go unnoticed, as it did then).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import sys
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from lottery import distributed

PyTree = Any

CHECKSUMS = "checksums.json"  # inside the checkpoint directory: {'format', 'arrays': {...}}
_PARTIAL = ".partial"  # suffix of the directory a save writes before renaming it
_DETAIL_CHARS = 300  # longest orbax/tensorstore error detail quoted in a message


class CorruptCheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read; the message names its path and what to do."""


_CHECKPOINTER = None


def _checkpointer():
    global _CHECKPOINTER
    if _CHECKPOINTER is None:
        _CHECKPOINTER = ocp.StandardCheckpointer()
        _quiet_closed_loop_callbacks()
    return _CHECKPOINTER


def _quiet_closed_loop_callbacks() -> None:
    """Drop the leftovers of a failed restore that Python would print after our one-line error.

    Orbax reads all arrays concurrently on a fresh event loop (`asyncio_utils.run_sync`) and
    closes the loop as soon as one read fails. Tensorstore's reads still in flight then finish
    and call `loop.call_soon_threadsafe` on the closed loop: Python prints each such
    "RuntimeError: Event loop is closed" through `sys.unraisablehook` (object None). And the
    read tasks that failed after the first are garbage-collected later with their exceptions
    unretrieved, which asyncio logs ("Task exception was never retrieved"). Only these two
    are dropped; everything else goes where it went before.
    """
    previous = sys.unraisablehook

    def hook(unraisable):
        if (unraisable.object is None and unraisable.exc_type is RuntimeError
                and str(unraisable.exc_value) == "Event loop is closed"):
            return
        previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_drop_orphaned_read_errors)


def _drop_orphaned_read_errors(record: logging.LogRecord) -> bool:
    """False (drop) for asyncio's report of a tensorstore read task whose error nobody awaited
    (the first failure of the same restore was already reported)."""
    if not str(record.msg).startswith("Task exception was never retrieved"):
        return True
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and "tensorstore" in str(exc).lower())


def exists(path: str) -> bool:
    """True if a finished checkpoint is at `path`: `save` renames its whole directory into place
    only once orbax's files and the checksums are complete (orbax's own metadata file is what
    marks older checkpoints, written before checksums, as finished)."""
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA"))


def _leaf_path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in keys)


def checksums(tree: PyTree) -> dict[str, dict]:
    """{leaf path: {'dtype', 'shape', 'sha256'}} of the arrays of a (state-dict) pytree."""
    out = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        out[_leaf_path(keys)] = {"dtype": a.dtype.str, "shape": list(a.shape),
                                 "sha256": hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()}
    return out


def _remove_partial(path: str) -> None:
    """Remove what an interrupted save of `path` left: `<path>.partial` and orbax's temporary
    directories beside it."""
    for stale in glob.glob(glob.escape(path + _PARTIAL) + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path: str, tree: PyTree) -> None:
    """Write `tree` to `path` atomically, with a checksum of every array.

    Orbax writes `<path>.partial` (through its own temporary dir), `checksums.json` is added to
    it, and the whole directory is renamed to `<path>`: `<path>` exists only once complete.
    Refuses to overwrite an existing checkpoint: results are never silently replaced.
    A collective with several processes: every process calls it, process 0 renames.
    """
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"checkpoint {path} already exists; not overwriting it")
    tree = flax.serialization.to_state_dict(tree)
    tree = jax.tree.map(np.asarray, tree)
    partial = path + _PARTIAL
    main = distributed.is_main_process()
    if main:
        _remove_partial(path)
    distributed.barrier("lottery.checkpoints.save.start")
    ck = _checkpointer()
    ck.save(partial, tree)
    ck.wait_until_finished()
    if main:
        sums = os.path.join(partial, CHECKSUMS)
        with open(sums, "w") as f:
            json.dump({"format": 1, "algorithm": "sha256", "arrays": checksums(tree)}, f,
                      indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(partial)
        os.rename(partial, path)
        _fsync_dir(os.path.dirname(path))
    distributed.barrier("lottery.checkpoints.save.done")  # the others see `path` from here on


def restore(path: str, like: PyTree | None = None, *, hint: str = "") -> PyTree:
    """Read the checkpoint at `path`; with `like`, into that structure (e.g. a TrainState).

    Every array is checked against the checksums saved with it; checkpoints of older versions,
    saved without checksums, are restored unverified. Any failure to read, and any array that
    differs from what was saved, is a CorruptCheckpointError naming the path and `hint` (what to
    do).
    """
    path = os.path.abspath(path)
    if not exists(path):
        raise CorruptCheckpointError(f"checkpoint {path} is missing or incomplete. {hint}".strip())
    try:
        raw = _checkpointer().restore(path)
        _verify(path, raw, hint)
        if like is None:
            return raw
        template = flax.serialization.to_state_dict(like)
        _check_shapes(template, raw, path)
        return flax.serialization.from_state_dict(like, jax.tree.map(np.asarray, raw))
    except CorruptCheckpointError:
        raise
    except Exception as e:  # orbax/tensorstore raise many kinds; all mean "cannot read"
        raise CorruptCheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {_detail(e)}). {hint}".strip()
        ) from e


def _detail(e: BaseException, limit: int = _DETAIL_CHARS) -> str:
    """The first line of an error's message, cut at a word boundary with '…' if very long."""
    lines = str(e).strip().splitlines()
    line = lines[0].strip() if lines else ""
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0] if " " in line[:limit] else line[:limit]
    return cut.rstrip(" ,;:") + "…"


def _verify(path: str, raw: PyTree, hint: str) -> None:
    """Compare the restored arrays with the checksums saved with them (none: older checkpoint,
    restored unverified)."""
    sums_path = os.path.join(path, CHECKSUMS)
    if not os.path.exists(sums_path):
        return

    def corrupt(what: str):
        return CorruptCheckpointError(f"checkpoint {path} is corrupt: {what}. {hint}".strip())

    try:
        with open(sums_path) as f:
            saved = json.load(f)["arrays"]
        if not isinstance(saved, dict):
            raise TypeError("'arrays' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise corrupt(f"its checksum file {CHECKSUMS} cannot be read ({_detail(e)})") from None
    got = checksums(raw)
    if set(got) != set(saved):
        diff = sorted(set(got) ^ set(saved))
        raise corrupt(f"it holds other arrays than were saved (differing: "
                      f"{', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''})")
    for name, want in saved.items():
        if got[name] != want:
            raise corrupt(f"array {name} differs from what was saved (checksum mismatch)")


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
