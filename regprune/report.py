"""Numbers a user compares (latency, size) and how they are shown: tables, JSON and plots."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

__all__ = ["compare_latency", "format_table", "write_widths", "plot_lines", "plot_widths", "layer_widths"]


@torch.no_grad()
def compare_latency(models: dict[str, nn.Module], x: torch.Tensor, repeats: int = 15, warmup: int = 3) -> dict[str, float]:
    """Median forward time (ms) of each model on `x`, measured interleaved in one run so drift hits all alike."""
    device = x.device
    for m in models.values():
        m.eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for m in models.values():
            m(x)
    sync()
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            t0 = time.perf_counter()
            m(x)
            sync()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width (out channels / out features) of every conv, transposed conv and linear layer, by name."""
    from .counting import channels, is_counted

    return {n: channels(m)[0] for n, m in model.named_modules() if is_counted(m)}


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain monospace table (also valid Markdown)."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def write_widths(path: Path, dense: nn.Module, pruned: nn.Module) -> dict[str, dict[str, int]]:
    """Per-layer dense and kept widths to JSON; returns the mapping."""
    d, p = layer_widths(dense), layer_widths(pruned)
    data = {n: {"dense": d[n], "kept": p.get(n, d[n])} for n in d}
    path.write_text(json.dumps(data, indent=1))
    return data


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(path: Path, series: dict[str, tuple[Iterable[float], Iterable[float]]], xlabel: str, ylabel: str,
               title: str, logy: bool = False, hline: float | None = None) -> Path:
    """One line per series (x values, y values) to a PNG."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=label, linewidth=1.2)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", linewidth=1)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if 1 < len(series) <= 12:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_widths(path: Path, widths: dict[str, dict[str, int]], title: str = "kept width per layer") -> Path:
    """Bar chart of dense vs kept widths per conv/linear layer."""
    plt = _plt()
    names = list(widths)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.18 * len(names)), 4.0), dpi=110)
    xs = range(len(names))
    ax.bar(xs, [widths[n]["dense"] for n in names], color="#cccccc", label="dense")
    ax.bar(xs, [widths[n]["kept"] for n in names], color="#3b75af", label="kept")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=90, fontsize=5)
    ax.set_ylabel("channels")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_filter_norms(path: Path, history: list[dict], layer: str, picks: list[int] | None) -> Path | None:
    """The paper's Figure 1: each filter's L1 norm against iteration, pruned and kept filters coloured apart."""
    pts = [(h["iter"], h["norms"][layer]) for h in history if layer in h.get("norms", {})]
    if not pts:
        return None
    plt = _plt()
    iters = [p[0] for p in pts]
    norms = torch.tensor([p[1] for p in pts])
    pruned = set(picks or [])
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for j in range(norms.shape[1]):
        ax.plot(iters, norms[:, j].tolist(), color="#d62728" if j in pruned else "#1f77b4", linewidth=0.7, alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("filter L1 norm")
    ax.set_title(f"{layer}: pruned (red) vs kept (blue) filters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
