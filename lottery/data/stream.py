"""Datasets read from their TFDS array_record files while training runs, with grain: for data
that should not be held in memory.

`lottery.data.load(name, input='stream')` (or 'auto' above `lottery.data.STREAM_ABOVE` bytes)
returns a `Dataset` whose x and y are `Column`s: shaped like the in-memory arrays, read when
indexed. `Reader` turns records into what `load` returns (decode, eval transform, normalize);
the in-memory path reads through it too, so both give the same bits.

Training does not let grain choose the order. It computes the order exactly as for arrays in
memory (`batches.epoch_order` from the state's key and the epoch; in a multi-process job each
process takes its rows of every batch, `distributed.local_rows`), and `batches(...)` has grain
only read, decode, transform and normalize the records at those indices, in `workers` spawned
processes ahead of the step. The position of the input is thus a function of the checkpointed
step and key: a restored checkpoint continues with exactly the batches an uninterrupted run
sees, streamed and in-memory training see the same batches, and no iterator state is saved.

Host augmentation (`HOST_AUGMENTATIONS`): with augment='imagenet', streamed training images get
the train policy of `transforms.train_transform` (random resized crop of the stored image of
any size, flip) in the workers, drawn per example from (key, step, row of the global batch);
in memory the same name is `transforms.random_resized_crop_flip` on device, applied to the
already eval-transformed fixed-size arrays. The two differ; every other augment is the same.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from lottery.data import transforms
from lottery.data.registry import Dataset
from lottery.data.tfds_source import Info, read_records

HOST_AUGMENTATIONS = ("imagenet",)  # augmentations applied by the reader to streamed images
WORKERS = min(8, os.cpu_count() or 1)  # grain worker processes per pipeline (0: in-process)
THREADS = 2  # reading threads per worker (decoding releases the GIL)
PREFETCH = 2  # batches each worker prepares ahead


class Reader:
    """The examples of one split of a prepared TFDS dataset as `load` returns them: decoded,
    brought to `shape` (resize + center crop to `size` where set, or the host train policy),
    normalized float32, and int32 labels. This process reads through `builder`; pickled into a
    grain worker, it opens the prepared files itself (`tfds.builder_from_directory`, so no
    dataset code is needed there)."""

    def __init__(self, builder, split: str, inf: Info, shape: tuple, size: int | None,
                 scale: float, mean, std, images: bool):
        self.path, self.split, self.info = str(builder.data_path), split, inf
        self._builder = builder
        self.shape, self.size, self.images = tuple(shape), size, images
        self.scale = np.float32(scale)
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self._sources = {}
        self.length = len(self.source())

    def __getstate__(self):
        return {**self.__dict__, "_sources": {}, "_builder": None}

    def __len__(self) -> int:
        return self.length

    def source(self, labels_only: bool = False):
        """The TFDS data source of the split (`labels_only`: images left undecoded)."""
        if labels_only not in self._sources:
            import tensorflow_datasets as tfds  # noqa: PLC0415 - slow to import

            b = self._builder or tfds.builder_from_directory(self.path)
            skip = labels_only and len(self.info.shape) == 3  # an Image feature
            self._sources[labels_only] = b.as_data_source(
                split=self.split, decoders={self.info.image_key: tfds.decode.SkipDecoding()}
            ) if skip else b.as_data_source(split=self.split)
        return self._sources[labels_only]

    def decode(self, records, rngs=None) -> np.ndarray:
        """The inputs of `records` stacked as stored (uint8 pixels), each eval-transformed, or
        with `rngs` (one numpy Generator per record) given the host train policy."""
        def one(r, rng):
            x = np.asarray(r[self.info.image_key])
            if self.images:
                x = transforms.as_channels(x, self.shape[-1])
            if rng is not None:
                return transforms.train_transform(rng, x, self.shape[0])
            return x if self.size is None else transforms.eval_transform(x, self.size)

        if not records:
            return np.zeros((0,) + self.shape, np.float32)
        return np.stack([one(r, None if rngs is None else g)
                         for r, g in zip(records, rngs or [None] * len(records))])

    def labels(self, records) -> np.ndarray:
        return np.asarray([int(r[self.info.label_key]) for r in records], np.int32)

    def normalize(self, stored: np.ndarray, lead: tuple) -> np.ndarray:
        """`stored` inputs as float32 of shape lead + shape: (x / scale - mean) / std."""
        x = stored.reshape(tuple(lead) + self.shape).astype(np.float32)
        x /= self.scale
        x -= self.mean
        x /= self.std
        return x

    def read(self, keys, rngs=None) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the records at `keys` (an int array of any shape; -1: a padding row, x 0
        and label -1), `rngs` as for `decode` (one per key, in C order)."""
        keys = np.asarray(keys)
        flat = keys.reshape(-1)
        valid = flat >= 0
        records = read_records(self.source(), flat[valid].tolist())
        if rngs is not None:
            rngs = [g for g, v in zip(rngs, valid) if v]
        stored = self.decode(records, rngs)
        if not valid.all():
            full = np.zeros((flat.size,) + stored.shape[1:], stored.dtype)
            full[valid] = stored
            stored = full
        y = np.full(flat.size, -1, np.int32)
        y[valid] = self.labels(records)
        x = self.normalize(stored, keys.shape)
        x.reshape(flat.size, -1)[~valid] = 0.0
        return x, y.reshape(keys.shape)

    def read_labels(self, keys) -> np.ndarray:
        """Labels of the records at `keys` (any int array), without decoding images."""
        keys = np.asarray(keys)
        records = read_records(self.source(labels_only=True), keys.reshape(-1).tolist())
        return self.labels(records).reshape(keys.shape)


