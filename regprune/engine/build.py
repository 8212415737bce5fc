"""The parts a `Trainer` is built from: its phase name, the model on its device (wrapped in DDP across ranks),
the SGD optimizer with its parameter groups, and the number of optimizer steps per epoch."""

from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn as nn

from ..errors import UserError
from .config import TrainConfig
from .optim import build_param_groups

__all__ = ["check_phase", "place_model", "build_optimizer", "steps_per_epoch"]


def check_phase(phase: str) -> str:
    """`phase` as given once checked to be letters, digits, '_', '-' or '.' (it names checkpoint files); UserError
    otherwise."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", phase or ""):
        raise UserError(f"phase name {phase!r} must be letters, digits, '_', '-' or '.' (it names files)")
    return phase


def place_model(model: nn.Module, device: torch.device, channels_last: bool, world_size: int) -> nn.Module:
    """Move `model` to `device` in place (channels-last memory format when asked) and return the module to run the
    forward pass through: `model` itself, or with `world_size > 1` a DistributedDataParallel wrapper around it
    (its gradient all-reduce; the process group must be initialised)."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # hooks work on the model itself; the wrapper is only used for the forward pass (gradient all-reduce)
        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    return model


def build_optimizer(model: nn.Module, config: TrainConfig, no_wd_params: Iterable[nn.Parameter] = (),
                    extra_param_groups: list[dict] | None = None) -> torch.optim.SGD:
    """SGD over `model`'s trainable parameters with `config`'s lr, momentum, Nesterov flag and weight decay, in the
    groups of `optim.build_param_groups` ("decay", "no_decay" with `no_wd_params`, then `extra_param_groups`).

    Raises ValueError for malformed extra groups (one without "params", a parameter in two of them), UserError
    when the model has no trainable parameters or SGD refuses the groups or options."""
    groups = build_param_groups(model, config.weight_decay, config.no_wd_bn_bias, no_wd_params, extra_param_groups)
    try:
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay)
    except ValueError as e:
        raise UserError(f"cannot build the optimizer: {e}") from None


def steps_per_epoch(train_loader: Iterable) -> int:
    """`len(train_loader)`, the optimizer steps of one epoch. Raises UserError when the loader has no length or
    yields no batches."""
    try:
        n = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        raise UserError("the training loader must have a length (batches per epoch)") from None
    if n == 0:
        raise UserError("the training set yields no batches (is it smaller than one batch with drop_last?)")
    return n
