"""Checkpoints: every flipped byte in a checkpoint's files is reported or harmless, old checkpoints
without checksums still restore, and saves are atomic as a whole."""

import os
import shutil

import jax
import numpy as np
import pytest

from lottery import checkpoints


def _tree():
    rng = np.random.default_rng(0)
    return {"params": {"w": rng.normal(size=(64, 32)).astype(np.float32),
                       "b": np.arange(32, dtype=np.float32)},
            "mask": rng.random((64, 32)) > 0.5,
            "step": np.asarray(7, np.int32),
            "key": np.array([1, 2], np.uint32)}


def _identical(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
            and all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
                    for x, y in zip(la, lb)))


def _files(path):
    return sorted(os.path.relpath(os.path.join(r, f), path)
                  for r, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    path = str(root / "ck")
    tree = _tree()
    checkpoints.save(path, tree)
    return path, tree


def test_save_writes_checksums_and_restores(saved):
    path, tree = saved
    assert checkpoints.exists(path)
    assert checkpoints.CHECKSUMS in os.listdir(path)
    assert not [p for p in os.listdir(os.path.dirname(path)) if p != "ck"]  # nothing partial
    assert _identical(checkpoints.restore(path), tree)
    with pytest.raises(FileExistsError):
        checkpoints.save(path, tree)


def test_every_flip_in_every_file_is_reported_or_harmless(saved, tmp_path):
    """XOR 16 bytes at several offsets of every file of the checkpoint: restore raises
    CorruptCheckpointError or returns exactly the saved arrays, never other numbers."""
    path, tree = saved
    files = _files(path)
    assert len(files) >= 5 and checkpoints.CHECKSUMS in files
    reported, payload_reported = 0, False
    payload = max(files, key=lambda f: os.path.getsize(os.path.join(path, f)))  # w's bytes
    for rel in files:
        size = os.path.getsize(os.path.join(path, rel))
        for off in sorted({0, size // 3, size // 2, max(0, size - 16)}):
            victim = str(tmp_path / f"flip_{len(os.listdir(tmp_path))}")
            shutil.copytree(path, victim)
            with open(os.path.join(victim, rel), "r+b") as f:
                f.seek(off)
                chunk = f.read(16)
                f.seek(off)
                f.write(bytes(b ^ 0xA5 for b in chunk))
            try:
                out = checkpoints.restore(victim, hint="HINT")
            except checkpoints.CorruptCheckpointError as e:
                msg = str(e)
                assert victim in msg and msg.endswith("HINT") and "\n" not in msg, msg
                reported += 1
                if rel == payload and 0 < off < size - 16:
                    assert "checksum mismatch" in msg, msg  # read fine, caught by the checksum
                    payload_reported = True
            else:
                assert _identical(out, tree), f"a flip at {rel}:{off} changed the arrays silently"
            shutil.rmtree(victim)
    assert payload_reported and reported >= 10


def test_checksum_file_damage_and_missing_arrays_are_reported(saved, tmp_path):
    path, tree = saved
    victim = str(tmp_path / "ck")
    shutil.copytree(path, victim)
    with open(os.path.join(victim, checkpoints.CHECKSUMS), "w") as f:
        f.write('{"format": 1, "arr')  # cut short
    with pytest.raises(checkpoints.CorruptCheckpointError, match="checksum file"):
        checkpoints.restore(victim)
    with open(os.path.join(victim, checkpoints.CHECKSUMS), "w") as f:
        f.write('{"format": 1, "arrays": {}}')
    with pytest.raises(checkpoints.CorruptCheckpointError, match="other arrays than were saved"):
        checkpoints.restore(victim)


def test_checkpoint_without_checksums_restores_unverified(saved, tmp_path):
    """Run directories of older versions have no checksums.json: they still open."""
    path, tree = saved
    old = str(tmp_path / "old")
    shutil.copytree(path, old)
    os.remove(os.path.join(old, checkpoints.CHECKSUMS))
    assert checkpoints.exists(old)
    assert _identical(checkpoints.restore(old), tree)
    like = jax.tree.map(np.zeros_like, tree)
    assert _identical(checkpoints.restore(old, like), tree)


def test_interrupted_save_leaves_no_checkpoint(tmp_path):
    """A crash before the final rename leaves only `<path>.partial`: the checkpoint does not
    exist, and the next save removes the leftover and succeeds."""
    path = str(tmp_path / "ck")
    checkpoints.save(path + ".partial", _tree())  # what a crash after orbax's rename leaves
    os.makedirs(path + ".partial.orbax-checkpoint-tmp-123")  # and a crash inside orbax
    assert not checkpoints.exists(path)
    with pytest.raises(checkpoints.CorruptCheckpointError, match="missing or incomplete"):
        checkpoints.restore(path)
    checkpoints.save(path, _tree())
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert _identical(checkpoints.restore(path), _tree())


def test_error_detail_is_cut_at_a_word_boundary():
    long = ValueError("first line " + "word " * 100 + "\nsecond line")
    d = checkpoints._detail(long)
    assert d.endswith("…") and len(d) <= checkpoints._DETAIL_CHARS + 1
    assert d[:-1].split(" ")[-1] == "word"  # a whole word before the ellipsis
    assert checkpoints._detail(ValueError("short\nmore")) == "short"
