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
    from .verify import _CACHE  # noqa: F401  (group_safety caches by picks too)

    factory = lambda m, x: GroupGraph(m, x, safety=False)  # noqa: E731
    return group_safety(graph.model, graph.example_inputs, factory, picks, verified_surgery)


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
    """The k lowest-scored channels, respecting grouped-conv blocks (scores summed per block position)."""
    g = graph.groups[root]
    if g.ch_groups <= 1:
        return sorted(torch.argsort(scores)[:k].tolist())
    block = g.channels // g.ch_groups
    per_pos = scores.view(g.ch_groups, block).sum(0)
    rel = torch.argsort(per_pos)[: k // g.ch_groups].tolist()
    return sorted(b * block + r for b in range(g.ch_groups) for r in rel)


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, x) -> float:
    """Largest absolute difference between two models' outputs on `x` (eval mode; any input form)."""
    from torch.utils._pytree import tree_flatten

    a.eval()
    b.eval()
    pairs = zip(tree_flatten(call_model(a, x))[0], tree_flatten(call_model(b, x))[0])
    return max(float((u - v).abs().max()) for u, v in pairs if isinstance(u, torch.Tensor))


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
