"""Datasets by spec string (`name` or `name:PATH`) and the data loaders built on them."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..errors import UserError
from .base import take_subset
from .cifar import load_cifar
from .folder import load_imagefolder
from .mnist import FASHION_MNIST_DEFAULT_PATH, load_digits, load_fashion_mnist, load_mnist5k

__all__ = ["DataBundle", "load_data", "list_datasets", "make_loaders", "DEFAULT_DATASET"]

DEFAULT_DATASET = "mnist5k"


@dataclass
class DataBundle:
    """A train/test pair of datasets plus the facts a model needs to be built for them."""

    name: str  # canonical spec, e.g. "mnist5k", "cifar10:/abs/path"
    train: Dataset  # with training augmentation (unless loaded with augment=False)
    test: Dataset  # eval transforms only
    num_classes: int
    in_channels: int
    image_size: int  # side of the square tensors the datasets yield


# A loader takes (path or None, augment) and returns (train, test, num_classes, in_channels, image_size).
Loader = Callable[[str | None, bool], tuple]


@dataclass(frozen=True)
class _Spec:
    form: str  # how the spec is written, for help text
    path: str  # "none", "optional" or "required"
    loader: Loader
    default_path: str | None = None


_SPECS: dict[str, _Spec] = {
    "mnist5k": _Spec("mnist5k", "none", lambda _p, aug: load_mnist5k(aug)),
    "digits": _Spec("digits", "none", lambda _p, aug: load_digits(aug)),
    "fashion-mnist": _Spec(
        "fashion-mnist[:PATH]", "optional", lambda p, aug: load_fashion_mnist(p, aug), FASHION_MNIST_DEFAULT_PATH
    ),
    "cifar10": _Spec("cifar10:PATH", "required", lambda p, aug: load_cifar("cifar10", p, aug)),
    "cifar100": _Spec("cifar100:PATH", "required", lambda p, aug: load_cifar("cifar100", p, aug)),
    "imagefolder": _Spec("imagefolder:PATH", "required", lambda p, aug: load_imagefolder(p, aug)),
}


def list_datasets() -> list[str]:
    """The accepted dataset spec forms, e.g. "cifar10:PATH", for help text."""
    return [spec.form for spec in _SPECS.values()]


def _parse_spec(spec: str) -> tuple[str, _Spec, str | None]:
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"empty dataset spec; expected one of {', '.join(list_datasets())}")
    name, sep, path = spec.strip().partition(":")
    name = name.strip().lower()
    entry = _SPECS.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, list(_SPECS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown dataset {name!r}{hint}; known: {', '.join(list_datasets())}")
    path = path.strip() if sep else ""
    if entry.path == "none" and path:
        raise UserError(f"dataset {name} takes no path (got {spec!r}); write it as {entry.form}")
    if entry.path == "required" and not path:
        raise UserError(f"dataset {name} needs a folder; write it as {entry.form}")
    if not path:
        return name, entry, entry.default_path
    return name, entry, os.path.abspath(os.path.expanduser(path))


def _check_limit(label: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{label} must be a positive integer, got {value!r}")


def load_data(spec: str, *, limit_train: int | None = None, limit_test: int | None = None, augment: bool = True) -> DataBundle:
    """Load the dataset named by `spec` ("name" or "name:PATH"), optionally cut to deterministic subsets."""
    _check_limit("limit_train", limit_train)
    _check_limit("limit_test", limit_test)
    name, entry, path = _parse_spec(spec)
    train, test, num_classes, in_channels, image_size = entry.loader(path, augment)
    if limit_train is not None:
        train = take_subset(train, limit_train)
    if limit_test is not None:
        test = take_subset(test, limit_test)
    # Only an explicitly chosen folder belongs in the canonical name; the default needs no mention.
    canonical = name if path is None or path == entry.default_path else f"{name}:{path}"
    return DataBundle(canonical, train, test, num_classes, in_channels, image_size)


def make_loaders(
    bundle: DataBundle, batch_size: int, *, workers: int = 0, distributed: bool = False, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Train (shuffled, seeded) and test (in order) DataLoaders; with `distributed`, the caller calls `set_epoch`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UserError(f"workers must be a non-negative integer, got {workers!r}")
    common = dict(
        batch_size=batch_size,
        num_workers=workers,
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
        # Re-forking workers every epoch costs seconds per epoch on large datasets.
        persistent_workers=workers > 0,
    )
    generator = torch.Generator()
    if distributed:
        train_sampler = DistributedSampler(bundle.train, shuffle=True, seed=seed, drop_last=False)
        test_sampler = DistributedSampler(bundle.test, shuffle=False, drop_last=False)
        # The generator only seeds workers' augmentation here; offset by rank so ranks draw different crops.
        generator.manual_seed(seed + train_sampler.rank)
        train = DataLoader(bundle.train, sampler=train_sampler, generator=generator, **common)
        test = DataLoader(bundle.test, sampler=test_sampler, **common)
    else:
        generator.manual_seed(seed)
        train = DataLoader(bundle.train, shuffle=True, generator=generator, **common)
        test = DataLoader(bundle.test, shuffle=False, **common)
    return train, test
