"""TensorBoard event files (config field `tensorboard`): every metrics.jsonl's records as scalars at
their step, in event files beside it, read back here by parsing the files (TFRecord framing around
`Event` protos) and compared with metrics.jsonl exactly; after a kill and a resume each step is
there once, as in metrics.jsonl; writers closed when the run ends; off by default."""

import glob
import os
import struct
import sys
import threading

import numpy as np
import pytest
from _tiny_run import write_config

from lottery import config, experiment, imp, rundir

pytest.importorskip("tensorboardX")
from tensorboardX.proto.event_pb2 import Event, SessionLog  # noqa: E402


def read_events(directory: str) -> list[tuple[int, dict]]:
    """[(step, {tag: value})] of every scalar event in `directory`'s event files, in order. Each
    file starts with its version and a SessionLog START at step 0 (TensorBoard then drops what it
    read of older files of the directory)."""
    out = []
    for path in sorted(glob.glob(os.path.join(directory, rundir.EVENTS + "*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos, events = 0, []
        while pos < len(data):  # a record: length (8 bytes), its CRC (4), the proto, its CRC (4)
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(Event.FromString(data[pos + 12:pos + 12 + n]))
            pos += 12 + n + 4
        assert pos == len(data), path
        assert events[0].file_version == "brain.Event:2"
        assert events[1].session_log.status == SessionLog.START and events[1].step == 0
        out += [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[2:]]
    return out


def expected(records: list[dict]) -> list[tuple[int, dict]]:
    """The records as TensorBoard holds them: scalars are float32 (`simple_value`)."""
    return [(r["step"], {k: float(np.float32(v)) for k, v in r.items() if k != "step"})
            for r in records]


def open_event_files() -> list[str]:
    fds = "/proc/self/fd"
    links = [os.readlink(os.path.join(fds, fd)) for fd in os.listdir(fds)
             if os.path.islink(os.path.join(fds, fd))]
    return [p for p in links if rundir.EVENTS in p]


class Crash(BaseException):
    """A simulated kill: not an Exception, so nothing in the run catches it."""


def test_events_mirror_metrics_after_kills_and_resumes(tmp_path, monkeypatch):
    """Killed once in level 1's training and once in its controls' (each after the evaluation
    at step 40 was written and before the checkpoint at 40): both resume from step 20, writing
    40 and 60 again. Every metrics.jsonl then holds steps 20, 40, 60 once, and so do the event
    files beside it (rewritten on resume: one file per directory)."""
    cfg_path = write_config(tmp_path / "tb.py", levels=1, controls="reinit", control_seeds=1,
                            checkpoint_seconds=0.0, tensorboard=True)
    setups = {}
    monkeypatch.setattr(imp, "Setup", lambda c: setups.setdefault(  # compile once, not per run
        config.run_name(c), experiment.Setup(c)))
    save = rundir.save_in_level

    def run(kill_in=None):
        def save_or_kill(ldir, step, tree):
            if kill_in is not None and ldir.endswith(kill_in) and step == 40:
                raise Crash(ldir)
            return save(ldir, step, tree)

        with monkeypatch.context() as mp:
            mp.setattr(rundir, "save_in_level", save_or_kill)
            return imp.find_ticket(config.load(cfg_path), str(tmp_path / "runs"))

    for where in ("level_1", os.path.join("level_1", "controls")):
        with pytest.raises(Crash):
            run(kill_in=where)
        assert open_event_files() == []  # the writers were closed on the way out
    run_dir = run()
    assert open_event_files() == [] and not [
        t for t in threading.enumerate() if type(t).__module__.startswith("tensorboardX")]

    metrics = sorted(glob.glob(os.path.join(run_dir, "**", rundir.METRICS), recursive=True))
    assert [os.path.relpath(p, run_dir) for p in metrics] == [
        "level_0/metrics.jsonl", "level_1/controls/reinit_s0/metrics.jsonl",
        "level_1/metrics.jsonl"]
    for path in metrics:
        records = rundir.read_metrics(path)
        assert [r["step"] for r in records] == [20, 40, 60]
        events = read_events(os.path.dirname(path))
        assert events == expected(records), path
        assert set(events[0][1]) == {"train_loss", "test_loss", "test_accuracy"}
        assert len(glob.glob(os.path.join(os.path.dirname(path), rundir.EVENTS + "*"))) == 1


def _cfg(**fields):
    cfg = config.base()
    cfg.update(fields)
    return cfg


RECORDS = [{"step": s, "train_loss": 1.0 / s, "test_accuracy": 0.1 * s, "density": 0.5}
           for s in (1, 2, 3)]


def test_append_truncate_and_rmtree(tmp_path):
    run_dir = str(tmp_path / "run")
    path = os.path.join(run_dir, "level_0", rundir.METRICS)
    with rundir.writing(run_dir, _cfg(tensorboard=True)):
        os.makedirs(os.path.dirname(path))
        for r in RECORDS:
            rundir.append_metrics(path, {k: np.float32(v) if k != "step" else v
                                         for k, v in r.items()})
        assert read_events(os.path.dirname(path)) == expected(rundir.read_metrics(path))
        assert len(open_event_files()) == 1  # open while the run writes, flushed per record
        rundir.truncate_metrics(path, 1)  # resuming from the checkpoint at step 1
        rundir.append_metrics(path, RECORDS[2])
        assert [s for s, _ in read_events(os.path.dirname(path))] == [1, 3]
        assert read_events(os.path.dirname(path)) == expected(rundir.read_metrics(path))
        control = os.path.join(os.path.dirname(path), "controls", "c", rundir.METRICS)
        os.makedirs(os.path.dirname(control))
        rundir.append_metrics(control, RECORDS[0])
        rundir.truncate_metrics(path, 3)  # the level's writer restarts, not the control's
        rundir.append_metrics(control, RECORDS[1])
        assert read_events(os.path.dirname(control)) == expected(rundir.read_metrics(control))
        assert len(glob.glob(os.path.join(os.path.dirname(control), rundir.EVENTS + "*"))) == 1
        rundir.truncate_metrics(path, None)  # starting over
        assert read_events(os.path.dirname(path)) == [] and len(open_event_files()) == 1
        rundir.append_metrics(path, RECORDS[0])
        rundir.rmtree(os.path.dirname(path))  # a deleted level: its writers are closed with it
        assert open_event_files() == [] and not os.path.exists(path)
    assert open_event_files() == []


def test_off_by_default_and_outside_a_run(tmp_path):
    run_dir = str(tmp_path / "run")
    path = os.path.join(run_dir, rundir.METRICS)
    with rundir.writing(run_dir, _cfg()):
        rundir.append_metrics(path, RECORDS[0])
    rundir.append_metrics(path, RECORDS[1])  # not inside `writing`: no event file either
    assert glob.glob(os.path.join(run_dir, rundir.EVENTS + "*")) == []
    assert len(rundir.read_metrics(path)) == 2
    assert config.base().tensorboard is False
    assert config.run_name(_cfg(tensorboard=True)) == config.run_name(config.base())


def test_missing_library_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
    with pytest.raises(ValueError, match=r"^tensorboard=True: the tensorboardX package is not "
                                         r"installed; pip install 'lottery\[tensorboard\]'"):
        config.validate(_cfg(tensorboard=True))
    config.validate(_cfg())
