"""Building blocks shared by the dataset loaders: an in-memory image dataset and deterministic splits."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

__all__ = ["ArrayImageDataset", "LabelledSubset", "stratified_split", "limit_indices", "take_subset", "labels_of"]

Transform = Callable[[torch.Tensor], torch.Tensor]


class ArrayImageDataset(Dataset):
    """Images held in memory as an (N, C, H, W) tensor, yielding normalised float tensors and int labels."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        *,
        scale: float = 255.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: Transform | None = None,
    ) -> None:
        if images.dim() != 4 or images.shape[0] != targets.shape[0]:
            raise ValueError(f"images {tuple(images.shape)} and targets {tuple(targets.shape)} do not match")
        # Kept in their storage dtype (uint8 for real image data): four times smaller than float32,
        # and the conversion per sample is cheap next to the forward pass.
        self.images = images
        self.targets = targets.to(torch.int64)
        self.scale = float(scale)
        self.mean = mean
        self.std = std
        self.augment = augment
        channels = images.shape[1]
        self._mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(channels, 1, 1)
        self._std = None if std is None else torch.tensor(std, dtype=torch.float32).view(channels, 1, 1)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].to(torch.float32)
        if self.scale != 1.0:
            x = x / self.scale
        # Augment before normalising so that padding fills with true black (0), as the pixel data would.
        if self.augment is not None:
            x = self.augment(x)
        if self._mean is not None:
            x = (x - self._mean) / self._std
        return x, int(self.targets[index])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ArrayImageDataset":
        """A copy restricted to `indices`, sharing the transforms."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ArrayImageDataset(
            self.images[idx].clone(),
            self.targets[idx].clone(),
            scale=self.scale,
            mean=self.mean,
            std=self.std,
            augment=self.augment,
        )


class LabelledSubset(Subset):
    """A `Subset` that still exposes `targets`, so further subsetting stays stratified."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        super().__init__(dataset, list(indices))
        parent = labels_of(dataset)
        self.targets = None if parent is None else [int(parent[i]) for i in self.indices]


def labels_of(dataset: Dataset) -> np.ndarray | None:
    """The dataset's label array when it exposes one (`targets`), else None."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    if isinstance(targets, torch.Tensor):
        return targets.cpu().numpy().astype(np.int64)
    return np.asarray(targets, dtype=np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, test) with round(count * test_fraction) test samples per class, deterministically."""
    # A private Generator keeps the split independent of whatever global RNG state the caller has.
    rng = np.random.Generator(np.random.PCG64(seed))
    test_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_test = int(round(len(members) * test_fraction))
        test_parts.append(rng.permutation(members)[:n_test])
    test = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask), test


def limit_indices(labels: np.ndarray | None, length: int, limit: int) -> np.ndarray:
    """Indices of a deterministic `limit`-sized subset: class-proportional when labels are known, else the first N."""
    if limit >= length:
        return np.arange(length)
    if labels is None:
        return np.arange(limit)
    # Give the k-th member (in original order) of a class with n members the key (k + 0.5) / n and take
    # the smallest keys: every class contributes in proportion to its size, using its earliest samples.
    keys = np.empty(length, dtype=np.float64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        keys[members] = (np.arange(len(members)) + 0.5) / len(members)
    chosen = np.argsort(keys, kind="stable")[:limit]
    return np.sort(chosen)


def take_subset(dataset: Dataset, limit: int) -> Dataset:
    """`dataset` cut down to `limit` samples (see `limit_indices`); unchanged when it is already small enough."""
    length = len(dataset)  # type: ignore[arg-type]
    if limit >= length:
        return dataset
    indices = limit_indices(labels_of(dataset), length, limit)
    if isinstance(dataset, ArrayImageDataset):
        return dataset.subset(indices)
    restrict = getattr(dataset, "restrict", None)
    if callable(restrict):
        return restrict(indices)
    return LabelledSubset(dataset, indices.tolist())
