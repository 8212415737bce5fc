"""What regprune's machinery costs, each figure a ratio of two things measured interleaved in the same run:
(a) graph analysis + pruning of torchvision ResNet-50 against Torch-Pruning, (b) a training step of ResNet-20 with
GReg / SPM hooks against a plain step, (c) peak memory of both (benchmarks/README.md describes each).

    nice -n 10 python benchmarks/cost.py              # ~15 min on 2 shared CPU cores
    python benchmarks/cost.py --quick                 # seconds-scale check (what the test runs)
    python benchmarks/cost.py --cuda-only --name cost_gpu   # only the CUDA figures

Writes benchmarks/results/<name>.{json,md} (default cost).
"""

from __future__ import annotations

import argparse
import copy
import gc
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402  (puts the repository root on sys.path)
from harness import log  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch_pruning as tp  # noqa: E402

from regprune.api import prune as rp_prune  # noqa: E402
from regprune.counting import count_macs, count_params  # noqa: E402
from regprune.errors import UserError  # noqa: E402
from regprune.graph import CUSTOM_PRUNERS  # noqa: E402
from regprune.models import create_model  # noqa: E402

RESNET50_RATIOS = "[0,0.6,0.6,0.6,0.21,0]"  # the GReg paper's ResNet-50 2.31x setting
STEP_VARIANTS = ("plain", "greg1", "greg2", "spm", "spm_nuc10")
PRUNE_VARIANTS = ("regprune", "tp_direct", "tp_pruner")
PRUNE_LABELS = {"regprune": "regprune.prune (trace, groups, MACs table, plan, L1 picks, surgery)",
                "tp_direct": "Torch-Pruning direct (DependencyGraph + the same groups pruned)",
                "tp_pruner": "Torch-Pruning MagnitudePruner (same per-layer ratios, one step)"}
GOALS = {"greg1": 1.05, "greg2": 1.05, "spm": 1.3, "spm_nuc10": 1.3}


# ---------------------------------------------------------------------------------------------- (a) pruning
def _resnet50() -> nn.Module:
    torch.manual_seed(0)
    return create_model("torchvision.resnet50", num_classes=1000, in_channels=3).eval()


def _image(side: int) -> torch.Tensor:
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))


def prune_fn(variant: str, x: torch.Tensor, ratios: str, picks: dict[str, list[int]] | None):
    """model -> None pruning it in place the `variant` way: regprune's one call; Torch-Pruning by hand for the same
    channels; or its MagnitudePruner at the same per-layer widths."""
    if variant == "regprune":
        return lambda m: rp_prune(m, x, ratios=ratios, inplace=True).picks

    def tp_direct(m: nn.Module) -> None:
        dg = tp.DependencyGraph().build_dependency(m, example_inputs=x, customized_pruners=CUSTOM_PRUNERS)
        for root, idxs in picks.items():
            mod = m.get_submodule(root)
            fn = tp.prune_linear_out_channels if isinstance(mod, nn.Linear) else tp.prune_conv_out_channels
            dg.get_pruning_group(mod, fn, list(idxs)).prune()

    def tp_pruner(m: nn.Module) -> None:
        # TP keeps int(n * (1 - ratio)) channels: (k - 1e-6) / n removes exactly k whatever the rounding
        ratio_dict = {m.get_submodule(r): (len(i) - 1e-6) / m.get_submodule(r).out_channels for r, i in picks.items() if i}
        tp.pruner.MagnitudePruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=0.0,
                                  pruning_ratio_dict=ratio_dict, customized_pruners=CUSTOM_PRUNERS,
                                  ignored_layers=[q for q in m.modules() if isinstance(q, nn.Linear)]).step()

    return tp_direct if variant == "tp_direct" else tp_pruner


