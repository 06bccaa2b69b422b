"""Data parallelism: 4 forced CPU devices, and 2 processes x 2 devices, against one device
(training, AGP's in-step mask updates, checkpoints, scores).

Forcing host devices needs XLA_FLAGS before jax starts, so the multi-device runs are subprocesses
of this file (`python tests/test_sharding.py devices4|process <dir>`). A module fixture starts
them while this process computes the single-device references; they write checkpoints with the
real `checkpoints.save` and a JSON of facts, and the tests below compare those here (1 device).
"""

import functools
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import _processes as processes

from lottery import checkpoints, distributed, gradual, masks, scorers
from lottery import train as T

BATCH = 32
STEPS = 20
HALF = 10  # the 1-device checkpoint the 4-device run resumes from
SHORT = 12  # steps of the batch-norm and replica runs
SCORE_BATCH = 64
K = 2  # replicas


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(4, name="out")(x)


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(4, name="out")(x)


class Data:
    SHAPE = (6, 6, 2)

    def __init__(self, n=256, shape=SHAPE):
        rng = np.random.default_rng(0)
        self.x_train = rng.normal(size=(n, *shape)).astype(np.float32)
        w = rng.normal(size=(int(np.prod(shape)), 4))
        self.y_train = np.argmax(self.x_train.reshape(n, -1) @ w, -1).astype(np.int32)
        self.x_test, self.y_test = self.x_train[:70], self.y_train[:70]  # 70: padded eval chunks


TX = T.optimizer("sgd", 0.05, momentum=0.9, weight_decay=1e-4)


@functools.partial(jax.jit, static_argnums=0)
def _variables_and_mask(model_cls, seed):
    # one compiled program: eager ops each compile, which is slow in a multi-process CPU job
    variables = model_cls().init(jax.random.key(seed), jnp.zeros((1, *Data.SHAPE)))
    mask = jax.tree.map(lambda p: jax.random.bernoulli(jax.random.key(seed + 1), 0.5, p.shape)
                        if p.ndim >= 2 else jnp.ones(p.shape, bool), variables["params"])
    return variables, mask


init_state = jax.jit(T.init_state, static_argnums=1)


def problem(model_cls=MLP, seed=0):
    """Data, model, variables, a half-pruned mask and an optimizer: the same in every process."""
    variables, mask = _variables_and_mask(model_cls, seed)
    return Data(), model_cls(), variables, mask, TX


@jax.jit
def _replicas(mask):
    keys = [jax.random.key(10 + i) for i in range(K)]
    rmasks = [masks.random_like(mask, k) for k in keys]
    states = [T.init_state(MLP().init(k, jnp.zeros((1, *Data.SHAPE))), TX, k, m)
              for k, m in zip(keys, rmasks)]
    return T.stack(states), T.stack(rmasks)


def replica_problem():
    data, model, _, mask, tx = problem()
    return (data, model, tx, *_replicas(mask))


AGP_DENSITY = 0.2
AGP_LOOPS = ("steps", "scan")


def agp_train(data, model, variables, mesh=None, loop="steps"):
    """AGP from the dense network to density 0.2 (events at steps 2, 5, 8, 11 and 14, global
    magnitude) through `train.train`'s mask update: (state, mask, history)."""
    mask = masks.init(variables["params"])
    schedule = gradual.agp_schedule(mask, None, final_density=AGP_DENSITY, start=2, end=14,
                                    every=3)
    return T.train(T.Trainer(model, TX, BATCH, loop=loop, mesh=mesh),
                   init_state(variables, TX, jax.random.key(4), mask), mask, data,
                   num_steps=STEPS, eval_every=HALF, progress=False,
                   mask_update=gradual.agp_update(schedule, mask))


def score_inputs(data, model, variables):
    apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    return scorers.Inputs.create(apply_fn, (data.x_train[:SCORE_BATCH], data.y_train[:SCORE_BATCH]))


def plain(history):
    return [{k: np.asarray(v).tolist() for k, v in r.items()} for r in history]


