"""structure='groups' in IMP, one-shot and AGP: whole coupled channel groups go, in the counts the
rule promises, the ranking of the group scorer, compactable; the random control; bad fields stop
before any work; existing run hashes stay.

The model is a ResNet-8 of width 4 (batch norm, identity and projection shortcuts) registered as
'tiny_resnet', on mnist5k, a few iterations per level. Expectations are recomputed here in numpy
from `groups.derive`'s member descriptions (which slices of which variables a channel owns)."""

import json
import os
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottery import cli, config, export, gradual, groups, imp, masks, models, rundir, runs

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models (tests/conftest.py)

SHAPE = (28, 28, 1)  # mnist5k


class Gathered(nn.Module):
    """A model the group analysis cannot follow: its hidden channels are permuted by a gather."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Dense(6, name="fc")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="out")(h[:, jnp.array([5, 0, 1, 2, 3, 4])])


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    models.register("tiny_resnet", lambda num_classes=10: models.ResNet(
        num_classes=num_classes, depth=8, width=4))
    models.register("gathered", Gathered)
    yield
    models.unregister("tiny_resnet")
    models.unregister("gathered")


COMMON = {"dataset": "mnist5k", "model": "tiny_resnet", "batch_size": 50, "lr": 0.05,
          "momentum": 0.9, "progress": False, "checkpoint_seconds": 1000.0,
          "structure": "groups"}
IMP = {**COMMON, "training_steps": "6it", "eval_every": "6it", "levels": 2, "fraction": 0.3,
       "group_scorer": "bn_scale", "controls": "random_prune", "control_seeds": 1,
       "control_levels": "2"}
ONESHOT = {**COMMON, "training_steps": "6it", "finetune_steps": "3it", "eval_every": "3it",
           "final_density": 0.5, "scope": "layerwise", "group_scorer": "taylor"}
AGP = {**COMMON, "training_steps": "12it", "eval_every": "2it", "final_density": 0.4,
       "prune_start": "2it", "prune_end": "8it", "prune_every": "2it", "group_scorer": "l2"}


def write(path, base: str, fields: dict) -> str:
    """A config file: `base` (an expression giving a ConfigDict) with `fields` set."""
    module, _, call = base.rpartition(".")
    lines = "".join(f"    c.{k} = {v!r}\n" for k, v in fields.items())
    with open(path, "w") as f:
        f.write(f"from {module} import {call.split('(')[0]}\n\n\ndef get_config():\n"
                f"    c = {call}\n{lines}    return c\n")
    return str(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("configs")
    return {"imp": write(d / "imp.py", "lottery.config.base()", IMP),
            "oneshot": write(d / "oneshot.py", "lottery.gradual.base_config('oneshot')",
                             ONESHOT),
            "agp": write(d / "agp.py", "lottery.gradual.base_config('agp')", AGP)}


@pytest.fixture(scope="module")
def reference():
    """(model, groups derived directly, params shapes) of the tiny model."""
    model = models.create("tiny_resnet")
    v = models.init(model, jax.random.key(0), SHAPE)
    return model, groups.derive(model, v, jnp.zeros((1, *SHAPE)), train=False), v["params"]


# ----------------------------------------------------------------------------------------------
# Independent numpy helpers: a group member's slices, channel liveness, the expected mask.


def _leaf(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return np.asarray(tree)


def _slices(x, m):
    """(channels, rest) view of member `m`'s slices of array `x`."""
    y = np.moveaxis(x, m.axis, 0)[m.index.reshape(-1)]
    return y.reshape(m.index.shape[0], -1)


def _alive(g, mask):
    """Per group: channels some producer weight of which the mask keeps."""
    return [np.any([_slices(_leaf(mask, m.path), m).any(1) for m in grp.members
                    if m.collection == "params" and m.role == "out"], axis=0) for grp in g]


def _whole_channels(g, alive, like):
    """The mask that removes exactly every params slice of every dead channel, nothing else."""
    out = jax.tree.map(lambda x: np.ones(np.shape(x), bool), like)
    for grp, a in zip(g, alive):
        for m in grp.members:
            if m.collection != "params":
                continue
            leaf = np.moveaxis(_leaf(out, m.path), m.axis, 0)  # a view: writes go to `out`
            leaf[m.index[~a].reshape(-1)] = False
    return out


def _bn_scale(g, params, mask):
    """Network slimming's |gamma| per channel, summed over a group's batch norms."""
    return [sum(np.abs(_slices(_leaf(params, m.path) * _leaf(mask, m.path), m)).sum(1)
                for m in grp.members if m.collection == "params" and m.role == "other"
                and m.path.endswith("/scale")) for grp in g]


def _round(f, n):
    return int(Fraction(str(f)) * n + Fraction(1, 2))


def _assert_group_mask(g, mask, alive):
    want = _whole_channels(g, alive, mask)
    for path, a, b in zip(masks.paths(mask), jax.tree.leaves(mask), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=path)


