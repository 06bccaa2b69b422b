"""Sensitivity analysis (Distiller's): how far each layer, or each channel group, can be pruned on
its own before accuracy drops, without retraining.

For every prunable layer (kind 'weights') or channel group (kind 'groups', see `lottery.groups`)
and every density of a grid, one *variant* prunes that layer or group alone to the density and
leaves the rest of the network as given. All variants, and the unpruned network, are evaluated
on the same examples as vmapped replicas of ONE compiled program (`replicas` variants at a time,
`lax.map` over those chunks, `lax.scan` over the example batches).

  weights  the layer keeps round-half-up(density * n) of its n weights, best-scoring first
           (`scorer`, default |w|: Distiller's magnitude pruning), by `lottery.prune.to_density`
           in layerwise scope: exact counts, its ranking and tie rules.
  groups   the group keeps round-half-up(density * channels) channels by a group scorer
           (default: L1 norm of the producer filters), expanded with `lottery.groups.expand`
           (filters, biases, batch norm scale and bias, readers' input rows).

Entries the given mask already pruned stay pruned: a layer already below a density keeps what it
has, and `kept` records what every variant really keeps (`realized` = kept / size).

    lottery sensitivity RUN_DIR --level N [--kind groups|weights] [--densities 0.9,0.7,0.5]
    lottery sensitivity RUN_DIR --checkpoint PATH [...]

prints the accuracy table and writes a PNG plot of accuracy against density, one line per layer
or group (matplotlib is imported only to draw it).
"""

from __future__ import annotations

import inspect
import os
from fractions import Fraction
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lottery import checkpoints, data as data_lib, groups as groups_lib, masks, prune, runs
from lottery import scorers

PyTree = Any
KINDS = ("groups", "weights")
DEFAULT_DENSITIES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


class Sensitivity(NamedTuple):
    """The table: row l = layer or group `names[l]`, column i = `densities[i]`."""

    kind: str  # 'weights' | 'groups'
    names: tuple[str, ...]  # layer paths ('conv1/kernel') or group names
    sizes: tuple[int, ...]  # weights of each layer, or channels of each group
    densities: tuple[float, ...]  # as requested
    kept: np.ndarray  # (layers, densities) int: weights or channels each variant keeps
    accuracy: np.ndarray  # (layers, densities) top-1 accuracy
    loss: np.ndarray  # (layers, densities) mean cross-entropy
    base_accuracy: float  # the network as given
    base_loss: float
    examples: int
    current: np.ndarray  # (layers,) weights or channels the given mask keeps

    @property
    def realized(self) -> np.ndarray:
        """Density each variant really has: kept / size."""
        return self.kept / np.asarray(self.sizes, float)[:, None]


def _check_densities(densities) -> tuple[float, ...]:
    ds = tuple(densities)
    if not ds:
        raise ValueError("densities is empty: give at least one density in (0, 1]")
    for d in ds:
        if isinstance(d, bool) or not isinstance(d, (int, float, np.floating, np.integer)) \
                or not 0 < d <= 1:
            raise ValueError(f"densities must be numbers in (0, 1] (fraction kept), got {d!r}")
    return tuple(float(d) for d in ds)


def _apply_kwargs(model) -> dict:
    """train=False for modules whose __call__ takes `train` (the lottery.models zoo)."""
    try:
        return {"train": False} if "train" in inspect.signature(model.__call__).parameters else {}
    except (TypeError, ValueError):
        return {}


def _round_half_up(d: float, n: int) -> int:
    return int(Fraction(repr(float(d))) * n + Fraction(1, 2))


