"""Pruning from scratch: gates on every channel group (one shared gate per residual stream), nuclear-norm and
MACs losses during a search, gates frozen at S_max, then exact reconfiguration to a smaller dense model."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import engine as E
from ..counting import count_macs
from ..errors import UserError
from ..methods.spm import REF_DENSE_GMACS, REF_SHARE_SUM, SPMRegularizer, insert_gates
from ..models import create_model
from ..reconfigure import reconfigure
from ..report import compare_latency, format_table, latency_lines, plot_lines
from ..surgery import save_model
from .common import (JobInputs, RunDir, assumed_shapes, evaluate_on, example_input, job_inputs, job_loaders,
                     summary_row, train_config)
from .options import JobOptions
from .report import write_report

__all__ = ["scratch_job", "scratch_dry_run", "spm_overrides", "scratch_plan_text", "spm_settings", "snap_to_budget", "SnapResult",
           "cut_shares", "describe_scale"]

def spm_settings(dense_macs: int, epochs: float, extra: dict[str, Any]) -> dict[str, Any]:
    """Loss weights, MACs scale, warm-up, S_max and snap for a run, from the user's settings (`spm_overrides`).

    Defaults and their sources: alpha_nuc 0.001 and alpha_mac 0.5 (paper / official train.sh); mac_norm
    "matched" (the paper's MACs push relative to the task gradient at any network size, see
    `SPMRegularizer.mac_scale`); gates at the network's learning rate (official optimizer: one lr for all);
    warm-up 8/90 of the epochs (official train.sh: 8 of 90) unless `warmup_epochs` is given; search 65/90 of the
    epochs (official S_max 65); tie_spread 0.5 (gates of a group leave one by one, weakest weight first); budget
    snap at S_max off (the paper has none). `dense_macs` (per-sample MACs) is unused and kept for callers."""
    del dense_macs
    s = {
        "alpha_nuc": float(extra.get("alpha_nuc", 1e-3)),
        "alpha_mac": float(extra.get("alpha_mac", 0.5)),
        "nuc_every": int(extra.get("nuc_every", 1)),
        "mac_grad_inputs": bool(extra.get("mac_grad_inputs", False)),
        "mac_norm": extra.get("mac_norm") or "matched",
        "gate_lr_scale": float(extra.get("gate_lr_scale", 1.0)),
        "tie_spread": float(extra.get("tie_spread", 0.5)),
        "warmup_epochs": float(extra["warmup_epochs"]) if extra.get("warmup_epochs") is not None else epochs * 8 / 90,
        # the paper searches 65 of 90 epochs
        "search_epochs": float(extra.get("search_epochs", epochs * 65 / 90)),
        "exact_budget": bool(extra.get("exact_budget", False)),
        "snap_floor": float(extra.get("snap_floor", 0.1)),
    }
    if not (0 < s["search_epochs"] <= epochs):
        raise UserError(f"--search-epochs {s['search_epochs']:g} must lie in (0, --epochs {epochs:g}]")
    if not (0 <= s["warmup_epochs"] <= epochs):
        raise UserError(f"--warmup-epochs {s['warmup_epochs']:g} must lie in [0, --epochs {epochs:g}]")
    if not (0 <= s["snap_floor"] < 1):
        raise UserError(f"--snap-floor {s['snap_floor']:g}: expected a kept fraction of each group in [0, 1)")
    return s


def describe_scale(reg: SPMRegularizer) -> str:
    """One line: the MACs loss's scale and its push on an average gate at the start (all gates on)."""
    n = sum(reg.gates.groups[r].channels for r in reg.gates.roots)
    push = 2 * reg.mac_scale * (1 - reg.target_macs) * reg.dense_share_sum / max(n, 1)
    return (f"MACs loss: {reg.mac_scale:.4g} x (MACs fraction - {reg.target_macs:g})^2 ({reg.mac_norm} scale: "
            f"alpha_mac {reg.alpha_mac:g} x {REF_DENSE_GMACS:g}^2 GMACs^2 x S_ref {REF_SHARE_SUM:g} / S "
            f"{reg.dense_share_sum:.4f}); total push on the {n} gates at the start {2 * reg.mac_scale * (1 - reg.target_macs) * reg.dense_share_sum:.3g}"
            f" (mean {push:.3g} per gate); tie-break spread {reg.tie_spread:g}") if reg.mac_norm == "matched" else (
            f"MACs loss: {reg.mac_scale:.4g} x (MACs fraction - {reg.target_macs:g})^2 ({reg.mac_norm} scale); mean push "
            f"per gate at the start {push:.3g}; tie-break spread {reg.tie_spread:g}")


