"""The torchvision zoo: does `regprune.prune(model, x, speedup=2.0)` work on every classifier torchvision ships?
Each model of regprune's registry runs in its own process (`--jobs` at a time, `--timeout` each) and ends
reached, refused, inspected (over `--max-params`: analysed only), timeout or error (see benchmarks/README.md).

    OMP_NUM_THREADS=2 python benchmarks/zoo.py --jobs 2 --timeout 150     # the recorded run, 2 shared CPU cores

Writes benchmarks/results/zoo.{json,md}.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402  (puts the repository root on sys.path)
from harness import log  # noqa: E402

from regprune.engine import atomic_write_text  # noqa: E402
from regprune.errors import UserError  # noqa: E402

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


def pick_input_size(model, min_size: int = 64) -> tuple[int | None, int | None]:
    """(smallest side where eval at batch 1 and train at batch 2 both run, smallest where eval runs)."""
    import torch

    eval_ok, was = None, model.training
    try:
        for s in (s for s in SIZES if s >= min_size):
            try:
                with torch.no_grad():
                    model.eval()(torch.zeros(1, 3, s, s))
                    eval_ok = eval_ok or s
                    model.train()(torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0)))
                return s, eval_ok
            except (RuntimeError, ValueError, AssertionError, IndexError):
                continue
        return None, eval_ok
    finally:
        model.train(was)


def run_one(name: str, timeout: float = 150, min_size: int = 64, max_params_m: float = 30.0,
            num_classes: int = 10, threads: int = 1) -> dict[str, Any]:
    """One model, start to end, under a SIGALRM of `timeout` seconds; never raises (what went wrong is the
    record's outcome)."""
    import torch

    import regprune
    from regprune.counting import count_macs, count_params
    from regprune.graph import analyze

    torch.set_num_threads(threads)
    rec: dict[str, Any] = {k: None for k in (
        "model", "outcome", "stage", "params", "input_size", "eval_min_size", "mode", "dense_macs", "pruned_macs",
        "speedup", "speedup_ok", "verified", "verification", "shape_ok", "groups", "in_scope", "unsafe")}
    rec.update(model=name, stage="build", unsafe_reasons=[], reason="", one_line=None, traceback=None, seconds={},
               threads=threads)
    t0 = t_stage = time.perf_counter()

    def stage(nxt: str) -> None:
        nonlocal t_stage
        now = time.perf_counter()
        rec["seconds"][rec["stage"]] = round(now - t_stage, 2)
        rec["stage"], t_stage = nxt, now

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, float(timeout))
    try:
        try:
            model = regprune.create_model(name, num_classes=num_classes)
            rec["params"] = count_params(model)
            stage("input_size")
            size, eval_min = pick_input_size(model, min_size)
            size = size or eval_min  # without a train-mode size, verification notes that train mode does not run
            rec["input_size"], rec["eval_min_size"] = size, eval_min
            if size is None:
                raise RuntimeError(f"the dense model runs at none of the sizes {SIZES} >= {min_size}")
            x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
            rec["mode"] = "prune" if rec["params"] <= max_params_m * 1e6 else "inspect"
            stage("analyze")
            graph = analyze(model, x)
            bad = [g for g in graph.groups.values() if g.unsafe]
            rec.update(dense_macs=count_macs(model, x), groups=len(graph.groups), in_scope=len(graph.scope()),
                       unsafe=len(bad), unsafe_reasons=[f"{g.root}: {g.reason}" for g in bad[:10]])
            del graph
            rec["outcome"] = "inspected"
            if rec["mode"] == "prune":
                stage("prune")
                result = regprune.prune(model, x, speedup=SPEEDUP)
                stage("measure")
                pruned, ver = result.model, result.verification
                rec["pruned_macs"] = count_macs(pruned, x)
                rec["speedup"] = rec["dense_macs"] / max(rec["pruned_macs"], 1)
                rec["speedup_ok"] = abs(rec["speedup"] - SPEEDUP) <= TOLERANCE * SPEEDUP
                rec["verification"], rec["verified"] = ver, bool(ver and ver.get("verified"))
                with torch.no_grad():
                    rec["shape_ok"] = tuple(model.eval()(x).shape) == tuple(pruned.eval()(x).shape)
                rec["outcome"] = "reached"
                notes = [f"speedup miss: {rec['speedup']:.3f}x measured for {SPEEDUP}x"] * (not rec["speedup_ok"])
                notes += ["no verification recorded"] * (not rec["verified"])
                notes += ["output shape differs from the dense model's"] * (not rec["shape_ok"])
                rec["reason"] = one_line("; ".join(notes + (ver or {}).get("notes", [])))
        except UserError as exc:
            rec.update(outcome="refused", one_line="\n" not in str(exc), reason=one_line(str(exc)))
        except Exception as exc:  # noqa: BLE001  (everything else is a bug to report)
            rec.update(outcome="error", reason=one_line(f"{type(exc).__name__}: {exc}"),
                       traceback=traceback.format_exc())
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except CaseTimeout:  # raised anywhere above, the handlers included
        rec.update(outcome="timeout", reason=f"over {timeout:g} s (in stage {rec['stage']})")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    stage("done")
    rec["seconds"].pop("done", None)
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    return rec


