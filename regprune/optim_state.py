"""Training-loop safety after pruning: carry an optimizer over to the pruned model's new parameters.

Physical pruning (Torch-Pruning surgery) replaces every pruned weight, bias, BN affine and unwrapped
parameter by a NEW `nn.Parameter`. An optimizer built before pruning still holds the dead tensors, and its
per-parameter state (SGD momentum, Adam moments) has the old shapes. `kept_indices` finds, for every parameter
whose shape pruning changes, which entries survive; `rebind_optimizer` swaps the optimizer over to the new
parameters and slices its state with those indices.

Typical use::

    old = dict(model.named_parameters())
    kept = kept_indices(model, x, picks)
    apply_picks(analyze(model, x), picks)
    rebind_optimizer(opt, old, model, kept)
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.nn as nn

from .errors import UserError
from .graph import GroupGraph, model_family
from .methods.base import Picks
from .surgery import apply_picks
from .verify import float64_copy

__all__ = ["kept_indices", "rebind_optimizer"]

_EXACT = 2 ** 53  # float64 holds every integer up to here exactly


def kept_indices(model: nn.Module, example_inputs: Any, picks: Picks,
                 include_coupled: bool = False) -> dict[str, torch.Tensor]:
    """Which entries of each parameter survive `picks`, found by pruning a numbered probe copy.

    A deep copy of `model` is converted to float64 and traced (no per-group trial cuts); then every parameter's data is overwritten with
    its own flat positions, `arange(numel).view(shape)`, the same picks are applied, and the surviving numbers
    are read back from the copy's new parameters. No per-layer rule is assumed, so anything the surgery can
    prune (convs of any kind, norms, unwrapped parameters, attention) is covered. `model` is not changed.

    Args:
        model: the dense model, before pruning (any device).
        example_inputs: a batch shaped like the model's input (tensor, or tuple/list/dict of them).
        picks: group root name -> output-channel indices to remove (as for `surgery.apply_picks`).
        include_coupled: passed to `graph.analyze`, as in the real pruning call.

    Returns:
        parameter name (as in `model.named_parameters()`) -> int64 tensor of shape (new_numel,) on the CPU:
        the flat indices into the old parameter, in the order of the new flattened parameter. Only parameters
        whose shape pruning changes are listed.

    Raises:
        UserError: a parameter too large to number exactly (over 2**53 entries), or any error the tracing
        and surgery raise for these picks (unknown root, removing every channel, uneven grouped-conv picks).
    """
    probe = copy.deepcopy(model).to(torch.float64)
    for p in probe.parameters():
        p.grad = None
    old_shapes = {n: p.shape for n, p in probe.named_parameters()}
    # the probe needs the groups only: scope and safety are the real pruning call's
    graph = GroupGraph(probe, float64_copy(example_inputs), include_coupled, model_family(probe), safety=False)
    with torch.no_grad():  # after tracing: the tracer follows autograd
        for name, p in probe.named_parameters():
            if p.numel() > _EXACT:
                raise UserError(f"parameter {name} has {p.numel()} entries: too many to track exactly (max 2**53)")
            p.copy_(torch.arange(p.numel(), dtype=torch.float64, device=p.device).view(p.shape))
        apply_picks(graph, picks, verify=False)  # the probe's numbered weights are no model to verify
    kept: dict[str, torch.Tensor] = {}
    for name, p in probe.named_parameters():
        if name in old_shapes and p.shape != old_shapes[name]:
            kept[name] = p.detach().reshape(-1).cpu().round().to(torch.long)
    return kept


def _slice_state(state: Mapping[str, Any], old: torch.Tensor, new: torch.Tensor, idx: torch.Tensor | None,
                 name: str) -> dict[str, Any]:
    """Per-parameter optimizer state for `new`: tensors shaped like `old` sliced by `idx`, the rest as is."""
    out: dict[str, Any] = {}
    for key, val in state.items():
        if isinstance(val, torch.Tensor) and val.shape == old.shape and old.shape != new.shape:
            if idx is None:
                raise UserError(f"no kept indices for {name}: compute them with kept_indices() before pruning")
            out[key] = val.reshape(-1)[idx.to(val.device)].reshape(new.shape).clone()
        else:
            out[key] = val
    return out


def rebind_optimizer(optimizer: torch.optim.Optimizer, old_params: Mapping[str, nn.Parameter], model: nn.Module,
                     kept: Mapping[str, torch.Tensor]) -> int:
    """Point `optimizer` at the pruned model's parameters, slicing its per-parameter state to the kept entries.

    Every old parameter (a value of `old_params`) in `optimizer.param_groups` is replaced, in place and at the
    same position, by the model's parameter of the same name; its state moves along: tensors with the old
    parameter's shape (SGD `momentum_buffer`, Adam `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`, ...) become
    `old_state.flatten()[kept[name]].view(new_shape)`, anything else (Adam's `step`) is copied as is. The old
    entries are dropped. Parameters pruning left alone, and parameters the model already holds, stay as they are.

    Args:
        optimizer: built on the model before pruning (any torch.optim optimizer with per-parameter state).
        old_params: `dict(model.named_parameters())` taken before pruning.
        model: the model after pruning.
        kept: `kept_indices(...)` for the same picks, computed before pruning.

    Returns:
        how many parameters were replaced by new objects.

    Raises:
        UserError: the optimizer holds a parameter that is neither in `old_params` nor in the model; an old
        parameter's name is missing from the pruned model; its shape changed but `kept` has no entry for it.
    """
    new_params = dict(model.named_parameters())
    current = {id(p) for p in new_params.values()}
    name_of = {id(p): n for n, p in old_params.items()}
    rebound = 0
    for gi, group in enumerate(optimizer.param_groups):
        params = list(group["params"])
        for i, p in enumerate(params):
            if id(p) in current:
                continue  # unchanged by pruning, or already the pruned model's own
            if id(p) not in name_of:
                raise UserError(f"optimizer param group {gi} holds a parameter of shape {tuple(p.shape)} that is "
                                "neither among the old parameters nor in the pruned model")
            name = name_of[id(p)]
            if name not in new_params:
                raise UserError(f"parameter {name} is not in the pruned model")
            new = new_params[name]
            idx = kept.get(name)
            if idx is not None and idx.numel() != new.numel():
                raise UserError(f"kept indices for {name} ({idx.numel()}) do not fit its pruned size {new.numel()}")
            if new.shape != p.shape and idx is None:
                raise UserError(f"no kept indices for {name}: compute them with kept_indices() before pruning")
            old_state = optimizer.state.pop(p, None)
            if old_state:
                optimizer.state[new] = _slice_state(old_state, p, new, idx, name)
            params[i] = new
            rebound += 1
        group["params"] = params
    return rebound
