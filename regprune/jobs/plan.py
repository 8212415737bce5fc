"""Plans without data or training: what `regprune prune --dry-run` and `regprune inspect` print."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import torch

from ..api import l1_picks, plan_targets
from ..counting import count_macs, count_params
from ..graph import analyze
from ..models import create_model, model_info
from ..ratios import make_plan
from ..report import format_table
from ..surgery import apply_picks
from .common import assumed_shapes, model_kwargs
from .options import JobOptions
from .prune import check_plan_options, greg_config, prune_plan

__all__ = ["prune_plan_text", "inspect_text"]


def prune_plan_text(o: JobOptions) -> str:
    """The prune job's plan as lines of text: per-layer kept widths (or zeroed weights), MACs and speedup, GReg's
    schedule and its predicted effect, the fine-tuning; the dataset's shapes are assumed from its name (no data is
    read). Raises UserError when the options plan nothing or make no sense (the run's checks that need no base
    or data)."""
    model_info(o.run.model)
    check_plan_options(o)
    ch, size, classes, n = assumed_shapes(o)
    model = create_model(o.run.model, num_classes=classes, in_channels=ch, **model_kwargs(o))
    x = torch.zeros(1, ch, size, size)
    graph, plan = prune_plan(o, model, x)
    if o.prune.sparsity is not None:
        # what the run zeroes: ceil(sparsity * n), keeping at least one weight per layer
        sizes = {r: graph.module(r).weight.numel() for r in plan.ratios}
        rows = [{"layer": r, "weights": n_w, "zeroed": min(math.ceil(plan.ratios[r] * n_w - 1e-9), n_w - 1)}
                for r, n_w in sizes.items()]
    else:
        rows = [{"layer": r, "dense": graph.groups[r].channels, "kept": graph.groups[r].channels - k,
                 "ratio": f"{plan.ratios[r]:.3f}"} for r, k in plan.removal.items()]
    lines = [f"plan for {o.prune.method} on {o.run.model} ({o.data.name}, assumed {ch}x{size}x{size}, {classes} classes):",
             format_table(rows, list(rows[0])),
             f"MACs {plan.dense_macs / 1e6:.2f}M -> {plan.pruned_macs / 1e6:.2f}M, speedup {plan.speedup:.2f}x"]
    if o.prune.method in ("greg1", "greg2"):
        bs = o.prune.reg_batch_size or o.data.batch_size
        spe = max(1, math.ceil(n / bs)) if n else None
        cfg = greg_config(o, spe or 1)
        it = cfg.planned_iters(o.prune.method)
        ep = f" = {it['total'] / spe:.1f} epochs at batch {bs}" if spe else ""
        lines.append(f"regularization schedule: pick {it['pick']} + grow {it['grow']} + stabilize {it['stabilize']} "
                     f"= {it['total']} iterations{ep} (update_reg_interval {cfg.update_reg_interval}, "
                     f"reg_granularity_prune {cfg.reg_granularity_prune:g}, reg_upper_limit {cfg.reg_upper_limit:g}, "
                     f"lr_prune {cfg.lr_prune:g}, momentum {cfg.momentum:g}, penalty {cfg.penalty}, "
                     f"criterion {cfg.criterion})")
        pred = cfg.predict(o.prune.method)
        ratio = pred["predicted_ratio"]
        lines.append(f"predicted: integrated decay {pred['integrated_decay']:.2f} (ln {cfg.mag_ratio_limit:g} = "
                     f"{pred['needed']:.2f} needed), kept/pruned ratio "
                     f"{'> 1e6' if ratio > 1e6 else f'{ratio:.3g}'}, lr*lambda up to {pred['lr_lambda_max']:.3g} "
                     f"(stability bound {pred['stability_bound']:.3g})"
                     + (f"; GReg-2 pick phase integrates {pred['pick_decay']:.2f} (the paper's CIFAR schedule: 0.50)"
                        if o.prune.method == "greg2" else ""))
        if pred["warning"]:
            lines.append(f"warning: {pred['warning']}")
    lines.append(f"fine-tune: {o.finetune.epochs:g} epochs, lr {o.finetune.lr:g} ({o.finetune.lr_schedule})")
    return "\n".join(lines)


def inspect_text(model_name: str, *, num_classes: int | None = None, in_channels: int = 3,
                 input_size: int | None = None, shortcut: str | None = None, ratios: str | None = None,
                 speedup: float | None = None, target_macs: float | None = None, skip: list[str] | None = None,
                 round_to: int | None = None, include_coupled: bool = False, as_json: bool = False) -> str:
    """A model's channel groups, scope and MACs, and with a ratio spec (`ratios`, `speedup` or `target_macs`) the
    plan carried out with L1 picks on a copy and verified, as `prune` would; a table with notes, or one JSON
    object with `as_json`. Classes default to 1000 for torchvision/timm models and 10 otherwise, the input side
    to the model's native size. Raises UserError on an unknown model or a bad ratio spec."""
    info = model_info(model_name)
    classes = num_classes or (1000 if info.family in ("torchvision", "timm") else 10)
    size = input_size or info.input_size
    kw = {"shortcut": shortcut} if shortcut else {}
    model = create_model(model_name, num_classes=classes, in_channels=in_channels, **kw)
    x = torch.zeros(1, in_channels, size, size)
    graph = analyze(model, x, include_coupled=include_coupled)
    uncounted = graph.uncounted
    plan = pruned = None
    if ratios or speedup is not None or target_macs is not None:
        plan = make_plan(graph, ratios, speedup=speedup, target_macs=target_macs, skip=skip, round_to=round_to)
        # the plan is carried out on a copy with L1 picks and verified, as `prune` would
        clone = copy.deepcopy(model)
        cgraph = analyze(clone, x, include_coupled=include_coupled)
        pruned = apply_picks(cgraph, l1_picks(cgraph, plan_targets(cgraph, plan)))
    groups = [{"root": g.root, "channels": g.channels, "members": [m.name for m in g.members],
               "macs_share": round(g.macs_share, 5), "kind": g.kind, "in_scope": g.in_scope, "unsafe": g.unsafe,
               "reason": g.reason} for g in graph.groups.values()]
    if as_json:
        out: dict[str, Any] = {"model": model_name, "dense_macs": graph.total_macs, "dense_params": count_params(model),
                               "groups": groups, "uncounted_layers": [list(u) for u in uncounted]}
        if plan is not None:
            out.update(pruned_macs=count_macs(pruned, x), planned_macs=plan.pruned_macs,
                       speedup=round(graph.total_macs / max(count_macs(pruned, x), 1), 4),
                       pruned_params=count_params(pruned), ratios=plan.ratios, removed=plan.removal,
                       widths={r: graph.groups[r].channels - k for r, k in plan.removal.items()},
                       verification=pruned.regprune_verification, note=plan.note)
        return json.dumps(out)
    rows = []
    for g in graph.groups.values():
        row = {"group (root)": g.root, "kind": g.kind, "channels": g.channels, "members": len(g.members),
               "MACs %": f"{100 * g.macs_share:.1f}", "scope": "yes" if g.in_scope else f"no: {g.reason}"}
        if plan is not None:
            row["kept"] = g.channels - plan.removal.get(g.root, 0)
        rows.append(row)
    lines = [f"{model_name}: {graph.total_macs / 1e6:.2f} MMACs, {count_params(model) / 1e6:.3f} M params, "
             f"{len(graph.groups)} channel groups, {len(graph.scope())} in scope"]
    if rows:
        lines.append(format_table(rows, list(rows[0])))
        lines.append("MACs %: share of the model's MACs in the layers a group touches as producer or consumer; a "
                     "layer between two groups counts in both, so the column can sum past 100")
    if uncounted:
        lines.append(f"note: MACs leave out {len(uncounted)} layer(s) of kinds the counter does not know: "
                     + ", ".join(f"{n} ({k})" for n, k in uncounted[:5]))
    if plan is not None:
        real = count_macs(pruned, x)
        ver = pruned.regprune_verification
        lines.append(f"plan: {real / 1e6:.2f} MMACs, speedup {graph.total_macs / max(real, 1):.2f}x "
                     f"({len(plan.removal)} groups pruned); carried out on a copy and verified "
                     f"(max relative difference {ver['max_rel_diff']:.1e}, {' and '.join(ver['modes'])} mode)")
        if plan.round_note:
            lines.append(f"note: {plan.round_note}")
    return "\n".join(lines)
