"""Experiment configs as data: an `ml_collections.ConfigDict`, validated before any work.

Config files are Python modules with `get_config()` (the flax-examples convention); they start
from `base()` and change what differs. `--config.<field>=<value>` overrides are type-checked.
Fields listed in `UNHASHED` do not change results (or only extend a run), so they are left out
of the run hash: a finished run can be extended with more levels.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import traceback
from typing import Any, Sequence

import ml_collections

from lottery import steps as steps_lib

REWINDS = ("init", "iteration", "lr", "finetune")
SCOPES = ("global", "layerwise", "uniform", "erk")  # prune.SCOPES
CONTROLS = ("reinit", "random_prune")
# The `structure` values each experiment kind prunes by (the kinds not listed: weights only).
STRUCTURES = {"find-ticket": ("weights", "groups"), "oneshot": ("weights", "units", "groups"),
              "agp": ("weights", "groups")}
# Left out of the run hash: they do not change results, or they only extend a run (more levels,
# more controls, more scorers, compression points or ablations of a prune-at-init sweep).
UNHASHED = ("levels", "data_dir", "loop", "progress", "controls", "control_seeds",
            "control_levels", "checkpoint_seconds", "eval_batch_size",
            "scorers", "compressions", "densities", "ablations", "devices", "replica_strategy",
            "tensorboard", "download")


def base() -> ml_collections.ConfigDict:
    """Every field a ticket search reads, with OpenLTH's LeNet-300-100 recipe as the default."""
    c = ml_collections.ConfigDict()
    c.experiment = "find-ticket"
    # data and model
    c.dataset = "mnist5k"
    c.data_dir = ""  # '' = $LOTTERY_DATA_DIR or TFDS's default
    c.download = False  # a TFDS dataset not yet prepared: download and prepare it on first use
    c.image_size = 0  # TFDS datasets of varying image size: resize + center crop to this (0: 224)
    # auto (stream above data.STREAM_ABOVE bytes) | memory | stream (read by grain while training)
    c.input = "auto"
    c.model = "lenet300_100"
    c.bias_init = "torch"  # torch (PyTorch's default U(+-1/sqrt(fan_in)), OpenLTH) | zeros
    c.bn_init = "uniform"  # BN scales: uniform (U[0, 1), OpenLTH) | ones (PyTorch, flax default)
    c.seed = 0  # model init and data order
    # replicate seeds: K > 0 runs seeds seed..seed+K-1 together, one run directory each (the one
    # `seed` alone would make); 0 = seed only. prune-at-init sets its own count (3)
    c.seeds = 0
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
    c.augment = "none"  # none | cifar | imagenet (streamed: on host, of the stored images)
    c.sampling = "epochs"  # epochs (a permutation per epoch) | random (independent batches)
    c.eval_every = "1ep"
    c.eval_batch_size = 1000
    c.loop = "auto"  # auto | scan | steps
    # forward/backward (and eval) dtype; weights, optimizer state and BN statistics stay float32
    c.compute_dtype = "float32"  # float32 | bfloat16
    # how K replicas (controls, seeds) share a device: auto (vmap for MLPs, sequential for conv
    # nets) | vmap | map (lax.map, one program) | sequential; equal results up to rounding
    c.replica_strategy = "auto"
    # pruning
    c.levels = 5  # IMP levels after the dense level 0
    c.fraction = 0.2  # share of the remaining prunable weights removed per level
    c.scope = "global"
    c.scorer = "magnitude"
    c.count_rule = "exact"  # exact | synflow | openlth: whose counting and tie rule (prune.py)
    c.exclude = "out"  # comma-separated patterns never pruned ('' = prune every kernel)
    # comma-separated patterns pruned instead of the default, the kernels (leaves named 'kernel'
    # with ndim >= 2; masks.default_prunable), e.g. '(.*/)?kernel,embed/embedding'
    c.include = ""
    c.rates = ""  # per-layer rate multipliers, e.g. 'out=0.5,conv1=0.8'
    # what a pruning step removes: weights | groups (whole coupled channel groups, counted in
    # channels: lottery.groups) | units (oneshot only: each layer's output units, uncoupled)
    c.structure = "weights"
    c.group_scorer = "l1"  # structure='groups': l1 | l2 | l1_all | l2_all | bn_scale | taylor
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
    # also write each metrics.jsonl's records as TensorBoard event files beside it (needs
    # tensorboardX: pip install 'lottery[tensorboard]'); metrics.jsonl stays the record
    c.tensorboard = False
    return c


# Fields added after run directories existed, with the value that reproduces what older code did.
# A saved config without them means that value, and at that value they are left out of the hash,
# so the directories of older runs keep their names.
LEGACY = {"bias_init": "zeros", "bn_init": "uniform", "sampling": "epochs", "count_rule": "exact",
          "image_size": 0, "compute_dtype": "float32", "seeds": 0, "structure": "weights",
          "group_scorer": "l1", "input": "auto", "include": ""}
