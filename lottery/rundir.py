"""Run directories: the one module that names, writes and reads them.

Every experiment kind writes its run directory through these functions and `lottery.runs` reads
it through them. A run directory is `<workdir>/<experiment>_<model>_<dataset>_<hash>/`
(`config.run_name`; the hash covers the result-determining config fields) and holds

  config.json              the config the run was started with (`create`)
  init/, rewind/           orbax: the initial variables, the state later levels rewind to
  level_<L>/               one trained network (`level_dir`):
    mask/, final/          orbax: its mask and its trained state
    checkpoint/<step>/     while training: the latest in-level checkpoint (`save_in_level`)
    metrics.jsonl          one JSON line per evaluation (`append_metrics`)
    events.out.tfevents.*  with the config's `tensorboard` on: the same records as TensorBoard
                           scalars (`EVENTS`; a metrics file's directory is a TensorBoard run)
    info.json              density, kept, total and per-layer counts of the mask (`write_info`)
    DONE                   written last: the level is complete (`mark_done`)
    controls/              imp's controls of the level: checkpoint/<step>/ (the stacked
                           replicas) while they train, <control>/{mask/, metrics.jsonl}, DONE
  .lock                    the run lock (`writing`): pid and host of the process holding it

(prune-at-init sweeps keep their cells, `<cell>/<point>/`, with the same files and markers.)
Plain files are written by process 0 only; JSON files atomically (a temporary file renamed into
place). Strict reads turn a damaged file into a ValueError naming it.

What a kill at any moment leaves is resumable without help and bit-identical to a run that was
never interrupted: checkpoints are written whole or not at all (`checkpoints.save`), directories
are deleted by first renaming them out of the way (`rmtree`: a half-deleted checkpoint or level
is never read), a level whose final/ is written but not yet marked DONE is completed without
retraining (`experiment.train_level`). One process writes a run directory at a time: every
experiment kind runs inside `writing` (`writing_all`: every seed's of a multi-seed run), which
holds an exclusive lock on `<run_dir>/.lock` (released by the OS when the holder dies, so a
killed run never blocks its restart).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from lottery import checkpoints, config as config_lib, data, distributed, masks, models

PyTree = Any

CONFIG, METRICS, INFO, DONE = "config.json", "metrics.jsonl", "info.json", "DONE"
CHECKPOINT = "checkpoint"  # in a level directory: checkpoint/<step>/ while it trains
LOCK = ".lock"  # in the run directory: held (flock) by the one process writing it
_TRASH = ".deleting"  # suffix of a directory `rmtree` is deleting


# ---- the directory of a config ----

def check_workdir(workdir: str) -> None:
    """Fail early, with the path, if `workdir` cannot be created or written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--workdir {workdir!r} is not writable ({e.strerror})") from None


