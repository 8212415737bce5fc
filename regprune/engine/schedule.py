"""Learning-rate schedules as plain functions of the (fractional) epoch."""

from __future__ import annotations

import math
from typing import Callable

from ..errors import UserError

__all__ = ["LRSchedule", "parse_lr_schedule", "SCHEDULE_FORMS"]

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