def analyze(model, variables: dict, x, y, densities: Sequence[float] = DEFAULT_DENSITIES, *,
            mask: PyTree | None = None, kind: str = "groups",
            scorer: Callable | str | None = None, rates: PyTree | None = None,
            groups: groups_lib.Groups | None = None, inputs: scorers.Inputs | None = None,
            batch_size: int = 500, replicas: int | None = None,
            apply_kwargs: dict | None = None) -> Sensitivity:
    """The sensitivity table of `model` with `variables` (and `mask`, default all kept) on the
    examples `x`, integer labels `y`.

    kind 'weights': every leaf with rate > 0 in `rates` (default `masks.prunable`: the kernels)
    is a row; `scorer(params, mask, inputs) -> scores` a lottery.scorers scorer or its name
    (default magnitude). kind 'groups': every group of `groups` (default derived from the model)
    is a row; `scorer` a lottery.groups scorer or its name (default 'l1'; 'taylor' needs
    `inputs`). `apply_kwargs` go to `model.apply` (default train=False when it takes `train`).
    Examples are evaluated `batch_size` at a time (the last batch padded and masked out);
    `replicas` variants at a time are vmapped (default: 1 on CPU, where vmapping over variants
    turns every conv into a grouped conv with batched kernels, 3-5x slower than one variant after
    the other in the same compiled loop, as measured on ResNet-20; 8 on accelerators).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    ds = _check_densities(densities)
    if replicas is None:
        replicas = 1 if jax.default_backend() == "cpu" else 8
    if isinstance(replicas, bool) or not isinstance(replicas, (int, np.integer)) or replicas < 1:
        raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number (> 0) of examples, got "
                         f"{x.shape[0]} and {y.shape[0]}")
    kwargs = _apply_kwargs(model) if apply_kwargs is None else dict(apply_kwargs)
    params = variables["params"]
    mask = masks.init(params) if mask is None else jax.tree.map(lambda m: jnp.asarray(m, bool),
                                                                mask)
    masks.check(mask, params)
    rest = {k: v for k, v in variables.items() if k != "params"}

    def apply_fn(p, xb):
        return model.apply({"params": p, **rest}, xb, **kwargs)

    if kind == "weights":
        names, sizes, current, stacks, kept, build = _weight_variants(params, mask, ds, scorer,
                                                                      rates, inputs)
    else:
        names, sizes, current, stacks, kept, build = _group_variants(
            model, variables, params, mask, ds, scorer, groups, inputs, x, kwargs)
    variants = [(-1, 0)] + [(l, i) for l in range(len(names)) for i in range(len(ds))]
    per = min(int(replicas), len(variants))
    chunks = -(-len(variants) // per)
    variants += [(-1, 0)] * (chunks * per - len(variants))
    v_arr = np.asarray(variants, np.int32).reshape(chunks, per, 2)
    bs = min(int(batch_size), x.shape[0])
    nb = -(-x.shape[0] // bs)
    pad = nb * bs - x.shape[0]
    xs = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(nb, bs, *x.shape[1:])
    ys = np.concatenate([y, np.zeros(pad, y.dtype)]).reshape(nb, bs)
    valid = (np.arange(nb * bs) < x.shape[0]).reshape(nb, bs)

    def evaluate(params, mask, stacks, v_arr, xs, ys, valid):
        def one(v):
            w = masks.apply(params, build(mask, stacks, v[0], v[1]))

            def body(carry, batch):
                xb, yb, vb = batch
                logits = apply_fn(w, xb)
                losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
                correct = jnp.argmax(logits, -1) == yb
                return (carry[0] + jnp.sum(losses * vb), carry[1] + jnp.sum(correct * vb)), None

            (loss, correct), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)),
                                              (xs, ys, valid))
            return loss, correct

        return jax.lax.map(jax.vmap(one), v_arr)

    loss, correct = jax.jit(evaluate)(params, mask, stacks, v_arr, xs, ys, valid)
    n = x.shape[0]
    loss = np.asarray(loss).reshape(-1)[:1 + len(names) * len(ds)] / n
    acc = np.asarray(correct).reshape(-1)[:1 + len(names) * len(ds)] / n
    shape = (len(names), len(ds))
    return Sensitivity(kind, tuple(names), tuple(sizes), ds, np.asarray(kept).reshape(shape),
                       acc[1:].reshape(shape), loss[1:].reshape(shape), float(acc[0]),
                       float(loss[0]), int(n), np.asarray(current))


def _weight_variants(params, mask, ds, scorer, rates, inputs):
    scorer = scorers.get(scorer) if isinstance(scorer, str) else (scorer or scorers.magnitude)
    rates = masks.prunable(params) if rates is None else rates
    scores = scorer(params, mask, inputs)
    paths, rate_l = masks.paths(params), jax.tree.leaves(rates)
    idx = [i for i, r in enumerate(rate_l) if r > 0]
    ones = jax.tree.map(lambda r: 1.0 if r > 0 else 0.0, rates)  # every row at the base rate
    pruned = [jax.tree.leaves(prune.to_density(scores, mask, d, scope="layerwise", rates=ones))
              for d in ds]
    stacks = tuple(jnp.stack([p[i] for p in pruned]) for i in idx)
    kept = np.asarray([[int(np.sum(s[k])) for k in range(len(ds))] for s in stacks])
    sizes = [int(np.size(jax.tree.leaves(params)[i])) for i in idx]
    current = [int(np.sum(jax.tree.leaves(mask)[i])) for i in idx]

    def build(mask, stacks, row, col):
        leaves, treedef = jax.tree.flatten(mask)
        for r, (i, s) in enumerate(zip(idx, stacks)):
            leaves[i] = jnp.where(row == r, s[col], leaves[i])
        return jax.tree.unflatten(treedef, leaves)

    return [paths[i] for i in idx], sizes, current, stacks, kept, build


def _group_variants(model, variables, params, mask, ds, scorer, groups, inputs, x, kwargs):
    if groups is None:
        shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)),
                              dict(variables))
        groups = groups_lib.derive(model, shapes, jax.ShapeDtypeStruct(
            (1, *np.shape(x)[1:]), jnp.float32), **kwargs)
    if not len(groups):
        raise ValueError(f"{type(model).__name__} has no channel group to prune (excluded: "
                         f"{groups.excluded})")
    scorer = groups_lib.get(scorer) if isinstance(scorer, str) else (scorer or groups_lib.l1)
    scores = scorer(groups, params, mask, inputs)
    live = groups_lib.alive(groups, mask)
    per_d = [groups_lib.to_density(groups, scores, live, d, scope="layerwise") for d in ds]
    stacks = tuple(jnp.stack([c[g] for c in per_d]) for g in range(len(groups)))
    kept = np.asarray([[int(np.sum(s[k])) for k in range(len(ds))] for s in stacks])

    def build(mask, stacks, row, col):
        channels = tuple(jnp.where(row == g, s[col], True) for g, s in enumerate(stacks))
        return groups_lib.expand(groups, channels, mask)

    current = [int(np.sum(c)) for c in live]
    return list(groups.names), list(groups.sizes), current, stacks, kept, build


# ----------------------------------------------------------------------------------------------
# Output.


def format_table(res: Sensitivity) -> str:
    """Accuracy per row and density; '*' marks a variant that keeps more than round-half-up(
    density * size) because the given mask had already pruned further."""
    width = max(len("layer" if res.kind == "weights" else "group"), *map(len, res.names))
    unit = "weights" if res.kind == "weights" else "channels"
    head = (f"{'layer' if res.kind == 'weights' else 'group':<{width}}  {unit:>8}"
            + "".join(f"  {d:>7g}" for d in res.densities))
    lines = [f"sensitivity ({res.kind}): top-1 accuracy on {res.examples} examples, one "
             f"{'layer' if res.kind == 'weights' else 'group'} pruned at a time; unpruned "
             f"{res.base_accuracy:.4f}", head]
    star = False
    for l, name in enumerate(res.names):
        cells = []
        for i, d in enumerate(res.densities):
            short = res.kept[l, i] < _round_half_up(d, res.sizes[l])
            star |= short
            cells.append(f"  {res.accuracy[l, i]:>6.4f}{'*' if short else ' '}")
        lines.append(f"{name:<{width}}  {res.sizes[l]:>8}" + "".join(cells))
    if star:
        lines.append("* the given mask had pruned this row below the density already: it keeps "
                     "what it had (see Sensitivity.kept)")
    return "\n".join(lines)


def plot(res: Sensitivity, path: str, title: str | None = None) -> str:
    """Accuracy against the realized density, one line per layer or group, the unpruned network
    dashed; written as a PNG to `path`."""
    import matplotlib  # noqa: PLC0415 - heavy, only needed here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab20")
    for l, name in enumerate(res.names):
        xs = np.concatenate([[res.current[l] / res.sizes[l]], res.realized[l]])
        ys = np.concatenate([[res.base_accuracy], res.accuracy[l]])
        order = np.argsort(-xs, kind="stable")
        ax.plot(xs[order], ys[order], marker="o", ms=3, lw=1.2, color=cmap(l % 20), label=name)
    ax.axhline(res.base_accuracy, color="k", ls="--", lw=1, label="unpruned")
    ax.set_xlabel(f"density of the pruned {'layer' if res.kind == 'weights' else 'group'} "
                  f"(fraction of its {'weights' if res.kind == 'weights' else 'channels'} kept)")
    ax.set_ylabel(f"top-1 accuracy ({res.examples} examples)")
    ax.set_xlim(1.02, 0.0)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"sensitivity, one {res.kind[:-1]} pruned at a time")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Command line.


HELP = "accuracy when one layer or channel group is pruned at a time"
DESCRIPTION = ("Distiller's sensitivity analysis of a run's level (or any checkpoint of its "
               "model): prune each layer or channel group alone to every density of a grid and "
               "evaluate on the test split without retraining (all variants in one compiled "
               "program). Prints the table and writes a PNG plot.")


def add_arguments(p) -> None:
    """The `sensitivity` subcommand's arguments, on an argparse parser."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (its model, data, rates)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--level", type=int, metavar="N", help="a finished level: its final "
                     "weights and mask")
    src.add_argument("--checkpoint", metavar="PATH", help="an orbax checkpoint of the run's "
                     "model holding 'params' (and 'batch_stats'), e.g. RUN_DIR/level_0/final; "
                     "nothing masked")
    p.add_argument("--kind", choices=KINDS, default="groups",
                   help="prune channel groups (default) or a layer's single weights")
    p.add_argument("--scorer", default=None, help="groups: l1 (default), l2, l1_all, l2_all, "
                   "bn_scale, taylor; weights: magnitude (default) or a lottery.scorers name")
    p.add_argument("--densities", default=",".join(f"{d:g}" for d in DEFAULT_DENSITIES),
                   help="comma-separated densities in (0, 1] (fraction kept)")
    p.add_argument("--examples", type=int, default=None, metavar="N",
                   help="first N test examples (default: the whole test split)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--replicas", type=int, default=None,
                   help="variants evaluated together (vmapped) per step of the compiled loop "
                        "(default: 1 on CPU, 8 on accelerators)")
    p.add_argument("--out", default=None, metavar="PNG", help="plot path (default: "
                   "RUN_DIR/sensitivity_<kind>_<level N|checkpoint>.png)")


