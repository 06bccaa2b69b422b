"""The wiring of every experiment (issue #17): what each one starts from and what it prunes.

The other test files check structure and counts; these pin values. Each expectation is computed
independently of the code path under test: masks by a plain-numpy global magnitude step (exact
round-half-up counts, alive first, score descending, lower index first, as prune.py's header
states) from the checkpoints the run saved; start states from the saved checkpoints; a training
step by `jax.grad` and the optax chain. Where a start state is not saved, `lottery.train.train` is
wrapped to record what it is called with (the seam every experiment trains through).

  find-ticket  level L's mask = one numpy IMP step from level L-1's final weights and mask;
               level L starts from the rewind point of its mode; controls: reinit = a fresh init
               under the ticket's mask, random pruning = the rewind point's values (init,
               iteration) or the dense trained network's (lr, finetune) under the random mask,
               for all 4 rewind modes
  train        gradients are masked, not only updates: alive weights follow a reference step
               with clipping / Adam, moments stay exactly 0 at pruned positions
  runs         best accuracy is the maximum (first one), final is the last record
  masks        random_like draws every layer with its own key
  prune-at-init, oneshot, agp, instability: start state and mask, one test each
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies

import lottery.train
from lottery import checkpoints, config, gradual, imp, instability, masks, models, pai, report
from lottery import runs

# ------------------------------------------------------------------------------------------------
# Helpers: flat {path: array} views, a numpy pruning reference, a spy on lottery.train.train.


def flat(tree) -> dict[str, np.ndarray]:
    """{'fc1/kernel': array} for every leaf of a (nested dict / struct) pytree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = []
        for k in path:
            parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
        out["/".join(parts)] = np.asarray(leaf)
    return out


def masked(params: dict, mask: dict) -> dict:
    """numpy: params with the entries outside mask set to 0.0 (flat dicts)."""
    return {p: np.where(mask[p], v, np.zeros_like(v)) for p, v in params.items()}


def assert_trees_equal(a, b, what=""):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb), what
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)


def assert_flat_equal(a: dict, b: dict, what=""):
    assert sorted(a) == sorted(b), what
    for p in a:
        np.testing.assert_array_equal(a[p], b[p], err_msg=f"{what} at {p}")


def round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def top_k(scores: np.ndarray, alive: np.ndarray, k: int) -> np.ndarray:
    """Bool array keeping the k best alive entries: score descending, then lower flat index."""
    s = np.asarray(scores, np.float32).ravel()
    s = np.where(np.abs(s) < np.finfo(np.float32).tiny, np.float32(0), s)  # subnormal == 0
    idx = np.flatnonzero(np.asarray(alive).ravel())
    order = idx[np.lexsort((idx, -s[idx]))]
    keep = np.zeros(s.size, bool)
    keep[order[:k]] = True
    return keep.reshape(np.shape(scores))


def np_imp_step(scores: dict, mask: dict, fraction: float, rates: dict) -> dict:
    """One global IMP step in numpy: remove round-half-up(fraction * alive) of the alive prunable
    weights; a rate-r leaf (r != 1) removes round-half-up(r * fraction * alive_leaf) of its own,
    the rate-1 leaves (ranked together, in leaf order) keep what is left of the total."""
    f = Fraction(repr(fraction))
    out = {p: np.asarray(m, bool).copy() for p, m in mask.items()}
    prunable = [p for p in mask if rates.get(p, 0.0) > 0]  # `mask` is in jax leaf order
    alive = {p: int(np.sum(mask[p])) for p in prunable}
    for p in prunable:
        if rates[p] != 1.0:
            removed = min(max(round_half_up(Fraction(repr(rates[p])) * f * alive[p]), 0), alive[p])
            out[p] = top_k(scores[p], mask[p], alive[p] - removed)
    total = sum(alive.values())
    target = total - round_half_up(f * total)
    base = [p for p in prunable if rates[p] == 1.0]
    budget = max(target - sum(int(out[p].sum()) for p in prunable if rates[p] != 1.0), 0)
    if base:
        keep = top_k(np.concatenate([np.ravel(scores[p]) for p in base]),
                     np.concatenate([np.ravel(mask[p]) for p in base]), budget)
        sizes = np.cumsum([np.size(mask[p]) for p in base])[:-1]
        for p, part in zip(base, np.split(keep, sizes)):
            out[p] = part.reshape(np.shape(mask[p]))
    return out


