"""Epoch order of the training loader: a function of (seed, epoch, rank) only, and resumable mid-epoch."""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

__all__ = ["prepare_epoch_order", "skipping_iterator", "split_batch"]


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) of a batch given as a (input, target, ...) sequence or a {"input", "target"} dict."""
    if isinstance(batch, dict):
        return batch["input"], batch["target"]
    return batch[0], batch[1]


class _SkipBatches:
    """Batch sampler yielding all but the first `skip` batches of `inner`, without loading the skipped data."""

    def __init__(self, inner: Iterable, skip: int) -> None:
        self.inner = inner
        self.skip = skip

    def __iter__(self) -> Iterator:
        it = iter(self.inner)
        for _ in range(self.skip):
            if next(it, None) is None:
                return
        yield from it

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(rank) * 104_729) % (2**63 - 1)


def prepare_epoch_order(loader: Any, seed: int, epoch: int, rank: int) -> None:
    """Make the loader's order (and worker seeds) a function of (seed, epoch, rank) only."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if not isinstance(loader, DataLoader):
        return
    s = _epoch_seed(seed, epoch, rank)
    if loader.generator is None:
        # without a generator the order would come from the global RNG, whose state at the epoch start a
        # mid-epoch checkpoint does not hold; give the loader (and its shuffling sampler) one we control
        loader.generator = torch.Generator()
        if isinstance(sampler, RandomSampler) and sampler.generator is None:
            sampler.generator = loader.generator
    loader.generator.manual_seed(s)
    own = getattr(sampler, "generator", None) if isinstance(sampler, RandomSampler) else None
    if own is not None and own is not loader.generator:
        own.manual_seed(s ^ 0x5DEECE66D)


def skipping_iterator(loader: Any, skip: int) -> Iterator:
    """Iterator over `loader` starting at batch `skip` of the current epoch order."""
    if skip <= 0:
        return iter(loader)
    if (type(loader) is DataLoader and loader.batch_sampler is not None
            and not isinstance(loader.dataset, IterableDataset)):
        # same sampler objects and generator, so the order is identical; skipped batches are never loaded
        kwargs: dict[str, Any] = dict(batch_sampler=_SkipBatches(loader.batch_sampler, skip),
                                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                      pin_memory=loader.pin_memory, timeout=loader.timeout,
                                      worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                                      in_order=getattr(loader, "in_order", True))
        if loader.num_workers > 0:
            kwargs.update(multiprocessing_context=loader.multiprocessing_context,
                          prefetch_factor=loader.prefetch_factor)
        return iter(DataLoader(loader.dataset, **kwargs))
    return itertools.islice(iter(loader), skip, None)
