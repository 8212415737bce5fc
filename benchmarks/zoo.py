"""The torchvision zoo: does `regprune.prune(model, x, speedup=2.0)` work on every classifier torchvision ships?

How the recorded run (results/zoo.{md,json}) was made, from the repository root, on 2 shared CPU cores:

    OMP_NUM_THREADS=2 nohup .venv/bin/python benchmarks/zoo.py --jobs 2 --timeout 150 > /tmp/zoo.log 2>&1 &

For every `torchvision.*` model in regprune's registry (built with `regprune.create_model(name, num_classes=10)`,
random weights), in its own subprocess (a `ProcessPoolExecutor`, `--jobs` at a time, one model per process):

1. **Input size.** The smallest square side (from `--min-size`, default 64, up to 299) at which the dense model
   runs in eval mode at batch 1 *and* in train mode at batch 2, because verification runs both: 64 for nearly
   every model, 224 for the ViTs (fixed image size) and MaxViT (a multiple of its 7x7 partitions times 32),
   299 for Inception-v3 (its auxiliary head runs only in train mode and needs a 17x17 map; in eval mode 75 is
   enough). Below 64 most networks end their last stage on a 1x1 map; `--min-size 32` probes lower.
2. **Groups.** `regprune.graph.analyze(model, x)`: channel groups, how many are in scope, how many a trial cut
   found unsafe (with their reasons, in the JSON).
3. **Pruning** (models up to `--max-params`, default 30 M parameters; larger ones are only inspected):
   `regprune.prune(model, x, speedup=2.0)`. The speedup is measured on the returned model
   (`regprune.counting.count_macs`, dense / pruned), and its output shape compared with the dense model's.

Outcomes: `reached` (a pruned model came back; `speedup_ok` says whether it is within 2% of 2.0),
`refused` (a `regprune.UserError`: the one-line reason is recorded), `inspected` (over the size limit: analysis
only), `timeout` (`--timeout` seconds per model, the stage it was in recorded), `error` (any other exception,
with its traceback in the JSON, or a dead worker process): an `error` is a bug.

Each worker uses cores / jobs torch threads. Seconds are wall-clock time for the whole case (build, size probe,
analysis, pruning, measuring) and depend on the machine's load.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts the repository root on sys.path)
from common import hardware_info, log, run_script, write_json  # noqa: E402

from regprune.engine import atomic_write_text  # noqa: E402
from regprune.errors import UserError  # noqa: E402

__all__ = ["main", "run_one", "pick_input_size", "OUTCOMES", "SPEEDUP", "TOLERANCE"]

HERE = Path(__file__).resolve().parent
OUTCOMES = ("reached", "refused", "inspected", "timeout", "error")
SPEEDUP = 2.0
TOLERANCE = 0.02  # a measured speedup further than 2% from the target is a miss
SIZES = (32, 48, 64, 75, 96, 128, 160, 192, 224, 256, 299)
GRACE_S = 60  # past timeout + grace a worker that ignored its alarm is killed


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a worker (a BaseException, so no `except Exception` in the library eats it)."""


def _alarm(signum, frame):
    raise CaseTimeout()


def one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def pick_input_size(model, min_size: int = 64, sizes: tuple[int, ...] = SIZES) -> tuple[int | None, int | None]:
    """(smallest side where eval at batch 1 and train at batch 2 both run, smallest where eval runs)."""
    import torch

    eval_ok = None
    was = model.training
    try:
        for s in [s for s in sizes if s >= min_size]:
            try:
                with torch.no_grad():
                    model.eval()
                    model(torch.zeros(1, 3, s, s))
                    eval_ok = eval_ok or s
                    model.train()
                    model(torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0)))
                return s, eval_ok
            except (RuntimeError, ValueError, AssertionError, IndexError):
                continue
        return None, eval_ok
    finally:
        model.train(was)


