"""`lottery export RUN_DIR --level N --format compact|sparse --out DIR`: a pruned level as a model
that is actually smaller, loadable without the run directory.

  compact  `lottery.compact`: the units the mask leaves unneeded are removed (a smaller module of
           the same class, dense weights).
  sparse   `lottery.sparse`: pruned Dense kernels stored as BCOO values and indices, run with
           sparse products; other layers dense and masked.

DIR gets `params/` (orbax), `batch_stats/` (orbax, batch-norm models only) and `model.json`: the
module class and its fields, the format, num_classes, input_shape, the level's density and, for
'sparse', the shape and stored-entry count of every BCOO kernel. `load(DIR)` rebuilds the apply
function from these alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lottery import checkpoints, compact as compact_lib, config as config_lib, data, masks, models
from lottery import rundir, sparse as sparse_lib
from lottery.experiments import Command

PyTree = Any
FORMATS = ("compact", "sparse")
JSON_NAME = "model.json"


# ----------------------------------------------------------------------------------------------
# Architecture <-> JSON.


def architecture(model: nn.Module) -> dict:
    """{'class': name in lottery.models, 'fields': the module's dataclass fields as JSON values}."""
    cls = type(model).__name__
    if _module_classes().get(cls) is not type(model):
        raise ValueError(f"model class {cls} is not a lottery.models module; export supports "
                         f"the registry's modules ({', '.join(sorted(_module_classes()))})")
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.name not in ("parent", "name")}
    return {"class": cls, "fields": json.loads(json.dumps(fields))}


def _module_classes() -> dict[str, type]:
    """lottery.models' module classes, and those compaction builds (compact.MODULES)."""
    return {k: v for k, v in vars(models).items()
            if isinstance(v, type) and issubclass(v, nn.Module)
            and v.__module__.startswith(models.__name__ + ".")
            } | {c.__name__: c for c in compact_lib.MODULES}


def build(arch: dict) -> nn.Module:
    """The module `architecture` described (JSON lists back to tuples)."""
    classes = _module_classes()
    if arch.get("class") not in classes:
        raise ValueError(f"model.json class {arch.get('class')!r} is unknown; known: "
                         f"{sorted(classes)}")
    tup = lambda v: tuple(tup(x) for x in v) if isinstance(v, list) else v  # noqa: E731
    return classes[arch["class"]](**{k: tup(v) for k, v in arch["fields"].items()})


# ----------------------------------------------------------------------------------------------
# Reading a run level.


def _read_config(run_dir: str) -> ml_collections.ConfigDict:
    path = os.path.join(run_dir, rundir.CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"RUN_DIR {run_dir!r} has no config.json: not a `lottery find-ticket` "
                         f"run directory")
    return config_lib.from_saved(rundir.read_json(path))


def read_level(run_dir: str, level: int) -> tuple[nn.Module, dict, PyTree, PyTree, dict]:
    """(model, variables, mask, rates, info) of a finished level: its final weights and mask.

    `info` holds the config's dataset, num_classes and input_shape. Raises ValueError for a
    level that is not finished, CorruptCheckpointError for an unreadable checkpoint.
    """
    cfg = _read_config(run_dir)
    valid = not isinstance(level, bool) and isinstance(level, (int, np.integer)) and level >= 0
    ldir = rundir.level_dir(run_dir, level) if valid else ""
    if not valid or not rundir.is_done(ldir):
        done = rundir.done_levels(run_dir)
        raise ValueError(f"--level {level!r}: not a finished level of {run_dir} "
                         f"(finished levels: {done or 'none'})")
    where = {"data_dir": cfg.get("data_dir") or None}
    input_shape = data.input_shape(cfg.dataset, image_size=cfg.get("image_size") or None, **where)
    num_classes = data.num_classes(cfg.dataset, **where)
    model = config_lib.model(cfg, num_classes)
    hint = f"Rerun `lottery find-ticket` with --discard-level {level} to train it again."
    final = checkpoints.restore(os.path.join(ldir, "final"), hint=hint)
    mask = checkpoints.restore(os.path.join(ldir, "mask"), hint=hint)
    expected = jax.eval_shape(lambda: models.init(model, jax.random.key(0), input_shape))
    variables = {"params": final["params"]}
    if expected.get("batch_stats"):
        variables["batch_stats"] = final["batch_stats"]
    for name, tree, like in (("final params", final["params"], expected["params"]),
                             ("mask", mask, expected["params"])):
        try:
            masks.check(tree, like, name)
        except ValueError as e:
            raise checkpoints.CorruptCheckpointError(f"{ldir}: {e}. {hint}") from None
    mask = jax.tree.map(lambda m: np.asarray(m, bool), mask)
    rates = config_lib.prunable(cfg, variables["params"])
    info = {"model": cfg.model, "dataset": cfg.dataset, "num_classes": num_classes,
            "input_shape": list(input_shape)}
    return model, variables, mask, rates, info


# ----------------------------------------------------------------------------------------------
# Export and load.


