"""Helpers shared by the benchmark scripts: hardware description, throughput probes, statistics, files.

Imported by the scripts in this folder as `common` (each script puts its own folder on sys.path), so it must
not import anything from them. Nothing here trains anything worth keeping: the throughput probes run a few
optimizer steps on random tensors to plan how much work fits a time budget.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # `python benchmarks/x.py` from a checkout works without installing the package
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from regprune.engine import atomic_write_text  # noqa: E402
from regprune.engine.log import to_jsonable  # noqa: E402
from regprune.errors import UserError  # noqa: E402

__all__ = ["REPO_ROOT", "hardware_info", "train_throughput", "eval_throughput", "choose_threads", "mean_std",
           "fmt_pm", "write_json", "write_results", "bn_recalibrated_top1", "finite_numbers", "Stopwatch", "log", "apply_limits",
           "run_script"]


def log(msg: str) -> None:
    """One timestamped line on stdout, flushed (benchmarks run in the background with output to a file)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def hardware_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: OS, CPU, cores visible, torch build, threads, GPU, load at start."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "device": device,
    }
    if hasattr(os, "getloadavg"):
        # other people's jobs on a shared machine change every timing; say how busy it was
        info["loadavg_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def train_throughput(model: nn.Module, batch_size: int, input_shape: Sequence[int], *, steps: int = 3,
                     warmup: int = 1, device: str = "cpu", num_classes: int = 10) -> float:
    """Images per second of SGD training steps on random data (the model is trained in place: pass a copy)."""
    dev = torch.device(device)
    model = model.to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *input_shape, generator=g).to(dev)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return batch_size * steps / _timed(step, steps, warmup, dev)


@torch.no_grad()
def eval_throughput(model: nn.Module, batch_size: int, input_shape: Sequence[int], *, steps: int = 2,
                    warmup: int = 1, device: str = "cpu") -> float:
    """Images per second of forward passes in eval mode on random data."""
    dev = torch.device(device)
    model = model.to(dev).eval()
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).to(dev)
    return batch_size * steps / _timed(lambda: model(x), steps, warmup, dev)


def _timed(fn: Callable[[], Any], steps: int, warmup: int, dev: torch.device) -> float:
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return max(time.perf_counter() - t0, 1e-9)


def choose_threads(make_model: Callable[[], nn.Module], batch_size: int, input_shape: Sequence[int],
                   candidates: Iterable[int] | None = None) -> tuple[int, dict[int, float]]:
    """The torch CPU thread count with the best measured training throughput, and every measurement.

    On a shared machine one thread often beats two: intra-op threads spin-wait for each other while other
    processes hold the cores. Leaves torch set to the chosen count.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cands = sorted(set(candidates or [1, usable]))
    measured: dict[int, float] = {}
    for n in cands:
        torch.set_num_threads(n)
        measured[n] = train_throughput(make_model(), batch_size, input_shape, steps=3)
    best = max(measured, key=measured.get)
    torch.set_num_threads(best)
    return best, measured


@torch.no_grad()
def bn_recalibrated_top1(model: nn.Module, train_loader: Iterable, test_loader: Iterable, max_batches: int = 200,
                         device: str = "cpu") -> float:
    """Test top-1 after re-estimating every BatchNorm's running statistics from training batches.

    A diagnostic, not a method: it separates what a model has lost from what only its stale BN statistics
    hide (weights that changed scale quickly, or channels just removed, leave running means/variances that
    no longer describe the activations). The model is modified in place: pass a copy.
    """
    from regprune.engine import evaluate

    dev = torch.device(device)
    model.to(dev)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    model.train()
    for i, batch in enumerate(train_loader):
        if i >= max_batches:
            break
        model(batch[0].to(dev))
    for bn in bns:
        bn.momentum = 0.1
    return float(evaluate(model, test_loader, dev)["top1"])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_pm(mean: float, std: float, digits: int = 2) -> str:
    """'93.12 ± 0.31'."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_results(res: dict[str, Any], out_dir: Path, name: str, markdown: Callable[[dict[str, Any]], str],
                  t_start: float) -> dict[str, Any]:
    """Stamp the wall time on `res`, write `<name>.json` and `<name>.md` (atomically) under `out_dir`, print the
    markdown and log where it went; returns `res`."""
    res["wall_time_s"] = time.perf_counter() - t_start
    write_json(out_dir / f"{name}.json", res)
    md = markdown(res)
    atomic_write_text(out_dir / f"{name}.md", md + "\n")
    print(md)
    log(f"wrote {out_dir / (name + '.json')} and {name}.md in {res['wall_time_s']:.0f} s")
    return res


def write_json(path: Path, obj: Any) -> Path:
    """Pretty JSON, written atomically (tensors and paths made plain first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=1, allow_nan=True) + "\n")
    return path


def finite_numbers(obj: Any) -> list[str]:
    """Paths (a.b[2].c) of every non-finite float in a JSON-like object; empty when all are finite."""
    bad: list[str] = []

    def walk(o: Any, where: str) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{where}[{i}]")
        elif isinstance(o, float) and not math.isfinite(o):
            bad.append(where)

    walk(obj, "")
    return bad


class Stopwatch:
    """Seconds since construction (wall clock, monotonic)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def parse_limit(text: str | None, what: str, allow_auto: bool = False) -> int | str | None:
    """A --limit-train/--limit-test value: None (not given), "all", "auto" (where allowed) or a positive int."""
    if text is None:
        return None
    t = str(text).strip().lower()
    if t in ("all", "none", "full"):
        return "all"
    if allow_auto and t == "auto":
        return "auto"
    try:
        n = int(t)
    except ValueError:
        choices = "an integer, 'all' or 'auto'" if allow_auto else "an integer or 'all'"
        raise UserError(f"--limit-{what}: expected {choices}, got {text!r}") from None
    if n < 1:
        raise UserError(f"--limit-{what} must be >= 1, got {n}")
    return n


def apply_limits(settings: Any, args: Any, allow_auto_train: bool = False) -> None:
    """Set settings.limit_train / limit_test from the command line ("all" becomes None: the whole split)."""
    for what in ("train", "test"):
        v = parse_limit(getattr(args, f"limit_{what}"), what, allow_auto_train and what == "train")
        if v is not None:
            setattr(settings, f"limit_{what}", None if v == "all" else v)


def run_script(main: Callable[[], Any]) -> None:
    """Run a benchmark's main(); a user error ends with one line on stderr and exit status 2."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