def np_to_count(scores: dict, mask: dict, count: int, rates: dict) -> dict:
    """Keep the `count` alive prunable (all rate 1) weights with the highest scores, globally."""
    out = {p: np.asarray(m, bool).copy() for p, m in mask.items()}
    base = [p for p in mask if rates.get(p, 0.0) > 0]
    assert all(rates[p] == 1.0 for p in base)
    keep = top_k(np.concatenate([np.ravel(scores[p]) for p in base]),
                 np.concatenate([np.ravel(mask[p]) for p in base]), count)
    for p, part in zip(base, np.split(keep, np.cumsum([np.size(mask[p]) for p in base])[:-1])):
        out[p] = part.reshape(np.shape(mask[p]))
    return out


class TrainSpy:
    """Wraps `lottery.train.train`: records (trainer, state, mask, num_steps, replicas) of every
    call, on the host, then trains for real."""

    def __init__(self):
        self.calls = []
        self.real = lottery.train.train
        self.sig = inspect.signature(self.real)

    def __call__(self, *args, **kwargs):
        a = self.sig.bind(*args, **kwargs)
        a.apply_defaults()
        a = a.arguments
        host = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
        self.calls.append({"trainer": a["trainer"], "state": host(a["state"]),
                           "mask": host(a["mask"]), "num_steps": a["num_steps"],
                           "replicas": a["replicas"]})
        return self.real(*args, **kwargs)

    def replicas(self):
        """(call, [(state_i, mask_i)]) for the calls with replicas=True, unstacked."""
        out = []
        for c in self.calls:
            if c["replicas"]:
                out.append((c, list(zip(lottery.train.unstack(c["state"]),
                                        lottery.train.unstack(c["mask"])))))
        return out


def spied(fn, *args, **kwargs):
    """fn(*args, **kwargs) with lottery.train.train wrapped; returns (result, spy)."""
    spy = TrainSpy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lottery.train, "train", spy)
        out = fn(*args, **kwargs)
    return out, spy


def unit_update(tx, params):
    """The update a fresh `tx` gives a gradient of ones (for SGD: -lr everywhere)."""
    g = jax.tree.map(jnp.ones_like, params)
    upd, _ = tx.update(g, tx.init(params), params)
    return flat(upd)


def key_data(seed: int, stream: int) -> np.ndarray:
    return np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), stream)))


# ------------------------------------------------------------------------------------------------
# find-ticket: one small run per rewind mode (MNIST-1D MLP, 4 iterations per level, SGD with
# momentum so the optimizer state matters, fc2 pruned at half the rate, out excluded).

MODES = ("init", "iteration", "lr", "finetune")
RATES = {"fc1/kernel": 1.0, "fc2/kernel": 0.5}  # exclude='out', rates='fc2=0.5'
FRACTION = 0.2
LR, FT_LR = 0.1, 0.05
SEEDS = 2  # control seeds


def imp_config(mode: str):
    c = config.base()
    c.dataset, c.model = "mnist1d", "mlp_mnist1d"
    c.batch_size = 100
    c.training_steps, c.eval_every = "4it", "2it"
    c.lr, c.momentum = LR, 0.9
    c.loop = "steps"
    c.levels = 2
    c.fraction = FRACTION
    c.exclude, c.rates = "out", "fc2=0.5"
    c.rewind = mode
    if mode in ("iteration", "lr"):
        c.rewind_step = "2it"
    if mode == "finetune":
        c.finetune_lr, c.finetune_steps = FT_LR, "3it"
    c.controls, c.control_seeds, c.control_levels = "reinit,random_prune", SEEDS, "2"
    c.progress, c.checkpoint_seconds = False, 1000.0
    return c


@pytest.fixture(scope="module")
def imp_runs(tmp_path_factory):
    """mode -> (run directory, TrainSpy of its find_ticket); each run made once, on first use."""
    cache = {}

    def get(mode):
        if mode not in cache:
            work = str(tmp_path_factory.mktemp(f"imp_{mode}"))
            cache[mode] = spied(imp.find_ticket, imp_config(mode), work)
        return cache[mode]

    return get


def level_calls(spy):
    """The non-replica train calls of a find_ticket run: one per level, in level order."""
    return [c for c in spy.calls if not c["replicas"]]


def restore_like(path, like):
    """A checkpoint read into the structure of `like` (e.g. a captured TrainState)."""
    return checkpoints.restore(path, like)


