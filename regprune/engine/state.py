"""The bookkeeping of one `Trainer` run that the training loop and the checkpoint logic share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .log import MetricsLogger
from .stats import RunningStats

__all__ = ["RunState", "STAGES"]

STAGES = ("idle", "forward", "optimizer", "commit")
"""Where in an optimizer step the loop is (`RunState.stage`), so an interrupt can save a consistent state:
``"forward"`` up to the end of backward, ``"optimizer"`` inside ``optimizer.step()``, ``"commit"`` while the step is
being counted, ``"idle"`` between steps."""


@dataclass
class RunState:
    """What a `Trainer` tracks about its run besides the step counters (`step`, `epoch`, `batch_in_epoch`).

    Step fields hold an optimizer step count, -1 for "never". Only `stats`, `last_eval_step` and `final_step` are
    saved in checkpoints (with the counters); the rest describes this process's run.
    """

    logger: MetricsLogger
    """Sink of the metrics records (writes on rank 0 only)."""
    stats: RunningStats = field(default_factory=RunningStats)
    """Running loss and top-1 sums; the losses of the steps since the last flush are still on the device."""
    last_eval_step: int = -1
    """Step at which `Trainer.last_eval` was measured."""
    final_step: int = -1
    """Step at which the "final" metrics record was written."""
    checkpoint_step: int = -1
    """Step of the last checkpoint written to (or loaded from) `Trainer.checkpoint_path` by this trainer."""
    started: bool = False
    """True once `fit` ran or a checkpoint was loaded (the RNGs are not seeded again)."""
    stage: str = "idle"
    """One of `STAGES`."""
    inflight: tuple[torch.Tensor, torch.Tensor | None, int] | None = None
    """(loss, top-1 hits, batch size) of the step being computed, until it is counted."""
    interrupt_requested: bool = False
    """Set by the first Ctrl-C: the loop stops after the current step and saves a checkpoint."""
    stop_requested: bool = False
    """A hook's `should_stop` said so (agreed across ranks)."""
    last_loss: torch.Tensor | None = None
    """The 0-dim loss of the last step on this rank, still on the device."""
