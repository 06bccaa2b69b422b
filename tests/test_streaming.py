"""Streaming input (`lottery.data.stream`): a TFDS dataset of images of varying size read by grain
while training runs gives the batches the in-memory arrays give, resumes mid-epoch bit for bit,
runs IMP end to end, and in a job of 2 processes x 2 CPU devices each process reads only its
rows of every batch.

The datasets are made here, offline: the 240 + 60 JPEG/PNG images of `test_data_images` and, for
IMP, 2,000 + 400 JPEGs of 10..47 px. The multi-process job runs as 2 subprocesses of this file
(`python tests/test_streaming.py process <data dir> <out>`), started by a module fixture.
"""

import io
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import _processes as processes
from PIL import Image
from test_data_images import NAME, VaryingImages

from lottery import batches, checkpoints, config, data, imp, masks, rundir
from lottery import train as T
from lottery.data import stream

SIZE = 16  # images are brought to SIZE x SIZE
BATCH = 20  # 240 training images: 12 steps per epoch
STEPS = 18  # one and a half epochs
HALF = BATCH // 2
pytestmark = pytest.mark.usefixtures("fast_compile")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(4, name="out")(x)


TX = T.optimizer("sgd", 0.05, momentum=0.9)


def problem(seed=0):
    """Model, a dense mask and the initial state: the same in every process."""
    model = MLP()
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)))
    return model, masks.init(variables["params"]), T.init_state(variables, TX,
                                                                jax.random.key(seed + 2))


def trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data dir holding the 240 + 60 images of `test_data_images`, prepared as array_record."""
    path = str(tmp_path_factory.mktemp("stream_data"))
    VaryingImages(data_dir=path).download_and_prepare(file_format="array_record")
    data.prepare(NAME, data_dir=path)  # and its statistics, before processes read them
    return path


def load(root, input, **kw):
    return data.load(NAME, data_dir=root, image_size=SIZE, input=input, **kw)


# ---------------------------------------------------------------------------------------------
# Streamed and in-memory batches


def test_streamed_columns_read_what_memory_holds(root, monkeypatch):
    mem, st = load(root, "memory"), load(root, "stream", workers=0)
    assert not stream.streamed(mem) and stream.streamed(st)
    for a, b in zip(mem[:4], st[:4]):
        assert b.shape == a.shape and b.dtype == a.dtype and len(b) == len(a)
    idx = np.array([[3, 239, 0], [7, 7, 100]])
    assert np.array_equal(st.x_train[idx], mem.x_train[idx])  # bitwise
    assert np.array_equal(st.y_train[idx], mem.y_train[idx])
    assert np.array_equal(st.x_test[10:20], mem.x_test[10:20])
    assert np.array_equal(st.y_test[:], mem.y_test)
    with pytest.raises(TypeError, match="streamed, not held in memory"):
        np.asarray(st.x_train)
    # 'auto' streams above the threshold (float32 arrays: 300 x 16 x 16 x 3 x 4 bytes)
    monkeypatch.setattr(data, "STREAM_ABOVE", 300 * SIZE * SIZE * 3 * 4)
    assert not stream.streamed(load(root, "auto"))
    monkeypatch.setattr(data, "STREAM_ABOVE", 300 * SIZE * SIZE * 3 * 4 - 1)
    assert stream.streamed(load(root, "auto"))
    with pytest.raises(ValueError, match="input='disk': expected one of auto, memory, stream"):
        load(root, "disk")


def test_grain_reads_each_steps_batch_in_worker_processes(root):
    """Two epochs of `epoch_order`: batch i is the in-memory x[order[i]] bit for bit; read by 2
    grain worker processes with the host train policy, the same crops (in the same order) as
    read here, and other crops at another step."""
    mem, st = load(root, "memory"), load(root, "stream", workers=2)
    key = jax.random.key_data(jax.random.key(5))
    order = np.concatenate([np.asarray(batches.epoch_order(key, e, 240, BATCH))
                            for e in range(2)])
    got = list(stream.batches(st.x_train, order, workers=0))
    assert len(got) == len(order) == 24
    for (x, y), idx in zip(got, order):
        assert np.array_equal(x, mem.x_train[idx]) and np.array_equal(y, mem.y_train[idx])
    aug = (np.asarray(key), 7, 0)
    two = [(np.array(x), np.array(y)) for x, y in stream.batches(st.x_train, order, augment=aug)]
    here = list(stream.batches(st.x_train, order, augment=aug, workers=0))
    later = [x for x, _ in stream.batches(st.x_train, order, augment=(key, 8, 0), workers=0)]
    for (a, ya), (b, yb), c, (x, y) in zip(two, here, later, got):
        assert a.shape == x.shape and np.array_equal(a, b) and np.array_equal(ya, y)
        assert not np.array_equal(a, c) and not np.array_equal(a, x)


def test_streamed_training_equals_in_memory(root):
    """`train.train` on the streamed dataset (test split streamed too) and on the arrays: the
    same weights bit for bit, the same losses and accuracies, over an epoch boundary."""
    model, mask, state = problem()
    mem, st = load(root, "memory"), load(root, "stream", workers=0)
    trainer = T.Trainer(model, TX, BATCH, loop="steps")
    a, ha = T.train(trainer, state, mask, mem, num_steps=STEPS, eval_every=5, progress=False)
    b, hb = T.train(trainer._replace(loop="auto"), state, mask, st, num_steps=STEPS,
                    eval_every=5, progress=False)
    assert int(b.step) == STEPS and trees_equal(a, b)
    assert not trees_equal(a.params, state.params)
    assert [r["step"] for r in hb] == [5, 10, 12, 15, 18]
    for ra, rb in zip(ha, hb):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert np.array_equal(ra[k], rb[k]), k
    # the test split in chunks of 25 (the last one padded): the same accuracy, the same loss
    # up to the order of summation
    full = T.evaluate(trainer, b, mask, mem.x_test, mem.y_test)
    chunked = T.evaluate(trainer, b, mask, st.x_test, st.y_test, batch_size=25)
    assert chunked["test_accuracy"] == full["test_accuracy"] == ha[-1]["test_accuracy"]
    np.testing.assert_allclose(chunked["test_loss"], full["test_loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="loop='scan' holds the training split on device"):
        T.train(trainer._replace(loop="scan"), state, mask, st, num_steps=1, progress=False)
    # vmapped replicas with their own data orders: (K, B) examples read per step
    pair = T.stack([state, state.replace(key=jax.random.key_data(jax.random.key(9)))])
    masks2 = T.stack([mask, mask])
    a, ha = T.train(trainer, pair, masks2, mem, num_steps=6, replicas=True, progress=False)
    b, hb = T.train(trainer, pair, masks2, st, num_steps=6, replicas=True, progress=False)
    assert trees_equal(a, b) and not trees_equal(a.params["out"]["kernel"][0],
                                                 a.params["out"]["kernel"][1])
    assert np.array_equal(ha[-1]["test_accuracy"], hb[-1]["test_accuracy"])


# ---------------------------------------------------------------------------------------------
# A kill mid-epoch


class Crash(BaseException):
    """A simulated kill: nothing in the run catches it."""


def _stream_config(root, **fields):
    cfg = config.base()
    cfg.update(dict(dataset=NAME, data_dir=root, image_size=SIZE, input="stream",
                    augment="imagenet", batch_size=BATCH, training_steps=f"{STEPS}it",
                    eval_every="5it", levels=1, checkpoint_seconds=0.0, progress=False))
    cfg.update(fields)
    return cfg


def test_kill_mid_epoch_and_resume_is_bit_identical(root, tmp_path, monkeypatch):
    """find-ticket on the streamed dataset with the host train policy, killed in level 1 right
    after its in-level checkpoint at step 5 (mid-epoch), run again: every level's weights and
    metrics are those of a run never killed."""
    monkeypatch.setattr(stream, "WORKERS", 0)
    cfg = _stream_config(root)
    ref = imp.find_ticket(cfg, str(tmp_path / "ref"))
    save = rundir.save_in_level

    def save_then_crash(ldir, step, tree):
        save(ldir, step, tree)
        if ldir.endswith("level_1") and step == 5:
            raise Crash(step)

    monkeypatch.setattr(rundir, "save_in_level", save_then_crash)
    with pytest.raises(Crash):
        imp.find_ticket(cfg, str(tmp_path / "killed"))
    monkeypatch.setattr(rundir, "save_in_level", save)
    (killed,) = (tmp_path / "killed").iterdir()
    assert killed.name == os.path.basename(ref)
    assert not (killed / "level_1" / "DONE").exists()
    assert [p.name for p in (killed / "level_1" / "checkpoint").iterdir()] == ["5"]
    assert imp.find_ticket(cfg, str(tmp_path / "killed")) == str(killed)
    for level in (0, 1):
        want, got = os.path.join(ref, f"level_{level}"), killed / f"level_{level}"
        with open(os.path.join(want, "metrics.jsonl")) as f:
            assert (got / "metrics.jsonl").read_text() == f.read()
        assert trees_equal(checkpoints.restore(os.path.join(want, "final")),
                           checkpoints.restore(str(got / "final")))


# ---------------------------------------------------------------------------------------------
# IMP end to end on a few thousand JPEGs of varying size

N_TRAIN, N_TEST = 2000, 400


def _jpegs(seed, n):
    """n (JPEG bytes, label) pairs: RGB images of 10..47 px per side, a tint per class."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        label = int(rng.integers(4))
        h, w = (int(v) for v in rng.integers(10, 48, 2))
        tint = np.eye(3)[label % 3] * 80 + 60 * (label == 3)
        image = np.clip(tint + rng.integers(0, 150, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=85)
        out.append((buf.getvalue(), label))
    return out


class ManyJpegs(VaryingImages, skip_registration=True):
    name = "lottery_test_jpegs"

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(_jpegs(2, N_TRAIN)),
                "validation": self._generate_examples(_jpegs(3, N_TEST))}