@pytest.mark.parametrize("mode", MODES)
def test_level_mask_is_one_numpy_imp_step_from_the_previous_level(imp_runs, mode):
    """Row 1: level L's saved mask is recomputed by plain numpy from level L-1's saved final
    weights and mask (global |w|, exact round-half-up counts, rate 0.5 on fc2)."""
    run_dir, _ = imp_runs(mode)
    r = runs.Run(run_dir)
    assert r.levels == [0, 1, 2]
    assert all(np.all(m) for m in flat(r.mask(0)).values())
    for level in (1, 2):
        prev_w = flat(r.weights(level - 1))
        prev_m = flat(r.mask(level - 1))
        want = np_imp_step({p: np.abs(w) for p, w in prev_w.items()}, prev_m, FRACTION, RATES)
        got = flat(r.mask(level))
        assert_flat_equal(got, want, f"{mode} level {level} mask")
        # the same step from the initial weights gives another mask: the test can tell them apart
        init = flat(r.init()["params"])
        other = np_imp_step({p: np.abs(w) for p, w in init.items()}, prev_m, FRACTION, RATES)
        assert any(not np.array_equal(other[p], want[p]) for p in RATES)


@pytest.mark.parametrize("mode", MODES)
def test_levels_start_from_their_rewind_point(imp_runs, mode):
    """Level 0 starts from the saved init (dense); level L >= 1 from, by mode:
    init/iteration the rewind checkpoint (weights, optimizer state, step) under mask L; lr level
    L-1's final weights under mask L with the rewind checkpoint's optimizer state and step;
    finetune level L-1's final weights under mask L, step 0, a fresh optimizer at finetune_lr."""
    run_dir, spy = imp_runs(mode)
    r = runs.Run(run_dir)
    calls = level_calls(spy)
    assert len(calls) == 3
    init = flat(r.init()["params"])
    c0 = calls[0]
    assert_flat_equal(flat(c0["state"].params), init, "level 0 start")
    assert all(np.all(m) for m in flat(c0["mask"]).values())
    assert int(c0["state"].step) == 0 and c0["num_steps"] == 4
    assert all(np.all(x == 0) for x in jax.tree.leaves(c0["state"].opt_state))
    assert np.array_equal(c0["state"].key, key_data(0, 1))
    rewind = restore_like(os.path.join(run_dir, "rewind"), c0["state"])
    assert int(rewind.step) == (2 if mode in ("iteration", "lr") else 0)
    assert np.array_equal(rewind.key, c0["state"].key)  # level 0's own data order
    if mode in ("init", "finetune"):
        assert_flat_equal(flat(rewind.params), init, "rewind point at step 0")
    for level in (1, 2):
        c = calls[level]
        st = c["state"]
        mask = flat(r.mask(level))
        assert_flat_equal(flat(c["mask"]), mask, f"level {level} trains under its saved mask")
        prev = flat(r.weights(level - 1))
        if mode in ("init", "iteration"):
            assert_flat_equal(flat(st.params), masked(flat(rewind.params), mask), f"level {level}")
            assert_trees_equal(st.opt_state, rewind.opt_state, "rewind optimizer state")
            assert int(st.step) == int(rewind.step) and c["num_steps"] == 4
        elif mode == "lr":
            assert_flat_equal(flat(st.params), masked(prev, mask), f"level {level}")
            assert_trees_equal(st.opt_state, rewind.opt_state, "rewind optimizer state")
            assert int(st.step) == 2 and c["num_steps"] == 4
        else:
            assert_flat_equal(flat(st.params), masked(prev, mask), f"level {level}")
            assert all(np.all(x == 0) for x in jax.tree.leaves(st.opt_state))  # fresh
            assert int(st.step) == 0 and c["num_steps"] == 3
        lr = FT_LR if mode == "finetune" else LR
        for p, u in unit_update(c["trainer"].tx, st.params).items():
            np.testing.assert_allclose(u, -lr, rtol=1e-6, err_msg=p)
        assert np.array_equal(st.key, rewind.key)


