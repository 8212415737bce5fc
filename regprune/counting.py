"""The project's one MACs and parameter counter: Conv2d and Linear multiply-accumulates only."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["count_macs", "count_params", "hooked_forward", "kept_layer_macs", "layer_macs", "macs_hook"]


def macs_hook(name: str, out: dict[str, int]):
    """A forward hook adding one Conv2d/Linear call's per-sample MACs to out[name]."""
    def hook(mod: nn.Module, inp, output: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            positions = output.shape[-1] * output.shape[-2]
        else:
            positions = output.numel() // output.shape[0] // mod.out_features
        out[name] = out.get(name, 0) + int(mod.weight.numel() * positions)
    return hook


def kept_layer_macs(macs, c_out: int, c_in: int, removed_out=0, removed_in=0, depthwise: bool = False):
    """A conv/linear layer's MACs once channels are removed: dense MACs x kept fraction of its outputs x kept
    fraction of its inputs (a depthwise conv's inputs are its outputs, so only the first). The removed counts
    may be ints (planning) or tensors (the differentiable gate counts of SPM)."""
    f_out = 1 - removed_out / c_out
    if depthwise:
        return macs * f_out
    return macs * f_out * (1 - removed_in / c_in)


def hooked_forward(model: nn.Module, example_inputs: torch.Tensor, hooks: list) -> object:
    """One eval-mode, no-grad forward pass on the first sample with the given (already registered) hooks,
    which are removed afterwards; the model's training mode is restored. Returns the model's output."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = example_inputs[:1] if isinstance(example_inputs, torch.Tensor) else example_inputs
            return model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def layer_macs(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, int]:
    """Per-sample MACs of every Conv2d/Linear, by module name (weight.numel() * output positions)."""
    out: dict[str, int] = {}
    hooked_forward(model, example_inputs, [m.register_forward_hook(macs_hook(name, out))
                                           for name, m in model.named_modules()
                                           if isinstance(m, (nn.Conv2d, nn.Linear))])
    return out


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Total per-sample MACs of conv and linear layers (the papers' convention)."""
    return sum(layer_macs(model, example_inputs).values())


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
