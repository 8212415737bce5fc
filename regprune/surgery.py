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
from .io import atomic_path
from .graph import GroupGraph, analyze, trial_graph
from .verify import Mismatch, ModelSnapshot, Verification, consumer_columns, group_safety, verify_outputs, zero_consumers
from .methods.base import Picks
from .counting import call_model
from .models import create_model
from .models.cifar import PadShortcut

__all__ = ["apply_picks", "verified_surgery", "reference_model", "periodic_picks", "check_periodic", "pruned_copy", "max_abs_diff", "save_model", "load_model", "describe", "FORMAT"]

FORMAT = "regprune.model/1"


def _validate(graph: GroupGraph, picks: Picks) -> dict[str, list[int]]:
    clean: dict[str, list[int]] = {}
    for root, idxs in picks.items():
        if root not in graph.groups:
            raise UserError(f"picked layer {root!r} is not a channel-group root of this model")
        n = graph.groups[root].channels
        idxs = sorted(set(int(i) for i in idxs))
        if idxs and (idxs[0] < 0 or idxs[-1] >= n):
            raise UserError(f"picks for {root} must lie in 0..{n - 1}")
        if len(idxs) >= n:
            raise UserError(f"cannot remove all {n} channels of {root}")
        if idxs:
            check_periodic(graph, root, idxs)
            clean[root] = idxs
    return clean


def _surgery(graph: GroupGraph, picks: dict[str, list[int]]) -> None:
    """Torch-Pruning's group removal for every pick, in place; records the touched layers on the model."""
    touched: set[str] = set(getattr(graph.model, "regprune_pruned", []))
    param_owner = {id(p): n.rsplit(".", 1)[0] if "." in n else "" for n, p in graph.model.named_parameters()}
    for root, idxs in picks.items():
        group = graph.tp_group(root, idxs)
        for item in group:
            target = item.dep.target.module
            if target in graph.names:
                touched.add(graph.names[target])
            elif id(target) in param_owner:  # a parameter used directly in forward (layer scale, bias, ...)
                touched.add(param_owner[id(target)])
        group.prune()
    graph.model.regprune_pruned = sorted(touched)


def verified_surgery(graph: GroupGraph, picks: Picks) -> Verification:
    """Remove the picks in place and verify the result against the dense model with the removed channels
    zeroed (see `regprune.verify`). On a mismatch the model is restored in place and `Mismatch` is raised."""
    picks = _validate(graph, picks)
    reference = zero_consumers(graph.model, consumer_columns(graph, picks))
    snapshot = ModelSnapshot(graph.model)
    try:
        _surgery(graph, picks)
        return verify_outputs(graph.model, reference, graph.example_inputs)
    except BaseException:
        snapshot.restore()
        raise


def apply_picks(graph: GroupGraph, picks: Picks, verify: bool = True) -> nn.Module:
    """Remove `picks[root]` output channels of each group root, and every coupled channel, in place; returns
    the model with the check's result in `model.regprune_verification` (a dict).

    With `verify` (always, except for internal index probes) the pruned model is run at the graph's example
    inputs in eval and train mode and must equal the dense model with the removed channels zeroed; otherwise
    the model is restored and UserError names the group(s) at fault and what differed."""
    if not verify:
        _surgery(graph, _validate(graph, picks))
        return graph.model
    try:
        result = verified_surgery(graph, picks)
    except Mismatch as exc:
        clean = _validate(graph, picks)
        faulty = _faulty_groups(graph, clean) if len(clean) > 1 else {r: str(exc) for r in clean}
        detail = "; ".join(f"{r}: {why}" for r, why in list(faulty.items())[:3]) or str(exc)
        raise UserError(f"pruning refused, the result would not be exact (model left unchanged): {detail}") from None
    graph.model.regprune_verification = result.as_dict()
    return graph.model


def _faulty_groups(graph: GroupGraph, picks: dict[str, list[int]]) -> dict[str, str]:
    """The groups whose picks alone fail verification (bisection on copies of the restored model)."""
    return group_safety(graph.model, graph.example_inputs, trial_graph, picks, verified_surgery)