def prepare(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """The run directory of a validated config (not created yet). ValueError if `workdir` is not
    writable or the directory holds a run whose result-determining fields differ."""
    check_workdir(workdir)
    run_dir = os.path.join(workdir, config_lib.run_name(cfg))
    path = os.path.join(run_dir, CONFIG)
    if os.path.exists(path):
        raw = read_json(path)
        saved = config_lib.from_saved(raw)
        if config_lib.hashed_fields(saved) != config_lib.hashed_fields(cfg):
            raise ValueError(f"{run_dir} holds a run with a different config; refusing to write "
                             f"into it (compare {path})")
        if "include" not in raw:
            _check_older_rule(run_dir, cfg)
    return run_dir


def _check_older_rule(run_dir: str, cfg: ml_collections.ConfigDict) -> None:
    """ValueError if the run in `run_dir`, made before the config field `include` existed, was
    pruned by the older default rule (every leaf with ndim >= 2) where the rule of today (the
    kernels, `masks.default_prunable`) prunes fewer leaves of its model: continuing it would mix
    the two. The rules agree on every built-in model but the ViTs."""
    data_dir = cfg.get("data_dir") or None
    shape = data.input_shape(cfg.dataset, data_dir=data_dir,
                             image_size=cfg.get("image_size") or None)
    model = config_lib.model(cfg, data.num_classes(cfg.dataset, data_dir=data_dir))
    params = jax.eval_shape(lambda: models.init(model, jax.random.key(0), shape))["params"]
    older = [p for p, leaf in zip(masks.paths(params), jax.tree.leaves(params))
             if len(leaf.shape) >= 2 and not masks.default_prunable(p, leaf)]
    if older:
        raise ValueError(f"{run_dir} was pruned by lottery's older default rule (every leaf with "
                         f"ndim >= 2), which also pruned {len(older)} leaves of {cfg.model} that "
                         f"the default (the kernels) does not ({', '.join(older[:3])}, ...): "
                         f"finish it with that version, or move it away and run again (to prune "
                         f"them too, in a new run directory: --config.include='(.*/)?kernel,"
                         f"<patterns of those leaves>')")


def create(run_dir: str, cfg: ml_collections.ConfigDict) -> None:
    """Create `run_dir` with its config.json (kept as it is when the run already exists)."""
    os.makedirs(run_dir, exist_ok=True)
    if not os.path.exists(os.path.join(run_dir, CONFIG)):
        write_json(os.path.join(run_dir, CONFIG), cfg.to_dict())


@contextlib.contextmanager
def writing(run_dir: str, cfg: ml_collections.ConfigDict):
    """Hold the run directory's lock (`lock`) and create it (`create`): every experiment kind
    writes its run directory only inside this, so nothing is written before the lock is held."""
    with writing_all([run_dir], [cfg]):
        yield


@contextlib.contextmanager
def writing_all(run_dirs, cfgs):
    """`writing` for several run directories (the seeds of a multi-seed run): every lock is held
    before any directory is created. When a lock is refused, the ValueError propagates and the
    directories this call made for its lock files are removed again: nothing is written."""
    with contextlib.ExitStack() as stack:
        made = []
        try:
            for run_dir in run_dirs:
                new = not os.path.exists(run_dir)
                stack.enter_context(lock(run_dir))
                made += [run_dir] if new else []
        except ValueError:
            for run_dir in made:  # still locked by this process: nobody else is in them
                os.remove(os.path.join(run_dir, LOCK))
                os.rmdir(run_dir)
            raise
        for run_dir, cfg in zip(run_dirs, cfgs):
            create(run_dir, cfg)
        stack.enter_context(_tensorboard([d for d, c in zip(run_dirs, cfgs)
                                          if c.get("tensorboard", False)]))
        yield


@contextlib.contextmanager
def lock(run_dir: str):
    """Hold an exclusive lock on `run_dir` (flock on `<run_dir>/.lock`) until the block ends.

    The holder writes its pid and host into the lock file. A second process gets a ValueError
    naming them and has written nothing (the file is opened without truncating it and only
    written once the lock is held). The OS releases the lock when its holder exits or is killed,
    so a stale lock file never blocks a restart. Multi-host: process 0 locks; the others do not
    write plain files and do not lock.
    """
    if not distributed.is_main_process():
        yield
        return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise ValueError(f"run directory {run_dir} is in use by {_holder(fd)} (lock "
                             f"{path}); wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "hostname": socket.gethostname()}).encode())
        os.fsync(fd)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """'process N on host H' from a held lock file (what its holder wrote into it)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"process {int(info['pid'])} on host {info['hostname']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its pid yet)"


def hint(run_dir: str, level: int) -> str:
    """What to do about a damaged level: the sentence every error about one ends with."""
    return (f"Rerun with --discard-level {level} to delete level {level} of {run_dir} and "
            f"train it again (levels after it are deleted too).")


# ---- plain files ----

def rmtree(path: str) -> None:
    """Delete a directory if it exists, as one step for its readers: it is first renamed to
    `<path>.deleting` (which no reader looks at), then deleted, so a kill never leaves a
    half-deleted checkpoint, level or cell under its own name; a `<path>.deleting` a kill left
    is deleted too. Process 0 only: the others share its filesystem."""
    if not distributed.is_main_process():
        return
    _close_events(path, below=True)
    trash = path + _TRASH
    if os.path.lexists(path):
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def write_json(path: str, obj) -> None:
    """Write `obj` as JSON to `path` atomically (process 0 only)."""
    if not distributed.is_main_process():
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    """The JSON value in `path`; ValueError naming the file if it is not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column "
                         f"{e.colno}); it was damaged or edited") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (not UTF-8 text: {e.reason})") from None


def read_jsonl(path: str, *, complete: bool = False) -> list[dict]:
    """The records of a JSON-lines file ([] if it does not exist). The last line of a file still
    being written (`complete` False) may be cut short by an interrupted write: it is dropped.
    Any other invalid line, and a cut line in a finished file, is a ValueError naming the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = [ln for ln in f.read().split(b"\n") if ln.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if i == len(lines) - 1 and not complete:
                break  # cut short by an interrupted write: everything before it is valid
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
            raise ValueError(f"{path}: record {i + 1} of {len(lines)} is not valid JSON "
                             f"({msg}); the file was cut short or damaged") from None
    return out


def read_metrics(path: str, *, partial_last: bool = False) -> list[dict]:
    """The JSON lines of a metrics file ([] if it does not exist). An invalid line is a
    ValueError naming the file, except, with `partial_last`, a last line cut short (what a
    kill leaves in a level being resumed; it is written again), which is dropped."""
    return read_jsonl(path, complete=not partial_last)


def ends_at(path: str, step: int) -> bool:
    """Whether the metrics file at `path` has records and its last one is at `step` (a last
    line cut short by a kill does not count)."""
    recs = read_metrics(path, partial_last=True)
    return bool(recs) and recs[-1].get("step") == step


def _to_py(v):
    v = np.asarray(v)
    return v.tolist() if v.ndim else v.item()


def append_metrics(path: str, record: dict) -> None:
    """Append `record` (numbers or arrays) as one JSON line, flushed to disk (process 0 only),
    and, with tensorboard on, as scalars to the event file beside it (first: a kill between the
    two leaves metrics.jsonl short, and resuming truncates both to the checkpoint)."""
    if not distributed.is_main_process():
        return
    record = {k: _to_py(v) for k, v in record.items()}
    _write_events(path, [record])
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(path: str, last_step: int | None) -> None:
    """Drop the lines written after the checkpoint at `last_step` that training resumes from
    (they will be written again; a cut last line goes too), or, for None (training starts over),
    the whole file. The event files beside it are deleted and, with tensorboard on, written
    again with the records kept: each step once, as in metrics.jsonl. Process 0 only."""
    if not distributed.is_main_process():
        return
    if last_step is None:
        if os.path.exists(path):
            os.remove(path)
        _restart_events(path, [])
        return
    kept = [r for r in read_metrics(path, partial_last=True) if r["step"] <= last_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)
    _restart_events(path, kept)


# ---- TensorBoard event files: the metrics files' records, for watching a run live ----
#
# Written with tensorboardX's synchronous `EventsWriter`, each record flushed and fsynced as
# metrics.jsonl is. (Its `SummaryWriter` hands events to a thread that writes them every
# `flush_secs`, and names its file by the second: two opened in one second overwrite each other.)
# A directory's event file is only ever started where its older ones were deleted (a metrics file
# truncated, a directory deleted), and starts with a SessionLog START at step 0: a TensorBoard
# that had read the older ones drops what it holds of them (its purge of orphaned data) instead of
# showing both.

EVENTS = "events.out.tfevents"  # the name every event file starts with
_BOARDS: dict[str, dict[str, Any]] = {}  # run dir written with tensorboard on: {dir: writer}


@contextlib.contextmanager
def _tensorboard(run_dirs: list[str]):
    """Event files for the records appended under `run_dirs` until the block ends, when the
    writers are closed (process 0 only)."""
    roots = [os.path.abspath(d) for d in run_dirs] if distributed.is_main_process() else []
    _BOARDS.update({r: {} for r in roots})
    try:
        yield
    finally:
        for r in roots:
            for writer in _BOARDS.pop(r).values():
                writer.close()


def _board(path: str) -> dict[str, Any] | None:
    """The writers of the run directory holding `path`, if it is written with tensorboard on."""
    path = os.path.abspath(path)
    return next((b for r, b in _BOARDS.items() if path.startswith(r + os.sep)), None)


def _write_events(path: str, records: list[dict]) -> None:
    """The numbers of `records` (JSON values, as in the metrics file `path`) as scalars at their
    step, one event per record, in an event file beside `path`; nothing if tensorboard is off."""
    board, where = _board(path), os.path.dirname(os.path.abspath(path))
    if board is None or not records:
        return
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.proto.summary_pb2 import Summary

    if where not in board:
        board[where] = EventsWriter(os.path.join(where, "events"), f".{os.getpid()}")
        board[where].write_event(Event(wall_time=time.time(), step=0,
                                       session_log=SessionLog(status=SessionLog.START)))
    for r in records:
        values = [Summary.Value(tag=k, simple_value=v) for k, v in r.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        board[where].write_event(Event(wall_time=time.time(), step=int(r["step"]),
                                       summary=Summary(value=values)))
    board[where].flush()


def _restart_events(path: str, records: list[dict]) -> None:
    """Delete the event files beside the metrics file `path` and, with tensorboard on, write
    `records` to a new one."""
    where = os.path.dirname(os.path.abspath(path))
    _close_events(where, below=False)
    for name in os.listdir(where) if os.path.isdir(where) else []:
        if name.startswith(EVENTS):
            os.remove(os.path.join(where, name))
    _write_events(path, records)


def _close_events(path: str, *, below: bool) -> None:
    """Close the event writer open in directory `path` (and, `below`, those in directories
    under it)."""
    path = os.path.abspath(path)
    for board in _BOARDS.values():
        for where in [w for w in board if w == path or below and w.startswith(path + os.sep)]:
            board.pop(where).close()


def write_info(path: str, mask: PyTree, rates: PyTree) -> None:
    """path/info.json: density, kept, total and per-layer {path: {kept, total}} of a mask."""
    counts = masks.counts(mask, rates)
    kept, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
    write_json(os.path.join(path, INFO), {
        "density": kept / total, "kept": kept, "total": total,
        "layers": {p: {"kept": k, "total": t} for p, (k, t) in counts.items()}})


# ---- levels and completion markers ----

def level_dir(run_dir: str, level: int) -> str:
    return os.path.join(run_dir, f"level_{level}")


def levels(run_dir: str) -> list[int]:
    """The numbers of the level directories in `run_dir`, complete or not, ascending."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    return sorted(int(n[6:]) for n in names if n.startswith("level_") and n[6:].isdigit()
                  and os.path.isdir(os.path.join(run_dir, n)))


