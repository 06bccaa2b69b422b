"""Masked training for any flax model and optax optimizer: jitted steps, on-device epochs, replicas.

Where the mask lives: gradients and optimizer updates are masked inside the step
(`where(mask, update, 0)`), and params are masked once when training starts. A pruned weight is
then exactly 0.0 after every step with any optax chain, whatever the optimizer state holds
(momentum, Adam moments, weight decay): the update it receives is exactly zero. This is the cheapest
scheme with that guarantee (see benchmarks/train_step.py).

All randomness comes from the state's `key`: the data order of epoch e is a permutation drawn from
fold_in(key, e), and augmentation at step s from fold_in(key, s). A state restored from a
checkpoint therefore continues bit-for-bit.

Replicas: a state and mask with a leading axis of size K train together (different seeds, masks
or data orders per replica), by `Trainer.replica_strategy`: 'vmap' (one compiled program over the
batched replicas), 'map' (`lax.map`: one compiled program running the replicas one after the
other), 'sequential' (the single-ticket compiled step or epoch called once per replica from
Python) or 'auto' (`resolved_replica_strategy`). Every strategy gives every replica the data order
and augmentation it would get alone; results agree up to floating-point rounding.

Mixed precision: `Trainer.compute_dtype='bfloat16'` runs forward and backward pass (and
evaluation) in bfloat16: params and inputs are cast inside the loss, so gradients arrive in float32
and the state (params, optimizer state, batch-norm statistics) stays float32; the loss and BN
statistics are computed in float32.

Data parallelism: with `Trainer(mesh=lottery.distributed.data_mesh(...))` every batch is split
over the mesh's 'batch' axis and state and mask are replicated; the step is the same jitted
function and XLA inserts the gradient all-reduce. Replicas compose with it: the replica axis is
not sharded, every device trains all K replicas on its share of each batch.

Masks that change during training (AGP): a `MaskUpdate` runs inside the compiled step, before
every step, with the mask in the carry of the on-device epoch; its arguments (e.g. the schedule)
are traced, so one compiled program serves a whole run. Every experiment trains through `train`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lottery import batches, distributed
from lottery import masks as masks_lib
from lottery.data import stream
# Re-exported: the choices a Trainer is built from (lottery.optim and lottery.batches hold them).
from lottery.batches import AUGMENTATIONS, SAMPLINGS  # noqa: F401
from lottery.optim import LR_SCHEDULES, OPTIMIZERS, learning_rate, optimizer  # noqa: F401

PyTree = Any


class DivergenceError(ValueError):
    """Training produced a non-finite loss or non-finite weights; the message is one line naming
    the step (and the replica) and the likely cause. `step` and `replica` (None without
    replicas) say where."""

    def __init__(self, message: str, step: int, replica: int | None = None):
        super().__init__(message)
        self.step, self.replica = step, replica


class TrainState(flax.struct.PyTreeNode):
    """Everything that determines the rest of a run: step, weights, BN stats, optimizer, PRNG key."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    key: jax.Array  # raw uint32 key data: data order and augmentation derive from it


def init_state(variables: PyTree, tx: optax.GradientTransformation, key: jax.Array,
               mask: PyTree | None = None) -> TrainState:
    """A fresh state at step 0 from model variables ({'params', optional 'batch_stats'})."""
    params = variables["params"]
    if mask is not None:
        masks_lib.check(mask, params)
        params = masks_lib.apply(params, mask)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      key=_key_data(key))


