"""Experiment configs as data: an `ml_collections.ConfigDict`, validated before any work.

Config files are Python modules with `get_config()` (the flax-examples convention); they start
from `base()` and change what differs. `--config.<field>=<value>` overrides are type-checked.
Fields listed in `UNHASHED` do not change results (or only extend a run), so they are left out
of the run hash: a finished run can be extended with more levels.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import sys
from typing import Any, Sequence

import ml_collections

from lottery import steps as steps_lib

REWINDS = ("init", "iteration", "lr", "finetune")
SCOPES = ("global", "layerwise")
CONTROLS = ("reinit", "random_prune")
# Left out of the run hash: they do not change results, or they only extend a run (more levels,
# more controls, more scorers or compression points of a prune-at-init sweep).
UNHASHED = ("levels", "data_dir", "loop", "progress", "controls", "control_seeds",
            "control_levels", "checkpoint_seconds", "eval_batch_size",
            "scorers", "compressions", "densities", "devices")


def base() -> ml_collections.ConfigDict:
    """Every field a ticket search reads, with OpenLTH's LeNet-300-100 recipe as the default."""
    c = ml_collections.ConfigDict()
    c.experiment = "find-ticket"
    # data and model
    c.dataset = "mnist5k"
    c.data_dir = ""  # '' = $LOTTERY_DATA_DIR or TFDS's default
    c.model = "lenet300_100"
    c.seed = 0  # model init and data order
    # training (OpenLTH mnist_lenet_300_100: SGD lr 0.1, batch 128, 40 epochs, no momentum)
    c.batch_size = 128
    c.training_steps = "40ep"
    c.optimizer = "sgd"
    c.lr = 0.1
    c.momentum = 0.0
    c.nesterov = False
    c.weight_decay = 0.0
    c.lr_schedule = "constant"  # constant | step | cosine
    c.milestones = ""  # comma-separated step strings for lr_schedule='step', e.g. '80ep,120ep'
    c.gamma = 0.1
    c.warmup_steps = "0it"
    c.augment = "none"  # none | cifar
    c.eval_every = "1ep"
    c.eval_batch_size = 1000
    c.loop = "auto"  # auto | scan | steps
    # pruning
    c.levels = 5  # IMP levels after the dense level 0
    c.fraction = 0.2  # share of the remaining prunable weights removed per level
    c.scope = "global"
    c.scorer = "magnitude"
    c.exclude = "out"  # comma-separated patterns never pruned ('' = prune every kernel)
    c.rates = ""  # per-layer rate multipliers, e.g. 'out=0.5,conv1=0.8'
    # rewinding
    c.rewind = "init"  # init | iteration | lr | finetune
    c.rewind_step = "0it"  # for 'iteration' and 'lr'
    c.finetune_lr = 0.01
    c.finetune_steps = ""  # '' = training_steps
    # controls, trained from a finished level's mask without retraining the trunk
    c.controls = ""  # comma-separated: reinit, random_prune
    c.control_seeds = 2
    c.control_levels = ""  # comma-separated levels ('' = every pruned level)
    # runtime
    c.checkpoint_seconds = 30.0  # in-level checkpoints at eval points, at most this often
    c.devices = "all"  # data-parallel devices: 'all' or a count ('4'); batch_size a multiple
    c.progress = True
    return c


