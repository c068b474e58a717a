"""Datasets as plain numpy arrays: digits, fashion-mnist, cifar10 and a user's own arrays (.npz / Parquet).

Nothing is downloaded: every loader reads local files and a missing file is a one-line DataError that
says where the data is expected and how to get it. torch is not imported here, so the planner, the
store and the evaluation stage can load a dataset without it.

Example ids are row indices into the arrays. For fashion-mnist and cifar10 the official train examples
come first, then the official test examples; digits keeps scikit-learn's order; arrays files keep their
own row order.

Splits (one 'train' | 'val' | 'test' label per example):
- held-out = the official test split (fashion-mnist, cifar10, an arrays file with a ``split`` key or
  column); for datasets without one (digits, arrays without ``split``) a random ``test_fraction`` of
  all examples;
- a random ``val_fraction`` of the held-out examples becomes 'val', the rest 'test';
- an arrays file whose ``split`` already names some rows 'val' is used as it is (no random val split).
All random choices come from ``np.random.default_rng([seed, _SPLIT_STREAM])``: deterministic in the
seed, and independent of the other random choices that the run derives from the same seed.

Images are normalized per channel with the mean and (population) standard deviation of the train
split. The fingerprint hashes the raw images (before normalization), labels, groups and the split.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from farm.spec import DATASETS, DatasetSpec

SPLITS = ("train", "val", "test")
FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FASHION_MNIST_HOWTO = ("install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist) "
                       "or set dataset.path to a folder with the four IDX .gz files")
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10_HOWTO = ("set dataset.path to torchvision's cifar-10-batches-py folder (or its parent), e.g. the "
                 "unpacked https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz; nothing is downloaded")
_SPLIT_STREAM = 0x5B117  # mixed into the seed so the split is independent of other uses of the run seed


class DataError(ValueError):
    """Data that cannot be loaded (missing, malformed); the message is one line and names the problem."""


@dataclass
class Dataset:
    name: str
    images: np.ndarray  # float32 [N, C, H, W], normalized per channel with train-split statistics
    labels: np.ndarray  # int64 [N]
    split: np.ndarray  # str [N]: 'train' | 'val' | 'test'
    groups: np.ndarray | None  # int64 [N] (e.g. subject ids) or None
    n_classes: int
    fingerprint: str  # sha256 hex of raw images, labels, groups and split assignment

    def indices(self, split: str) -> np.ndarray:
        """Example ids of one split, ascending, int64."""
        if split not in SPLITS:
            raise DataError(f"split {split!r} is unknown; allowed: {', '.join(SPLITS)}")
        return np.flatnonzero(self.split == split).astype(np.int64)


def load_dataset(spec: DatasetSpec, seed: int) -> Dataset:
    """Load, split, fingerprint and normalize the dataset that ``spec`` names (see the module docstring)."""
    if spec.name == "digits":
        raw, labels, groups, official, n_classes = _load_digits()
    elif spec.name == "fashion-mnist":
        raw, labels, groups, official, n_classes = _load_fashion_mnist(spec.path or FASHION_MNIST_DEFAULT)
    elif spec.name == "cifar10":
        if not spec.path:
            raise DataError(f"dataset.path is required for cifar10: {CIFAR10_HOWTO}")
        raw, labels, groups, official, n_classes = _load_cifar10(spec.path)
    elif spec.name == "arrays":
        if not spec.path:
            raise DataError("dataset.path is required for arrays: a .npz or .parquet file")
        raw, labels, groups, official, n_classes = _load_arrays(spec.path, spec.image_shape)
    else:
        raise DataError(f"dataset.name {spec.name!r} is unknown; allowed: {', '.join(DATASETS)}")
    split = _assign_split(len(labels), official, spec.test_fraction, spec.val_fraction, seed, spec.name)
    fingerprint = _fingerprint(raw, labels, groups, split)
    images = _normalize(raw, split == "train")
    return Dataset(name=spec.name, images=images, labels=labels, split=split, groups=groups,
                   n_classes=n_classes, fingerprint=fingerprint)


# ---------------------------------------------------------------------------------------- split, hash, norm

def _assign_split(n: int, official: np.ndarray | None, test_fraction: float, val_fraction: float,
                  seed: int, name: str) -> np.ndarray:
    """'train'/'val'/'test' per example; ``official`` is the file's own split (str [n]) or None."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"dataset.test_fraction must lie in (0, 1), got {test_fraction}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"dataset.val_fraction must lie in [0, 1), got {val_fraction}")
    rng = np.random.default_rng([int(seed), _SPLIT_STREAM])
    split = np.full(n, "train", dtype="<U5")
    if official is None:
        if n < 2:
            raise DataError(f"{name} has {n} example(s); at least 2 are needed for a train and a test split")
        n_held = min(max(int(round(test_fraction * n)), 1), n - 1)
        held = np.sort(rng.permutation(n)[:n_held])
    else:
        held = np.flatnonzero(official != "train")
        if len(held) == 0 or len(held) == n:
            raise DataError(f"{name}: the official split must hold both 'train' and held-out examples, got "
                            f"{n - len(held)} train and {len(held)} val/test")
        if np.any(official == "val"):
            split[:] = official  # the file's explicit train/val/test assignment wins
            return split
    split[held] = "test"
    n_val = int(round(val_fraction * len(held)))
    split[rng.permutation(held)[:n_val]] = "val"
    return split


