"""What regprune adds to Torch-Pruning's dependency graph: the option-A shortcut's pruner, index mappings computed
once per batch of group formations and bounded in length, and the trace itself (with the mappings of
`channel_maps` for splits, concats and channel shuffles)."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
import torch_pruning.dependency.index_mapping as _tp_index_mapping

from . import channel_maps
from .errors import UserError
from .forward import cloned_inputs, modes_kept
from .models.cifar import PadShortcut

__all__ = ["PadShortcutPruner", "CUSTOM_PRUNERS", "IndexMappingDiverges", "mapped_once", "trace", "trace_failure",
           "widest"]


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


class IndexMappingDiverges(UserError):
    """A group's channel indices do not settle while they are mapped through the graph's reshapes (Torch-Pruning
    reads some window and head reshapes of transformer blocks as flattens): the group cannot be formed."""


# ---------------------------------------------------------------------------------------------- mappings once
# Torch-Pruning recomputes every reshape/concat/split index mapping of the whole graph each time it forms a
# group (`DependencyGraph.get_pruning_group`). The mappings depend only on the graph and the current layer widths,
# so while a graph is in `mapped_once` they are computed once on entry and reused for every group formed inside.
_ONCE: "weakref.WeakKeyDictionary[tp.DependencyGraph, _Traversal]" = weakref.WeakKeyDictionary()
_tp_update_index_mapping = _tp_index_mapping.update_index_mapping


@contextlib.contextmanager
def tp_quiet() -> Iterator[None]:
    """Torch-Pruning's own warnings silenced (unwrapped parameters it will cut along their last dimension, shape
    inference depth): regprune verifies every cut, and a Swin model printed over a hundred such lines."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch_pruning(\.|$)")
        yield


def _update_index_mapping(graph) -> None:
    if graph not in _ONCE:
        with tp_quiet():
            _tp_update_index_mapping(graph)


_tp_index_mapping.update_index_mapping = _update_index_mapping
channel_maps.install()


class _Traversal:
    """What one group formation has passed on so far: channel indices per (layer node, pruning function)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: dict[tuple[Any, Any], set[int]] = {}


class _NewIndices:
    """A dependency's index mappings (Torch-Pruning's, applied in order) that pass on only the channel indices
    its target has not been given yet in this group formation, one entry per index, sorted.

    TP's traversal stops at a layer it reaches again only when the index list is equal to one given before; through
    the window and head reshapes of transformer blocks (Swin, MaxViT) the same channels come back in other orders
    and subsets, and the lists multiplied (minutes per group). Every mapping is a function of each index alone, so
    giving each (layer, function) each index once forms the same group. A list longer than `limit` (more indices
    than any layer has channels: a reshape read as a flatten) raises IndexMappingDiverges."""

    __slots__ = ("key", "mappings", "trav", "as_list")

    def __init__(self, dep, trav: _Traversal) -> None:
        self.key, self.mappings, self.trav = (dep.target, dep.handler), [], trav
        self.as_list = [self]  # what the dependency's index_mapping is while the graph is mapped once

    def __call__(self, idxs):
        for mp in self.mappings:
            if mp is not None:
                # a flatten gives `stride` indices per index: refused before a list past the limit is built
                grows = isinstance(mp, _tp_index_mapping._FlattenIndexMapping) and not mp.reverse
                too_many = grows and len(idxs) * mp._stride > self.trav.limit
                idxs = idxs if too_many else mp(idxs)
                if too_many or len(idxs) > self.trav.limit:
                    raise IndexMappingDiverges(
                        "its channel indices do not settle through the model's reshapes (a mapping gives more "
                        f"than {self.trav.limit} indices, far more than any layer of the model has channels)")
        if idxs and max(i.idx for i in idxs) >= self.trav.limit:  # an offset applied round a cycle, again and again
            raise IndexMappingDiverges(
                "its channel indices do not settle: a mapping gives an index past any layer's width (a cycle in the "
                "traced graph, as through a recurrent layer)")
        seen = self.trav.seen.setdefault(self.key, set())
        new: dict[int, Any] = {}
        for i in idxs:
            if i.idx not in seen:
                new.setdefault(i.idx, i)
        seen.update(new)
        return [new[k] for k in sorted(new)]


def widest(model: nn.Module) -> int:
    """The most channels / features any tensor dimension of `model`'s layers can have (a bound for index lists)."""
    widths = [1]
    for m in model.modules():
        for a in ("in_channels", "out_channels", "in_features", "out_features", "num_features", "embed_dim"):
            v = getattr(m, a, None)
            if isinstance(v, int):
                widths.append(v)
        for p in m.parameters(recurse=False):
            widths.append(max(p.shape, default=1))
    return max(widths)


