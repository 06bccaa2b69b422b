"""Pruning scores: functions `scorer(params, mask, inputs) -> scores`; a HIGHER score means KEEP.

`scores` is a float pytree with the structure of `params`. Only the entries of prunable leaves
(rate > 0, see `lottery.masks.prunable`) matter; values on the other leaves are ignored downstream.
`inputs` is an `Inputs` bundle (model, loss, data, key, rates) that passes through `jax.jit` as an
ordinary argument. Every forward pass runs on the masked weights m ⊙ θ (`masks.apply`).

Scorers (definitions follow the Synaptic-Flow reference code for pruning at initialization, and
OpenLTH for magnitude pruning):

- `magnitude`          |θ|
- `random`             i.i.d. N(0, 1) from `inputs.key` (the random-pruning control)
- `gradient_magnitude` |θ ⊙ ∂L/∂θ| (first-order Taylor; zero on pruned entries)
- `snip`               |∂L/∂m| = |θ ⊙ ∂L/∂w| at w = m ⊙ θ (Lee et al. 2019, arXiv:1810.02340)
- `grasp`              θ ⊙ Hg with temperature 200 (Wang et al. 2020, arXiv:2002.07376)
- `synflow`            |θ ⊙ ∂R/∂θ|, data-free (Tanaka et al. 2020, arXiv:2006.05467)

Composition (`weighted_sum`, `rank_average`, `product`) builds new scorers from any functions that
follow the protocol, so a user-written scorer works everywhere a built-in one does.

Example::

    inputs = Inputs.create(lambda p, x: model.apply({'params': p}, x), [(x, y)],
                           input_shape=(1, 28, 28, 1))
    scores = jax.jit(snip)(params, mask, inputs)   # one compilation serves every mask
    mixed = weighted_sum([(1.0, snip), (0.5, synflow)])
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lottery import masks

PyTree = Any
Scorer = Callable[[PyTree, PyTree, "Inputs"], PyTree]

GRASP_TEMPERATURE = 200.0


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels (the default `Inputs.loss_fn`)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@struct.dataclass
class Inputs:
    """What scorers may need, as one jit-compatible argument.

    Attributes:
      apply_fn: `apply_fn(params, x) -> logits`, the model in inference mode (static).
      loss_fn: `loss_fn(logits, y) -> scalar` (static); default mean softmax cross-entropy.
      batches: a tuple of `(x, y)` pairs. Gradients are SUMMED over the pairs (the loop is
        unrolled at trace time: use a few large batches, not many small ones).
      input_shape: the model input shape with a batch axis, e.g. (1, 28, 28, 1) (static).
      key: a PRNG key, for `random`.
      rates: per-leaf pruning rates as a tuple of floats in leaf order (static, hashable), or None
        for the default rule (`masks.default_prunable`: kernels). Build with
        `Inputs.create(rates=<rates pytree>)`.

    A static field is part of the jit cache key: build `Inputs` once and reuse it, so that a
    fresh lambda for `apply_fn` does not cause a recompilation per call.
    """

    apply_fn: Callable | None = struct.field(pytree_node=False, default=None)
    loss_fn: Callable = struct.field(pytree_node=False, default=cross_entropy)
    batches: tuple | None = None
    input_shape: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)
    key: jax.Array | None = None
    rates: tuple[float, ...] | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, apply_fn: Callable | None = None, batches=None, *,
               loss_fn: Callable = cross_entropy, input_shape: Sequence[int] | None = None,
               key: jax.Array | None = None, rates: PyTree | None = None) -> "Inputs":
        """Validated `Inputs`: `batches` is one `(x, y)` pair or a sequence of pairs; `rates` is
        a rates pytree (as from `masks.prunable`) or a tuple of per-leaf floats."""
        return cls(apply_fn=apply_fn, loss_fn=loss_fn, batches=_as_batches(batches),
                   input_shape=_as_shape(input_shape), key=key, rates=_as_rate_tuple(rates))


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _as_batches(batches) -> tuple | None:
    if batches is None:
        return None
    if isinstance(batches, (tuple, list)) and len(batches) == 2 and _is_array(batches[0]):
        batches = [batches]
    out = []
    for i, b in enumerate(batches):
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise ValueError(f"batches[{i}] must be an (x, y) pair; got {type(b).__name__}")
        out.append((b[0], b[1]))
    if not out:
        raise ValueError("batches is empty: give one (x, y) pair or a sequence of pairs")
    return tuple(out)


def _as_shape(shape) -> tuple[int, ...] | None:
    if shape is None:
        return None
    shape = tuple(shape)
    if len(shape) < 2 or not all(isinstance(d, numbers.Integral) and d > 0 for d in shape):
        raise ValueError(f"input_shape must be a tuple of positive ints with a batch axis first, "
                         f"e.g. (1, 28, 28, 1); got {shape!r}")
    return tuple(int(d) for d in shape)


def _as_rate_tuple(rates) -> tuple[float, ...] | None:
    if rates is None:
        return None
    leaves = jax.tree.leaves(rates)
    if not all(isinstance(r, (int, float)) and r >= 0 for r in leaves):
        raise ValueError(f"rates must hold Python floats >= 0 (one per params leaf); got {leaves}")
    return tuple(float(r) for r in leaves)


def leaf_rates(params: PyTree, inputs: Inputs | None) -> PyTree:
    """The rates pytree for `params`: `inputs.rates` unflattened, or the default rule
    (`masks.default_prunable`)."""
    if inputs is None or inputs.rates is None:
        return masks.prunable(params)
    leaves, treedef = jax.tree.flatten(params)
    if len(inputs.rates) != len(leaves):
        raise ValueError(f"inputs.rates has {len(inputs.rates)} entries but params have "
                         f"{len(leaves)} leaves: {masks.paths(params)}")
    return jax.tree.unflatten(treedef, list(inputs.rates))


def _require(inputs: Inputs | None, scorer: str, *fields: str) -> None:
    """Raise ValueError naming the first of `fields` that `inputs` lacks."""
    if inputs is None:
        raise ValueError(f"{scorer} needs inputs (an Inputs with {', '.join(fields)}); got None")
    for f in fields:
        if getattr(inputs, f) is None:
            raise ValueError(f"{scorer} needs inputs.{f}; it is None "
                             f"(build it with Inputs.create({f}=...))")


def _loss_sum(weights: PyTree, inputs: Inputs, temperature: float = 1.0) -> jax.Array:
    """Σ over the batches of loss(apply(weights, x) / temperature, y)."""
    if not (isinstance(inputs.batches, tuple)
            and all(isinstance(b, (tuple, list)) and len(b) == 2 for b in inputs.batches)):
        raise ValueError("inputs.batches must be a tuple of (x, y) pairs; build it with "
                         "Inputs.create(batches=...), which also accepts a single pair")
    total = 0.0
    for x, y in inputs.batches:
        logits = inputs.apply_fn(weights, x)
        if temperature != 1.0:
            logits = logits / temperature
        total = total + inputs.loss_fn(logits, y)
    return total


def magnitude(params: PyTree, mask: PyTree, inputs: Inputs | None = None) -> PyTree:
    """|θ| (OpenLTH's IMP criterion). Pruned entries keep their |θ|: pruning keeps them pruned."""
    del inputs
    masks.check(mask, params)
    return jax.tree.map(jnp.abs, params)


def random(params: PyTree, mask: PyTree, inputs: Inputs) -> PyTree:
    """I.i.d. standard normal scores: leaf i uses `jax.random.split(inputs.key, n_leaves)[i]`."""
    masks.check(mask, params)
    _require(inputs, "random", "key")
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(inputs.key, len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, jnp.shape(p)) for k, p in zip(keys, leaves)])


