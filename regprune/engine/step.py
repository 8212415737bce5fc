"""The device work of one optimizer step: the batch on the device, forward and loss (under AMP on CUDA),
backward with the gradients unscaled for the hooks, and the optimizer step through the GradScaler."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import split_batch

__all__ = ["place_batch", "forward_backward", "optimizer_step"]


def place_batch(batch: Any, device: torch.device, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a loader's batch (an (inputs, targets, ...) sequence or an {"input", "target"} dict,
    see `data.split_batch`) on `device`; 4-d inputs (N, C, H, W) in channels-last memory format when
    `channels_last`. Other batch forms raise what indexing them raises (KeyError, IndexError, TypeError)."""
    x, y = split_batch(batch)
    if x.device != device:
        x = x.to(device, non_blocking=True)
    if y.device != device:
        y = y.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def forward_backward(forward_model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                     optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, amp: bool,
                     label_smoothing: float, add_extra_losses: Callable[[Any, torch.Tensor], torch.Tensor],
                     after_backward: Callable[[], None]) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Zero the gradients, compute the cross-entropy of `forward_model(x)` against `y` (float16 autocast on CUDA
    when `amp`), add `add_extra_losses(outputs, loss)`'s terms, back-propagate and call `after_backward()` once the
    gradients are final: under AMP they are unscaled first (`scaler.unscale_`; `optimizer_step` will not unscale
    them again).

    Returns (loss, top-1 hits, batch size): the detached 0-dim loss, the number of correct top-1 predictions (a
    0-dim tensor; None unless the outputs are (N, classes) logits and `y` holds N class indices) and N. Nothing is
    synchronised with the device."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext():
        outputs = forward_model(x)
        loss = F.cross_entropy(outputs, y, label_smoothing=label_smoothing)
    loss = add_extra_losses(outputs, loss)
    if amp:
        scaler.scale(loss).backward()
        # hooks must see true gradients, so unscale before them (scaler.step will not unscale twice)
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    after_backward()
    out_d = outputs.detach()
    correct = (out_d.argmax(1) == y).sum() if (y.dim() == 1 and out_d.dim() == 2) else None
    return loss.detach(), correct, int(y.shape[0])


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, amp: bool) -> None:
    """`optimizer.step()`; under AMP through `scaler` (skipped on inf/NaN gradients), whose scale is then updated."""
    if amp:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
