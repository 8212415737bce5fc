"""The skeleton the benchmarks share: settings and scale presets, command line, seeds, a job pool with resume and a
time budget, the summary over seeds, Markdown, a plot, and the timing and reporting helpers.

A comparison benchmark is a `Bench`: presets of its `Settings` (a `BaseSettings` subclass), `jobs(s)` (seed-major),
`prepare(s, work) -> ctx` (once per process) and `run_one(s, ctx, job) -> row`. `main(bench)` parses the command
line, runs every pending job (one JSON line each in <work>/results.jsonl, so a rerun continues) in
`concurrent.futures` worker processes, and returns what the benchmark's report needs.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import dataclasses
import fcntl
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
from typing import Any, Callable, Sequence

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
for _p in (str(HERE), str(REPO_ROOT)):  # `python benchmarks/x.py` from a checkout works without installing
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from regprune import engine as E  # noqa: E402
from regprune.errors import UserError  # noqa: E402
from regprune.report import format_table, pyplot  # noqa: E402

INPUT_SHAPE = (1, 28, 28)
KEY_IGNORES = ("seeds", "methods", "threads", "workers")  # settings that do not change what a job computes


# ---------------------------------------------------------------------------------------------- utilities
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def hardware_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on, with the load average at the start (other jobs change every timing)."""
    cpu = platform.processor()
    if not cpu and Path("/proc/cpuinfo").is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    info: dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(), "processor": cpu or "unknown",
        "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(), "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(), "device": device,
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()]}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return info


def fmt_pm(mean: float, std: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    E.atomic_write_text(path, json.dumps(E.log.to_jsonable(obj), indent=1, allow_nan=True) + "\n")
    return path


def fill_defaults(args: argparse.Namespace, quick: bool, **defaults: tuple[Any, Any]) -> None:
    """Each option left unset (None) gets its (full run, quick run) default."""
    for k, (full, q) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, q if quick else full)


def run_script(main: Callable[[], Any]) -> None:
    """Run a benchmark's main(); a user error ends with one line on stderr and exit status 2."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _import_script(script: str, module: str) -> Any:
    if module not in sys.modules:
        spec = importlib.util.spec_from_file_location(module, script)
        sys.modules[module] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module])
    return sys.modules[module]


def _call(module: str, name: str, args: tuple) -> Any:
    return getattr(sys.modules[module], name)(*args)


def in_fresh_process(fn: Callable, *args: Any) -> Any:
    """fn(*args) in a new (spawned) interpreter; fn is a function of a benchmark script, imported there by path."""
    module = f"_fresh_{fn.__module__}"
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_import_script,
                                initargs=(sys.modules[fn.__module__].__file__, module)) as ex:
        return ex.submit(_call, module, fn.__name__, args).result()


# ---------------------------------------------------------------------------------------------- timing
def sync_of(device: torch.device | str) -> Callable[[], None]:
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, before: Callable[[str], Any] | None = None,
                sync: Callable[[], None] = lambda: None, calls: int = 1,
                note: Callable[[int, dict, dict], None] | None = None) -> tuple[dict[str, list], dict[str, list]]:
    """(wall, CPU) seconds per call of each callable: every round calls each `calls` times, the order rotated
    every round so drift in the machine's load hits all alike; `before(name)` runs untimed first."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            if before:
                before(k)
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fns[k]()
            sync()
            wall[k].append((time.perf_counter() - t0) / calls)
            cpu[k].append((time.process_time() - c0) / calls)
        if note:
            note(r, wall, cpu)
    return wall, cpu


def img_per_s(model: torch.nn.Module, batch: int, *, train: bool = True, steps: int = 3, device: str = "cpu",
              variant: str = "plain") -> float:
    """Images per second of SGD steps (the model is trained in place; `variant`: with a method's hooks, see
    Stepper) or of eval forwards, on random data, after one untimed call."""
    if train:
        fn = Stepper(variant, torch.device(device), make_batches(1, batch, device), model=model).step
    else:
        x, model = make_batches(1, batch, device)[0][0], model.to(device).eval()
        fn = torch.no_grad()(lambda: model(x))
    wall, _ = interleaved({"m": fn}, 1, before=lambda _: fn(), sync=sync_of(device), calls=steps)
    return batch / max(wall["m"][0], 1e-9)