def gradient_magnitude(params: PyTree, mask: PyTree, inputs: Inputs) -> PyTree:
    """|θ ⊙ ∂L/∂θ| with L = Σ_batches loss(f(m ⊙ θ)): exactly 0 on pruned entries."""
    masks.check(mask, params)
    _require(inputs, "gradient_magnitude", "apply_fn", "batches")
    grads = jax.grad(lambda p: _loss_sum(masks.apply(p, mask), inputs))(params)
    return jax.tree.map(lambda p, g: jnp.abs(p * g), params, grads)


def snip(params: PyTree, mask: PyTree, inputs: Inputs) -> PyTree:
    """SNIP: |∂L/∂m| at the current mask = |θ ⊙ ∂L/∂w| at w = m ⊙ θ, gradients summed over batches.

    On pruned entries this is |θ ⊙ ∂L/∂w| at w = 0: the first-order loss change of restoring the
    weight, generally NON-zero (the reference zeroes pruned θ in place, so it reports 0 there).
    Not normalized: the reference divides by Σ scores, which leaves the ranking unchanged.
    """
    masks.check(mask, params)
    _require(inputs, "snip", "apply_fn", "batches")
    grads_w = jax.grad(_loss_sum)(masks.apply(params, mask), inputs)
    return jax.tree.map(lambda p, g: jnp.abs(p * g), params, grads_w)