def bench_prune(image: int, repeats: int, ratios: str) -> dict[str, Any]:
    """Interleaved timings of the three ways to prune ResNet-50 (a fresh copy each time, copied untimed)."""
    template, x = _resnet50(), _image(image)
    ref = copy.deepcopy(template)  # one untimed run: the picks the other two reproduce (and every path warm)
    picks = prune_fn("regprune", x, ratios, None)(ref)
    runs = {v: prune_fn(v, x, ratios, picks) for v in PRUNE_VARIANTS}
    check = {}
    for name in ("tp_direct", "tp_pruner"):
        m = copy.deepcopy(template)
        runs[name](m)
        with torch.no_grad():
            diff = float((ref.eval()(x) - m.eval()(x)).abs().max())
        check[name] = {"same_params": count_params(m) == count_params(ref),
                       "same_macs": count_macs(m, x) == count_macs(ref, x), "max_abs_output_diff_vs_regprune": diff}
    cur: dict[str, nn.Module] = {}

    def fresh(_: str) -> None:
        cur["m"] = copy.deepcopy(template)
        gc.collect()

    times, cpu = H.interleaved({k: lambda k=k: runs[k](cur["m"]) for k in PRUNE_VARIANTS}, repeats, before=fresh,
                               note=lambda r, w, c: log(f"  prune round {r + 1}/{repeats}: "
                                                        + ", ".join(f"{k} {w[k][-1]:.2f}s" for k in PRUNE_VARIANTS)))
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"model": "torchvision.resnet50", "input": [1, 3, image, image], "ratios": ratios, "repeats": repeats,
            "groups_pruned": sum(1 for i in picks.values() if i), "dense_macs": count_macs(template, x),
            "pruned_macs": count_macs(ref, x), "dense_params": count_params(template), "pruned_params": count_params(ref),
            "check": check, "seconds": times, "median_s": med, "cpu_seconds": cpu, "median_cpu_s": med_cpu,
            **{f"{c}ratio_regprune_vs_{k}": m["regprune"] / m[k] for c, m in (("cpu_", med_cpu), ("", med))
               for k in ("tp_direct", "tp_pruner")},
            "paired_median_ratio": {k: statistics.median(a / b for a, b in zip(times["regprune"], times[k]))
                                    for k in ("tp_direct", "tp_pruner")}}


# ---------------------------------------------------------------------------------------------- (b) steps
def _ratios(times: dict[str, list[float]]) -> dict[str, Any]:
    med = {v: statistics.median(t) for v, t in times.items()}
    others = [v for v in times if v != "plain"]
    pair = {v: [a / b for a, b in zip(times[v], times["plain"])] for v in others}
    return {"median_ms": {v: m * 1e3 for v, m in med.items()},
            "ratio": {v: med[v] / med["plain"] for v in others},
            "paired_median_ratio": {v: statistics.median(p) for v, p in pair.items()},
            "paired_ratio_range": {v: [min(p), max(p)] for v, p in pair.items()},
            "extra_ms": {v: (med[v] - med["plain"]) * 1e3 for v in others},
            "ms_per_step": {v: [t * 1e3 for t in ts] for v, ts in times.items()}}


def bench_steps(device: torch.device, batch: int, steps: int, repeats: int, warmup: int,
                amp: bool = False, channels_last: bool = False) -> dict[str, Any]:
    """Seconds per step of each variant: rounds of `steps` steps, variants interleaved, order rotated per round;
    wall time, and on CPU the process's CPU time (which other processes' load barely touches on one thread)."""
    batches = H.make_batches(4, batch, device)
    steppers = {v: H.Stepper(v, device, batches, amp, channels_last) for v in STEP_VARIANTS}
    for st in steppers.values():
        st.run(warmup)
        st.hook_s = 0.0
    h0, hook = {}, {v: [] for v in STEP_VARIANTS}

    def note(r: int, wall: dict, cpu: dict) -> None:
        for v, st in steppers.items():
            hook[v].append((st.hook_s - h0[v]) / steps)
        log(f"  {device.type} step round {r + 1}/{repeats} (ms wall/cpu): "
            + ", ".join(f"{v} {wall[v][-1] * 1e3:.0f}/{cpu[v][-1] * 1e3:.0f}" for v in STEP_VARIANTS))

    wall, cpu = H.interleaved({v: st.step for v, st in steppers.items()}, repeats, calls=steps, note=note,
                              before=lambda v: h0.__setitem__(v, steppers[v].hook_s), sync=H.sync_of(device))
    on_cpu = device.type == "cpu"
    out: dict[str, Any] = {"device": str(device), "batch": batch, "steps_per_round": steps, "repeats": repeats,
                           "warmup": warmup, "amp": amp, "channels_last": channels_last, "goal": GOALS,
                           "wall": _ratios(wall), **({"cpu_time": _ratios(cpu)} if on_cpu else {}),
                           "primary_clock": "cpu_time" if on_cpu else "wall"}
    ref = statistics.median(cpu["plain"] if on_cpu else wall["plain"])
    out["hook_calls_ms"] = {v: statistics.median(hook[v]) * 1e3 for v in STEP_VARIANTS[1:]}
    out["hook_calls_fraction_of_plain"] = {v: statistics.median(hook[v]) / ref for v in STEP_VARIANTS[1:]}
    out["state_at_end"] = {v: {"greg_phase": st.greg.status()["phase"] if st.greg else None,
                               "spm_macs_fraction": st.spm.metrics()["macs_fraction"] if st.spm else None}
                           for v, st in steppers.items()}
    return out


