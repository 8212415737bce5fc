"""The skeleton every comparison benchmark shares: settings and scale presets, command line, the one base
model, a job pool with resume and a time budget, the summary over seeds, Markdown and a plot.

A benchmark is a `Bench`: its name, its `Settings` dataclass (a subclass of `BaseSettings`), its presets, its
method list, the key that names a job, and two functions the harness calls:

    prepare(s, work) -> ctx                   once per process (data, base model file): anything picklable-free
    run_one(s, ctx, job) -> row               one job (a dict of the job's keys and whatever it measured)

`main(bench, argv)` parses the command line, trains nothing itself (the benchmark's `prepare` trains or reuses
its base), runs every pending job (one JSON line each in <work>/results.jsonl, so a later run with the same
work dir continues), and returns the result dict that the benchmark's `report()` turns into files.

Jobs run in `concurrent.futures.ProcessPoolExecutor` workers (spawned: safe with CUDA); each worker imports
the benchmark script by path, so the scripts need not be a package.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import dataclasses
import importlib.util
import itertools
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
for _p in (str(HERE), str(REPO_ROOT)):  # `python benchmarks/x.py` from a checkout works without installing
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from regprune import engine as E  # noqa: E402
from regprune.errors import UserError  # noqa: E402

__all__ = ["BaseSettings", "Bench", "main", "parse_args", "make_settings", "train_config", "train_base",
           "evaluate", "run_pool", "read_rows", "summarize", "compare", "verdict", "table", "header_lines",
           "plot_series", "write_outputs", "throughput", "fmt_pm", "log", "mean_std", "hardware_info",
           "train_throughput", "eval_throughput", "choose_threads", "write_json", "apply_limits", "run_script",
           "metrics", "epoch_curve", "plateau", "cuda_graph", "REPO_ROOT"]


# ---------------------------------------------------------------------------------------------- utilities
def log(msg: str) -> None:
    """One timestamped line on stdout, flushed (benchmarks run in the background with output to a file)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def hardware_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: OS, CPU, cores visible, torch build, threads, GPU, load at start."""
    cpu = platform.processor()
    if not cpu and Path("/proc/cpuinfo").is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    info: dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(), "processor": cpu or "unknown",
        "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(), "device": device}
    if hasattr(os, "getloadavg"):  # other people's jobs on a shared machine change every timing
        info["loadavg_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


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


def train_throughput(model: nn.Module, batch_size: int, input_shape: Sequence[int], *, steps: int = 3,
                     warmup: int = 1, device: str = "cpu", num_classes: int = 10,
                     extra_loss: Callable[[], torch.Tensor] | None = None,
                     on_step_end: Callable[[], Any] | None = None) -> float:
    """Images per second of SGD training steps on random data (the model is trained in place: pass a copy);
    `extra_loss` / `on_step_end`: a regularizer's loss term and step hook, as the Trainer would call them."""
    dev = torch.device(device)
    model = model.to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *input_shape, generator=g).to(dev)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(dev)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        (loss + extra_loss() if extra_loss else loss).backward()
        opt.step()
        if on_step_end:
            on_step_end()

    return batch_size * steps / _timed(step, steps, warmup, dev)


@torch.no_grad()
def eval_throughput(model: nn.Module, batch_size: int, input_shape: Sequence[int], *, steps: int = 2,
                    warmup: int = 1, device: str = "cpu") -> float:
    """Images per second of forward passes in eval mode on random data."""
    dev = torch.device(device)
    model = model.to(dev).eval()
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).to(dev)
    return batch_size * steps / _timed(lambda: model(x), steps, warmup, dev)