def run_one(name: str, timeout: float = 150, min_size: int = 64, max_params_m: float = 30.0,
            num_classes: int = 10, threads: int = 1, status_dir: str | None = None) -> dict[str, Any]:
    """One model, start to end; never raises (what went wrong is the record's outcome)."""
    import torch

    import regprune
    from regprune.counting import count_macs, count_params
    from regprune.graph import analyze

    if status_dir:  # lets the parent kill a worker that ignores its alarm
        Path(status_dir, f"{name}.pid").write_text(str(os.getpid()))
    torch.set_num_threads(threads)
    rec: dict[str, Any] = {"model": name, "outcome": None, "stage": "build", "params": None, "input_size": None,
                           "eval_min_size": None, "mode": None, "dense_macs": None, "pruned_macs": None,
                           "speedup": None, "speedup_ok": None, "verified": None, "verification": None,
                           "shape_ok": None, "groups": None, "in_scope": None, "unsafe": None,
                           "unsafe_reasons": [], "reason": "", "one_line": None, "traceback": None,
                           "seconds": {}, "threads": threads}
    t0 = time.perf_counter()
    t_stage = t0

    def stage(nxt: str) -> None:
        nonlocal t_stage
        now = time.perf_counter()
        rec["seconds"][rec["stage"]] = round(now - t_stage, 2)
        rec["stage"], t_stage = nxt, now

    use_alarm = timeout and timeout > 0 and hasattr(signal, "SIGALRM")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, float(timeout))
    try:
        try:
            model = regprune.create_model(name, num_classes=num_classes)
            rec["params"] = count_params(model)
            stage("input_size")
            size, eval_min = pick_input_size(model, min_size)
            rec["input_size"], rec["eval_min_size"] = size, eval_min
            if size is None:
                size = eval_min  # verification will note that train mode does not run
                rec["input_size"] = size
            if size is None:
                raise RuntimeError(f"the dense model runs at none of the sizes {SIZES} >= {min_size}")
            x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
            rec["mode"] = "prune" if rec["params"] <= max_params_m * 1e6 else "inspect"
            stage("analyze")
            graph = analyze(model, x)
            rec["dense_macs"] = count_macs(model, x)
            rec["groups"] = len(graph.groups)
            rec["in_scope"] = len(graph.scope())
            bad = [g for g in graph.groups.values() if g.unsafe]
            rec["unsafe"] = len(bad)
            rec["unsafe_reasons"] = [f"{g.root}: {g.reason}" for g in bad[:10]]
            del graph
            if rec["mode"] == "inspect":
                rec["outcome"] = "inspected"
            else:
                stage("prune")
                result = regprune.prune(model, x, speedup=SPEEDUP)
                stage("measure")
                pruned = result.model
                rec["pruned_macs"] = count_macs(pruned, x)
                rec["speedup"] = rec["dense_macs"] / max(rec["pruned_macs"], 1)
                rec["speedup_ok"] = abs(rec["speedup"] - SPEEDUP) <= TOLERANCE * SPEEDUP
                ver = result.verification
                rec["verification"] = ver
                rec["verified"] = bool(ver and ver.get("verified"))
                with torch.no_grad():
                    model.eval()
                    pruned.eval()
                    rec["shape_ok"] = tuple(model(x).shape) == tuple(pruned(x).shape)
                rec["outcome"] = "reached"
                notes = []
                if not rec["speedup_ok"]:
                    notes.append(f"speedup miss: {rec['speedup']:.3f}x measured for {SPEEDUP}x")
                if not rec["verified"]:
                    notes.append("no verification recorded")
                if not rec["shape_ok"]:
                    notes.append("output shape differs from the dense model's")
                notes += (ver or {}).get("notes", [])
                rec["reason"] = one_line("; ".join(notes))
        except UserError as exc:
            rec["outcome"] = "refused"
            rec["one_line"] = "\n" not in str(exc)
            rec["reason"] = one_line(str(exc))
        except Exception as exc:  # noqa: BLE001  (everything else is a bug to report)
            rec["outcome"] = "error"
            rec["reason"] = one_line(f"{type(exc).__name__}: {exc}")
            rec["traceback"] = traceback.format_exc()
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except CaseTimeout:
        rec["outcome"] = "timeout"
        rec["reason"] = f"over {timeout:g} s (in stage {rec['stage']})"
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    stage("done")
    rec["seconds"].pop("done", None)
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    return rec


def _dead(name: str, why: str) -> dict[str, Any]:
    return {"model": name, "outcome": "timeout" if why == "timeout" else "error", "stage": None,
            "reason": why if why != "timeout" else "did not stop at its alarm: worker killed",
            "wall_s": None, "params": None, "seconds": {}}


