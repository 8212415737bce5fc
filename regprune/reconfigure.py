"""Reconfiguration: the end of an SPM search, turning a gated network into the smaller dense one it describes.

Thresholds the gates, removes the gated-off channels with the verified surgery of `regprune.surgery`, and checks
that the pruned model computes the gated network's function.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .counting import call_model, output_tensors
from .errors import UserError
from .methods.gates import GateSet, gate_graph
from .methods.spm import SPMRegularizer
from .surgery import apply_picks
from .verify import modes_kept

__all__ = ["reconfigure"]


def reconfigure(model: nn.Module, gates: GateSet | SPMRegularizer, example_inputs: torch.Tensor,
                before_surgery=None) -> nn.Module:
    """Threshold the gates, remove the off channels physically, drop the gates; returns `model`, pruned in place.

    The result computes the same function as the gated network (the gates were binary and shared
    per group), and is verified like every removal (UserError and the model unpruned otherwise); it is then
    compared with the gated network's output at `example_inputs` in eval mode, and a relative difference
    above 1e-4 raises UserError (a gate not applied where its channels are read). The gate
    hooks are removed before the model is traced again. `before_surgery(picks)`, when given, is called with
    the picks (group root -> channel indices) on the gate-free dense model just before the removal (for
    example to compute `optim_state.kept_indices` for an optimizer).
    """
    gateset = gates.gates if isinstance(gates, SPMRegularizer) else gates
    if gateset.model is not model:
        raise UserError("reconfigure: these gates belong to another model")
    if gateset.removed:
        raise UserError("reconfigure: the gates were already removed from this model")
    picks = gateset.picks()
    old_groups = gateset.groups
    with modes_kept(model), torch.no_grad():
        model.eval()
        gated = [t.detach().clone() for t in output_tensors(call_model(model, example_inputs))]
    gateset.remove()
    graph = gate_graph(model, example_inputs)
    new_picks: dict[str, list[int]] = {}
    for root, idxs in picks.items():
        if not idxs:
            continue
        # the new trace may root the same group at another member: find it by (root, "out")
        hit = [g for g in graph.groups.values() if any(m.name == root and m.side == "out" for m in g.members)]
        if not hit or hit[0].channels != old_groups[root].channels:
            raise UserError(f"reconfigure: group {root} is not found again in the traced model")
        new_picks[hit[0].root] = idxs
    if before_surgery is not None:
        before_surgery(new_picks)
    pruned = apply_picks(graph, new_picks) if new_picks else model
    with modes_kept(pruned), torch.no_grad():
        pruned.eval()
        now = output_tensors(call_model(pruned, example_inputs))
    worst = max((float((a - b).abs().max()) / max(1.0, float(b.abs().max())) for a, b in zip(now, gated)),
                default=0.0)
    if len(now) != len(gated) or worst > 1e-4:
        raise UserError(f"reconfigure: the reconfigured model does not compute the gated network's function "
                        f"(max relative difference {worst:.2e} at the example inputs): some gate of this model is "
                        "not applied where its channels are read; the model was left without gates and pruned")
    return pruned