def reference_model(graph: GroupGraph, picks: Picks) -> nn.Module:
    """A copy of the dense model that computes what the pruned one must: every layer reading a picked channel
    ignores it (its input weights for that channel are zero)."""
    return zero_consumers(graph.model, consumer_columns(graph, _validate(graph, picks)))


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
    """The k lowest-scored channels of `root`'s group, respecting grouped-conv blocks (`methods.l1.pick_channels`)."""
    from .methods.l1 import pick_channels

    return pick_channels(scores, k, "min", blocks=graph.groups[root].ch_groups)


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, x) -> float:
    """Largest absolute difference between two models' outputs on `x` (eval mode; any input form)."""
    from torch.utils._pytree import tree_flatten

    a.eval()
    b.eval()
    pairs = zip(tree_flatten(call_model(a, x))[0], tree_flatten(call_model(b, x))[0])
    return max(float((u - v).abs().max()) for u, v in pairs if isinstance(u, torch.Tensor))


def _widths(mod: nn.Module) -> dict[str, Any]:
    """The width attributes of a layer that pruning changes (what its forward reads besides its tensors)."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        return {"in_channels": mod.in_channels, "out_channels": mod.out_channels, "groups": mod.groups}
    if isinstance(mod, nn.Linear):
        return {"in_features": mod.in_features, "out_features": mod.out_features}
    if isinstance(mod, nn.modules.batchnorm._NormBase):  # BatchNorm*, InstanceNorm*
        return {"num_features": mod.num_features}
    if isinstance(mod, nn.LayerNorm):
        return {"normalized_shape": list(mod.normalized_shape)}
    if isinstance(mod, nn.GroupNorm):
        return {"num_groups": mod.num_groups, "num_channels": mod.num_channels}
    if isinstance(mod, nn.PReLU):
        return {"num_parameters": mod.num_parameters}
    if isinstance(mod, PadShortcut):
        return {"in_planes": mod.in_planes}
    return {}


def describe(model: nn.Module) -> dict[str, Any]:
    """The architecture facts needed to rebuild `model` from its registry name and its tensors' shapes.

    "pruned" names the modules pruning touched (the owners of unwrapped parameters too: "" is the model
    itself); only their tensors may differ from the dense architecture on load. "widths" holds their width
    attributes (in/out channels, groups, normalized_shape, ...), exactly as the pruned model has them."""
    arch = getattr(model, "regprune_arch", None)
    mods = dict(model.named_modules())
    convs = {n: m.groups for n, m in mods.items() if isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1}
    pads = {n: m.in_planes for n, m in mods.items() if isinstance(m, PadShortcut)}
    pruned = sorted(set(getattr(model, "regprune_pruned", [])))
    widths = {n: w for n in pruned if n in mods and (w := _widths(mods[n]))}
    return {"format": FORMAT, "arch": arch, "conv_groups": convs, "pad_in_planes": pads,
            "pruned": pruned, "widths": widths}


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
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=header)
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file (or of `path/model.safetensors`); nothing is unpickled.

    The safetensors parse comes first: its 8-byte little-endian header length may begin with any byte (0x80,
    a pickle's protocol byte, too). Only a file that fails that parse and starts like a pickle (0x80) or a
    torch.save zip ("PK") is called a pickle.

    Raises:
        UserError: no such file; a folder without model.safetensors; a pickle-based file; any other file the
        safetensors parser refuses (truncated, corrupt).
    """
    from safetensors import safe_open

    if not path.exists():
        raise UserError(f"model file {path} does not exist")
    if path.is_dir():
        cand = path / "model.safetensors"
        if not cand.exists():
            raise UserError(f"{path} is a folder without model.safetensors")
        path = cand
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # any parse failure means a bad file (SafetensorError, OSError, ValueError, ...)
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80" or head[:2] == b"PK":
            raise UserError(f"{path} is a pickle-based file (torch.save) and is refused because loading it could run "
                            "code: load it into your model with your own trusted code, then write it with "
                            "regprune.save(model, path)") from None
        raise UserError(f"{path} is not a readable safetensors model file ({type(exc).__name__}: {str(exc)[:120]})") from None
    return state, header


