"""`lottery prepare NAME [--data-dir DIR] [--manual-dir DIR]`: download and prepare a dataset.

Any name `lottery.data.load` takes: the built-in datasets, a TFDS image-classification dataset
('imagenet2012', 'imagenette/320px', ...). TFDS downloads and writes it in array_record format
where the network allows, using files placed by hand in the manual dir first (default
DATA_DIR/downloads/manual; datasets such as imagenet2012 must be downloaded by hand); where it
cannot, the command says in one line what to do. For TFDS datasets other than the built-in ones,
the per-channel normalization statistics of the training split are computed and cached beside the
prepared data.
"""

from __future__ import annotations

from lottery import data


HELP = "download and prepare a dataset (TFDS, array_record) for lottery"
DESCRIPTION = __doc__.split("\n\n", 1)[1].strip()


def add_arguments(p) -> None:
    """The `prepare` subcommand's arguments."""
    p.add_argument("name", metavar="NAME",
                   help="a built-in dataset or a TFDS image-classification dataset name")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help=f"where datasets are prepared (default: ${data.ENV_VAR}, else TFDS's "
                        f"default, ~/tensorflow_datasets)")
    p.add_argument("--manual-dir", default=None, metavar="DIR",
                   help="where files downloaded by hand are (default: DATA_DIR/downloads/manual)")


def command(args) -> int:
    """Handler of `lottery prepare`: prepares the dataset and prints one line about it."""
    b = data.prepare(args.name, data_dir=args.data_dir, download=True,
                     manual_dir=args.manual_dir)
    inf = data.info(args.name, data_dir=args.data_dir)
    mean, std = data.normalization(args.name, data_dir=args.data_dir)
    where = "registered arrays, nothing to prepare" if b is None else str(b.data_path)
    sizes = "" if b is None else ", ".join(
        f"{s} {b.info.splits[s].num_examples:,}" for s in b.info.splits)
    shape = tuple("?" if d is None else d for d in inf.shape)
    print(f"{args.name}: {where}; {sizes}{'; ' if sizes else ''}stored example {shape}, "
          f"{inf.num_classes} classes, input shape for training "
          f"{data.input_shape(args.name, data_dir=args.data_dir)}; normalization mean "
          f"{_fmt(mean)} std {_fmt(std)}")
    return 0


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
