"""Index mappings Torch-Pruning gets wrong or lacks in its dependency graph: splits and concats along the channels,
whose part sizes are read off autograd, and the channel shuffle (view -> transpose -> view), whose permutation
maps each channel to its position after the shuffle. `install()` (done by `regprune.depgraph`) puts them in
Torch-Pruning's place."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import torch_pruning as tp
import torch_pruning.dependency.index_mapping as _tp_index_mapping
import torch_pruning.dependency.shape_infer as _tp_shape_infer
from torch_pruning._helpers import _HybridIndex

__all__ = ["ChannelShuffle", "ShuffleIndexMapping", "install", "shuffles"]


# ---------------------------------------------------------------------------------------------- channel shuffle
class ShuffleIndexMapping:
    """Maps channel indices through a fixed permutation: index i becomes `perm[i]` (an index past the permutation,
    which only a width the trace did not see can give, is dropped)."""

    def __init__(self, perm: Sequence[int]) -> None:
        self.perm = list(perm)

    def __call__(self, idxs: list) -> list:
        n = len(self.perm)
        return [_HybridIndex(idx=self.perm[i.idx], root_idx=i.root_idx) for i in idxs if 0 <= i.idx < n]


@dataclass
class ChannelShuffle:
    """A channel shuffle found in the trace: (N, C, *S) -> view (N, g, C/g, *S) -> swap dims 1 and 2 -> view
    (N, C, *S). Channel `i * (C/g) + j` before it is channel `j * g + i` after it (`perm`). `nodes` are its
    Torch-Pruning nodes, from the first view to the second."""

    groups: int
    channels: int
    perm: list[int]
    nodes: tuple


def _sizes(fn, output: bool) -> tuple[int, ...] | None:
    """The input (`output=False`) or output shape of the op behind autograd node `fn`, when autograd kept it."""
    try:
        if output:
            return tuple(int(s) for s in fn._input_metadata[0].shape)
        sizes = getattr(fn, "_saved_self_sym_sizes", None)
        sizes = getattr(fn, "_saved_self_sizes", None) if sizes is None else sizes
        return None if sizes is None else tuple(int(s) for s in sizes)
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return None


def _swaps_1_2(fn, rank: int) -> bool:
    """Whether autograd node `fn` is a transpose or permute that swaps dims 1 and 2 of a rank-`rank` tensor only."""
    name = fn.name() if hasattr(fn, "name") else ""
    if name.startswith("TransposeBackward"):
        dims = {int(getattr(fn, "_saved_dim0", -99)) % rank, int(getattr(fn, "_saved_dim1", -99)) % rank}
        return dims == {1, 2}
    if name.startswith("PermuteBackward"):
        dims = [int(d) % rank for d in getattr(fn, "_saved_dims", ())]
        return dims == [0, 2, 1] + list(range(3, rank))
    return False


def _only_output(node):
    return node.outputs[0] if len(node.outputs) == 1 else None


def _shuffle_from(node) -> ChannelShuffle | None:
    """The channel shuffle whose first view is reshape `node` (a Torch-Pruning node), or None."""
    src, mid = _sizes(node.grad_fn, False), _sizes(node.grad_fn, True)
    if not src or not mid or len(src) < 2 or len(mid) != len(src) + 1:
        return None
    n, c, rest = src[0], src[1], src[2:]
    g, per = mid[1], mid[2]
    if mid[0] != n or tuple(mid[3:]) != rest or g * per != c or g < 2 or per < 2:
        return None
    swap = _only_output(node)
    if swap is None or swap.grad_fn is None or not _swaps_1_2(swap.grad_fn, len(mid)):
        return None
    nodes = [node, swap]
    nxt = _only_output(swap)
    if nxt is not None and nxt.grad_fn is not None and nxt.grad_fn.name().startswith("CloneBackward"):
        nodes.append(nxt)
        nxt = _only_output(nxt)
    if nxt is None or nxt.type != tp.ops.OPTYPE.RESHAPE:
        return None
    if _sizes(nxt.grad_fn, False) != (n, per, g) + rest or _sizes(nxt.grad_fn, True) != src:
        return None
    nodes.append(nxt)
    perm = [j * g + i for i in range(g) for j in range(per)]  # channel i * per + j -> j * g + i
    return ChannelShuffle(g, c, perm, tuple(nodes))


_SHUFFLES: "weakref.WeakKeyDictionary[tp.DependencyGraph, dict]" = weakref.WeakKeyDictionary()


def _set_mapping(src, dst, mapping) -> None:
    for dep in src.dependencies:
        if dep.target is dst:
            dep.index_mapping[0] = mapping


def _find_shuffles(graph) -> dict:
    """Every channel shuffle of `graph`, keyed by its nodes (computed once per graph: shapes are the trace's)."""
    found = _SHUFFLES.get(graph)
    if found is None:
        found = {}
        for node in graph.module2node.values():
            if node.type == tp.ops.OPTYPE.RESHAPE and node not in found:
                sh = _shuffle_from(node)
                if sh is not None:
                    found.update({n: sh for n in sh.nodes})
        _SHUFFLES[graph] = found
    return found


def shuffles(graph) -> list[ChannelShuffle]:
    """The channel shuffles of a traced `graph` (a Torch-Pruning DependencyGraph), in trace order."""
    out: list[ChannelShuffle] = []
    for sh in _find_shuffles(graph).values():
        if not any(sh is s for s in out):
            out.append(sh)
    return out


_tp_update_reshape_index_mapping = _tp_index_mapping.update_reshape_index_mapping


def _update_reshape_index_mapping(graph, node) -> None:
    """Torch-Pruning's reshape mapping, except on a channel shuffle: its first view passes indices on through
    the permutation (forward) and its inverse (backward); the other nodes of the shuffle pass them unchanged."""
    sh = _find_shuffles(graph).get(node)
    if sh is None:
        _tp_update_reshape_index_mapping(graph, node)
        return
    first, swap = sh.nodes[0], sh.nodes[1]
    if node is first:
        inverse = [0] * len(sh.perm)
        for i, p in enumerate(sh.perm):
            inverse[p] = i
        _set_mapping(first, swap, ShuffleIndexMapping(sh.perm))
        _set_mapping(swap, first, ShuffleIndexMapping(inverse))


# ---------------------------------------------------------------------------------------------- splits and concats
# Torch-Pruning reads a split's part sizes off autograd fields this torch no longer has and then infers them from
# the consumers (a concat reading one part counts the whole concat); it skips a concat whose output width its shape
# inference gets wrong (behind a channel shuffle); and it pairs parts with consumers in trace order. Here splits
# and concats along the channels of (N, C) and (N, C, *S) tensors take their part sizes from autograd, and each
# consumer of a split the part it reads (by autograd's output number). Rank-3 tensors are left to Torch-Pruning:
# their dim 1 is the token dimension of transformers as often as the channels of a Conv1d.
def _saved_dim(fn) -> int | None:
    """An autograd node's saved `dim`, negative dims decoded (autograd hands -1 over as 2**64 - 1)."""
    dim = getattr(fn, "_saved_dim", None)
    if dim is None:
        return None
    dim = int(dim)
    return dim - 2 ** 64 if dim >= 2 ** 63 else dim


def _channel_dim(fn) -> bool:
    shape = _sizes(fn, False) or _sizes(fn, True)
    dim = _saved_dim(fn)
    return bool(shape) and dim is not None and len(shape) != 3 and dim % len(shape) == 1


def _split_parts(node) -> tuple[list[int], list[int]] | None:
    """(part sizes, the part each of `node.outputs` reads) of a split along the channels, or None."""
    fn = node.grad_fn
    if fn is None or not _channel_dim(fn):
        return None
    total = _sizes(fn, False)[1]
    sizes = getattr(fn, "_saved_split_sizes", None)
    if sizes is not None:
        sizes = [int(s) for s in sizes]
    elif getattr(fn, "_saved_split_size", None):
        size = int(fn._saved_split_size)
        sizes = [size] * (total // size) + ([total % size] if total % size else [])
    if not sizes or sum(sizes) != total:
        return None
    parts, taken = [], {}
    for out in node.outputs:
        nrs = [k for f, k in getattr(out.grad_fn, "next_functions", ()) if f is fn]
        i = taken.get(id(out), 0)
        if i >= len(nrs) or not 0 <= nrs[i] < len(sizes):
            return None
        taken[id(out)] = i + 1
        parts.append(int(nrs[i]))
    return sizes, parts


def _concat_sizes(node, dim: int = 1) -> list[int] | None:
    """The widths along `dim` of a concat's inputs, in the order of `node.inputs`, or None."""
    fn = node.grad_fn
    nxt = list(fn.next_functions) if fn is not None else []
    if not nxt or len(nxt) != len(node.inputs) or any(f is None or f is not n.grad_fn
                                                      for (f, _), n in zip(nxt, node.inputs)):
        return None
    try:
        return [int(f._input_metadata[k].shape[dim]) for f, k in nxt]
    except (AttributeError, IndexError, RuntimeError):
        return None


def _fix_parts(graph) -> None:
    for node in graph.module2node.values():
        if node.type == tp.ops.OPTYPE.SPLIT:
            found = _split_parts(node)
            if found is not None:
                node.module.split_sizes = found[0]
                node.module.offsets = [sum(found[0][:i]) for i in range(len(found[0]) + 1)]
                node.module.regprune_parts = found[1]
        elif node.type == tp.ops.OPTYPE.CONCAT:
            sizes = _concat_sizes(node) if node.grad_fn is not None and _channel_dim(node.grad_fn) else None
            if sizes is not None:
                node.module.concat_sizes = sizes
                node.module.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
                node.module.regprune_parts = list(range(len(sizes)))


_tp_init_shape_information = _tp_shape_infer.init_shape_information


def _init_shape_information(graph) -> None:
    _tp_init_shape_information(graph)
    _fix_parts(graph)


def _map_parts(node, others, sizes: list[int], parts: list[int], slot: int, outward, inward) -> None:
    """Put `outward(offset=span)` on the dependency from `node` to each of `others` (its outputs for a split, its
    inputs for a concat) and `inward(offset=span)` on the one back, in mapping slot `slot`; `span` is the channel
    range of part `parts[i]` of `others[i]` at the current part sizes."""
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    done: list = []
    for other, k in zip(others, parts):
        span = offsets[k:k + 2]
        for src, dst, mapping in ((node, other, outward), (other, node, inward)):
            for dep in src.dependencies:
                if dep.target is dst and not any(dep is d for d in done):
                    dep.index_mapping[slot] = mapping(offset=span)
                    done.append(dep)
                    break


_tp_update_split_index_mapping = _tp_index_mapping.update_split_index_mapping
_tp_update_concat_index_mapping = _tp_index_mapping.update_concat_index_mapping


def _update_split_index_mapping(graph, node) -> None:
    parts = getattr(node.module, "regprune_parts", None)
    if parts is None or not node.enable_index_mapping:
        _tp_update_split_index_mapping(graph, node)
        return
    m = _tp_index_mapping._SplitIndexMapping  # reverse=False takes the part's offset off, reverse=True adds it
    _map_parts(node, node.outputs, node.module.split_sizes, parts, 0,
               lambda offset: m(offset=offset, reverse=False), lambda offset: m(offset=offset, reverse=True))


def _update_concat_index_mapping(graph, node) -> None:
    parts = getattr(node.module, "regprune_parts", None)
    if parts is None or not node.enable_index_mapping:
        dim = _saved_dim(node.grad_fn) if node.grad_fn is not None else None
        if node.module.concat_sizes is None and dim is not None and dim < 0:
            # Torch-Pruning reads a negative dim (a channels-last concat: Swin's patch merging) as autograd's
            # unsigned 2**64 - 1, takes it for a channel concat and infers the part widths through the layers
            # before it, giving up (None, then a TypeError) past its recursion depth in Swin-S/B's 18-block
            # stage: the widths come from autograd instead
            node.module.concat_sizes = _concat_sizes(node, dim)
        _tp_update_concat_index_mapping(graph, node)
        return
    m = _tp_index_mapping._ConcatIndexMapping  # reverse=True takes the part's offset off, reverse=False adds it
    # in slot 1, as Torch-Pruning does: slot 0 is a split's, when a split part feeds the concat directly
    _map_parts(node, node.inputs, node.module.concat_sizes, parts, 1,
               lambda offset: m(offset=offset, reverse=True), lambda offset: m(offset=offset, reverse=False))


def install() -> None:
    """Put this module's mappings in Torch-Pruning's place (every later trace and group formation uses them);
    calling it again changes nothing."""
    _tp_index_mapping.update_reshape_index_mapping = _update_reshape_index_mapping
    _tp_index_mapping.update_split_index_mapping = _update_split_index_mapping
    _tp_index_mapping.update_concat_index_mapping = _update_concat_index_mapping
    _tp_shape_infer.init_shape_information = _init_shape_information