def _infer_widths(mod: nn.Module, name: str, prefix: str, state: dict[str, torch.Tensor],
                  desc: dict[str, Any]) -> dict[str, Any]:
    """Width attributes read off the file's tensors (files written before "widths" was recorded)."""
    w = state.get(prefix + "weight")
    if isinstance(mod, nn.modules.conv._ConvNd) and w is not None:
        g = int(desc.get("conv_groups", {}).get(name, 1))
        # weight: (out, in/groups, k...) for a conv, (in, out/groups, k...) for a transposed conv
        first, second = int(w.shape[0]), int(w.shape[1]) * g
        if mod.transposed:
            return {"in_channels": first, "out_channels": second, "groups": g}
        return {"out_channels": first, "in_channels": second, "groups": g}
    if isinstance(mod, nn.Linear) and w is not None:
        return {"out_features": int(w.shape[0]), "in_features": int(w.shape[1])}
    if isinstance(mod, nn.modules.batchnorm._NormBase):
        t = state.get(prefix + "running_mean", w)
        return {} if t is None else {"num_features": int(t.shape[0])}
    if isinstance(mod, nn.LayerNorm) and w is not None:
        return {"normalized_shape": list(w.shape)}
    if isinstance(mod, nn.GroupNorm) and w is not None:
        return {"num_channels": int(w.shape[0])}
    if isinstance(mod, nn.PReLU) and w is not None:
        return {"num_parameters": int(w.numel())}
    if isinstance(mod, PadShortcut) and name in desc.get("pad_in_planes", {}):
        return {"in_planes": int(desc["pad_in_planes"][name])}
    return {}


def _fits_pruned(mod: nn.Module, tname: str, file_shape: torch.Size, own_shape: torch.Size) -> bool:
    """Whether the architecture's tensor of `own_shape` can have become `file_shape` by channel pruning:
    same rank, no dimension larger, a conv's kernel sizes unchanged, an unwrapped parameter cut along one dim."""
    if len(file_shape) != len(own_shape) or any(a > b for a, b in zip(file_shape, own_shape)):
        return False
    if isinstance(mod, nn.modules.conv._ConvNd) and tname == "weight":
        return tuple(file_shape[2:]) == tuple(own_shape[2:])
    if _widths(mod):
        return True  # Linear, norms, PReLU, PadShortcut: every dimension is a channel dimension
    return sum(a != b for a, b in zip(file_shape, own_shape)) <= 1


def _resize_to(model: nn.Module, state: dict[str, torch.Tensor], desc: dict[str, Any]) -> None:
    """Rebuild layers whose widths differ from the file so the state dict fits exactly (in place).

    Only modules in desc["pruned"] (layers pruning touched, and owners of pruned unwrapped parameters) change:
    their width attributes are set from desc["widths"] (or read off the tensors for older files), and each of
    their own parameters and buffers whose file shape pruning could have produced is replaced by an empty
    tensor of that shape. Anything else keeps the architecture's shape, so `load_model` reports it."""
    resizable = {n for n in desc.get("pruned") or [] if isinstance(n, str)}
    recorded = desc.get("widths") if isinstance(desc.get("widths"), dict) else {}
    for name, mod in list(model.named_modules()):
        if name not in resizable:
            continue  # only layers that pruning touched may differ from the architecture
        prefix = f"{name}." if name else ""
        allowed = _widths(mod)
        widths = recorded.get(name) if isinstance(recorded.get(name), dict) else None
        if widths is None:
            widths = _infer_widths(mod, name, prefix, state, desc)
        for attr, value in widths.items():
            if attr in allowed:  # never set anything else a file names
                setattr(mod, attr, tuple(int(v) for v in value) if attr == "normalized_shape" else int(value))
        for pname, p in list(mod.named_parameters(recurse=False)):
            key = prefix + pname
            if key in state and state[key].shape != p.shape and _fits_pruned(mod, pname, state[key].shape, p.shape):
                setattr(mod, pname, nn.Parameter(torch.empty(state[key].shape, dtype=p.dtype, device=p.device),
                                                 requires_grad=p.requires_grad))
        for bname, b in list(mod.named_buffers(recurse=False)):
            key = prefix + bname
            if b is not None and key in state and state[key].shape != b.shape and _fits_pruned(mod, bname, state[key].shape, b.shape):
                mod.register_buffer(bname, torch.empty(state[key].shape, dtype=b.dtype, device=b.device))


def load_model(path: str | os.PathLike, model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model file: rebuild the architecture by name (or onto `model`), fit widths, load weights.

    `model`, when given, is the dense model (it is resized in place); layers that pruning touched (listed in
    the file) take the file's widths, every other tensor must have the architecture's shape. Returns the model
    and the metadata dict saved with it.

    Raises:
        UserError: unreadable, pickle-based or non-regprune file; a custom model's file without `model`;
        tensors missing, unexpected or of a shape the architecture and the recorded pruning cannot explain.
    """
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
    try:
        _resize_to(model, state, desc)
    except (TypeError, ValueError, AttributeError):  # widths of the wrong kind: not a file regprune wrote
        raise UserError(f"{path} has a corrupt regprune header (layer widths)") from None
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
