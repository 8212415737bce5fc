"""Numbers a user compares (latency, size) and how they are shown: tables, JSON and plots."""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

__all__ = ["compare_latency", "onnxruntime_latency", "try_onnxruntime_latency", "latency_lines", "measure_interleaved",
           "latency_verdict", "system_load", "LatencyStats", "LatencyVerdict", "LatencyComparison", "format_table",
           "write_widths", "pyplot", "plot_lines", "plot_widths", "plot_filter_norms", "layer_widths"]


@dataclass
class LatencyStats:
    """One model's forward time over the interleaved rounds (milliseconds per call).

    Each sample is the median per-call time of one round's torch.utils.benchmark blocked_autorange.
    """

    samples_ms: list[float]
    median_ms: float
    q1_ms: float
    q3_ms: float

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> "LatencyStats":
        """Median and quartiles (inclusive method) of `samples_ms`.

        Raises:
            ValueError: no samples, or one that is not a finite number > 0.
        """
        xs = [float(v) for v in samples_ms]
        if not xs or not all(math.isfinite(v) and v > 0 for v in xs):
            raise ValueError(f"timings must be finite numbers > 0, got {xs[:5]}")
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
        return cls(xs, statistics.median(xs), q1, q3)

    @property
    def iqr_ms(self) -> float:
        """Interquartile range q3 - q1 (ms)."""
        return self.q3_ms - self.q1_ms

    def text(self, digits: int = 3) -> str:
        """'median ± IQR', e.g. '1.234 ± 0.056' (ms)."""
        return f"{self.median_ms:.{digits}f} ± {self.iqr_ms:.{digits}f}"

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "iqr_ms": self.iqr_ms, "q1_ms": self.q1_ms, "q3_ms": self.q3_ms,
                "rounds": len(self.samples_ms), "samples_ms": list(self.samples_ms)}


@dataclass
class LatencyVerdict:
    """Whether a measured speedup of `candidate` over `baseline` may be claimed.

    speedup: baseline median / candidate median (> 1: the candidate is faster), always filled in.
    stable: True only when the two interquartile ranges do not overlap and the machine was not overloaded.
    reason: why not stable ("" when stable).
    """

    baseline: str
    candidate: str
    speedup: float
    stable: bool
    reason: str = ""

    def text(self) -> str:
        """'1.42x' when stable, else 'unstable (<reason>)'."""
        return f"{self.speedup:.2f}x" if self.stable else f"unstable ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "candidate": self.candidate, "speedup": self.speedup,
                "stable": self.stable, "reason": self.reason, "verdict": self.text()}


#: A load above this many runnable threads per CPU (1-minute load average / os.cpu_count()) makes a timing
#: "unstable": the measured threads then wait for a core part of the time.
MAX_LOAD_PER_CPU = 1.0
#: Fewer rounds than this give quartiles too coarse to compare.
MIN_ROUNDS = 5


def latency_verdict(baseline_ms: Sequence[float], candidate_ms: Sequence[float], load: float | None = None,
                    cpus: int | None = None, *, baseline: str = "dense", candidate: str = "pruned",
                    max_load_per_cpu: float = MAX_LOAD_PER_CPU, min_rounds: int = MIN_ROUNDS) -> LatencyVerdict:
    """Decide from timings alone whether `candidate` is measurably faster or slower than `baseline`.

    `baseline_ms` and `candidate_ms` are per-round times (ms, one per interleaved round); `load` is the
    1-minute load average seen during the measurement and `cpus` the CPU count (None: unknown, not judged).
    The verdict is stable only when each side has at least `min_rounds` rounds, load <= max_load_per_cpu x
    cpus, and the interquartile ranges [q1, q3] do not overlap; otherwise it says "unstable" with every
    reason that applies. The speedup (ratio of medians) is reported either way.

    Raises:
        ValueError: an empty list, or a timing that is not a finite number > 0.
    """
    b, c = LatencyStats.of(baseline_ms), LatencyStats.of(candidate_ms)
    reasons = []
    rounds = min(len(b.samples_ms), len(c.samples_ms))
    if rounds < min_rounds:
        reasons.append(f"only {rounds} rounds, need {min_rounds}")
    if load is not None and cpus and load > max_load_per_cpu * cpus:
        reasons.append(f"machine busy: load {load:.1f} on {cpus} CPUs")
    if b.q1_ms <= c.q3_ms and c.q1_ms <= b.q3_ms:
        reasons.append(f"interquartile ranges overlap: {baseline} {b.q1_ms:.3g}-{b.q3_ms:.3g} ms, "
                       f"{candidate} {c.q1_ms:.3g}-{c.q3_ms:.3g} ms")
    return LatencyVerdict(baseline, candidate, b.median_ms / c.median_ms, not reasons, "; ".join(reasons))