def choose_threads(make_model: Callable[[], nn.Module], batch_size: int, input_shape: Sequence[int],
                   candidates: Iterable[int] | None = None) -> tuple[int, dict[int, float]]:
    """The torch CPU thread count with the best measured training throughput, and every measurement.

    On a shared machine one thread often beats two: intra-op threads spin-wait for each other while other
    processes hold the cores. Leaves torch set to the chosen count.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    measured: dict[int, float] = {}
    for n in sorted(set(candidates or [1, usable])):
        torch.set_num_threads(n)
        measured[n] = train_throughput(make_model(), batch_size, input_shape, steps=3)
    best = max(measured, key=measured.get)
    torch.set_num_threads(best)
    return best, measured


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_pm(mean: float, std: float, digits: int = 2) -> str:
    """'93.12 ± 0.31'."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_json(path: Path, obj: Any) -> Path:
    """Pretty JSON, written atomically (tensors and paths made plain first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    E.atomic_write_text(path, json.dumps(E.log.to_jsonable(obj), indent=1, allow_nan=True) + "\n")
    return path


def apply_limits(settings: Any, args: Any, allow_auto_train: bool = False) -> None:
    """Set settings.limit_train / limit_test from --limit-train / --limit-test: an integer >= 1, or "all" (None:
    the whole split), or "auto" where allowed."""
    for what in ("train", "test"):
        text = getattr(args, f"limit_{what}", None)
        if text is None:
            continue
        t = str(text).strip().lower()
        auto = allow_auto_train and what == "train"
        if t in ("all", "none", "full") or (auto and t == "auto"):
            setattr(settings, f"limit_{what}", None if t != "auto" else "auto")
            continue
        try:
            n = int(t)
        except ValueError:
            choices = "an integer, 'all' or 'auto'" if auto else "an integer or 'all'"
            raise UserError(f"--limit-{what}: expected {choices}, got {text!r}") from None
        if n < 1:
            raise UserError(f"--limit-{what} must be >= 1, got {n}")
        setattr(settings, f"limit_{what}", n)


def run_script(main: Callable[[], Any]) -> None:
    """Run a benchmark's main(); a user error ends with one line on stderr and exit status 2."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def metrics(run_path: Path) -> list[dict[str, Any]]:
    """The records of a pipeline run directory's metrics file (none when it has none)."""
    f = Path(run_path) / E.METRICS_FILE
    return E.read_metrics(f) if f.exists() else []


def epoch_curve(run_path: Path, phase: str) -> list[dict[str, float]]:
    """Test top-1 per epoch of one phase of a pipeline run ("train", "finetune", "scratch")."""
    return [{"epoch": r["epoch"], "test_top1": r["test_top1"], "train_loss": r.get("loss")} for r in metrics(run_path)
            if r.get("kind") == "epoch" and r.get("phase") == phase and "test_top1" in r]


def plateau(curve: list[dict[str, float]], tail: int = 3, tol: float = 0.3) -> dict[str, Any]:
    """Had test accuracy stopped rising? Best of the last `tail` epochs against the best before them."""
    accs = [c["test_top1"] for c in curve]
    if len(accs) <= tail:
        return {"plateaued": False, "reason": f"only {len(accs)} epochs", "gain_last_epochs": None,
                "tail_epochs": tail, "tolerance": tol}
    gain = max(accs[-tail:]) - max(accs[:-tail])
    return {"plateaued": gain <= tol, "gain_last_epochs": round(gain, 3), "tail_epochs": tail, "tolerance": tol}


def cuda_graph(fn: Callable[[], Any]) -> Any:
    """`fn` captured as a CUDA graph (warmed up on a side stream first, as torch.cuda.graphs asks); replay() runs it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class BaseSettings:
    """Fields every benchmark has; a benchmark's Settings subclasses this (all stored verbatim in the JSON)."""

    scale: str = "smoke"
    seeds: int = 1
    methods: list[str] = field(default_factory=list)
    limit_train: int | None = None
    limit_test: int | None = None
    batch_size: int = 64
    weight_decay: float = 5e-4
    momentum: float = 0.9
    device: str = "cpu"
    amp: bool = False
    workers: int = 0
    threads: int = 1  # torch CPU threads per process (0: measure 1 vs all, take the faster)


