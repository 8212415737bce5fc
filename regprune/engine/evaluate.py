"""Accuracy and loss of a model on a loader, all-reduced over ranks under DDP."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler

from . import dist as D
from .data import split_batch

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str | None = None, *, amp: bool = False,
             channels_last: bool = False, distributed: bool | None = None) -> dict:
    """Top-1/top-5 accuracy (%), mean cross-entropy and sample count of `model` on `loader`.

    top5 is present only for >= 5 classes. Under DDP with a DistributedSampler the sums are all-reduced so
    every rank returns the same numbers (`distributed=None` decides that automatically).
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if distributed is None:
        distributed = D.is_distributed() and isinstance(getattr(loader, "sampler", None), DistributedSampler)
    use_amp = amp and device.type == "cuda"
    was_training = model.training
    model.eval()
    # accumulate on the device: one sync at the end instead of one per batch
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1 hits, top5 hits, n
    num_classes = 0
    try:
        for batch in loader:
            x, y = split_batch(batch)
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext():
                out = model(x)
            out = out.float()
            num_classes = out.shape[1]
            k = min(5, num_classes)
            hits = out.topk(k, dim=1).indices == y[:, None]
            sums[0] += F.cross_entropy(out, y, reduction="sum").double()
            sums[1] += hits[:, 0].sum()
            sums[2] += hits.any(dim=1).sum()
            sums[3] += y.shape[0]
    finally:
        model.train(was_training)
    if distributed:
        sums = D.all_reduce_sum(sums)
        # a rank with an empty shard saw no logits; take the class count from the others
        classes = torch.tensor([float(num_classes)], device=device)
        torch.distributed.all_reduce(classes, op=torch.distributed.ReduceOp.MAX)
        num_classes = int(classes.item())
    loss_sum, top1, top5, n = sums.tolist()
    n = int(n)
    if n == 0:
        return {"top1": 0.0, "loss": 0.0, "n": 0}
    result = {"top1": 100.0 * top1 / n}
    if num_classes >= 5:
        result["top5"] = 100.0 * top5 / n
    result["loss"] = loss_sum / n
    result["n"] = n
    return result
