"""Shared test setup: every test reads and prepares datasets in one temporary TFDS data dir."""

import os

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run: CI must not turn red by chance.
settings.register_profile("lottery", derandomize=True, print_blob=True)
settings.load_profile("lottery")


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
    """A session-wide TFDS data dir, so tests never touch the user's ~/tensorflow_datasets."""
    path = str(tmp_path_factory.mktemp("tensorflow_datasets"))
    old = os.environ.get("LOTTERY_DATA_DIR")
    os.environ["LOTTERY_DATA_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("LOTTERY_DATA_DIR", None)
    else:
        os.environ["LOTTERY_DATA_DIR"] = old


@pytest.fixture(scope="module")
def fast_compile():
    """For modules of tiny models, where XLA's optimizations cost more time than they save:
    `pytestmark = pytest.mark.usefixtures("fast_compile")`."""
    import jax

    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