# ----------------------------------------------------------------------------------------------
# IMP.


@pytest.fixture(scope="module")
def imp_run(paths, tmp_path_factory):
    return imp.find_ticket(config.load(paths["imp"]), str(tmp_path_factory.mktemp("imp")))


def test_imp_levels_remove_whole_groups_by_the_count_rule_and_the_scorer(imp_run, reference):
    _, g, _ = reference
    run = runs.Run(imp_run)
    prev_alive = [np.ones(n, bool) for n in g.sizes]
    for level in (1, 2):
        mask = run.mask(level)
        alive = _alive(g, mask)
        _assert_group_mask(g, mask, alive)  # whole channels: every member slice, nothing else
        assert all(not np.any(a & ~p) for a, p in zip(alive, prev_alive))  # no revival
        before = sum(int(p.sum()) for p in prev_alive)
        removed = before - sum(int(a.sum()) for a in alive)
        assert removed == _round(0.3, before) > 0  # 56 channels: 17, then 12 of 39
        # global ranking by |gamma| of level L-1's trained, masked batch norms
        scores = _bn_scale(g, run.final_state(level - 1)["params"], run.mask(level - 1))
        kept = np.concatenate([s[a] for s, a in zip(scores, alive)])
        gone = np.concatenate([s[p & ~a] for s, a, p in zip(scores, alive, prev_alive)])
        assert kept.min() > gone.max()
        prev_alive = alive
    info = rundir.read_json(os.path.join(imp_run, "level_2", "info.json"))
    assert info["density"] == pytest.approx(masks.density(run.mask(2), masks.prunable(
        run.mask(2), exclude="out")))


def test_a_group_pruned_level_exports_compact_with_the_same_outputs(imp_run, reference,
                                                                    tmp_path, capsys):
    model, _, _ = reference
    out = str(tmp_path / "compact")
    assert cli.run(["export", imp_run, "--level", "2", "--format", "compact", "--out", out]) == 0
    with open(os.path.join(out, export.JSON_NAME)) as f:
        assert json.load(f)["architecture"]["class"] == "SlimResNet"
    apply_fn, params = export.load(out)
    run = runs.Run(imp_run)
    final, mask = run.final_state(2), run.mask(2)
    masked = jax.tree.map(lambda p, m: np.where(m, p, 0.0), final["params"], mask)
    x = np.random.default_rng(0).normal(size=(4, *SHAPE)).astype(np.float32)
    want = model.apply({"params": masked, "batch_stats": final["batch_stats"]}, x, train=False)
    got = apply_fn(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(want))))
    assert models.flat_param_count(params) < models.flat_param_count(final["params"])
    assert "units" in capsys.readouterr().out


def test_random_control_draws_random_channels_at_the_tickets_counts(imp_run, reference):
    _, g, like = reference
    run = runs.Run(imp_run)
    mask = run.mask(2)
    alive = _alive(g, mask)
    assert run.controls(2) == ["random_prune_s0"]
    ctrl = run.control_mask(2, "random_prune_s0")  # what find-ticket drew and trained
    calive = _alive(g, ctrl)
    _assert_group_mask(g, ctrl, calive)  # whole channels too
    assert [int(c.sum()) for c in calive] == [int(a.sum()) for a in alive]
    assert any(not np.array_equal(a, c) for a, c in zip(alive, calive))  # not the ticket
    # the same in/out channel counts per layer: the same weight count in every layer
    rates = masks.prunable(like, exclude="out")
    assert masks.counts(ctrl, rates) == masks.counts(mask, rates)
    skip = g.index("stage3_block0/conv1")
    assert int(alive[skip[0]].sum()) < g[skip[0]].size  # the ticket pruned it ...
    jitted = jax.jit(lambda m, k: groups.random_like(g, m, k, exclude=skip))
    kept = [int(c.sum()) for c in _alive(g, jitted(mask, jax.random.key(4)))]
    assert kept == [g[i].size if i in skip else int(a.sum()) for i, a in enumerate(alive)]


# ----------------------------------------------------------------------------------------------
# One-shot and AGP.


def test_oneshot_keeps_the_requested_channels_of_every_group(paths, reference, tmp_path):
    _, g, _ = reference
    run_dir = gradual.run_oneshot(config.load(paths["oneshot"]), str(tmp_path))
    mask = runs.Run(run_dir).mask(1)
    alive = _alive(g, mask)
    _assert_group_mask(g, mask, alive)
    assert [int(a.sum()) for a in alive] == [_round(0.5, n) for n in g.sizes]  # layerwise
    assert runs.Run(run_dir).levels == [0, 1]


