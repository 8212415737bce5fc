"""Ratio languages (globs, the papers' stage lists, VGG index ranges) and the MACs-target solver."""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field

import torch.nn as nn

from .counting import channels, is_counted, is_depthwise, kept_layer_macs
from .errors import UserError
from .graph import ChannelGroup, GroupGraph

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


def _member_removal(graph: GroupGraph, removal: dict[str, int]) -> tuple[dict[str, float], dict[str, float]]:
    """Output and input channels each counted layer loses under `removal` (channels per group root).

    A member layer loses k times the channels it has per group channel, as the trace mapped them: H*W inputs
    per channel after a flatten, a share when it reads only part of the group (torch.split / chunk); each
    count is capped at the layer's width. A depthwise conv loses its k channels once, as outputs (its inputs are its
    outputs)."""
    rm_out: dict[str, float] = {}
    rm_in: dict[str, float] = {}
    for root, k in removal.items():
        if k <= 0:
            continue
        g = graph.groups[root]
        done: set[str] = set()
        for m in g.members:
            if m.name not in graph.layer_macs:
                continue
            mod = graph.module(m.name)
            if not is_counted(mod):
                continue
            c_out, c_in = channels(mod)
            side_out = m.side == "out" or is_depthwise(mod)
            if is_depthwise(mod):
                if m.name in done:
                    continue
                done.add(m.name)
            width = c_out if side_out else c_in
            lost = k * m.per_channel  # as traced: a flatten multiplies, a split part divides
            side = rm_out if side_out else rm_in
            side[m.name] = min(side.get(m.name, 0) + lost, width)
    return rm_out, rm_in


def estimate_macs(graph: GroupGraph, removal: dict[str, int]) -> int:
    """Per-sample MACs after removing `removal[root]` channels per group, from the graph's layer table (no
    surgery): each counted layer's dense MACs x kept fraction of outputs x kept fraction of inputs (see
    `_member_removal` for layers that see only part of a group). Never negative."""
    rm_out, rm_in = _member_removal(graph, removal)
    total = 0.0
    for name, macs in graph.layer_macs.items():
        mod = graph.module(name)
        c_out, c_in = channels(mod)
        total += kept_layer_macs(macs, c_out, c_in, rm_out.get(name, 0), rm_in.get(name, 0), is_depthwise(mod))
    return max(0, int(round(total)))


# reasons that put a group out of scope only while include_coupled is False, and what they name
_COUPLED_ONLY = {"residual-coupled": "residual streams", "stem": "the stem",
                 "classifier input": "the classifier input"}


def _coupled_hint(graph: GroupGraph) -> str:
    """'; --include-coupled ... reaches further' naming what it would add, when groups are out of scope only
    for want of include_coupled; else ''."""
    found = [what for prefix, what in _COUPLED_ONLY.items()
             if any(not g.in_scope and g.reason.startswith(prefix) for g in graph.groups.values())]
    if not found:
        return ""
    return (f"; --include-coupled (include_coupled=True in Python) also prunes {' and '.join(found)}, "
            "which reaches further")