# LEGACY fields that some experiment kinds had, and hashed at every value, before `base()` did:
# for those kinds the field stays in the hash.
HASHED_BEFORE = {"structure": ("oneshot", "agp")}
# Config fields that are model options, passed to the models that have them (`model`).
MODEL_OPTIONS = ("bias_init", "bn_init")


def from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A run's saved config.json as a ConfigDict; fields added to `base()` since the run was made
    take the value older code used (`LEGACY`), or their default."""
    return ml_collections.ConfigDict({**base().to_dict(), **LEGACY, **saved})


def model(cfg: ml_collections.ConfigDict, num_classes: int):
    """The config's flax model, with the `MODEL_OPTIONS` fields the model class has (a model
    without a `bias_init` field, e.g. the MNIST-1D ones with their reference init, ignores it).
    A model given by import path or `models.register` is used as its factory builds it."""
    from lottery import models  # noqa: PLC0415 - keep this module free of jax at import

    m = models.create(cfg.model, num_classes=num_classes)
    if cfg.model not in models.MODELS:
        return m
    names = {f.name for f in dataclasses.fields(m)}
    opts = {k: cfg[k] for k in MODEL_OPTIONS if k in names and k in cfg}
    return m.clone(**opts) if opts else m


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
    except Exception as e:  # anything a Python file can raise: one line naming the file
        raise ValueError(_config_error(path, e, "loading it")) from None
    finally:
        sys.path.remove(folder)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {path!r} has no get_config() function")
    try:
        cfg = module.get_config()
    except Exception as e:
        raise ValueError(_config_error(path, e, "get_config()")) from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ValueError(f"--config {path}: get_config() returned {type(cfg).__name__}, "
                         f"expected an ml_collections.ConfigDict (start from "
                         f"lottery.config.base())")
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def _config_error(path: str, e: Exception, stage: str) -> str:
    """One line for an exception raised by a config file: where (file and line) and what."""
    if isinstance(e, SyntaxError):
        where = "" if os.path.abspath(e.filename or path) == os.path.abspath(path) \
            else f" in {e.filename}"
        return f"--config {path}: syntax error{where} at line {e.lineno}: {e.msg}"
    frames = traceback.extract_tb(e.__traceback__)
    folder = os.path.dirname(os.path.abspath(path))
    user = [f for f in frames if os.path.dirname(os.path.abspath(f.filename)) == folder]
    at = f" at line {user[-1].lineno}" + (
        f" of {user[-1].filename}" if os.path.abspath(user[-1].filename) != os.path.abspath(path)
        else "") if user else ""
    msg = (str(e).strip().splitlines() or [""])[0]
    return f"--config {path}: {stage} failed{at}: {type(e).__name__}: {msg}".rstrip(": ")


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
        kind = type(old).__name__
        raise ValueError(f"--config.{field}={raw!r}: expected "
                         f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}") from None
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
    """The per-leaf pruning rates a config asks for (`include`, `exclude`, `rates`) over
    `params`."""
    from lottery import masks  # noqa: PLC0415 - keep this module free of jax at import

    return masks.prunable(params, include=split(cfg.get("include", "")) or None,
                          exclude=split(cfg.exclude) or None,
                          rates=parse_rates(cfg.rates) or None)


def count_basis(cfg: ml_collections.ConfigDict, params) -> Any:
    """For count_rule='openlth': the leaves OpenLTH counts remaining weights over, i.e. every leaf
    the default rule (or `include`) would prune, also those `exclude` keeps (its
    `pruning_layers_to_ignore`);
    None for the other rules."""
    if cfg.get("count_rule", "exact") != "openlth":
        return None
    from lottery import masks  # noqa: PLC0415 - keep this module free of jax at import

    return masks.prunable(params, include=split(cfg.get("include", "")) or None)


def _choice(cfg, field, allowed):
    if cfg[field] not in allowed:
        raise ValueError(f"{field}={cfg[field]!r}: expected one of {', '.join(allowed)}")


def validate(cfg: ml_collections.ConfigDict, steps_per_epoch: int | None = None) -> None:
    """Raise ValueError naming the first bad field and its allowed values. Cheap: no data, no jax."""
    from lottery import data, models, prune, scorers, train  # noqa: PLC0415 - keep import light

    data_dir = cfg.get("data_dir") or None
    data.check(cfg.dataset, data_dir=data_dir)
    if cfg.model not in models.MODELS:  # a registered or imported model: build it, abstractly
        image_size = cfg.get("image_size") or None
        models.check(cfg.model, data.input_shape(cfg.dataset, data_dir=data_dir,
                                                 image_size=image_size),
                     data.num_classes(cfg.dataset, data_dir=data_dir))
    _choice(cfg, "bias_init", models.BIAS_INITS)
    _choice(cfg, "bn_init", tuple(models.BN_SCALE_INITS))
    _choice(cfg, "optimizer", train.OPTIMIZERS)
    _choice(cfg, "lr_schedule", train.LR_SCHEDULES)
    _choice(cfg, "augment", tuple(train.AUGMENTATIONS))
    _choice(cfg, "input", data.INPUTS)
    _choice(cfg, "loop", train.LOOPS)
    _choice(cfg, "compute_dtype", train.COMPUTE_DTYPES)
    _choice(cfg, "replica_strategy", train.REPLICA_STRATEGIES)
    _choice(cfg, "sampling", train.SAMPLINGS)
    _choice(cfg, "scope", SCOPES)
    _choice(cfg, "rewind", REWINDS)
    _choice(cfg, "scorer", tuple(scorers.SCORERS))
    _choice(cfg, "count_rule", prune.COUNT_RULES)
    if cfg.get("structure", "weights") != "weights":
        _choice(cfg, "structure", STRUCTURES.get(cfg.experiment, ("weights",)))
    for c in split(cfg.controls):
        if c not in CONTROLS:
            raise ValueError(f"controls={cfg.controls!r}: unknown control {c!r}; "
                             f"expected a comma-separated subset of {', '.join(CONTROLS)}")
    positive = {"batch_size": cfg.batch_size, "lr": cfg.lr, "eval_batch_size": cfg.eval_batch_size}
    if cfg.rewind == "finetune":
        positive["finetune_lr"] = cfg.finetune_lr
    for k, v in positive.items():
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{k}={v}: must be a finite number > 0")
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
    if cfg.get("seeds", 0) < 0:
        raise ValueError(f"seeds={cfg.seeds}: must be >= 0 (K > 0 runs seeds seed..seed+K-1, "
                         f"0 = seed only)")
    if cfg.get("tensorboard", False) and importlib.util.find_spec("tensorboardX") is None:
        raise ValueError("tensorboard=True: the tensorboardX package is not installed; pip install "
                         "'lottery[tensorboard]' (or pip install tensorboardX)")
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
    if cfg.get("structure") == "groups":
        _check_groups(cfg, data_dir)


def _check_groups(cfg: ml_collections.ConfigDict, data_dir: str | None) -> None:
    """structure='groups': the fields it works with, and the model's channel groups derived
    (abstractly, `lottery.groups.resolve`), so a model they cannot be derived for stops here."""
    import jax  # noqa: PLC0415 - keep this module free of jax at import

    from lottery import data, groups, models  # noqa: PLC0415 - as above

    _choice(cfg, "group_scorer", tuple(groups.SCORERS))
    why = "structure='groups' prunes whole channels"
    if cfg.scope not in groups.GROUP_SCOPES:
        raise ValueError(f"scope={cfg.scope!r}: {why}, ranked over all groups or per group; "
                         f"expected one of {', '.join(groups.GROUP_SCOPES)}")
    if cfg.scorer != "magnitude":
        raise ValueError(f"scorer={cfg.scorer!r}: {why}, ranked by group_scorer; expected "
                         f"'magnitude' (the default)")
    if cfg.count_rule != "exact":
        raise ValueError(f"count_rule={cfg.count_rule!r}: {why}, counted as lottery counts; "
                         f"expected 'exact'")
    if cfg.rates:
        raise ValueError(f"rates={cfg.rates!r}: {why}; name the layers whose filters stay in "
                         f"exclude; expected ''")
    shape = data.input_shape(cfg.dataset, data_dir=data_dir, image_size=cfg.get("image_size")
                             or None)
    model_ = model(cfg, data.num_classes(cfg.dataset, data_dir=data_dir))
    variables = jax.eval_shape(lambda: models.init(model_, jax.random.key(0), shape))
    try:
        groups.resolve(model_, variables, shape, scorer=cfg.group_scorer,
                       rates=prunable(cfg, variables["params"]))
    except ValueError as e:
        raise ValueError(f"structure='groups' with model={cfg.model!r}, group_scorer="
                         f"{cfg.group_scorer!r}: {e}") from None


def hashed_fields(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields that determine results, as plain JSON-able values."""
    return {k: v for k, v in sorted(cfg.to_dict().items())
            if k not in UNHASHED and not (k in LEGACY and v == LEGACY[k] and cfg.get(
                "experiment") not in HASHED_BEFORE.get(k, ()))}


def run_hash(cfg: ml_collections.ConfigDict) -> str:
    """A stable 10-hex-digit hash of the result-determining fields."""
    blob = json.dumps(hashed_fields(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_name(cfg: ml_collections.ConfigDict) -> str:
    """'<experiment>_<model>_<dataset>_<hash>', e.g. 'find-ticket_lenet300_100_mnist5k_1a2b3c4d5e';
    characters other than letters, digits, '_' and '-' in an import path or a TFDS name
    ('pkg.mod:make', 'imagenette/320px') become '-' (the hash tells such runs apart)."""
    safe = lambda s: re.sub(r"[^A-Za-z0-9_-]+", "-", str(s))  # noqa: E731
    return f"{cfg.experiment}_{safe(cfg.model)}_{safe(cfg.dataset)}_{run_hash(cfg)}"
