"""bfloat16 compute with float32 master weights; replica strategies (vmap, map, sequential)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottery import config as config_lib
from lottery import masks
from lottery import train as T

from test_train import MLP, BNNet, Data, assert_pruned_zero


def problem(model=None, n=256, shape=(6, 6, 2)):
    data = Data(n=n, shape=shape)
    model = model or MLP()
    variables = model.init(jax.random.key(0), data.x_train[:1])
    mask = jax.tree.map(
        lambda p: jax.random.bernoulli(jax.random.key(1), 0.3, p.shape) if p.ndim >= 2
        else jnp.ones(p.shape, bool), variables["params"])
    return data, model, variables, mask


def floating_dtypes(tree):
    return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.parametrize("tx", [
    T.optimizer("sgd", 0.1, momentum=0.9, weight_decay=1e-3),
    T.optimizer("adam", 1e-2, weight_decay=1e-3),
], ids=["sgd-momentum-wd", "adam-l2"])
@pytest.mark.parametrize("loop", ["scan", "steps"])
def test_bfloat16_keeps_pruned_weights_zero_and_float32_state(tx, loop):
    data, model, variables, mask = problem()
    state = T.init_state(variables, tx, jax.random.key(3))  # unmasked: training must zero them
    out = {}
    for dtype in ("float32", "bfloat16"):
        trainer = T.Trainer(model, tx, 32, loop=loop, compute_dtype=dtype)
        out[dtype] = T.train(trainer, state, mask, data, num_steps=40, progress=False)
    new, hist = out["bfloat16"]
    assert int(new.step) == 40
    assert_pruned_zero(new.params, mask)
    assert floating_dtypes(new.params) == {jnp.dtype(jnp.float32)}
    assert floating_dtypes(new.opt_state) == {jnp.dtype(jnp.float32)}
    f32 = out["float32"][1]
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]  # it learns
    np.testing.assert_allclose(hist[-1]["train_loss"], f32[-1]["train_loss"], rtol=0.1, atol=0.02)
    assert abs(hist[-1]["test_accuracy"] - f32[-1]["test_accuracy"]) <= 0.1
    # and it is bfloat16 compute: not bitwise the float32 run
    assert not np.array_equal(new.params["out"]["kernel"],
                              out["float32"][0].params["out"]["kernel"])


def test_bfloat16_batch_norm_convs_run_in_bfloat16_with_float32_statistics():
    """flax's BatchNorm reduces in float32 and returns the dtype of its input and scale: with
    params and inputs cast, every conv and dense layer (also after BN) sees bfloat16 inputs,
    while the running statistics stay float32."""
    data, model, variables, mask = problem(BNNet(), n=64)
    seen = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, (nn.Conv, nn.Dense)) and context.method_name == "__call__":
            seen.append((type(context.module).__name__, args[0].dtype))
        return next_fun(*args, **kwargs)

    trainer = T.Trainer(model, T.optimizer("sgd", 0.05, momentum=0.9), 16,
                        compute_dtype="bfloat16")
    with nn.intercept_methods(spy):
        loss, stats = T._loss(trainer, variables["params"], variables["batch_stats"],
                              data.x_train[:16], data.y_train[:16])
    assert seen == [("Conv", jnp.bfloat16), ("Dense", jnp.bfloat16)]
    assert loss.dtype == jnp.float32 and floating_dtypes(stats) == {jnp.dtype(jnp.float32)}
    state = T.init_state(variables, trainer.tx, jax.random.key(1), mask)
    new, hist = T.train(trainer, state, mask, data, num_steps=8, progress=False)
    assert floating_dtypes(new.batch_stats) == {jnp.dtype(jnp.float32)}
    assert not np.allclose(new.batch_stats["BatchNorm_0"]["mean"],
                           variables["batch_stats"]["BatchNorm_0"]["mean"])
    assert_pruned_zero(new.params, mask)
    # evaluation runs in bfloat16 too: close to the float32 evaluation of the same weights
    f32 = T.evaluate(trainer._replace(compute_dtype="float32"), new, mask, data.x_test,
                     data.y_test)
    assert hist[-1]["test_loss"] == pytest.approx(f32["test_loss"], rel=0.05)


def test_config_fields_keep_run_hashes_at_their_defaults():
    cfg = config_lib.base()
    assert cfg.compute_dtype == "float32" and cfg.replica_strategy == "auto"
    fields = config_lib.hashed_fields(cfg)
    assert "compute_dtype" not in fields and "replica_strategy" not in fields
    old = cfg.to_dict()
    del old["compute_dtype"], old["replica_strategy"]  # a config from before the fields
    assert config_lib.run_hash(config_lib.from_saved(old)) == config_lib.run_hash(cfg)
    bf16 = config_lib.base()
    bf16.compute_dtype = "bfloat16"
    assert config_lib.run_hash(bf16) != config_lib.run_hash(cfg)
    seq = config_lib.base()
    seq.replica_strategy = "sequential"  # does not change results: not hashed
    assert config_lib.run_hash(seq) == config_lib.run_hash(cfg)
    for field, bad in (("compute_dtype", "float16"), ("replica_strategy", "pmap")):
        c = config_lib.base()
        c[field] = bad
        with pytest.raises(ValueError, match=f"{field}='{bad}': expected one of"):
            config_lib.validate(c)
    with pytest.raises(ValueError, match="compute_dtype='float16'"):
        data, model, variables, mask = problem()
        T.train(T.Trainer(model, T.optimizer(), 32, compute_dtype="float16"),
                T.init_state(variables, T.optimizer(), jax.random.key(0)), mask, data,
                num_steps=1, progress=False)


def replica_problem(model, k=3, n=256, shape=(6, 6, 2)):
    data, model, variables, mask = problem(model, n, shape)
    tx = T.optimizer("sgd", 0.05, momentum=0.9)
    keys = [jax.random.key(10 + i) for i in range(k)]
    rmasks = [masks.random_like(mask, kk) for kk in keys]
    states = [T.init_state(model.init(kk, data.x_train[:1]), tx, kk, m)
              for kk, m in zip(keys, rmasks)]
    return data, model, tx, T.stack(states), T.stack(rmasks)


def prune_at_step_2(threshold, state, mask):
    """A MaskUpdate: at step 2, prune the weights smaller than `threshold` (and zero them)."""
    new = jax.tree.map(lambda m, p: jnp.where(state.step == 2, m & (jnp.abs(p) > threshold), m)
                       if p.ndim >= 2 else m, mask, state.params)
    return state.replace(params=masks.apply(state.params, new)), new


@pytest.mark.parametrize("net,loop", [("mlp", "scan"), ("mlp", "steps"), ("bn", "steps"),
                                      ("mlp-update", "scan"), ("mlp-update", "steps")])
def test_replica_strategies_give_the_same_states(net, loop):
    model = BNNet() if net == "bn" else MLP()
    data, model, tx, states, rmasks = replica_problem(model)
    trainer = T.Trainer(model, tx, 32, loop=loop, augment="none")
    update = T.MaskUpdate(prune_at_step_2, jnp.float32(0.05)) if net == "mlp-update" else None
    out = {}
    for strategy in ("vmap", "map", "sequential"):
        res = T.train(trainer._replace(replica_strategy=strategy), states, rmasks, data,
                      num_steps=12, eval_every=5, replicas=True, progress=False,
                      mask_update=update)
        out[strategy] = res
    ref = out["sequential"]
    separate = [T.train(trainer, s, m, data, num_steps=12, eval_every=5, progress=False,
                        mask_update=update) for s, m in zip(T.unstack(states), T.unstack(rmasks))]
    for i, sep in enumerate(separate):  # sequential is bitwise the separate runs
        mine = [T.unstack(x)[i] for x in ref[:-1]]  # (state,) or (state, mask) of replica i
        for a, b in zip(jax.tree.leaves(sep[:-1]), jax.tree.leaves(mine)):
            np.testing.assert_array_equal(a, b)
    for strategy in ("vmap", "map"):
        for a, b in zip(jax.tree.leaves(out[strategy][:-1]), jax.tree.leaves(ref[:-1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for h, g in zip(out[strategy][-1], ref[-1]):
            assert h["step"] == g["step"]
            np.testing.assert_allclose(h["train_loss"], g["train_loss"], rtol=1e-5)
            if "test_accuracy" in g:
                np.testing.assert_allclose(h["test_accuracy"], g["test_accuracy"])
    if update is not None:  # the update pruned something, identically
        kept = lambda m: sum(int(x.sum()) for x in jax.tree.leaves(m))  # noqa: E731
        assert kept(ref[1]) < kept(rmasks)
        for a, b in zip(jax.tree.leaves(out["map"][1]), jax.tree.leaves(ref[1])):
            np.testing.assert_array_equal(a, b)


def test_auto_strategy_and_loop_look_at_one_replica():
    data, model, tx, states, rmasks = replica_problem(MLP(), k=2)
    trainer = T.Trainer(model, tx, 32)
    assert trainer.resolved_replica_strategy(states.params) == "vmap"
    assert trainer.resolved_loop(states.params, replicas=True) == "scan"  # stacked kernels 3-D
    conv = BNNet().init(jax.random.key(0), data.x_train[:1])["params"]
    assert trainer.resolved_replica_strategy(T.stack([conv, conv])) == "sequential"
    assert trainer.resolved_replica_strategy(T.stack([conv])) == "vmap"  # one: no grouped conv
    assert trainer._replace(replica_strategy="map").resolved_replica_strategy(conv) == "map"
    with pytest.raises(ValueError, match="replica_strategy='pmap'"):
        T.train(trainer._replace(replica_strategy="pmap"), states, rmasks, data, num_steps=1,
                replicas=True, progress=False)