def solve_target(graph: GroupGraph, keep_fraction: float, base: dict[str, float] | None = None,
                 round_to: int | None = None, *, asked: str | None = None,
                 hint: str | None = None) -> tuple[dict[str, float], float]:
    """Ratios (uniform over the scope, or proportional to `base`) whose plan keeps `keep_fraction` of the
    dense MACs, within 2% (relative); returns them with the kept fraction they give.

    `asked`: the target as the user wrote it, for messages (default "MACs target F"); `hint`: appended to the
    out-of-reach message (default: the --include-coupled hint when `base` is None and it applies).
    Raises UserError when no group is in scope, when even the most the scope can remove (every group down to
    one channel, or one block per grouped conv) keeps more than keep_fraction * 1.02 (the message names the
    best reachable speedup), or when channel steps are too coarse to land within 2%."""
    if not (0.0 < keep_fraction <= 1.0):
        raise UserError(f"MACs target {keep_fraction:g} out of range: expected a kept fraction in (0, 1]")
    asked = asked or f"MACs target {keep_fraction:g}"
    roots = list(base) if base else [g.root for g in graph.scope()]
    if not roots:
        raise UserError("nothing to prune: no channel group is in the prunable scope (see `regprune inspect`)"
                        + _coupled_hint(graph))
    weights = base or {r: 1.0 for r in roots}
    top = max(weights.values())
    tol = 0.02 * keep_fraction

    def ratios_at(t: float) -> dict[str, float]:
        return {r: min(t * weights[r] / top, 0.999) for r in roots}

    def frac_of(removal: dict[str, int]) -> float:
        return estimate_macs(graph, removal) / graph.total_macs

    def frac(t: float) -> float:
        return frac_of(plan_removal(graph, ratios_at(t), round_to))

    lo, hi = 0.0, 0.999 * top / min(weights.values())  # at hi every ratio is at its 0.999 cap
    if frac(hi) > keep_fraction + tol:
        best = frac(hi)
        if hint is None:
            hint = "" if base else _coupled_hint(graph)
        raise UserError(f"{asked} is out of reach for this scope: at most {1 / max(best, 1e-12):.2f}x "
                        f"(kept MACs fraction {best:.4f} with its {len(roots)} groups cut to their minimum width)"
                        + hint)
    for _ in range(40):
        mid = (lo + hi) / 2
        if frac(mid) > keep_fraction:
            lo = mid
        else:
            hi = mid
    # refine one channel step at a time from the coarse side, keeping ratios as even as possible; at the step
    # that crosses the target, try every group's step and keep the one that lands nearest
    removal = plan_removal(graph, ratios_at(lo), round_to)
    best = (abs(frac(hi) - keep_fraction), ratios_at(hi))
    step = round_to if round_to and round_to > 1 else 1

    def grow(rm: dict[str, int], r: str) -> dict[str, int]:
        return {**rm, r: rm[r] + max(step, graph.groups[r].ch_groups)}

    def as_ratios(rm: dict[str, int]) -> dict[str, float]:
        return {r: rm[r] / graph.groups[r].channels for r in roots}

    for _ in range(10_000):
        cur = frac_of(removal)
        if abs(cur - keep_fraction) < best[0]:
            best = (abs(cur - keep_fraction), as_ratios(removal))
        if cur <= keep_fraction:
            break
        cands = [r for r in roots if removal[r] + step <= graph.groups[r].channels - max(step, graph.groups[r].ch_groups)]
        if not cands:
            break
        r = min(cands, key=lambda q: (removal[q] / graph.groups[q].channels / (weights[q] / top), q))
        nxt = grow(removal, r)
        if frac_of(nxt) < keep_fraction - tol:  # the even step overshoots: the nearest single step instead
            for q in cands:
                trial = grow(removal, q)
                err = abs(frac_of(trial) - keep_fraction)
                if err < best[0]:
                    best = (err, as_ratios(trial))
        removal = nxt
    ratios = best[1]
    got = frac_of(plan_removal(graph, ratios, round_to))
    if abs(got - keep_fraction) > tol:
        coarse = f" (round_to={round_to})" if round_to and round_to > 1 else ""
        raise UserError(f"{asked} cannot be met within 2%: the nearest plan keeps {got:.4f} of the MACs "
                        f"({1 / max(got, 1e-12):.2f}x); one channel step of this scope{coarse} is too coarse")
    return ratios, got


@dataclass
class Plan:
    """What will be removed: ratio and channel count per group, and the MACs it gives."""

    ratios: dict[str, float]
    removal: dict[str, int]
    dense_macs: int
    pruned_macs: int
    uncounted: list = field(default_factory=list)  # (name, kind) of layers whose MACs the counter cannot see
    unrounded: list = field(default_factory=list)  # (root, kept width) of groups round_to could not round
    round_to: int | None = None

    @property
    def note(self) -> str:
        """A warning when the MACs (and so the speedup) leave out layers of kinds the counter does not know, and
        when `round_to` could not round some kept widths (a group no wider than the multiple, or one whose channel
        blocks set the step)."""
        notes = []
        if self.uncounted:
            names = ", ".join(f"{n or '(model)'} ({k})" for n, k in self.uncounted[:4])
            notes.append(f"MACs leave out {len(self.uncounted)} layer(s) of kinds the counter does not know "
                         f"({names}); the speedup counts the conv, linear and matrix-product MACs it sees")
        if self.round_note:
            notes.append(self.round_note)
        return "; ".join(notes)

    @property
    def round_note(self) -> str:
        """Which groups keep a width `round_to` could not round ('' when none)."""
        if not self.unrounded:
            return ""
        names = ", ".join(f"{r} keeps {w}" for r, w in self.unrounded[:4])
        return (f"round_to={self.round_to}: {len(self.unrounded)} group(s) keep a width that is not a multiple "
                f"({names}{', ...' if len(self.unrounded) > 4 else ''}): no wider than the multiple, or through a "
                "grouped conv (rounding is not combined with its channel blocks yet)")

    @property
    def speedup(self) -> float:
        return self.dense_macs / max(self.pruned_macs, 1)


