"""farm.data on small files written by the tests themselves (no /usr/share/datasets needed)."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from farm.data import FASHION_MNIST_DEFAULT, FASHION_MNIST_FILES, DataError, Dataset, load_dataset, read_idx
from farm.spec import DatasetSpec

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------------------------------------ helpers

def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format: two zero bytes, dtype code 0x08 (ubyte), ndim, big-endian uint32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes(), compresslevel=1))


def make_fashion(folder: Path, n_train: int = 40, n_test: int = 12, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    x = RNG.integers(0, 256, (n_train + n_test, size, size), dtype=np.uint8)
    y = RNG.integers(0, 10, n_train + n_test).astype(np.uint8)
    write_idx(folder / "train-images-idx3-ubyte.gz", x[:n_train])
    write_idx(folder / "train-labels-idx1-ubyte.gz", y[:n_train])
    write_idx(folder / "t10k-images-idx3-ubyte.gz", x[n_train:])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", y[n_train:])
    return x, y


def make_cifar(folder: Path, per_batch: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's cifar-10-batches-py layout: pickled dicts with b'data' uint8 [n, 3072], b'labels'."""
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = RNG.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in RNG.integers(0, 10, per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
        xs.append(data)
        ys.append(labels)
    return np.concatenate(xs).reshape(-1, 3, 32, 32), np.concatenate(ys)


def split_sizes(ds: Dataset) -> dict[str, int]:
    return {s: len(ds.indices(s)) for s in ("train", "val", "test")}


def check_common(ds: Dataset) -> None:
    n = len(ds.labels)
    assert ds.images.dtype == np.float32 and ds.images.ndim == 4 and len(ds.images) == n
    assert ds.labels.dtype == np.int64
    assert ds.split.shape == (n,) and set(np.unique(ds.split)) <= {"train", "val", "test"}
    ids = np.concatenate([ds.indices(s) for s in ("train", "val", "test")])
    assert np.array_equal(np.sort(ids), np.arange(n))
    for s in ("train", "val", "test"):
        assert ds.indices(s).dtype == np.int64 and np.all(np.diff(ds.indices(s)) > 0)
    train = ds.images[ds.indices("train")].astype(np.float64)
    np.testing.assert_allclose(train.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=(0, 2, 3)), 1.0, atol=1e-4)
    assert len(ds.fingerprint) == 64 and int(ds.fingerprint, 16) >= 0


# ------------------------------------------------------------------------------------------------- digits

def test_digits_split_fractions_and_determinism():
    ds = load_dataset(DatasetSpec(name="digits", test_fraction=0.2, val_fraction=0.5), seed=0)
    check_common(ds)
    assert ds.images.shape == (1797, 1, 8, 8) and ds.n_classes == 10 and ds.groups is None
    sizes = split_sizes(ds)
    assert sizes["val"] + sizes["test"] == round(0.2 * 1797)
    assert sizes["val"] == round(0.5 * round(0.2 * 1797))
    again = load_dataset(DatasetSpec(name="digits"), seed=0)
    assert np.array_equal(again.split, ds.split) and again.fingerprint == ds.fingerprint
    np.testing.assert_array_equal(again.images, ds.images)
    other = load_dataset(DatasetSpec(name="digits"), seed=1)
    assert not np.array_equal(other.split, ds.split) and other.fingerprint != ds.fingerprint
    np.testing.assert_array_equal(other.labels, ds.labels)  # same examples, same order, other split


def test_val_fraction_zero_and_other_fractions():
    ds = load_dataset(DatasetSpec(name="digits", test_fraction=0.3, val_fraction=0.0), seed=3)
    assert split_sizes(ds) == {"train": 1797 - 539, "val": 0, "test": 539}


def test_unknown_split_name_is_a_data_error():
    ds = load_dataset(DatasetSpec(name="digits"), seed=0)
    with pytest.raises(DataError, match="'holdout' is unknown"):
        ds.indices("holdout")