def system_load() -> tuple[float | None, int | None]:
    """(1-minute load average, CPU count) from os.getloadavg() and os.cpu_count(); None where unavailable."""
    try:
        load: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on Windows, or not readable
        load = None
    return load, os.cpu_count()


class LatencyComparison(Mapping[str, float]):
    """What `compare_latency` returns. As a mapping: model name -> median ms per call (the old return value).

    Attributes:
        stats: name -> LatencyStats (median, quartiles, per-round samples; ms).
        verdicts: name -> LatencyVerdict of that model against `baseline` (every model but the baseline).
        baseline: the name the others are compared with (the first model unless asked otherwise).
        load, cpus: the highest 1-minute load average read (before and after measuring) and the CPU count.
    """

    def __init__(self, stats: dict[str, LatencyStats], baseline: str, load: float | None, cpus: int | None) -> None:
        self.stats, self.baseline, self.load, self.cpus = stats, baseline, load, cpus
        self.verdicts = {k: latency_verdict(stats[baseline].samples_ms, s.samples_ms, load, cpus, baseline=baseline,
                                            candidate=k) for k, s in stats.items() if k != baseline}

    def __getitem__(self, name: str) -> float:
        return self.stats[name].median_ms

    def __iter__(self):
        return iter(self.stats)

    def __len__(self) -> int:
        return len(self.stats)

    def verdict(self, name: str | None = None) -> LatencyVerdict:
        """The verdict of `name` (default: the only non-baseline model) against the baseline."""
        if name is None:
            if len(self.verdicts) != 1:
                raise ValueError(f"name the model: {len(self.verdicts)} are compared with {self.baseline}")
            return next(iter(self.verdicts.values()))
        return self.verdicts[name]

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "load": self.load, "cpus": self.cpus,
                "models": {k: s.to_dict() for k, s in self.stats.items()},
                "verdicts": {k: v.to_dict() for k, v in self.verdicts.items()}}


def measure_interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 15, warmup: int = 3,
                        min_run_time: float = 0.005, baseline: str | None = None,
                        num_threads: int | None = None) -> LatencyComparison:
    """Time each zero-argument callable with torch.utils.benchmark.Timer, in interleaved rounds.

    Every round runs blocked_autorange(min_run_time) (seconds) once per callable, the order reversed every
    other round so slow drift and order effects hit all alike; each round gives one sample per callable, its
    median per-call time. The Timer synchronizes CUDA around each block. `num_threads` is torch's CPU thread
    count during timing (default: the current torch.get_num_threads(), not the Timer's default of 1).

    Raises:
        ValueError: no callables, rounds < 1, or `baseline` not among them.
    """
    from torch.utils.benchmark import Timer

    if not fns or rounds < 1:
        raise ValueError("measure_interleaved needs at least one callable and one round")
    baseline = next(iter(fns)) if baseline is None else baseline
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of {list(fns)}")
    threads = num_threads or torch.get_num_threads()
    timers = {k: Timer(stmt="fn()", globals={"fn": f}, num_threads=threads, label=k) for k, f in fns.items()}
    load_before, cpus = system_load()
    for _ in range(warmup):
        for f in fns.values():
            f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            samples[k].append(timers[k].blocked_autorange(min_run_time=min_run_time).median * 1e3)
    load_after, _ = system_load()
    loads = [v for v in (load_before, load_after) if v is not None]
    return LatencyComparison({k: LatencyStats.of(v) for k, v in samples.items()}, baseline,
                             max(loads) if loads else None, cpus)


