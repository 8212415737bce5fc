"""ImageNet-style folders: PATH/train/<class>/* and PATH/val/<class>/*, read with torchvision's ImageFolder."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision import datasets
from torchvision import transforms as T

from ..errors import UserError

__all__ = ["load_imagefolder", "RestrictableImageFolder", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUT = "PATH/train/<class>/*.jpg and PATH/val/<class>/* with the same class folders"


def _load_rgb(path: str) -> Image.Image:
    # Images are decoded lazily, inside loader workers; name the bad file instead of a bare PIL error.
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from None


class RestrictableImageFolder(datasets.ImageFolder):
    """ImageFolder that can be cut down to a subset while keeping `targets` and `classes`."""

    def restrict(self, indices: Sequence[int] | np.ndarray) -> "RestrictableImageFolder":
        """Keep only the samples at `indices` (in place) and return self."""
        self.samples = [self.samples[int(i)] for i in indices]
        self.imgs = self.samples
        self.targets = [target for _, target in self.samples]
        return self


def _open_split(root: str, split: str, transform: T.Compose) -> RestrictableImageFolder:
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UserError(f"imagefolder: {root} has no {split}/ folder; expected {LAYOUT}")
    with os.scandir(folder) as entries:
        has_classes = any(entry.is_dir() for entry in entries)
    if not has_classes:
        raise UserError(f"imagefolder: {folder} has no class folders; expected {LAYOUT}")
    # allow_empty lets us report every empty class at once rather than torchvision's first-failure message.
    dataset = RestrictableImageFolder(folder, transform=transform, loader=_load_rgb, allow_empty=True)
    counts = np.bincount(np.asarray(dataset.targets, dtype=np.int64), minlength=len(dataset.classes))
    empty = [name for name, count in zip(dataset.classes, counts) if count == 0]
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise UserError(f"imagefolder: class folders without images in {folder}: {shown}; expected {LAYOUT}")
    return dataset


def load_imagefolder(path: str, augment: bool = True) -> tuple[RestrictableImageFolder, RestrictableImageFolder, int, int, int]:
    """Train/val ImageFolder datasets at 224x224 with the usual ImageNet transforms."""
    if not os.path.isdir(path):
        raise UserError(f"imagefolder: folder {path} not found; expected {LAYOUT}")
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize]) if augment else eval_tf
    train = _open_split(path, "train", train_tf)
    val = _open_split(path, "val", eval_tf)
    if val.classes != train.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UserError(
            f"imagefolder: train/ and val/ class folders differ "
            f"(only in train: {only_train[:5]}, only in val: {only_val[:5]}); expected {LAYOUT}"
        )
    return train, val, len(train.classes), 3, 224
