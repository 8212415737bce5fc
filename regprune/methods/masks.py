"""Holding pruned weights at zero: the fine-tuning hook of unstructured pruning."""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import PruneTarget

__all__ = ["MaskKeeper", "add_penalty_grad"]


def add_penalty_grad(p: nn.Parameter, lam: torch.Tensor) -> None:
    """Add `lam * p` to `p.grad` (the gradient of lambda/2 * ||p||^2), in place; `lam` broadcasts against `p`.

    Skips parameters that do not require grad; creates `p.grad` (in `p`'s dtype) when it is None."""
    if not p.requires_grad:
        return
    # lam * W, then one add: bit-for-bit the gradient of lambda/2 * ||W||^2 added to the loss's.
    pen = lam * p.detach()
    if p.grad is None:
        p.grad = pen.to(p.dtype)
    else:
        p.grad.add_(pen)


class MaskKeeper:
    """Holds masked weights at zero while fine-tuning the same (unstructured-pruned) model.

    Zeroing the gradients after backward keeps momentum buffers at zero too; zeroing the weights after
    each step is what guarantees the zeros, and works alone for loops that only call on_step_end.
    """

    def __init__(self, targets: list[PruneTarget], masks: dict[str, torch.Tensor]) -> None:
        by_name = {t.name: t for t in targets}
        unknown = [k for k in masks if k not in by_name]
        if unknown:
            raise ValueError(f"masks for unknown targets: {', '.join(unknown)}")
        self._pairs: list[tuple[str, nn.Parameter, torch.Tensor]] = []
        for name, m in masks.items():
            w = by_name[name].module.weight
            if tuple(m.shape) != tuple(w.shape):
                raise ValueError(f"{name}: mask shape {tuple(m.shape)} != weight shape {tuple(w.shape)}")
            self._pairs.append((name, w, m.to(device=w.device, dtype=torch.bool)))
        self.apply()

    def apply(self) -> None:
        """Zero the pruned weights now."""
        with torch.no_grad():
            for w, keep in self._placed():
                w.masked_fill_(~keep, 0.0)

    def after_backward(self, trainer: object = None) -> None:
        """Zero the gradients of pruned weights so optimizer state never accumulates for them."""
        for w, keep in self._placed():
            if w.grad is not None:
                w.grad.masked_fill_(~keep, 0.0)

    def _placed(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(weight, keep mask) pairs with each mask on its weight's current device (a trainer may have moved the
        model since the masks were made)."""
        for i, (name, w, keep) in enumerate(self._pairs):
            if keep.device != w.device:
                self._pairs[i] = (name, w, keep.to(w.device))
        return [(w, keep) for _, w, keep in self._pairs]

    def on_step_end(self, trainer: object = None) -> None:
        """Re-zero the pruned weights after the optimizer step."""
        self.apply()

    def sparsity(self) -> float:
        """Fraction of the masked layers' weights that are pruned."""
        total = sum(k.numel() for _, _, k in self._pairs)
        pruned = sum((~k).sum().item() for _, _, k in self._pairs)
        return pruned / total if total else 0.0

    def state_dict(self) -> dict:
        """The masks (on CPU)."""
        return {"masks": {name: keep.cpu().clone() for name, _, keep in self._pairs}}

    def load_state_dict(self, d: dict) -> None:
        """Replace the masks with saved ones and apply them."""
        self._pairs = [(n, w, d["masks"][n].to(device=w.device, dtype=torch.bool)) for n, w, _ in self._pairs]
        self.apply()