# ------------------------------------------------------------------------------------------ fashion-mnist

def test_fashion_mnist_from_idx_files(tmp_path):
    x, y = make_fashion(tmp_path / "fm", n_train=40, n_test=12)
    ds = load_dataset(DatasetSpec(name="fashion-mnist", path=str(tmp_path / "fm"), val_fraction=0.5), seed=0)
    check_common(ds)
    assert ds.images.shape == (52, 1, 28, 28) and ds.n_classes == 10
    np.testing.assert_array_equal(ds.labels, y)
    # Official train examples first; the held-out set is exactly the official test split.
    assert np.array_equal(ds.indices("train"), np.arange(40))
    assert split_sizes(ds) == {"train": 40, "val": 6, "test": 6}
    # Normalization is an affine map of the raw pixels (train statistics).
    raw = x[:40].astype(np.float64)
    expected = (x[:, None].astype(np.float64) - raw.mean()) / raw.std()
    np.testing.assert_allclose(ds.images, expected, rtol=1e-5, atol=1e-5)
    other = load_dataset(DatasetSpec(name="fashion-mnist", path=str(tmp_path / "fm"), val_fraction=0.5), seed=5)
    assert np.array_equal(other.indices("train"), np.arange(40))
    assert not np.array_equal(other.split, ds.split)


def test_fingerprint_changes_when_one_pixel_changes(tmp_path):
    x, y = make_fashion(tmp_path / "a")
    base = load_dataset(DatasetSpec(name="fashion-mnist", path=str(tmp_path / "a")), seed=0).fingerprint
    x = x.copy()
    x[7, 3, 5] ^= 1
    (tmp_path / "b").mkdir()
    write_idx(tmp_path / "b" / "train-images-idx3-ubyte.gz", x[:40])
    for name in FASHION_MNIST_FILES[1:]:
        (tmp_path / "b" / name).write_bytes((tmp_path / "a" / name).read_bytes())
    changed = load_dataset(DatasetSpec(name="fashion-mnist", path=str(tmp_path / "b")), seed=0).fingerprint
    assert changed != base


def test_idx_reader_roundtrip_and_bad_magic(tmp_path):
    arr = RNG.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04rest"))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "notgz.gz").write_bytes(b"plain bytes")
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(tmp_path / "notgz.gz")
    full = gzip.decompress((tmp_path / "a.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(full[:-3]))
    with pytest.raises(DataError, match="promises"):
        read_idx(tmp_path / "short.gz")


def test_fashion_mnist_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(DatasetSpec(name="fashion-mnist", path=str(tmp_path / "nowhere")), seed=0)
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "apt-get install dataset-fashion-mnist" in msg and "\n" not in msg
    make_fashion(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is missing.*dataset-fashion-mnist"):
        load_dataset(DatasetSpec(name="fashion-mnist", path=str(tmp_path / "fm")), seed=0)


def test_fashion_mnist_images_and_labels_disagree(tmp_path):
    make_fashion(tmp_path / "fm")
    write_idx(tmp_path / "fm" / "train-labels-idx1-ubyte.gz", np.zeros(39, dtype=np.uint8))
    with pytest.raises(DataError, match="disagree"):
        load_dataset(DatasetSpec(name="fashion-mnist", path=str(tmp_path / "fm")), seed=0)


@pytest.mark.skipif(not Path(FASHION_MNIST_DEFAULT, FASHION_MNIST_FILES[0]).is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_when_installed():
    ds = load_dataset(DatasetSpec(name="fashion-mnist"), seed=0)
    assert ds.images.shape == (70000, 1, 28, 28)
    assert split_sizes(ds) == {"train": 60000, "val": 5000, "test": 5000}
    assert np.array_equal(np.bincount(ds.labels[:60000]), np.full(10, 6000))


# ------------------------------------------------------------------------------------------------ cifar10

@pytest.mark.parametrize("point_at_parent", [True, False])
def test_cifar10_folder(tmp_path, point_at_parent):
    x, y = make_cifar(tmp_path / "cifar-10-batches-py", per_batch=6)
    path = tmp_path if point_at_parent else tmp_path / "cifar-10-batches-py"
    ds = load_dataset(DatasetSpec(name="cifar10", path=str(path), val_fraction=0.5), seed=0)
    check_common(ds)
    assert ds.images.shape == (36, 3, 32, 32) and ds.n_classes == 10
    np.testing.assert_array_equal(ds.labels, y)
    assert np.array_equal(ds.indices("train"), np.arange(30))
    assert split_sizes(ds) == {"train": 30, "val": 3, "test": 3}
    # Per-channel statistics: each channel of the train split is standardized separately.
    raw = x.astype(np.float64)
    mean, std = raw[:30].mean(axis=(0, 2, 3)), raw[:30].std(axis=(0, 2, 3))
    np.testing.assert_allclose(ds.images, (raw - mean[:, None, None]) / std[:, None, None], rtol=1e-5, atol=1e-5)


def test_cifar10_missing_folder_and_batch(tmp_path):
    with pytest.raises(DataError, match="cifar10 folder .*nowhere.*does not exist.*cifar-10-batches-py"):
        load_dataset(DatasetSpec(name="cifar10", path=str(tmp_path / "nowhere")), seed=0)
    make_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 is missing"):
        load_dataset(DatasetSpec(name="cifar10", path=str(tmp_path)), seed=0)


def test_cifar10_bad_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(DataError, match=r"test_batch: data must be uint8 \[n, 3072\]"):
        load_dataset(DatasetSpec(name="cifar10", path=str(folder)), seed=0)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read cifar10 batch"):
        load_dataset(DatasetSpec(name="cifar10", path=str(folder)), seed=0)


# ------------------------------------------------------------------------------------------------- arrays

def test_arrays_npz_channels_last_with_groups(tmp_path):
    images = RNG.integers(0, 256, (60, 12, 12, 3), dtype=np.uint8)  # [N, H, W, C]
    labels = RNG.integers(0, 4, 60)
    labels[0] = 4  # n_classes = max label + 1
    groups = np.repeat(np.arange(12), 5)
    np.savez(tmp_path / "d.npz", images=images, labels=labels, groups=groups)
    spec = DatasetSpec(name="arrays", path=str(tmp_path / "d.npz"), test_fraction=0.25, val_fraction=0.4)
    ds = load_dataset(spec, seed=0)
    check_common(ds)
    assert ds.images.shape == (60, 3, 12, 12) and ds.n_classes == 5
    assert ds.groups.dtype == np.int64 and np.array_equal(ds.groups, groups)
    assert split_sizes(ds) == {"train": 45, "val": 6, "test": 9}
    # Channels-last data lands in [N, C, H, W]: channel 1 of example 2 is the raw [:, :, 1] plane.
    raw = images.astype(np.float64)
    train = raw[ds.indices("train")]
    mean1, std1 = train[..., 1].mean(), train[..., 1].std()
    np.testing.assert_allclose(ds.images[2, 1], (raw[2, :, :, 1] - mean1) / std1, rtol=1e-5, atol=1e-5)
    assert load_dataset(spec, seed=0).fingerprint == ds.fingerprint
    np.savez(tmp_path / "g.npz", images=images, labels=labels, groups=groups[::-1])
    other_groups = load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "g.npz"), test_fraction=0.25,
                                            val_fraction=0.4), seed=0)
    assert other_groups.fingerprint != ds.fingerprint


@pytest.mark.parametrize("shape,expected", [((20, 9, 9), (20, 1, 9, 9)), ((20, 1, 9, 9), (20, 1, 9, 9)),
                                            ((20, 3, 9, 9), (20, 3, 9, 9)), ((20, 9, 9, 1), (20, 1, 9, 9)),
                                            ((20, 3, 9, 3), (20, 3, 9, 3))])
def test_arrays_npz_layouts(tmp_path, shape, expected):
    np.savez(tmp_path / "d.npz", images=RNG.random(shape).astype(np.float32), labels=np.arange(20) % 2)
    ds = load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "d.npz")), seed=0)
    assert ds.images.shape == expected and ds.n_classes == 2


