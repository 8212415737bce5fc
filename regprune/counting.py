"""The project's one MACs and parameter counter: multiply-accumulates of every conv and linear layer, and of the
matrix products a forward computes by function calls (attention).

Counted kinds (`COUNTED`): Conv1d/2d/3d, ConvTranspose1d/2d/3d (grouped and depthwise included) and Linear,
also on inputs with leading dimensions (token sequences), by forward hooks. Function calls outside those layers
are counted too (`recording`): F.linear and F.conv1d/2d/3d (a layer's weights used functionally, as Swin's
attention does), matrix products (matmul, @, mm, bmm, baddbmm, addmm, two-operand einsum),
F.scaled_dot_product_attention (QK^T and AV) and nn.MultiheadAttention's F.multi_head_attention_forward (input
projections, QK^T, AV, output projection); that is what torchvision's published GFLOPS count. MACs are per
sample: the batch dimension (dim 0) is divided out. Layers that do multiply-accumulates this counter does not see
(recurrent layers, Bilinear, custom modules with weight matrices used by other ops) are listed by
`uncounted_layers`.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn

from .op_macs import function_macs

__all__ = ["COUNTED", "MacsRecord", "call_model", "output_tensors", "channels", "count_macs", "count_params",
           "hooked_forward", "is_counted", "is_depthwise", "kept_layer_macs", "layer_macs", "macs_hook", "recording",
           "uncounted_layers"]

COUNTED: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)
"""Module classes whose MACs are counted (every conv and transposed conv of any dimension, and Linear)."""

# kinds that carry parameters but no multiply-accumulates worth counting (per-channel scales, table look-ups)
_NOT_MACS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                         nn.Embedding, nn.EmbeddingBag, nn.PReLU) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
# kinds known to do multiply-accumulates the hooks cannot see
_UNCOUNTED_MACS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase, nn.Bilinear)

# modules a recording counted function-call MACs for that have no channels of their own (see `channels`)
_HOLDERS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def is_counted(mod: nn.Module) -> bool:
    """True when `mod`'s MACs are counted (a conv, transposed conv or linear layer of any dimension)."""
    return isinstance(mod, COUNTED)


def is_depthwise(mod: nn.Module) -> bool:
    """True for a depthwise conv (any dimension, not transposed): groups > 1 and groups == in_channels.

    Its input channels are its output channels, so removing one removes both (and their MACs once)."""
    return (isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed
            and mod.groups > 1 and mod.groups == mod.in_channels)