def run_all(names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every model in a subprocess, `args.jobs` at a time. A worker still running `GRACE_S` past its timeout
    (stuck in one long native call) is killed and recorded as a timeout; killing it breaks the pool, so the
    models that were running beside it are run again in a new pool. A worker that dies by itself (out of
    memory) breaks the pool too: the models that were running get a second try, then are recorded as errors."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cpus // args.jobs)
    results: dict[str, dict[str, Any]] = {}
    deaths: dict[str, int] = {}
    todo = list(names)
    status_root = Path(tempfile.mkdtemp(prefix="zoo_"))
    for round_no in range(1, 1000):
        if not todo:
            break
        status = status_root / str(round_no)  # pid files of this pool's workers
        status.mkdir()
        pool = cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn"),
                                      max_tasks_per_child=1)
        futs = {pool.submit(run_one, n, args.timeout, args.min_size, args.max_params, args.num_classes, threads,
                            str(status)): n for n in todo}
        started: dict[str, float] = {}
        broken = killed = False
        pending = set(futs)
        while pending and not broken:
            done, pending = cf.wait(pending, timeout=5, return_when=cf.FIRST_COMPLETED)
            for f in done:
                n = futs[f]
                try:
                    rec = f.result()
                except cf.process.BrokenProcessPool:
                    broken = True
                    continue
                except Exception as exc:  # noqa: BLE001  (an exception outside run_one's own handling)
                    rec = _dead(n, one_line(f"{type(exc).__name__}: {exc}"))
                results[n] = rec
                sp = f"{rec['speedup']:.3f}x" if rec.get("speedup") else ""
                log(f"{len(results)}/{len(names)} {n}: {rec['outcome']} {sp} {rec.get('wall_s')} s "
                    f"{rec.get('reason', '')[:160]}")
            now = time.time()
            for f in pending:
                n = futs[f]
                pidf = status / f"{n}.pid"
                if n not in started and pidf.exists():
                    started[n] = now
                if n in started and now - started[n] > args.timeout + GRACE_S and n not in results:
                    try:
                        os.kill(int(pidf.read_text()), signal.SIGKILL)
                    except (OSError, ValueError):
                        pass
                    results[n] = _dead(n, "timeout")
                    results[n]["reason"] = f"over {args.timeout:g} s and {results[n]['reason']}"
                    log(f"{len(results)}/{len(names)} {n}: timeout, killed after {now - started[n]:.0f} s")
                    broken = killed = True
        if killed:  # the pool is broken now: end its other workers too (they are run again below)
            for n in started:
                if n not in results:
                    try:
                        os.kill(int((status / f"{n}.pid").read_text()), signal.SIGKILL)
                    except (OSError, ValueError):
                        pass
        if broken:
            for n in futs.values():
                if n in results or n not in started:
                    continue  # finished, or never started: simply run again
                if killed:
                    log(f"{n}: stopped with the killed worker's pool, to be run again")
                    continue
                deaths[n] = deaths.get(n, 0) + 1
                if deaths[n] >= 2:
                    results[n] = _dead(n, "worker process died twice (killed by the system: out of memory?)")
                    log(f"{len(results)}/{len(names)} {n}: error, worker died twice")
                else:
                    log(f"{n}: its worker died (or one beside it did), to be run again")
        pool.shutdown(wait=True, cancel_futures=True)
        todo = [n for n in todo if n not in results]
    return [results[n] for n in names]


def library_version() -> dict[str, Any]:
    """regprune's version and, in a git checkout, its commit and whether the library has local changes."""
    import subprocess

    import regprune

    info: dict[str, Any] = {"regprune": regprune.__version__}
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=common.REPO_ROOT, capture_output=True, text=True,  # noqa: E731
                                        timeout=30).stdout.strip()
        info["commit"] = run("rev-parse", "--short", "HEAD") or None
        info["library_changes"] = bool(run("status", "--porcelain", "--", "regprune"))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _fmt_speedup(r: dict[str, Any]) -> str:
    if r.get("speedup") is None:
        return ""
    mark = "" if r.get("speedup_ok") else " (miss)"
    return f"{r['speedup']:.3f}x{mark}"


