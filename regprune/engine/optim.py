"""Optimizer parameter groups and the device each rank trains on."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from ..errors import UserError

__all__ = ["build_param_groups", "resolve_device"]


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' means this rank's GPU when CUDA is present, else the CPU; explicit names are checked."""
    if spec in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} requested but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif dev.index >= torch.cuda.device_count():
            raise UserError(f"device {spec!r} does not exist ({torch.cuda.device_count()} GPUs visible)")
    return dev


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def build_param_groups(model: nn.Module, weight_decay: float, no_wd_bn_bias: bool = False,
                       no_wd_params: Iterable[nn.Parameter] = (),
                       extra_groups: Sequence[dict] | None = None) -> list[dict]:
    """SGD parameter groups: 'decay', 'no_decay' (norm params/biases when asked, plus `no_wd_params`), then extras."""
    extras = [dict(g) for g in (extra_groups or [])]
    taken: set[int] = set()
    for g in extras:
        if "params" not in g:
            raise ValueError("each extra parameter group needs a 'params' entry")
        g["params"] = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
        for p in g["params"]:
            if id(p) in taken:
                raise ValueError("a parameter appears in two extra parameter groups")
            taken.add(id(p))
    no_wd = {id(p) for p in no_wd_params}
    if no_wd_bn_bias:
        for m in model.modules():
            if isinstance(m, _NORM_TYPES):
                no_wd.update(id(p) for p in m.parameters(recurse=False))
        no_wd.update(id(p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias")
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicates shared parameters
        if p.requires_grad and id(p) not in taken:
            (no_decay if id(p) in no_wd else decay).append(p)
    groups: list[dict] = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay), "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    groups.extend(extras)
    if not groups:
        raise UserError("the model has no trainable parameters")
    return groups