def run_case(name: str, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """run_one in a fresh interpreter, killed GRACE_S past its timeout (stuck in one native call that ignored its
    alarm: a timeout); one that dies by itself (out of memory?) gets a second try, then is an error."""
    kw = dict(name=name, timeout=args.timeout, min_size=args.min_size, max_params_m=args.max_params,
              num_classes=args.num_classes, threads=threads)
    dead = {"model": name, "outcome": "error", "stage": None, "wall_s": None, "params": None, "seconds": {},
            "reason": "worker process died twice (killed by the system: out of memory?)"}
    with tempfile.TemporaryDirectory(prefix="zoo_") as tmp:
        out = Path(tmp) / "case.json"
        for _ in range(2):
            try:
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_case", json.dumps(kw), str(out)],
                               timeout=args.timeout + GRACE_S, check=False)
            except subprocess.TimeoutExpired:
                return {**dead, "outcome": "timeout",
                        "reason": f"over {args.timeout:g} s and did not stop at its alarm: worker killed"}
            if out.exists():
                return json.loads(out.read_text())
            log(f"{name}: its worker died, to be run again")
    return dead


def run_all(names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every model in its own process, `args.jobs` at a time, each with cores / jobs torch threads."""
    threads, results = max(1, H.usable_cpus() // args.jobs), {}
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        futs = {pool.submit(run_case, n, args, threads): n for n in names}
        for f in cf.as_completed(futs):
            rec = results[futs[f]] = f.result()
            sp = f"{rec['speedup']:.3f}x" if rec.get("speedup") else ""
            log(f"{len(results)}/{len(names)} {futs[f]}: {rec['outcome']} {sp} {rec.get('wall_s')} s "
                f"{rec.get('reason', '')[:160]}")
    return [results[n] for n in names]


def library_version() -> dict[str, Any]:
    """regprune's version and, in a git checkout, its commit and whether the library has local changes."""
    import regprune

    info: dict[str, Any] = {"regprune": regprune.__version__}
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=H.REPO_ROOT, capture_output=True, text=True,  # noqa: E731
                                        timeout=30).stdout.strip()
        info["commit"] = git("rev-parse", "--short", "HEAD") or None
        info["library_changes"] = bool(git("status", "--porcelain", "--", "regprune"))
    except (OSError, subprocess.SubprocessError):  # no git
        pass
    return info


