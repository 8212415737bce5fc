"""Realised speedup: how much of a pruned network's MACs reduction shows up as forward time, per runtime
(networks, runtimes and the report are described in benchmarks/README.md).

    OMP_NUM_THREADS=2 python benchmarks/speedup.py           # 15-25 min on 2 shared CPU cores
    OMP_NUM_THREADS=2 python benchmarks/speedup.py --quick   # ResNet-56 + ResNet-50 at 64x64, batch 1 and 8
    python benchmarks/speedup.py --cuda                      # GPU: eager, channels_last + AMP, CUDA graph

Writes benchmarks/results/speedup.{json,md} (`--cuda`: speedup_gpu.*; `--quick`: speedup_quick.*).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# spinning OpenMP threads wait for cores other jobs hold (~70x slower on the loaded 2-core machine): passive
# waiting, set before torch loads unless the environment gives a policy
OMP_WAIT_POLICY_SET_HERE = "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules
if OMP_WAIT_POLICY_SET_HERE:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402  (puts the repository root on sys.path)
from harness import log  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from regprune.api import prune as rp_prune  # noqa: E402
from regprune.counting import count_macs, count_params  # noqa: E402
from regprune.errors import UserError  # noqa: E402
from regprune.models import create_model  # noqa: E402
from regprune.report import MIN_ROUNDS, format_table, layer_widths, measure_interleaved  # noqa: E402

GOAL, GOAL_BATCH = 0.9, 64  # realised / MACs speedup the best runtime should reach at batch 64
NETWORKS = {  # key -> (title, registry name, kwargs, ratios, input side; None: --size)
    "resnet56": ("CIFAR ResNet-56", "resnet56", {}, "[0,0.75,0.75,0.32,0]", 32),
    "resnet50": ("torchvision ResNet-50", "torchvision.resnet50", {"num_classes": 1000}, "[0,0.6,0.6,0.6,0.21,0]", None),
}
VARIANTS = {"pruned": None, "pruned_r8": 8}  # name -> round_to
CPU_PATHS = ("eager", "channels_last", "compile", "onnxruntime")
CUDA_PATHS = ("cuda_eager", "cuda_channels_last_amp", "cuda_graph")
PATH_LABELS = {"eager": "eager", "channels_last": "channels_last", "compile": "torch.compile",
               "onnxruntime": "ONNX Runtime", "cuda_eager": "eager (fp32)",
               "cuda_channels_last_amp": "channels_last + AMP", "cuda_graph": "CUDA graph (channels_last + AMP)"}


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def build(key: str, size: int) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """The dense network (seed 0) and its pruned variants, with MACs, params and widths."""
    title, arch, kwargs, ratios, _ = NETWORKS[key]
    torch.manual_seed(0)
    dense = create_model(arch, **kwargs).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    models = {"dense": dense}
    info: dict[str, Any] = {"title": title, "arch": arch, "ratios": ratios, "input": [3, size, size],
                            "macs": {"dense": count_macs(dense, x)}, "params": {"dense": count_params(dense)},
                            "prune_s": {}, "round_to": dict(VARIANTS), "verification": {}}
    for name, rt in VARIANTS.items():
        t0 = time.perf_counter()
        res = rp_prune(dense, x, ratios=ratios, round_to=rt)
        info["prune_s"][name] = time.perf_counter() - t0
        m = models[name] = res.model.eval()
        info["macs"][name], info["params"][name] = count_macs(m, x), count_params(m)
        info["verification"][name] = res.verification
        convs = {k: w for k, w in layer_widths(m).items() if isinstance(m.get_submodule(k), nn.Conv2d)}
        if rt:
            info.setdefault("conv_widths_multiple_of", {})[name] = {
                "round_to": rt, "all": all(w % rt == 0 for w in convs.values()),
                "not": {k: w for k, w in convs.items() if w % rt}}
    info["macs_speedup"] = {k: info["macs"]["dense"] / info["macs"][k] for k in VARIANTS}
    return models, info


def timed(fns: dict[str, Callable[[], Any]], args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Warm up each callable (timing its last warm-up call), then measure interleaved in as many rounds as fit
    --measure-budget-s (a round calls each about twice), between --min-rounds and --rounds."""
    call_s = {k: v[-1] for k, v in H.interleaved(fns, args.warmup)[0].items() if v}
    per_round = 2 * sum(max(v, args.min_run_time) for v in call_s.values())
    rounds = max(args.min_rounds, min(args.rounds, int(args.measure_budget_s / max(per_round, 1e-9))))
    comp = measure_interleaved(fns, rounds=rounds, warmup=0, min_run_time=args.min_run_time, baseline="dense")
    return comp, {"rounds": rounds, "warm_call_s": call_s}