@torch.no_grad()
def compare_latency(models: dict[str, nn.Module], x: torch.Tensor, repeats: int = 15, warmup: int = 3,
                    min_run_time: float = 0.005, baseline: str | None = None) -> LatencyComparison:
    """Forward time of each model on `x` (eval mode, no grad), measured in `repeats` interleaved rounds.

    `x` is one input batch on the models' device. See `measure_interleaved` for the method. Returns a
    LatencyComparison: indexing it by name gives the median ms per forward (as before); `.stats[name]` gives
    median and IQR (ms), `.verdicts` / `.verdict()` each model against the baseline (default: the first model):
    a speedup, or "unstable" with the reason (overlapping IQRs, a busy machine, too few rounds).

    Raises:
        ValueError: no models, repeats < 1, or `baseline` not among them.
    """
    for m in models.values():
        m.eval()
    return measure_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, rounds=repeats, warmup=warmup,
                               min_run_time=min_run_time, baseline=baseline)


def onnxruntime_latency(models: dict[str, nn.Module], x: torch.Tensor, repeats: int = 15, warmup: int = 3,
                        min_run_time: float = 0.005, baseline: str | None = None) -> LatencyComparison:
    """Like `compare_latency`, but each model is exported to ONNX (a temporary folder, deleted after) and run
    by ONNX Runtime on the CPU, with as many intra-op threads as torch uses (`x` is moved to the CPU).

    Raises:
        UserError: onnx/onnxruntime not installed (the `export` extra), or a model fails to export or load.
        ValueError: as `compare_latency`.
    """
    from .errors import UserError
    from .export import export_module, require_onnxruntime

    ort = require_onnxruntime()
    x = x.detach().cpu()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    fns: dict[str, Callable[[], Any]] = {}
    with tempfile.TemporaryDirectory(prefix="regprune-ort-") as tmp:
        for k, m in models.items():
            path = Path(tmp) / f"model{len(fns)}.onnx"
            export_module(copy.deepcopy(m).cpu().eval(), x, path)
            try:
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise UserError(f"ONNX Runtime cannot load the export of {k}: {str(exc).strip()[:160]}") from None
            feed = {sess.get_inputs()[0].name: x.numpy()}
            fns[k] = lambda sess=sess, feed=feed: sess.run(None, feed)
    return measure_interleaved(fns, rounds=repeats, warmup=warmup, min_run_time=min_run_time, baseline=baseline)


def try_onnxruntime_latency(models: dict[str, nn.Module], x: torch.Tensor, repeats: int = 15,
                            **kw: Any) -> tuple[LatencyComparison | None, str]:
    """`onnxruntime_latency`, or (None, a one-line note) when onnxruntime is missing or an export fails."""
    from .errors import UserError

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None, "ONNX Runtime latency not measured: onnxruntime is not installed (pip install 'regprune[export]')"
    try:
        return onnxruntime_latency(models, x, repeats=repeats, **kw), ""
    except UserError as exc:
        return None, f"ONNX Runtime latency skipped: {exc}"


def latency_lines(comps: dict[str, LatencyComparison | None]) -> str:
    """One line per measurement (label -> comparison; None is left out): the verdict of each model against the
    baseline, e.g. 'latency pruned vs dense, PyTorch CPU batch 1: 1.22x (6.38 ± 0.12 ms vs 5.21 ± 0.09 ms)'."""
    out = []
    for label, comp in comps.items():
        if comp is None:
            continue
        for name, v in comp.verdicts.items():
            b, c = comp.stats[comp.baseline], comp.stats[name]
            out.append(f"latency {name} vs {comp.baseline}, {label}: {v.text()} "
                       f"({c.text()} ms vs {b.text()} ms, median ± IQR over {len(c.samples_ms)} interleaved rounds)")
    return "\n".join(out)


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


def pyplot():
    """`matplotlib.pyplot` with the headless Agg backend selected (figures go to files only). Raises
    ModuleNotFoundError when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt




def plot_lines(path: Path, series: dict[str, tuple[Iterable[float], Iterable[float]]], xlabel: str, ylabel: str,
               title: str, logy: bool = False, hline: float | None = None) -> Path:
    """One line per series (x values, y values) to a PNG."""
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
