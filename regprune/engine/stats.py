"""Running training loss and top-1 accuracy, summed lazily so the device syncs once per flush, not per step."""

from __future__ import annotations

import math
from typing import Any

import torch

from . import dist as D

__all__ = ["RunningStats"]


class RunningStats:
    """Per-step (loss, top-1 hits, batch size) kept on the device until `flush`, then summed per epoch and per
    log interval. Each sum is [loss x samples, top-1 hits, samples with a top-1, samples]."""

    def __init__(self) -> None:
        self.pending: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []
        self.epoch = [0.0, 0.0, 0, 0]
        self.interval = [0.0, 0.0, 0, 0]
        self.last_train: dict = {}

    def add(self, loss: torch.Tensor, correct: torch.Tensor | None, n: int) -> None:
        """Record one step: mean loss (0-dim tensor), top-1 hits (0-dim tensor, None if not a classifier), n."""
        self.pending.append((loss, correct, n))

    def flush(self, last_step: int, world_size: int = 1) -> tuple[int, float] | None:
        """Move pending steps (the last one is `last_step`) into the sums with one host transfer.

        With world_size > 1 the values are all-reduced (a collective: call on every rank), so a NaN on any rank
        shows on every rank and all stop at the same flush. Returns (step, value) of the first non-finite loss,
        whose step and later ones are not added, or None.
        """
        if not self.pending:
            return None
        pending, self.pending = self.pending, []
        k = len(pending)
        first_step = last_step - k + 1
        has_acc = all(p[1] is not None for p in pending)
        parts = [torch.stack([p[0] for p in pending]).double()]
        if has_acc:
            parts.append(torch.stack([p[1] for p in pending]).double())
        values = torch.cat(parts) if len(parts) > 1 else parts[0]
        ns = [float(p[2]) for p in pending]
        scale = 1
        if world_size > 1:
            counts = torch.tensor(ns + [1.0 if has_acc else 0.0], dtype=torch.float64, device=values.device)
            summed = D.all_reduce_sum(torch.cat([values, counts])).tolist()
            scale = world_size
            has_acc = summed[-1] == world_size
            values_l, ns = summed[:len(values)], summed[len(values):-1]
        else:
            values_l = values.tolist()
        loss_l = values_l[:k]
        corr_l = values_l[k:2 * k] if has_acc else [0.0] * k
        for i in range(k):
            if not math.isfinite(loss_l[i]):
                return first_step + i, loss_l[i]
            mean_loss = loss_l[i] / scale
            for acc in (self.epoch, self.interval):
                acc[0] += mean_loss * ns[i]
                acc[1] += corr_l[i]
                acc[2] += int(ns[i]) if has_acc else 0
                acc[3] += int(ns[i])
        return None

    @staticmethod
    def summarize(acc: list) -> dict:
        """{"loss": mean loss, "train_top1": top-1 in %} of one sum (None where no samples were seen)."""
        loss_sum, correct, n_known, n = acc
        out: dict[str, Any] = {"loss": loss_sum / n if n else None}
        out["train_top1"] = 100.0 * correct / n_known if n_known else None
        return out

    def state_dict(self) -> dict:
        """The sums and the last epoch's summary (pending steps must have been flushed)."""
        return {"epoch": list(self.epoch), "interval": list(self.interval), "last_train": dict(self.last_train)}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of state_dict; missing entries start empty. Drops pending steps."""
        self.epoch = list(state.get("epoch", [0.0, 0.0, 0, 0]))
        self.interval = list(state.get("interval", [0.0, 0.0, 0, 0]))
        self.last_train = dict(state.get("last_train", {}))
        self.pending.clear()
