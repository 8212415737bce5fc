"""Ratio languages (globs, the papers' stage lists, VGG index ranges) and the MACs-target solver."""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

import torch.nn as nn

from .counting import kept_layer_macs
from .errors import UserError
from .graph import ChannelGroup, GroupGraph, _is_depthwise

__all__ = ["parse_ratios", "removed_count", "plan_removal", "estimate_macs", "solve_target", "Plan", "make_plan"]

_NUM = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"


def _ratio(text: str, where: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise UserError(f"bad ratio {text!r} in {where}: expected a number in [0, 1)") from None
    if not (0.0 <= r < 1.0) or math.isnan(r):
        raise UserError(f"ratio {r} in {where} is out of range: expected 0 <= ratio < 1")
    return r


def removed_count(ratio: float, n: int, round_to: int | None = None) -> int:
    """Filters removed from a layer of `n`: min(ceil(ratio*n), n-1); kept widths optionally rounded to a multiple."""
    if ratio <= 0 or n < 2:
        return 0
    k = min(math.ceil(ratio * n - 1e-9), n - 1)
    if round_to and round_to > 1 and n > round_to:
        kept = max(round_to, int(round((n - k) / round_to)) * round_to)
        k = max(0, n - min(kept, n))
    return k


def _stages(graph: GroupGraph) -> dict[str, int]:
    """Stage index (1-based, as in the papers' lists) of each group root named `layer{i}...`."""
    out = {}
    for root in graph.groups:
        m = re.match(r"layer(\d+)\.", root)
        if m:
            out[root] = int(m.group(1))
    return out


def _parse_bracket(spec: str, graph: GroupGraph) -> dict[str, float]:
    body = spec.strip()[1:-1].strip()
    if not body:
        raise UserError(f"empty ratio list {spec!r}")
    if ":" in body:  # VGG form: conv index ranges over all convs in model order
        convs = [n for n, m in graph.model.named_modules() if isinstance(m, nn.Conv2d)]
        out: dict[str, float] = {}
        for part in body.split(","):
            m = re.fullmatch(r"\s*(\d+)(?:\s*-\s*(\d+))?\s*:\s*(\S+)\s*", part)
            if not m:
                raise UserError(f"bad index range {part.strip()!r} in {spec!r}: expected like [1-15:0.7]")
            a, b = int(m.group(1)), int(m.group(2) or m.group(1))
            r = _ratio(m.group(3), spec)
            if b < a or b >= len(convs):
                raise UserError(f"conv index range {a}-{b} in {spec!r} is outside 0-{len(convs) - 1} ({len(convs)} convs)")
            for i in range(a, b + 1):
                out[convs[i]] = r
        return out
    values = [_ratio(v.strip(), spec) for v in body.split(",")]
    stages = _stages(graph)
    if not stages:
        raise UserError(f"stage list {spec!r} needs a ResNet (layers named layer1, layer2, ...); use glob patterns instead")
    n_stages = max(stages.values())
    if len(values) != n_stages + 2:
        raise UserError(f"stage list {spec!r} has {len(values)} entries; this model needs {n_stages + 2}: [stem, "
                        + ", ".join(f"stage{i}" for i in range(1, n_stages + 1)) + ", fc]")
    if values[0] != 0 or values[-1] != 0:
        raise UserError(f"stage list {spec!r}: the stem and classifier entries must be 0 (the papers never prune them)")
    return {root: values[s] for root, s in stages.items()}


def parse_ratios(spec: str, graph: GroupGraph, skip: list[str] | None = None) -> dict[str, float]:
    """Per-group pruning ratios (keyed by group root) from any of the ratio languages."""
    spec = (spec or "").strip()
    if not spec:
        raise UserError("empty ratio spec: give e.g. '*.conv1:0.5', '[0,0.75,0.75,0.32,0]' or '[1-15:0.7]'")
    if spec.startswith("[") != spec.endswith("]"):
        raise UserError(f"unbalanced brackets in ratio spec {spec!r}")
    scope = {g.root: g for g in graph.scope()}
    if spec.startswith("["):
        raw = _parse_bracket(spec, graph)
        by_layer = {}
        for name, r in raw.items():
            g = _group_for(graph, name)
            if g is not None and g.root in scope:
                by_layer[g.root] = r
            elif g is not None and r > 0 and g.in_scope is False and spec.count(":") and not g.reason.startswith("network"):
                raise UserError(f"{name} is outside the prunable scope: {g.reason}")
        ratios = by_layer
    elif re.fullmatch(_NUM, spec):
        r = _ratio(spec, "ratio spec")
        ratios = {root: r for root in scope}
    else:
        ratios = {}
        for part in spec.split(","):
            if ":" not in part:
                raise UserError(f"bad ratio entry {part.strip()!r}: expected PATTERN:RATIO like '*layer*.conv1:0.5'")
            pat, val = part.rsplit(":", 1)
            pat = pat.strip()
            if not pat:
                raise UserError(f"empty pattern in ratio entry {part.strip()!r}")
            r = _ratio(val.strip(), f"'{part.strip()}'")
            hit = [root for root, g in scope.items() if any(fnmatch.fnmatchcase(n, pat) for n in [root] + g.writers)]
            if not hit:
                near = [g for g in graph.groups.values() if fnmatch.fnmatchcase(g.root, pat)]
                why = f" (matches {near[0].root}: {near[0].reason})" if near else ""
                raise UserError(f"pattern {pat!r} matches no prunable layer{why}; see `regprune inspect`")
            for root in hit:
                ratios[root] = r
    for pat in skip or []:
        ratios = {k: v for k, v in ratios.items() if not fnmatch.fnmatchcase(k, pat)}
    return {k: v for k, v in ratios.items() if v > 0}


def _group_for(graph: GroupGraph, layer: str) -> ChannelGroup | None:
    if layer in graph.groups:
        return graph.groups[layer]
    for g in graph.groups.values():
        if layer in g.writers:
            return g
    return None


def plan_removal(graph: GroupGraph, ratios: dict[str, float], round_to: int | None = None) -> dict[str, int]:
    """Number of channels each group loses."""
    out = {}
    for root, r in ratios.items():
        g = graph.groups[root]
        k = removed_count(r, g.channels, round_to)
        if g.ch_groups > 1:  # a grouped conv needs the same count removed from each of its channel blocks
            k = min(k - k % g.ch_groups, g.channels - g.ch_groups)
        out[root] = k
    return out


def estimate_macs(graph: GroupGraph, removal: dict[str, int]) -> int:
    """MACs after removing `removal[root]` channels per group, computed from the layer table without surgery."""
    rm_out: dict[str, int] = {}
    rm_in: dict[str, int] = {}
    for root, k in removal.items():
        for m in graph.groups[root].members:
            side = rm_out if m.side == "out" else rm_in
            side[m.name] = side.get(m.name, 0) + k
    total = 0.0
    for name, macs in graph.layer_macs.items():
        mod = graph.module(name)
        n_out = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
        n_in = mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features
        total += kept_layer_macs(macs, n_out, n_in, rm_out.get(name, 0), rm_in.get(name, 0), _is_depthwise(mod))
    return int(round(total))


def solve_target(graph: GroupGraph, keep_fraction: float, base: dict[str, float] | None = None,
                 round_to: int | None = None) -> tuple[dict[str, float], float]:
    """Scale ratios (uniform over the scope, or proportional to `base`) to the nearest achievable MACs fraction."""
    if not (0.0 < keep_fraction <= 1.0):
        raise UserError(f"MACs target {keep_fraction:g} out of range: expected a kept fraction in (0, 1]")
    roots = list(base) if base else [g.root for g in graph.scope()]
    if not roots:
        raise UserError("no prunable layer in scope to reach the MACs target")
    weights = base or {r: 1.0 for r in roots}
    top = max(weights.values())

    def ratios_at(t: float) -> dict[str, float]:
        return {r: min(t * weights[r] / top, 0.999) for r in roots}

    def frac(t: float) -> float:
        return estimate_macs(graph, plan_removal(graph, ratios_at(t), round_to)) / graph.total_macs

    lo, hi = 0.0, 0.999
    if frac(hi) > keep_fraction:
        best = ratios_at(hi)
        return best, frac(hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        if frac(mid) > keep_fraction:
            lo = mid
        else:
            hi = mid
    # refine one channel at a time from the coarse side, keeping ratios as even as possible
    ratios = ratios_at(lo)
    removal = plan_removal(graph, ratios, round_to)
    best = (abs(frac(hi) - keep_fraction), ratios_at(hi))
    step = round_to if round_to and round_to > 1 else 1
    for _ in range(10_000):
        cur = estimate_macs(graph, removal) / graph.total_macs
        if abs(cur - keep_fraction) < best[0]:
            best = (abs(cur - keep_fraction), {r: removal[r] / graph.groups[r].channels for r in roots})
        if cur <= keep_fraction:
            break
        cands = [r for r in roots if removal[r] + step <= graph.groups[r].channels - max(step, graph.groups[r].ch_groups)]
        if not cands:
            break
        r = min(cands, key=lambda q: (removal[q] / graph.groups[q].channels / (weights[q] / top), q))
        removal[r] += max(step, graph.groups[r].ch_groups)
    ratios = best[1]
    return ratios, estimate_macs(graph, plan_removal(graph, ratios, round_to)) / graph.total_macs


@dataclass
class Plan:
    """What will be removed: ratio and channel count per group, and the MACs it gives."""

    ratios: dict[str, float]
    removal: dict[str, int]
    dense_macs: int
    pruned_macs: int

    @property
    def speedup(self) -> float:
        return self.dense_macs / max(self.pruned_macs, 1)


def make_plan(graph: GroupGraph, spec: str | None = None, *, speedup: float | None = None,
              target_macs: float | None = None, skip: list[str] | None = None, round_to: int | None = None) -> Plan:
    """Turn a ratio spec and/or a MACs target into a removal plan for `graph`'s model."""
    if speedup is not None and target_macs is not None:
        raise UserError("give either --speedup or --target-macs, not both")
    if speedup is not None:
        if not speedup >= 1.0:
            raise UserError(f"speedup {speedup:g} out of range: expected a number >= 1")
        target_macs = 1.0 / speedup
    base = parse_ratios(spec, graph, skip) if spec else None
    if target_macs is not None:
        ratios, _ = solve_target(graph, target_macs, base, round_to)
    elif base is not None:
        ratios = base
    else:
        raise UserError("say how much to prune: --ratios SPEC, --speedup X or --target-macs F")
    if skip:
        ratios = {k: v for k, v in ratios.items() if not any(fnmatch.fnmatchcase(k, p) for p in skip)}
    removal = {k: v for k, v in plan_removal(graph, ratios, round_to).items() if v > 0}
    return Plan(ratios={k: ratios[k] for k in removal}, removal=removal, dense_macs=graph.total_macs,
                pruned_macs=estimate_macs(graph, removal))
