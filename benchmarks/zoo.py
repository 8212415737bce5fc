"""The torchvision zoo: does `regprune.prune(model, x, speedup=2.0)` work on every classifier torchvision ships?
Each model of regprune's registry runs in its own process (`--jobs` at a time, `--timeout` each) and ends
reached, refused, inspected (over `--max-params`: analysed only), timeout or error (see benchmarks/README.md).
A model refused or missing 2x at its smallest input is tried once more at `--retry-size` (224, the size
torchvision's classifiers are built for); the table shows both tries.

    OMP_NUM_THREADS=2 python benchmarks/zoo.py --jobs 2 --timeout 150     # the recorded run, 2 shared CPU cores
    python benchmarks/zoo.py --inspect-cli --jobs 1 --max-params 100 --name zoo_inspect_cli
        # wall time of `regprune inspect --model NAME` as a user runs it (its default input), one at a time

Writes benchmarks/results/zoo.{json,md} (or <name>.{json,md}).
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

OUTCOMES = ("reached", "refused", "inspected", "timeout", "error", "over")
SPEEDUP = 2.0
TOLERANCE = 0.02  # a measured speedup further than 2% from the target is a miss
SIZES = (32, 48, 64, 75, 96, 128, 160, 192, 224, 256, 299)
INSPECT_GOAL_S = 30  # the bound on `inspect` for models under 100M parameters
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


def time_inspect_cli(name: str, timeout: float = 150, max_params_m: float = 100.0, num_classes: int = 10,
                     cli: bool = True) -> dict[str, Any]:
    """Wall seconds of `regprune inspect --model NAME` in a subprocess, as a user runs it (its default input size
    and classifier width; `num_classes` is unused here). Parameters are counted on the meta device first: a model
    over `max_params_m` M is skipped ("over"). Outcome inspected (exit 0), refused (exit 2: the error line),
    timeout or error."""
    import torch

    import regprune
    from regprune.counting import count_params

    try:  # on the meta device: no memory, no initialisation
        with torch.device("meta"):
            params = count_params(regprune.create_model(name))
    except Exception:  # noqa: BLE001  (a builder that computes widths from tensor values, as RegNet's does)
        params = count_params(regprune.create_model(name))
    rec: dict[str, Any] = {"model": name, "params": params, "mode": "inspect-cli", "seconds": {}, "reason": "",
                           "input_size": None, "header": None}
    if params > max_params_m * 1e6:
        return {**rec, "outcome": "over", "wall_s": None}
    cmd = [sys.executable, "-m", "regprune", "inspect", "--model", name]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**rec, "outcome": "timeout", "wall_s": round(time.perf_counter() - t0, 2),
                "reason": f"over {timeout:g} s"}
    wall = round(time.perf_counter() - t0, 2)
    lines = p.stdout.splitlines()
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    outcome = {0: "inspected", 2: "refused"}.get(p.returncode, "error")
    return {**rec, "outcome": outcome, "wall_s": wall, "seconds": {"inspect": wall}, "returncode": p.returncode,
            "header": lines[0] if lines else None, "groups": sum(ln.startswith("| ") for ln in lines[2:]) or None,
            "reason": "" if outcome == "inspected" else one_line(err[-1] if err else f"exit {p.returncode}")}


def missed(rec: dict[str, Any]) -> bool:
    """Refused, or reached but further than TOLERANCE from the target."""
    return rec["outcome"] == "refused" or (rec["outcome"] == "reached" and not rec.get("speedup_ok"))


def run_case(name: str, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """run_worker at the smallest input; a miss there is tried again at `args.retry_size`, the first try kept in
    the record's `first_try`."""
    rec = run_worker(name, args, threads, args.min_size)
    size = rec.get("input_size")
    if args.retry_size and missed(rec) and size is not None and size < args.retry_size:
        first = {k: rec.get(k) for k in ("input_size", "outcome", "speedup", "reason", "wall_s")}
        rec = {**run_worker(name, args, threads, args.retry_size), "first_try": first}
    return rec


def run_worker(name: str, args: argparse.Namespace, threads: int, min_size: int) -> dict[str, Any]:
    """run_one (or time_inspect_cli) in a fresh interpreter, killed GRACE_S past its timeout (stuck in one native
    call that ignored its alarm: a timeout); one that dies by itself (out of memory?) gets a second try, then is
    an error."""
    kw = dict(name=name, timeout=args.timeout, max_params_m=args.max_params, num_classes=args.num_classes)
    kw.update(cli=True) if args.inspect_cli else kw.update(min_size=min_size, threads=threads)
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


def _first_try(r: dict[str, Any]) -> str:
    ft = r.get("first_try")
    if not ft:
        return ""
    sp = f" {ft['speedup']:.3f}x" if ft.get("speedup") else ""
    return f" (at {ft['input_size']}: {ft['outcome']}{sp})"