def done_levels(run_dir: str) -> list[int]:
    """The complete levels of `run_dir` (their DONE file exists), ascending."""
    return [lv for lv in levels(run_dir) if is_done(level_dir(run_dir, lv))]


def is_done(path: str) -> bool:
    return os.path.exists(os.path.join(path, DONE))


def mark_done(path: str) -> None:
    write_json(os.path.join(path, DONE), {"done": True})


# ---- in-level checkpoints ----

def latest_checkpoint(ldir: str) -> tuple[int, str] | None:
    """(step, path) of the level's latest complete in-level checkpoint (`checkpoints.exists`:
    one a kill left half-written or half-deleted is never picked), or None."""
    ckdir = os.path.join(ldir, CHECKPOINT)
    steps = sorted(int(d) for d in os.listdir(ckdir)
                   if d.isdigit() and checkpoints.exists(os.path.join(ckdir, d))) \
        if os.path.isdir(ckdir) else []
    return (steps[-1], os.path.join(ckdir, str(steps[-1]))) if steps else None


def save_in_level(ldir: str, step: int, tree: PyTree) -> None:
    """Save `tree` as the level's checkpoint at `step` and delete everything else in its
    checkpoint directory (earlier checkpoints, what a kill left)."""
    ckdir = os.path.join(ldir, CHECKPOINT)
    path = os.path.join(ckdir, str(step))
    if os.path.exists(path) and not checkpoints.exists(path):
        rmtree(path)  # an incomplete directory of an older version
    checkpoints.save(path, tree)
    for old in sorted(os.listdir(ckdir)):
        if old.endswith(_TRASH):
            if distributed.is_main_process():
                shutil.rmtree(os.path.join(ckdir, old), ignore_errors=True)
        elif old != str(step):
            rmtree(os.path.join(ckdir, old))


# ---- discarding levels ----

def check_discard(run_dir: str, level: int) -> None:
    """ValueError, before anything is deleted, unless `level` is in 0..the last level of
    `run_dir` (0 also discards init and rewind, so it is valid once the run directory exists)."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"--discard-level {level}: there is no run to discard from ({run_dir} "
                         f"does not exist)")
    last = max(levels(run_dir), default=0)
    if not 0 <= level <= last:
        raise ValueError(f"--discard-level {level}: expected a level in 0..{last} (the levels of "
                         f"{run_dir})")


def discard_level(run_dir: str, level: int) -> None:
    """Delete level `level` and every later level (and the rewind point if level is 0)."""
    for lv in levels(run_dir):
        if lv >= level:
            rmtree(level_dir(run_dir, lv))
    if level == 0:
        for name in ("rewind", "init"):
            rmtree(os.path.join(run_dir, name))