def _message(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------------------------
# Subprocess workers


def worker_devices4(out):
    """4 devices in one process: train, resume, batch norm, replicas, scores, errors."""
    facts = {"initialized": distributed.initialize(), "device_count": jax.device_count()}
    mesh = distributed.data_mesh("all", BATCH)
    data, model, variables, mask, tx = problem()
    trainer = T.Trainer(model, tx, BATCH, loop="steps", mesh=mesh)
    state = init_state(variables, tx, jax.random.key(2), mask)
    final, hist = T.train(trainer, state, mask, data, num_steps=STEPS, eval_every=HALF,
                          progress=False)
    checkpoints.save(os.path.join(out, "steps"), final)
    facts["history"] = plain(hist)
    facts["replicated_on"] = sorted({len(x.sharding.device_set) for x in jax.tree.leaves(final)
                                     if x.sharding.is_fully_replicated})
    step_fn = T._compiled(trainer, False)[0]
    xb = distributed.shard_batch(data.x_train[:BATCH], mesh)
    yb = distributed.shard_batch(data.y_train[:BATCH], mesh)
    facts["batch_shard_rows"] = sorted({s.data.shape[0] for s in xb.addressable_shards})
    hlo = step_fn.lower(final, distributed.replicate(mask, mesh), xb, yb).compile().as_text()
    facts["step_all_reduce"] = "all-reduce" in hlo
    epoch_fn = T._compiled(trainer._replace(loop="scan"), False)[1]
    x_all, y_all = distributed.replicate((data.x_train, data.y_train), mesh)
    hlo = epoch_fn.lower(final, distributed.replicate(mask, mesh), x_all, y_all, 0, 1).compile()
    facts["epoch_all_reduce"] = "all-reduce" in hlo.as_text()

    # the 1-device checkpoint at step HALF, continued on 4 devices with the on-device epoch loop
    start = checkpoints.restore(os.path.join(out, "half"), state)
    resumed, _ = T.train(trainer._replace(loop="scan"), start, mask, data, num_steps=STEPS,
                         progress=False)
    checkpoints.save(os.path.join(out, "resumed"), resumed)

    data, model, variables, mask, tx = problem(BNNet)
    bn, _ = T.train(T.Trainer(model, tx, BATCH, "cifar", loop="steps", mesh=mesh),
                    init_state(variables, tx, jax.random.key(3), mask), mask, data,
                    num_steps=SHORT, progress=False)
    checkpoints.save(os.path.join(out, "bn"), bn)

    data, model, tx, states, rmasks = replica_problem()
    rep, rhist = T.train(T.Trainer(model, tx, BATCH, loop="scan", mesh=mesh), states, rmasks,
                         data, num_steps=SHORT, replicas=True, progress=False)
    checkpoints.save(os.path.join(out, "replicas"), rep)
    facts["replica_accuracy"] = np.asarray(rhist[-1]["test_accuracy"]).tolist()

    data, model, variables, _, _ = problem()
    for loop in AGP_LOOPS:
        state, mask, hist = agp_train(data, model, variables, mesh, loop)
        checkpoints.save(os.path.join(out, f"agp_{loop}"), {"state": state, "mask": mask})
        facts[f"agp_{loop}_history"] = plain(hist)
        facts[f"agp_{loop}_replicated_on"] = sorted({len(x.sharding.device_set)
                                                     for x in jax.tree.leaves(mask)})

    data, model, variables, mask, _ = problem()
    inputs = distributed.shard_inputs(score_inputs(data, model, variables), mesh)
    params, smask = distributed.replicate((variables["params"], mask), mesh)
    checkpoints.save(os.path.join(out, "scores"), {
        "snip": jax.jit(scorers.snip)(params, smask, inputs),
        "grasp": jax.jit(scorers.grasp)(params, smask, inputs)})

    facts["errors"] = {
        "devices5": _message(lambda: distributed.data_mesh(5, BATCH)),
        "batch30": _message(lambda: distributed.data_mesh("all", 30)),
        "train_batch30": _message(lambda: T.train(
            T.Trainer(model, tx, 30, mesh=mesh), init_state(variables, tx, jax.random.key(0)),
            mask, data, num_steps=1, progress=False)),
    }
    with open(os.path.join(out, "devices4.json"), "w") as f:
        json.dump(facts, f)


def worker_process(out):
    """One of 2 processes x 2 devices: train on all 4, save collectively, SNIP on 4."""
    facts = {"initialized": distributed.initialize(), "process_index": jax.process_index(),
             "process_count": jax.process_count(), "device_count": jax.device_count(),
             "local_device_count": jax.local_device_count(),
             "is_main": distributed.is_main_process()}
    mesh = distributed.data_mesh("all", BATCH)
    rows = distributed.local_rows(mesh, BATCH)
    facts["rows"] = [rows.start, rows.stop]
    facts["devices2"] = _message(lambda: distributed.device_count(2))
    marker = os.path.join(out, "written_by_process0")
    if distributed.is_main_process():
        time.sleep(1.0)  # without the barrier, process 1 would look too early
        with open(marker, "w") as f:
            f.write("ok")
    distributed.barrier("marker")
    facts["saw_marker"] = os.path.exists(marker)
    data, model, variables, mask, tx = problem()
    state = init_state(variables, tx, jax.random.key(2), mask)
    final, hist = T.train(T.Trainer(model, tx, BATCH, loop="steps", mesh=mesh), state, mask,
                          data, num_steps=STEPS, eval_every=HALF, progress=False)
    facts["history"] = plain(hist)
    checkpoints.save(os.path.join(out, "multihost"), final)  # collective: every process calls
    inputs = distributed.shard_inputs(score_inputs(data, model, variables), mesh)
    params, smask = distributed.replicate((variables["params"], mask), mesh)
    snip = jax.jit(scorers.snip)(params, smask, inputs)
    checkpoints.save(os.path.join(out, "multihost_snip"), snip)
    with open(os.path.join(out, f"process{jax.process_index()}.json"), "w") as f:
        json.dump(facts, f)


# ----------------------------------------------------------------------------------------------
# The fixture: start the workers, compute the 1-device references meanwhile


def _start(role, out, environ):
    log = os.path.join(out, f"{role}{environ.get('JAX_PROCESS_ID', '')}.log")
    return processes.start(__file__, [role, out], log, environ)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharding"))
    port = processes.free_port()
    procs = [_start("process", out, processes.process_env(2, port, i)) for i in range(2)]
    ref = {}
    data, model, variables, mask, tx = problem()
    trainer = T.Trainer(model, tx, BATCH, loop="steps")
    state = init_state(variables, tx, jax.random.key(2), mask)
    half, h1 = T.train(trainer, state, mask, data, num_steps=HALF, eval_every=HALF,
                       progress=False)
    checkpoints.save(os.path.join(out, "half"), half)
    procs.append(_start("devices4", out, processes.env(4)))
    ref["state"] = state
    ref["steps"], h2 = T.train(trainer, half, mask, data, num_steps=STEPS, eval_every=HALF,
                               progress=False)
    ref["history"] = plain(h1 + h2)

    data, model, variables, mask, tx = problem(BNNet)
    ref["bn_template"] = init_state(variables, tx, jax.random.key(3), mask)
    ref["bn"], _ = T.train(T.Trainer(model, tx, BATCH, "cifar", loop="steps"),
                           ref["bn_template"], mask, data, num_steps=SHORT, progress=False)

    data, model, tx, states, rmasks = replica_problem()
    ref["replicas_template"] = states
    ref["replicas"], rhist = T.train(T.Trainer(model, tx, BATCH, loop="scan"), states, rmasks,
                                     data, num_steps=SHORT, replicas=True, progress=False)
    ref["replica_accuracy"] = np.asarray(rhist[-1]["test_accuracy"])

    data, model, variables, _, _ = problem()
    for loop in AGP_LOOPS:
        ref[f"agp_{loop}"] = agp_train(data, model, variables, loop=loop)

    data, model, variables, mask, _ = problem()
    inputs = score_inputs(data, model, variables)
    ref["snip"] = jax.jit(scorers.snip)(variables["params"], mask, inputs)
    ref["grasp"] = jax.jit(scorers.grasp)(variables["params"], mask, inputs)

    processes.wait(procs)
    facts = {}
    for name in ("devices4", "process0", "process1"):
        with open(os.path.join(out, f"{name}.json")) as f:
            facts[name] = json.load(f)
    return out, ref, facts


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def assert_histories_close(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b] == [8, 10, 16, 20]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            np.testing.assert_allclose(ra[k], rb[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------------------------
# Tests


def test_four_devices_train_like_one(runs):
    out, ref, facts = runs
    f = facts["devices4"]
    assert f["device_count"] == 4 and f["initialized"] is False
    # the 4-device checkpoint restores here, on 1 device, into the single-device structure
    four = checkpoints.restore(os.path.join(out, "steps"), ref["state"])
    assert int(four.step) == STEPS
    assert_trees_close(four, ref["steps"])
    assert_histories_close(f["history"], ref["history"])
    # it did train, and pruned weights stayed exactly zero on 4 devices
    assert not np.allclose(four.params["out"]["kernel"], ref["state"].params["out"]["kernel"])
    for p, m in zip(jax.tree.leaves(four.params), jax.tree.leaves(problem()[3])):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)


def test_batches_split_state_replicated_gradient_all_reduced(runs):
    f = runs[2]["devices4"]
    assert f["replicated_on"] == [4]  # every leaf of the returned state on all 4 devices
    assert f["batch_shard_rows"] == [BATCH // 4]
    assert f["step_all_reduce"]  # the unchanged step, partitioned: XLA sums the gradient
    assert f["epoch_all_reduce"]  # also inside the on-device epoch (batch gathered, then split)


def test_one_device_checkpoint_resumes_on_four(runs):
    out, ref, _ = runs
    resumed = checkpoints.restore(os.path.join(out, "resumed"), ref["state"])
    assert int(resumed.step) == STEPS
    assert_trees_close(resumed, ref["steps"])


def test_batch_norm_and_augmentation_see_the_global_batch(runs):
    out, ref, _ = runs
    bn = checkpoints.restore(os.path.join(out, "bn"), ref["bn_template"])
    assert_trees_close(bn, ref["bn"])
    # per-device statistics (pmap style) or per-device random crops would differ; it trained
    assert not np.allclose(bn.batch_stats["BatchNorm_0"]["mean"],
                           ref["bn_template"].batch_stats["BatchNorm_0"]["mean"])


def test_replicas_times_devices(runs):
    out, ref, facts = runs
    rep = checkpoints.restore(os.path.join(out, "replicas"), ref["replicas_template"])
    assert jax.tree.leaves(rep.params)[0].shape[0] == K
    assert_trees_close(rep, ref["replicas"])
    np.testing.assert_allclose(facts["devices4"]["replica_accuracy"], ref["replica_accuracy"])


@pytest.mark.parametrize("loop", AGP_LOOPS)
def test_agp_on_four_devices_equals_one_device_statistically(runs, loop):
    """AGP's mask update runs inside the sharded step (mask in the scan carry for 'scan'): same
    exact kept count, the same mask up to magnitude near-ties, the same accuracy up to noise."""
    out, ref, facts = runs
    state, mask, hist = ref[f"agp_{loop}"]
    got = checkpoints.restore(os.path.join(out, f"agp_{loop}"), {"state": state, "mask": mask})
    rates = masks.prunable(mask)
    n = sum(int(np.size(m)) for m, r in zip(jax.tree.leaves(mask), jax.tree.leaves(rates)) if r)
    kept = lambda m: sum(int(np.sum(x)) for x, r in zip(jax.tree.leaves(m),  # noqa: E731
                                                        jax.tree.leaves(rates)) if r)
    assert kept(got["mask"]) == kept(mask) == int(np.floor(AGP_DENSITY * n + 0.5))
    agree = np.mean(np.concatenate([np.ravel(np.asarray(a) == np.asarray(b)) for a, b in
                                    zip(jax.tree.leaves(got["mask"]), jax.tree.leaves(mask))]))
    assert agree >= 0.99
    for p, m in zip(jax.tree.leaves(got["state"].params), jax.tree.leaves(got["mask"])):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)  # pruned on 4 devices: exactly 0
    four = facts["devices4"][f"agp_{loop}_history"]
    assert [r["step"] for r in four] == [r["step"] for r in plain(hist)] == [8, 10, 16, 20]
    for a, b in zip(four, plain(hist)):
        assert a.keys() == b.keys()
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=0.05)
        if "test_accuracy" in a:  # evaluations at 10 and 20
            assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.05
    assert facts["devices4"][f"agp_{loop}_replicated_on"] == [4]


def test_snip_and_grasp_on_sharded_batches(runs):
    out, ref, _ = runs
    scores = checkpoints.restore(os.path.join(out, "scores"))
    for name in ("snip", "grasp"):
        assert_trees_close(scores[name], ref[name], rtol=1e-4, atol=1e-7)
        assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(ref[name]))


