"""Learning-rate schedules as plain functions of the (fractional) epoch, applied through torch's LambdaLR."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import UserError

__all__ = ["LRSchedule", "parse_lr_schedule", "SCHEDULE_FORMS", "StepLambda", "build_lr_scheduler"]

SCHEDULE_FORMS = "'constant', 'cosine', or per-epoch absolute rates like '0:0.1,100:0.01,150:0.001'"


class LRSchedule:
    """A callable `schedule(epoch_float) -> lr`; `kind` is 'constant', 'step' or 'cosine'."""

    def __init__(self, kind: str, fn: Callable[[float], float], text: str) -> None:
        self.kind = kind
        self._fn = fn
        self._text = text

    def __call__(self, epoch: float) -> float:
        return self._fn(epoch)

    def __repr__(self) -> str:
        return f"LRSchedule({self._text})"


def _number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"lr schedule {spec!r}: {what} {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise UserError(f"lr schedule {spec!r}: {what} {text.strip()!r} is not finite")
    return value


def _parse_steps(spec: str) -> list[tuple[float, float]]:
    points: list[tuple[float, float]] = []
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            raise UserError(f"lr schedule {spec!r}: empty entry (expected EPOCH:LR pairs separated by commas)")
        if entry.count(":") != 1:
            raise UserError(f"lr schedule {spec!r}: entry {entry!r} is not EPOCH:LR")
        e_text, lr_text = entry.split(":")
        epoch = _number(e_text, "epoch", spec)
        lr = _number(lr_text, "learning rate", spec)
        if epoch < 0:
            raise UserError(f"lr schedule {spec!r}: negative epoch {e_text.strip()}")
        if lr < 0:
            raise UserError(f"lr schedule {spec!r}: negative learning rate {lr_text.strip()}")
        if points and epoch <= points[-1][0]:
            raise UserError(f"lr schedule {spec!r}: epochs must be strictly increasing "
                            f"({e_text.strip()} comes after {points[-1][0]:g})")
        points.append((epoch, lr))
    if points[0][0] != 0:
        raise UserError(f"lr schedule {spec!r}: the first entry must be for epoch 0 (e.g. '0:0.1,...')")
    return points


def parse_lr_schedule(spec: str, *, lr: float = 0.1, total_epochs: float | None = None,
                      warmup_epochs: float = 0.0) -> LRSchedule:
    """Parse a schedule string into `f(epoch_float) -> lr`; raises UserError on malformed input."""
    if not isinstance(spec, str):
        raise UserError(f"lr schedule must be a string ({SCHEDULE_FORMS}), got {spec!r}")
    if not math.isfinite(lr) or lr < 0:
        raise UserError(f"learning rate must be a non-negative number, got {lr}")
    if not math.isfinite(warmup_epochs) or warmup_epochs < 0:
        raise UserError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    text = spec.strip().lower()
    if not text:
        raise UserError(f"empty lr schedule; expected {SCHEDULE_FORMS}")
    warm = float(warmup_epochs)

    def warmup_factor(e: float) -> float:
        # linear ramp from 0 at epoch 0 to 1 at warmup_epochs
        return 1.0 if warm <= 0 or e >= warm else max(e, 0.0) / warm

    if text == "constant":
        base = float(lr)
        return LRSchedule("constant", lambda e: base * warmup_factor(e), f"constant lr={base:g}, warmup={warm:g}")

    if text == "cosine":
        if total_epochs is None or not math.isfinite(total_epochs) or total_epochs <= 0:
            raise UserError("the cosine lr schedule needs the run length (epochs or max_steps > 0)")
        base, total = float(lr), float(total_epochs)

        def cosine(e: float) -> float:
            if e < warm:
                return base * warmup_factor(e)
            span = total - warm
            if span <= 0:
                return base
            t = min(max((e - warm) / span, 0.0), 1.0)
            return base * 0.5 * (1.0 + math.cos(math.pi * t))

        return LRSchedule("cosine", cosine, f"cosine lr={base:g}->0 over {total:g} epochs, warmup={warm:g}")

    if ":" not in text:
        raise UserError(f"unknown lr schedule {spec!r}; expected {SCHEDULE_FORMS}")
    points = _parse_steps(spec)
    starts = [p[0] for p in points]
    rates = [p[1] for p in points]

    def step(e: float) -> float:
        # last breakpoint whose epoch is <= e; linear scan is fine for a handful of entries
        i = 0
        for j, s in enumerate(starts):
            if e >= s:
                i = j
            else:
                break
        return rates[i] * warmup_factor(e)

    return LRSchedule("step", step, ",".join(f"{e:g}:{r:g}" for e, r in points) + f", warmup={warm:g}")


class StepLambda:
    """`lr_lambda` for LambdaLR that reads an LRSchedule at the middle of each optimizer step.

    The scheduler's counter is the position in batches, ``epoch * steps_per_epoch + batch_in_epoch``, of the step
    about to run; the schedule is sampled at ``epoch + (batch_in_epoch + 0.5) / steps_per_epoch`` so warm-up's
    first step and cosine's last step get a non-zero rate. Returns the absolute rate (see `build_lr_scheduler`).
    """

    def __init__(self, schedule: LRSchedule, steps_per_epoch: int) -> None:
        self.schedule = schedule
        self.steps_per_epoch = int(steps_per_epoch)

    def epoch_at(self, position: int) -> float:
        """Fractional epoch at the middle of the step at `position` (in batches)."""
        spe = self.steps_per_epoch
        return position // spe + (position % spe) / spe + 0.5 / spe

    def __call__(self, position: int) -> float:
        return self.schedule(self.epoch_at(position))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule, steps_per_epoch: int,
                       position: int = 0) -> LambdaLR:
    """A per-step LambdaLR that sets every group's rate to ``lr_scale * schedule(mid-step epoch)``.

    LambdaLR multiplies each group's base rate (its ``initial_lr``) by the lambda's value; the lambda here gives
    the schedule's absolute rate, so the base rate is set to the group's ``lr_scale`` (1.0 when absent). After
    construction the groups hold the rate of the step at `position` (in batches, see `StepLambda`); call the
    scheduler's ``step()`` after each optimizer step. The scheduler holds no state beyond `position`, so a resumed
    run builds a new one at its position instead of storing it in checkpoints.

    Raises:
        ValueError: `steps_per_epoch` < 1 or `position` < 0.
    """
    if steps_per_epoch < 1 or position < 0:
        raise ValueError(f"need steps_per_epoch >= 1 and position >= 0, got {steps_per_epoch} and {position}")
    for group in optimizer.param_groups:
        group["initial_lr"] = float(group.get("lr_scale", 1.0))
    return LambdaLR(optimizer, StepLambda(schedule, steps_per_epoch), last_epoch=position - 1)