@dataclass
class SnapResult:
    """What the budget snap at S_max did: MACs fractions before/after, gates moved, flips undone."""

    before: float
    after: float
    flips: int = 0
    undone: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after, "flips": self.flips, "undone": self.undone}


def snap_to_budget(reg: SPMRegularizer, tol: float = 0.01, floor: float = 0.1) -> SnapResult:
    """Move gates until the hard MACs sit within `tol` (relative) of the budget; called before freezing.

    Not in the paper (off by default). Channels are moved in order of an importance score, the gated channel's
    weight magnitude relative to its group (`SPMRegularizer.channel_importance` / its mean): above the budget the
    least important channel that is on goes off, below it the most important that is off comes back. A group never
    goes below `floor` of its channels (nor below what the search left it, nor below its gate's `min_on`). Each
    channel moves at most once; a move that jumps over the whole tolerance window is undone, so the loop ends.
    Block-periodic (grouped-conv) gates are left to the search."""
    dense, target = reg.dense_macs, reg.target_macs
    before = frac = reg.current_macs() / dense
    gates = {r: reg.gates.gate(r) for r in reg.gates.roots if reg.gates.gate(r).repeat == 1}
    score = {}
    for r in gates:
        imp = reg.channel_importance(r).cpu()
        score[r] = imp / imp.mean().clamp_min(1e-12)
    minimum = {r: max(getattr(g, "min_on", 1), math.ceil(floor * g.channels)) for r, g in gates.items()}
    used: dict[str, set[int]] = {r: set() for r in gates}
    res = SnapResult(before, before)
    while abs(frac - target) > tol * target:
        turn_off = frac > target
        best = None
        for r, g in gates.items():
            on = g.hard().cpu().bool()
            if turn_off and int(on.sum()) <= minimum[r]:
                continue
            cand = (on if turn_off else ~on).clone()
            for i in used[r]:
                cand[i] = False
            if not bool(cand.any()):
                continue
            sc = score[r] if turn_off else -score[r]
            i = int(sc.masked_fill(~cand, float("inf")).argmin())
            if best is None or float(sc[i]) < best[0]:
                best = (float(sc[i]), r, i)
        if best is None:
            break
        _, r, i = best
        used[r].add(i)
        g = gates[r]
        with torch.no_grad():
            old = float(g.weight[i])
            g.weight[i] = g.threshold - 0.01 if turn_off else g.threshold + 0.01
        new = reg.current_macs() / dense
        if (new - target) * (frac - target) < 0 and abs(new - target) > tol * target:
            with torch.no_grad():
                g.weight[i] = old
            res.undone += 1
            continue
        res.flips += 1
        frac = new
    res.after = frac
    return res


def cut_shares(search_end: float, final: float) -> dict[str, float]:
    """How much of the MACs cut (1 - final fraction) the search did and how much the snap did (fractions of it)."""
    cut = 1.0 - final
    if cut <= 0:
        return {"search": 1.0, "snap": 0.0}
    return {"search": (1.0 - search_end) / cut, "snap": (search_end - final) / cut}


