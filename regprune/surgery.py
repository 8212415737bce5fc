"""Physical removal of picked channels, the lossless check, and the pickle-free model file format."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import UserError
from .graph import GroupGraph, analyze
from .methods.base import Picks
from .models import create_model
from .models.cifar import PadShortcut

__all__ = ["apply_picks", "zero_channels", "periodic_picks", "check_periodic", "pruned_copy", "max_abs_diff", "save_model", "load_model", "describe", "FORMAT"]

FORMAT = "regprune.model/1"


def apply_picks(graph: GroupGraph, picks: Picks) -> nn.Module:
    """Remove `picks[root]` output channels of each group root, and every coupled channel, in place."""
    touched: set[str] = set(getattr(graph.model, "regprune_pruned", []))
    for root, idxs in picks.items():
        if root not in graph.groups:
            raise UserError(f"picked layer {root!r} is not a channel-group root of this model")
        n = graph.groups[root].channels
        if len(idxs) >= n:
            raise UserError(f"cannot remove all {n} channels of {root}")
        if idxs:
            check_periodic(graph, root, list(idxs))
            group = graph.tp_group(root, sorted(set(int(i) for i in idxs)))
            touched.update(graph.names[item.dep.target.module] for item in group
                           if item.dep.target.module in graph.names)
            group.prune()
    graph.model.regprune_pruned = sorted(touched)
    return graph.model


def zero_channels(graph: GroupGraph, picks: Picks) -> list:
    """Forward hooks that force the picked channels' activations to zero in the dense model; returns handles."""
    handles = []
    for root, idxs in picks.items():
        if not idxs:
            continue
        for item in graph.tp_group(root, sorted(idxs)):
            mod = item.dep.target.module
            depthwise = isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels
            if not (graph.dg.is_out_channel_pruning_fn(item.dep.handler) or depthwise):
                continue
            if not isinstance(mod, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, PadShortcut)):
                continue
            index = torch.tensor(sorted(set(int(i) for i in item.idxs)), dtype=torch.long)

            def hook(_mod, _inp, out, _idx=index):
                out = out.clone()
                out[:, _idx] = 0
                return out

            handles.append(mod.register_forward_hook(hook))
    return handles


def check_periodic(graph: GroupGraph, root: str, idxs: list[int]) -> None:
    """Refuse picks that a grouped conv cannot take: the same positions must go in every channel block."""
    g = graph.groups[root]
    if g.ch_groups <= 1:
        return
    block = g.channels // g.ch_groups
    rel = [sorted(i - b * block for i in idxs if b * block <= i < (b + 1) * block) for b in range(g.ch_groups)]
    if any(r != rel[0] for r in rel):
        raise UserError(f"{root}'s channels pass through a grouped conv ({g.ch_groups} groups): "
                        "picks must remove the same positions in every channel block")


