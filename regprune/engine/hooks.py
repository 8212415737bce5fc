"""The hook protocol of `Trainer`, and the object that calls a run's hooks.

Hooks are plain objects that define any subset of these methods (only those present are called):

* ``on_step_start(trainer)``            before the forward pass (the lr for this step is already set)
* ``extra_loss(trainer, model, outputs)`` a tensor added to the loss, or None
* ``after_backward(trainer)``           gradients are final and unscaled (e.g. add lambda*W to grads here)
* ``on_step_end(trainer)``              after optimizer.step() and the step counter increment
* ``should_stop(trainer) -> bool``      checked after each step; True ends fit() early
* ``on_epoch_end(trainer)``             after the epoch's evaluation, before its checkpoint
* ``no_weight_decay_params()``          parameters to put in the zero-weight-decay group
* ``state_dict()`` / ``load_state_dict(state)``  saved in and restored from checkpoints

Hooks receive the unwrapped model (``trainer.model``) even under DistributedDataParallel.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from . import dist as D

__all__ = ["HookSet", "EVENTS"]

EVENTS = ("on_step_start", "extra_loss", "after_backward", "on_step_end", "should_stop", "on_epoch_end")
"""The hook methods called during `fit`, each at its point of the loop (see the module docstring)."""


class HookSet:
    """A run's hooks, with each event's bound methods looked up once (in the hooks' order)."""

    def __init__(self, hooks: Sequence[Any]) -> None:
        self.hooks = list(hooks)
        self.calls: dict[str, list] = {name: [getattr(h, name) for h in self.hooks if callable(getattr(h, name, None))]
                                       for name in EVENTS}

    def no_weight_decay_params(self) -> list[nn.Parameter]:
        """Every hook's `no_weight_decay_params()`, concatenated in the hooks' order."""
        out: list[nn.Parameter] = []
        for h in self.hooks:
            if callable(getattr(h, "no_weight_decay_params", None)):
                out.extend(h.no_weight_decay_params())
        return out

    def notify(self, event: str, trainer: Any) -> None:
        """Call every hook's `event(trainer)` (one of "on_step_start", "after_backward", "on_step_end",
        "on_epoch_end"). Raises KeyError for another event name."""
        for fn in self.calls[event]:
            fn(trainer)

    def add_extra_losses(self, trainer: Any, model: nn.Module, outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        """`loss` plus every hook's `extra_loss(trainer, model, outputs)` that is not None, added one at a time in
        the hooks' order (a 0-dim tensor, like `loss`)."""
        for fn in self.calls["extra_loss"]:
            term = fn(trainer, model, outputs)
            if term is not None:
                loss = loss + term
        return loss

    def should_stop(self, trainer: Any) -> bool:
        """True when any hook's `should_stop(trainer)` is; every hook is called, so each sees every step.

        With `trainer.world_size > 1` the answer is agreed across ranks (an all-reduce on `trainer.device`: call on
        every rank), so all ranks leave the loop at the same step. False, without a collective, when no hook has
        `should_stop`."""
        fns = self.calls["should_stop"]
        if not fns:
            return False
        stop = False
        for fn in fns:
            if fn(trainer):
                stop = True
        if trainer.world_size > 1:
            # all ranks must leave the loop at the same step or the next all-reduce hangs
            flag = torch.tensor([1.0 if stop else 0.0], device=trainer.device)
            stop = bool(D.all_reduce_sum(flag).item() > 0)
        return stop