def test_arrays_npz_with_split_key(tmp_path):
    split = np.array(["train"] * 30 + ["test"] * 10)
    np.savez(tmp_path / "d.npz", images=RNG.random((40, 6, 6)), labels=np.arange(40) % 3, split=split)
    ds = load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "d.npz"), val_fraction=0.3), seed=0)
    assert np.array_equal(ds.indices("train"), np.arange(30))
    assert split_sizes(ds) == {"train": 30, "val": 3, "test": 7}
    # A file that names its own val rows is taken as it is.
    split[30:33] = "val"
    np.savez(tmp_path / "v.npz", images=RNG.random((40, 6, 6)), labels=np.arange(40) % 3, split=split)
    ds = load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "v.npz"), val_fraction=0.5), seed=0)
    assert np.array_equal(ds.split, split)


def test_arrays_parquet_with_groups_and_split(tmp_path):
    images = RNG.integers(0, 256, (30, 2, 5, 5), dtype=np.uint8)
    labels = RNG.integers(0, 3, 30)
    table = pa.table({
        "image": pa.array(list(images.reshape(30, -1)), type=pa.list_(pa.uint8())),
        "label": pa.array(labels, type=pa.int16()),
        "group": pa.array(np.arange(30) // 3, type=pa.int32()),
        "split": ["train"] * 20 + ["test"] * 10,
    })
    pq.write_table(table, tmp_path / "d.parquet")
    spec = DatasetSpec(name="arrays", path=str(tmp_path / "d.parquet"), image_shape=(2, 5, 5), val_fraction=0.5)
    ds = load_dataset(spec, seed=0)
    check_common(ds)
    assert ds.images.shape == (30, 2, 5, 5) and ds.n_classes == int(labels.max()) + 1
    np.testing.assert_array_equal(ds.labels, labels)
    np.testing.assert_array_equal(ds.groups, np.arange(30) // 3)
    assert split_sizes(ds) == {"train": 20, "val": 5, "test": 5}
    # Same data as .npz gives the same fingerprint: it covers the data, not the file format.
    np.savez(tmp_path / "d.npz", images=images, labels=labels, groups=np.arange(30) // 3,
             split=np.array(["train"] * 20 + ["test"] * 10))
    from_npz = load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "d.npz"), val_fraction=0.5), seed=0)
    assert from_npz.fingerprint == ds.fingerprint


def test_arrays_parquet_without_split(tmp_path):
    pq.write_table(pa.table({"image": [[float(i)] * 16 for i in range(50)], "label": [i % 5 for i in range(50)]}),
                   tmp_path / "d.parquet")
    ds = load_dataset(DatasetSpec(name="arrays", path=str(tmp_path / "d.parquet"), image_shape=(1, 4, 4)), seed=2)
    assert ds.groups is None and split_sizes(ds) == {"train": 40, "val": 5, "test": 5}


def _npz(tmp_path, **arrays) -> str:
    np.savez(tmp_path / "bad.npz", **arrays)
    return str(tmp_path / "bad.npz")


