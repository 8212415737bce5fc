"""Channel gates and the Shared Pruning Module: one binary gate vector per channel group, hooked into a model.

The search trains a network whose prunable activations are multiplied channel-wise by binary gates
`m = 1[w > 0.5]` (straight-through gradient to `w`). There is one gate vector per coupled channel group
(`graph.analyze(..., include_coupled=True)`), so every block that writes into a residual stream shares
the stream's gate: that is the Shared Pruning Module, and it makes the final reconfiguration exact.

Gates are attached WITHOUT editing the model's source, where the official code puts them: after the
activation (`regprune.methods.gate_probe`). One probe forward follows each writer of a group (its BatchNorm, or the conv/linear itself, and
the option-A `PadShortcut`) through activations and residual adds to the tensor the next layers read, and a
hook multiplies that tensor: a private gate after the ReLU (e.g. the input of conv2), a stream's shared gate
after the add and the ReLU (each block's output), the stem's after its ReLU (its own gate when the stem is its
own group, as in torchvision ResNets; the stage-1 stream's gate when an identity shortcut shares its channels).
A gated-off channel then still carries its value up to the gate, so through the straight-through estimator it
keeps receiving task gradient and can come back (a gate before the ReLU or the add gets none).

Gate parameters live in an `nn.ModuleDict` attached to the model as `model.regprune_gates`, so any
optimizer built from `model.parameters()` (and DDP) sees them and model checkpoints carry them; the
weight-decay exclusion is `SPMRegularizer.no_weight_decay_params()`.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from ..errors import UserError
from ..graph import ChannelGroup, GroupGraph, analyze
from ..ratios import estimate_macs
from .gate_probe import ActivationProbe, gate_sites

__all__ = ["ChannelGate", "GateSet", "insert_gates", "gate_graph", "GATES_ATTR"]

GATES_ATTR = "regprune_gates"  # attribute under which the gate ModuleDict hangs on the model


class ChannelGate(nn.Module):
    """One learnable scalar per channel; the mask is `w > threshold` forward and identity backward.

    `repeat > 1` is for channels that pass through a grouped conv: the gate holds one weight per
    position inside a channel block and the mask repeats it over the `repeat` blocks, so the kept set
    is block-periodic as the grouped conv requires. At least `min_on` gate positions are always on
    (the largest weights), so a group can never be emptied, in the search or at reconfiguration.
    """

    def __init__(self, channels: int, init: float = 0.6, threshold: float = 0.5, repeat: int = 1,
                 min_on: int = 1) -> None:
        super().__init__()
        if repeat < 1 or channels % repeat:
            raise ValueError(f"{channels} channels do not split into {repeat} equal blocks")
        self.channels = channels
        self.repeat = repeat
        self.threshold = threshold
        self.min_on = min_on
        self.weight = nn.Parameter(torch.full((channels // repeat,), float(init)))
        # the on/off set once frozen: a buffer, so it moves with the module (.to(device)); not in the state dict
        # (SPM's own state carries it)
        self.register_buffer("fixed", None, persistent=False)

    def fix(self) -> None:
        """Freeze the on/off set: the mask no longer follows the weight, whose gradient becomes zero."""
        self.fixed = self.hard().clone()

    def unfix(self) -> None:
        """Let the mask follow the weight again."""
        self.fixed = None

    def hard(self) -> torch.Tensor:
        """Boolean on/off per gate position (length channels/repeat), with the never-empty guard."""
        if self.fixed is not None:
            return self.fixed
        w = self.weight.detach()
        on = w > self.threshold
        short = min(self.min_on, w.numel()) - int(on.sum())
        if short > 0:
            top = torch.topk(torch.where(on, torch.full_like(w, -math.inf), w), short).indices
            on = on.clone()
            on[top] = True
        return on

    def channel_hard(self) -> torch.Tensor:
        """Boolean on/off per channel (the hard mask repeated over grouped-conv blocks)."""
        return self.hard().repeat(self.repeat)

    def mask(self) -> torch.Tensor:
        """Float mask per channel: exactly 0/1 forward, d mask / d w = 1 backward (straight-through)."""
        w = self.weight
        # hard + (w - w.detach()) is exactly the binary value (w - w == 0), unlike w + (hard - w).detach()
        ste = w - w.detach()
        if self.fixed is not None:
            ste = ste * 0  # still in the graph, so DDP sees a (zero) gradient for every parameter
        m = self.hard().to(w.dtype) + ste
        return m.repeat(self.repeat) if self.repeat > 1 else m

    def count(self) -> torch.Tensor:
        """Soft number of kept channels, sum of the mask (differentiable through the STE)."""
        return self.mask().sum()

    def forward(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """`x` multiplied channel-wise (along `dim`) by the mask."""
        m = self.mask().to(x.dtype)
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * m.view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, repeat={self.repeat}, threshold={self.threshold}"


def _gate_key(root: str, taken: set[str]) -> str:
    # ModuleDict keys may not contain dots; keep them readable and unique
    key = root.replace(".", "_") or "root"
    base, i = key, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    return key



class GateSet:
    """The gates of one model: one `ChannelGate` per gated channel group, and the hooks applying them."""

    def __init__(self, model: nn.Module, graph: GroupGraph, roots: Sequence[str], init: float = 0.6,
                 threshold: float = 0.5, attach: bool = True) -> None:
        if hasattr(model, GATES_ATTR):
            raise UserError(f"the model already carries gates ({GATES_ATTR}); remove them before inserting new ones")
        self.model = model
        self.graph = graph
        self.groups: dict[str, ChannelGroup] = {r: graph.groups[r] for r in roots}
        self.gates = nn.ModuleDict()
        self.keys: dict[str, str] = {}
        self.sites: dict[str, list[str]] = {}
        self.placement: dict[str, list[tuple[str, str, int]]] = {}
        self.handles: list = []
        self.attached = False
        self.removed = False
        params = next(iter(model.parameters()), None)
        probe = ActivationProbe(model, graph.example_inputs, skip=GATES_ATTR)
        for root in roots:
            g = self.groups[root]
            gate = ChannelGate(g.channels, init, threshold, repeat=max(1, g.ch_groups))
            if params is not None:
                gate = gate.to(device=params.device)
            key = _gate_key(root, set(self.gates.keys()))
            self.keys[root] = key
            self.gates[key] = gate
            self.placement[root] = gate_sites(graph, g, probe)
            self.sites[root] = [name for name, _, _ in self.placement[root]]
            for name, where, dim in self.placement[root]:
                mod = graph.module(name)
                if where == "output":
                    self.handles.append(mod.register_forward_hook(self._hook(gate, dim)))
                else:
                    self.handles.append(mod.register_forward_pre_hook(self._pre_hook(gate, dim)))
        del probe
        if attach:
            if hasattr(model, GATES_ATTR):
                raise UserError(f"the model already carries gates ({GATES_ATTR}); remove them before inserting new ones")
            model.add_module(GATES_ATTR, self.gates)
            self.attached = True

    @staticmethod
    def _hook(gate: ChannelGate, dim: int):
        def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            return gate(out, dim)
        return hook

    @staticmethod
    def _pre_hook(gate: ChannelGate, dim: int):
        def hook(_mod: nn.Module, args: tuple) -> tuple:
            return (gate(args[0], dim), *args[1:])
        return hook

    @property
    def roots(self) -> list[str]:
        """Group roots that carry a gate, in the graph's order."""
        return list(self.keys)

    def gate(self, root: str) -> ChannelGate:
        """The gate of group `root`."""
        return self.gates[self.keys[root]]

    def __len__(self) -> int:
        return len(self.keys)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The gate weights (one tensor per group)."""
        return iter(self.gates.parameters())

    def hard_masks(self) -> dict[str, torch.Tensor]:
        """Boolean kept-channel mask per group root (guard applied)."""
        return {r: self.gate(r).channel_hard() for r in self.keys}

    def removal(self) -> dict[str, int]:
        """Number of channels off per group root."""
        return {r: int((~m).sum()) for r, m in self.hard_masks().items()}

    def picks(self) -> dict[str, list[int]]:
        """Indices of the off channels per group root (what reconfiguration removes)."""
        return {r: torch.nonzero(~m).flatten().tolist() for r, m in self.hard_masks().items()}

    def kept_widths(self) -> dict[str, int]:
        """Number of channels on per group root."""
        return {r: int(m.sum()) for r, m in self.hard_masks().items()}

    def current_macs(self) -> int:
        """Exact per-sample MACs of the network the current hard gates describe."""
        if self.removed:
            raise UserError("these gates were removed from the model; count the reconfigured model instead")
        return estimate_macs(self.graph, {r: k for r, k in self.removal().items() if k})

    def remove(self) -> None:
        """Remove the hooks and detach the gate ModuleDict from the model (the model is dense again)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.attached and getattr(self.model, GATES_ATTR, None) is self.gates:
            delattr(self.model, GATES_ATTR)
        self.attached = False
        self.removed = True