def grasp(params: PyTree, mask: PyTree, inputs: Inputs,
          temperature: float = GRASP_TEMPERATURE) -> PyTree:
    """GraSP: θ ⊙ Hg, highest kept (the paper removes the largest −θ ⊙ Hg).

    L_T = Σ_batches loss(f(m ⊙ θ) / T, y); g = ∂L_T/∂θ on prunable leaves (0 elsewhere);
    Hg = ∂/∂θ (stop_grad(g) · ∂L_T/∂θ) by forward-over-reverse (`jax.jvp` of `jax.grad`), never a
    materialized Hessian. Exactly 0 on pruned entries (g and Hg vanish there). Unnormalized (the
    reference divides by |Σ score|, which leaves the ranking unchanged).
    """
    masks.check(mask, params)
    _require(inputs, "grasp", "apply_fn", "batches")
    rates = leaf_rates(params, inputs)
    grad_fn = jax.grad(lambda p: _loss_sum(masks.apply(p, mask), inputs, temperature))
    g = jax.tree.map(lambda gi, r: gi if r > 0 else jnp.zeros_like(gi), grad_fn(params), rates)
    g = jax.lax.stop_gradient(g)
    _, hg = jax.jvp(grad_fn, (params,), (g,))
    return jax.tree.map(lambda p, h: p * h, params, hg)


# SynFlow's float32 rescaling: probe R at inputs 2^-k for these k, then pick powers of two.
_PROBE_EXPONENTS = (0, 40, 80, 120)
_NO_SCALING_BELOW = 64       # log2 R(1) <= 64: compute as is
_SEED_ONLY_BELOW = 112       # log2 R(1) <= 112: scale only the backward seed (exact for any net)