class _Monitor:
    """Logs the gated network's MACs each epoch (and freezes the gates at S_max, fractional epochs included)."""

    def __init__(self, reg: SPMRegularizer, search_epochs: float, exact_budget: bool = False,
                 snap_floor: float = 0.1) -> None:
        self.reg = reg
        self.search_epochs = search_epochs
        self.exact_budget = exact_budget
        self.snap_floor = snap_floor
        self.search_end: float | None = None  # MACs fraction where the search stopped (before any snap)
        self.snap: SnapResult | None = None

    def freeze(self, trainer) -> None:
        """S_max: record where the search ended, optionally snap to the budget, then fix the gates, losses off."""
        self.search_end = self.reg.current_macs() / self.reg.dense_macs
        if self.exact_budget:
            self.snap = snap_to_budget(self.reg, floor=self.snap_floor)
        self.reg.freeze()
        trainer.log({"event": "gates frozen", "macs_fraction": self.reg.current_macs() / self.reg.dense_macs,
                     "search_macs_fraction": self.search_end, "snap": self.snap.to_dict() if self.snap else None})

    def state_dict(self) -> dict:
        return {"search_end": self.search_end, "snap": self.snap.to_dict() if self.snap else None}

    def load_state_dict(self, state: dict) -> None:
        self.search_end = state.get("search_end")
        self.snap = SnapResult(**state["snap"]) if state.get("snap") else None

    def on_step_end(self, trainer) -> None:
        if not self.reg.frozen and trainer.epoch_float >= self.search_epochs - 1e-9:
            self.freeze(trainer)
        if trainer.step % 20 == 0:
            m = self.reg.metrics()
            trainer.set_progress(macs=f"{100 * m['macs_fraction']:.1f}%", frozen=int(self.reg.frozen))

    def on_epoch_end(self, trainer) -> None:
        m = self.reg.metrics()
        trainer.log({"kind": "spm", "macs_fraction": m["macs_fraction"], "frozen": self.reg.frozen,
                     "mac_loss": m.get("mac_loss"), "nuc_loss": m.get("nuc_loss"),
                     "kept": self.reg.kept_widths()})
        trainer.progress_line(f"  gated MACs {100 * m['macs_fraction']:.1f}% of dense "
                               f"(target {100 * self.reg.target_macs:.1f}%){' [frozen]' if self.reg.frozen else ''}")


def spm_overrides(o: JobOptions) -> dict[str, Any]:
    """The SPM settings the options give (`o.spm`'s fields that are not None, and `o.train.warmup_epochs` when
    given), for `spm_settings` to complete with the method's defaults."""
    _require_target(o)
    extra = {k: v for k, v in asdict(o.spm).items() if v is not None}
    if o.train.warmup_epochs is not None:  # else the official 8/90 of the epochs
        extra["warmup_epochs"] = o.train.warmup_epochs
    return extra


def _require_target(o: JobOptions) -> None:
    if o.prune.target_macs is None:
        raise UserError("--target-macs is required (fraction of dense MACs to keep, e.g. 0.41)")


def scratch_dry_run(o: JobOptions, extra: dict[str, Any] | None = None) -> int:
    """Print the search plan (groups gated, losses, schedule) without data (`regprune scratch --dry-run`); 0."""
    print(scratch_plan_text(o, extra))
    return 0