@pytest.mark.parametrize("make,pattern", [
    (lambda t: str(t / "missing.npz"), r"missing.npz does not exist"),
    (lambda t: str(t), r"is a folder; dataset.path must name a .npz or .parquet file"),
    (lambda t: (t / "d.csv").write_text("x") and str(t / "d.csv"), r"must end in .npz or .parquet"),
    (lambda t: _npz(t, images=np.zeros((4, 5, 5))), r"lacks key\(s\) labels"),
    (lambda t: _npz(t, images=np.zeros((4, 5)), labels=np.zeros(4, int)), r"images must be \[N,H,W\]"),
    (lambda t: _npz(t, images=np.zeros((4, 5, 5)), labels=np.zeros(3, int)), r"4 images but 3 labels"),
    (lambda t: _npz(t, images=np.zeros((4, 5, 5)), labels=np.array([0, 1, -1, 2])), r"labels must be >= 0"),
    (lambda t: _npz(t, images=np.zeros((4, 5, 5)), labels=np.array([0, 1.5, 1, 2])), r"whole numbers"),
    (lambda t: _npz(t, images=np.zeros((4, 5, 5)), labels=np.zeros((4, 2), int)), r"labels must be 1-D"),
    (lambda t: _npz(t, images=np.zeros((4, 5, 5)), labels=np.zeros(4, int), groups=np.zeros(3, int)),
     r"groups must have one entry per image"),
    (lambda t: _npz(t, images=np.zeros((4, 5, 5)), labels=np.zeros(4, int), split=np.array(["train"] * 3 + ["x"])),
     r"split holds \['x'\]"),
    (lambda t: _npz(t, images=np.zeros((4, 5, 5)), labels=np.zeros(4, int), split=np.array(["train"] * 4)),
     r"must hold both 'train' and held-out"),
    (lambda t: _npz(t, images=np.full((4, 5, 5), np.nan), labels=np.zeros(4, int)), r"NaN"),
])
def test_arrays_errors(tmp_path, make, pattern):
    with pytest.raises(DataError, match=pattern) as err:
        load_dataset(DatasetSpec(name="arrays", path=make(tmp_path)), seed=0)
    assert "\n" not in str(err.value)


def test_arrays_parquet_errors(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"image": [[0.0] * 16] * 4, "label": [0, 1, 0, 1]}), path)
    with pytest.raises(DataError, match=r"image_shape \[C, H, W\] is required for Parquet"):
        load_dataset(DatasetSpec(name="arrays", path=str(path)), seed=0)
    with pytest.raises(DataError, match=r"row 0 has an image of 16 values; image_shape \[1, 3, 3\] needs 9"):
        load_dataset(DatasetSpec(name="arrays", path=str(path), image_shape=(1, 3, 3)), seed=0)
    with pytest.raises(DataError, match="image_shape must be three positive integers"):
        load_dataset(DatasetSpec(name="arrays", path=str(path), image_shape=(4, 4)), seed=0)
    pq.write_table(pa.table({"pixels": [[0.0] * 16] * 4, "label": [0, 1, 0, 1]}), path)
    with pytest.raises(DataError, match=r"lacks column\(s\) image"):
        load_dataset(DatasetSpec(name="arrays", path=str(path), image_shape=(1, 4, 4)), seed=0)
    pq.write_table(pa.table({"image": ["a", "b"], "label": [0, 1]}), path)
    with pytest.raises(DataError, match="column image must be a list of numbers"):
        load_dataset(DatasetSpec(name="arrays", path=str(path), image_shape=(1, 4, 4)), seed=0)
    pq.write_table(pa.table({"image": [[0.0] * 16] * 4, "label": [0, None, 0, 1]}), path)
    with pytest.raises(DataError, match="column label has 1 null value"):
        load_dataset(DatasetSpec(name="arrays", path=str(path), image_shape=(1, 4, 4)), seed=0)
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read arrays file"):
        load_dataset(DatasetSpec(name="arrays", path=str(path), image_shape=(1, 4, 4)), seed=0)


def test_missing_path_and_unknown_name():
    with pytest.raises(DataError, match="dataset.path is required for cifar10"):
        load_dataset(DatasetSpec(name="cifar10"), seed=0)
    with pytest.raises(DataError, match="dataset.path is required for arrays"):
        load_dataset(DatasetSpec(name="arrays"), seed=0)
    with pytest.raises(DataError, match="'imagenet' is unknown"):
        load_dataset(DatasetSpec(name="imagenet"), seed=0)