def _key_data(key):
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def cross_entropy(logits, y):
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class Trainer(NamedTuple):
    """The static pieces of training: model, optimizer, batch size, augmentation, loop kind.

    Hashable, so the compiled step and epoch are cached per Trainer and shared by every level.
    `mesh`: a `jax.sharding.Mesh` with a 'batch' axis (`distributed.data_mesh`) to split every
    batch over its devices; None (default) trains on the default device.
    """

    model: nn.Module
    tx: optax.GradientTransformation
    batch_size: int
    augment: str = "none"
    loop: str = "auto"  # 'scan' (whole epoch on device), 'steps' (one jitted step per iteration)
    mesh: Any = None  # jax.sharding.Mesh | None
    sampling: str = "epochs"  # 'epochs' (a permutation per epoch) | 'random' (independent)
    compute_dtype: str = "float32"  # 'float32' | 'bfloat16' (float32 weights and optimizer)
    replica_strategy: str = "auto"  # 'auto' | 'vmap' | 'map' | 'sequential' (replicas=True)

    def steps_per_epoch(self, n: int) -> int:
        if self.batch_size > n:
            raise ValueError(f"batch_size={self.batch_size} is larger than the training split "
                             f"({n} examples)")
        return n // self.batch_size

    def resolved_loop(self, params, replicas: bool = False) -> str:
        """'auto' runs whole epochs on device, except for conv nets on CPU, where a convolution's
        gradient inside an XLA loop body is many times slower (jax-ml/jax#12868). `replicas`:
        `params` carry a leading replica axis."""
        if self.loop != "auto":
            return self.loop
        return "steps" if _has_conv(params, replicas) and jax.default_backend() == "cpu" \
            else "scan"

    def resolved_replica_strategy(self, params, replicas: bool = True) -> str:
        """'auto': 'vmap' for networks without conv kernels (and for a single replica), one after
        the other for conv nets ('sequential'). Vmapped convolutions become grouped convolutions
        (`benchmarks/replicas.py` prints what XLA is given), slower than K separate ones: on an
        H200, 4 vmapped ResNet-20 replicas took 1.42x as long as 4 sequential runs; on CPU they
        are slower too (benchmarks/replicas.py). `replicas`: `params` carry a leading replica
        axis."""
        if self.replica_strategy != "auto":
            return self.replica_strategy
        one = replicas and jax.tree.leaves(params)[0].shape[0] == 1  # no grouped convs
        return "sequential" if _has_conv(params, replicas) and not one else "vmap"


LOOPS = ("auto", "scan", "steps")
REPLICA_STRATEGIES = ("auto", "vmap", "map", "sequential")
COMPUTE_DTYPES = ("float32", "bfloat16")


def _has_conv(params, replicas: bool = False) -> bool:
    """Whether `params` hold a conv kernel (a leaf of rank >= 3, not counting the replica axis)."""
    return any(np.ndim(p) - int(replicas) >= 3 for p in jax.tree.leaves(params))


def _cast(tree, dtype):
    """The floating-point leaves of `tree` in `dtype` (others unchanged)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) and
                        a.dtype != dtype else a, tree)


def _compute_dtype(name: str):
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={name!r}: expected one of {COMPUTE_DTYPES}")
    return jnp.dtype(name)


def _loss(trainer: Trainer, params, batch_stats, x, y):
    """Training loss (float32) and new BN statistics. In bfloat16 compute, params and inputs are
    cast here (so gradients with respect to the float32 params are float32); BN statistics stay
    float32 (flax normalizes in float32 and returns the input's dtype)."""
    dtype = _compute_dtype(trainer.compute_dtype)
    params, x = _cast(params, dtype), _cast(x, dtype)
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
        logits, updates = trainer.model.apply(variables, x, train=True, mutable=["batch_stats"])
        new = jax.tree.map(lambda a, b: a.astype(b.dtype), updates["batch_stats"], batch_stats)
        return cross_entropy(logits.astype(jnp.float32), y), new
    logits = trainer.model.apply(variables, x, train=True)
    return cross_entropy(logits.astype(jnp.float32), y), batch_stats


class MaskUpdate(NamedTuple):
    """A change of the mask inside training: before every step, `state, mask = fn(args, state,
    mask)`, where `state.step` is the step about to run (AGP prunes at scheduled steps).

    `fn` is pure and jittable and part of the compiled program (cached by identity: one function
    object, one compilation); `args` is a pytree of arrays passed to it as a traced argument, so
    new values (another schedule) reuse the program. With replicas, all replicas share `args`.
    `fn` must keep pruned weights at 0.0 (mask them when it prunes): the step masks only updates.
    """

    fn: Callable[[PyTree, TrainState, PyTree], tuple[TrainState, PyTree]]
    args: PyTree = None


def train_step(trainer: Trainer, state: TrainState, mask: PyTree, x, y):
    """One masked SGD step (pure): returns (new state, training loss on the batch)."""
    if trainer.augment != "none":
        x = AUGMENTATIONS[trainer.augment](
            jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step), x)
    (loss, batch_stats), grads = jax.value_and_grad(
        functools.partial(_loss, trainer), has_aux=True)(state.params, state.batch_stats, x, y)
    grads = masks_lib.apply(grads, mask)
    updates, opt_state = trainer.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, masks_lib.apply(updates, mask))
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), loss