def scratch_plan_text(o: JobOptions, extra: dict[str, Any] | None = None) -> str:
    """The search plan of a scratch job (groups gated, losses, schedule), as lines of text, without data: the
    dataset's shapes are assumed from its name (see `assumed_shapes`). `extra`: SPM settings (default: the
    options', `spm_overrides`). Raises UserError on bad SPM settings."""
    _require_target(o)
    extra = spm_overrides(o) if extra is None else extra
    ch, size, classes, _ = assumed_shapes(o)
    model = create_model(o.run.model, num_classes=classes, in_channels=ch)
    gates = insert_gates(model, torch.zeros(1, ch, size, size))
    s = spm_settings(gates.graph.total_macs, o.train.epochs, extra)
    reg = SPMRegularizer(gates, o.prune.target_macs, alpha_nuc=s["alpha_nuc"], alpha_mac=s["alpha_mac"],
                         mac_norm=s["mac_norm"], tie_spread=s["tie_spread"])
    shared = sum(1 for r in gates.roots if gates.groups[r].coupled)
    lines = [f"pruning from scratch: {o.run.model} on {o.data.name} (assumed {ch}x{size}x{size}, {classes} classes)"]
    lines.append(f"{len(gates.roots)} gated channel groups ({shared} shared across a residual stream: SPM); dense "
                 f"{gates.graph.total_macs / 1e6:.2f} MMACs, target {100 * o.prune.target_macs:.1f}% = "
                 f"{o.prune.target_macs * gates.graph.total_macs / 1e6:.2f} MMACs")
    lines.append(f"losses: alpha_nuc {s['alpha_nuc']:g} (every {s['nuc_every']} steps), alpha_mac {s['alpha_mac']:g} "
                 f"({s['mac_norm']} scale), input counts {'differentiable' if s['mac_grad_inputs'] else 'constant'}, "
                 f"gate lr x{s['gate_lr_scale']:g}; at S_max the MACs are "
                 f"{'snapped to the budget by channel importance (floor ' + format(s['snap_floor'], 'g') + ' of each group)' if s['exact_budget'] else 'left where the search ended (no snap, as in the paper)'}")
    lines.append(describe_scale(reg))
    lines.append(f"schedule: {o.train.epochs:g} epochs, search (gates learning, losses on) for {s['search_epochs']:g}, then gates "
                 f"frozen; lr {o.train.lr:g} {o.train.lr_schedule} with {s['warmup_epochs']:g} warm-up epochs, momentum {o.train.momentum:g}, "
                 f"weight decay {o.train.weight_decay:g}{' (none on BN/bias)' if o.train.no_wd_bn_bias else ''}, label smoothing "
                 f"{o.train.label_smoothing:g}, batch {o.data.batch_size}")
    return "\n".join(lines)