@dataclass
class Bench:
    """What a benchmark hands the harness."""

    name: str
    doc: str
    settings_cls: type
    scales: dict[str, Any]
    methods: Sequence[str]
    script: Path                                    # the benchmark's file (workers import it by path)
    job_keys: tuple[str, ...]                       # the fields of a row that name its job, e.g. (target, method, seed)
    jobs: Callable[[Any], list[dict[str, Any]]]     # settings -> every job (seed-major order)
    prepare: Callable[[Any, Path], Any]             # (settings, work dir) -> context, once per process
    run_one: Callable[[Any, Any, dict[str, Any]], dict[str, Any]]
    add_args: Callable[[argparse.ArgumentParser], None] | None = None
    overrides: tuple[str, ...] = ()                 # Settings fields settable by --field-name
    default_scale: str = "smoke"
    key_ignores: tuple[str, ...] = ("seeds", "methods", "threads", "workers")  # fields that do not change a job
    estimate: Callable[[Any, Any], dict[str, Any]] | None = None  # (settings, args) -> plan, for --dry-run
    dense_model: Callable[[Any], torch.nn.Module] | None = None     # settings -> a fresh dense model (thread probe)
    input_shape: tuple[int, ...] = (1, 28, 28)


def parse_args(bench: Bench, argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=bench.doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(bench.scales), default=bench.default_scale)
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--methods", nargs="+", choices=list(bench.methods))
    ap.add_argument("--limit-train", help="training images (an integer or 'all')")
    ap.add_argument("--limit-test", help="test images (an integer or 'all')")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--device")
    ap.add_argument("--threads", type=int, help="torch CPU threads per process (0: measure 1 vs all, take the faster)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--work-dir", type=Path, help=f"base model and per-job results (default benchmarks/work/{bench.name}_<scale>)")
    ap.add_argument("--fresh", action="store_true", help="ignore finished jobs in the work dir")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and a time estimate, run nothing")
    ap.add_argument("--jobs", type=int, default=1, help="jobs run at once, each in its own worker process")
    ap.add_argument("--time-budget", type=float,
                    help="seconds: start no job that would likely end after this, then write the summary of what "
                         "is done (the next run with the same work dir continues)")
    if bench.add_args:
        bench.add_args(ap)
    return ap.parse_args(argv)


def make_settings(bench: Bench, args: argparse.Namespace) -> Any:
    s = copy.deepcopy(bench.scales[args.scale])
    for name in ("seeds", "methods", "batch_size", "device", "threads", *bench.overrides):
        v = getattr(args, name, None)
        if v is not None:
            setattr(s, name, list(v) if isinstance(v, list) else v)
    apply_limits(s, args)
    if s.device != "cuda" and not str(s.device).startswith("cuda"):
        s.amp = False
    if s.seeds < 1:
        raise UserError("--seeds must be >= 1")
    if args.jobs < 1:
        raise UserError("--jobs must be >= 1")
    return s


def train_config(s: BaseSettings, seed: int, **kw: Any) -> E.TrainConfig:
    base = dict(lr=0.01, lr_schedule="constant", momentum=s.momentum, weight_decay=s.weight_decay,
                batch_size=s.batch_size, amp=s.amp, device=s.device, seed=seed, progress=False, log_every=50)
    base.update(kw)
    return E.TrainConfig(**base)


def evaluate(model: torch.nn.Module, loader, device: str) -> dict[str, float]:
    """regprune's evaluate on the run's device; the model is left on the CPU."""
    dev = E.resolve_device(device)
    model.to(dev)
    try:
        return E.evaluate(model, loader, dev)
    finally:
        model.cpu()


# ---------------------------------------------------------------------------------------------- base
def _epoch_curve(trainer: E.Trainer, offset: int) -> list[dict[str, float]]:
    return [{"epoch": offset + i + 1, "test_top1": r["test_top1"]}
            for i, r in enumerate(r for r in trainer.metrics if r.get("kind") == "epoch" and "test_top1" in r)]