def make_plan(graph: GroupGraph, spec: str | None = None, *, speedup: float | None = None,
              target_macs: float | None = None, skip: list[str] | None = None, round_to: int | None = None) -> Plan:
    """Turn a ratio spec and/or a MACs target into a removal plan for `graph`'s model.

    With a target alone the ratios are uniform over the scope; with a spec too they are scaled in proportion
    to it. Raises UserError for conflicting or out-of-range targets, a target the scope cannot reach within 2%
    (see `solve_target`), and a plan that removes nothing ("nothing to prune: ...")."""
    if isinstance(skip, str):
        skip = [skip]
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        spec = repr(float(spec))
    if spec is not None and not isinstance(spec, str):
        raise UserError(f"ratios must be a string like '*.conv1:0.5' or a number, not {type(spec).__name__}")
    for name, val in (("speedup", speedup), ("target_macs", target_macs), ("round_to", round_to)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float))):
            raise UserError(f"{name} must be a number, not {type(val).__name__} {val!r}")
    if round_to is not None and (int(round_to) != round_to or round_to < 1):
        raise UserError(f"round_to must be a positive whole number, not {round_to!r}")
    if speedup is not None and target_macs is not None:
        raise UserError("give either --speedup or --target-macs, not both")
    asked = None
    if speedup is not None:
        if not speedup >= 1.0:
            raise UserError(f"speedup {speedup:g} out of range: expected a number >= 1")
        target_macs = 1.0 / speedup
        asked = f"speedup {speedup:g}x"
    if not spec and target_macs is None:
        raise UserError("say how much to prune: --ratios SPEC, --speedup X or --target-macs F")
    base = parse_ratios(spec, graph, skip) if spec else None
    if base is not None and not base:
        raise UserError(f"nothing to prune: the ratio spec {spec!r} gives no in-scope group a ratio above 0"
                        + (" (after --skip)" if skip else "") + ("" if graph.scope() else _coupled_hint(graph)))
    hint = None
    if base is None and skip and target_macs is not None:  # solve over the groups the plan will keep
        base = {g.root: 1.0 for g in graph.scope() if not any(fnmatch.fnmatchcase(g.root, p) for p in skip)}
        hint = _coupled_hint(graph)
        if not base and graph.scope():
            raise UserError("nothing to prune: --skip excludes every in-scope group")
    if target_macs is not None:
        ratios, _ = solve_target(graph, target_macs, base, round_to, asked=asked, hint=hint)
    else:
        ratios = base
    if skip:
        ratios = {k: v for k, v in ratios.items() if not any(fnmatch.fnmatchcase(k, p) for p in skip)}
    removal = {k: v for k, v in plan_removal(graph, ratios, round_to).items() if v > 0}
    if not removal:
        if target_macs is not None and target_macs >= 1.0:
            why = f"{asked or f'MACs target {target_macs:g}'} keeps every channel"
        elif not ratios:
            why = "every in-scope group is skipped"
        else:
            why = "every selected group keeps all its channels at these ratios (too few channels or blocks)"
        raise UserError(f"nothing to prune: {why}")
    unrounded = [(r, graph.groups[r].channels - k) for r, k in removal.items()
                 if round_to and round_to > 1 and (graph.groups[r].channels - k) % round_to]
    return Plan(ratios={k: ratios[k] for k in removal}, removal=removal, dense_macs=graph.total_macs,
                pruned_macs=estimate_macs(graph, removal), uncounted=list(getattr(graph, "uncounted", [])),
                unrounded=unrounded, round_to=round_to)
