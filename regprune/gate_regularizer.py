"""SPM in any training loop: `regprune.regularizer(model, x, method="spm", target_macs=...)` and its object."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from .errors import UserError
from .methods.base import Picks
from .methods.greg import GRegConfig
from .methods.spm import SPMRegularizer, insert_gates
from .optim_state import kept_indices, rebind_optimizer
from .reconfigure import reconfigure

__all__ = ["GateRegularizer", "spm_regularizer", "macs_target"]


class GateRegularizer:
    """SPM (channel gates, MACs and nuclear-norm losses) around an existing training loop, used like `Regularizer`.

    Build the optimizer after `regularizer(..., method="spm")`: the gates are parameters of the model
    (`model.regprune_gates`); `param_groups()` gives them their own group without weight decay. Per step: add
    `extra_loss()` to the loss when it is not None, backward, `after_backward()`, step, `on_step_end()`; stop when
    `done()` (the gates froze after `iters` steps, or call `freeze()`), then `prune()`."""

    def __init__(self, model: nn.Module, example_inputs: Any, spm: SPMRegularizer) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.spm = spm
        self.pruned = False

    def _live(self, what: str) -> None:
        if self.pruned:
            raise UserError(f"GateRegularizer.{what}() after prune(): the model is already pruned; build a new "
                            "regularizer for another round")

    def extra_loss(self, trainer: Any = None, model: nn.Module | None = None, outputs: Any = None
                   ) -> torch.Tensor | None:
        """The MACs (and nuclear-norm) term to add to this step's loss: a scalar tensor, or None once frozen."""
        self._live("extra_loss")
        return self.spm.extra_loss(trainer, model, outputs)

    def after_backward(self, trainer: Any = None) -> None:
        """Nothing to do: the gates learn from the loss through their straight-through gradient."""
        self._live("after_backward")

    def on_step_end(self, trainer: Any = None) -> None:
        """Count the step; the gates freeze at `freeze_after` (the `iters` given to `regularizer`)."""
        self._live("on_step_end")
        self.spm.on_step_end(trainer)

    def on_epoch_end(self, trainer: Any = None) -> None:
        self.spm.on_epoch_end(trainer)

    def should_stop(self, trainer: Any = None) -> bool:
        return self.spm.done()

    def done(self) -> bool:
        """True once the gates are frozen: time to prune."""
        return self.spm.done()

    def freeze(self) -> None:
        """End the search now: the gates' on/off set is fixed and the losses are off."""
        self.spm.freeze()

    def no_weight_decay_params(self) -> list[nn.Parameter]:
        return self.spm.no_weight_decay_params()

    def param_groups(self) -> list[dict[str, Any]]:
        """The gates' optimizer group (no weight decay); build the model's own group without them."""
        return self.spm.param_groups()

    def status(self) -> dict:
        """MACs fraction of the gated network, last loss values, frozen flag and steps counted."""
        return {**self.spm.metrics(), "steps": self.spm.steps}

    def state_dict(self) -> dict:
        return self.spm.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.spm.load_state_dict(state)

    def picks(self) -> Picks:
        """Group root -> channel indices the gates turn off (what `prune()` removes)."""
        return self.spm.picks()

    def prune(self, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
        """Freeze the gates if they are not yet, remove the off channels and the gates (`regprune.reconfigure`);
        returns the model, pruned in place, computing the gated network's function (verified).

        Pass the training loop's `optimizer` to have it drop the gates and point at the new parameters with its
        state sliced to the kept channels. Raises UserError for an optimizer holding other models' parameters, a
        failed verification, or a second call."""
        self._live("prune")
        if optimizer is not None:
            own = {id(p) for p in self.model.parameters()}
            if any(id(p) not in own for grp in optimizer.param_groups for p in grp["params"]):
                raise UserError("the optimizer holds parameters that are not this model's; pass an optimizer over "
                                "the model's parameters (gates included) only")
        if not self.spm.frozen:
            self.spm.freeze()
        old = dict(self.model.named_parameters())
        gate_ids = {id(p) for p in self.spm.gates.parameters()}
        kept: dict[str, torch.Tensor] = {}

        def keep_indices(picks: Picks) -> None:  # on the gate-free dense model, just before the removal
            kept.update(kept_indices(self.model, self.example_inputs, picks, include_coupled=True) if picks else {})

        before = keep_indices if optimizer is not None else None
        pruned = reconfigure(self.model, self.spm, self.example_inputs, before_surgery=before)
        self.pruned = True
        if optimizer is not None:
            for group in optimizer.param_groups:  # the gates are gone from the model: drop them and their state
                for q in group["params"]:
                    if id(q) in gate_ids:
                        optimizer.state.pop(q, None)
                group["params"] = [q for q in group["params"] if id(q) not in gate_ids]
            rebind_optimizer(optimizer, old, pruned, kept)
        return pruned


def macs_target(speedup: float | None, target_macs: float | None) -> float | None:
    """The kept MACs fraction SPM aims at: `target_macs` as given, or 1 / `speedup`. Raises UserError when both are
    given or the speedup is below 1."""
    if speedup is not None and target_macs is not None:
        raise UserError("give either speedup or target_macs, not both")
    if speedup is None:
        return target_macs
    if not speedup >= 1.0:
        raise UserError(f"speedup {speedup:g} out of range: expected a number >= 1")
    return 1.0 / speedup


def spm_regularizer(model: nn.Module, example_inputs: Any, *, ratios: str | None, speedup: float | None,
                     target_macs: float | None, iters: int | None, config: GRegConfig | None, skip: list[str] | None,
                     round_to: int | None, include_coupled: bool, unstructured: bool, sparsity: float | None,
                     options: dict[str, Any]) -> GateRegularizer:
    """`regprune.regularizer(..., method="spm")`: insert gates into `model` (in place) and return the
    `GateRegularizer` driving them. `example_inputs` as checked by `regprune.api.as_example_inputs`; `options`
    takes `groups` and `SPMRegularizer` keywords. Raises UserError for GReg-only options (any of ratios ..
    sparsity given), speedup with target_macs, a target outside (0, 1], a bad `iters` or an unknown option; the
    model is left without gates then."""
    wrong = [n for n, v in (("ratios", ratios), ("config", config), ("skip", skip), ("round_to", round_to),
                            ("sparsity", sparsity)) if v is not None]
    wrong += [n for n, v in (("include_coupled", include_coupled), ("unstructured", unstructured)) if v]
    if wrong:
        raise UserError(f"{wrong[0]}= is a GReg option; SPM takes target_macs or speedup, iters, groups and "
                        "SPMRegularizer keywords")
    target_macs = macs_target(speedup, target_macs)
    if iters is not None:
        if isinstance(iters, bool) or int(iters) != iters or iters < 1:
            raise UserError(f"iters={iters!r}: expected a positive number of optimizer steps")
        if options.get("freeze_after") is not None:
            raise UserError("give either iters or freeze_after for SPM, not both (they are the same)")
        options["freeze_after"] = int(iters)
    groups = options.pop("groups", "all")
    known = set(inspect.signature(SPMRegularizer.__init__).parameters) - {"self", "gates", "target_macs"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"unknown SPM option {unknown[0]!r}: expected one of groups, {', '.join(sorted(known))}")
    x = example_inputs
    target = 0.41 if target_macs is None else target_macs
    if not 0.0 < target <= 1.0:  # checked before the gates go in
        raise UserError(f"MACs target {target:g} out of range: expected a kept fraction in (0, 1]")
    gates = insert_gates(model, x, groups)
    try:
        spm = SPMRegularizer(gates, target, **options)
    except Exception:
        gates.remove()  # leave the model as it was
        raise
    return GateRegularizer(model, x, spm)