def update_step(trainer: Trainer, update: MaskUpdate | None, state: TrainState, mask: PyTree,
                x, y):
    """`update` (if any), then `train_step` under the updated mask: (state, mask, loss)."""
    if update is not None:
        state, mask = update.fn(update.args, state, mask)
    state, loss = train_step(trainer, state, mask, x, y)
    return state, mask, loss


def run_epoch(trainer: Trainer, state: TrainState, mask: PyTree, x, y, start, stop,
              update: MaskUpdate | None = None):
    """Steps `start` to `stop` (positions within the current epoch) as one compiled loop.

    `start` and `stop` are traced loop bounds (`lax.fori_loop`), so one compiled program serves
    every segment (resume mid-epoch, stop at a rewind iteration) and runs no step outside it. The
    mask rides in the carry, changed by `update` (a `MaskUpdate`) before every step. Returns
    (state, mask, summed loss).
    """
    n = x.shape[0]
    spe = n // trainer.batch_size
    order = batches.epoch_order(state.key, state.step // spe, n, trainer.batch_size,
                                trainer.sampling)

    def body(i, carry):
        state, mask, total = carry
        idx = order[i]
        state, mask, loss = update_step(trainer, update, state, mask,
                                        batches.split(trainer.mesh, x[idx]),
                                        batches.split(trainer.mesh, y[idx]))
        return state, mask, total + loss

    return jax.lax.fori_loop(start, stop, body, (state, mask, jnp.zeros((), jnp.float32)))


@functools.lru_cache(maxsize=None)
def _compiled(trainer: Trainer, replicas: bool | str, update_fn: Callable | None = None):
    """Jitted step, epoch and eval for a trainer (and a `MaskUpdate.fn`); over a leading replica
    axis if asked: `replicas` True or 'vmap' (`jax.vmap`), 'map' (`jax.lax.map`), False (one
    ticket; 'sequential' replicas call these from Python).

    step(state, mask, x, y) -> (state, loss); epoch(state, mask, x, y, start, stop) -> (state,
    mask, loss). With `update_fn` both take the update's args first and the step returns the
    mask too: step(args, state, mask, x, y) -> (state, mask, loss).
    """
    if update_fn is None:
        step, pre = functools.partial(train_step, trainer), ()
        epoch = functools.partial(run_epoch, trainer)
    else:
        step = lambda args, *a: update_step(trainer, MaskUpdate(update_fn, args), *a)  # noqa: E731
        epoch = lambda args, *a: run_epoch(  # noqa: E731
            trainer, *a, update=MaskUpdate(update_fn, args))
        pre = (None,)  # the update's args: shared by the replicas
    if replicas is True or replicas == "vmap":
        step = jax.vmap(step, in_axes=(*pre, 0, 0, 0, 0))
        epoch = jax.vmap(epoch, in_axes=(*pre, 0, 0, None, None, None, None))
    elif replicas == "map":
        step = _mapped(step, len(pre), 4)
        epoch = _mapped(epoch, len(pre), 2)
    elif replicas:
        raise ValueError(f"replicas={replicas!r}: expected a bool, 'vmap' or 'map'")
    if trainer.mesh is None:
        return jax.jit(step), jax.jit(epoch), _compiled_eval(trainer, replicas)
    out = distributed.replicated(trainer.mesh)  # every output whole on every device
    return (jax.jit(step, out_shardings=out), jax.jit(epoch, out_shardings=out),
            _compiled_eval(trainer, replicas))


