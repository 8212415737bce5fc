"""Where a channel group's gate goes: one probe forward follows each writer of the group to the tensor the next
layers read.

The writers of a group are its norm layers, the convs/linears whose output does not go straight into one of
them, and the option-A `PadShortcut`. From each, `ActivationProbe.post_activation` follows the autograd graph
through activations and residual adds (elementwise nodes) to the first tensor a non-elementwise op reads, and
`gate_sites` names the module boundary (an output, else the inputs of the outermost readers) where a hook can
multiply that tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from ..counting import call_model, output_tensors
from ..graph import ChannelGroup, GroupGraph
from ..models.cifar import PadShortcut

__all__ = ["ActivationProbe", "gate_sites", "writers"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)

# Elementwise autograd nodes that keep the channel layout: an activation, a residual add, a channel-wise scale.
# A gate placed after them ("after the activation", official code) multiplies the tensor the next layers read.
_ELEMENTWISE = ("ReluBackward", "AddBackward", "MulBackward", "HardtanhBackward", "SiluBackward", "GeluBackward",
                "LeakyReluBackward", "EluBackward", "HardswishBackward", "ClampBackward", "ClampMinBackward",
                "CloneBackward", "ToCopyBackward")


def _is_elementwise(node: Any) -> bool:
    return type(node).__name__.rstrip("0123456789") in _ELEMENTWISE


def writers(graph: GroupGraph, g: ChannelGroup) -> list[tuple[str, int]]:
    """(module name, channel dim) of the modules that produce the group's channels: a norm layer (it would turn a
    zero channel into its shift), a conv/linear whose output does not go straight into a norm layer of the group,
    and the option-A shortcut."""
    outs = [m for m in g.members if m.side == "out"]
    norm_mods = {graph.module(m.name) for m in outs if isinstance(graph.module(m.name), _NORMS)}
    sites: list[tuple[str, int]] = []
    for m in outs:
        mod = graph.module(m.name)
        if isinstance(mod, _NORMS) or isinstance(mod, PadShortcut):
            sites.append((m.name, 1))
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            node = graph.dg.module2node.get(mod)
            nexts = [n.module for n in node.outputs] if node is not None else []
            if nexts and all(n in norm_mods for n in nexts):
                continue
            sites.append((m.name, -1 if isinstance(mod, nn.Linear) else 1))
    return sites


class ActivationProbe:
    """One forward pass recording, for every module call, the autograd node of its input and output, so a gate
    can be placed on the tensor a writer's channels reach after the activation (and, in a residual stream, after
    the add and the activation). Runs `model` once in eval mode on copies of `example_inputs` (each module's mode
    is restored after); modules whose name starts with `skip` (the gates' own ModuleDict) are not recorded."""

    def __init__(self, model: nn.Module, example_inputs: Any, skip: str = "") -> None:

        self.events: list[tuple[str, str, Any, tuple[int, ...]]] = []  # (where, module, node, shape), in order
        self.calls: dict[str, int] = {}
        self.consumers: dict[Any, list[Any]] = {}
        self.outputs: set[Any] = set()
        self._last_in: dict[str, Any] = {}
        keep: list[torch.Tensor] = []  # alive until the probe ends, so no node is freed and reused
        handles = []
        for name, mod in model.named_modules():
            if not name or (skip and name.startswith(skip)):
                continue
            handles.append(mod.register_forward_pre_hook(self._pre(name, keep)))
            handles.append(mod.register_forward_hook(self._post(name, keep)))
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with torch.enable_grad():
                out = call_model(model, tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, example_inputs))
        finally:
            for h in handles:
                h.remove()
            for m, t in modes.items():
                m.train(t)
        roots = [t.grad_fn for t in output_tensors(out) if t.grad_fn is not None]
        self.outputs = set(roots)
        seen = set(roots)
        stack = list(roots)
        while stack:
            node = stack.pop()
            for child, _ in node.next_functions:
                if child is None:
                    continue
                self.consumers.setdefault(child, []).append(node)
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
        self._keep = keep

    def _pre(self, name: str, keep: list):
        def hook(_mod, args):
            self.calls[name] = self.calls.get(name, 0) + 1
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            self._last_in[name] = t.grad_fn if t is not None else None
            if t is not None and t.grad_fn is not None:
                keep.append(t)
                self.events.append(("input", name, t.grad_fn, tuple(t.shape)))
        return hook

    def _post(self, name: str, keep: list):
        def hook(_mod, _args, out):
            # a pass-through module (identity shortcut, eval dropout) does not own the tensor it returns
            if isinstance(out, torch.Tensor) and out.grad_fn is not None and out.grad_fn is not self._last_in.get(name):
                keep.append(out)
                self.events.append(("output", name, out.grad_fn, tuple(out.shape)))
        return hook

    def post_activation(self, writer: str) -> list[Any]:
        """Autograd nodes of the tensors a writer's channels reach through activations and residual adds only,
        stopping at the first tensor that a non-elementwise op (conv, pool, linear, ...) reads."""
        starts = [n for w, name, n, _ in self.events if w == "output" and name == writer]
        if len(starts) != 1:
            return []
        sites, seen, stack = [], {starts[0]}, [starts[0]]
        while stack:
            node = stack.pop()
            cons = self.consumers.get(node, [])
            if node in self.outputs or not cons or any(not _is_elementwise(c) for c in cons):
                sites.append(node)
                continue
            for c in cons:
                if c not in seen:
                    seen.add(c)
                    stack.append(c)
        return sites

    def hook_for(self, node: Any, channels: int, dim: int) -> list[tuple[str, str]]:
        """Where to multiply the tensor of `node`: the output of the first module (called once) that returns it,
        else the input of the outermost modules (called once) that read it. [] when neither exists."""
        def fits(shape: tuple[int, ...]) -> bool:
            return len(shape) > 1 and shape[dim] == channels

        for where, name, n, shape in self.events:
            if where == "output" and n is node and self.calls.get(name) == 1 and fits(shape):
                return [(name, "output")]
        chosen: list[str] = []
        for where, name, n, shape in self.events:
            if where == "input" and n is node and self.calls.get(name) == 1 and fits(shape):
                if not any(name.startswith(c + ".") for c in chosen):
                    chosen.append(name)
        return [(name, "input") for name in chosen]


def gate_sites(graph: GroupGraph, g: ChannelGroup, probe: ActivationProbe) -> list[tuple[str, str, int]]:
    """(module name, "output" | "input", channel dim) of the hooks that gate the group after its activations.

    Each writer's channels are followed through activations and residual adds to the tensor the next layers read
    (official code: gates after the ReLU, a stream's shared gate after the add and the ReLU). Where that tensor
    has no module boundary to hook, the writer's own output is gated (the earlier placement)."""
    sites: list[tuple[str, str, int]] = []
    for writer, dim in writers(graph, g):
        found: list[tuple[str, str]] = []
        nodes = probe.post_activation(writer)
        for node in nodes:
            hooks = probe.hook_for(node, g.channels, dim)
            if not hooks:
                found = []
                break
            found += hooks
        if not found:
            found = [(writer, "output")]
        for name, where in found:
            if (name, where, dim) not in sites:
                sites.append((name, where, dim))
    return sites
