"""Tests for qdefend.data: real Fashion-MNIST, CIFAR-format and image folders written here, splits, batches."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from qdefend import data as qd
from qdefend.data import DATASETS, DataConfig, Normalization, Split, batches, load_dataset, read_idx, split_indices
from qdefend.errors import QdefendError

FMNIST = Path(qd.FASHION_MNIST_DIR)
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(), reason="sudo apt-get install dataset-fashion-mnist"
)


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset(DataConfig())


# ------------------------------------------------------------------------------------------ Fashion-MNIST


@needs_fmnist
def test_fashion_mnist_sizes_pixels_labels(fmnist):
    d = fmnist
    assert (len(d.train), len(d.val), len(d.aux), len(d.test)) == (50000, 5000, 5000, 10000)
    assert d.shape == (1, 28, 28) and d.num_classes == 10 and d.class_names[9] == "Ankle boot"
    for s in (d.train, d.val, d.aux, d.test):
        assert s.images.dtype == np.uint8 and s.images.shape[1:] == (1, 28, 28) and s.labels.dtype == np.int64
        assert s.images.min() == 0 and s.images.max() == 255
        assert s.labels.min() == 0 and s.labels.max() == 9
    assert np.array_equal(np.bincount(d.test.labels), np.full(10, 1000))  # the official test set, whole
    assert d.describe()["sizes"] == {"train": 50000, "val": 5000, "aux": 5000, "test": 10000}
    x = d.val.floats(np.arange(7))
    assert x.dtype == np.float32 and x.shape == (7, 1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0


@needs_fmnist
def test_splits_are_disjoint_and_index_the_official_train_set(fmnist):
    d = fmnist
    sets = [set(s.indices.tolist()) for s in (d.train, d.val, d.aux)]
    assert sum(map(len, sets)) == 60000 and len(set.union(*sets)) == 60000  # disjoint and complete
    raw = read_idx(FMNIST / "train-images-idx3-ubyte.gz")
    labels = read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    for s in (d.train, d.val, d.aux):
        assert np.array_equal(s.images[:, 0], raw[s.indices]) and np.array_equal(s.labels, labels[s.indices])


@needs_fmnist
def test_normalization_is_train_mean_std(fmnist):
    d = fmnist
    x = d.train.images / 255.0  # float64, exact
    assert d.normalization.mean[0] == pytest.approx(x.mean(), abs=1e-9)
    assert d.normalization.std[0] == pytest.approx(x.std(), abs=1e-9)
    assert d.normalization.mean[0] == pytest.approx(0.2860, abs=0.002)  # the known Fashion-MNIST figures
    assert d.normalization.std[0] == pytest.approx(0.3530, abs=0.002)
    assert d.describe()["normalization"] == d.normalization.to_dict()


@needs_fmnist
def test_limit_train_and_seed(fmnist):
    d = fmnist
    small = load_dataset(DataConfig(limit_train=1000, seed=0))
    assert len(small.train) == 1000 and np.array_equal(small.train.indices, d.train.indices[:1000])
    assert np.array_equal(small.val.indices, d.val.indices)  # limit_train never moves val/aux
    other = load_dataset(DataConfig(limit_train=1000, seed=1))
    assert not np.array_equal(other.val.indices, d.val.indices)


def test_split_indices_deterministic_and_disjoint():
    a, b, c = (split_indices(1000, 100, 50, seed) for seed in (3, 3, 4))
    for k in ("train", "val", "aux"):
        assert np.array_equal(a[k], b[k])
        assert not np.array_equal(a[k], c[k])
    assert (len(a["val"]), len(a["aux"]), len(a["train"])) == (100, 50, 850)
    assert np.array_equal(np.sort(np.concatenate([a["train"], a["val"], a["aux"]])), np.arange(1000))
    assert np.array_equal(split_indices(1000, 100, 50, 3, limit_train=10)["train"], a["train"][:10])


# ------------------------------------------------------------------------------------------ Normalization


def test_normalization_round_trip_numpy_and_torch():
    torch = pytest.importorskip("torch")
    n = Normalization((0.5, 0.25, 0.125), (0.5, 0.2, 0.1))
    x = np.random.default_rng(0).random((4, 3, 5, 6), dtype=np.float32)
    y = n.apply(x)
    assert y.dtype == np.float32
    assert y[1, 2, 3, 4] == pytest.approx((x[1, 2, 3, 4] - 0.125) / 0.1, rel=1e-6)
    np.testing.assert_allclose(n.invert(y), x, atol=1e-6)
    np.testing.assert_allclose(n.apply(x[0]), y[0], atol=1e-7)  # a single C x H x W image
    t = torch.from_numpy(x).double()
    yt = n.apply(t)
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float64
    np.testing.assert_allclose(yt.numpy(), y, atol=1e-5)
    torch.testing.assert_close(n.invert(yt), t)
    assert Normalization.from_dict(n.to_dict()) == n
    with pytest.raises(ValueError):
        n.apply(np.zeros((2, 1, 4, 4), np.float32))  # wrong channel count
    with pytest.raises(TypeError):
        n.apply(np.zeros((2, 3, 4, 4), np.uint8))


# ------------------------------------------------------------------------------------------ CIFAR formats


def _cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.fixture
def cifar10_dir(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        _dump(d / f"data_batch_{i}", {b"batch_label": b"x", b"data": _cifar_rows(6, i), b"labels": [i % 10] * 6})
    _dump(d / "test_batch", {b"data": _cifar_rows(4, 9), b"labels": [0, 1, 2, 3]})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(d / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 6})
    return d


def test_cifar10_folder_shapes_and_pixel_order(cifar10_dir):
    for where in (cifar10_dir, cifar10_dir.parent):  # the folder itself or its parent
        d = load_dataset(DataConfig(name="cifar10", data_dir=str(where), val_size=5, aux_size=5))
        assert d.shape == (3, 32, 32) and d.num_classes == 10 and d.class_names[1] == "automobile"
        assert (len(d.train), len(d.val), len(d.aux), len(d.test)) == (20, 5, 5, 4)
    rows = _cifar_rows(4, 9)
    # row = 1024 red values, then green, then blue, each plane row-major 32 x 32
    assert d.test.images[2, 1, 3, 4] == rows[2, 1024 + 3 * 32 + 4]
    assert d.test.images[3, 2, 31, 0] == rows[3, 2048 + 31 * 32]
    assert np.array_equal(d.test.images.reshape(4, -1), rows) and d.test.labels.tolist() == [0, 1, 2, 3]
    train_rows = np.concatenate([_cifar_rows(6, i) for i in range(1, 6)])
    assert np.array_equal(d.aux.images.reshape(5, -1), train_rows[d.aux.indices])
    assert d.aux.labels.tolist() == [(int(i) // 6 + 1) % 10 for i in d.aux.indices]


def test_cifar100_folder(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    _dump(d / "train", {b"data": _cifar_rows(30, 1), b"fine_labels": list(range(30)), b"coarse_labels": [0] * 30})
    _dump(d / "test", {b"data": _cifar_rows(8, 2), b"fine_labels": [99] * 8, b"coarse_labels": [1] * 8})
    _dump(d / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": [b"a"] * 20})
    ds = load_dataset(DataConfig(name="cifar100", data_dir=str(tmp_path), val_size=3, aux_size=2))
    assert ds.num_classes == 100 and ds.class_names[99] == "c99" and ds.shape == (3, 32, 32)
    assert (len(ds.train), len(ds.test)) == (25, 8) and ds.test.labels.tolist() == [99] * 8
    assert np.array_equal(ds.test.images[5, 0].ravel(), _cifar_rows(8, 2)[5, :1024])
    assert np.array_equal(ds.train.labels, ds.train.indices)  # fine labels, not coarse


def test_cifar_missing_says_where_to_get_it(tmp_path):
    with pytest.raises(QdefendError, match=r"cifar-10-batches-py.*cs\.toronto\.edu/~kriz/cifar\.html"):
        load_dataset(DataConfig(name="cifar10", data_dir=str(tmp_path)))
    with pytest.raises(QdefendError, match=r"cifar-100-python\.tar\.gz"):
        load_dataset(DataConfig(name="cifar100"))


def test_cifar_corrupt_pickle_names_file(cifar10_dir):
    (cifar10_dir / "data_batch_3").write_bytes(b"\x80\x02}q\x00(")
    with pytest.raises(QdefendError, match="data_batch_3"):
        load_dataset(DataConfig(name="cifar10", data_dir=str(cifar10_dir), val_size=1, aux_size=1))


# ------------------------------------------------------------------------------------------ image folder


def _write_images(root: Path, classes: dict[str, int], mode: str, size: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, n in classes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i:03d}.png")


def test_imagefolder_rgb_with_test_folder(tmp_path):
    pytest.importorskip("PIL")
    _write_images(tmp_path / "train", {"cat": 6, "dog": 5}, "RGB", 8)
    _write_images(tmp_path / "test", {"cat": 2, "dog": 2}, "RGB", 8, seed=1)
    d = load_dataset(DataConfig(name="imagefolder", data_dir=str(tmp_path), val_size=2, aux_size=1))
    assert d.class_names == ["cat", "dog"] and d.shape == (3, 8, 8)
    assert (len(d.train), len(d.val), len(d.aux), len(d.test)) == (8, 2, 1, 4)
    from PIL import Image

    px = np.asarray(Image.open(tmp_path / "test" / "dog" / "001.png"))
    assert np.array_equal(d.test.images[3], px.transpose(2, 0, 1)) and d.test.labels.tolist() == [0, 0, 1, 1]


def test_imagefolder_grey_holdout_and_resize(tmp_path):
    pytest.importorskip("PIL")
    _write_images(tmp_path / "train", {"a": 12, "b": 6}, "L", 10)
    d = load_dataset(DataConfig(name="imagefolder", data_dir=str(tmp_path), val_size=1, aux_size=1, image_size=6))
    assert d.shape == (1, 6, 6) and len(d.test) == 3 and d.test.labels.tolist() == [0, 0, 1]  # every 6th
    assert len(d.train) + len(d.val) + len(d.aux) == 15
    _write_images(tmp_path / "train" / "c", {"big": 1}, "L", 12)  # a 12x12 image among 10x10 ones
    with pytest.raises(QdefendError, match=r"12x12 .* 10x10.*data\.image_size"):
        load_dataset(DataConfig(name="imagefolder", data_dir=str(tmp_path), val_size=1, aux_size=1))


# ------------------------------------------------------------------------------------------ IDX and errors


def _write_idx(path: Path, a: np.ndarray) -> None:
    raw = struct.pack(">BBBB", 0, 0, 8, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (40, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(40) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (10, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(10))
    return tmp_path


def test_mnist_idx_plain_and_gzipped(mnist_dir):
    d = load_dataset(DataConfig(name="mnist", data_dir=str(mnist_dir), val_size=4, aux_size=6))
    assert (len(d.train), len(d.val), len(d.aux), len(d.test)) == (30, 4, 6, 10) and d.shape == (1, 28, 28)
    assert d.test.labels.tolist() == list(range(10)) and d.class_names[3] == "3"
    with pytest.raises(QdefendError, match="--data-dir"):
        load_dataset(DataConfig(name="mnist"))


def test_truncated_and_bad_idx_name_the_file(mnist_dir):
    f = mnist_dir / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(QdefendError, match=r"train-images-idx3-ubyte is truncated"):
        load_dataset(DataConfig(name="mnist", data_dir=str(mnist_dir), val_size=1, aux_size=1))
    g = mnist_dir / "t10k-labels-idx1-ubyte.gz"
    g.write_bytes(g.read_bytes()[:-8])
    with pytest.raises(QdefendError, match=r"t10k-labels-idx1-ubyte\.gz is a truncated or corrupt gzip"):
        read_idx(g)
    f.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(QdefendError, match=r"train-images-idx3-ubyte is not an IDX file \(bad magic"):
        read_idx(f)


def test_missing_fashion_mnist_messages(tmp_path, monkeypatch):
    monkeypatch.setattr(qd, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(QdefendError) as e:
        load_dataset(DataConfig())
    msg = str(e.value)
    assert msg == (
        f"Fashion-MNIST not found at {tmp_path / 'absent'}: install it with "
        "`sudo apt-get install dataset-fashion-mnist` or pass --data-dir DIR holding the IDX files"
    )
    assert "\n" not in msg
    with pytest.raises(QdefendError, match=r"not found at .*nope.*train-images-idx3-ubyte\[\.gz\].*--data-dir"):
        load_dataset(DataConfig(data_dir=str(tmp_path / "nope")))


def test_val_plus_aux_too_large_says_the_max(mnist_dir):
    with pytest.raises(QdefendError, match=r"at most 39\b"):
        load_dataset(DataConfig(name="mnist", data_dir=str(mnist_dir), val_size=20, aux_size=20))


def test_config_validation_lists_names_and_fixes():
    with pytest.raises(QdefendError, match=r"unknown dataset 'cifar'.*cifar10, cifar100, fashion-mnist, imagefolder, mnist"):
        DataConfig(name="cifar")
    assert DATASETS.names() == ["cifar10", "cifar100", "fashion-mnist", "imagefolder", "mnist"]
    with pytest.raises(QdefendError, match=r"--set data\.val_size=0"):
        DataConfig(val_size=-1)
    with pytest.raises(QdefendError, match="only to the imagefolder"):
        DataConfig(image_size=32)
    with pytest.raises(QdefendError, match="limit_train"):
        DataConfig(limit_train=0)


# ------------------------------------------------------------------------------------------ batches


def test_batches_cover_every_sample_once_and_are_deterministic():
    rng = np.random.default_rng(0)
    s = Split(rng.integers(0, 256, (103, 1, 2, 2), dtype=np.uint8), np.arange(103))
    out = list(batches(s, 10, shuffle=True, seed=5, epoch=0))
    assert [len(y) for _, y in out] == [10] * 10 + [3]
    x0, y0 = out[0]
    assert x0.dtype == np.float32 and x0.shape == (10, 1, 2, 2) and y0.dtype == np.int64
    seen = np.concatenate([y for _, y in out])
    assert np.array_equal(np.sort(seen), np.arange(103)) and not np.array_equal(seen, np.arange(103))
    np.testing.assert_array_equal(x0, s.images[y0] / np.float32(255))  # images stay with their labels
    again = np.concatenate([y for _, y in batches(s, 10, shuffle=True, seed=5, epoch=0)])
    epoch1 = np.concatenate([y for _, y in batches(s, 10, shuffle=True, seed=5, epoch=1)])
    assert np.array_equal(seen, again) and not np.array_equal(seen, epoch1)
    dropped = list(batches(s, 10, shuffle=True, seed=5, drop_last=True))
    assert len(dropped) == 10 and all(len(y) == 10 for _, y in dropped)
    ordered = np.concatenate([y for _, y in batches(s, 32, shuffle=False)])
    assert np.array_equal(ordered, np.arange(103))