def _synflow_exponents(forward: Callable, ones: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(a, b): input scale 2^a and backward-seed scale 2^b keeping float32 SynFlow finite.

    log2 R(1) is estimated from R at inputs 2^-k (k in _PROBE_EXPONENTS, one vmapped forward),
    assuming R(α) = α R(1). Then: e <= 64 -> (0, 0); e <= 112 -> (0, 64 - e);
    else (-ceil(e/2), -floor(e/2)), so forward and backward both stay within about 2^±(e/2).
    """
    exps = jnp.asarray(_PROBE_EXPONENTS, jnp.int32)
    alphas = jnp.ldexp(jnp.ones((), ones.dtype), -exps)
    r = jax.vmap(lambda a: forward(ones * a))(alphas)
    r = jnp.abs(r)
    usable = (jnp.isfinite(r) & (r > 0)).at[0].set(jnp.isfinite(r[0]))
    k = jnp.argmax(usable)
    est = jnp.log2(r[k]) + exps[k].astype(r.dtype)
    est = jnp.where(usable.any(), est, float(_PROBE_EXPONENTS[-1] + 128))
    est = jnp.where(jnp.isnan(est), 0.0, est)
    e = jnp.ceil(jnp.clip(est, -1000.0, 1000.0)).astype(jnp.int32)
    a = jnp.where(e <= _SEED_ONLY_BELOW, 0, -((e + 1) // 2))
    b = jnp.where(e <= _NO_SCALING_BELOW, 0,
                  jnp.where(e <= _SEED_ONLY_BELOW, _NO_SCALING_BELOW - e, -(e // 2)))
    return a, b


def synflow(params: PyTree, mask: PyTree, inputs: Inputs) -> PyTree:
    """SynFlow: |φ ⊙ ∂R/∂φ| with φ = |θ| (every param, biases included), R = Σ f(m ⊙ φ)(1).

    The input is all-ones of shape (1, *input_shape[1:]); batch statistics are those bound in
    `apply_fn` (inference mode; not made absolute, they are mean 0 / var 1 at initialization).
    Exactly 0 on pruned entries.

    Numerics: deep nets overflow float32 (R grows like the product of layer norms). With
    `jax_enable_x64` on, everything is computed in float64 and scores are float64. Otherwise
    R(1) is estimated by a cheap probe and, if log2 R(1) > 64, the backward seed is scaled by 2^b
    (b < 0) and, if log2 R(1) > 112, the input by 2^a as well (`_synflow_exponents`). Scaling by a
    power of two is exact in floating point, so the returned scores are 2^(a+b) times the unscaled
    float32 scores (where those are finite) and the ranking is unchanged, unless values reach the
    subnormal range. Seed scaling is exact for any network. Input scaling (log2 R(1) > 112 only)
    is exact only for networks positively homogeneous in their input (ReLU nets with zero biases,
    as at initialization; inference batch norm with zero running mean and zero beta; max/avg
    pooling); with nonzero biases or layer norm the ranking may then change. Beyond
    log2 R(1) ≈ 240 float32 cannot hold the scores: enable x64. The probe costs 4 extra forward
    passes at batch 1.
    """
    masks.check(mask, params)
    _require(inputs, "synflow", "apply_fn", "input_shape")
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    phi = jax.tree.map(lambda p: jnp.abs(p).astype(dtype), params)
    ones = jnp.ones((1, *inputs.input_shape[1:]), dtype)

    def net(p, x):
        return inputs.apply_fn(masks.apply(p, mask), x)

    if dtype == jnp.float64:
        a, b = jnp.int32(0), jnp.int32(0)
    else:
        forward = lambda x: sum(jnp.sum(o) for o in jax.tree.leaves(net(phi, x)))  # noqa: E731
        a, b = _synflow_exponents(forward, ones)
    one = jnp.ones((), dtype)
    out, pullback = jax.vjp(lambda p: net(p, ones * jnp.ldexp(one, a)), phi)
    (grads,) = pullback(jax.tree.map(lambda o: jnp.full_like(o, jnp.ldexp(one, b)), out))
    return jax.tree.map(lambda p, g: jnp.abs(p * g), phi, grads)


SCORERS: dict[str, Scorer] = {
    "magnitude": magnitude,
    "random": random,
    "gradient_magnitude": gradient_magnitude,
    "snip": snip,
    "grasp": grasp,
    "synflow": synflow,
}


def get(name: str) -> Scorer:
    """The scorer called `name` in `SCORERS`."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {sorted(SCORERS)}")
    return SCORERS[name]


# ---------------------------------------------------------------------------------------------
# Composition


def _kept_prunable(params: PyTree, mask: PyTree, inputs: Inputs) -> list[jax.Array | None]:
    """Per leaf: the bool array of kept prunable entries, or None for a non-prunable leaf."""
    rates = jax.tree.leaves(leaf_rates(params, inputs))
    return [jnp.asarray(m, bool) if r > 0 else None
            for m, r in zip(jax.tree.leaves(mask), rates)]


def _normalize(scores: PyTree, keep: list) -> PyTree:
    """Scores divided by Σ|scores| over the kept prunable entries (by 1 if that sum is 0)."""
    leaves, treedef = jax.tree.flatten(scores)
    total = sum(jnp.sum(jnp.where(k, jnp.abs(s), 0)) for s, k in zip(leaves, keep)
                if k is not None)
    total = jnp.where(total > 0, total, 1)
    return jax.tree.unflatten(treedef, [s / total for s in leaves])