# ---------------------------------------------------------------------------------------------- (c) memory
def _status_mb(name: str) -> float | None:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:  # not Linux
        return None
    line = next((ln for ln in lines if ln.startswith(name + ":")), None)
    return None if line is None else int(line.split()[1]) / 1024.0  # kB


def _peak_mb() -> float:
    # VmHWM is this process's own; getrusage's ru_maxrss carries the parent's peak over fork + exec
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(kind: str, variant: str, o: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: set up, reset the peak-RSS mark, do the work, read the peak again."""
    torch.set_num_threads(o["threads"])
    device = torch.device(o["device"])
    if kind == "step":
        s = H.Stepper(variant, device, H.make_batches(4, o["batch"], device))
        work = lambda: s.run(o["mem_steps"])  # noqa: E731
    else:
        template, fn = _resnet50(), prune_fn(variant, _image(o["image"]), o["ratios"], o["picks"])
        work = lambda: fn(template)  # noqa: E731
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_base = torch.cuda.memory_allocated()
    setup_peak = _peak_mb()
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    setup_rss = _status_mb("VmRSS") or setup_peak
    work()
    out = {"setup_rss_mb": setup_rss, "setup_peak_mb": setup_peak, "peak_mb": _peak_mb(), "peak_reset": reset}
    # with the mark reset, the peak is the work's own; without it, it can only be max(setup, work)
    out["increase_mb"] = out["peak_mb"] - (setup_rss if reset else setup_peak)
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["gpu_peak_alloc_mb"] = (torch.cuda.max_memory_allocated() - gpu_base) / 2**20
    return out


def _mem_summary(runs: dict[str, list[dict]], ref: str) -> dict[str, Any]:
    """Per variant the median of each figure over its processes (flags: all), and its ratios to `ref`'s."""
    s = {v: {k: (all(x[k] for x in rs) if isinstance(rs[0][k], bool) else statistics.median(x[k] for x in rs))
             for k in rs[0]} for v, rs in runs.items() if rs}
    for v in s:
        s[v]["ratio_peak_vs_" + ref] = s[v]["peak_mb"] / s[ref]["peak_mb"]
        s[v]["ratio_increase_vs_" + ref] = s[v]["increase_mb"] / max(s[ref]["increase_mb"], 1e-9)
        if "gpu_peak_alloc_mb" in s[v]:
            s[v]["ratio_gpu_peak_vs_" + ref] = s[v]["gpu_peak_alloc_mb"] / s[ref]["gpu_peak_alloc_mb"]
    return s


def bench_memory(args: argparse.Namespace, device: str, picks: dict[str, list[int]] | None) -> dict[str, Any]:
    """Peak memory per variant, one fresh process per measurement, variants interleaved over repeats."""
    o = {"threads": args.threads, "batch": args.batch, "mem_steps": args.mem_steps, "image": args.image,
         "ratios": args.ratios, "picks": picks}
    steps: dict[str, list[dict]] = {v: [] for v in STEP_VARIANTS}
    prune: dict[str, list[dict]] = {v: [] for v in PRUNE_VARIANTS}
    for r in range(args.mem_repeats):
        for v in STEP_VARIANTS:
            steps[v].append(H.in_fresh_process(child, "step", v, {**o, "device": device}))
        for v in (() if args.cuda_only else PRUNE_VARIANTS):  # pruning runs on the CPU wherever the steps ran
            prune[v].append(H.in_fresh_process(child, "prune", v, {**o, "device": "cpu"}))
        log(f"  memory round {r + 1}/{args.mem_repeats}: " + ", ".join(
            f"{v} +{steps[v][-1]['increase_mb']:.0f}MB" for v in STEP_VARIANTS))
    out: dict[str, Any] = {"what": "peak RSS (VmHWM) of a fresh process doing the work, its mark reset after the "
                                   "setup; increase: that peak minus the RSS before the work",
                           "repeats": args.mem_repeats, "device": device, "steps": _mem_summary(steps, "plain"),
                           "steps_raw": steps}
    if not args.cuda_only:
        out.update(prune=_mem_summary(prune, "tp_direct"), prune_raw=prune)
    return out


# ---------------------------------------------------------------------------------------------- report
def _step_rows(st: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    clocks = [("cpu_time", "CPU time"), ("wall", "wall")] if "cpu_time" in st else [("wall", "wall")]
    rows = []
    for v in STEP_VARIANTS:
        row = {"variant": "plain SGD step" if v == "plain" else v}
        for key, label in clocks:
            c = st[key]
            row[f"{label} ms"] = f"{c['median_ms'][v]:.1f}"
            row[f"{label} ratio"] = "1.000" if v == "plain" else f"{c['ratio'][v]:.3f}"
            if v != "plain":
                lo, hi = c["paired_ratio_range"][v]
                row[f"{label} paired (min-max)"] = f"{c['paired_median_ratio'][v]:.3f} ({lo:.2f}-{hi:.2f})"
        if v != "plain":
            row["hook calls ms"] = f"{st['hook_calls_ms'][v]:.1f}"
            met = st[clocks[0][0]]["ratio"][v] <= GOALS[v]
            row["goal"] = f"<= {GOALS[v]:.2f}: {'met' if met else 'MISSED'}"
        rows.append(row)
    return rows, ["variant"] + [f"{label} {k}" for _, label in clocks for k in ("ms", "ratio", "paired (min-max)")] \
        + ["hook calls ms", "goal"]


def markdown(res: dict[str, Any]) -> str:
    hw = res["hardware"]
    lines = [f"# Cost of regprune's machinery ({'quick' if res['settings']['quick'] else 'full'} run)", "",
             f"Measured {res['date']} on {(hw['gpu'] + ' with ') if hw.get('gpu') else ''}{hw.get('processor')} "
             f"({hw.get('cpus_usable')} usable cores, torch {hw.get('torch')}, {res['settings']['threads']} torch "
             f"thread(s), load average at start {hw.get('loadavg_1_5_15')}). Ratios of medians over interleaved "
             "rounds; the columns are explained in benchmarks/README.md.", ""]
    if p := res.get("prune"):
        ck, ms, mc = p["check"], p["median_s"], p["median_cpu_s"]
        lines += ["## (a) Graph analysis + pruning, torchvision ResNet-50", "",
                  f"Input {'x'.join(map(str, p['input']))}, ratios `{p['ratios']}` ({p['groups_pruned']} groups, "
                  f"{p['dense_macs'] / p['pruned_macs']:.2f}x fewer MACs), {p['repeats']} rounds.", "",
                  H.table([{"how": PRUNE_LABELS[k], "wall s": f"{ms[k]:.2f}", "CPU s": f"{mc[k]:.2f}",
                            "regprune / this (wall)": f"{ms['regprune'] / ms[k]:.2f}",
                            "regprune / this (CPU)": f"{mc['regprune'] / mc[k]:.2f}"} for k in PRUNE_VARIANTS]), "",
                  f"Same result: TP direct max |output diff| vs regprune {ck['tp_direct']['max_abs_output_diff_vs_regprune']:.2g} "
                  f"(same params {ck['tp_direct']['same_params']}); MagnitudePruner same widths "
                  f"{ck['tp_pruner']['same_params'] and ck['tp_pruner']['same_macs']}.", ""]
    for title, st in [("CPU", res.get("steps_cpu"))] * bool(res.get("steps_cpu")) + [
            ("CUDA", s) for s in res.get("steps_cuda") or []]:
        rows, cols = _step_rows(st)
        lines += [f"## (b) Training-step time, ResNet-20 (1x28x28), batch {st['batch']}, {title}", "",
                  f"{st['repeats']} interleaved rounds of {st['steps_per_round']} steps per variant after {st['warmup']} "
                  f"warm-up steps each" + (f", AMP {st['amp']}, channels_last {st['channels_last']}" if title == "CUDA"
                                           else "") + f"; primary clock: {st['primary_clock'].replace('_', ' ')}.", "",
                  H.table(rows, cols), ""]
    if mem := res.get("memory"):
        rows = []
        for kind, ref, runs in (("step", "plain", mem["steps"]), ("prune", "tp_direct", mem.get("prune", {}))):
            vs = "" if kind == "step" else " (vs tp_direct)"
            rows += [{"work": f"{mem['steps_tag']} step: {v}" if kind == "step" else f"ResNet-50 prune: {v}",
                      "setup MB": f"{s['setup_rss_mb']:.0f}", "peak MB": f"{s['peak_mb']:.0f}",
                      "increase MB": f"{s['increase_mb']:.0f}", "peak ratio": f"{s['ratio_peak_vs_' + ref]:.3f}{vs}",
                      "increase ratio": f"{s['ratio_increase_vs_' + ref]:.2f}{vs}",
                      **({"GPU alloc MB": f"{s['gpu_peak_alloc_mb']:.0f}"} if "gpu_peak_alloc_mb" in s else {})}
                     for v, s in runs.items()]
        cols = ["work", "setup MB", "peak MB", "increase MB", "peak ratio", "increase ratio"]
        lines += ["## (c) Peak memory", "", f"{mem['what']}; median of {mem['repeats']} fresh process(es) per variant.",
                  "", H.table(rows, cols + ["GPU alloc MB"] * any("GPU alloc MB" in r for r in rows)), ""]
    if not res.get("steps_cuda"):
        lines += ["No CUDA device was available for this run: the CUDA step ratios were not measured.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seconds-scale run: few rounds, 64x64 ResNet-50 input")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on a shared machine)")
    ap.add_argument("--batch", type=int, help="CPU step batch (default 128; quick 16)")
    ap.add_argument("--steps", type=int, help="steps per timed round")
    ap.add_argument("--repeats", type=int, help="interleaved rounds of step timing")
    ap.add_argument("--warmup", type=int, help="untimed steps per variant first")
    ap.add_argument("--prune-repeats", type=int)
    ap.add_argument("--image", type=int, help="ResNet-50 input side for the pruning timing (default 224)")
    ap.add_argument("--ratios", default=RESNET50_RATIOS)
    ap.add_argument("--mem-repeats", type=int)
    ap.add_argument("--mem-steps", type=int)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--cuda-only", action="store_true",
                    help="only the CUDA figures: step ratios and GPU memory (needs a CUDA device)")
    ap.add_argument("--cuda-batches", type=int, nargs="+", default=[128, 1024],
                    help="batch sizes of the CUDA step timing (default 128 1024)")
    ap.add_argument("--out-dir", type=Path, default=H.HERE / "results")
    ap.add_argument("--name", default="cost", help="output file stem")
    args = ap.parse_args(argv)
    H.fill_defaults(args, args.quick, batch=(128, 16), steps=(2, 1), repeats=(15, 2), warmup=(2, 1),
                    prune_repeats=(5, 2), image=(224, 64), mem_repeats=(3, 1), mem_steps=(3, 1))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    if args.cuda_only and not cuda:
        raise UserError("--cuda-only needs a CUDA device, and torch sees none")
    res: dict[str, Any] = {"benchmark": "cost", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "hardware": H.hardware_info("cuda" if cuda else "cpu"),
                           "settings": {**vars(args), "out_dir": str(args.out_dir)}}
    if not args.cuda_only:
        log(f"(a) ResNet-50 graph analysis + pruning, {args.prune_repeats} rounds at {args.image}x{args.image}")
        res["prune"] = bench_prune(args.image, args.prune_repeats, args.ratios)
        log(f"(b) training-step time on CPU, batch {args.batch}, {args.repeats} rounds x {args.steps} steps")
        res["steps_cpu"] = bench_steps(torch.device("cpu"), args.batch, args.steps, args.repeats, args.warmup)
    if cuda:
        res["steps_cuda"] = []
        for b in args.cuda_batches:
            log(f"(b) training-step time on CUDA (AMP, channels_last), batch {b}")
            res["steps_cuda"].append(bench_steps(torch.device("cuda"), b, max(args.steps, 20), args.repeats,
                                                 max(args.warmup, 10), amp=True, channels_last=True))
    if not args.no_memory:
        log(f"(c) peak memory, {args.mem_repeats} fresh process(es) per variant")
        # the picks regprune makes on the seeded ResNet-50, for the TP probes to reproduce
        picks = None if args.cuda_only else prune_fn("regprune", _image(args.image), args.ratios, None)(_resnet50())
        res["memory"] = {**bench_memory(args, "cuda" if cuda else "cpu", picks), "steps_tag": "CUDA" if cuda else "CPU"}
    return H.write_outputs(res, args.out_dir, args.name, markdown, t_start=t_start)


if __name__ == "__main__":
    H.run_script(main)