def control_replicas(run_dir, spy, level=2):
    """{'reinit': [(state, mask)], 'random_prune': [(state, mask, name)]} of the controls' train
    calls, each replica identified by its mask (reinit: the ticket's; random pruning: a saved
    control mask), and the calls themselves."""
    r = runs.Run(run_dir)
    ticket = flat(r.mask(level))
    names = r.controls(level)
    assert names == [f"{k}_s{i}" for k in ("random_prune", "reinit") for i in range(SEEDS)]
    saved = {n: flat(r.control_mask(level, n)) for n in names if n.startswith("random_prune")}
    for n in names:
        if n.startswith("reinit"):
            assert_flat_equal(flat(r.control_mask(level, n)), ticket, n)
    out, used, calls = {"reinit": [], "random_prune": []}, [], []
    for call, reps in spy.replicas():
        calls.append(call)
        for st, m in reps:
            fm = flat(m)
            hit = [n for n, sm in saved.items()
                   if all(np.array_equal(fm[p], sm[p]) for p in sm)]
            if hit:
                out["random_prune"].append((st, fm, hit[0]))
                used += hit
            else:
                assert_flat_equal(fm, ticket, "a control that is not random pruning (reinit)")
                out["reinit"].append((st, fm))
    assert sorted(used) == sorted(saved) and len(out["reinit"]) == SEEDS
    return out, calls


def random_prune_source(mode, run_dir, rewind_params):
    """What the random-pruning control's weights are before its random mask, by mode: the rewind
    point (init, iteration); the dense network trained at level 0 (lr, finetune: the weights
    the rewound ticket's lineage was pruned from)."""
    if mode in ("init", "iteration"):
        return rewind_params
    return flat(runs.Run(run_dir).weights(0))


@pytest.mark.parametrize("mode", MODES)
def test_random_prune_control_starts_from_rewind_values_under_its_mask(imp_runs, mode):
    """Row 2: random pruning starts from the unmasked source values under the random mask
    (weights outside the ticket's mask too, not 0.0): the rewind point for init and iteration,
    level 0's trained dense weights for lr and finetune; at the ticket's step, for as long."""
    run_dir, spy = imp_runs(mode)
    reps, calls = control_replicas(run_dir, spy)
    ticket_call = level_calls(spy)[2]
    rewind = restore_like(os.path.join(run_dir, "rewind"), level_calls(spy)[0]["state"])
    source = random_prune_source(mode, run_dir, flat(rewind.params))
    ticket = flat(runs.Run(run_dir).mask(2))
    for st, m, name in reps["random_prune"]:
        assert any(np.any(m[p] & ~ticket[p]) for p in RATES)  # positions the ticket pruned
        assert_flat_equal(flat(st.params), masked(source, m), f"{mode} {name} start")
        assert int(st.step) == int(ticket_call["state"].step), name
    for c in calls:
        assert c["num_steps"] == ticket_call["num_steps"]


@pytest.mark.parametrize("mode", MODES)
def test_reinit_control_starts_from_a_fresh_init_under_the_ticket_mask(imp_runs, mode):
    """Row 2: reinit keeps the ticket's mask with weights drawn afresh: zero where pruned, and
    at kept positions neither the init, the rewind point nor a trained level's values (relative
    distance ~sqrt(2) for an independent draw), with the init's per-layer scale; the seeds
    draw independently."""
    run_dir, spy = imp_runs(mode)
    r = runs.Run(run_dir)
    reps, _ = control_replicas(run_dir, spy)
    ticket_call = level_calls(spy)[2]
    rewind = restore_like(os.path.join(run_dir, "rewind"), level_calls(spy)[0]["state"])
    ticket = flat(r.mask(2))
    init = flat(r.init()["params"])
    sources = {"init": init, "rewind": flat(rewind.params), "ticket start":
               flat(ticket_call["state"].params), "level 0": flat(r.weights(0)),
               "level 1": flat(r.weights(1))}
    starts = []
    for st, _ in reps["reinit"]:
        w = flat(st.params)
        starts.append(w)
        for p in w:
            assert np.all(w[p][~ticket[p]] == 0.0), p
            alive = ticket[p]
            for name, src in sources.items():
                ref = src[p][alive]
                if np.all(ref == 0):
                    continue
                dist = np.linalg.norm(w[p][alive] - ref) / np.linalg.norm(ref)
                assert dist > 0.5, f"{mode}: reinit {p} is the {name} values ({dist:.3g})"
            if p in RATES:  # a draw of the init's distribution
                assert np.std(w[p][alive]) == pytest.approx(np.std(init[p]), rel=0.2), p
        assert int(st.step) == int(ticket_call["state"].step)
    a, b = starts
    assert all(not np.array_equal(a[p], b[p]) for p in RATES)


# ------------------------------------------------------------------------------------------------
# Row 3: masked gradients.


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(24, name="fc1")(x))
        return nn.Dense(4, name="out")(x)