def throughput(make_model: Callable[[], torch.nn.Module], batch: int, device: str = "cpu") -> dict[str, float]:
    """Training and eval images per second of a model in this process."""
    dev = "cuda" if str(device).startswith("cuda") and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    return {"train_img_s": img_per_s(make_model(), batch, steps=5, device=dev),
            "eval_img_s": img_per_s(make_model(), 256, train=False, steps=2, device=dev)}


def make_batches(n: int, batch: int, device: torch.device | str, size: int = 28) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 1, size, size, generator=g).to(device),
             torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(n)]


class Stepper:
    """SGD training steps of a 1-channel, 10-class model on fixed batches, plain or with a method's hooks (GReg-1/2:
    the paper's CIFAR schedule, in its growth phase; SPM: the settings of `regprune scratch` for small networks;
    both at 2x fewer MACs). `hook_s`: CPU seconds inside the method's hook calls (not their autograd, not gating)."""

    def __init__(self, variant: str, device: torch.device, batches: list, amp: bool = False,
                 channels_last: bool = False, model: str | torch.nn.Module = "resnet20", lr: float = 0.01) -> None:
        from regprune.api import regularizer
        from regprune.methods.greg import GRegConfig
        from regprune.methods.spm import SPMRegularizer
        from regprune.models import create_model

        self.batches, self.i, self.amp, self.channels_last, self.hook_s = batches, 0, amp, channels_last, 0.0
        torch.manual_seed(0)
        m = create_model(model, num_classes=10, in_channels=1) if isinstance(model, str) else model
        x1 = torch.zeros(1, 1, *batches[0][0].shape[2:])
        self.greg = self.spm = None
        if variant in ("greg1", "greg2"):
            self.greg = regularizer(m, x1, variant, target_macs=0.5, config=GRegConfig())
        elif variant.startswith("spm"):
            self.spm = SPMRegularizer.attach(m, x1, 0.5, alpha_nuc=1e-3, alpha_mac=20.0, mac_norm="dense",
                                             nuc_every=10 if variant == "spm_nuc10" else 1, gate_lr_scale=0.1)
        m.to(device)
        if channels_last:
            m.to(memory_format=torch.channels_last)
        gates = list(self.spm.gates.parameters()) if self.spm else []
        params = [p for p in m.parameters() if id(p) not in {id(g) for g in gates}]
        groups = [{"params": params}] + ([{"params": gates, "weight_decay": 0.0, "lr": lr * 0.1}] if gates else [])
        self.model = m.train()
        self.opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=5e-4)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def _hook(self, fn: Callable, *a: Any) -> Any:
        t = time.process_time()
        out = fn(*a)
        self.hook_s += time.process_time() - t
        return out

    def step(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            out = self.model(x)
            loss = F.cross_entropy(out, y)
        term = self._hook(self.spm.extra_loss, None, self.model, out) if self.spm else None
        loss = loss + term if term is not None else loss
        self.scaler.scale(loss).backward()  # a disabled scaler (no AMP) passes the loss and the step through
        self.scaler.unscale_(self.opt)
        if self.greg:
            self._hook(self.greg.after_backward)
        self.scaler.step(self.opt)
        self.scaler.update()
        for reg in (self.greg, self.spm):
            if reg:
                self._hook(reg.on_step_end)

    def run(self, n: int) -> None:
        for _ in range(n):
            self.step()


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class BaseSettings:
    """Fields every comparison benchmark has (all stored verbatim in the JSON)."""

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
    name: str
    doc: str
    scales: dict[str, Any]
    methods: Sequence[str]
    script: Path                                    # the benchmark's file (workers import it by path)
    job_keys: tuple[str, ...]                       # the fields of a row that name its job
    jobs: Callable[[Any], list[dict[str, Any]]]     # settings -> every job, seed-major
    prepare: Callable[[Any, Path], Any]             # (settings, work dir) -> context, once per process
    run_one: Callable[[Any, Any, dict[str, Any]], dict[str, Any]]
    add_args: Callable[[argparse.ArgumentParser], None] | None = None
    default_scale: str = "smoke"
    estimate: Callable[[Any, Any], dict[str, Any]] | None = None  # (settings, args) -> plan, for --dry-run
    dense_model: Callable[[Any], torch.nn.Module] | None = None     # settings -> dense model (thread probe)


def parse_args(bench: Bench, argv: list[str] | None) -> argparse.Namespace:
    """The common options, then the benchmark's; any option named like a Settings field overrides the preset."""
    ap = argparse.ArgumentParser(description=bench.doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(bench.scales), default=bench.default_scale)
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--methods", nargs="+", choices=list(bench.methods))
    ap.add_argument("--limit-train", help="training images (an integer or 'all')")
    ap.add_argument("--limit-test", help="test images (an integer or 'all')")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--device")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision (CUDA only)")
    ap.add_argument("--workers", type=int, help="data loader worker processes")
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
    for f in dataclasses.fields(s):
        if (v := getattr(args, f.name, None)) is None:
            continue
        if f.name.startswith("limit_"):  # an image count, or all of them
            t = str(v).strip().lower()
            if t not in ("all", "none", "full") and not (t.isdigit() and int(t) >= 1):
                raise UserError(f"--{f.name.replace('_', '-')}: expected an integer >= 1 or 'all', got {v!r}")
            v = None if t in ("all", "none", "full") else int(t)
        setattr(s, f.name, list(v) if isinstance(v, list) else v)
    if not str(s.device).startswith("cuda"):
        s.amp = False
    if s.seeds < 1:
        raise UserError("--seeds must be >= 1")
    if args.jobs < 1:
        raise UserError("--jobs must be >= 1")
    return s


