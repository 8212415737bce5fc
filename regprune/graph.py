"""Channel groups of any traceable model, on Torch-Pruning's dependency graph, and which ones we prune."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.nn as nn
import torch_pruning as tp

from .channel_maps import shuffles
from .probe import probe as probe_model
from .counting import MacsRecord, is_counted, is_depthwise, uncounted_layers
from .forward import check_example_inputs
from .depgraph import CUSTOM_PRUNERS, IndexMappingDiverges, PadShortcutPruner, mapped_once, trace, widest
from .errors import UserError

__all__ = ["Member", "ChannelGroup", "GroupGraph", "analyze", "model_family", "trial_graph", "PadShortcutPruner",
           "CUSTOM_PRUNERS", "IndexMappingDiverges"]

ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class Member:
    """One layer touched by a group: `side` is "out" (its output channels) or "in" (its input channels)."""

    name: str
    kind: str
    side: str
    per_channel: float = 1.0  # this layer's channels touched per group channel (flatten: H*W; a split part: <1)


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
    unsafe: bool = False  # its removal could not be verified exact on a trial copy
    kind: str = "block-internal"  # block-internal, residual stream, gate, concat, output, unsafe

    @property
    def macs_share(self) -> float:
        return 0.0 if self._total == 0 else self.macs / self._total

    _total: int = field(default=0, repr=False)


def _grouped(m: nn.Module) -> bool:
    """A grouped (not depthwise) convolution: its channel blocks must stay even."""
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not is_depthwise(m)


class GroupGraph:
    """A model's dependency graph with its channel groups, keyed by root layer name.

    `example_inputs`: a tensor, a tuple/list of positional inputs or a dict of keyword inputs (all are used).
    With `safety=True` (what `analyze` does) every candidate group is cut on a trial copy and verified first;
    groups that fail are out of scope with the reason (`unsafe: ...`), and so, without a trial, are the groups that
    layers running only in train mode read (`train_readers`: producer layer -> those readers). `roots` (layer
    names) forms only the groups rooted there (a trial copy needs no others); by default every group is formed."""

    def __init__(self, model: nn.Module, example_inputs: Any, include_coupled: bool = False,
                 family: str | None = None, safety: bool = True, probe: bool = True,
                 roots: Sequence[str] | None = None) -> None:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise UserError(f"the model is wrapped in {type(model).__name__}: prune the wrapped module "
                            "(model.module), then wrap the pruned model again")
        self.model = model
        self.example_inputs = check_example_inputs(example_inputs)
        self.names = {m: n for n, m in model.named_modules()}
        self.dg = trace(model, example_inputs)
        record, self.outputs, self.train_only, self.train_readers = MacsRecord(), set(), set(), {}
        if probe:  # trial copies (see verify.group_safety) need the dependency graph only
            record, self.outputs, self.train_only, self.train_readers = probe_model(model, example_inputs)
        self.layer_macs = record.macs
        self.uncounted = uncounted_layers(model, example_inputs, record=record) if probe else []
        traced = set(self.dg.module2node)
        self.untraced = sorted(n for n, m in model.named_modules() if n in record.ran and m not in traced
                               and is_counted(m))
        self.total_macs = sum(self.layer_macs.values())
        self.groups: dict[str, ChannelGroup] = {}
        self._limit = 4 * widest(model) + 1024
        self._only = None if roots is None else set(roots)
        self._build(include_coupled, family)
        if safety:
            self._decide_safety()

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def _members(self, group) -> list[Member]:
        """One Member per (layer, side) the group touches; its `per_channel` counts every distinct channel index
        the layer gets on that side, over all the dependencies that reach it (a layer that reads a channel at two
        positions, as after concatenating a tensor with a depthwise copy of itself in a ghost module, loses 2)."""
        touched: dict[tuple[str, str], tuple[str, set]] = {}
        n = max(1, len(group[0].idxs))
        for dep, idxs in group:
            mod = dep.target.module
            if not isinstance(mod, nn.Module) or mod not in self.names:
                continue
            side = "out" if self.dg.is_out_channel_pruning_fn(dep.handler) else "in"
            kind, seen = touched.setdefault((self.names[mod], side), (type(mod).__name__, set()))
            seen.update(int(i) for i in idxs)
        return [Member(name, kind, side, len(seen) / n) for (name, side), (kind, seen) in touched.items()]

    def _self_period(self, root: str, channels: int) -> int | None:
        """How many of its own channels removing one channel of `root`'s group removes: r when channel i takes
        i + channels/r, i + 2 channels/r, ... with it (a tensor concatenated with a depthwise copy of itself, as in
        ghost modules: the group then behaves like one through a grouped conv of r blocks); None when the channels
        it takes are not at such periodic positions. Checked for the first and the last channel of the first block."""
        root_mod = self.module(root)

        def taken(i: int) -> set[int]:
            return {int(j) for dep, idxs in self.tp_group(root, [i]) if dep.target.module is root_mod
                    and self.dg.is_out_channel_pruning_fn(dep.handler) for j in idxs}

        first = taken(0)
        r = len(first)
        if r == 1:
            return 1
        block = channels // r
        if channels % r or first != {b * block for b in range(r)}:
            return None
        return r if taken(block - 1) == {b * block + block - 1 for b in range(r)} else None

    def _beyond(self, group) -> str:
        """Why `group` indexes channels a layer does not have ('' when it does not): a reshape read as a flatten
        (window and head reshapes of transformer blocks) maps indices past a layer's width."""
        for dep, idxs in group:
            mod = dep.target.module
            if not idxs or mod not in self.names:
                continue
            pruner = self.dg.get_pruner_of_module(mod)
            if pruner is None:
                continue
            out = self.dg.is_out_channel_pruning_fn(dep.handler)
            n = pruner.get_out_channels(mod) if out else pruner.get_in_channels(mod)
            if n is not None and max(idxs) >= n:
                return (f"its channel indices map onto {self.names[mod]}'s {'output' if out else 'input'} channels "
                        f"beyond its {n} (through a reshape the tracer reads as a flatten)")
        return ""

    def _shuffled(self, group) -> str:
        """Why `group` cannot be cut because its channels pass a channel shuffle ('' when they pass none).

        A shuffle (view -> transpose -> view) interleaves g parts of its input at fixed positions (channel
        i * C/g + j goes to j * g + i), and what reads it (ShuffleNetV2's next split) cuts at fixed positions too.
        Removing channels keeps the order of the others, so every later channel lands on another position of the
        interleave and of the split: the pruned model would mix channels the dense one keeps apart. (Orders that
        survive exist only for rare combinations of channels across all the groups of a stage.)"""
        found = {n: sh for sh in shuffles(self.dg) for n in sh.nodes}
        for dep, _ in group:
            sh = found.get(dep.target)
            if sh is not None:
                return (f"its channels pass a channel shuffle ({sh.channels} channels interleaved from {sh.groups} "
                        "parts, view -> transpose -> view): removing some moves every later channel to another "
                        "position of the interleave, so no cut of this group alone is exact")
        return ""

    def _all_groups(self):
        """(root module, TP group or None, why not) for every conv/linear that starts a group, as
        `DependencyGraph.get_all_groups` forms them (a layer already in an earlier group's outputs starts none),
        with the index mappings computed once for all of them (see `depgraph.mapped_once`)."""
        dg = self.dg
        visited: set = set()
        ignored = list(dg.IGNORED_LAYERS_IN_TRACING)
        with mapped_once(dg, self._limit) as trav:
            for m in list(dg.module2node):
                if not isinstance(m, ROOT_TYPES) or m in visited or any(m is i for i in ignored):
                    continue
                if self._only is not None and self.names.get(m) not in self._only:
                    continue
                pruner = dg.get_pruner_of_module(m)
                if pruner is None or pruner.get_out_channels(m) is None:
                    continue
                try:
                    trav.seen.clear()
                    group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
                except IndexMappingDiverges as exc:
                    yield m, None, str(exc)
                    continue
                outs = [dep.target.module for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)]
                visited.update(o for o in outs if isinstance(o, nn.Module))
                if not any(o is i for o in outs for i in ignored):
                    yield m, group, ""

    def _build(self, include_coupled: bool, family: str | None) -> None:
        for root_mod, group, why in self._all_groups():
            root = self.names[root_mod]
            if group is None:  # refused: no group could be formed
                n = self.dg.get_pruner_of_module(root_mod).get_out_channels(root_mod)
                self.groups[root] = ChannelGroup(root=root, channels=n, members=[Member(root, type(root_mod).__name__,
                                                 "out")], writers=[root], macs=self.layer_macs.get(root, 0),
                                                 unsafe=True, kind="unsafe", reason=f"unsafe: {why}",
                                                 _total=self.total_macs)
                continue
            beyond = self._beyond(group) or self._shuffled(group)
            if beyond:  # refused before any trial: such a group cannot be cut
                n = self.dg.get_pruner_of_module(root_mod).get_out_channels(root_mod)
                self.groups[root] = ChannelGroup(root=root, channels=n, members=self._members(group), writers=[root],
                                                 macs=self.layer_macs.get(root, 0), unsafe=True, kind="unsafe",
                                                 reason=f"unsafe: {beyond}", _total=self.total_macs)
                continue
            members = self._members(group)
            writers = [m.name for m in members if m.side == "out" and is_counted(self.module(m.name))
                       and not is_depthwise(self.module(m.name))]
            writers += [m.name for m in members if m.side == "out" and m.kind == "PadShortcut"]
            touched = {m.name for m in members if is_counted(self.module(m.name))}
            g = ChannelGroup(root=root, channels=len(group[0].idxs), members=members, writers=writers,
                             macs=sum(self.layer_macs.get(n, 0) for n in touched))
            g._total = self.total_macs
            g.coupled = len(writers) > 1
            ops = [type(dep.target.grad_fn).__name__ for dep, _ in group
                   if dep.target.type == tp.ops.OPTYPE.ELEMENTWISE and dep.target.grad_fn is not None]
            summed = any(op.startswith(("AddBackward", "SubBackward")) for op in ops)
            concat = any(dep.target.type == tp.ops.OPTYPE.CONCAT for dep, _ in group)
            # several writers joined by a sum are a residual stream; joined only by a product (squeeze-excitation,
            # attention-style scaling) they are a gate, which stays block-internal for the scope rules
            g.kind = ("residual stream" if g.coupled and summed else "gate" if g.coupled
                      else "concat" if concat else "block-internal")
            partial = False
            for m in members:
                mod = self.module(m.name)
                if _grouped(mod):
                    g.ch_groups = max(g.ch_groups, mod.groups)
                    width = mod.out_channels if m.side == "out" else mod.in_channels
                    partial |= width != g.channels
            period = self._self_period(root, g.channels) if any(m.per_channel < 1 for m in members) else 1
            if period:
                g.ch_groups = math.lcm(g.ch_groups, period)
            readers = {m.name for m in members if m.side == "in"}
            if any(w in self.outputs for w in writers):
                g.kind, g.reason = "output", "network output: these channels reach a model output"
            elif period is None:
                g.reason = ("its channels are coupled to each other in a pattern that is not periodic (removing one "
                            "removes others of the same group at irregular positions)")
            elif partial:
                g.reason = "covers only part of a grouped conv's channels (cannot keep its groups even)"
            elif g.channels < 2:
                g.reason = "single channel"
            elif g.kind == "residual stream" and not include_coupled:
                g.reason = f"residual-coupled ({len(writers)} writers); pass include_coupled to prune it"
            elif family == "resnet" and not root.startswith("layer") and not include_coupled:
                g.reason = "stem: outside the papers' ResNet scope"
            elif family is None and readers & self.outputs and not include_coupled:
                out_readers = ", ".join(sorted(readers & self.outputs)[:2])
                g.reason = (f"classifier input: read by {out_readers}, whose output is a model output; outside the "
                            "default scope of unknown models")
            else:
                g.in_scope = True
            self.groups[root] = g

    def _decide_safety(self) -> None:
        """Cut a few channels of every group that could be pruned on a trial copy and verify (see
        `verify.group_safety`); a failing group leaves the scope with the reason. Groups read by layers that run
        only in train mode leave it first (their cut breaks train mode, where those layers read the channels the
        trace never saw consumed), so the trial of the others needs no bisection to find them."""
        from .surgery import verified_surgery
        from .verify import trial_picks, group_safety

        cands = {}
        for g in self.groups.values():
            if not g.in_scope:  # only what this scope could prune is tried (--include-coupled tries the streams)
                continue
            readers = sorted({r for w in g.writers for r in self.train_readers.get(w, ())})
            if readers:  # a cut would break train mode: found without a trial
                g.in_scope, g.unsafe, g.kind = False, True, "unsafe"
                more = f" and {len(readers) - 4} more" if len(readers) > 4 else ""
                g.reason = (f"unsafe: read by layers that run only in train mode ({', '.join(readers[:4])}{more}): "
                            "the trace never saw them")
                continue
            picks = trial_picks(g)
            if picks is None:
                g.in_scope, g.reason = False, "one channel per grouped-conv block"
                continue
            cands[g.root] = picks
        bad = group_safety(self.model, self.example_inputs, trial_graph, cands, verified_surgery)
        hint = ""
        if self.untraced:
            hint += f"; layers the trace never reached: {', '.join(self.untraced[:4])}"
        if self.train_only:
            hint += f"; layers that run only in train mode: {', '.join(sorted(self.train_only)[:4])}"
        for root, why in bad.items():
            g = self.groups[root]
            g.in_scope = False
            g.unsafe = True
            g.kind = "unsafe"
            g.reason = f"unsafe: cutting 1-2 of its channels on a trial copy is not exact ({why}){hint}"

    def group_of(self, layer_name: str) -> ChannelGroup:
        """The group whose writers include `layer_name` (a conv or linear)."""
        for g in self.groups.values():
            if layer_name == g.root or layer_name in g.writers:
                return g
        raise UserError(f"layer {layer_name!r} produces no prunable channel group")

    def scope(self) -> list[ChannelGroup]:
        """Groups the default scope prunes, in model order."""
        return [g for g in self.groups.values() if g.in_scope]

    def mapped_once(self):
        """Context in which `tp_group` reuses one computation of the graph's index mappings: for forming several
        groups while no layer changes width (no cut happens inside)."""
        return mapped_once(self.dg, self._limit)

    def tp_group(self, root: str, idxs: Sequence[int]):
        """Torch-Pruning group that removes output channels `idxs` of `root` and everything coupled. Raises
        IndexMappingDiverges (a UserError) for a root whose group cannot be formed (see `depgraph._NewIndices`)."""
        mod = self.module(root)
        fn = tp.prune_linear_out_channels if isinstance(mod, nn.Linear) else tp.prune_conv_out_channels
        with mapped_once(self.dg, self._limit) as trav:  # for the widths as they are now (after earlier cuts)
            trav.seen.clear()
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
            elif is_counted(mod):
                transposed = getattr(mod, "transposed", False)
                dim = 0 if (m.side == "out" or is_depthwise(mod)) else 1
                dim = 1 - dim if transposed else dim
                out.append((f"{m.name}.weight", mod.weight, dim))
        return out