def channels(mod: nn.Module) -> tuple[int, int]:
    """(out, in) channel counts of a module in a MACs table (`layer_macs`): out_channels/in_channels of a conv or
    transposed conv, out_features/in_features of a Linear, (embed_dim, embed_dim) of an nn.MultiheadAttention, and
    (1, 1) for any other module a `recording` has counted function-call MACs for (attention products: channel
    pruning never removes any of its width, so `kept_layer_macs` keeps its MACs whole). Raises TypeError for any
    other module."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        return mod.out_channels, mod.in_channels
    if isinstance(mod, nn.Linear):
        return mod.out_features, mod.in_features
    if isinstance(mod, nn.MultiheadAttention):
        return mod.embed_dim, mod.embed_dim
    if mod in _HOLDERS:
        return 1, 1
    raise TypeError(f"{type(mod).__name__} is not a counted layer (conv, transposed conv or linear)")


def _call_macs(mod: nn.Module, inp: torch.Tensor, output: torch.Tensor) -> int:
    """Per-sample MACs of one call of a counted layer, from its input and output shapes.

    Conv (N, C, *S) -> (N, C', *S'): weight.numel() x prod(S') (weight.numel() already divides by groups).
    Transposed conv: weight.numel() x prod(S), every input position multiplies the whole kernel.
    Linear (N, ..., F) -> (N, ..., F'): weight.numel() x positions, positions = output.numel() / N / F'.
    Unbatched calls (a conv on (C, *S), a linear on (F,)) count as one sample."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        dims = mod.weight.dim() - 2
        spatial = inp.shape[-dims:] if mod.transposed else output.shape[-dims:]
        return int(mod.weight.numel() * math.prod(spatial))
    batch = output.shape[0] if output.dim() > 1 else 1
    return int(mod.weight.numel() * (output.numel() // batch // mod.out_features))


def macs_hook(name: str, out: dict[str, int]):
    """A forward hook adding one counted layer's per-sample MACs (see `_call_macs`) to out[name]; a layer
    called several times in one forward adds each call."""
    def hook(mod: nn.Module, inp: tuple, output: torch.Tensor) -> None:
        out[name] = out.get(name, 0) + _call_macs(mod, inp[0], output)
    return hook


def kept_layer_macs(macs, c_out: int, c_in: int, removed_out=0, removed_in=0, depthwise: bool = False):
    """A conv/linear layer's MACs once channels are removed: dense MACs x kept fraction of its outputs x kept
    fraction of its inputs (a depthwise conv's inputs are its outputs, so only the first). The removed counts
    may be ints (planning) or tensors (the differentiable gate counts of SPM)."""
    f_out = 1 - removed_out / c_out
    if depthwise:
        return macs * f_out
    return macs * f_out * (1 - removed_in / c_in)


def output_tensors(out: Any, strict: bool = False) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or nested tuples/lists/dicts of them), depth first, dict values in
    insertion order. Other leaves are skipped, or with `strict=True` raise TypeError naming their type."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o, strict)]
    if strict:
        raise TypeError(type(out).__name__)
    return []


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Run `model` on example inputs in any form a forward accepts, as Torch-Pruning's `build_dependency`:
    `model(x)` for a tensor (or any other single object), `model(*x)` for a tuple or list, `model(**x)` for a
    dict. Returns the model's output; no mode or grad handling (see `hooked_forward`)."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def hooked_forward(model: nn.Module, example_inputs: Any, hooks: list) -> Any:
    """One eval-mode, no-grad forward pass (`call_model`) with the given (already registered) hooks, which are
    removed afterwards; the model's training mode is restored. Returns the model's output.

    The whole example batch runs; MACs hooks divide the batch out, so counts are per sample for any batch."""
    flags = [(m, m.training) for m in model.modules()]  # each module's own mode comes back
    model.eval()
    try:
        with torch.no_grad():
            return call_model(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, f in flags:
            m.training = f


@dataclass
class MacsRecord:
    """What `recording` saw: per-sample MACs by module name (`macs`, final once the context exits), the names of
    the modules that ran (`ran`), and the parameters whose products were counted from function calls
    (`consumed`, by id)."""

    macs: dict[str, int] = field(default_factory=dict)
    ran: set[str] = field(default_factory=set)
    consumed: set[int] = field(default_factory=set)


class _FunctionMacs(torch.overrides.TorchFunctionMode):
    """Counts the MACs of torch function calls made outside counted layers (see `op_macs.function_macs`)."""

    def __init__(self, owners: dict[int, str], stack: list, totals: dict[str, int], consumed: set[int]) -> None:
        super().__init__()
        self.owners, self.stack, self.totals, self.consumed = owners, stack, totals, consumed

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.stack and self.stack[-1][1]:  # inside a counted layer: its hook counts it
            return out
        name = getattr(func, "__name__", "")
        try:
            parts = function_macs(name, args, kwargs or {}, out)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError):
            parts = []  # arguments in a form the formulas do not know: nothing counted
        for weight, macs in parts:
            owner = self.owners.get(id(weight)) if weight is not None else None
            if owner is None:
                owner = self.stack[-1][0] if self.stack else ""
            if weight is not None and id(weight) in self.owners:
                self.consumed.add(id(weight))
            self.totals[owner] = self.totals.get(owner, 0) + int(macs)
        return out


def _batch(example_inputs: Any) -> int:
    from torch.utils._pytree import tree_flatten

    for t in tree_flatten(example_inputs)[0]:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return max(int(t.shape[0]), 1)
    return 1


@contextlib.contextmanager
def recording(model: nn.Module, example_inputs: Any) -> Iterator[MacsRecord]:
    """Inside: forwards of `model` add their per-sample MACs to the yielded record, by module name. A counted layer
    (conv, linear) gets its own calls' MACs (see `_call_macs`); a function call outside counted layers adds to the
    layer whose weight it uses (a Linear used through F.linear, nn.MultiheadAttention's input projection, its
    out_proj), else to the innermost module running (attention products: timm's Attention, Swin's window
    attention; "" is the model itself). Function-call MACs are divided by the batch of `example_inputs` (dim 0 of
    its first tensor). The record's `macs` is complete once the context exits (hooks removed)."""
    rec = MacsRecord()
    stack: list[tuple[str, bool]] = []
    totals: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}
    owners = {id(p): n for n, m in model.named_modules() for p in m.parameters(recurse=False)}

    def enter(mod, inp):
        stack.append((names[mod], is_counted(mod)))

    def leave(mod, inp, out):
        name = names[mod]
        if stack and stack[-1][0] == name:
            stack.pop()
        rec.ran.add(name)
        if is_counted(mod):
            rec.macs[name] = rec.macs.get(name, 0) + _call_macs(mod, inp[0], out)

    hooks = []
    for m in model.modules():
        hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        with _FunctionMacs(owners, stack, totals, rec.consumed):
            yield rec
    finally:
        for h in hooks:
            h.remove()
    batch = _batch(example_inputs)
    mods = dict(model.named_modules())
    for name, macs in totals.items():
        rec.macs[name] = rec.macs.get(name, 0) + macs // batch
        if not is_counted(mods[name]) and not isinstance(mods[name], nn.MultiheadAttention):
            _HOLDERS.add(mods[name])


def layer_macs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Per-sample MACs by module name of every counted layer that ran and of every module that function calls
    were counted for (see `recording`); modules never called are absent."""
    with recording(model, example_inputs) as rec:
        hooked_forward(model, example_inputs, [])
    return rec.macs


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Total per-sample MACs: conv, transposed conv and linear layers and the matrix products of attention (QK^T
    and AV, the projections of nn.MultiheadAttention and of layers used through F.linear), as torchvision's
    published GFLOPS count them; no norm, activation, softmax or pooling MACs (see `recording`)."""
    return sum(layer_macs(model, example_inputs).values())


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _weight_like(p: torch.Tensor) -> bool:
    """A parameter that multiplies activations as a matrix: at least two dimensions of size > 1 and no leading
    dimension of 1 (such a tensor broadcasts over the batch and is added: position embeddings, class tokens).
    Biases and per-channel scales like ConvNeXt's (C, 1, 1) layer scale have one non-trivial dimension."""
    return p.dim() >= 2 and p.shape[0] > 1 and sum(s > 1 for s in p.shape) >= 2


def uncounted_layers(model: nn.Module, example_inputs: Any, record: MacsRecord | None = None) -> list[tuple[str, str]]:
    """(name, class name) of modules that ran in one forward pass on `example_inputs`, own parameters
    themselves (recurse=False), and do multiply-accumulates `count_macs` does not see: RNN/LSTM/GRU and their cells,
    Bilinear, and any other uncounted module with a weight-matrix-like parameter (see `_weight_like`) that no
    counted function call used. A module some function-call MACs were counted for (nn.MultiheadAttention, the
    attention modules of timm, Swin and MaxViT, whose other parameters are biases and position-bias tables) is
    not reported.
    Norm layers, embeddings, PReLU and per-channel parameters are not reported. In model order; the model itself is
    named "". `record`: a `recording` of a forward pass the caller already made (then no forward pass is made
    here)."""
    if record is None:
        with recording(model, example_inputs) as record:
            hooked_forward(model, example_inputs, [])
    out = []
    for name, m in model.named_modules():
        if name not in record.ran or name in record.macs or is_counted(m) or isinstance(m, _NOT_MACS):
            continue  # products counted for it (attention; its other parameters are biases and bias tables)
        own = [p for p in m.parameters(recurse=False) if id(p) not in record.consumed]
        if own and (isinstance(m, _UNCOUNTED_MACS) or any(_weight_like(p) for p in own)):
            out.append((name, type(m).__name__))
    return out