class Data:
    def __init__(self, n=96, shape=(5, 4), seed=0):
        rng = np.random.default_rng(seed)
        self.x_train = rng.normal(size=(n, *shape)).astype(np.float32)
        w = rng.normal(size=(int(np.prod(shape)), 4))
        self.y_train = np.argmax(self.x_train.reshape(n, -1) @ w, -1).astype(np.int32)
        self.x_test, self.y_test = self.x_train[:32], self.y_train[:32]


CHAINS = {
    "clip-sgd-momentum": lambda: optax.chain(optax.clip_by_global_norm(0.05),
                                             optax.sgd(0.1, momentum=0.9)),
    "clip-adam-l2": lambda: optax.chain(optax.clip_by_global_norm(0.05),
                                        lottery.train.optimizer("adam", 1e-2, weight_decay=1e-3)),
}


def param_shaped(opt_state, params):
    """The subtrees of an optimizer state with the params' structure (moments, traces)."""
    treedef = jax.tree.structure(params)
    return [n for n in jax.tree.leaves(opt_state, is_leaf=lambda n: not isinstance(
        n, (jax.Array, np.ndarray)) and jax.tree.structure(n) == treedef)
        if jax.tree.structure(n) == treedef]


@pytest.mark.parametrize("chain", list(CHAINS))
def test_alive_weights_follow_a_masked_gradient_reference(chain):
    """Row 3: `train` under a mask equals, for the alive weights, plain jax.grad with the
    gradient zeroed at pruned positions followed by the optax chain; with clipping or Adam
    masking only the update would differ. Moments stay exactly 0 at pruned positions."""
    data, model, tx = Data(), MLP(), CHAINS[chain]()
    variables = jax.jit(model.init)(jax.random.key(0), data.x_train[:1])
    mask = {"fc1": {"kernel": jax.random.bernoulli(jax.random.key(1), 0.3, (20, 24)),
                    "bias": jnp.ones(24, bool)},
            "out": {"kernel": jax.random.bernoulli(jax.random.key(2), 0.5, (24, 4)),
                    "bias": jnp.ones(4, bool)}}
    bs, steps, key = 32, 5, jax.random.key(3)  # 3 steps per epoch: crosses an epoch
    state = lottery.train.init_state(variables, tx, key)  # unmasked: train must mask it
    got, _ = lottery.train.train(lottery.train.Trainer(model, tx, bs, loop="steps"), state,
                                 mask, data, num_steps=steps, progress=False)

    def loss(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def ref_step(p, opt, x, y):
        g = jax.grad(loss)(p, x, y)
        g = jax.tree.map(lambda a, m: jnp.where(m, a, 0.0), g, mask)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt

    p = jax.tree.map(lambda a, m: jnp.where(m, a, 0.0), variables["params"], mask)
    opt = tx.init(p)
    spe = data.x_train.shape[0] // bs
    for t in range(steps):
        # the documented data order: epoch e is a permutation drawn from fold_in(key, e)
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, t // spe),
                                                 data.x_train.shape[0]))
        idx = perm[: spe * bs].reshape(spe, bs)[t % spe]
        p, opt = ref_step(p, opt, data.x_train[idx], data.y_train[idx])
    gp, rp, m = flat(got.params), flat(p), flat(mask)
    for k in gp:
        np.testing.assert_allclose(gp[k], rp[k], rtol=2e-5, atol=1e-7, err_msg=k)
        assert np.all(gp[k][~m[k]] == 0.0), k
    moments = param_shaped(got.opt_state, got.params)
    assert len(moments) == (1 if chain.startswith("clip-sgd") else 2)
    for tree in moments:
        for k, v in flat(tree).items():
            assert np.all(v[~m[k]] == 0.0), f"{chain}: optimizer moment non-zero at pruned {k}"
            assert np.any(v[m[k]] != 0.0), k


# ------------------------------------------------------------------------------------------------
# Row 4: Run.level_info's best and final accuracy.


def _rewrite(path, accs, first_step):
    with open(path, "w") as f:
        for i, a in enumerate(accs):
            f.write(json.dumps({"step": first_step * (i + 1), "train_loss": 1.0 - a,
                                "test_loss": 1.0 - a, "test_accuracy": a}) + "\n")