def _check_scorer(s, where: str) -> None:
    if not callable(s):
        raise ValueError(f"{where} must be a scorer `f(params, mask, inputs)`; got {s!r}")


def weighted_sum(terms: Sequence[tuple[float, Scorer]], normalize: bool = True) -> Scorer:
    """A scorer Σ_i w_i s_i. With `normalize`, each s_i is first divided by Σ|s_i| over the KEPT
    prunable entries, so that the weights compare scorers of different scales; pruned entries
    are left out of the sum because their scores need not be zero here (the reference zeroes
    pruned weights, so its sums effectively run over kept weights too)."""
    terms = list(terms)
    if not terms:
        raise ValueError("weighted_sum needs at least one (weight, scorer) pair; got none")
    for i, t in enumerate(terms):
        if not (isinstance(t, (tuple, list)) and len(t) == 2):
            raise ValueError(f"terms[{i}] must be a (weight, scorer) pair; got {t!r}")
        _check_scorer(t[1], f"terms[{i}][1]")
    terms = [(float(w), s) for w, s in terms]

    def scorer(params, mask, inputs):
        keep = _kept_prunable(params, mask, inputs)
        total = None
        for w, s in terms:
            sc = s(params, mask, inputs)
            if normalize:
                sc = _normalize(sc, keep)
            sc = jax.tree.map(lambda v: w * v, sc)
            total = sc if total is None else jax.tree.map(jnp.add, total, sc)
        return total

    return scorer


def _ranks(scores: PyTree, keep: list) -> list[jax.Array | None]:
    """Global ascending ranks 0..n-1 over the prunable entries (leaf order, row-major); pruned
    entries rank below every kept one; ties are broken by that flat position (stable sort)."""
    leaves = jax.tree.leaves(scores)
    idx = [i for i, k in enumerate(keep) if k is not None]
    flat = jnp.concatenate([jnp.ravel(leaves[i]) for i in idx])
    alive = jnp.concatenate([jnp.ravel(keep[i]) for i in idx])
    key = jnp.where(alive, flat, -jnp.inf)
    order = jnp.argsort(key, stable=True)
    ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    out, start = [None] * len(leaves), 0
    for i in idx:
        n = int(jnp.size(leaves[i]))
        out[i] = ranks[start:start + n].reshape(jnp.shape(leaves[i]))
        start += n
    return out


def rank_average(scorers: Sequence[Scorer]) -> Scorer:
    """A scorer averaging each scorer's global rank over the prunable entries (see `_ranks`).

    Pruned entries rank lowest for every scorer; non-prunable leaves score 0. Ranks are averaged
    in the default float dtype (float32 is exact up to 2^24 entries per summed rank).
    """
    scorers = list(scorers)
    if not scorers:
        raise ValueError("rank_average needs at least one scorer; got none")
    for i, s in enumerate(scorers):
        _check_scorer(s, f"scorers[{i}]")

    def scorer(params, mask, inputs):
        keep = _kept_prunable(params, mask, inputs)
        total = None
        for s in scorers:
            r = _ranks(s(params, mask, inputs), keep)
            total = r if total is None else [a if a is None else a + b for a, b in zip(total, r)]
        leaves, treedef = jax.tree.flatten(params)
        dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        out = [jnp.zeros(jnp.shape(p), dtype) if t is None else t.astype(dtype) / len(scorers)
               for p, t in zip(leaves, total)]
        return jax.tree.unflatten(treedef, out)

    return scorer


def product(scorers: Sequence[Scorer]) -> Scorer:
    """A scorer multiplying the scorers' scores elementwise (mind signs: GraSP can be negative)."""
    scorers = list(scorers)
    if not scorers:
        raise ValueError("product needs at least one scorer; got none")
    for i, s in enumerate(scorers):
        _check_scorer(s, f"scorers[{i}]")

    def scorer(params, mask, inputs):
        total = scorers[0](params, mask, inputs)
        for s in scorers[1:]:
            total = jax.tree.map(jnp.multiply, total, s(params, mask, inputs))
        return total

    return scorer
