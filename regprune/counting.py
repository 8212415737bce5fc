"""The project's one MACs and parameter counter: multiply-accumulates of every conv and linear layer.

Counted kinds (`COUNTED`): Conv1d/2d/3d, ConvTranspose1d/2d/3d (grouped and depthwise included) and Linear,
also on inputs with leading dimensions (token sequences). MACs are per sample: the batch dimension (dim 0)
is divided out. Layers that do multiply-accumulates this counter does not see (attention whose projections
run functionally, recurrent layers, Bilinear, custom modules with weight matrices) are listed by
`uncounted_layers`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

__all__ = ["COUNTED", "call_model", "output_tensors", "channels", "count_macs", "count_params", "hooked_forward", "is_counted",
           "is_depthwise", "kept_layer_macs", "layer_macs", "macs_hook", "uncounted_layers"]

COUNTED: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)
"""Module classes whose MACs are counted (every conv and transposed conv of any dimension, and Linear)."""

# kinds that carry parameters but no multiply-accumulates worth counting (per-channel scales, table look-ups)
_NOT_MACS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                         nn.Embedding, nn.EmbeddingBag, nn.PReLU) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
# kinds known to do multiply-accumulates the hooks cannot see
_UNCOUNTED_MACS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase, nn.Bilinear)


def is_counted(mod: nn.Module) -> bool:
    """True when `mod`'s MACs are counted (a conv, transposed conv or linear layer of any dimension)."""
    return isinstance(mod, COUNTED)


def is_depthwise(mod: nn.Module) -> bool:
    """True for a depthwise conv (any dimension, not transposed): groups > 1 and groups == in_channels.

    Its input channels are its output channels, so removing one removes both (and their MACs once)."""
    return (isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed
            and mod.groups > 1 and mod.groups == mod.in_channels)


def channels(mod: nn.Module) -> tuple[int, int]:
    """(out, in) channel counts of a counted layer: out_channels/in_channels of a conv or transposed conv,
    out_features/in_features of a Linear. Raises TypeError for any other module (check `is_counted` first)."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        return mod.out_channels, mod.in_channels
    if isinstance(mod, nn.Linear):
        return mod.out_features, mod.in_features
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


def layer_macs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Per-sample MACs of every counted layer that ran, by module name (layers never called are absent)."""
    out: dict[str, int] = {}
    hooked_forward(model, example_inputs, [m.register_forward_hook(macs_hook(name, out))
                                           for name, m in model.named_modules() if is_counted(m)])
    return out


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Total per-sample MACs of conv, transposed conv and linear layers (the papers' convention: no norm,
    activation, pooling or attention-matmul MACs)."""
    return sum(layer_macs(model, example_inputs).values())


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _weight_like(p: torch.Tensor) -> bool:
    """A parameter that multiplies activations as a matrix: at least two dimensions of size > 1 and no leading
    dimension of 1 (such a tensor broadcasts over the batch and is added: position embeddings, class tokens).
    Biases and per-channel scales like ConvNeXt's (C, 1, 1) layer scale have one non-trivial dimension."""
    return p.dim() >= 2 and p.shape[0] > 1 and sum(s > 1 for s in p.shape) >= 2


def uncounted_layers(model: nn.Module, example_inputs: Any, ran: set[str] | None = None) -> list[tuple[str, str]]:
    """(name, class name) of modules that ran in one forward pass on `example_inputs`, own parameters
    themselves (recurse=False), and do multiply-accumulates `count_macs` does not see: nn.MultiheadAttention
    (its projections run functionally), RNN/LSTM/GRU and their cells, Bilinear, and any other uncounted module
    with a weight-matrix-like parameter (see `_weight_like`). Norm layers, embeddings, PReLU and per-channel
    parameters are not reported. In model order; the model itself is named "". `ran`: the names of the modules
    that ran, when a caller's own forward pass already recorded them (then no forward pass is made here)."""
    if ran is None:
        ran = set()
        hooks = [m.register_forward_hook(lambda mod, i, o, _n=name: ran.add(_n)) for name, m in model.named_modules()]
        hooked_forward(model, example_inputs, hooks)
    out = []
    for name, m in model.named_modules():
        if name not in ran or is_counted(m) or isinstance(m, _NOT_MACS):
            continue
        own = list(m.parameters(recurse=False))
        if own and (isinstance(m, _UNCOUNTED_MACS) or any(_weight_like(p) for p in own)):
            out.append((name, type(m).__name__))
    return out