def test_level_info_best_is_the_first_maximum_and_final_the_last(imp_runs, tmp_path):
    """Row 4: a metrics file whose maximum is neither the last nor unique: best = the first
    maximum (value and step), final = the last record; controls report their final accuracy.
    `lottery inspect --json` (and find-ticket's summary table) read the same."""
    src, _ = imp_runs("iteration")
    run_dir = str(tmp_path / os.path.basename(src))
    shutil.copytree(src, run_dir)
    _rewrite(os.path.join(run_dir, "level_1", "metrics.jsonl"), [0.3, 0.8, 0.6, 0.8, 0.5], 1)
    _rewrite(os.path.join(run_dir, "level_2", "controls", "random_prune_s0", "metrics.jsonl"),
             [0.9, 0.4], 2)
    _rewrite(os.path.join(run_dir, "level_2", "controls", "random_prune_s1", "metrics.jsonl"),
             [0.2, 0.7], 2)
    info = runs.Run(run_dir).level_info(1)
    assert (info["best_accuracy"], info["best_step"]) == (0.8, 2)
    assert (info["final_accuracy"], info["final_step"]) == (0.5, 5)
    assert sorted(runs.Run(run_dir).level_info(2)["controls"]["random_prune"]) == [0.4, 0.7]
    row = json.loads(report.inspect_text(run_dir, as_json=True))["levels"][1]
    assert (row["best_accuracy"], row["best_step"], row["final_accuracy"]) == (0.8, 2, 0.5)
    summary = getattr(imp, "summary", None)  # find-ticket's closing table (may move with the
    if summary is not None:                   # run-directory helpers)
        s = summary(run_dir)
        assert (s[1]["best_accuracy"], s[1]["best_step"], s[1]["final_accuracy"]) == (0.8, 2, 0.5)
        assert sorted(s[2]["random_prune_accuracy"]) == [0.4, 0.7]


# ------------------------------------------------------------------------------------------------
# Row 5: masks.random_like draws each layer with its own key.


def _two_layers(rows, cols, kept):
    m = np.zeros(rows * cols, bool)
    m[:kept] = True
    m = m.reshape(rows, cols)
    return {"a": {"kernel": jnp.asarray(m), "bias": jnp.ones(cols, bool)},
            "b": {"kernel": jnp.asarray(m)}}


def test_random_like_same_shape_layers_get_independent_positions():
    mask = _two_layers(20, 50, 300)
    r = masks.random_like(mask, jax.random.key(0))
    a, b = np.asarray(r["a"]["kernel"]), np.asarray(r["b"]["kernel"])
    assert a.sum() == 300 and b.sum() == 300 and np.all(r["a"]["bias"])
    overlap = int(np.sum(a & b))
    assert overlap != 300, "both layers drew the same positions (one key for every layer)"
    assert 50 < overlap < 130  # independent draws: 300 * 300 / 1000 = 90 expected


@settings(max_examples=20, deadline=None)
@given(strategies.integers(60, 540), strategies.integers(0, 2**31 - 1))
def test_random_like_layers_differ_and_keep_exact_counts(kept, seed):
    mask = _two_layers(20, 30, kept)  # one shape: no recompilation per example
    r = masks.random_like(mask, jax.random.key(seed))
    assert masks.counts(r) == masks.counts(mask)
    assert not np.array_equal(np.asarray(r["a"]["kernel"]), np.asarray(r["b"]["kernel"]))


# ------------------------------------------------------------------------------------------------
# prune-at-init cells: what they start from and what they prune.

PAI_PRUNABLE = ("fc1/kernel", "fc2/kernel", "out/kernel")  # exclude='' : every kernel


def pai_config():
    c = pai.base_config()
    c.dataset, c.model = "mnist1d", "mlp_mnist1d"
    c.optimizer, c.lr = "adam", 1e-2
    c.batch_size, c.training_steps, c.eval_every = 100, "2it", "2it"
    c.loop = "steps"
    c.scorers, c.compressions, c.seeds = "magnitude", "10", 2
    c.progress = False
    return c


@pytest.fixture(scope="module")
def pai_run(tmp_path_factory):
    return spied(pai.sweep, pai_config(), str(tmp_path_factory.mktemp("pai")))


def seed_init(seed):
    """The init of `seed` (find-ticket's: fold_in(key(seed), 0)), computed directly."""
    key = jax.random.fold_in(jax.random.key(seed), 0)
    return flat(models.init(models.create("mlp_mnist1d"), key, (40, 1))["params"])


def saved_pai_mask(run_dir, seed):
    path = os.path.join(run_dir, "magnitude", "c10", f"s{seed}", "mask")
    return flat(checkpoints.restore(path))