def test_agp_prunes_channels_on_the_schedule_inside_the_compiled_step(paths, reference,
                                                                       tmp_path):
    _, g, _ = reference
    seen = []
    run_dir = gradual.run_agp(config.load(paths["agp"]), str(tmp_path),
                              callback=lambda st, m, r: seen.append(
                                  (r["step"], jax.tree.map(np.asarray, m))))
    n = sum(g.sizes)
    d = lambda t: 0.4 + 0.6 * (1 - min(max((t - 2) / 6, 0), 1)) ** 3  # noqa: E731
    events = [2, 4, 6, 8]
    for step, m in seen:  # after `step` steps: the last event before it has been applied
        done = [t for t in events if t < step]
        want = _round(repr(d(done[-1])), n) if done else n
        alive = _alive(g, m)
        _assert_group_mask(g, m, alive)
        assert sum(int(a.sum()) for a in alive) == want, step
    assert seen[-1][0] == 12
    final = runs.Run(run_dir).mask(0)
    assert sum(int(a.sum()) for a in _alive(g, final)) == _round(0.4, n)


# ----------------------------------------------------------------------------------------------
# Bad fields, and the core functions on their own.


@pytest.mark.parametrize("command, override, message", [
    ("imp", "structure=channels", "structure='channels': expected one of weights, groups"),
    ("imp", "structure=units", "structure='units': expected one of weights, groups"),
    ("imp", "group_scorer=l3", "group_scorer='l3': expected one of l1, l2, l1_all"),
    ("imp", "scope=erk", "scope='erk': structure='groups' prunes whole channels"),
    ("imp", "scorer=snip", "scorer='snip': structure='groups' prunes whole channels, ranked by "
                           "group_scorer"),
    ("imp", "count_rule=openlth", "count_rule='openlth': structure='groups'"),
    ("imp", "rates=conv=0.5", "rates='conv=0.5': structure='groups'"),
    ("imp", "model=gathered", "structure='groups' with model='gathered', group_scorer="
                              "'bn_scale': cannot derive channel groups: primitive 'gather'"),
    ("imp", "model=lenet300_100 --config.group_scorer=bn_scale",
     "bn_scale needs a norm layer scale in every group"),
    ("imp", "exclude=conv,stage.*", "every group has an excluded producer layer"),
    ("agp", "group_scorer=taylor", "group_scorer='taylor': AGP re-ranks channels inside the "
                                   "compiled step"),
    ("oneshot", "scope=uniform", "scope='uniform': structure='groups'"),
])
def test_bad_fields_are_one_line_before_any_work(paths, tmp_path, command, override, message):
    name = {"imp": "find-ticket"}.get(command, command)
    with pytest.raises(ValueError) as e:
        cli.run([name, "--config", paths[command], "--workdir", str(tmp_path / "w"),
                 *[f"--config.{o}" for o in override.split(" --config.")]])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not list((tmp_path / "w").glob("*")), "nothing may be written"


def test_existing_run_hashes_stay_and_groups_get_their_own():
    assert config.run_hash(config.base()) == "0f5dbf1df0"  # as tests/test_imp.py pins it
    pinned = {("agp", "weights"): "01f61a6ca4", ("oneshot", "weights"): "bcb9b09756",
              ("agp", "units"): "15b4ffc8eb", ("oneshot", "units"): "16ddb269e7"}
    for (kind, structure), h in pinned.items():  # hashes from before `structure` joined base()
        c = gradual.base_config(kind)
        c.structure = structure
        assert config.run_hash(c) == h
    old = config.base().to_dict()
    del old["structure"], old["group_scorer"]  # a run saved before the fields existed
    assert config.run_hash(config.from_saved(old)) == "0f5dbf1df0"
    c = config.base()
    c.structure = "groups"
    hashes = {config.run_hash(c)}
    c.group_scorer = "l2"
    hashes.add(config.run_hash(c))
    assert len(hashes) == 2 and "0f5dbf1df0" not in hashes


def test_core_counts_layerwise_and_precomputed_counts_under_jit(reference):
    model, g, _ = reference
    v = models.init(model, jax.random.key(1), SHAPE)
    p = v["params"]
    mask, _ = groups.prune(g, "l1", p, masks.init(p), 0.75, scope="layerwise")
    out, ch = groups.remove_fraction(g, "l2", p, mask, 0.5, scope="layerwise", exclude=[0])
    before = _alive(g, mask)
    for i, (a, c) in enumerate(zip(before, ch)):
        assert int(np.sum(c)) == (int(a.sum()) if i == 0 else
                                  int(a.sum()) - _round(0.5, int(a.sum())))
    _assert_group_mask(g, out, _alive(g, out))
    # prune_to_counts with keep_counts' counts, jitted, is prune at that density
    from lottery import prune
    counts = prune.keep_counts(groups.init(g), 0.3, rates=groups.prunable(g))
    jitted = jax.jit(lambda p, m, k: groups.prune_to_counts(g, "l1", p, m, k)[0])
    want, _ = groups.prune(g, "l1", p, mask, 0.3)
    for a, b in zip(jax.tree.leaves(jitted(p, mask, counts)), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    assert groups.excluded(g, masks.prunable(p, exclude="conv")) == g.index("conv")
