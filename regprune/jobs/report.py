"""The reports of the pruning jobs: one writer (report.json, report.md, plots) and the prune job's content."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn

from .. import engine as E
from ..data import DataBundle
from ..report import (compare_latency, format_table, latency_lines, plot_filter_norms, plot_lines, plot_widths,
                      try_onnxruntime_latency, write_widths)
from .common import RunDir, summary_row
from .options import JobOptions

__all__ = ["write_report", "write_plots", "prune_report"]


def write_report(run: RunDir, report: dict[str, Any], title: str, table: str, dense: nn.Module, pruned: nn.Module,
                 history: list[dict] | None = None, picks: dict | None = None) -> None:
    """Write report.json (`report`), report.md ("# title" and `table`) and the plots into the run directory; on
    rank 0 only (other ranks write nothing)."""
    if not E.is_main():
        return
    E.atomic_write_text(run.file("report.json"), json.dumps(E.log.to_jsonable(report), indent=1))
    E.atomic_write_text(run.file("report.md"), f"# {title}\n\n{table}\n")
    write_plots(run, dense, pruned, history or [], picks)


def _greg_lines(reg: dict | None, res: dict) -> list[str]:
    """The report's lines on GReg's regularization: measured vs predicted kept/pruned ratio, GReg-2's overlap with
    L1, and what BN recalibration did to the accuracy right after removal."""
    lines = []
    st = (reg or {}).get("status") or {}
    ratios = [v for v in (st.get("mag_ratio") or {}).values() if v is not None]
    pred = st.get("predicted") or {}
    if ratios:
        lines.append(f"GReg kept/pruned magnitude ratio at removal: min {min(ratios):.3g} over {len(ratios)} layers "
                     f"(schedule predicts {pred.get('predicted_ratio', float('nan')):.3g}, integrated decay "
                     f"{pred.get('integrated_decay', float('nan')):.2f}; growth stopped by {st.get('stop_reason')})")
    if st.get("overlap_l1"):
        ov = list(st["overlap_l1"].values())
        lines.append(f"GReg-2 picks shared with L1's: {100 * sum(ov) / len(ov):.1f}% on average over {len(ov)} layers")
    b, a = res.get("pruned_before_recal"), res.get("pruned_before_ft")
    if b and a and a.get("bn_recal_batches"):
        lines.append(f"BN recalibration ({a['bn_recal_batches']} batches): top-1 right after removal "
                     f"{b['top1']:.2f}% -> {a['top1']:.2f}%")
    return lines


def prune_report(o: JobOptions, run: RunDir, dense: nn.Module, pruned: nn.Module, x: torch.Tensor,
                 bundle: DataBundle, history: list[dict], picks: dict[str, list[int]] | None) -> dict[str, Any]:
    """The prune job's before/after table and report (written to the run directory), from its recorded results:
    accuracy, params, MACs and CPU latency (batch 1 and 64, ONNX Runtime when installed) of `dense` and `pruned`
    on inputs shaped like `x`. Returns {"table": text, "report": dict}."""
    res = run.state["results"]
    lat1 = compare_latency({"dense": dense, "pruned": pruned}, x, repeats=20)
    xb = x.expand(64, *x.shape[1:]).contiguous()
    lat64 = compare_latency({"dense": dense, "pruned": pruned}, xb, repeats=5, warmup=0)  # rounds calibrate = warm up
    ort1, ort_note = try_onnxruntime_latency({"dense": dense, "pruned": pruned}, x, repeats=20)
    lats = {"cpu_ms_b1": (lat1, 3), "cpu_ms_b64": (lat64, 2), "ort_ms_b1": (ort1, 3)}
    rows = [summary_row("dense", dense, x, res.get("base")), summary_row(f"pruned ({o.prune.method})", pruned, x, res.get("final"))]
    shown = [dict(r) for r in rows]  # the table shows "median ± IQR"; the JSON rows keep the numbers
    for r, d, k in zip(rows, shown, ("dense", "pruned")):
        for col, (lat, digits) in lats.items():
            if lat is not None:
                r[col], r[f"{col}_iqr"] = round(lat[k], digits), round(lat.stats[k].iqr_ms, digits)
                d[col] = lat.stats[k].text(digits)
    if o.prune.unstructured:
        total = sum(p.numel() for n, p in pruned.named_parameters() if p.dim() > 1)
        zeros = sum(int((p == 0).sum()) for n, p in pruned.named_parameters() if p.dim() > 1)
        rows[1]["sparsity"] = shown[1]["sparsity"] = f"{100 * zeros / total:.1f}%"
    columns = list(shown[0]) + (["sparsity"] if o.prune.unstructured else [])
    table = format_table(shown, columns)
    table += "\n" + latency_lines({"PyTorch CPU batch 1": lat1, "PyTorch CPU batch 64": lat64,
                                   "ONNX Runtime CPU batch 1": ort1})
    if ort_note:
        table += "\n" + ort_note
    for line in _greg_lines(res.get("regularize"), res):
        table += "\n" + line
    ver = res.get("verification")
    if ver:
        table += (f"\nverified: the pruned model equals the dense one with the removed channels zeroed "
                  f"({' and '.join(ver['modes'])} mode, max relative difference {ver['max_rel_diff']:.1e})")
    macs_speedup = rows[0]["MMACs"] / rows[1]["MMACs"]
    report = {"method": o.prune.method, "model": o.run.model, "data": bundle.name, "rows": rows, "macs_speedup": macs_speedup,
              "latency_speedup_b1": lat1["dense"] / lat1["pruned"], "latency_speedup_b64": lat64["dense"] / lat64["pruned"],
              "latency_verdict_b1": lat1.verdict().text(), "latency_verdict_b64": lat64.verdict().text(),
              "latency": {"cpu_b1": lat1.to_dict(), "cpu_b64": lat64.to_dict(),
                          "onnxruntime_b1": ort1.to_dict() if ort1 is not None else None,
                          "onnxruntime_note": ort_note or None},
              "pruned_before_finetune": res.get("pruned_before_ft"), "best_top1": res.get("best_top1"),
              "pruned_before_bn_recal": res.get("pruned_before_recal"),
              "plan": res.get("plan"), "regularize": res.get("regularize"),
              "verification": res.get("verification")}
    write_report(run, report, f"{o.prune.method} on {o.run.model} / {bundle.name}", table, dense, pruned, history, picks)
    return {"table": table, "report": report}


def write_plots(run: RunDir, dense: nn.Module, pruned: nn.Module, history: list[dict], picks: dict | None) -> None:
    """plots/ (widths, accuracy over the run's phases, GReg's penalty and filter norms from `history`) and
    widths.json."""
    plots = run.path / "plots"
    plots.mkdir(exist_ok=True)
    widths = write_widths(run.file("widths.json"), dense, pruned)
    plot_widths(plots / "widths.png", widths)
    metrics = E.read_metrics(run.path / E.METRICS_FILE) if (run.path / E.METRICS_FILE).exists() else []
    evals = [r for r in metrics if "test_top1" in r and r.get("kind") == "epoch"]
    if evals:
        series: dict[str, tuple[list, list]] = {}
        offset, last_phase, xs_all = 0.0, None, []
        for r in evals:
            if r["phase"] != last_phase and last_phase is not None:
                offset = xs_all[-1] if xs_all else 0.0
            last_phase = r["phase"]
            xs, ys = series.setdefault(r["phase"], ([], []))
            xs.append(offset + float(r.get("epoch", 0)))
            ys.append(float(r["test_top1"]))
            xs_all.append(xs[-1])
        plot_lines(plots / "accuracy.png", series, "epoch (phases in sequence)", "test top-1 (%)", "accuracy over the run")
    if history:
        its = [h["iter"] for h in history]
        plot_lines(plots / "penalty.png", {"lambda max (pruned)": (its, [h["lambda_max"] for h in history]),
                                           "lambda min": (its, [h["lambda_min"] for h in history])},
                   "iteration", "penalty lambda", "GReg penalty over time")
        for layer in history[-1].get("norms", {}):
            plot_filter_norms(plots / f"filter_norms_{layer}.png", history, layer, (picks or {}).get(layer))