def test_pai_masks_are_the_seed_init_top_k(pai_run):
    """Each seed's magnitude mask at compression 10 keeps the round-half-up(N / 10) largest |w|
    of that seed's own init, over every kernel (the output layer included)."""
    run_dir, _ = pai_run
    rates = {p: 1.0 for p in PAI_PRUNABLE}
    wants = []
    for seed in (0, 1):
        init = seed_init(seed)
        n = sum(init[p].size for p in PAI_PRUNABLE)
        dense = {p: np.ones(v.shape, bool) for p, v in init.items()}
        wants.append(np_to_count({p: np.abs(v) for p, v in init.items()}, dense,
                                 round_half_up(Fraction(n, 10)), rates))
        assert_flat_equal(saved_pai_mask(run_dir, seed), wants[-1], f"seed {seed}")
    assert any(not np.array_equal(wants[0][p], wants[1][p]) for p in PAI_PRUNABLE)


def test_pai_cells_start_from_the_seed_init_under_their_mask(pai_run):
    """Every cell trains replica i = seed i: that seed's init under that seed's saved mask, at
    step 0 with a fresh optimizer state and the seed's data order fold_in(key(seed), 1)."""
    run_dir, spy = pai_run
    (call, reps), = spy.replicas()  # one cell, its seeds as replicas
    assert call["num_steps"] == 2 and len(reps) == 2
    for seed, (st, m) in enumerate(reps):
        fm = flat(m)
        assert_flat_equal(fm, saved_pai_mask(run_dir, seed), f"replica {seed} trains under "
                                                             f"seed {seed}'s saved mask")
        assert_flat_equal(flat(st.params), masked(seed_init(seed), fm), f"seed {seed}")
        assert int(st.step) == 0
        assert all(np.all(x == 0) for x in jax.tree.leaves(st.opt_state))
        assert np.array_equal(st.key, key_data(seed, 1))


# ------------------------------------------------------------------------------------------------
# oneshot and AGP.


def gradual_config(experiment):
    c = gradual.base_config(experiment)
    c.dataset, c.model = "mnist1d", "mlp_mnist1d"
    c.batch_size, c.loop = 100, "steps"
    c.lr, c.momentum = LR, 0.9
    c.final_density = 0.2
    c.progress, c.checkpoint_seconds = False, 1000.0
    if experiment == "oneshot":
        c.training_steps, c.finetune_steps, c.finetune_lr, c.eval_every = "3it", "2it", FT_LR, "3it"
    else:
        c.training_steps, c.eval_every = "12it", "1it"
        c.prune_start, c.prune_end, c.prune_every = "2it", "8it", "3it"  # events 2, 5, 8
    return c


ONESHOT_RATES = {"fc1/kernel": 1.0, "fc2/kernel": 1.0}  # exclude='out'


@pytest.fixture(scope="module")
def oneshot_run(tmp_path_factory):
    return spied(gradual.run_oneshot, gradual_config("oneshot"),
                 str(tmp_path_factory.mktemp("oneshot")))


def test_oneshot_prunes_the_trained_dense_weights(oneshot_run):
    """Level 1's mask: the round-half-up(0.2 * N) largest |w| of level 0's final weights."""
    run_dir, _ = oneshot_run
    r = runs.Run(run_dir)
    w0 = flat(r.weights(0))
    n = sum(w0[p].size for p in ONESHOT_RATES)
    want = np_to_count({p: np.abs(v) for p, v in w0.items()}, flat(r.mask(0)),
                       round_half_up(Fraction(n) * Fraction(1, 5)), ONESHOT_RATES)
    assert_flat_equal(flat(r.mask(1)), want, "oneshot mask")
    init = flat(r.init()["params"])
    other = np_to_count({p: np.abs(v) for p, v in init.items()}, flat(r.mask(0)),
                        round_half_up(Fraction(n) * Fraction(1, 5)), ONESHOT_RATES)
    assert any(not np.array_equal(other[p], want[p]) for p in ONESHOT_RATES)


def test_oneshot_fine_tunes_from_the_dense_weights_with_a_fresh_optimizer(oneshot_run):
    """Level 0 starts from the saved init; level 1 from level 0's final weights under its mask,
    at step 0, with a fresh optimizer at finetune_lr, for finetune_steps."""
    run_dir, spy = oneshot_run
    r = runs.Run(run_dir)
    c0, c1 = (c for c in spy.calls if not c["replicas"])
    assert_flat_equal(flat(c0["state"].params), flat(r.init()["params"]), "dense start")
    assert int(c0["state"].step) == 0 and c0["num_steps"] == 3
    st = c1["state"]
    assert_flat_equal(flat(c1["mask"]), flat(r.mask(1)))
    assert_flat_equal(flat(st.params), masked(flat(r.weights(0)), flat(r.mask(1))), "fine-tune")
    assert int(st.step) == 0 and c1["num_steps"] == 2
    assert all(np.all(x == 0) for x in jax.tree.leaves(st.opt_state))
    for p, u in unit_update(c1["trainer"].tx, st.params).items():
        np.testing.assert_allclose(u, -FT_LR, rtol=1e-6, err_msg=p)