def from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A run's saved config.json as a ConfigDict; fields added to `base()` since the run was made
    take their defaults (new fields must default to what older code did)."""
    return ml_collections.ConfigDict({**base().to_dict(), **saved})


def load(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of a Python file's get_config(), with `field=value` overrides applied."""
    if not os.path.isfile(path):
        raise ValueError(f"--config: no such file {path!r}")
    spec = importlib.util.spec_from_file_location("lottery_user_config", path)
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)  # a config may import a sibling config and override it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {path!r} has no get_config() function")
    cfg = module.get_config()
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def apply_override(cfg: ml_collections.ConfigDict, item: str) -> None:
    """Apply one 'field=value' override, keeping the field's type."""
    if "=" not in item:
        raise ValueError(f"--config.{item}: expected --config.<field>=<value>")
    field, raw = item.split("=", 1)
    if field not in cfg:
        raise ValueError(f"--config.{field}: unknown field; known fields: {', '.join(sorted(cfg))}")
    old = cfg[field]
    try:
        if isinstance(old, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            value = raw.lower() in ("true", "1")
        elif isinstance(old, int):
            value = int(raw)
        elif isinstance(old, float):
            value = float(raw)
        elif isinstance(old, str):
            value = raw
        else:
            value = type(old)(ast.literal_eval(raw))
    except (ValueError, SyntaxError):
        raise ValueError(f"--config.{field}={raw!r}: expected a {type(old).__name__}") from None
    cfg[field] = value


def split(value: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']; '' -> []."""
    return [v.strip() for v in str(value).split(",") if v.strip()]


def parse_rates(value: str) -> dict[str, float]:
    """'out=0.5,conv1=0.8' -> {'out': 0.5, 'conv1': 0.8}."""
    out = {}
    for item in split(value):
        name, _, r = item.partition("=")
        try:
            out[name.strip()] = float(r)
        except ValueError:
            raise ValueError(f"rates={value!r}: expected 'pattern=multiplier,...', "
                             f"e.g. 'out=0.5'") from None
        if out[name.strip()] < 0:
            raise ValueError(f"rates={value!r}: multipliers must be >= 0")
    return out


def prunable(cfg: ml_collections.ConfigDict, params) -> Any:
    """The per-leaf pruning rates a config asks for (`exclude` and `rates`) over `params`."""
    from lottery import masks  # noqa: PLC0415 - keep this module free of jax at import

    return masks.prunable(params, exclude=split(cfg.exclude) or None,
                          rates=parse_rates(cfg.rates) or None)


def _choice(cfg, field, allowed):
    if cfg[field] not in allowed:
        raise ValueError(f"{field}={cfg[field]!r}: expected one of {', '.join(allowed)}")


def validate(cfg: ml_collections.ConfigDict, steps_per_epoch: int | None = None) -> None:
    """Raise ValueError naming the first bad field and its allowed values. Cheap: no data, no jax."""
    from lottery import data, models, scorers, train  # noqa: PLC0415 - keep import light

    _choice(cfg, "dataset", data.DATASETS)
    _choice(cfg, "model", tuple(models.MODELS))
    _choice(cfg, "optimizer", train.OPTIMIZERS)
    _choice(cfg, "lr_schedule", train.LR_SCHEDULES)
    _choice(cfg, "augment", tuple(train.AUGMENTATIONS))
    _choice(cfg, "loop", train.LOOPS)
    _choice(cfg, "scope", SCOPES)
    _choice(cfg, "rewind", REWINDS)
    _choice(cfg, "scorer", tuple(scorers.SCORERS))
    for c in split(cfg.controls):
        if c not in CONTROLS:
            raise ValueError(f"controls={cfg.controls!r}: unknown control {c!r}; "
                             f"expected a comma-separated subset of {', '.join(CONTROLS)}")
    positive = {"batch_size": cfg.batch_size, "lr": cfg.lr, "eval_batch_size": cfg.eval_batch_size}
    if cfg.rewind == "finetune":
        positive["finetune_lr"] = cfg.finetune_lr
    for k, v in positive.items():
        if not v > 0:
            raise ValueError(f"{k}={v}: must be > 0")
    if not 0 <= cfg.fraction < 1:
        raise ValueError(f"fraction={cfg.fraction}: must be in [0, 1) (share of the remaining "
                         f"weights removed per level)")
    if cfg.levels < 0:
        raise ValueError(f"levels={cfg.levels}: must be >= 0")
    if cfg.weight_decay < 0:
        raise ValueError(f"weight_decay={cfg.weight_decay}: must be >= 0")
    if not 0 <= cfg.momentum < 1:
        raise ValueError(f"momentum={cfg.momentum}: must be in [0, 1)")
    d = str(cfg.devices).strip().lower()
    if d != "all" and not (d.isdigit() and int(d) >= 1):
        raise ValueError(f"devices={cfg.devices!r}: expected 'all' or a positive number of devices")
    if cfg.control_seeds < 1:
        raise ValueError(f"control_seeds={cfg.control_seeds}: must be >= 1")
    parse_rates(cfg.rates)
    for lvl in split(cfg.control_levels):
        if not lvl.isdigit() or int(lvl) < 1:
            raise ValueError(f"control_levels={cfg.control_levels!r}: expected pruned levels >= 1")
    spe = steps_per_epoch or 1
    total = steps_lib.parse(cfg.training_steps, spe, name="training_steps")
    if total <= 0:
        raise ValueError(f"training_steps={cfg.training_steps!r}: must be > 0")
    steps_lib.parse(cfg.eval_every, spe, name="eval_every")
    steps_lib.parse(cfg.warmup_steps, spe, name="warmup_steps")
    for m in split(cfg.milestones):
        steps_lib.parse(m, spe, name="milestones")
    rewind = steps_lib.parse(cfg.rewind_step, spe, name="rewind_step")
    if steps_per_epoch and rewind >= total:
        raise ValueError(f"rewind_step={cfg.rewind_step!r} ({rewind} iterations) is not before "
                         f"the end of training (training_steps={cfg.training_steps!r}, "
                         f"{total} iterations)")
    if cfg.finetune_steps:
        steps_lib.parse(cfg.finetune_steps, spe, name="finetune_steps")


def hashed_fields(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields that determine results, as plain JSON-able values."""
    return {k: v for k, v in sorted(cfg.to_dict().items()) if k not in UNHASHED}


def run_hash(cfg: ml_collections.ConfigDict) -> str:
    """A stable 10-hex-digit hash of the result-determining fields."""
    blob = json.dumps(hashed_fields(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_name(cfg: ml_collections.ConfigDict) -> str:
    """'<experiment>_<model>_<dataset>_<hash>', e.g. 'find-ticket_lenet300_100_mnist5k_1a2b3c4d5e'."""
    return f"{cfg.experiment}_{cfg.model}_{cfg.dataset}_{run_hash(cfg)}"
