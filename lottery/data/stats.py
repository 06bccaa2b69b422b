"""Normalization statistics of a TFDS image dataset by name: per-channel mean and std of pixel / 255
over its training split, computed once (exact integer sums) and cached beside the prepared dataset
in `STATS_FILE`.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np

from lottery.data.tfds_source import READ_CHUNK, Info, read_records, train_test_splits

STATS_FILE = "lottery_normalization.json"  # beside a prepared dataset's dataset_info.json


def normalization_stats(b, inf: Info, max_examples: int
                        ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of pixel / 255 over the training split, read from `STATS_FILE`
    beside the prepared dataset, or computed (exact integer sums over every pixel of every image,
    or of `max_examples` evenly spaced images) and written there."""
    path = b.data_path / STATS_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        return tuple(saved["mean"]), tuple(saved["std"])
    from lottery.data import transforms  # noqa: PLC0415

    split, _ = train_test_splits(b, inf.name)
    source = b.as_data_source(split=split)
    n = len(source)
    idx = np.arange(n) if n <= max_examples else np.unique(
        np.linspace(0, n - 1, max_examples).round().astype(np.int64))
    channels = inf.shape[-1]
    total = np.zeros(channels, np.int64)
    squares = np.zeros(channels, np.int64)
    pixels = 0
    from tqdm.auto import tqdm  # noqa: PLC0415

    with tqdm(total=len(idx), desc=f"normalization statistics of {inf.name}", unit="image",
              disable=len(idx) < 20_000, leave=False) as bar:
        for start in range(0, len(idx), READ_CHUNK // 8):
            keys = [int(i) for i in idx[start:start + READ_CHUNK // 8]]
            for r in read_records(source, keys):
                v = transforms.as_channels(np.asarray(r[inf.image_key]), channels)
                v = v.reshape(-1, channels).astype(np.int64)
                total += v.sum(axis=0)
                squares += np.einsum("pc,pc->c", v, v)
                pixels += v.shape[0]
            bar.update(len(keys))
    if pixels == 0:
        raise ValueError(f"dataset {inf.name!r}: the {split!r} split has no pixels to compute "
                         f"normalization statistics from")
    mean = total / pixels / 255.0
    std = np.sqrt(np.maximum(squares / pixels / 255.0**2 - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)  # a constant channel: leave its scale alone
    stats = {"mean": [float(m) for m in mean], "std": [float(s) for s in std],
             "split": split, "examples": int(len(idx)), "split_examples": int(n),
             "pixels_per_channel": int(pixels), "of": "pixel / 255, population std",
             "dataset": inf.name, "version": str(b.info.version)}
    try:
        tmp = b.data_path / f".{STATS_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(stats, indent=1) + "\n")
        tmp.replace(path)
    except OSError as e:
        warnings.warn(f"dataset {inf.name!r}: cannot cache normalization statistics in {path} "
                      f"({e.strerror or e}); they are computed again on every load", stacklevel=2)
    return tuple(stats["mean"]), tuple(stats["std"])
