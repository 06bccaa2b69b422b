"""Tests for lottery.sparse: BCOO model == masked dense model, what is converted, refusals."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.experimental import sparse as jsparse

from lottery import masks, models, sparse


def _setup(model, shape, density, seed=0, keep_out=False):
    """Random params (numpy) and an unstructured random mask of every kernel."""
    rng = np.random.default_rng(seed)
    v = dict(jax.eval_shape(lambda: models.init(model, jax.random.key(seed), shape)))
    v = jax.tree.map(lambda x: (0.5 * rng.normal(size=x.shape)).astype(np.float32), v)
    if "batch_stats" in v:
        v["batch_stats"] = jax.tree.map(lambda x: np.abs(x) + 0.5, v["batch_stats"])
    mask = jax.tree.map(lambda x: rng.random(x.shape) < density if x.ndim >= 2
                        else np.ones(x.shape, bool), v["params"])
    if keep_out:
        mask["out"]["kernel"][:] = True
    return v, mask


def _masked(model, v, mask, x):
    p = jax.tree.map(lambda a, m: np.where(m, a, 0.0), v["params"], mask)
    return jax.jit(lambda v, x: model.apply(v, x, train=False))({**v, "params": p}, x)


CASES = {
    "lenet": (models.LeNet300100(hidden=(40, 20)), (6, 6, 1)),
    "conv": (models.ConvNet(plan=(4, "M"), hidden=(12,)), (6, 6, 2)),
    "vgg_bn": (models.VGG(plan=(4, "M", 6)), (4, 4, 3)),
    "mlp1d_residual": (models.MLP1D(hidden=16), (40, 1)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("density", [0.3, 0.02, 0.0])  # 0.0: empty BCOO matrices
def test_bcoo_model_equals_masked_model(name, density):
    model, shape = CASES[name]
    v, mask = _setup(model, shape, density)
    sp = sparse.to_bcoo(v["params"], mask)
    x = np.random.default_rng(1).normal(size=(7, *shape)).astype(np.float32)
    got = jax.jit(sparse.apply_fn(model, v))(sp, x)
    want = _masked(model, v, mask, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))))


def test_what_is_converted():
    model, shape = CASES["conv"]
    v, mask = _setup(model, shape, 0.3, keep_out=True)
    sp = sparse.to_bcoo(v["params"], mask)
    assert sparse.is_bcoo(sp["fc1"]["kernel"])
    assert not sparse.is_bcoo(sp["conv1"]["kernel"])  # conv stays dense, masked
    np.testing.assert_array_equal(sp["conv1"]["kernel"],
                                  np.where(mask["conv1"]["kernel"], v["params"]["conv1"]["kernel"],
                                           0.0))
    assert not sparse.is_bcoo(sp["out"]["kernel"])  # nothing pruned there: stays dense
    k = sp["fc1"]["kernel"]
    m = mask["fc1"]["kernel"]
    assert k.nse == int(m.sum()) and k.shape == m.shape
    np.testing.assert_array_equal(np.asarray(k.indices), np.argwhere(m))
    np.testing.assert_array_equal(np.asarray(k.data), v["params"]["fc1"]["kernel"][m])
    np.testing.assert_array_equal(k.todense(), np.where(m, v["params"]["fc1"]["kernel"], 0.0))
    dense_rest = sum(np.size(x) for path, x in zip(masks.paths(v["params"]),
                                                   jax.tree.leaves(v["params"]))
                     if path != "fc1/kernel")
    assert sparse.stored_count(sp) == int(m.sum()) + dense_rest


def test_the_sparse_product_is_what_runs():
    """Doubling the BCOO values doubles that layer's weights: the output follows the BCOO
    matrices, and the compiled program holds a BCOO product."""
    model, shape = CASES["lenet"]
    v, mask = _setup(model, shape, 0.3)
    sp = sparse.to_bcoo(v["params"], mask)
    sp["fc2"]["kernel"] = jsparse.BCOO((sp["fc2"]["kernel"].data * 2, sp["fc2"]["kernel"].indices),
                                       shape=sp["fc2"]["kernel"].shape)
    x = np.random.default_rng(2).normal(size=(3, *shape)).astype(np.float32)
    f = sparse.apply_fn(model, v)
    doubled = {**v, "params": {**v["params"], "fc2": {**v["params"]["fc2"],
                                                      "kernel": 2 * v["params"]["fc2"]["kernel"]}}}
    np.testing.assert_allclose(jax.jit(f)(sp, x), _masked(model, doubled, mask, x),
                               rtol=1e-5, atol=1e-5)
    assert "bcoo_dot_general" in str(jax.make_jaxpr(f)(sp, x))


class _Seq(nn.Module):
    """A Dense on the last axis of a 3-D input, then a DenseGeneral (2-D kernel, not nn.Dense)."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(5, name="fc")(x))
        return nn.DenseGeneral(3, name="head")(x)


def test_dense_over_leading_axes_and_non_dense_refused():
    model = _Seq()
    x = np.random.default_rng(3).normal(size=(2, 4, 6)).astype(np.float32)
    v = model.init(jax.random.key(0), x)
    rng = np.random.default_rng(4)
    mask = jax.tree.map(lambda p: rng.random(p.shape) < 0.5, v["params"])
    mask["fc"]["bias"][:] = True
    mask["head"]["bias"][:] = True
    sp = sparse.to_bcoo(v["params"], mask)
    with pytest.raises(ValueError, match=r"'head/kernel'.*DenseGeneral.*only nn.Dense"):
        sparse.apply_fn(model, v)(sp, x)
    sp["head"]["kernel"] = sp["head"]["kernel"].todense()  # only fc sparse: fine, (2, 4, 5) input
    got = sparse.apply_fn(model, v)(sp, x)
    want = model.apply({"params": masks.apply(v["params"], mask)}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_unused_bcoo_leaf_is_named():
    model, shape = CASES["lenet"]
    v, mask = _setup(model, shape, 0.3)
    sp = sparse.to_bcoo(v["params"], mask)
    sp["extra"] = {"kernel": sp["fc1"]["kernel"]}
    x = np.zeros((1, *shape), np.float32)
    with pytest.raises(ValueError, match=r"'extra/kernel'.*no nn.Dense"):
        sparse.apply_fn(model, v)(sp, x)


def test_mask_none_uses_exact_zeros():
    w = np.array([[0.0, 1.0], [2.0, 0.0]], np.float32)
    sp = sparse.to_bcoo({"d": {"kernel": w, "bias": np.zeros(2, np.float32)}})
    assert sp["d"]["kernel"].nse == 2
    np.testing.assert_array_equal(sp["d"]["kernel"].todense(), w)