def _fingerprint(raw: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, split: np.ndarray) -> str:
    h = hashlib.sha256()
    # The header makes the hash unambiguous about shape and dtype (same bytes, other layout = other data).
    header = {"shape": list(raw.shape), "dtype": raw.dtype.str, "groups": groups is not None}
    h.update(json.dumps(header, sort_keys=True).encode())
    h.update(np.ascontiguousarray(raw).data)
    h.update(np.ascontiguousarray(labels, dtype="<i8").data)
    if groups is not None:
        h.update(np.ascontiguousarray(groups, dtype="<i8").data)
    codes = np.zeros(len(split), dtype=np.uint8)
    codes[split == "val"] = 1
    codes[split == "test"] = 2
    h.update(codes.data)
    return h.hexdigest()


def _channel_stats(raw: np.ndarray, rows: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std over ``raw[rows]``, in float64.

    One pass in chunks of examples, merged with Chan et al.'s pairwise update
    (M2 = M2_a + M2_b + delta^2 * n_a * n_b / n), so neither a float64 copy of the whole set nor the
    cancellation of sum-of-squares formulas is needed.
    """
    n_channels = raw.shape[1]
    count = 0
    mean = np.zeros(n_channels)
    m2 = np.zeros(n_channels)
    for start in range(0, len(rows), chunk):
        x = raw[rows[start:start + chunk]].astype(np.float64)
        x = x.transpose(1, 0, 2, 3).reshape(n_channels, -1)
        n_b = x.shape[1]
        mean_b = x.mean(axis=1)
        m2_b = np.square(x - mean_b[:, None]).sum(axis=1)
        total = count + n_b
        delta = mean_b - mean
        mean = mean + delta * n_b / total
        m2 = m2 + m2_b + delta ** 2 * count * n_b / total
        count = total
    return mean, np.sqrt(m2 / max(count, 1))


def _normalize(raw: np.ndarray, train: np.ndarray) -> np.ndarray:
    """float32 (raw - mean_c) / std_c with per-channel statistics over the train examples."""
    mean, std = _channel_stats(raw, np.flatnonzero(train))
    std[std == 0] = 1.0  # a constant channel is only centred
    images = raw.astype(np.float32)
    images -= mean.astype(np.float32)[None, :, None, None]
    images /= std.astype(np.float32)[None, :, None, None]
    return images


def _check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"{where}: labels must be 1-D, got shape {labels.shape}")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise DataError(f"{where}: labels must be whole numbers, got non-integer values")
    elif labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, got minimum {labels.min()}")
    return labels


# ------------------------------------------------------------------------------------------------ digits

def _load_digits():
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    bunch = load_digits()
    raw = bunch.images.astype(np.uint8)[:, None]  # values are integers 0..16: lossless and compact
    return raw, bunch.target.astype(np.int64), None, None, 10


# ----------------------------------------------------------------------------------------- fashion-mnist

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip-compressed when the name ends in .gz): 0, 0, dtype code, ndim, big-endian dims."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path} is truncated: its IDX header promises {ndim} dimensions")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise DataError(f"{path} holds {len(data) - offset} data bytes, its header {dims} promises {expected}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _load_fashion_mnist(path: str):
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"fashion-mnist folder {folder} does not exist; {FASHION_MNIST_HOWTO}")
    arrays = []
    for name in FASHION_MNIST_FILES:
        file = folder / name
        if not file.is_file() and (folder / name[:-3]).is_file():
            file = folder / name[:-3]  # already gunzipped copies are fine too
        if not file.is_file():
            raise DataError(f"fashion-mnist file {folder / name} is missing; {FASHION_MNIST_HOWTO}")
        arrays.append(read_idx(file))
    train_x, train_y, test_x, test_y = arrays
    for x, y, part in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"fashion-mnist {part} files in {folder} disagree: images {x.shape}, labels {y.shape}")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"fashion-mnist in {folder}: train images are {train_x.shape[1:]}, "
                        f"test images {test_x.shape[1:]}")
    raw = np.concatenate([train_x, test_x])[:, None]
    labels = _check_labels(np.concatenate([train_y, test_y]), f"fashion-mnist in {folder}")
    official = np.array(["train"] * len(train_y) + ["test"] * len(test_y))
    return raw, labels, None, official, 10


# ------------------------------------------------------------------------------------------------ cifar10

def _load_cifar10(path: str):
    given = Path(path)
    # The batches folder itself, or its parent (torchvision's root argument).
    is_batches = given.name == CIFAR10_FOLDER or any((given / name).exists() for name in CIFAR10_FILES)
    folder = given if is_batches else given / CIFAR10_FOLDER
    if not folder.is_dir():
        raise DataError(f"cifar10 folder {folder} does not exist; {CIFAR10_HOWTO}")
    xs, ys = [], []
    for name in CIFAR10_FILES:
        file = folder / name
        if not file.is_file():
            raise DataError(f"cifar10 file {file} is missing; {CIFAR10_HOWTO}")
        # The CIFAR-10 python format is pickled dicts; only load folders you trust.
        try:
            with open(file, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            raise DataError(f"cannot read cifar10 batch {file}: {type(exc).__name__}: {exc}") from None
        if not isinstance(batch, dict):
            raise DataError(f"cifar10 batch {file} must hold a dict, got {type(batch).__name__}")
        data = batch.get(b"data", batch.get("data"))
        batch_labels = batch.get(b"labels", batch.get("labels"))
        if data is None or batch_labels is None:
            raise DataError(f"cifar10 batch {file} lacks the 'data' or 'labels' entry")
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"cifar10 batch {file}: data must be uint8 [n, 3072], got {data.dtype} {data.shape}")
        batch_labels = np.asarray(batch_labels)
        if batch_labels.shape != (len(data),):
            raise DataError(f"cifar10 batch {file}: {len(data)} images but labels of shape {batch_labels.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(batch_labels)
    raw = np.concatenate(xs)
    labels = _check_labels(np.concatenate(ys), f"cifar10 in {folder}")
    if labels.max() >= 10:
        raise DataError(f"cifar10 in {folder}: labels must lie in [0, 10), got maximum {labels.max()}")
    n_test = len(ys[-1])
    official = np.array(["train"] * (len(raw) - n_test) + ["test"] * n_test)
    return raw, labels, None, official, 10


# ------------------------------------------------------------------------------------------------- arrays

def _to_nchw(images: np.ndarray, where: str) -> np.ndarray:
    """[N,H,W] -> [N,1,H,W]. 4-D arrays are channels-last ([N,H,W,C]) when the last axis is 1 or 3 and
    axis 1 is not; otherwise they are taken as channels-first ([N,C,H,W]) as they are."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        return images
    raise DataError(f"{where}: images must be [N,H,W], [N,H,W,C] or [N,C,H,W], got shape {images.shape}")


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype.kind not in "uif":
        raise DataError(f"{where}: images must be numbers (uint8 or float), got dtype {images.dtype}")
    if images.dtype.kind == "f" and not np.all(np.isfinite(images)):
        raise DataError(f"{where}: images contain NaN or infinite values")
    # Native byte order, so the fingerprint does not depend on how the file happened to store the numbers.
    return images.astype(images.dtype.newbyteorder("="), copy=False)


def _check_split(split: np.ndarray, n: int, where: str) -> np.ndarray:
    split = np.asarray(split)
    if split.dtype == object and all(isinstance(v, str) for v in split.ravel()):
        split = split.astype(str)  # pyarrow hands string columns over as object arrays
    if split.dtype.kind not in "US":
        raise DataError(f"{where}: split must hold strings 'train', 'val' or 'test', got dtype {split.dtype}")
    split = split.astype(str)
    if split.shape != (n,):
        raise DataError(f"{where}: split must have one entry per image ({n}), got shape {split.shape}")
    bad = sorted(set(np.unique(split).tolist()) - set(SPLITS))
    if bad:
        raise DataError(f"{where}: split holds {bad[:3]}; allowed: {', '.join(SPLITS)}")
    return split


def _check_groups(groups: np.ndarray, n: int, where: str) -> np.ndarray:
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise DataError(f"{where}: groups must have one entry per image ({n}), got shape {groups.shape}")
    if groups.dtype.kind not in "iu":
        raise DataError(f"{where}: groups must be integers (e.g. subject ids), got dtype {groups.dtype}")
    return groups.astype(np.int64)


def _load_arrays(path: str, image_shape: tuple[int, ...] | None):
    file = Path(path)
    if file.is_dir():
        raise DataError(f"arrays path {file} is a folder; dataset.path must name a .npz or .parquet file")
    if not file.is_file():
        raise DataError(f"arrays file {file} does not exist; dataset.path must name a .npz or .parquet file")
    suffix = file.suffix.lower()
    if suffix == ".npz":
        images, labels, groups, split = _read_npz(file)
    elif suffix in (".parquet", ".pq"):
        images, labels, groups, split = _read_parquet(file, image_shape)
    else:
        raise DataError(f"arrays file {file} must end in .npz or .parquet, got {suffix or 'no suffix'!r}")
    where = f"arrays file {file}"
    images = _check_images(images, where)
    labels = _check_labels(labels, where)
    n = len(images)
    if n == 0:
        raise DataError(f"{where} holds no images")
    if len(labels) != n:
        raise DataError(f"{where}: {n} images but {len(labels)} labels")
    if groups is not None:
        groups = _check_groups(groups, n, where)
    if split is not None:
        split = _check_split(split, n, where)
    return images, labels, groups, split, int(labels.max()) + 1


def _read_npz(file: Path):
    where = f"arrays file {file}"
    try:
        with np.load(file, allow_pickle=False) as npz:  # no pickles: a data file must not run code
            contents = {key: npz[key] for key in npz.files}
    except Exception as exc:  # noqa: BLE001 - zip/format/pickle errors all mean an unreadable file
        raise DataError(f"cannot read {where}: {type(exc).__name__}: {exc}") from None
    missing = [key for key in ("images", "labels") if key not in contents]
    if missing:
        raise DataError(f"{where} lacks key(s) {', '.join(missing)}; it has {', '.join(sorted(contents)) or 'none'} "
                        "(needed: images, labels; optional: groups, split)")
    images = _to_nchw(contents["images"], where)
    return images, contents["labels"], contents.get("groups"), contents.get("split")


def _read_parquet(file: Path, image_shape: tuple[int, ...] | None):
    where = f"arrays file {file}"
    if image_shape is None:
        raise DataError(f"{where}: dataset.image_shape [C, H, W] is required for Parquet (images are flattened)")
    shape = tuple(image_shape)
    if len(shape) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape):
        raise DataError(f"dataset.image_shape must be three positive integers [C, H, W], got {list(shape)}")
    try:
        table = pq.read_table(file)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise DataError(f"cannot read {where}: {type(exc).__name__}: {exc}") from None
    missing = [col for col in ("image", "label") if col not in table.column_names]
    if missing:
        raise DataError(f"{where} lacks column(s) {', '.join(missing)}; it has {', '.join(table.column_names)} "
                        "(needed: image, label; optional: group, split)")
    column = table.column("image").combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)):
        raise DataError(f"{where}: column image must be a list of numbers (a flattened image), got {column.type}")
    if column.null_count:
        raise DataError(f"{where}: column image has {column.null_count} null value(s)")
    size = int(np.prod(shape))
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and np.any(lengths != size):
        bad = int(np.flatnonzero(lengths != size)[0])
        raise DataError(f"{where}: row {bad} has an image of {lengths[bad]} values; image_shape {list(shape)} "
                        f"needs {size}")
    values = column.flatten()
    if values.null_count:
        raise DataError(f"{where}: column image holds null pixel values")
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise DataError(f"{where}: column image must hold numbers, got {values.type}")
    images = values.to_numpy(zero_copy_only=False).reshape((len(table),) + shape)

    def optional(name: str):
        if name not in table.column_names:
            return None
        col = table.column(name)
        if col.null_count:
            raise DataError(f"{where}: column {name} has {col.null_count} null value(s)")
        return col.to_numpy()

    labels = optional("label")
    return images, labels, optional("group"), optional("split")