def markdown(data: dict[str, Any]) -> str:
    hw, lib, st = data["hardware"], data.get("library", {}), data["settings"]
    at = (f"regprune {lib.get('regprune')}" + (f" at {lib['commit']}" if lib.get("commit") else "")
          + (" with local changes" if lib.get("library_changes") else "")
          + (f" (at {lib['at_end'].get('commit')} by the end of the run)" if lib.get("at_end") else ""))
    run = (f"Run: `{data['command']}` ({data['wall_time_s'] / 60:.1f} min; {hw.get('processor')}, "
           f"{hw.get('cpus_usable')} CPUs, torch {hw.get('torch')}, {at}, load {hw.get('loadavg_1_5_15')}).")
    counts = f"Outcomes: {', '.join(f'{k}: {v}' for k, v in data['counts'].items() if v)}."
    if st.get("inspect_cli"):
        timed = [r for r in data["results"] if r.get("wall_s") is not None and r["outcome"] != "over"]
        slow = [r["model"] for r in timed if r["wall_s"] > INSPECT_GOAL_S]
        rows = [(r["model"].removeprefix("torchvision."), f"{r['params'] / 1e6:.1f}", r["outcome"],
                 "" if r.get("wall_s") is None else f"{r['wall_s']:.1f}",
                 (r.get("reason") or r.get("header") or "").replace("|", "\\|")) for r in data["results"]]
        worst = max(timed, key=lambda r: r["wall_s"], default=None)
        return "\n".join([
            "# The zoo: wall time of `regprune inspect --model NAME`", "",
            f"{run} Each command in its own process, one at a time, with its defaults (1000 classes, 224 px; "
            f"299 for Inception-v3); models over {st['max_params_m']:g} M parameters skipped. Seconds: the whole "
            "command, interpreter start and model construction included.", "",
            f"{counts} Slowest: {worst['model'] if worst else '-'} "
            f"({worst['wall_s'] if worst else '-'} s). Over {INSPECT_GOAL_S} s: {slow or 'none'}.", "",
            *H.md_table(["model", "M params", "outcome", "seconds", "first line / reason"], rows)]) + "\n"
    rows = []
    for r in data["results"]:
        reason = (r.get("reason") or "").replace("|", "\\|")
        if r.get("unsafe_reasons") and r["outcome"] != "error":
            first = one_line(r["unsafe_reasons"][0].replace("|", "\\|"), 200)
            reason = (reason + "; " if reason else "") + f"first unsafe: {first}"
        if r.get("first_try"):
            reason = one_line(f"first try at {r['first_try']['input_size']} px: {r['first_try']['reason']}",
                              200).replace("|", "\\|") + ("; " + reason if reason else "")
        rows.append((r["model"].removeprefix("torchvision."), f"{r.get('input_size') or ''}{_first_try(r)}",
                     f"{r['params'] / 1e6:.1f}" if r.get("params") else "", r["outcome"],
                     "" if r.get("speedup") is None else f"{r['speedup']:.3f}x" + ("" if r.get("speedup_ok") else " (miss)"),
                     f"{r['in_scope']} / {r['unsafe']}" if r.get("in_scope") is not None else "",
                     f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "", reason))
    retried = [r["model"] for r in data["results"] if r.get("first_try")]
    return "\n".join([
        "# The zoo: `regprune.prune(model, x, speedup=2.0)` on every classifier", "",
        f"{run} `num_classes={st['num_classes']}`, random weights; over {st['max_params_m']:g} M parameters only "
        f"analysed; a miss is more than {TOLERANCE:.0%} from {SPEEDUP:g}x; a model refused or missing at its "
        f"smallest input is tried again at {st.get('retry_size') or '-'} px (see benchmarks/README.md).", "",
        f"{counts} Speedup misses: {data['misses']}. Unverified results: {data['unverified']}. "
        f"Tried twice: {retried or 'none'}.", "",
        *H.md_table(["model", "input", "M params", "outcome", "speedup", "groups in scope / unsafe", "seconds",
                     "reason"], rows)]) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["torchvision.*"],
                    help="globs over regprune's registry (default torchvision.*; timm.NAME for timm's models)")
    ap.add_argument("--timeout", type=float, default=150, help="seconds per model (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="models at a time, each in its own process (default 2)")
    ap.add_argument("--out", default=str(H.HERE / "results"), help="folder for <name>.json and <name>.md")
    ap.add_argument("--name", default="zoo", help="file name stem (default %(default)s)")
    ap.add_argument("--max-params", type=float, default=30.0, help="M parameters above which a model is only "
                    "analysed (default %(default)s)")
    ap.add_argument("--min-size", type=int, default=64, help="smallest input side tried (default %(default)s)")
    ap.add_argument("--num-classes", type=int, default=10, help="classifier width (default %(default)s)")
    ap.add_argument("--retry-size", type=int, default=224, help="input side of a second try for a model refused "
                    "or missing 2x at its smallest input; 0: no second try (default %(default)s)")
    ap.add_argument("--inspect-cli", action="store_true", help="time `regprune inspect --model NAME` (its defaults) "
                    "instead of pruning; models over --max-params are skipped")
    ap.add_argument("--_case", nargs=2, metavar=("KWARGS", "OUT"), help=argparse.SUPPRESS)  # one model, internal
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.timeout <= 0:
        raise UserError("--jobs must be >= 1 and --timeout > 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import regprune

    args = parse_args(argv)
    if args._case:
        kw = json.loads(args._case[0])
        return H.write_json(Path(args._case[1]), time_inspect_cli(**kw) if kw.get("cli") else run_one(**kw))
    names = sorted({n for g in args.models for n in regprune.list_models(g)})
    if not names:
        raise UserError(f"no model of the registry matches {' '.join(args.models)!r}")
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
                     "retry_size": args.retry_size, "inspect_cli": args.inspect_cli,
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