def scratch_job(o: JobOptions, run: RunDir, extra: dict[str, Any] | None = None, *,
                inputs: JobInputs | None = None) -> dict[str, Any]:
    """Search with gates from random init, freeze at S_max, train on, reconfigure exactly, report. `extra`: SPM
    settings (default: the options', `spm_overrides`); `inputs`: the dataset and new model when already read
    (default: `job_inputs(o, "scratch")`). Raises UserError on a mistake in the settings, the data or the model
    (see `job_inputs`)."""
    _require_target(o)
    extra = spm_overrides(o) if extra is None else extra
    bundle, model, _ = inputs or job_inputs(o, "scratch")
    x = example_input(bundle)
    train_loader, test_loader = job_loaders(o, bundle)
    dense = copy.deepcopy(model)
    gates = insert_gates(model, x)
    s = spm_settings(gates.graph.total_macs, o.train.epochs, extra)
    reg = SPMRegularizer(gates, o.prune.target_macs, alpha_nuc=s["alpha_nuc"], alpha_mac=s["alpha_mac"],
                         nuc_every=s["nuc_every"], mac_grad_inputs=s["mac_grad_inputs"], mac_norm=s["mac_norm"],
                         gate_lr_scale=s["gate_lr_scale"], tie_spread=s["tie_spread"])
    s["mac_scale"] = reg.mac_scale
    s["share_sum"] = reg.dense_share_sum
    run.mark("settings", spm=s)
    if E.is_main():
        print(describe_scale(reg), flush=True)
    cfg = train_config(o, o.train, warmup=s["warmup_epochs"])
    monitor = _Monitor(reg, s["search_epochs"], s["exact_budget"], s["snap_floor"])
    trainer = E.Trainer(model, train_loader, test_loader, cfg, run_dir=run.path, phase="scratch",
                        hooks=[reg, monitor], extra_param_groups=reg.param_groups())
    trainer.fit(resume_from=run.checkpoint("scratch"))
    if not reg.frozen:
        monitor.freeze(trainer)
    model.cpu().eval()
    gated_metrics = evaluate_on(model, test_loader, o.run.device)
    model.cpu().eval()
    probe = next(iter(test_loader))[0][:16].cpu()
    with torch.no_grad():
        gated_out = model(probe)
    pruned = reconfigure(model, reg, x)
    pruned.eval()
    with torch.no_grad():
        diff = float((pruned(probe) - gated_out).abs().max())
    final = evaluate_on(pruned, test_loader, o.run.device)
    pruned.cpu()
    macs_frac = count_macs(pruned, x) / count_macs(dense, x)
    if E.is_main():
        save_model(pruned, run.file("model.safetensors"),
                   {"method": "spm", "dataset": bundle.name, "top1": final["top1"], "target_macs": o.prune.target_macs,
                    "macs_fraction": macs_frac, "seed": o.run.seed, "input_size": bundle.image_size})
    verification = getattr(pruned, "regprune_verification", None)
    run.mark("reconfigure", final=final, gated=gated_metrics, reconfig_max_abs_diff=diff, macs_fraction=macs_frac,
             verification=verification)

    lat = compare_latency({"dense": dense.eval(), "pruned": pruned}, x, repeats=20)
    rows = [summary_row("dense (same arch, untrained)", dense, x, None), summary_row("pruned from scratch (SPM)", pruned, x, final)]
    rows[0]["top1"] = "-"
    rows[0]["top5"] = "-"
    shown = [dict(r) for r in rows]  # the table shows "median ± IQR"; the JSON rows keep the numbers
    for r, d, k in zip(rows, shown, ("dense", "pruned")):
        r["cpu_ms_b1"], r["cpu_ms_b1_iqr"] = round(lat[k], 3), round(lat.stats[k].iqr_ms, 3)
        d["cpu_ms_b1"] = lat.stats[k].text(3)
    table = format_table(shown, list(shown[0])) + "\n" + latency_lines({"PyTorch CPU batch 1": lat})
    report = {"method": "spm", "model": o.run.model, "data": bundle.name, "rows": rows, "target_macs": o.prune.target_macs,
              "macs_fraction": macs_frac, "macs_gap_vs_target": macs_frac - o.prune.target_macs,
              "reconfig_max_abs_diff": diff, "gated": gated_metrics, "settings": s, "verification": verification,
              "search_macs_fraction": monitor.search_end, "snap": monitor.snap.to_dict() if monitor.snap else None,
              "cut_shares": cut_shares(monitor.search_end, macs_frac) if monitor.search_end is not None else None,
              "latency_speedup_b1": lat["dense"] / lat["pruned"], "latency_verdict_b1": lat.verdict().text(),
              "latency": {"cpu_b1": lat.to_dict()}}
    write_report(run, report, f"SPM on {o.run.model} / {bundle.name}", table, dense, pruned)
    if E.is_main():
        recs = [r for r in E.read_metrics(run.path / E.METRICS_FILE) if r.get("kind") == "spm"]
        if recs:
            plot_lines(run.path / "plots" / "macs.png",
                       {"gated network": ([r["epoch"] for r in recs], [100 * r["macs_fraction"] for r in recs])},
                       "epoch", "MACs (% of dense)", "MACs over the search", hline=100 * o.prune.target_macs)
    shares = report["cut_shares"]
    snap = (f" (the search ended at {100 * monitor.search_end:.1f}% of dense MACs"
            + (f"; of the cut, the search did {100 * shares['search']:.0f}% and the budget snap "
               f"{100 * shares['snap']:.0f}%" if monitor.snap else "; no budget snap") + ")"
            if monitor.search_end is not None else "")
    text = (f"{table}\nMACs {100 * macs_frac:.1f}% of dense (target {100 * o.prune.target_macs:.1f}%){snap}, "
            f"reconfiguration max |diff| {diff:.2e} (verified: {bool(verification)}), gated top-1 {gated_metrics['top1']:.2f} -> reconfigured "
            f"{final['top1']:.2f}; run in {run.path}")
    return {"table": text, "report": report}