def trial_graph(model: nn.Module, example_inputs: Any, roots: Sequence[str] | None = None) -> GroupGraph:
    """The bare dependency graph a safety trial cuts (no probe passes, no safety decision of its own), with the
    groups rooted at `roots` only (all when None)."""
    return GroupGraph(model, example_inputs, safety=False, probe=False, roots=roots)


def model_family(model: nn.Module) -> str | None:
    """'resnet', 'vgg' or None (any other model): from the registry name the model was built under, else from its
    class when it is torchvision's own ResNet (ResNeXt, Wide ResNet) or VGG built directly, so a user's
    `torchvision.models.resnet50()` gets the papers' scope just as `create_model("torchvision.resnet50")` does."""
    name = getattr(model, "regprune_arch", {}).get("name", "")
    base = name.split(".", 1)[-1]
    if re.match(r"(resnet|wide_resnet|resnext)\d", base):
        return "resnet"
    if base.startswith("vgg"):
        return "vgg"
    if not name:
        cls = type(model)
        if cls.__module__ == "torchvision.models.resnet" and cls.__name__ == "ResNet":
            return "resnet"
        if cls.__module__ == "torchvision.models.vgg" and cls.__name__ == "VGG":
            return "vgg"
    return None


def analyze(model: nn.Module, example_inputs: Any, include_coupled: bool = False) -> GroupGraph:
    """Trace `model` and return its channel groups with the default scope marked; groups whose removal a trial
    cut cannot verify exact are out of scope with the reason. Raises UserError when the model cannot be traced,
    runs no example input, or is wrapped in (Distributed)DataParallel."""
    return GroupGraph(model, example_inputs, include_coupled, model_family(model))
