"""CIFAR-10 / CIFAR-100 from the official python-pickle folders, read through a locked-down unpickler."""

from __future__ import annotations

import io
import os
import codecs
import pickle
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T

from ..errors import UserError
from .base import ArrayImageDataset

__all__ = ["load_cifar", "SafeUnpickler", "safe_load_pickle", "CIFAR_LAYOUT"]


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


# The complete vocabulary of globals in a genuine CIFAR pickle: the three names numpy uses to rebuild an
# array. The files predate numpy 2, which renamed numpy.core to numpy._core, so both spellings appear.
# Anything else (os.system, builtins.eval, ...) can only come from a tampered file.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Python 3 writes bytes under protocol 2 through _codecs.encode: pure text-to-bytes, no side effects
    ("_codecs", "encode"): codecs.encode,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild dicts, lists, bytes, numbers and numpy arrays, and refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        # Return objects from the allow-list instead of importing: nothing outside it is ever imported,
        # and dotted names ("ndarray.tofile") cannot reach attributes of allowed objects.
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def safe_load_pickle(path: str) -> Any:
    """Unpickle `path` with `SafeUnpickler` (bytes keys, as the Python 2 originals need); UserError on any failure."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refused global"):
            raise UserError(
                f"{path}: {exc}, which a genuine CIFAR file never contains; "
                "not loading it (expected an official CIFAR python batch)"
            ) from None
        raise UserError(f"{path}: not a valid pickle ({exc}); expected an official CIFAR python batch") from None
    except EOFError:
        raise UserError(f"{path}: truncated pickle (ended early); expected an official CIFAR python batch") from None
    # A damaged stream can fail in many ways inside pickle or numpy; all mean the same to the user.
    except Exception as exc:  # noqa: BLE001
        raise UserError(
            f"{path}: corrupt pickle ({type(exc).__name__}: {exc}); expected an official CIFAR python batch"
        ) from None


CIFAR_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": b"labels",
        "names_key": b"label_names",
        "classes": 10,
        # Per-channel statistics of the CIFAR-10 training set.
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": b"fine_labels",
        "names_key": b"fine_label_names",
        "classes": 100,
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}


def _expected_files(layout: dict) -> list[str]:
    return [*layout["train"], *layout["test"], layout["meta"]]


def _resolve_folder(kind: str, path: str) -> str:
    layout = CIFAR_LAYOUT[kind]
    expected = _expected_files(layout)
    if not os.path.isdir(path):
        raise UserError(
            f"{kind}: folder {path} not found; "
            f"expected the {layout['folder']}/ folder (or its parent) holding {', '.join(expected)}"
        )
    # Accept both the extracted folder itself and the directory the archive was extracted into.
    nested = os.path.join(path, layout["folder"])
    folder = nested if os.path.isdir(nested) else path
    missing = [name for name in expected if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise UserError(f"{kind}: {folder} lacks {', '.join(missing)}; expected {layout['folder']}/ with {', '.join(expected)}")
    return folder


def _read_batch(path: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    entry = safe_load_pickle(path)
    if not isinstance(entry, dict) or b"data" not in entry or label_key not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise UserError(
            f"{path}: holds {keys}; expected a dict with b'data' and {label_key!r}, as in the official CIFAR batches"
        )
    data, labels = entry[b"data"], entry[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise UserError(f"{path}: b'data' is {dtype} {shape}; expected a uint8 array of shape (N, 3072)")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: {label_key!r} is not a list of integers") from None
    if labels.shape != (data.shape[0],):
        raise UserError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}; expected one label per image")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{path}: labels span {labels.min()}..{labels.max()}; expected 0..{num_classes - 1}")
    return data, labels


def _load_split(folder: str, files: list[str], label_key: bytes, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_batch(os.path.join(folder, name), label_key, num_classes) for name in files]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    # Rows store the 1024 red, then green, then blue values: exactly C x H x W order.
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar(kind: str, path: str, augment: bool = True) -> tuple[ArrayImageDataset, ArrayImageDataset, int, int, int]:
    """CIFAR-10 (`kind="cifar10"`) or CIFAR-100 (`"cifar100"`) from the official python folder at `path`."""
    layout = CIFAR_LAYOUT[kind]
    folder = _resolve_folder(kind, path)
    num_classes = layout["classes"]

    meta_path = os.path.join(folder, layout["meta"])
    meta = safe_load_pickle(meta_path)
    names = meta.get(layout["names_key"]) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != num_classes:
        raise UserError(f"{meta_path}: expected a dict whose {layout['names_key']!r} lists {num_classes} class names")

    x_train, y_train = _load_split(folder, layout["train"], layout["label_key"], num_classes)
    x_test, y_test = _load_split(folder, layout["test"], layout["label_key"], num_classes)
    aug = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]) if augment else None
    train = ArrayImageDataset(x_train, y_train, mean=layout["mean"], std=layout["std"], augment=aug)
    test = ArrayImageDataset(x_test, y_test, mean=layout["mean"], std=layout["std"])
    return train, test, num_classes, 3, 32