def _bcoo_to_tree(sparse_params: PyTree) -> tuple[PyTree, dict]:
    """BCOO leaves as {'data', 'indices'} dicts (orbax stores arrays), and their shapes by path."""
    shapes = {}

    def split(path, x):
        if sparse_lib.is_bcoo(x):
            shapes[masks.path_str(path)] = {"shape": list(x.shape), "nse": int(x.nse)}
            return {"data": np.asarray(x.data), "indices": np.asarray(x.indices)}
        return np.asarray(x)

    tree = jax.tree_util.tree_map_with_path(split, sparse_params, is_leaf=sparse_lib.is_bcoo)
    return tree, shapes


def _tree_to_bcoo(tree: PyTree, shapes: dict) -> PyTree:
    out = jax.tree.map(jnp.asarray, tree)
    for path, meta in shapes.items():
        *parents, leaf = path.split("/")
        node = out
        for k in parents:
            node = node[k]
        d = node[leaf]
        node[leaf] = sparse_lib.jsparse.BCOO((d["data"], d["indices"]), shape=tuple(meta["shape"]),
                                             indices_sorted=True, unique_indices=True)
    return out


def export(model: nn.Module, variables: dict, mask: PyTree, out_dir: str, fmt: str,
           info: dict | None = None, rates: PyTree | None = None) -> dict:
    """Write the `fmt` ('compact' or 'sparse') version of the masked model to `out_dir`; returns
    the model.json contents. Refuses an existing non-empty `out_dir`."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"--out {out_dir!r} exists and is not an empty directory; "
                         f"choose a new one (nothing is overwritten)")
    meta = dict(info or {})
    meta.update(format=fmt, density=masks.density(mask, rates),
                source_params=models.flat_param_count(variables["params"]))
    if fmt == "compact":
        c = compact_lib.compact(model, variables, mask)
        model, variables = c.model, c.variables
        params = jax.tree.map(np.asarray, variables["params"])
        meta["units"] = {k: {"original": c.original[k], "kept": len(c.kept[k]),
                             "width": c.widths[k]} for k in c.original}
        meta["stored_params"] = models.flat_param_count(params)
    else:
        sp = sparse_lib.to_bcoo(variables["params"], mask)
        params, meta["sparse_kernels"] = _bcoo_to_tree(sp)
        meta["stored_params"] = sparse_lib.stored_count(sp)
    meta["architecture"] = architecture(model)
    os.makedirs(out_dir, exist_ok=True)
    checkpoints.save(os.path.join(out_dir, "params"), params)
    if variables.get("batch_stats"):
        checkpoints.save(os.path.join(out_dir, "batch_stats"),
                         jax.tree.map(np.asarray, variables["batch_stats"]))
    with open(os.path.join(out_dir, JSON_NAME), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return meta


def load(out_dir: str) -> tuple[Callable[[PyTree, jax.Array], jax.Array], PyTree]:
    """(apply_fn, params) of an exported model: `apply_fn(params, x) -> logits` (jitted, eval
    mode). Needs only `out_dir`."""
    path = os.path.join(out_dir, JSON_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{out_dir!r} has no {JSON_NAME}: not a `lottery export` directory")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") not in FORMATS:
        raise ValueError(f"{path}: format {meta.get('format')!r} must be one of {FORMATS}")
    model = build(meta["architecture"])
    hint = f"Export it again with `lottery export ... --out {out_dir}`."
    params = checkpoints.restore(os.path.join(out_dir, "params"), hint=hint)
    variables = {}
    if os.path.exists(os.path.join(out_dir, "batch_stats")):
        variables["batch_stats"] = jax.tree.map(jnp.asarray, checkpoints.restore(
            os.path.join(out_dir, "batch_stats"), hint=hint))
    if meta["format"] == "sparse":
        params = _tree_to_bcoo(params, meta.get("sparse_kernels", {}))
        return jax.jit(sparse_lib.apply_fn(model, variables)), params
    params = jax.tree.map(jnp.asarray, params)
    return jax.jit(models.inference_fn(model, variables)), params


# ----------------------------------------------------------------------------------------------
# Command line.


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `lottery find-ticket` run directory")
    p.add_argument("--level", type=int, required=True, metavar="N", help="a finished level")
    p.add_argument("--format", choices=FORMATS, required=True, dest="format")
    p.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) directory")


def export_command(args: argparse.Namespace) -> int:
    """`lottery export`: writes the model and prints what it holds."""
    model, variables, mask, rates, info = read_level(args.run_dir, args.level)
    info.update(run_dir=os.path.abspath(args.run_dir), level=args.level)
    meta = export(model, variables, mask, args.out, args.format, info, rates)
    print(f"exported level {args.level} ({args.format}, density {meta['density']:.4f}): "
          f"{meta['stored_params']:,} stored numbers (dense model {meta['source_params']:,}) "
          f"-> {args.out}")
    if args.format == "compact":
        for k, u in meta["units"].items():
            print(f"  {k}: {u['original']} -> {u['kept']} units")
    return 0


COMMANDS = (
    Command("export", "save a pruned level as a smaller (compact) or sparse model",
            "Export level N of a find-ticket run: 'compact' removes the units the mask leaves "
            "unneeded (same outputs, smaller dense model); 'sparse' stores pruned Dense kernels "
            "as BCOO matrices. Load it with lottery.export.load(DIR).", _add_arguments,
            export_command),
)
