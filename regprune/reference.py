"""The reference a pruned network is checked against: the dense model whose layers ignore the removed channels.

Every consumer of a removed channel gets the matching *input* weights set to zero (conv / linear input channels,
a transposed conv's input rows, an option-A shortcut's index), on a deep copy of the dense model. That is right
whatever sits between producer and consumer (BatchNorm shifts, per-channel bias parameters, activations,
squeeze-excitation gates). `regprune.verify` compares the pruned model with it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .counting import is_depthwise
from .errors import UserError
from .models.cifar import PadShortcut

__all__ = ["consumer_columns", "zero_consumers", "zero_inputs"]


def zero_inputs(mod: nn.Module, idxs: list[int]) -> None:
    """Make `mod` ignore its input channels `idxs` (indices into its input channel dimension), in place.

    Linear: weight columns; conv: the input slice of every output filter of the channel's group; transposed conv:
    the channel's weight rows; `PadShortcut`: index entries pointing at a removed channel become -1 (zero). Raises
    UserError for any other module kind."""
    idx = torch.tensor(sorted(set(idxs)), dtype=torch.long)
    with torch.no_grad():
        if isinstance(mod, nn.Linear):
            mod.weight[:, idx] = 0
        elif isinstance(mod, nn.modules.conv._ConvNd) and mod.transposed:
            mod.weight[idx] = 0  # (in, out/groups, k...): every input channel has its own row
        elif isinstance(mod, nn.modules.conv._ConvNd):
            per_in = mod.in_channels // mod.groups
            per_out = mod.out_channels // mod.groups
            for i in idx.tolist():
                b, j = divmod(i, per_in)
                mod.weight[b * per_out:(b + 1) * per_out, j] = 0
        elif isinstance(mod, PadShortcut):
            mod.index = torch.where(torch.isin(mod.index, idx), torch.full_like(mod.index, -1), mod.index)
        else:
            raise UserError(f"cannot build a reference for a {type(mod).__name__} that reads removed channels")


def consumer_columns(graph, picks: dict[str, list[int]]) -> list[tuple[str, list[int]]]:
    """(layer name, input-channel indices) of every layer that reads a removed channel, from the pre-surgery
    dependency graph (a `graph.GroupGraph`; `picks` maps group roots to the channel indices removed there;
    indices already mapped through concat, split and flatten)."""
    out = []
    with graph.mapped_once():  # nothing is cut here: the index mappings are computed once for all picks
        for root, idxs in picks.items():
            if idxs:
                out += _readers(graph, graph.tp_group(root, sorted(set(int(i) for i in idxs))))
    return out


def _readers(graph, group) -> list[tuple[str, list[int]]]:
    """(layer name, input-channel indices) of the layers in a Torch-Pruning group that read its channels."""
    out = []
    for item in group:
        mod = item.dep.target.module
        if graph.dg.is_out_channel_pruning_fn(item.dep.handler) or mod not in graph.names:
            continue
        if is_depthwise(mod) or isinstance(mod, nn.modules.batchnorm._BatchNorm):
            continue  # a depthwise conv's inputs are its outputs: their readers are zeroed instead
        # conv / linear / shortcut readers get their inputs zeroed; any other reader with a weight matrix is
        # listed too, and refused by zero_inputs
        if (isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd, PadShortcut))
                or any(p.dim() >= 2 for p in mod.parameters(recurse=False))):
            out.append((graph.names[mod], [int(i) for i in item.idxs]))
    return out


def zero_consumers(model: nn.Module, columns: list[tuple[str, list[int]]]) -> nn.Module:
    """A deep copy of the dense `model` whose layers ignore the removed channels: the reference.

    `columns` is `consumer_columns`'s result; `model` is left as it is. Raises UserError (see `zero_inputs`)."""
    ref = copy.deepcopy(model)
    for name, idxs in columns:
        zero_inputs(ref.get_submodule(name), idxs)
    return ref