# ---------------------------------------------------------------------------------------------- job pool
def read_rows(done_f: Path, key: str) -> list[dict[str, Any]]:
    lines = done_f.read_text().splitlines() if done_f.exists() else []
    return [rec["row"] for rec in map(json.loads, filter(str.strip, lines)) if rec.get("key") == key]


def _job_name(bench: Bench, job: dict[str, Any]) -> str:
    return " ".join(f"{k}={job[k]}" for k in bench.job_keys)


def _timed_run(bench: Bench, s: Any, ctx: Any, job: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    row = {**job, **bench.run_one(s, ctx, job)}
    row["wall_s"] = time.perf_counter() - t0
    return row


_WORKER: dict[str, Any] = {}


def _worker_init(script: str, module: str, settings: dict[str, Any], work: str) -> None:
    torch.set_num_threads(1)
    bench = _import_script(script, module).BENCH
    settings = type(bench.scales[bench.default_scale])(**settings)
    _WORKER.update(bench=bench, settings=settings, work=Path(work), ctx=None)


def _worker_run(job: dict[str, Any]) -> dict[str, Any]:
    b, s = _WORKER["bench"], _WORKER["settings"]
    if _WORKER["ctx"] is None:
        _WORKER["ctx"] = b.prepare(s, _WORKER["work"])
    return _timed_run(b, s, _WORKER["ctx"], job)


def run_pool(bench: Bench, s: Any, ctx: Any, work: Path, pending: list[dict[str, Any]], done_f: Path, key: str,
             n_workers: int, deadline: float | None) -> None:
    """Run `pending` in order, at most `n_workers` at once (one: in this process), appending each finished row to
    `done_f`; a job that would likely end after `deadline` (its slowest finished sibling's time) is not started."""
    def admit(job: dict[str, Any]) -> bool:
        rows = [r for r in read_rows(done_f, key) if "wall_s" in r]
        same = [r["wall_s"] for r in rows if all(r.get(k) == v for k, v in job.items() if k != "seed")]
        if deadline is not None and time.time() + max(same or [r["wall_s"] for r in rows] or [0.0]) > deadline:
            log(f"{_job_name(bench, job)}: not started (time budget)")
            return False
        return True

    def finish(row: dict[str, Any]) -> None:
        with open(done_f, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # released on close
            fh.write(json.dumps(E.log.to_jsonable({"key": key, "row": row})) + "\n")
        log(f"{_job_name(bench, row)}: done in {row['wall_s']:.0f} s")

    if n_workers <= 1:
        for job in filter(admit, pending):
            finish(_timed_run(bench, s, ctx, job))
        return
    queue, running = list(pending), set()
    init = (str(bench.script), f"bench_{bench.name}_worker", dataclasses.asdict(s), str(work))
    with cf.ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                initargs=init) as pool:
        while queue or running:
            while queue and len(running) < n_workers:
                if admit(job := queue.pop(0)):
                    running.add(pool.submit(_worker_run, job))
            if not running:
                break
            done, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                try:
                    finish(fut.result())
                except Exception as exc:  # one failed job must not lose the others' results
                    log(f"a job failed: {type(exc).__name__}: {exc}")


def main(bench: Bench, argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, plan, run the pending jobs; returns {settings, rows, ctx, ...} for the report ("dry_run": True and the
    plan when nothing ran)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(bench, argv)
    s = make_settings(bench, args)
    t_start = time.perf_counter()
    deadline = time.time() + args.time_budget if args.time_budget is not None else None
    if s.threads == 0 and bench.dense_model is not None and str(s.device).startswith("cpu"):
        # the faster of 1 and all threads for training (on a shared machine one thread often wins: intra-op
        # threads spin-wait for each other while other processes hold the cores)
        speed = {}
        for n in sorted({1, usable_cpus()}):
            torch.set_num_threads(n)
            speed[n] = img_per_s(bench.dense_model(s), s.batch_size)
        s.threads = max(speed, key=speed.get)
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
    key = json.dumps({k: v for k, v in E.log.to_jsonable(dataclasses.asdict(s)).items() if k not in KEY_IGNORES},
                     sort_keys=True)
    if args.fresh and done_f.exists():
        done_f.unlink()
    name = lambda r: tuple(r[k] for k in bench.job_keys)  # noqa: E731
    have = {name(r) for r in read_rows(done_f, key)}
    pending = [j for j in jobs if name(j) not in have]
    log(f"{len(pending)} of {len(jobs)} job(s) pending")
    run_pool(bench, s, ctx, work, pending, done_f, key, min(n_workers, max(1, len(pending))), deadline)
    wanted = {name(j) for j in jobs}
    rows = [r for r in read_rows(done_f, key) if name(r) in wanted]
    return {"dry_run": False, "settings": dataclasses.asdict(s), "settings_obj": s, "args": args, "argv": argv,
            "plan": plan, "ctx": ctx, "work": work, "rows": rows, "jobs_expected": len(jobs),
            "jobs_done": len(rows), "complete": len(rows) == len(jobs), "n_workers": n_workers,
            "hardware": hardware_info(str(s.device)), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "wall_time_s": time.perf_counter() - t_start}


# ---------------------------------------------------------------------------------------------- summary
def summarize(rows: list[dict[str, Any]], by: Sequence[str], metrics: Sequence[str],
              order: Callable[[tuple], Any] | None = None) -> list[dict[str, Any]]:
    """One entry per distinct `by` values: n_seeds, seeds, and each metric's mean, sample std and per-seed values
    (rows without the metric, or with None, left out of it)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for k, rs in sorted(groups.items(), key=(lambda kv: order(kv[0])) if order else None):
        rs = sorted(rs, key=lambda r: r["seed"])
        g: dict[str, Any] = {**dict(zip(by, k)), "n_seeds": len(rs), "seeds": [r["seed"] for r in rs]}
        for m in metrics:
            vals = [r[m] for r in rs if r.get(m) is not None]
            g[f"{m}_mean"], g[f"{m}_std"] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) \
                if vals else (None, None)
            g[f"{m}_values"] = vals
        out.append(g)
    return out


def compare(summary: list[dict[str, Any]], rows: list[dict[str, Any]], within: Sequence[str], metric: str,
            pairs: Sequence[tuple[str, str]] | None = None, label: str = "method") -> list[dict[str, Any]]:
    """Pairs of `label` values inside each `within` group (`pairs` None: every pair): difference of means against
    the seed spread (std a + std b), with the paired per-seed differences."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for g in summary:
        groups.setdefault(tuple(g[k] for k in within), []).append(g)
    for wk, gs in groups.items():
        by, sel = {g[label]: g for g in gs}, dict(zip(within, wk))
        todo = pairs if pairs is not None else [(a[label], b[label]) for a, b in itertools.combinations(gs, 2)]
        for a, b in todo:
            if a not in by or b not in by or by[a][f"{metric}_mean"] is None or by[b][f"{metric}_mean"] is None:
                continue
            ga, gb = by[a], by[b]
            diff = ga[f"{metric}_mean"] - gb[f"{metric}_mean"]
            spread = ga[f"{metric}_std"] + gb[f"{metric}_std"]
            va, vb = ({r["seed"]: r[metric] for r in rows if r[label] == x and all(r[k] == v for k, v in sel.items())}
                      for x in (a, b))
            paired = [round(va[k] - vb[k], 2) for k in sorted(va) if k in vb]
            n = min(ga["n_seeds"], gb["n_seeds"])
            out.append({**sel, "a": a, "b": b, "diff": diff, "spread": spread, "n_seeds": n,
                        "exceeds_spread": bool(n >= 2 and abs(diff) > spread), "paired_diffs": paired,
                        "paired_same_sign": bool(paired) and (all(d > 0 for d in paired) or all(d < 0 for d in paired))})
    return out


def verdict(c: dict[str, Any]) -> str:
    if c.get("n_seeds", 2) < 2:
        return "cannot tell: one seed has no spread"
    if c["exceeds_spread"]:
        return f"{c['a']} is {'higher' if c['diff'] > 0 else 'lower'} by more than the seed spread"
    return "inside the seed spread: this run does not separate them"


# ---------------------------------------------------------------------------------------------- report
def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A padded Markdown table (regprune.report.format_table) of dict rows."""
    return format_table(rows, columns or list(rows[0])) if rows else "(no results)"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """An unpadded Markdown table, one line per row."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(map(str, r)) + " |" for r in rows]


def header_lines(res: dict[str, Any], title: str) -> list[str]:
    """Title, partial-run notice, smoke notice and hardware line."""
    s, hw = res["settings"], res.get("hardware", {})
    lines = [f"# {title} ({s['scale']} scale)", ""]
    if not res.get("complete", True):
        lines += [f"**Partial: {res['jobs_done']} of {res['jobs_expected']} jobs finished; the `seeds` column shows "
                  "how many each mean covers.**", ""]
    if s["scale"] == "smoke":
        lines += ["**Smoke scale: a few iterations on a few images. It checks that every path runs; its "
                  "accuracies say nothing about the methods.**", ""]
    return lines + [f"Hardware: {hw.get('gpu') or hw.get('processor') or 'unknown'} ({hw.get('cpus_usable')} usable "
                    f"cores, {s.get('threads')} torch thread(s) per process, {res.get('n_workers', 1)} worker "
                    f"process(es)); torch {hw.get('torch', '?')}; load average at start {hw.get('loadavg_1_5_15')}. "
                    f"Wall time {res.get('wall_time_s', 0) / 60:.1f} min.", ""]


def save_fig(fig, path: Path, dpi: float | None = None) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def write_outputs(res: dict[str, Any], out_dir: Path, stem: str, markdown: Callable[[dict], str],
                  plots: Sequence[Callable[[Path], Any]] = (), t_start: float | None = None) -> dict[str, Any]:
    """<stem>.json and <stem>.md (`t_start` given: res["wall_time_s"] stamped first), then each plot(out_dir) (a
    failing plot is logged, not raised); prints the Markdown and returns res as written."""
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