def periodic_picks(graph: GroupGraph, root: str, scores: torch.Tensor, k: int) -> list[int]:
    """The k lowest-scored channels, respecting grouped-conv blocks (scores summed per block position)."""
    g = graph.groups[root]
    if g.ch_groups <= 1:
        return sorted(torch.argsort(scores)[:k].tolist())
    block = g.channels // g.ch_groups
    per_pos = scores.view(g.ch_groups, block).sum(0)
    rel = torch.argsort(per_pos)[: k // g.ch_groups].tolist()
    return sorted(b * block + r for b in range(g.ch_groups) for r in rel)


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference between two models' outputs on `x` (eval mode)."""
    a.eval()
    b.eval()
    return float((a(x) - b(x)).abs().max())


def describe(model: nn.Module) -> dict[str, Any]:
    """The architecture facts needed to rebuild `model` from its registry name and its tensors' shapes."""
    arch = getattr(model, "regprune_arch", None)
    convs = {n: m.groups for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups != 1}
    pads = {n: m.in_planes for n, m in model.named_modules() if isinstance(m, PadShortcut)}
    return {"format": FORMAT, "arch": arch, "conv_groups": convs, "pad_in_planes": pads,
            "pruned": list(getattr(model, "regprune_pruned", []))}


def save_model(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write weights and architecture description to one safetensors file (atomic; no pickle)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # shared storage is not allowed in safetensors: clone where two names alias
    seen: dict[int, str] = {}
    for k, v in state.items():
        if v.data_ptr() in seen and v.numel():
            state[k] = v.clone()
        seen[v.data_ptr()] = k
    header = {"regprune": json.dumps(describe(model)), "meta": json.dumps(meta or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata=header)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise UserError(f"model file {path} does not exist")
    if path.is_dir():
        cand = path / "model.safetensors"
        if not cand.exists():
            raise UserError(f"{path} is a folder without model.safetensors")
        path = cand
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise UserError(f"{path} is a pickle-based file (torch.save); it is refused because loading it could run "
                        "code. Convert it with your own trusted code to a state_dict and use `regprune import`")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, Exception) as exc:  # any parse failure means a bad file
        raise UserError(f"{path} is not a readable safetensors model file ({type(exc).__name__}: {str(exc)[:120]})") from None
    return state, header


def _resize_to(model: nn.Module, state: dict[str, torch.Tensor], desc: dict[str, Any]) -> None:
    """Rebuild layers whose widths differ from the file so the state dict fits exactly."""
    groups = desc.get("conv_groups", {})
    pads = desc.get("pad_in_planes", {})
    resizable = set(desc.get("pruned", []))
    for name, mod in list(model.named_modules()):
        if name not in resizable:
            continue  # only layers that pruning touched may differ from the architecture
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.Conv2d) and prefix + "weight" in state:
            w = state[prefix + "weight"]
            g = int(groups.get(name, 1))
            mod.out_channels, mod.in_channels, mod.groups = w.shape[0], w.shape[1] * g, g
        elif isinstance(mod, nn.Linear) and prefix + "weight" in state:
            mod.out_features, mod.in_features = state[prefix + "weight"].shape
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and prefix + "running_mean" in state:
            mod.num_features = state[prefix + "running_mean"].shape[0]
        elif isinstance(mod, PadShortcut) and name in pads:
            mod.in_planes = int(pads[name])
        for pname, p in list(mod.named_parameters(recurse=False)):
            key = prefix + pname
            if key in state and state[key].shape != p.shape:
                setattr(mod, pname, nn.Parameter(torch.empty(state[key].shape, dtype=p.dtype), requires_grad=p.requires_grad))
        for bname, b in list(mod.named_buffers(recurse=False)):
            key = prefix + bname
            if b is not None and key in state and state[key].shape != b.shape:
                mod.register_buffer(bname, torch.empty(state[key].shape, dtype=b.dtype))


def load_model(path: str | os.PathLike, model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model file: rebuild the architecture by name (or onto `model`), fit widths, load weights."""
    path = Path(path)
    state, header = _read(path)
    try:
        desc = json.loads(header.get("regprune", "null"))
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError:
        raise UserError(f"{path} has a corrupt regprune header") from None
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise UserError(f"{path} is a safetensors file but not a regprune model file (no '{FORMAT}' header)")
    if model is None:
        arch = desc.get("arch")
        if not arch:
            raise UserError(f"{path} was saved from a custom model: pass the dense model, regprune.load(path, model=MyNet())")
        model = create_model(arch["name"], **arch.get("kwargs", {}))
    _resize_to(model, state, desc)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:5])}")
        if wrong:
            parts.append("shape mismatch: " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:5]))
        raise UserError(f"{path} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    if desc.get("arch"):
        model.regprune_arch = desc["arch"]
    model.regprune_pruned = list(desc.get("pruned", []))
    return model, meta


def pruned_copy(model: nn.Module, example_inputs: torch.Tensor, picks: Picks, include_coupled: bool = False) -> nn.Module:
    """A physically pruned deep copy of `model` (the original is untouched)."""
    clone = copy.deepcopy(model)
    graph = analyze(clone, example_inputs, include_coupled=include_coupled)
    return apply_picks(graph, picks)