class Column:
    """One array of a streamed split, x (float32, the example shape) or y (int32 labels): it has
    the in-memory array's `shape`, `dtype` and `len`, and indexing it (an int, a slice, an index
    array) reads those examples, here and now. Converting it whole to an array is refused."""

    def __init__(self, reader: Reader, part: str, workers: int):
        if part not in ("x", "y"):
            raise ValueError(f"part={part!r}: expected 'x' or 'y'")
        self.reader, self.part, self.workers = reader, part, int(workers)
        self.shape = (len(reader),) + (reader.shape if part == "x" else ())
        self.dtype = np.dtype(np.float32 if part == "x" else np.int32)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        keys = np.arange(len(self))[key]
        if self.part == "y":
            return self.reader.read_labels(keys)
        return self.reader.read(keys)[0]

    def __array__(self, *args, **kwargs):
        raise TypeError(f"{self!r} is streamed, not held in memory: index it (x[:n], x[idx]) "
                        f"to read examples")

    def __repr__(self) -> str:
        r = self.reader
        return f"Column({r.info.name!r}, split={r.split!r}, {self.part}, shape={self.shape})"


def dataset(train: Reader, test: Reader, num_classes: int, name: str,
            workers: int | None = None) -> Dataset:
    """A `Dataset` of `Column`s over two readers (`workers`: default `WORKERS`)."""
    w = WORKERS if workers is None else int(workers)
    if w < 0:
        raise ValueError(f"workers={workers}: must be >= 0 (0: read in this process)")
    return Dataset(Column(train, "x", w), Column(train, "y", w), Column(test, "x", w),
                   Column(test, "y", w), num_classes, name)


def streamed(data) -> bool:
    """Whether `data` (a `Dataset`) is read on demand: its x and y are `Column`s."""
    return isinstance(getattr(data, "x_train", None), Column)


class _Read:
    """Element s of a pipeline: the (x, y) of keys[s] (see `batches`); picklable."""

    def __init__(self, reader: Reader, keys: np.ndarray, augment):
        self.reader, self.keys, self.augment = reader, keys, augment

    def __call__(self, s: int):
        idx = self.keys[s]
        rngs = None
        if self.augment is not None:
            key, step, row = self.augment
            rngs = [np.random.default_rng([*(int(k) for k in key[at[:-1]]), step + s,
                                           row + at[-1]]) for at in np.ndindex(idx.shape)]
        return self.reader.read(idx, rngs)


def batches(x: Column, keys, *, augment=None, workers: int | None = None
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x, y) of the records at keys[0], keys[1], ... in that order (keys: int array (S, ...,
    b), -1 a padding row), read, decoded, transformed and normalized by grain in `workers`
    processes (default `x.workers`; 0: threads of this process), `PREFETCH` batches ahead.

    `augment=(key, first_step, first_row)` gives images the host train policy: the example at
    keys[s, ..., c] from np.random.default_rng([*key[...], first_step + s, first_row + c]) with
    `key` the (..., 2) uint32 key data (one per replica): the draw depends on the step and the
    example's row of the global batch only, not on which process or worker reads it.
    Close the iterator when done with it before the end (`.close()`): it stops the workers.
    """
    import grain  # noqa: PLC0415 - only streaming needs it

    keys = np.asarray(keys)
    if augment is not None:
        augment = (np.asarray(augment[0], np.uint32), int(augment[1]), int(augment[2]))
    ds = grain.MapDataset.range(len(keys)).map(_Read(x.reader, keys, augment))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=THREADS, prefetch_buffer_size=PREFETCH))
    w = min(x.workers if workers is None else int(workers), len(keys))
    if w > 0:
        from absl import flags  # noqa: PLC0415

        if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads an absl flag (google/grain#1355)
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=w, per_worker_buffer_size=1))
    it = iter(ds)
    try:
        yield from it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