def test_imp_on_streamed_jpegs_of_varying_size(tmp_path, monkeypatch):
    """find-ticket with the streaming path on 2,000 + 400 JPEGs, read and augmented (host train
    policy) in a grain worker process: two levels, the ticket pruned to 80%, and it learned."""
    path = str(tmp_path / "data")
    ManyJpegs(data_dir=path).download_and_prepare(file_format="array_record")
    monkeypatch.setattr(stream, "WORKERS", 1)
    cfg = _stream_config(path, dataset=ManyJpegs.name, batch_size=100, training_steps="20it",
                         eval_every="20it", lr=0.05, momentum=0.9, augment="imagenet")
    run = imp.find_ticket(cfg, str(tmp_path / "runs"))
    from lottery import runs

    r = runs.Run(run)
    assert r.input_shape == (SIZE, SIZE, 3) and r.config.input == "stream"
    kept = [np.asarray(r.mask(1)[k]["kernel"]) for k in ("fc1", "fc2")]  # global: 80% of both
    assert sum(int(m.sum()) for m in kept) == round(0.8 * sum(m.size for m in kept))
    for level in (0, 1):
        with open(os.path.join(run, f"level_{level}", "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        assert [rec["step"] for rec in records] == [20]
        assert records[-1]["test_accuracy"] > 0.5  # 4 tinted classes: chance is 0.25


# ---------------------------------------------------------------------------------------------
# 2 processes x 2 CPU devices


def worker_process(root, out):
    """One of 2 processes: train on the streamed dataset over 4 devices, logging every read."""
    from lottery import distributed

    distributed.initialize()
    reads = []
    read = stream.Reader.read

    def logged(self, keys, rngs=None):
        reads.append([self.split, np.asarray(keys).tolist()])
        return read(self, keys, rngs)

    stream.Reader.read = logged
    mesh = distributed.data_mesh("all", BATCH)
    rows = distributed.local_rows(mesh, BATCH)
    st = load(root, "stream", workers=0)
    model, mask, state = problem()
    final, hist = T.train(T.Trainer(model, TX, BATCH, mesh=mesh), state, mask, st,
                          num_steps=STEPS, eval_every=STEPS, progress=False)
    checkpoints.save(os.path.join(out, "multihost"), final)  # collective
    facts = {"rows": [rows.start, rows.stop], "reads": reads,
             "eval_rows": [distributed.local_rows(mesh, 60).start,
                           distributed.local_rows(mesh, 60).stop],
             "devices": [jax.device_count(), jax.local_device_count()],
             "accuracy": float(hist[-1]["test_accuracy"])}
    with open(os.path.join(out, f"process{jax.process_index()}.json"), "w") as f:
        json.dump(facts, f)


@pytest.fixture(scope="module")
def two_processes(root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stream_processes"))
    port = processes.free_port()
    procs = [processes.start(__file__, ["process", root, out],
                             os.path.join(out, f"process{i}.log"),
                             processes.process_env(2, port, i)) for i in range(2)]
    # meanwhile, the reference: one device, the arrays in memory
    model, mask, state = problem()
    ref, hist = T.train(T.Trainer(model, TX, BATCH, loop="steps"), state, mask,
                        load(root, "memory"), num_steps=STEPS, eval_every=STEPS, progress=False)
    processes.wait(procs, timeout=300)
    facts = []
    for i in range(2):
        with open(os.path.join(out, f"process{i}.json")) as f:
            facts.append(json.load(f))
    return out, state, ref, hist, facts


def test_two_processes_read_disjoint_rows_covering_every_batch(two_processes):
    out, state, ref, hist, facts = two_processes
    assert [f["devices"] for f in facts] == [[4, 2], [4, 2]]
    assert [f["rows"] for f in facts] == [[0, HALF], [HALF, BATCH]]
    key = np.asarray(state.key)
    order = np.concatenate([np.asarray(batches.epoch_order(key, e, 240, BATCH))
                            for e in range(2)])[:STEPS]
    for p, f in enumerate(facts):
        lo, hi = f["rows"]
        train_reads = sorted(tuple(k) for s, k in f["reads"] if s == "train")
        assert train_reads == sorted(tuple(b[lo:hi]) for b in order)  # its rows, nothing more
    for b in order:  # the two halves: disjoint, together the global batch once
        halves = [set(b[lo:hi]) for lo, hi in (f["rows"] for f in facts)]
        assert not halves[0] & halves[1] and sorted(halves[0] | halves[1]) == sorted(b)
    tests = [sorted(x for s, k in f["reads"] if s == "validation" for x in k) for f in facts]
    assert [f["eval_rows"] for f in facts] == [[0, 30], [30, 60]]
    assert tests == [list(range(30)), list(range(30, 60))]  # one chunk of 60, split in two
    # the same training as one device with the arrays in memory, up to summation order
    got = checkpoints.restore(os.path.join(out, "multihost"), ref)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert facts[0]["accuracy"] == facts[1]["accuracy"] == float(hist[-1]["test_accuracy"])


if __name__ == "__main__":
    if sys.argv[1] == "process":
        worker_process(sys.argv[2], sys.argv[3])