def markdown(data: dict[str, Any]) -> str:
    hw, lib, st = data["hardware"], data.get("library", {}), data["settings"]
    at = (f"regprune {lib.get('regprune')}" + (f" at {lib['commit']}" if lib.get("commit") else "")
          + (" with local changes" if lib.get("library_changes") else "")
          + (f" (at {lib['at_end'].get('commit')} by the end of the run)" if lib.get("at_end") else ""))
    rows = []
    for r in data["results"]:
        reason = (r.get("reason") or "").replace("|", "\\|")
        if r.get("unsafe_reasons") and r["outcome"] != "error":
            first = one_line(r["unsafe_reasons"][0].replace("|", "\\|"), 200)
            reason = (reason + "; " if reason else "") + f"first unsafe: {first}"
        rows.append((r["model"].removeprefix("torchvision."), r.get("input_size") or "",
                     f"{r['params'] / 1e6:.1f}" if r.get("params") else "", r["outcome"],
                     "" if r.get("speedup") is None else f"{r['speedup']:.3f}x" + ("" if r.get("speedup_ok") else " (miss)"),
                     f"{r['in_scope']} / {r['unsafe']}" if r.get("in_scope") is not None else "",
                     f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "", reason))
    return "\n".join([
        "# The torchvision zoo: `regprune.prune(model, x, speedup=2.0)` on every classifier", "",
        f"Run: `{data['command']}` ({data['wall_time_s'] / 60:.1f} min; {hw.get('processor')}, "
        f"{hw.get('cpus_usable')} CPUs, torch {hw.get('torch')}, {at}, load {hw.get('loadavg_1_5_15')}). "
        f"`num_classes={st['num_classes']}`, random weights; over {st['max_params_m']:g} M parameters only analysed; "
        f"a miss is more than {TOLERANCE:.0%} from {SPEEDUP:g}x (see benchmarks/README.md).", "",
        f"Outcomes: {', '.join(f'{k}: {v}' for k, v in data['counts'].items())}. Speedup misses: {data['misses']}. "
        f"Unverified results: {data['unverified']}.", "",
        *H.md_table(["model", "input", "M params", "outcome", "speedup", "groups in scope / unsafe", "seconds",
                     "reason"], rows)]) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["torchvision.*"],
                    help="globs over regprune's registry (default torchvision.*)")
    ap.add_argument("--timeout", type=float, default=150, help="seconds per model (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="models at a time, each in its own process (default 2)")
    ap.add_argument("--out", default=str(H.HERE / "results"), help="folder for <name>.json and <name>.md")
    ap.add_argument("--name", default="zoo", help="file name stem (default %(default)s)")
    ap.add_argument("--max-params", type=float, default=30.0, help="M parameters above which a model is only "
                    "analysed (default %(default)s)")
    ap.add_argument("--min-size", type=int, default=64, help="smallest input side tried (default %(default)s)")
    ap.add_argument("--num-classes", type=int, default=10, help="classifier width (default %(default)s)")
    ap.add_argument("--_case", nargs=2, metavar=("KWARGS", "OUT"), help=argparse.SUPPRESS)  # one model, internal
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.timeout <= 0:
        raise UserError("--jobs must be >= 1 and --timeout > 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import regprune

    args = parse_args(argv)
    if args._case:
        return H.write_json(Path(args._case[1]), run_one(**json.loads(args._case[0])))
    names = sorted({n for g in args.models for n in regprune.list_models(g) if n.startswith("torchvision.")})
    if not names:
        raise UserError(f"no torchvision model matches {' '.join(args.models)!r}")
    log(f"{len(names)} models, {args.jobs} at a time, {args.timeout:g} s each")
    hw, lib = H.hardware_info("cpu"), library_version()  # workers import the library as it is on disk when they start
    t0 = time.perf_counter()
    results = run_all(names, args)
    if (end := library_version()) != lib:
        lib["at_end"] = end  # the library changed during the run
    counts = {k: sum(r["outcome"] == k for r in results) for k in OUTCOMES}
    reached = [r for r in results if r["outcome"] == "reached"]
    data = {
        "benchmark": "zoo",
        "command": ("python benchmarks/zoo.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip(),
        "settings": {"models": args.models, "timeout_s": args.timeout, "jobs": args.jobs,
                     "max_params_m": args.max_params, "min_size": args.min_size, "num_classes": args.num_classes,
                     "speedup": SPEEDUP, "tolerance": TOLERANCE, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "hardware": hw, "library": lib, "wall_time_s": round(time.perf_counter() - t0, 1), "counts": counts,
        "misses": [r["model"] for r in reached if not r.get("speedup_ok")],
        "unverified": [r["model"] for r in reached if not r.get("verified")],
        "errors": [r["model"] for r in results if r["outcome"] in ("error", "timeout")],
        "results": results,
    }
    out = Path(args.out)
    H.write_json(out / f"{args.name}.json", data)
    atomic_write_text(out / f"{args.name}.md", markdown(data))
    log(f"{counts}; wrote {out / args.name}.json and .md")
    return data


if __name__ == "__main__":
    H.run_script(main)