def train_base(s: Any, make_model: Callable[[], torch.nn.Module], bundle, work: Path, save: Callable,
               key: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Train the one base, or reuse it when <work>/base.json was written with the same `key`: a cosine cycle
    (s.base_epochs at s.base_lr), then s.base_cycle_epochs-long cosine cycles at s.base_cycle_lr while the best
    test top-1 still rises by s.plateau_tol points (at most s.base_max_cycles)."""
    from regprune.data import make_loaders

    f, meta_f = work / "base.safetensors", work / "base.json"
    if f.exists() and meta_f.exists():
        meta = json.loads(meta_f.read_text())
        if meta.get("key") == key:
            log(f"base: reusing {f} ({meta['epochs']} epochs, test top-1 {meta['top1']:.2f})")
            return f, meta
    torch.manual_seed(0)
    model = make_model()
    train_loader, test_loader = make_loaders(bundle, s.batch_size, workers=s.workers, seed=0)
    tr = E.Trainer(model, train_loader, test_loader, train_config(s, 0, epochs=s.base_epochs, lr=s.base_lr,
                                                                  lr_schedule="cosine"), phase="base")
    tr.fit()
    curve = _epoch_curve(tr, 0)
    best = max((c["test_top1"] for c in curve), default=float("nan"))
    cycles, reason = [], "no further cycles at this scale" if s.base_max_cycles == 0 else "cycle limit reached"
    log(f"base: {s.base_epochs:g} epochs, best test top-1 {best:.2f}")
    for c in range(s.base_max_cycles):
        cfg = train_config(s, c + 1, epochs=s.base_cycle_epochs, lr=s.base_cycle_lr, lr_schedule="cosine")
        tr = E.Trainer(model, train_loader, test_loader, cfg, phase=f"base_cycle{c + 1}")
        tr.fit()
        part = _epoch_curve(tr, len(curve))
        curve += part
        cycle_best = max(p["test_top1"] for p in part)
        cycles.append({"cycle": c + 1, "best_top1": cycle_best, "gain": cycle_best - best})
        log(f"base: cycle {c + 1}: best {cycle_best:.2f} ({cycle_best - best:+.2f})")
        if cycle_best - best < s.plateau_tol:
            reason = f"a {s.base_cycle_epochs:g}-epoch cycle raised the best test top-1 by < {s.plateau_tol} points"
            best = max(best, cycle_best)
            break
        best = cycle_best
    top1 = evaluate(model, test_loader, s.device)["top1"]
    save(model, f, {"dataset": bundle.name, "top1": top1})
    meta = {"key": key, "epochs": len(curve), "top1": top1, "best_top1": best, "curve": curve, "cycles": cycles,
            "stopped_because": reason, "plateaued": reason.startswith("a ")}
    E.atomic_write_text(meta_f, json.dumps(meta, indent=1))
    return f, meta


# ---------------------------------------------------------------------------------------------- job pool
def read_rows(done_f: Path, key: str) -> list[dict[str, Any]]:
    rows = []
    if done_f.exists():
        for line in done_f.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec.get("key") == key:
                    rows.append(rec["row"])
    return rows


def _append_row(done_f: Path, key: str, row: dict[str, Any]) -> None:
    import fcntl

    line = json.dumps(E.log.to_jsonable({"key": key, "row": row})) + "\n"
    with open(done_f, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.write(line)
            fh.flush()
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _likely_seconds(job: dict[str, Any], rows: list[dict[str, Any]]) -> float:
    """The slowest finished job that differs from `job` only in its seed, else of any (0 when none finished)."""
    same = [r["wall_s"] for r in rows if "wall_s" in r and all(r.get(k) == v for k, v in job.items() if k != "seed")]
    any_ = [r["wall_s"] for r in rows if "wall_s" in r]
    return max(same) if same else (max(any_) if any_ else 0.0)


_WORKER: dict[str, Any] = {}


def _worker_init(script: str, module: str, settings: dict[str, Any], work: str, threads: int) -> None:
    torch.set_num_threads(max(1, threads))
    spec = importlib.util.spec_from_file_location(module, script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    spec.loader.exec_module(mod)
    # the settings travel as a dict: the benchmark's class exists in this process only after the import above
    _WORKER.update(bench=mod.BENCH, settings=mod.BENCH.settings_cls(**settings), work=Path(work), ctx=None)


def _worker_run(job: dict[str, Any]) -> dict[str, Any]:
    b, s = _WORKER["bench"], _WORKER["settings"]
    if _WORKER["ctx"] is None:
        _WORKER["ctx"] = b.prepare(s, _WORKER["work"])
    return _timed_run(b, s, _WORKER["ctx"], job)


def _timed_run(bench: Bench, s: Any, ctx: Any, job: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    row = {**job, **bench.run_one(s, ctx, job)}
    row["wall_s"] = time.perf_counter() - t0
    return row


def run_pool(bench: Bench, s: Any, ctx: Any, work: Path, pending: list[dict[str, Any]], done_f: Path, key: str,
             n_workers: int, deadline: float | None, on_row: Callable[[dict[str, Any]], None]) -> int:
    """Run `pending` (in order; at most `n_workers` at once), appending each finished row to `done_f`; a job that
    would likely end after `deadline` is not started. With one worker the jobs run in this process."""
    ran = 0

    def admit(job: dict[str, Any]) -> bool:
        if deadline is not None and time.time() + _likely_seconds(job, read_rows(done_f, key)) > deadline:
            log(f"{_job_name(bench, job)}: not started (time budget)")
            return False
        return True

    def finish(row: dict[str, Any]) -> None:
        nonlocal ran
        _append_row(done_f, key, row)
        ran += 1
        on_row(row)

    if n_workers <= 1:
        for job in pending:
            if admit(job):
                finish(_timed_run(bench, s, ctx, job))
        return ran
    queue = list(pending)
    init = (str(bench.script), f"bench_{bench.name}_worker", dataclasses.asdict(s), str(work), 1)
    with cf.ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                initargs=init) as pool:
        running: set[cf.Future] = set()
        while queue or running:
            while queue and len(running) < n_workers:
                job = queue.pop(0)
                if admit(job):
                    running.add(pool.submit(_worker_run, job))
            if not running:
                break
            done, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                try:
                    finish(fut.result())
                except Exception as exc:  # one failed job must not lose the others' results
                    log(f"a job failed: {type(exc).__name__}: {exc}")
    return ran


def _job_name(bench: Bench, job: dict[str, Any]) -> str:
    return " ".join(f"{k}={job[k]}" for k in bench.job_keys)


# ---------------------------------------------------------------------------------------------- summary
def summarize(rows: list[dict[str, Any]], by: Sequence[str], metrics: Sequence[str],
              order: Callable[[tuple], Any] | None = None) -> list[dict[str, Any]]:
    """One entry per distinct `by` values: n_seeds, and for each metric its mean, std and per-seed values
    (rows lacking a metric, or holding None, are left out of that metric)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for k, rs in sorted(groups.items(), key=(lambda kv: order(kv[0])) if order else None):
        rs = sorted(rs, key=lambda r: r["seed"])
        g: dict[str, Any] = dict(zip(by, k))
        g["n_seeds"] = len(rs)
        g["seeds"] = [r["seed"] for r in rs]
        for m in metrics:
            vals = [r[m] for r in rs if r.get(m) is not None]
            g[f"{m}_mean"], g[f"{m}_std"] = mean_std(vals) if vals else (None, None)
            g[f"{m}_values"] = vals
        out.append(g)
    return out


def compare(summary: list[dict[str, Any]], rows: list[dict[str, Any]], within: Sequence[str], metric: str,
            pairs: Sequence[tuple[str, str]] | None = None, label: str = "method") -> list[dict[str, Any]]:
    """Pairs of `label` values inside each `within` group: difference of means against the seed spread
    (std a + std b), with the per-seed paired differences. `pairs` None: every pair."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for g in summary:
        groups.setdefault(tuple(g[k] for k in within), []).append(g)
    for wk, gs in groups.items():
        by = {g[label]: g for g in gs}
        todo = pairs if pairs is not None else [(a[label], b[label]) for a, b in itertools.combinations(gs, 2)]
        for a, b in todo:
            if a not in by or b not in by or by[a][f"{metric}_mean"] is None or by[b][f"{metric}_mean"] is None:
                continue
            ga, gb = by[a], by[b]
            diff = ga[f"{metric}_mean"] - gb[f"{metric}_mean"]
            spread = ga[f"{metric}_std"] + gb[f"{metric}_std"]
            sel = {k: v for k, v in zip(within, wk)}
            va = {r["seed"]: r[metric] for r in rows if r[label] == a and all(r[k] == v for k, v in sel.items())}
            vb = {r["seed"]: r[metric] for r in rows if r[label] == b and all(r[k] == v for k, v in sel.items())}
            paired = [round(va[k] - vb[k], 2) for k in sorted(va) if k in vb]
            n = min(ga["n_seeds"], gb["n_seeds"])
            out.append({**sel, "a": a, "b": b, "diff": diff, "spread": spread, "n_seeds": n,
                        "exceeds_spread": bool(n >= 2 and abs(diff) > spread), "paired_diffs": paired,
                        "paired_same_sign": bool(paired) and (all(d > 0 for d in paired) or all(d < 0 for d in paired))})
    return out


def verdict(c: dict[str, Any]) -> str:
    """A plain sentence on one comparison."""
    if c.get("n_seeds", 2) < 2:
        return "cannot tell: one seed has no spread"
    if c["exceeds_spread"]:
        diff = c["diff"] if "diff" in c else c["delta_mean"]  # the latter: results written before the harness
        return f"{c['a']} is {'higher' if diff > 0 else 'lower'} by more than the seed spread"
    return "inside the seed spread: this run does not separate them"


# ---------------------------------------------------------------------------------------------- report
def table(rows: list[dict[str, Any]]) -> str:
    from regprune.report import format_table

    return format_table(rows, list(rows[0])) if rows else "(no results)"


def header_lines(res: dict[str, Any], title: str) -> list[str]:
    """Title, partial-run notice, smoke notice and hardware line."""
    s = res["settings"]
    lines = [f"# {title} ({s['scale']} scale)", ""]
    if not res.get("complete", True):
        lines += [f"**Partial: {res['jobs_done']} of {res['jobs_expected']} jobs finished; the `seeds` column shows "
                  "how many each mean covers.**", ""]
    if s["scale"] == "smoke":
        lines += ["**Smoke scale: a few iterations on a few images. It checks that every path runs; its "
                  "accuracies say nothing about the methods.**", ""]
    hw = res.get("hardware", {})
    lines += [f"Hardware: {hw.get('gpu') or hw.get('processor') or 'unknown'} ({hw.get('cpus_usable')} usable cores, "
              f"{s.get('threads')} torch thread(s) per process, {res.get('n_workers', 1)} worker process(es)); "
              f"torch {hw.get('torch', '?')}; load average at start {hw.get('loadavg_1_5_15')}. "
              f"Wall time {res.get('wall_time_s', 0) / 60:.1f} min.", ""]
    return lines


def plot_series(path: Path, summary: list[dict[str, Any]], x: Callable[[dict], float], metric: str, series: str,
                order: Sequence[str], title: str, xlabel: str, ylabel: str, hline: tuple[float, str] | None = None,
                dashed: Callable[[str], bool] = lambda name: False, logx: bool = True) -> Path:
    """One errorbar line per `series` value (mean ± std of `metric` over seeds) against x(entry)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = itertools.cycle("os^vD<>pP*hX")
    for name in order:
        gs = sorted((g for g in summary if g[series] == name and g[f"{metric}_mean"] is not None), key=x)
        if gs:
            ax.errorbar([x(g) for g in gs], [g[f"{metric}_mean"] for g in gs], yerr=[g[f"{metric}_std"] for g in gs],
                        label=name, marker=next(markers), linestyle="--" if dashed(name) else "-", capsize=3)
    if hline:
        ax.axhline(hline[0], color="gray", linestyle=":", label=hline[1])
    if logx:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(sorted({x(g) for g in summary}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(res: dict[str, Any], out_dir: Path, stem: str, markdown: Callable[[dict], str],
                  plots: Sequence[Callable[[Path], Any]] = (), t_start: float | None = None) -> dict[str, Any]:
    """<stem>.json and <stem>.md (atomically; `t_start` given: res["wall_time_s"] stamped first), then each
    plot(out_dir) (a failing plot is logged, not raised); prints the Markdown and returns res as written."""
    if t_start is not None:
        res["wall_time_s"] = time.perf_counter() - t_start
    write_json(out_dir / f"{stem}.json", res)
    md = markdown(res)
    E.atomic_write_text(out_dir / f"{stem}.md", md + "\n")
    for p in plots:
        try:
            p(out_dir)
        except Exception as exc:  # a plotting failure must not lose the results
            log(f"WARNING: a plot failed ({type(exc).__name__}: {exc})")
    print(md, flush=True)
    jobs = f" ({res['jobs_done']}/{res['jobs_expected']} jobs)" if "jobs_expected" in res else ""
    log(f"wrote {out_dir}/{stem}.{{md,json}}{jobs} in {res.get('wall_time_s', 0):.0f} s")
    return json.loads(json.dumps(E.log.to_jsonable(res)))


def throughput(make_model: Callable[[], torch.nn.Module], batch_size: int, shape: Sequence[int],
               device: str = "cpu") -> dict[str, float]:
    """Measured training and eval images per second of a model (one process, its current threads)."""
    dev = "cuda" if str(device).startswith("cuda") and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    return {"train_img_s": train_throughput(make_model(), batch_size, shape, steps=5, device=dev),
            "eval_img_s": eval_throughput(make_model(), 256, shape, device=dev)}


# ---------------------------------------------------------------------------------------------- main
def main(bench: Bench, argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, plan, run the pending jobs, and return {settings, args, work, rows, base ctx, ...} for the report.

    The returned dict has "dry_run": True (and the plan) when nothing ran."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(bench, argv)
    s = make_settings(bench, args)
    t_start = time.perf_counter()
    deadline = time.time() + args.time_budget if args.time_budget is not None else None
    if s.threads == 0 and bench.dense_model is not None and str(s.device).startswith("cpu"):
        s.threads, _ = choose_threads(lambda: bench.dense_model(s), s.batch_size, bench.input_shape)
    torch.set_num_threads(max(1, s.threads))
    jobs = bench.jobs(s)
    n_workers = min(args.jobs, max(1, len(jobs)))
    plan = bench.estimate(s, args) if bench.estimate and (args.dry_run or s.scale != "smoke") else None
    log(f"{bench.name} {s.scale}: {len(jobs)} job(s), {s.seeds} seed(s), methods {', '.join(s.methods)}, "
        f"{n_workers} worker(s)" + (f"; {plan['summary']}" if plan and plan.get("summary") else ""))
    if args.dry_run:
        return {"dry_run": True, "settings": dataclasses.asdict(s), "plan": plan, "args": args}
    work = (args.work_dir or HERE / "work" / f"{bench.name}_{s.scale}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    ctx = bench.prepare(s, work)  # trains or reuses the base before any worker starts
    done_f = work / "results.jsonl"
    key = json.dumps({k: v for k, v in E.log.to_jsonable(dataclasses.asdict(s)).items() if k not in bench.key_ignores},
                     sort_keys=True)
    if args.fresh and done_f.exists():
        done_f.unlink()
    names = lambda r: tuple(r[k] for k in bench.job_keys)  # noqa: E731
    have = {names(r) for r in read_rows(done_f, key)}
    pending = [j for j in jobs if names(j) not in have]
    log(f"{len(pending)} of {len(jobs)} job(s) pending")
    run_pool(bench, s, ctx, work, pending, done_f, key, min(n_workers, max(1, len(pending))), deadline,
             lambda r: log(f"{_job_name(bench, r)}: done in {r['wall_s']:.0f} s"))
    wanted = {names(j) for j in jobs}
    rows = [r for r in read_rows(done_f, key) if names(r) in wanted]
    return {"dry_run": False, "settings": dataclasses.asdict(s), "settings_obj": s, "args": args, "argv": argv,
            "plan": plan, "ctx": ctx, "work": work, "rows": rows, "jobs_expected": len(jobs),
            "jobs_done": len(rows), "complete": len(rows) == len(jobs), "n_workers": n_workers,
            "hardware": hardware_info(str(s.device)), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "wall_time_s": time.perf_counter() - t_start}