def _mapped(fn, shared: int, per_replica: int):
    """`fn(*shared_args, *replica_args, *rest)` run over the leading replica axis of its
    `per_replica` replica arguments with `jax.lax.map` (one replica after the other)."""

    def run(*args):
        head, reps, rest = args[:shared], args[shared:shared + per_replica], \
            args[shared + per_replica:]
        return jax.lax.map(lambda r: fn(*head, *r, *rest), tuple(reps))

    return run


@functools.lru_cache(maxsize=None)
def _compiled_eval(trainer: Trainer, replicas: bool | str):
    """The jitted evaluation (`_eval_sums`) for a trainer (replicas as in `_compiled`)."""
    ev = functools.partial(_eval_sums, trainer.model, mesh=trainer.mesh,
                           dtype=_compute_dtype(trainer.compute_dtype))
    if replicas is True or replicas == "vmap":
        ev = jax.vmap(ev, in_axes=(0, 0, 0, None, None, None))
    elif replicas == "map":
        ev = _mapped(ev, 0, 3)
    elif replicas:
        raise ValueError(f"replicas={replicas!r}: expected a bool, 'vmap' or 'map'")
    if trainer.mesh is None:
        return jax.jit(ev, static_argnums=5)
    return jax.jit(ev, static_argnums=5, out_shardings=distributed.replicated(trainer.mesh))


def _eval_sums(model, params, batch_stats, mask, x, y, batch_size, mesh=None,
               dtype=jnp.float32):
    """Summed loss and number correct over (x, y), evaluated in chunks of batch_size (padded),
    with params and inputs in `dtype` (the loss in float32). Rows labelled -1 are padding (a
    streamed split's last chunk comes padded so), left out of both sums."""
    params = _cast(masks_lib.apply(params, mask), dtype)
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    n = x.shape[0]
    chunks = -(-n // batch_size)
    pad = chunks * batch_size - n
    xs = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(chunks, batch_size, *x.shape[1:])
    ys = jnp.pad(y, (0, pad), constant_values=-1).reshape(chunks, batch_size)
    valid = ys >= 0
    if mesh is not None:  # each device evaluates its share of every chunk
        sharding = distributed.batch_sharding(mesh, axis=1)
        xs, ys, valid = (jax.lax.with_sharding_constraint(a, sharding) for a in (xs, ys, valid))

    def chunk(args):
        xb, yb, vb = args
        logits = model.apply(variables, _cast(xb, dtype), train=False).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(yb, 0))
        correct = jnp.argmax(logits, -1) == yb
        return jnp.sum(losses * vb), jnp.sum(correct * vb)

    losses, correct = jax.lax.map(chunk, (xs, ys, valid))
    return losses.sum(), correct.sum()


