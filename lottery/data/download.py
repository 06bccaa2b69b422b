"""Preparing a TFDS dataset in the data dir: where the data dir is (`resolve_data_dir`, `ENV_VAR`),
whether it can be written, downloading where the network allows, and one-line errors
(`DatasetNotFoundError`) that say what to do where it cannot.
"""

from __future__ import annotations

import os
import socket
import urllib.parse

ENV_VAR = "LOTTERY_DATA_DIR"


class DatasetNotFoundError(ValueError):
    """A real dataset is not prepared (in a readable format) in the data dir searched."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> str:
    """The data dir used: `data_dir`, else $LOTTERY_DATA_DIR, else TFDS's default."""
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR) or None
    if data_dir is None:
        from tensorflow_datasets.core import constants

        data_dir = constants.get_default_data_dir()
    return os.path.expanduser(os.fspath(data_dir))


def how_to_prepare(name: str, root: str) -> str:
    return (f"run `lottery prepare {name} --data-dir {root}` where the network allows (most TFDS "
            f"builders need TensorFlow to prepare, not to read), or elsewhere python -c \"import "
            f"tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{root}')"
            f".download_and_prepare(file_format='array_record')\" and copy "
            f"{os.path.join(root, name)} here; or pass data_dir= (or set ${ENV_VAR}) to a dir "
            f"where it is prepared, or download=True")


def check_data_dir(root: str, name: str, *, writable: bool) -> None:
    """ValueError naming the data dir if it is not a directory, or if `name` is not there yet and
    must be prepared (`writable`) but the dir cannot be created or written. Checked before TFDS
    looks at it, so the error is one line."""
    where = f"(the data_dir argument, --config.data_dir or ${ENV_VAR})"
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"data dir {root!r} is not a directory {where}")
    if not writable or os.path.isdir(os.path.join(root, name)):
        return  # prepared (or being prepared) there: reading needs no write access
    probe = os.path.join(root, f".lottery_write_test_{os.getpid()}")
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"data dir {root!r} cannot be created or written ({e.strerror}), and "
                         f"dataset {name!r} must be prepared there {where}") from None


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def missing_tensorflow(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, ImportError) and (getattr(e, "name", None) or "").split(".")[0] \
                == "tensorflow" or "No module named 'tensorflow'" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def download_urls(b) -> list[str]:
    try:
        return sorted((b.url_infos or {}).keys())
    except Exception:  # no checksums file: the URLs are only known to the builder's code
        return []


def reachable(hosts: list[str], timeout: float = 3.0) -> bool:
    """Whether a TCP connection to any of `hosts` ('name' or 'name:port') can be opened."""
    for host in hosts:
        name, _, port = host.partition(":")
        try:
            socket.create_connection((name, int(port or 443)), timeout=timeout).close()
            return True
        except (OSError, ValueError):
            continue
    return False


def download_tfds(b, name: str, root: str, manual_dir: str | None) -> None:
    """download_and_prepare a TFDS catalog dataset, or a one-line ValueError saying what to do
    where that cannot work: files to place by hand, no network, no TensorFlow."""
    import tensorflow_datasets as tfds

    manual = os.path.expanduser(manual_dir) if manual_dir else os.path.join(root, "downloads",
                                                                             "manual")
    has_files = os.path.isdir(manual) and bool(os.listdir(manual))
    again = f"run `lottery prepare {name} --data-dir {root}"
    again += f" --manual-dir {manual}`" if manual_dir else "`"
    instructions = getattr(b, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if instructions and not has_files:
        what = " ".join(str(instructions).split())
        raise DatasetNotFoundError(
            f"dataset {name!r} must be downloaded by hand: put the files TFDS asks for ({what}) "
            f"in {manual!r} (TFDS's manual_dir) and {again} again")
    urls = download_urls(b)
    wanted = [os.path.basename(urllib.parse.urlsplit(u).path) for u in urls]
    if not instructions and not any(os.path.exists(os.path.join(manual, f)) for f in wanted):
        hosts = [urllib.parse.urlsplit(u).netloc for u in urls]
        homepage = urllib.parse.urlsplit(getattr(b.info, "homepage", "") or "").netloc
        hosts = list(dict.fromkeys(hosts or ([homepage] if homepage else [])))[:3]
        if hosts and not reachable(hosts):
            listed = ", ".join(urls[:2]) + (f" (+{len(urls) - 2} more in TFDS's checksums for "
                                            f"{name})" if len(urls) > 2 else "")
            files = f"download {listed}" if urls else "download its files"
            raise DatasetNotFoundError(
                f"cannot download dataset {name!r}: {hosts[0]} is unreachable from here (no "
                f"network?); either {files} by hand into {manual!r} (TFDS's manual_dir; keep the "
                f"file names) and {again} again, or run it on a machine with network and copy "
                f"the prepared {os.path.join('DATA_DIR', b.name)} into {root!r}")
    config = tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=manual)
    try:
        b.download_and_prepare(file_format="array_record", download_config=config)
    except Exception as e:
        if b.is_prepared():  # another process prepared it at the same time
            return
        if missing_tensorflow(e):
            raise DatasetNotFoundError(
                f"preparing dataset {name!r} needs TensorFlow (TFDS's builder uses it to write "
                f"the records; reading them does not): pip install tensorflow and {again} again, "
                f"or prepare it on another machine and copy it into {root!r}") from None
        raise ValueError(f"cannot prepare dataset {name!r} in data dir {root!r}: "
                         f"{type(e).__name__}: {first_line(e)}") from None


def download_and_prepare(b) -> None:
    import tensorflow_datasets as tfds

    config = tfds.download.DownloadConfig(try_download_gcs=False)
    try:
        b.download_and_prepare(file_format="array_record", download_config=config)
    except Exception:
        if not b.is_prepared():  # else another process prepared it at the same time
            raise