def agp_density(t, d_f=0.2, t0=2, t1=8):
    p = np.clip((t - t0) / (t1 - t0), 0.0, 1.0)
    return d_f + (1.0 - d_f) * (1.0 - p) ** 3


@pytest.fixture(scope="module")
def agp_run(tmp_path_factory):
    """An AGP run paused after every step: (run dir, [(step, params, mask)], start args)."""
    seen = []

    def callback(st, m, record):
        seen.append((int(record["step"]), flat(st.params), flat(m)))

    run_dir, spy = spied(gradual.run_agp, gradual_config("agp"),
                         str(tmp_path_factory.mktemp("agp")), callback=callback)
    (call,) = spy.calls  # AGP trains through train.train, with its mask update
    return run_dir, seen, {"state": call["state"], "mask": call["mask"]}


def test_agp_starts_dense_from_the_saved_init(agp_run):
    run_dir, _, start = agp_run
    st = start["state"]
    assert_flat_equal(flat(st.params), flat(runs.Run(run_dir).init()["params"]), "agp start")
    assert all(np.all(m) for m in flat(start["mask"]).values())
    assert int(st.step) == 0 and all(np.all(x == 0) for x in jax.tree.leaves(st.opt_state))
    assert np.array_equal(st.key, key_data(0, 1))


def test_agp_prunes_the_current_weights_by_magnitude(agp_run):
    """At every event step e, the mask becomes the round-half-up(agp(e) * N) largest |w| of the
    weights after e steps among the alive ones; between events it does not change."""
    run_dir, seen, _ = agp_run
    assert [s for s, _, _ in seen] == list(range(1, 13))
    n = sum(seen[0][1][p].size for p in ONESHOT_RATES)
    events = {2, 5, 8}
    changed = 0
    for (s, w, m), (_, _, m_next) in zip(seen, seen[1:]):
        if s in events:
            count = int(np.floor(agp_density(s) * n + 0.5))
            want = np_to_count({p: np.abs(v) for p, v in w.items()}, m, count, ONESHOT_RATES)
            assert_flat_equal(m_next, want, f"AGP event at step {s}")
            changed += 1
        else:
            assert_flat_equal(m_next, m, f"no event at step {s}")
    assert changed == 3
    assert_flat_equal(flat(runs.Run(run_dir).mask(0)), seen[-1][2], "saved final mask")


# ------------------------------------------------------------------------------------------------
# instability.


@pytest.mark.parametrize("k", [2, 0])
def test_instability_copies_start_from_the_rewind_point_under_the_level_mask(imp_runs, k):
    """Both copies start from level 0's state at iteration k (the saved rewind point for k = 2,
    the saved init at step 0 for k = 0) under the level's saved mask; copy A keeps that
    state's data order, copy B another."""
    run_dir, spy = imp_runs("iteration")
    r = runs.Run(run_dir)
    template = level_calls(spy)[0]["state"]
    (res, ispy) = spied(instability.instability, run_dir, 2, k, points=2)
    assert res.rewind_step == k
    (call, reps), = ispy.replicas()
    mask = flat(r.mask(2))
    rewind = restore_like(os.path.join(run_dir, "rewind"), template)
    if k == 2:
        src, step, opt = flat(rewind.params), 2, rewind.opt_state
    else:
        src, step, opt = flat(r.init()["params"]), 0, jax.tree.map(np.zeros_like,
                                                                   rewind.opt_state)
    (a, ma), (b, mb) = reps
    for st, m in ((a, ma), (b, mb)):
        assert_flat_equal(flat(m), mask, "copies train under the level's mask")
        assert_flat_equal(flat(st.params), masked(src, mask), f"copy start at k={k}")
        assert int(st.step) == step
        assert_trees_equal(st.opt_state, opt, "optimizer state of the rewind point")
    assert np.array_equal(a.key, rewind.key) and not np.array_equal(b.key, a.key)
    assert call["num_steps"] == 4