def _select_roots(graph: GroupGraph, groups: str | Sequence[str]) -> list[str]:
    skip = ("network output", "single channel", "unsafe")
    if groups == "all":
        return [r for r, g in graph.groups.items() if not g.reason.startswith(skip) and g.channels >= 2]
    if groups == "scope":
        return [g.root for g in graph.scope()]
    if isinstance(groups, str):
        raise UserError(f"groups={groups!r}: expected 'all', 'scope' or a list of group roots")
    roots = []
    for name in groups:
        g = graph.groups.get(name)
        if g is None:
            hits = [x for x in graph.groups.values() if name in x.writers]
            if not hits:
                raise UserError(f"{name!r} is not a channel group of this model; see `regprune inspect`")
            g = hits[0]
        if g.reason.startswith(skip) or g.channels < 2:
            raise UserError(f"group {g.root} cannot be gated: {g.reason or 'single channel'}")
        if g.root not in roots:
            roots.append(g.root)
    # model order, whatever order the user wrote
    return [r for r in graph.groups if r in roots]


def gate_graph(model: nn.Module, example_inputs: torch.Tensor) -> GroupGraph:
    """The channel-group graph gates are placed on: `graph.analyze` with coupled groups (each module's mode kept)."""
    # Torch-Pruning's tracer leaves the model in eval mode; a search must go on in the mode it was in
    return analyze(model, example_inputs, include_coupled=True)  # every module's mode is kept by the graph


def insert_gates(model: nn.Module, example_inputs: torch.Tensor, groups: str | Sequence[str] = "all",
                 init: float = 0.6, threshold: float = 0.5, attach: bool = True) -> GateSet:
    """Hook one shared gate per channel group into `model` (no source edit); returns the `GateSet`.

    `groups`: "all" (every group but the classifier output and single channels: stem, residual
    streams, private convs, the paper's setting), "scope" (the graph's default pruning scope), or a
    list of group roots / writer names. Grouped-conv groups get block-periodic gates.
    """
    if hasattr(model, GATES_ATTR):
        raise UserError(f"the model already carries gates ({GATES_ATTR}); remove them before inserting new ones")
    graph = gate_graph(model, example_inputs)
    roots = _select_roots(graph, groups)
    if not roots:
        raise UserError("no channel group of this model can be gated")
    return GateSet(model, graph, roots, init=init, threshold=threshold, attach=attach)