def cuda_graph(fn: Callable[[], Any]) -> Any:
    """`fn` captured as a CUDA graph (warmed up on a side stream first, as torch.cuda.graphs asks)."""
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


class Runtimes:
    """Each runtime prepared once per network (channels_last copies, compiled modules, exported and checked ONNX
    sessions); fns(path, x) gives (name -> zero-argument forward, name -> error)."""

    def __init__(self, models: dict[str, nn.Module], size: int, tmp: Path, paths: tuple[str, ...]) -> None:
        self.models, self.notes, self.graphs = models, {}, []
        self.cl = {k: copy.deepcopy(m).to(memory_format=torch.channels_last) for k, m in models.items()
                   if {"channels_last", *CUDA_PATHS[1:]} & set(paths)}
        if "compile" in paths:
            self.compiled = {k: torch.compile(m, backend="inductor", dynamic=False) for k, m in models.items()}
            self.notes["compile"] = {"backend": "inductor", "dynamic": False, "input": "NCHW",
                                     "compile_s": {}, "max_rel_diff_vs_eager": {}, "errors": {}}
        if "onnxruntime" in paths:
            self.sessions = self._ort_sessions(size, tmp)

    def fns(self, path: str, x: torch.Tensor) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
        xc = x.contiguous(memory_format=torch.channels_last)
        if path in ("eager", "cuda_eager", "channels_last"):
            models, xin = (self.cl, xc) if path == "channels_last" else (self.models, x)
            return {k: (lambda m=m: m(xin)) for k, m in models.items()}, {}
        if path == "compile":
            return self._compile_fns(x)
        if path == "onnxruntime":
            feed = x.detach().cpu().numpy()
            return ({k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed})) for k, s in self.sessions.items()},
                    dict(self.notes["onnxruntime"]["errors"]))

        def amp(m: nn.Module) -> Callable[[], Any]:
            def f() -> Any:
                with torch.autocast("cuda", dtype=torch.float16):
                    return m(xc)
            return f

        if path == "cuda_channels_last_amp":
            return {k: amp(m) for k, m in self.cl.items()}, {}
        fns, errors = {}, {}  # cuda_graph
        for k, m in self.cl.items():
            try:
                g = cuda_graph(amp(m))
            except Exception as exc:  # noqa: BLE001
                errors[k] = _first_line(exc)
                continue
            self.graphs.append((g, xc))  # keep the graph and its static input alive
            fns[k] = g.replay
        return fns, errors

    def _compile_fns(self, x: torch.Tensor) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
        note, b = self.notes["compile"], str(x.shape[0])
        fns, errors = {}, {}
        for k, c in self.compiled.items():
            if k in note["errors"]:  # failed at an earlier batch: do not spend the time again
                errors[k] = note["errors"][k]
                continue
            t0 = time.perf_counter()
            try:
                out = c(x)  # the first call at this shape compiles (static shapes: a graph per batch size)
            except Exception as exc:  # noqa: BLE001  (a compiler failure is a result, not a crash)
                errors[k] = note["errors"][k] = _first_line(exc)
                log(f"    torch.compile of {k} failed: {errors[k]}")
                continue
            note["compile_s"].setdefault(k, {})[b] = time.perf_counter() - t0
            ref = self.models[k](x)
            note["max_rel_diff_vs_eager"].setdefault(k, {})[b] = float(
                (out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            fns[k] = lambda c=c: c(x)
        return fns, errors

    def _ort_sessions(self, size: int, tmp: Path) -> dict[str, Any]:
        """Each model exported once (dynamic batch axis), checked against PyTorch, loaded in ONNX Runtime."""
        from regprune.export import check_onnx, export_module, require_onnxruntime

        note = self.notes["onnxruntime"] = {"provider": "CPUExecutionProvider",
                                            "intra_op_threads": torch.get_num_threads(), "export_s": {},
                                            "check": {}, "errors": {}}
        sessions, x1 = {}, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        for k, m in self.models.items():
            t0 = time.perf_counter()
            try:
                ort = require_onnxruntime()
                export_module(copy.deepcopy(m).eval(), x1, tmp / f"{k}.onnx")
                note["export_s"][k] = time.perf_counter() - t0
                note["check"][k] = check_onnx(tmp / f"{k}.onnx", m, (3, size, size), batch_sizes=(1, 2)).to_dict()
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.inter_op_num_threads = torch.get_num_threads(), 1
                if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":  # the same waiting as torch's threads
                    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                    note["allow_spinning"] = False
                sessions[k] = ort.InferenceSession(str(tmp / f"{k}.onnx"), opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001  (onnxruntime missing, or an export that fails: a result)
                note["errors"][k] = _first_line(exc) if not isinstance(exc, UserError) else str(exc)
                log(f"    ONNX export/load of {k} failed: {note['errors'][k]}")
        return sessions


def measure_network(key: str, size: int, args: argparse.Namespace, device: torch.device,
                    paths: tuple[str, ...]) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (batch, path) of one network: its info, the table rows, the raw measurements."""
    log(f"{NETWORKS[key][0]}: building and pruning at {size}x{size}")
    models, info = build(key, size)
    log("  MACs speedup " + ", ".join(f"{k} {v:.3f}x" for k, v in info["macs_speedup"].items()))
    for m in models.values():
        m.to(device)
    rows, raw = [], []
    with tempfile.TemporaryDirectory(prefix="regprune-speedup-") as tmp, torch.no_grad():
        rt = Runtimes(models, size, Path(tmp), paths)
        for b in args.batches:
            x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b)).to(device)
            for path in paths:
                log(f"  batch {b}, {PATH_LABELS[path]}")
                fns, errors = rt.fns(path, x)
                comp, meta = None, {}
                if "dense" not in fns:
                    errors.setdefault("dense", "not measured")
                else:
                    try:
                        comp, meta = timed(fns, args)
                    except Exception as exc:  # noqa: BLE001  (a runtime that fails while running: record it)
                        errors = {k: _first_line(exc) for k in fns} | errors
                raw.append({"network": key, "batch": b, "path": path, **meta, "errors": errors,
                            "comparison": comp.to_dict() if comp is not None else None})
                for v, ms in info["macs_speedup"].items():
                    row = {"network": key, "variant": v, "round_to": VARIANTS[v], "batch": b, "path": path,
                           "macs_speedup": ms}
                    if comp is None or v not in comp.verdicts:
                        row["error"] = errors.get(v) or errors.get("dense") or "not measured"
                    else:
                        d, p, verdict = comp.stats["dense"], comp.stats[v], comp.verdicts[v]
                        row.update(dense_ms=d.median_ms, dense_iqr_ms=d.iqr_ms, pruned_ms=p.median_ms,
                                   pruned_iqr_ms=p.iqr_ms, realised_speedup=verdict.speedup,
                                   realised_over_macs=verdict.speedup / ms, stable=verdict.stable,
                                   reason=verdict.reason, rounds=len(p.samples_ms), load=comp.load)
                        log(f"    {v}: dense {d.text(2)} ms, pruned {p.text(2)} ms, realised {verdict.speedup:.2f}x "
                            f"/ MACs {ms:.2f}x = {row['realised_over_macs']:.2f}" + ("" if verdict.stable else " (unstable)"))
                    rows.append(row)
        info["runtimes"] = rt.notes
        if "compile" in paths:
            torch._dynamo.reset()
    del models, rt
    gc.collect()
    return info, rows, raw


def short(reason: str) -> str:
    """The verdict's reasons without the figures: 'load 7.4 on 2 CPUs; IQRs overlap'."""
    return "; ".join(r.split(":", 1)[-1].strip() if r.startswith("machine busy") else "IQRs overlap"
                     if r.startswith("interquartile") else r.split(",")[0] for r in reason.split("; ") if r)


def goal_lines(rows: list[dict[str, Any]], networks: dict[str, Any], batch: int) -> tuple[list[str], list[dict[str, Any]]]:
    """Per network and variant: the runtime with the best realised / MACs at `batch`, and whether it meets GOAL."""
    lines, out = [], []
    for key, info in networks.items():
        for v in VARIANTS:
            cands = [r for r in rows if (r["network"], r["variant"], r["batch"]) == (key, v, batch) and "error" not in r]
            name = f"- {info['title']}, {v} ({info['macs_speedup'][v]:.2f}x fewer MACs): "
            if not cands:
                lines.append(f"{name}nothing measured at batch {batch}.")
                out.append({"network": key, "variant": v, "batch": batch, "best_path": None, "met": False})
                continue
            best = max(cands, key=lambda r: r["realised_over_macs"])
            eff = best["realised_over_macs"]
            out.append({"network": key, "variant": v, "batch": batch, "best_path": best["path"],
                        "realised_over_macs": eff, "realised_speedup": best["realised_speedup"],
                        "stable": best["stable"], "met": eff >= GOAL})
            lines.append(name + ("met by " if eff >= GOAL else "not met; closest: ") + PATH_LABELS[best["path"]]
                         + f", realised {best['realised_speedup']:.2f}x, {eff:.2f} of the MACs speedup"
                         + ("." if best["stable"] else f" (unstable: {short(best['reason'])})."))
    return lines, out


def markdown(res: dict[str, Any]) -> str:
    hw, s, ld, th = res["hardware"], res["settings"], res["load"], res["threads"]
    gb = res["goal"]["batch"]
    lines = [f"# Realised speedup of pruned networks, {'GPU' if s['cuda'] else 'CPU'} "
             f"({'quick' if s['quick'] else 'full'} run)", "",
             f"Measured {res['date']} on {(hw['gpu'] + ' with ') if hw.get('gpu') else ''}{hw.get('processor')} "
             f"({hw.get('cpus_usable')} usable cores), torch {hw.get('torch')}, {th['torch']} torch "
             f"thread(s) (OMP_NUM_THREADS={th['OMP_NUM_THREADS']}, OMP_WAIT_POLICY={th['OMP_WAIT_POLICY']}"
             f"{' set by the script' if th['OMP_WAIT_POLICY_set_by_script'] else ''}). Load average (1/5/15 min) "
             f"{ld['before']} before and {ld['after']} after, at most {ld['max_measured']:.1f} around a measurement. "
             f"Wall time {res['wall_time_s'] / 60:.1f} min. Times: median ± IQR over interleaved rounds, ms per "
             "forward; the columns are explained in benchmarks/README.md."
             + (" Quick run: a check that the benchmark works, not its result." if s["quick"] else ""), "",
             f"## Goal: realised/MACs >= {GOAL} on the best runtime at batch {gb}", ""]
    if gb != GOAL_BATCH:
        lines += [f"(The goal is defined at batch {GOAL_BATCH}; this run's largest batch is {gb}.)", ""]
    lines += res["goal"]["lines"] + [""]
    for key, info in res["networks"].items():
        ms, p = info["macs_speedup"], info["params"]
        lines += [f"## {info['title']}, {'x'.join(map(str, info['input'][1:]))}, ratios `{info['ratios']}`", "",
                  f"`pruned`: {ms['pruned']:.2f}x fewer MACs, {p['dense'] / p['pruned']:.2f}x fewer parameters. "
                  f"`pruned_r8` (`round_to=8`): {ms['pruned_r8']:.2f}x fewer MACs, {p['dense'] / p['pruned_r8']:.2f}x "
                  "fewer parameters" + ("" if info.get("conv_widths_multiple_of", {}).get("pruned_r8", {}).get("all", True)
                                        else " (not every conv width is a multiple of 8: see the JSON)") + ".", ""]
        rows = [{"batch": r["batch"], "runtime": PATH_LABELS[r["path"]], "model": r["variant"]}
                | ({"dense ms": "failed", "verdict": r["error"][:80]} if "error" in r else {
                    "dense ms": f"{r['dense_ms']:.2f} ± {r['dense_iqr_ms']:.2f}",
                    "pruned ms": f"{r['pruned_ms']:.2f} ± {r['pruned_iqr_ms']:.2f}",
                    "realised": f"{r['realised_speedup']:.2f}x", "MACs": f"{r['macs_speedup']:.2f}x",
                    "realised/MACs": f"{r['realised_over_macs']:.2f}", "rounds": r["rounds"],
                    "verdict": "stable" if r["stable"] else f"unstable ({short(r['reason'])})"})
                for r in res["rows"] if r["network"] == key]
        lines += [format_table(rows, ["batch", "runtime", "model", "dense ms", "pruned ms", "realised", "MACs",
                                      "realised/MACs", "rounds", "verdict"]), ""]
        c, o = info.get("runtimes", {}).get("compile"), info.get("runtimes", {}).get("onnxruntime")
        fails = lambda d: "".join(f" Failed: {k}: {e}." for k, e in d["errors"].items())  # noqa: E731
        if c:
            parts = [f"{k} " + ", ".join(f"batch {b}: {t:.0f} s" for b, t in v.items()) for k, v in c["compile_s"].items()]
            diff = max((d for v in c["max_rel_diff_vs_eager"].values() for d in v.values()), default=float("nan"))
            lines += [f"torch.compile (inductor, static shapes, NCHW): compile time, not timed: {'; '.join(parts) or 'none'}"
                      f". Largest |compiled - eager| / max |eager|: {diff:.1e}." + fails(c), ""]
        if o:
            chk = o["check"]
            lines += [f"ONNX Runtime ({o['provider']}, {o['intra_op_threads']} intra-op thread(s)), exported once "
                      "(opset 17, dynamic batch), export not timed; check against PyTorch "
                      + ("passed" if chk and all(v["passed"] for v in chk.values()) else "FAILED or missing")
                      + (f" (largest relative difference {max(v['max_rel_diff'] for v in chk.values()):.1e})" if chk else "")
                      + "." + fails(o), ""]
    return "\n".join(lines + ([] if s["cuda"] else ["GPU: not measured in this run (`--cuda`).", ""]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="check run: ResNet-56 and ResNet-50 at 64x64, batch 1 and 8, few rounds")
    ap.add_argument("--cuda", action="store_true", help="measure on the GPU (eager, channels_last + AMP, CUDA graph)")
    ap.add_argument("--networks", nargs="+", choices=sorted(NETWORKS), help="default: both")
    ap.add_argument("--paths", nargs="+", choices=CPU_PATHS, help="CPU runtimes (default: all four)")
    ap.add_argument("--size", type=int, help="ResNet-50 input side (default 224; quick 64)")
    ap.add_argument("--batches", type=int, nargs="+", help="default 1 64 (quick: 1 8)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: OMP_NUM_THREADS, else 2)")
    ap.add_argument("--rounds", type=int, help="most interleaved rounds per measurement (default 15; quick 5)")
    ap.add_argument("--min-rounds", type=int, help=f"fewest rounds (default {MIN_ROUNDS}, what a stable verdict needs; quick 3)")
    ap.add_argument("--measure-budget-s", type=float,
                    help="seconds one measurement (three models, one runtime, one batch) may take; fewer rounds "
                         "when a forward is slow (default 60; quick 4)")
    ap.add_argument("--warmup", type=int, help="untimed calls per model first (default 2; quick 1)")
    ap.add_argument("--min-run-time", type=float, help="blocked_autorange seconds per sample (default 0.05; quick 0.01)")
    ap.add_argument("--out-dir", type=Path, default=H.HERE / "results")
    ap.add_argument("--name", help="output file stem (default speedup; --cuda: speedup_gpu; --quick: speedup_quick)")
    args = ap.parse_args(argv)
    H.fill_defaults(args, args.quick, size=(224, 64), batches=([1, 64], [1, 8]), rounds=(15, 5),
                    min_rounds=(MIN_ROUNDS, 3), measure_budget_s=(60.0, 4.0), warmup=(2, 1), min_run_time=(0.05, 0.01),
                    name=("speedup" + "_gpu" * args.cuda, "speedup_quick" + "_gpu" * args.cuda))
    args.networks = args.networks or list(NETWORKS)
    args.paths = tuple(p for p in CPU_PATHS if p in (args.paths or CPU_PATHS))
    if args.threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "2")
        args.threads = int(env) if env.isdigit() else 2
    if args.threads < 1 or args.size < 8 or min(args.batches) < 1 or args.rounds < 1 or args.min_rounds < 1:
        raise UserError("--threads, --batches, --rounds and --min-rounds must be >= 1 and --size >= 8")
    args.min_rounds = min(args.min_rounds, args.rounds)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.cuda and not torch.cuda.is_available():
        raise UserError("--cuda needs a CUDA device, and torch sees none")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    device = torch.device("cuda" if args.cuda else "cpu")
    paths = CUDA_PATHS if args.cuda else args.paths
    loadavg = lambda: [round(v, 2) for v in os.getloadavg()]  # noqa: E731
    load_before = loadavg()
    res: dict[str, Any] = {"benchmark": "speedup", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "hardware": H.hardware_info(device.type),
                           "threads": {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads(),
                                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                                       "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                                       "OMP_WAIT_POLICY_set_by_script": OMP_WAIT_POLICY_SET_HERE},
                           "settings": {**vars(args), "out_dir": str(args.out_dir), "paths": list(paths)},
                           "goal": {"realised_over_macs_at_least": GOAL}}
    log(f"threads {args.threads}, load average {load_before}, runtimes {', '.join(paths)}, batches {args.batches}")
    networks, rows, raw = {}, [], []
    for key in args.networks:
        networks[key], r, m = measure_network(key, NETWORKS[key][4] or args.size, args, device, paths)
        rows, raw = rows + r, raw + m
    measured = [r["load"] for r in rows if r.get("load") is not None]
    res["load"] = {"before": load_before, "after": loadavg(), "cpus": os.cpu_count(),
                   "max_measured": max(measured, default=float("nan"))}
    res["networks"], res["rows"], res["measurements"] = networks, rows, raw
    gb = GOAL_BATCH if GOAL_BATCH in args.batches else max(args.batches)
    lines, per = goal_lines(rows, networks, gb)
    res["goal"].update(batch=gb, lines=lines, results=per, met=bool(per) and all(p["met"] for p in per))
    return H.write_outputs(res, args.out_dir, args.name, markdown, t_start=t_start)


if __name__ == "__main__":
    H.run_script(main)