def test_two_processes_train_like_one_device(runs):
    out, ref, facts = runs
    p0, p1 = facts["process0"], facts["process1"]
    for i, p in enumerate((p0, p1)):
        assert p["initialized"] is True and p["process_index"] == i
        assert (p["process_count"], p["device_count"], p["local_device_count"]) == (2, 4, 2)
    assert (p0["is_main"], p1["is_main"]) == (True, False)
    assert p0["saw_marker"] and p1["saw_marker"]
    assert (p0["rows"], p1["rows"]) == ([0, BATCH // 2], [BATCH // 2, BATCH])
    assert p0["devices2"] == "devices=2: a job of 2 processes uses all 4 devices; use devices='all'"
    assert_histories_close(p0["history"], ref["history"])
    assert_histories_close(p1["history"], ref["history"])
    final = checkpoints.restore(os.path.join(out, "multihost"), ref["state"])
    assert_trees_close(final, ref["steps"])
    snip = checkpoints.restore(os.path.join(out, "multihost_snip"))
    assert_trees_close(snip, ref["snip"], rtol=1e-4, atol=1e-7)


def test_bad_input_is_one_clear_line(runs):
    errors = runs[2]["devices4"]["errors"]
    assert errors["devices5"] == "devices=5: only 4 visible (cpu); use devices='all' or at most 4"
    for key in ("batch30", "train_batch30"):
        assert errors[key].startswith("batch_size=30 is not divisible by devices=4")
        assert "\n" not in errors[key]
    with pytest.raises(ValueError, match=r"devices=2: only 1 visible \(cpu\)"):
        distributed.data_mesh(2)
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(ValueError, match="expected 'all' or a positive number of devices"):
            distributed.device_count(bad)


def test_single_device_defaults():
    assert distributed.device_count("all") == distributed.device_count("1") == 1
    assert distributed.data_mesh("all", 7) is None  # the unchanged single-device path
    assert distributed.make_mesh(1).shape == {"batch": 1}
    assert distributed.initialize() is False and distributed.is_main_process()
    distributed.barrier("nothing to wait for")
    assert distributed.launch_kind({}) is None
    assert distributed.launch_kind({"JAX_COORDINATOR_ADDRESS": "h:1"}) == "env"
    slurm = {"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "8"}
    assert distributed.launch_kind(slurm) == "slurm"
    assert distributed.launch_kind({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: no job


def test_initialize_needs_all_three_variables(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(ValueError, match=r"\$JAX_NUM_PROCESSES=None"):
        distributed.initialize()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"\$JAX_PROCESS_ID=2: must be in \[0, "):
        distributed.initialize()


if __name__ == "__main__":
    {"devices4": worker_devices4, "process": worker_process}[sys.argv[1]](sys.argv[2])