_MAPPED_AT: "weakref.WeakKeyDictionary[tp.DependencyGraph, tuple]" = weakref.WeakKeyDictionary()
_WRAPPERS: "weakref.WeakKeyDictionary[tp.DependencyGraph, tuple]" = weakref.WeakKeyDictionary()


def _widths(dg: tp.DependencyGraph) -> tuple:
    """Every traced layer's (out, in) channels and every traced parameter's shape: what the mappings depend on."""
    out = []
    for m in dg.module2node:
        if isinstance(m, nn.Parameter):
            out.append(tuple(m.shape))
            continue
        pruner = dg.get_pruner_of_module(m)
        out.append(None if pruner is None else (pruner.get_out_channels(m), pruner.get_in_channels(m)))
    return tuple(out)


@contextlib.contextmanager
def mapped_once(dg: tp.DependencyGraph, limit: int) -> Iterator[_Traversal]:
    """Inside: `dg`'s index mappings are computed once (on entry, for the current layer widths) and every group
    formed reuses them, passing each index on once (see _NewIndices; clear the yielded traversal's `seen` before
    each group). On exit TP's own mappings are put back. Nested uses share the outer one's mappings."""
    if dg in _ONCE:
        yield _ONCE[dg]
        return
    widths = _widths(dg)
    if _MAPPED_AT.get(dg) != widths:  # TP's mappings on the graph are for other widths (or never computed)
        with tp_quiet():
            _tp_update_index_mapping(dg)
        _MAPPED_AT[dg] = widths
    deps = [dep for node in dg.module2node.values() for dep in node.dependencies]
    trav, wrappers = _WRAPPERS.get(dg, (None, []))
    if trav is None or trav.limit != limit or [w.key for w in wrappers] != [(d.target, d.handler) for d in deps]:
        trav = _Traversal(limit)  # built once per graph (cuts change widths and mappings, not dependencies)
        wrappers = [_NewIndices(dep, trav) for dep in deps]
        _WRAPPERS[dg] = (trav, wrappers)
    trav.seen.clear()
    for dep, w in zip(deps, wrappers):
        w.mappings = dep.index_mapping  # TP's list for the current widths, put back on exit
        dep.index_mapping = w.as_list
    _ONCE[dg] = trav
    try:
        yield trav
    finally:
        del _ONCE[dg]
        for dep, w in zip(deps, wrappers):
            dep.index_mapping = w.mappings


# ---------------------------------------------------------------------------------------------- tracing
def trace_failure(exc: Exception) -> str:
    """One line on why Torch-Pruning could not trace a model."""
    import traceback

    what = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    frames = {f.name for f in traceback.extract_tb(exc.__traceback__)}
    if isinstance(exc, ZeroDivisionError) and "update_reshape_index_mapping" in frames:
        return ("a reshape that splits the channel dimension and regroups it in a way other than a channel shuffle "
                f"(view -> transpose(1, 2) -> view) is not supported by the tracer ({what})")
    if isinstance(exc, TypeError) and "update_concat_index_mapping" in frames:
        return ("the tracer could not infer the widths of a concatenation's inputs (its shape inference gave up "
                f"on the layers before it; {what})")
    return what


def trace(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of `model` on `example_inputs` (copied: in-place ops cannot change them),
    with regprune's pruners and mappings; every module's train/eval flag is put back. Raises UserError naming
    the cause when the tracer fails."""

    try:
        with modes_kept(model), tp_quiet():  # the tracer switches to eval mode
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=cloned_inputs(example_inputs), customized_pruners=CUSTOM_PRUNERS)
    except Exception as exc:  # tracing failures are the model's, not a bug of ours: say which
        raise UserError(f"cannot trace the model's channel dependencies: {trace_failure(exc)}") from exc