def markdown(data: dict[str, Any]) -> str:
    counts = ", ".join(f"{k}: {v}" for k, v in data["counts"].items())
    hw, lib = data["hardware"], data.get("library", {})
    at = f"regprune {lib.get('regprune')}" + (f" at {lib['commit']}" if lib.get("commit") else "") + \
        (" with local changes" if lib.get("library_changes") else "")
    if lib.get("at_end"):
        at += f" (at {lib['at_end'].get('commit')} by the end of the run)"
    lines = [
        "# The torchvision zoo: `regprune.prune(model, x, speedup=2.0)` on every classifier",
        "",
        f"Run: `{data['command']}` ({data['wall_time_s'] / 60:.1f} min; {hw.get('processor')}, "
        f"{hw.get('cpus_usable')} CPUs, torch {hw.get('torch')}, {at}, load {hw.get('loadavg_1_5_15')}).",
        f"Models built with `num_classes={data['settings']['num_classes']}`, random weights; input at the smallest "
        "side where both eval (batch 1) and train mode (batch 2) run; models over "
        f"{data['settings']['max_params_m']:g} M parameters only analysed. Speedup: MACs of the dense model over "
        f"those of the returned one (`count_macs`); a miss is more than {TOLERANCE:.0%} from {SPEEDUP:g}x. "
        "Seconds: wall clock of the whole case.",
        "",
        f"Outcomes: {counts}. Speedup misses: {data['misses']}. Unverified results: {data['unverified']}.",
        "",
        "| model | input | M params | outcome | speedup | groups in scope / unsafe | seconds | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        params = f"{r['params'] / 1e6:.1f}" if r.get("params") else ""
        groups = f"{r['in_scope']} / {r['unsafe']}" if r.get("in_scope") is not None else ""
        secs = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else ""
        reason = (r.get("reason") or "").replace("|", "\\|")
        if r.get("unsafe_reasons") and r["outcome"] != "error":
            first = r["unsafe_reasons"][0].replace("|", "\\|")
            reason = (reason + "; " if reason else "") + f"first unsafe: {one_line(first, 200)}"
        lines.append(f"| {r['model'].removeprefix('torchvision.')} | {r.get('input_size') or ''} | {params} | "
                     f"{r['outcome']} | {_fmt_speedup(r)} | {groups} | {secs} | {reason} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="torchvision.*", help="glob over regprune's registry (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=150, help="seconds per model (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="models at a time, each in its own process (default 2)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for <name>.json and <name>.md")
    ap.add_argument("--name", default="zoo", help="file name stem (default %(default)s)")
    ap.add_argument("--max-params", type=float, default=30.0, help="M parameters above which a model is only "
                    "analysed (default %(default)s)")
    ap.add_argument("--min-size", type=int, default=64, help="smallest input side tried (default %(default)s)")
    ap.add_argument("--num-classes", type=int, default=10, help="classifier width (default %(default)s)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        raise UserError("--jobs must be >= 1")
    if args.timeout <= 0:
        raise UserError("--timeout must be > 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import regprune

    args = parse_args(argv)
    names = regprune.list_models(args.models)
    names = [n for n in names if n.startswith("torchvision.")]
    if not names:
        raise UserError(f"no torchvision model matches {args.models!r}")
    command = "python benchmarks/zoo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    log(f"{len(names)} models, {args.jobs} at a time, {args.timeout:g} s each")
    hw = hardware_info("cpu")
    lib = library_version()  # the workers import the library as it is on disk when each starts
    t0 = time.perf_counter()
    results = run_all(names, args)
    end = library_version()
    if end != lib:
        lib["at_end"] = end  # the library changed during the run
    counts = {k: sum(r["outcome"] == k for r in results) for k in OUTCOMES}
    data = {
        "benchmark": "zoo",
        "command": command.strip(),
        "settings": {"models": args.models, "timeout_s": args.timeout, "jobs": args.jobs,
                     "max_params_m": args.max_params, "min_size": args.min_size, "num_classes": args.num_classes,
                     "speedup": SPEEDUP, "tolerance": TOLERANCE,
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "hardware": hw,
        "library": lib,
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "counts": counts,
        "misses": [r["model"] for r in results if r["outcome"] == "reached" and not r.get("speedup_ok")],
        "unverified": [r["model"] for r in results if r["outcome"] == "reached" and not r.get("verified")],
        "errors": [r["model"] for r in results if r["outcome"] in ("error", "timeout")],
        "results": results,
    }
    out = Path(args.out)
    write_json(out / f"{args.name}.json", data)
    atomic_write_text(out / f"{args.name}.md", markdown(data))
    log(f"{counts}; wrote {out / args.name}.json and .md")
    return data


if __name__ == "__main__":
    run_script(main)
