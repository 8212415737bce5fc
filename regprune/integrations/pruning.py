"""Pruning inside a training loop someone else runs, without any framework: inputs moved to the network, the
parameters optimizers hold, the SPM loss's gradient added to the gates, and the network pruned in place with
the loop's own optimizers rebound to the smaller parameters (`optim_state.rebind_optimizer`)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..api import Regularizer
from ..errors import UserError
from ..methods.masks import MaskKeeper
from ..methods.spm import GATES_ATTR, SPMRegularizer

__all__ = ["to_device", "device_of", "held_param_ids", "regularized_params", "regularizer_metrics",
           "add_loss_gradient", "prune_and_rebind"]


def to_device(x: Any, device: torch.device) -> Any:
    """A tensor, or a tuple/list/dict of them (and plain values), with every tensor moved to `device` (nested
    containers keep their type; other values as given)."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def device_of(module: nn.Module) -> torch.device:
    """The device of `module`'s first parameter; the CPU for a module without parameters."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def held_param_ids(optimizers: Sequence[torch.optim.Optimizer]) -> set[int]:
    """`id()` of every parameter in any parameter group of `optimizers`."""
    return {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}


def regularized_params(reg: Regularizer | SPMRegularizer, prefix: str = "") -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter `reg`'s penalty lands on: GReg's pruned layers' weights, SPM's gate
    weights. Names are relative to the regularized network, after `prefix` ("" or "name.")."""
    if isinstance(reg, SPMRegularizer):
        return [(f"{prefix}{GATES_ATTR}.{k}.weight", g.weight) for k, g in reg.gates.gates.items()]
    return [(f"{prefix}{t.name}.weight", t.module.weight) for t in reg.targets]


def regularizer_metrics(reg: Regularizer | SPMRegularizer) -> dict[str, float]:
    """Scalars to log, named "regprune/...": SPM's `metrics()` (MACs fraction, losses; read while the gates are in
    place), GReg's largest penalty ("regprune/lambda_max") and schedule iteration ("regprune/iteration")."""
    if isinstance(reg, SPMRegularizer):
        return {f"regprune/{k}": float(v) for k, v in reg.metrics().items()}
    s = reg.status()
    return {"regprune/lambda_max": float(s["lambda_max"]), "regprune/iteration": float(s["iteration"])}


def add_loss_gradient(term: torch.Tensor | None, params: Sequence[nn.Parameter]) -> None:
    """Add d`term`/d`param` to each parameter's `.grad` (set it where there is none, in the parameter's dtype):
    the same as adding the 0-dim `term` to a loss that depends on `params` only through it. `torch.autograd.grad`
    is used, so gradient hooks (DDP's all-reduce) are not fired. Nothing happens when `term` is None or does not
    require grad; parameters `term` does not reach are left alone."""
    if term is None or not term.requires_grad:
        return
    params = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(term, params, allow_unused=True)
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.detach().to(p.dtype)
        else:
            p.grad.add_(g.detach().to(p.grad.dtype))


def _drop_params(optimizers: Sequence[torch.optim.Optimizer], ids: set[int]) -> None:
    """Remove the parameters whose `id()` is in `ids` from every group of `optimizers`, with their state."""
    for opt in optimizers:
        for group in opt.param_groups:
            keep = [p for p in group["params"] if id(p) not in ids]
            for p in group["params"]:
                if id(p) in ids:
                    opt.state.pop(p, None)
            group["params"] = keep


def _spm_reconfigure(model: nn.Module, reg: SPMRegularizer, x: Any) -> dict[str, torch.Tensor]:
    """`reconfigure.reconfigure` after freezing the gates, also returning `optim_state.kept_indices` for the
    optimizers (read on the gate-free dense model just before the removal)."""
    from ..optim_state import kept_indices
    from ..reconfigure import reconfigure

    if not reg.frozen:
        reg.freeze()
    kept: dict[str, torch.Tensor] = {}
    reconfigure(model, reg, x, before_surgery=lambda picks: kept.update(
        kept_indices(model, x, picks, include_coupled=True) if picks else {}))
    return kept


def prune_and_rebind(root: nn.Module, net: nn.Module, prefix: str, reg: Regularizer | SPMRegularizer, x: Any,
                     optimizers: Sequence[torch.optim.Optimizer]) -> MaskKeeper | None:
    """Prune `net` (`root` itself or its submodule whose parameter names start with `prefix`, "" or "name.") in
    place as `reg` decided, and rebind every optimizer to `root`'s new parameters with their state sliced.

    SPM: the gates are frozen, the network reconfigured (`reconfigure.reconfigure`) and the gate parameters
    dropped from the optimizers with their state. GReg: the filters `reg.picks()` names are removed
    (`Regularizer.prune`); unstructured GReg zeroes the weights and returns the `MaskKeeper` that holds them at
    zero (call its `after_backward` before and `on_step_end` after each optimizer step); otherwise None. `x` is
    the example inputs on `net`'s device.

    Raises UserError when GReg-2 has not picked its filters yet (nothing is changed then), and whatever the
    surgery raises (the model is left unpruned)."""
    from ..optim_state import kept_indices, rebind_optimizer

    old = dict(root.named_parameters())
    keeper = None
    if isinstance(reg, SPMRegularizer):
        gate_ids = {id(p) for p in reg.gates.parameters()}
        kept = _spm_reconfigure(net, reg, x)
        _drop_params(optimizers, gate_ids)  # the gates are gone from the model
    elif reg.unstructured:
        reg.prune()
        keeper = reg.mask_keeper()
        kept = {}
    else:
        try:
            picks = reg.picks()
        except RuntimeError as exc:  # GReg-2 before its pick phase ended
            raise UserError(f"cannot prune yet: {exc}") from None
        kept = kept_indices(net, reg.graph.example_inputs, picks, reg.include_coupled)
        reg.prune()
    kept = {prefix + k: v for k, v in kept.items()}
    for opt in optimizers:
        rebind_optimizer(opt, old, root, kept)
    return keeper
