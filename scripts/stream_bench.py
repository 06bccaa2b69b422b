"""Stream one epoch of a multi-GB JPEG dataset through `lottery.data.stream` with bounded memory.

    python scripts/stream_bench.py DATA_DIR [--gb 3] [--batch-size 256] [--image-size 224]
                                   [--workers N] [--augment imagenet|none]

Generates (once) a TFDS dataset of `--gb` GB of JPEGs of varying size (144..320 px per side, 10
classes, one test image per 50 training ones) in DATA_DIR as array_record, without network. Its
float32 arrays at `--image-size` would need many times the JPEG bytes (input='auto' streams
it). The script then reads one epoch of the training split in the order training uses
(`batches.epoch_order`), as `train.train` feeds its steps (grain workers read, decode and
transform each batch ahead; here with the host train policy of augment='imagenet' unless
`--augment none`), places each batch on the default device, and prints images/s and the peak
resident memory: of this process, and of it and its grain workers together (sampled every
0.1 s; shared memory counted once per process that maps it).

Not a test: it takes minutes, and generating holds the training split's JPEGs in memory once
(in a child process; see `_generate`). The normalization statistics are computed from 2,000
evenly spaced training images (`data.STATS_MAX_EXAMPLES`) to keep the one-time preparation
short.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import threading
import time

import numpy as np
import psutil

NAME = "lottery_stream_bench"


def _builder_class(gb: float):
    import tensorflow_datasets as tfds
    from etils import epath
    from PIL import Image

    class StreamBench(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Random smooth-plus-noise JPEGs of varying size until `gb` GB are written."""

        name = NAME
        VERSION = tfds.core.Version("1.0.0")
        code_path = epath.Path(__file__)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=10)}),
                supervised_keys=("image", "label"), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples(0, gb * 1e9 * 50 / 51),
                    "test": self._generate_examples(1, gb * 1e9 / 51)}

        def _generate_examples(self, seed, nbytes):
            total, i = 0, 0
            while total < nbytes:
                rng = np.random.default_rng([seed, i])
                h, w = (int(v) for v in rng.integers(144, 321, 2))
                label = int(rng.integers(10))
                base = np.linspace(0, 255, w)[None, :, None] * np.eye(3)[label % 3]
                image = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, format="JPEG", quality=90)
                total += buf.tell()
                yield i, {"image": buf.getvalue(), "label": label}
                i += 1

    return StreamBench


def _generate(data_dir: str, gb: float) -> None:
    """Prepare the dataset. TFDS spills a split larger than its 1 GB shuffle buffer to files it
    writes with TensorFlow, which is not installed: the buffer is raised to hold the split."""
    from tensorflow_datasets.core import shuffle

    shuffle.MAX_MEM_BUFFER_SIZE = int(gb * 1.2e9) + (1 << 30)
    _builder_class(gb)(data_dir=data_dir).download_and_prepare(file_format="array_record")


class PeakRSS:
    """Samples the resident memory of this process and of it with its children."""

    def __init__(self, every: float = 0.1):
        self.me = psutil.Process()
        self.peak_self = self.peak_all = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every):
        while not self._stop.is_set():
            try:
                own = self.me.memory_info().rss
                kids = sum(c.memory_info().rss for c in self.me.children(recursive=True))
            except psutil.Error:
                continue
            self.peak_self, self.peak_all = max(self.peak_self, own), max(self.peak_all,
                                                                          own + kids)
            time.sleep(every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir")
    ap.add_argument("--gb", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--augment", choices=("imagenet", "none"), default="imagenet")
    args = ap.parse_args()

    import jax

    from lottery import batches, data
    from lottery.data import stream

    b = _builder_class(args.gb)(data_dir=args.data_dir)
    if not b.is_prepared():  # in another process, so its memory is not this one's
        t = time.time()
        p = multiprocessing.get_context("spawn").Process(target=_generate,
                                                         args=(args.data_dir, args.gb))
        p.start()
        p.join()
        if p.exitcode:
            raise SystemExit(f"generating the dataset failed (exit code {p.exitcode})")
        print(f"generated in {time.time() - t:.0f} s")
    data.STATS_MAX_EXAMPLES = 2000
    ds = data.load(NAME, data_dir=args.data_dir, image_size=args.image_size, input="stream",
                   workers=args.workers)
    disk = sum(f.stat().st_size for f in os.scandir(b.data_path) if "train" in f.name)
    n = ds.x_train.shape[0]
    as_arrays = n * int(np.prod(ds.x_train.shape[1:])) * 4
    auto = "streams" if as_arrays * 51 / 50 > data.STREAM_ABOVE else "would not stream"
    print(f"{NAME}: {n:,} training JPEGs, {disk / 1e9:.2f} GB on disk; as float32 arrays "
          f"{as_arrays / 2**30:.1f} GiB (input='auto' {auto} it); batches of "
          f"{args.batch_size} x {ds.x_train.shape[1:]}; {ds.x_train.workers} grain workers; "
          f"augment={args.augment}")

    key = jax.random.key_data(jax.random.key(0))
    order = np.asarray(batches.epoch_order(key, 0, n, args.batch_size))
    aug = (np.asarray(key), 0, 0) if args.augment == "imagenet" else None
    with PeakRSS() as rss:
        t = time.time()
        seen = 0
        for x, y in stream.batches(ds.x_train, order, augment=aug):
            jax.block_until_ready(jax.device_put((x, y)))
            seen += len(y)
            if seen == len(y):
                first = time.time() - t
        took = time.time() - t
        del x, y  # the last batch: its shared memory is released here
    print(f"one epoch: {seen:,} images in {took:.0f} s (first batch after {first:.1f} s): "
          f"{seen / took:.0f} images/s")
    print(f"peak RSS: this process {rss.peak_self / 2**30:.2f} GiB, with its grain workers "
          f"{rss.peak_all / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
