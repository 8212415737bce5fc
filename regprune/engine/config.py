"""Training configuration and the exceptions fit() raises."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import UserError
from .schedule import parse_lr_schedule

__all__ = ["TrainConfig", "TrainingInterrupted", "TrainingDiverged", "HOOK_METHODS", "CHECKPOINT_FORMAT",
           "TRAJECTORY_FIELDS"]

CHECKPOINT_FORMAT = "regprune.engine.checkpoint/1"
HOOK_METHODS = ("on_step_start", "extra_loss", "after_backward", "on_step_end", "should_stop", "on_epoch_end",
                "no_weight_decay_params", "state_dict", "load_state_dict")

# config fields whose change between save and resume alters the trajectory; differing values get a warning
TRAJECTORY_FIELDS = ("epochs", "max_steps", "lr", "lr_schedule", "warmup_epochs", "momentum", "nesterov",
                     "weight_decay", "no_wd_bn_bias", "label_smoothing", "batch_size", "seed")


@dataclass
class TrainConfig:
    """Everything that shapes one training phase; stored in checkpoints."""

    epochs: float = 1              # may be fractional; alternatively max_steps
    max_steps: int | None = None   # stop after this many optimizer steps (overrides epochs when set)
    lr: float = 0.1
    lr_schedule: str = "constant"  # "constant", "cosine", or absolute per-epoch rates "0:0.1,100:0.01"
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_wd_bn_bias: bool = False    # no weight decay on normalization params and biases
    label_smoothing: float = 0.0
    batch_size: int = 128          # recorded for the loaders the caller builds; the trainer uses the loader as given
    amp: bool = False              # only effective on CUDA
    channels_last: bool = False
    device: str = "auto"           # cuda if available else cpu
    seed: int = 0
    checkpoint_every: int = 0      # optimizer steps between checkpoints (0: only at epoch ends)
    eval_every_epoch: bool = True
    progress: bool = True
    log_every: int = 50            # optimizer steps between metrics records (and device syncs on GPU)

    def validate(self) -> None:
        """Raise UserError naming the first nonsensical field."""
        def bad(msg: str) -> None:
            raise UserError(f"training config: {msg}")

        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 0):
            bad(f"max_steps must be a non-negative integer, got {self.max_steps!r}")
        if self.max_steps is None and (not math.isfinite(float(self.epochs)) or self.epochs < 0):
            bad(f"epochs must be >= 0, got {self.epochs!r}")
        for name in ("lr", "weight_decay", "warmup_epochs"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.momentum < 1:
            bad(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.nesterov and self.momentum <= 0:
            bad("nesterov needs momentum > 0")
        if not 0 <= self.label_smoothing < 1:
            bad(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.batch_size < 1:
            bad(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.checkpoint_every < 0:
            bad(f"checkpoint_every must be >= 0, got {self.checkpoint_every!r}")
        if self.log_every < 1:
            bad(f"log_every must be >= 1, got {self.log_every!r}")
        parse_lr_schedule(self.lr_schedule, lr=self.lr, total_epochs=1.0, warmup_epochs=self.warmup_epochs)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a dict (e.g. a checkpoint's "config"), ignoring unknown keys."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by fit() after Ctrl-C, once a checkpoint has been written; `checkpoint` is its path (or None)."""

    def __init__(self, checkpoint: Path | None, step: int) -> None:
        self.checkpoint = checkpoint
        self.step = step
        where = (f"checkpoint saved to {checkpoint}; continue with resume_from={str(checkpoint)!r}"
                 if checkpoint is not None else "no run_dir was given, so no checkpoint was saved")
        super().__init__(f"training interrupted after step {step}; {where}")


class TrainingDiverged(UserError):
    """The loss (or the weights) became NaN or infinite; the last good checkpoint is left untouched.

    Losses are checked in batches (every log_every steps and before every checkpoint) to avoid a device sync
    per step; the message still names the first bad step.
    """

    def __init__(self, message: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint
