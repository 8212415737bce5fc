"""Channel groups of any traceable model, on Torch-Pruning's dependency graph, and which ones we prune."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from .counting import hooked_forward, macs_hook
from .errors import UserError
from .models.cifar import PadShortcut

__all__ = ["Member", "ChannelGroup", "GroupGraph", "analyze", "model_family", "PadShortcutPruner"]


class PadShortcutPruner(tp.pruner.function.BasePruningFunc):
    """Teaches the dependency graph that an option-A shortcut maps input channels to output channels.

    Without it the graph sees the zero padding as element-wise and couples the residual streams of
    all stages into one (wrong) group.
    """

    TARGET_MODULES = PadShortcut

    def prune_out_channels(self, layer: PadShortcut, idxs: Sequence[int]) -> PadShortcut:
        drop = set(int(i) for i in idxs)
        keep = [i for i in range(layer.out_planes) if i not in drop]
        layer.index = layer.index[torch.tensor(keep, dtype=torch.long)].clone()
        return layer

    def prune_in_channels(self, layer: PadShortcut, idxs: Sequence[int]) -> PadShortcut:
        drop = torch.tensor(sorted(int(i) for i in idxs), dtype=torch.long)
        index = layer.index.clone()
        removed = torch.isin(index, drop)
        # removed inputs were zero in the equivalent dense model: map them to the zero channel
        shift = (index.unsqueeze(1) > drop.unsqueeze(0)).sum(1)
        index = torch.where(removed | (index < 0), torch.full_like(index, -1), index - shift)
        layer.index = index
        layer.in_planes -= len(drop)
        return layer

    def get_out_channels(self, layer: PadShortcut) -> int:
        return layer.out_planes

    def get_in_channels(self, layer: PadShortcut) -> int:
        return layer.in_planes


CUSTOM_PRUNERS: dict = {PadShortcut: PadShortcutPruner()}


@dataclass
class Member:
    """One layer touched by a group: `side` is "out" (its output channels) or "in" (its input channels)."""

    name: str
    kind: str
    side: str


@dataclass
class ChannelGroup:
    """Coupled channels that are removed together, rooted at the conv/linear that produces them."""

    root: str
    channels: int
    members: list[Member]
    writers: list[str]  # conv/linear layers whose output channels are these (more than one: residual sum)
    macs: int = 0  # MACs of layers this group touches (as producer or consumer)
    in_scope: bool = False
    reason: str = ""
    coupled: bool = False
    ch_groups: int = 1  # >1 when a grouped conv reads or writes these channels: picks repeat per block

    @property
    def macs_share(self) -> float:
        return 0.0 if self._total == 0 else self.macs / self._total

    _total: int = field(default=0, repr=False)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def _probe(model: nn.Module, example_inputs: torch.Tensor) -> tuple[dict[str, int], set[str]]:
    """One forward pass: per-sample MACs of every conv/linear layer, and the names of those whose output is
    (directly) the network's output."""
    macs: dict[str, int] = {}
    produced: dict[int, str] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(macs_hook(name, macs)))
            hooks.append(m.register_forward_hook(lambda mod, i, o, _n=name: produced.__setitem__(id(o), _n)))
    out = hooked_forward(model, example_inputs, hooks)
    outs = out if isinstance(out, (tuple, list)) else [out]
    return macs, {produced[id(o)] for o in outs if id(o) in produced}


class GroupGraph:
    """A model's dependency graph with its channel groups, keyed by root layer name."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, include_coupled: bool = False,
                 family: str | None = None) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.names = {m: n for n, m in model.named_modules()}
        was_training = model.training
        try:
            self.dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, customized_pruners=CUSTOM_PRUNERS)
        except Exception as exc:  # tracing failures are the model's, not a bug of ours: say which
            raise UserError(f"cannot trace the model's channel dependencies: {type(exc).__name__}: {exc}") from exc
        finally:
            model.train(was_training)  # the tracer switches to eval mode
        self.layer_macs, self.outputs = _probe(model, example_inputs)
        self.total_macs = sum(self.layer_macs.values())
        self.groups: dict[str, ChannelGroup] = {}
        self._build(include_coupled, family)

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def _members(self, group) -> list[Member]:
        seen = set()
        members = []
        for dep, _ in group:
            mod = dep.target.module
            if not isinstance(mod, nn.Module) or mod not in self.names:
                continue
            side = "out" if self.dg.is_out_channel_pruning_fn(dep.handler) else "in"
            key = (self.names[mod], side)
            if key not in seen:
                seen.add(key)
                members.append(Member(self.names[mod], type(mod).__name__, side))
        return members

    def _build(self, include_coupled: bool, family: str | None) -> None:
        for group in self.dg.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
            root_mod = group[0].dep.target.module
            root = self.names[root_mod]
            members = self._members(group)
            writers = [m.name for m in members if m.side == "out" and m.kind in ("Conv2d", "Linear")
                       and not _is_depthwise(self.module(m.name))]
            writers += [m.name for m in members if m.side == "out" and m.kind == "PadShortcut"]
            touched = {m.name for m in members if m.kind in ("Conv2d", "Linear")}
            g = ChannelGroup(root=root, channels=len(group[0].idxs), members=members, writers=writers,
                             macs=sum(self.layer_macs.get(n, 0) for n in touched))
            g._total = self.total_macs
            g.coupled = len(writers) > 1
            partial = False
            for m in members:
                mod = self.module(m.name)
                if isinstance(mod, nn.Conv2d) and mod.groups > 1 and not _is_depthwise(mod):
                    g.ch_groups = max(g.ch_groups, mod.groups)
                    width = mod.out_channels if m.side == "out" else mod.in_channels
                    partial |= width != g.channels
            readers = {m.name for m in members if m.side == "in"}
            if any(w in self.outputs for w in writers):
                g.reason = "network output (classifier)"
            elif partial:
                g.reason = "covers only part of a grouped conv's channels (cannot keep its groups even)"
            elif g.channels < 2:
                g.reason = "single channel"
            elif g.coupled and not include_coupled:
                g.reason = f"residual-coupled ({len(writers)} writers); pass include_coupled to prune it"
            elif family == "resnet" and not root.startswith("layer") and not include_coupled:
                g.reason = "stem: outside the papers' ResNet scope"
            elif family is None and readers & self.outputs and not include_coupled:
                g.reason = "classifier input: outside the default scope of unknown models"
            else:
                g.in_scope = True
            self.groups[root] = g

    def group_of(self, layer_name: str) -> ChannelGroup:
        """The group whose writers include `layer_name` (a conv or linear)."""
        for g in self.groups.values():
            if layer_name == g.root or layer_name in g.writers:
                return g
        raise UserError(f"layer {layer_name!r} produces no prunable channel group")

    def scope(self) -> list[ChannelGroup]:
        """Groups the default scope prunes, in model order."""
        return [g for g in self.groups.values() if g.in_scope]

    def tp_group(self, root: str, idxs: Sequence[int]):
        """Torch-Pruning group that removes output channels `idxs` of `root` and everything coupled."""
        mod = self.module(root)
        fn = tp.prune_linear_out_channels if isinstance(mod, nn.Linear) else tp.prune_conv_out_channels
        return self.dg.get_pruning_group(mod, fn, list(int(i) for i in idxs))

    def coupled_params(self, root: str, include_bn: bool = False) -> list[tuple[str, nn.Parameter, int]]:
        """(name, parameter, dim) slices that belong to `root`'s output channels, root excluded."""
        out = []
        for m in self.groups[root].members:
            if m.name == root:
                continue
            mod = self.module(m.name)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                if include_bn:
                    out += [(f"{m.name}.weight", mod.weight, 0), (f"{m.name}.bias", mod.bias, 0)]
            elif isinstance(mod, (nn.Conv2d, nn.Linear)):
                dim = 0 if (m.side == "out" or _is_depthwise(mod)) else 1
                out.append((f"{m.name}.weight", mod.weight, dim))
        return out


def model_family(model: nn.Module) -> str | None:
    """'resnet', 'vgg' or None (any other model), from the registry name the model was built under."""
    name = getattr(model, "regprune_arch", {}).get("name", "")
    base = name.split(".", 1)[-1]
    if re.match(r"(resnet|wide_resnet|resnext)\d", base):
        return "resnet"
    if base.startswith("vgg"):
        return "vgg"
    return None


def analyze(model: nn.Module, example_inputs: torch.Tensor, include_coupled: bool = False) -> GroupGraph:
    """Trace `model` and return its channel groups with the default scope marked."""
    return GroupGraph(model, example_inputs, include_coupled, model_family(model))