def evaluate(trainer: Trainer, state: TrainState, mask: PyTree, x, y, *, batch_size: int = 1000,
             replicas: bool = False) -> dict:
    """Test loss and top-1 accuracy of the masked network (arrays of shape (K,) for replicas, by
    the trainer's replica strategy). A streamed split (`x` a `data.stream.Column`; its labels
    come with it) is read in chunks of `batch_size`, each process its rows of every chunk."""
    strategy = trainer.resolved_replica_strategy(state.params) if replicas else None
    if strategy == "sequential":
        out = [evaluate(trainer, s, m, x, y, batch_size=batch_size)
               for s, m in zip(unstack(state), unstack(mask))]
        return {k: np.stack([o[k] for o in out]) for k in out[0]}
    ev = _compiled_eval(trainer, strategy or False)
    mesh, n = trainer.mesh, x.shape[0]
    bs = min(batch_size, n)
    if mesh is not None:  # chunks a multiple of the device count; padding is masked out
        bs = -(-bs // mesh.size) * mesh.size
        state, mask = distributed.replicate((state, mask), mesh)
    if isinstance(x, stream.Column):
        loss, correct = _streamed_sums(ev, mesh, state, mask, x, bs)
    else:
        x, y = (jnp.asarray(x), jnp.asarray(y)) if mesh is None else \
            distributed.replicate((x, y), mesh)
        loss, correct = ev(state.params, state.batch_stats, mask, x, y, bs)
    return {"test_loss": np.asarray(loss) / n, "test_accuracy": np.asarray(correct) / n}


def _streamed_sums(ev, mesh, state: TrainState, mask: PyTree, x: stream.Column, bs: int):
    """`ev`'s summed loss and number correct over a streamed split, in chunks of `bs` (the last
    padded with label -1), each process reading its rows of every chunk."""
    chunks = -(-x.shape[0] // bs)
    keys = np.arange(chunks * bs)
    keys[x.shape[0]:] = -1
    keys = keys.reshape(chunks, bs)
    if mesh is not None:
        keys = keys[:, distributed.local_rows(mesh, bs)]
    loss = correct = 0
    for xc, yc in stream.batches(x, keys):
        xc, yc = batches.place(xc, yc, mesh, bs)
        sums = ev(state.params, state.batch_stats, mask, xc, yc, bs)
        loss, correct = loss + sums[0], correct + sums[1]
    return loss, correct


def all_finite(params: PyTree, replicas: bool = False) -> np.ndarray:
    """True where every floating-point leaf of `params` is finite: a bool scalar, or (K,) per
    replica. One reduction on device."""
    return np.asarray(_all_finite(params, replicas))


@functools.partial(jax.jit, static_argnums=1)
def _all_finite(params: PyTree, replicas: bool) -> jax.Array:
    axes = lambda x: tuple(range(1, x.ndim)) if replicas else None  # noqa: E731
    flags = [jnp.all(jnp.isfinite(x), axis=axes(x)) for x in jax.tree.leaves(params)
             if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not flags:
        return jnp.ones(jax.tree.leaves(params)[0].shape[:1] if replicas else (), bool)
    return functools.reduce(jnp.logical_and, flags)


def _check_finite(record: dict, params: PyTree | None, pos: int, replicas: bool) -> None:
    """Raise DivergenceError if the record's training loss, or (when given) a param, is not
    finite. The loss is already on the host; `params` costs one reduction on device."""
    step = record["step"]
    loss = np.asarray(record["train_loss"]).reshape(-1)
    bad = ~np.isfinite(loss)
    what = f"the training loss of steps {pos + 1}-{step} is {loss[np.argmax(bad)]}"
    if not bad.any() and params is not None:
        bad = ~all_finite(params, replicas).reshape(-1)
        what = "a weight is not finite"
    if not bad.any():
        return
    replica = int(np.argmax(bad)) if replicas else None
    where = f" (replica {replica}{f' and {int(bad.sum()) - 1} more' if bad.sum() > 1 else ''})" \
        if replicas else ""
    raise DivergenceError(
        f"training diverged by step {step}{where}: {what}; likely cause: the learning rate is "
        f"too high (or the data hold NaN/inf values)", step, replica)


def boundaries(start: int, end: int, spe: int, eval_every: int, stops: Sequence[int] = ()):
    """Sorted steps in (start, end] where training pauses: epoch ends, eval points, stops, end."""
    points = {end}
    points.update(range((start // spe + 1) * spe, end, spe))
    if eval_every:
        points.update(range((start // eval_every + 1) * eval_every, end, eval_every))
    points.update(s for s in stops if start < s < end)
    return sorted(points)


def train(trainer: Trainer, state: TrainState, mask: PyTree, data, *, num_steps: int,
          eval_every: int | None = None, stops: Sequence[int] = (),
          callback: Callable[..., None] | None = None, replicas: bool = False,
          progress: bool | str = True, check_finite: bool = True,
          mask_update: MaskUpdate | None = None):
    """Train from `state.step` to `num_steps` under `mask`; returns (state, history).

    `data` has x_train, y_train, x_test, y_test (lottery.data.Dataset). The test split is
    evaluated every `eval_every` steps (default: every epoch) and at the end. Training pauses at
    epoch ends, eval points and the steps in `stops` (e.g. a rewind iteration); at each pause
    `callback(state, record)` is called, record = {'step', 'train_loss', and at eval points
    'test_loss', 'test_accuracy'}. With `replicas=True`, state and mask carry a leading axis of
    K replicas and the record's values are arrays of shape (K,); they train by
    `trainer.replica_strategy` (the callback always sees them stacked).

    With `trainer.mesh`, state and mask are replicated on its devices, every batch is split over
    them (each process transfers only its rows) and the returned state is replicated.

    Streamed `data` (`lottery.data.stream`: x and y are `Column`s) trains with the 'steps' loop:
    grain reads this process's rows of each step's batch, in the order above, ahead of the
    step, and the test split in chunks; augment='imagenet' is then the host policy, applied as
    the images are read. The batches are those the arrays in memory would give.

    `check_finite` (default): at each pause, a non-finite training loss (of any replica), and at
    eval points a non-finite weight, raises `DivergenceError` (a ValueError) before evaluating
    or calling `callback`, so a diverged state is never saved or pruned from. Cheap: the loss is
    fetched anyway, the weights take one reduction on device at eval points.

    `mask_update` (a `MaskUpdate`, e.g. AGP's) changes the mask inside the compiled step before
    every step; the mask then changes during training, so `callback(state, mask, record)` gets
    it and the result is (state, mask, history).
    """
    n = int(data.x_train.shape[0])
    spe = trainer.steps_per_epoch(n)
    streamed = stream.streamed(data)  # read while training: see lottery.data.stream
    host_augment = streamed and trainer.augment in stream.HOST_AUGMENTATIONS
    if host_augment:  # the images get the host train policy as they are read
        trainer = trainer._replace(augment="none")
    if num_steps <= 0:
        raise ValueError(f"num_steps={num_steps}: must be > 0")
    update = () if mask_update is None else (mask_update.args,)  # the update's traced args
    mesh, rows = trainer.mesh, None
    if mesh is not None:
        distributed.check_batch(trainer.batch_size, mesh.size)
        state, mask, update = distributed.replicate((state, mask, update), mesh)
        rows = distributed.local_rows(mesh, trainer.batch_size)  # this process's share
    eval_every = spe if eval_every is None else int(eval_every)
    _compute_dtype(trainer.compute_dtype)
    strategy = trainer.resolved_replica_strategy(state.params) if replicas else None
    if strategy not in (None, *REPLICA_STRATEGIES[1:]):
        raise ValueError(f"replica_strategy={trainer.replica_strategy!r}: expected one of "
                         f"{REPLICA_STRATEGIES}")
    sequential = strategy == "sequential"
    step_fn, epoch_fn, _ = _compiled(trainer, False if sequential else strategy or False,
                                     mask_update and mask_update.fn)
    start = int(np.asarray(state.step).reshape(-1)[0])
    state = state.replace(params=masks_lib.apply(state.params, mask))  # identity when resuming
    loop = trainer.resolved_loop(state.params, replicas)
    if loop not in LOOPS[1:]:
        raise ValueError(f"loop={trainer.loop!r}: expected one of {LOOPS}")
    if streamed and loop == "scan":  # 'scan' holds the whole training split on device
        if trainer.loop == "scan":
            raise ValueError("loop='scan' holds the training split on device; a streamed "
                             "dataset trains with loop='steps' (or 'auto')")
        loop = "steps"
    x_dev = y_dev = None
    if loop == "scan" and mesh is None:
        x_dev, y_dev = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    elif loop == "scan":  # the whole split on every device; each step's batch is split in jit
        x_dev, y_dev = distributed.replicate((data.x_train, data.y_train), mesh)
    test = (data.x_test, data.y_test)  # on device once, for every evaluation of this call
    if not streamed:
        test = jax.tree.map(jnp.asarray, test) if mesh is None else \
            distributed.replicate(test, mesh)
    # 'sequential': the replicas as lists of single-ticket states and masks, stacked at pauses
    states, rmasks = (unstack(state), unstack(mask)) if sequential else ([state], [mask])

    def segment(state, mask, a, b, order):
        """Steps at positions a..b-1 of the current epoch; `order[i]` is step i's indices."""
        if loop == "scan":
            return epoch_fn(*update, state, mask, x_dev, y_dev, a, b)
        feed = None
        if streamed:  # grain reads this process's rows of steps a..b-1 ahead of them
            keys = order[a:b] if rows is None else order[a:b][..., rows]
            aug = (np.asarray(state.key), int(np.asarray(state.step).reshape(-1)[0]),
                   0 if rows is None else rows.start) if host_augment else None
            feed = stream.batches(data.x_train, keys, augment=aug)
        total = 0.0
        try:
            for i in range(a, b):
                xb, yb = batches.place(*next(feed), mesh, trainer.batch_size) if streamed \
                    else batches.host_batch(data, order[i], mesh, rows)
                state, *new, loss = step_fn(*update, state, mask, xb, yb)
                mask = new[0] if new else mask
                total = total + loss
        finally:
            if feed is not None:
                feed.close()
        return state, mask, total

    history = []
    bar = tqdm(total=num_steps, initial=start, disable=not progress, leave=False, unit="it",
               desc=progress if isinstance(progress, str) else "train", dynamic_ncols=True)
    pos = start
    for stop in boundaries(start, num_steps, spe, eval_every, stops):
        a, b = pos % spe, (stop - 1) % spe + 1  # positions within the epoch of steps pos..stop-1
        orders = [None] * len(states)  # per entry of `states`: step i's indices are order[i]
        if loop == "steps":
            draw = functools.partial(batches.epoch_order, epoch=pos // spe, n=n,
                                     batch_size=trainer.batch_size, sampling=trainer.sampling)
            if replicas:  # (K, spe, B): one replica's order each, or step i's (K, B) at once
                order = np.asarray(jax.vmap(draw)(state.key))
                orders = list(order) if sequential else [order.swapaxes(0, 1)]
            else:
                orders = [np.asarray(draw(state.key))]
        totals = []
        for r, (st, m, order) in enumerate(zip(states, rmasks, orders)):
            states[r], rmasks[r], t = segment(st, m, a, b, order)
            totals.append(t)
        if sequential:
            state, mask, total = stack(states), stack(rmasks), jnp.stack(totals)
        else:
            state, mask, total = states[0], rmasks[0], totals[0]
        record = {"step": stop, "train_loss": np.asarray(total) / (stop - pos)}
        is_eval = stop % eval_every == 0 or stop == num_steps
        if check_finite:
            try:
                _check_finite(record, state.params if is_eval else None, pos, replicas)
            except DivergenceError:
                bar.close()
                raise
        if is_eval:
            record.update(evaluate(trainer, state, mask, *test, replicas=replicas))
        history.append(record)
        bar.update(stop - pos)
        if "test_accuracy" in record:
            bar.set_postfix(acc=f"{np.mean(record['test_accuracy']):.4f}", refresh=False)
        if callback is not None:
            callback(state, record) if mask_update is None else callback(state, mask, record)
        pos = stop
    bar.close()
    return (state, history) if mask_update is None else (state, mask, history)


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack K pytrees of the same structure along a new leading replica axis (one compiled
    call, not one per leaf: 'sequential' replicas stack at every pause)."""
    return _stack(list(trees))


def unstack(tree: PyTree) -> list[PyTree]:
    """The K pytrees of a replica-stacked pytree."""
    return _unstack(tree, jax.tree.leaves(tree)[0].shape[0])


@jax.jit
def _stack(trees: list[PyTree]) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(tree: PyTree, k: int) -> list[PyTree]:
    return [jax.tree.map(lambda x: x[i], tree) for i in range(k)]