def _parse_densities(text: str) -> tuple[float, ...]:
    try:
        return _check_densities(float(t) for t in text.split(",") if t.strip())
    except ValueError as e:
        raise ValueError(f"--densities {text!r}: {e}") from None


def command(args) -> int:
    """`lottery sensitivity` (add_arguments' arguments): print the table, write the plot."""
    densities = _parse_densities(args.densities)
    r = runs.Run(args.run_dir)
    cfg = r.config
    r.check_model()
    if args.level is not None:
        state = r.final_state(args.level)
        mask, what = r.mask(args.level), f"level {args.level}"
    else:
        state = checkpoints.restore(args.checkpoint, hint="(--checkpoint)")
        if not hasattr(state, "keys") or "params" not in state:
            raise ValueError(f"--checkpoint {args.checkpoint!r} holds no 'params' entry")
        mask, what = None, f"checkpoint {args.checkpoint}"
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    masks.check(variables["params"], r.init()["params"], f"the params of {what}")
    data = data_lib.load(cfg.dataset, data_dir=cfg.get("data_dir") or None)
    n = data.x_test.shape[0] if args.examples is None else args.examples
    if n < 1:
        raise ValueError(f"--examples {args.examples}: must be >= 1")
    res = analyze(r.model, variables, data.x_test[:n], data.y_test[:n], densities, mask=mask,
                  kind=args.kind, scorer=args.scorer, batch_size=args.batch_size,
                  replicas=args.replicas,
                  rates=r.rates if args.kind == "weights" else None)
    print(f"{r.name}, {what} ({cfg.model} on {cfg.dataset} test split)")
    print(format_table(res))
    tag = f"level{args.level}" if args.level is not None else "checkpoint"
    out = args.out or os.path.join(r.path, f"sensitivity_{args.kind}_{tag}.png")
    plot(res, out, f"{cfg.model} on {cfg.dataset}, {what}: one {args.kind[:-1]} pruned at a "
                   f"time ({args.scorer or ('l1' if args.kind == 'groups' else 'magnitude')})")
    print(f"plot: {out}")
    return 0
