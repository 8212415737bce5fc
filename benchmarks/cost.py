"""What regprune's machinery costs, each figure a ratio of two things measured interleaved in the same run.

(a) Graph analysis + pruning of torchvision ResNet-50: `regprune.prune(model, x, ratios=...)` against
    Torch-Pruning called directly to remove the very same channels (DependencyGraph build + the same groups
    pruned), and against Torch-Pruning's own `MagnitudePruner` given the same per-layer ratios.
(b) Time per training step (forward + backward + hooks + SGD step) of a CIFAR ResNet-20 (1 channel, 28x28,
    batch 128) with GReg-1 / GReg-2 hooks (`after_backward`, `on_step_end`) and with SPM gates + nuclear-norm +
    MACs losses (every step, and `nuc_every=10`), against a plain SGD step on the same batches.
(c) Peak memory of the same, each variant in a fresh subprocess: after the setup (imports, model, batches) the
    process's peak-RSS mark is reset (Linux `/proc/self/clear_refs`), the work runs, and the peak resident set
    size (`VmHWM`) is read; reported as that peak and as its increase over the RSS before the work.
    On CUDA: `torch.cuda.max_memory_allocated` around the steps instead.
Dense-vs-pruned latency is benchmarks/speedup.py's subject (every runtime, CPU and `--cuda`).

Writes benchmarks/results/cost.json and cost.md.

    nice -n 10 python benchmarks/cost.py            # ~15 min on 2 shared CPU cores
    python benchmarks/cost.py --quick               # seconds-scale smoke run (what a test would run)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402  (puts the repository root on sys.path)
from harness import hardware_info, log  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch_pruning as tp  # noqa: E402

from regprune.api import prune as rp_prune  # noqa: E402
from regprune.api import regularizer as rp_regularizer  # noqa: E402
from regprune.counting import count_macs, count_params  # noqa: E402
from regprune.errors import UserError  # noqa: E402
from regprune.graph import CUSTOM_PRUNERS  # noqa: E402
from regprune.methods.greg import GRegConfig  # noqa: E402
from regprune.methods.spm import SPMRegularizer, insert_gates  # noqa: E402
from regprune.models import create_model  # noqa: E402
from regprune.report import format_table  # noqa: E402

__all__ = ["main", "STEP_VARIANTS", "PRUNE_VARIANTS"]

HERE = Path(__file__).resolve().parent
RESNET50_RATIOS = "[0,0.6,0.6,0.6,0.21,0]"  # the GReg paper's ResNet-50 2.31x setting
STEP_VARIANTS = ("plain", "greg1", "greg2", "spm", "spm_nuc10")
PRUNE_VARIANTS = ("regprune", "tp_direct", "tp_pruner")
GOALS = {"greg1": 1.05, "greg2": 1.05, "spm": 1.3, "spm_nuc10": 1.3}
LR, MOMENTUM, WD = 0.01, 0.9, 5e-4


# ---------------------------------------------------------------------------------------------- (a) pruning
def _resnet50() -> nn.Module:
    torch.manual_seed(0)
    return create_model("torchvision.resnet50", num_classes=1000, in_channels=3).eval()


def prune_regprune(model: nn.Module, x: torch.Tensor, ratios: str) -> dict[str, list[int]]:
    """regprune's one call: trace + groups + MACs table + plan + L1 picks + surgery (in place)."""
    return rp_prune(model, x, ratios=ratios, inplace=True).picks


def prune_tp_direct(model: nn.Module, x: torch.Tensor, picks: dict[str, list[int]]) -> None:
    """Torch-Pruning by hand: build the DependencyGraph and prune the same channels of the same groups."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, customized_pruners=CUSTOM_PRUNERS)
    for root, idxs in picks.items():
        mod = model.get_submodule(root)
        fn = tp.prune_linear_out_channels if isinstance(mod, nn.Linear) else tp.prune_conv_out_channels
        dg.get_pruning_group(mod, fn, list(idxs)).prune()


def prune_tp_pruner(model: nn.Module, x: torch.Tensor, counts: dict[str, tuple[int, int]]) -> None:
    """Torch-Pruning as its README drives it: a MagnitudePruner (L1) with per-layer ratios, one step()."""
    # (k - 1e-6) / n: TP keeps int(n * (1 - ratio)) channels, so this removes exactly k whatever the rounding
    ratio_dict = {model.get_submodule(r): (k - 1e-6) / n for r, (k, n) in counts.items()}
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear)]
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                       pruning_ratio=0.0, pruning_ratio_dict=ratio_dict, ignored_layers=ignored,
                                       customized_pruners=CUSTOM_PRUNERS)
    pruner.step()


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn()."""
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_prune(image: int, repeats: int, ratios: str) -> dict[str, Any]:
    """Interleaved timings of the three ways to prune ResNet-50 (fresh copies each time, copying untimed)."""
    template = _resnet50()
    x = torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(0))
    dense_macs, dense_params = count_macs(template, x), count_params(template)
    # one untimed run to get the picks the other two reproduce (and warm every code path)
    ref = copy.deepcopy(template)
    picks = prune_regprune(ref, x, ratios)
    counts = {r: (len(i), template.get_submodule(r).out_channels) for r, i in picks.items() if i}
    check = {}
    for name, fn in (("tp_direct", lambda m: prune_tp_direct(m, x, picks)),
                     ("tp_pruner", lambda m: prune_tp_pruner(m, x, counts))):
        m = copy.deepcopy(template)
        fn(m)
        with torch.no_grad():
            diff = float((ref.eval()(x) - m.eval()(x)).abs().max())
        check[name] = {"same_params": count_params(m) == count_params(ref), "same_macs": count_macs(m, x) == count_macs(ref, x),
                       "max_abs_output_diff_vs_regprune": diff}
    times: dict[str, list[float]] = {k: [] for k in PRUNE_VARIANTS}
    cpu: dict[str, list[float]] = {k: [] for k in PRUNE_VARIANTS}
    runs = {"regprune": lambda m: prune_regprune(m, x, ratios), "tp_direct": lambda m: prune_tp_direct(m, x, picks),
            "tp_pruner": lambda m: prune_tp_pruner(m, x, counts)}
    for r in range(repeats):
        order = list(PRUNE_VARIANTS[r % 3:] + PRUNE_VARIANTS[:r % 3])  # rotate so no variant always goes first
        for name in order:
            m = copy.deepcopy(template)
            t, c = _timed(lambda m=m: runs[name](m))
            times[name].append(t)
            cpu[name].append(c)
            del m
        log(f"  prune round {r + 1}/{repeats}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in PRUNE_VARIANTS))
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    paired = {k: statistics.median(a / b for a, b in zip(times["regprune"], times[k])) for k in ("tp_direct", "tp_pruner")}
    return {"model": "torchvision.resnet50", "input": [1, 3, image, image], "ratios": ratios, "repeats": repeats,
            "groups_pruned": len(counts), "dense_macs": dense_macs, "pruned_macs": count_macs(ref, x),
            "dense_params": dense_params, "pruned_params": count_params(ref), "check": check,
            "seconds": times, "median_s": med, "cpu_seconds": cpu, "median_cpu_s": med_cpu,
            "cpu_ratio_regprune_vs_tp_direct": med_cpu["regprune"] / med_cpu["tp_direct"],
            "cpu_ratio_regprune_vs_tp_pruner": med_cpu["regprune"] / med_cpu["tp_pruner"],
            "ratio_regprune_vs_tp_direct": med["regprune"] / med["tp_direct"],
            "ratio_regprune_vs_tp_pruner": med["regprune"] / med["tp_pruner"],
            "paired_median_ratio": paired}


# ---------------------------------------------------------------------------------------------- (b) steps
class Stepper:
    """One training-step variant: its own model (same init as the others), optimizer and hooks."""

    def __init__(self, variant: str, device: torch.device, batches: list[tuple[torch.Tensor, torch.Tensor]],
                 amp: bool = False, channels_last: bool = False) -> None:
        self.variant = variant
        self.batches = batches
        self.i = 0
        self.amp = amp
        self.channels_last = channels_last
        torch.manual_seed(0)
        model = create_model("resnet20", num_classes=10, in_channels=1)
        x1 = torch.zeros(1, 1, 28, 28)
        self.greg = None
        self.spm = None
        extra_groups: list[dict] = []
        if variant in ("greg1", "greg2"):
            # the paper's CIFAR schedule (penalty update every 10 steps, history every update), in its growth
            # phase for the whole measurement; 2x fewer MACs in the default scope
            self.greg = rp_regularizer(model, x1, variant, target_macs=0.5, config=GRegConfig())
        elif variant.startswith("spm"):
            # the settings `regprune scratch` uses for small networks (spm_settings): dense-normalised MACs loss
            gates = insert_gates(model, x1)
            self.spm = SPMRegularizer(gates, 0.5, alpha_nuc=1e-3, alpha_mac=20.0, mac_norm="dense",
                                      nuc_every=10 if variant == "spm_nuc10" else 1, gate_lr_scale=0.1)
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if self.spm is not None:
            gate_params = {id(p) for p in self.spm.gates.parameters()}
            extra_groups = [{"params": list(self.spm.gates.parameters()), "weight_decay": 0.0, "lr": LR * 0.1}]
            params = [p for p in model.parameters() if id(p) not in gate_params]
        else:
            params = list(model.parameters())
        self.model = model.train()
        self.opt = torch.optim.SGD([{"params": params}] + extra_groups, lr=LR, momentum=MOMENTUM, weight_decay=WD)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)
        self.hook_s = 0.0  # CPU seconds spent inside the method's hook calls (not their autograd, not gating)

    def step(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            out = self.model(x)
            loss = F.cross_entropy(out, y)
        h = 0.0
        if self.spm is not None:
            t = time.process_time()
            term = self.spm.extra_loss(None, self.model, out)
            h += time.process_time() - t
            if term is not None:
                loss = loss + term
        if self.amp:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if self.greg is not None:
            t = time.process_time()
            self.greg.after_backward()
            h += time.process_time() - t
        if self.amp:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        t = time.process_time()
        if self.greg is not None:
            self.greg.on_step_end()
        if self.spm is not None:
            self.spm.on_step_end()
        self.hook_s += h + time.process_time() - t

    def run(self, n: int) -> None:
        for _ in range(n):
            self.step()


def make_batches(n: int, batch: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
            for _ in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    """Seconds per step of each variant: rounds of `steps` steps, variants interleaved, order rotated per round.

    Two clocks: wall time, and (on CPU) the process's CPU time, which other processes' load on a shared machine
    barely touches with one torch thread. On CUDA the wall clock (with synchronisation) is the measure.
    """
    batches = make_batches(4, batch, device)
    steppers = {v: Stepper(v, device, batches, amp, channels_last) for v in STEP_VARIANTS}
    for st in steppers.values():
        st.run(warmup)
        st.hook_s = 0.0
    _sync(device)
    wall: dict[str, list[float]] = {v: [] for v in STEP_VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in STEP_VARIANTS}
    hook: dict[str, list[float]] = {v: [] for v in STEP_VARIANTS}
    names = list(STEP_VARIANTS)
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for v in order:
            st = steppers[v]
            h0 = st.hook_s
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            st.run(steps)
            _sync(device)
            wall[v].append((time.perf_counter() - t0) / steps)
            cpu[v].append((time.process_time() - c0) / steps)
            hook[v].append((st.hook_s - h0) / steps)
        log(f"  {device.type} step round {r + 1}/{repeats} (ms wall/cpu): "
            + ", ".join(f"{v} {wall[v][-1] * 1e3:.0f}/{cpu[v][-1] * 1e3:.0f}" for v in names))
    out: dict[str, Any] = {"device": str(device), "batch": batch, "steps_per_round": steps, "repeats": repeats,
                           "warmup": warmup, "amp": amp, "channels_last": channels_last, "goal": GOALS,
                           "wall": _ratios(wall)}
    if device.type == "cpu":
        out["cpu_time"] = _ratios(cpu)
    out["primary_clock"] = "cpu_time" if device.type == "cpu" else "wall"
    ref = statistics.median(cpu["plain"] if device.type == "cpu" else wall["plain"])
    out["hook_calls_ms"] = {v: statistics.median(hook[v]) * 1e3 for v in names if v != "plain"}
    out["hook_calls_fraction_of_plain"] = {v: statistics.median(hook[v]) / ref for v in names if v != "plain"}
    out["state_at_end"] = {v: {"greg_phase": st.greg.status()["phase"] if st.greg else None,
                               "spm_macs_fraction": st.spm.metrics()["macs_fraction"] if st.spm else None}
                           for v, st in steppers.items()}
    return out


# ---------------------------------------------------------------------------------------------- (c) memory
def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    # VmHWM belongs to this process's own address space; getrusage's ru_maxrss is not usable here because
    # Linux carries the parent's peak over fork + exec into the child's figure
    hwm = _proc_status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(kind: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run in a fresh process: set up, reset the peak-RSS mark, do the work, read the peak again."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.child_device)
    gpu_base = 0
    if kind == "step":
        batches = make_batches(4, args.batch, device)
        s = Stepper(variant, device, batches)
        work = lambda: s.run(args.mem_steps)  # noqa: E731
    else:
        template = _resnet50()
        x = torch.randn(1, 3, args.image, args.image, generator=torch.Generator().manual_seed(0))
        picks = json.loads(Path(args.picks_file).read_text()) if args.picks_file else None
        if variant == "regprune":
            work = lambda: prune_regprune(template, x, args.ratios)  # noqa: E731
        elif variant == "tp_direct":
            work = lambda: prune_tp_direct(template, x, picks)  # noqa: E731
        else:
            counts = {r: (len(i), template.get_submodule(r).out_channels) for r, i in picks.items() if i}
            work = lambda: prune_tp_pruner(template, x, counts)  # noqa: E731
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_base = torch.cuda.memory_allocated()
    setup_peak = _peak_mb()
    reset = _reset_peak()
    setup_rss = _proc_status_mb("VmRSS") or setup_peak
    work()
    out = {"setup_rss_mb": setup_rss, "setup_peak_mb": setup_peak, "peak_mb": _peak_mb(), "peak_reset": reset}
    # with the mark reset, the peak is the work's own; without it, it can only be max(setup, work)
    out["increase_mb"] = out["peak_mb"] - (setup_rss if reset else setup_peak)
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["gpu_peak_alloc_mb"] = (torch.cuda.max_memory_allocated() - gpu_base) / 2**20
    return out


def _spawn(kind: str, variant: str, args: argparse.Namespace, device: str, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", kind, variant, "--threads", str(args.threads),
           "--child-device", device, "--batch", str(args.batch), "--mem-steps", str(args.mem_steps),
           "--image", str(args.image), "--ratios", args.ratios] + extra
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe {kind}/{variant} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_memory(args: argparse.Namespace, device: str, picks: dict[str, list[int]] | None) -> dict[str, Any]:
    """Peak memory per variant, one fresh process per measurement, variants interleaved over repeats."""
    import tempfile

    fd, picks_file = tempfile.mkstemp(prefix="regprune_cost_picks_", suffix=".json")
    os.close(fd)
    Path(picks_file).write_text(json.dumps(picks))
    try:
        return _bench_memory(args, device, picks_file)
    finally:
        os.unlink(picks_file)


def _bench_memory(args: argparse.Namespace, device: str, picks_file: str) -> dict[str, Any]:
    out: dict[str, Any] = {"what": ("peak resident set size (VmHWM) of a fresh process while it does the work, its mark "
                                    "reset after the setup (imports, model, batches); 'increase' is that peak minus the "
                                    "RSS before the work (memory the work needed on top of what was already there, "
                                    "freed-but-cached allocator memory included)"),
                           "repeats": args.mem_repeats, "device": device}
    step_runs: dict[str, list[dict]] = {v: [] for v in STEP_VARIANTS}
    prune_runs: dict[str, list[dict]] = {v: [] for v in PRUNE_VARIANTS}
    for r in range(args.mem_repeats):
        for v in STEP_VARIANTS:
            step_runs[v].append(_spawn("step", v, args, device, []))
        for v in (() if args.cuda_only else PRUNE_VARIANTS):  # pruning runs on the CPU wherever the steps ran
            extra = ["--picks-file", picks_file] if v != "regprune" else []
            prune_runs[v].append(_spawn("prune", v, args, "cpu", extra))
        log(f"  memory round {r + 1}/{args.mem_repeats}: " + ", ".join(
            f"{v} +{step_runs[v][-1]['increase_mb']:.0f}MB" for v in STEP_VARIANTS))

    def summarize(runs: dict[str, list[dict]], ref: str) -> dict[str, Any]:
        s = {v: {k: (all(x[k] for x in rs) if isinstance(rs[0][k], bool) else statistics.median(x[k] for x in rs))
                 for k in rs[0]} for v, rs in runs.items() if rs}
        for v in s:
            s[v]["ratio_peak_vs_" + ref] = s[v]["peak_mb"] / s[ref]["peak_mb"]
            s[v]["ratio_increase_vs_" + ref] = s[v]["increase_mb"] / max(s[ref]["increase_mb"], 1e-9)
            if "gpu_peak_alloc_mb" in s[v]:
                s[v]["ratio_gpu_peak_vs_" + ref] = s[v]["gpu_peak_alloc_mb"] / s[ref]["gpu_peak_alloc_mb"]
        return s

    out["steps"] = summarize(step_runs, "plain")
    out["steps_raw"] = step_runs
    if not args.cuda_only:
        out["prune"] = summarize(prune_runs, "tp_direct")
        out["prune_raw"] = prune_runs
    return out


# ---------------------------------------------------------------------------------------------- report
def markdown(res: dict[str, Any]) -> str:
    hw = res["hardware"]
    lines = [f"# Cost of regprune's machinery ({'quick' if res['settings']['quick'] else 'full'} run)", "",
             f"Measured {res['date']} on {(hw['gpu'] + ' with ') if hw.get('gpu') else ''}{hw.get('processor')} "
             f"({hw.get('cpus_usable')} usable cores, torch "
             f"{hw.get('torch')}, {res['settings']['threads']} torch thread(s), load average at start "
             f"{hw.get('loadavg_1_5_15')}). Every ratio compares two things measured interleaved in this run; "
             "medians over rounds.", ""]
    p = res.get("prune")
    if p:
        lines += ["## (a) Graph analysis + pruning, torchvision ResNet-50", "",
                  f"Input {'x'.join(map(str, p['input']))}, ratios `{p['ratios']}` ({p['groups_pruned']} groups, "
                  f"{p['dense_macs'] / p['pruned_macs']:.2f}x fewer MACs), {p['repeats']} rounds.", ""]
        labels = {"regprune": "regprune.prune (trace, groups, MACs table, plan, L1 picks, surgery)",
                  "tp_direct": "Torch-Pruning direct (DependencyGraph + the same groups pruned)",
                  "tp_pruner": "Torch-Pruning MagnitudePruner (same per-layer ratios, one step)"}
        rows = []
        for k in PRUNE_VARIANTS:
            rows.append({"how": labels[k], "wall s": f"{p['median_s'][k]:.2f}", "CPU s": f"{p['median_cpu_s'][k]:.2f}",
                         "regprune / this (wall)": f"{p['median_s']['regprune'] / p['median_s'][k]:.2f}",
                         "regprune / this (CPU)": f"{p['median_cpu_s']['regprune'] / p['median_cpu_s'][k]:.2f}"})
        lines += [format_table(rows, ["how", "wall s", "CPU s", "regprune / this (wall)", "regprune / this (CPU)"]), ""]
        ck = p["check"]
        lines += [f"Same result: TP direct max |output diff| vs regprune {ck['tp_direct']['max_abs_output_diff_vs_regprune']:.2g} "
                  f"(same params {ck['tp_direct']['same_params']}); MagnitudePruner same widths {ck['tp_pruner']['same_params'] and ck['tp_pruner']['same_macs']} "
                  "(its L1 criterion sums over the whole group, so it may pick other channels).", ""]
    step_runs = ([("CPU", res["steps_cpu"])] if res.get("steps_cpu") else []) + [("CUDA", st) for st in res.get("steps_cuda") or []]
    for title, st in step_runs:
        lines += [f"## (b) Training-step time, ResNet-20 (1x28x28), batch {st['batch']}, {title}", "",
                  f"{st['repeats']} interleaved rounds of {st['steps_per_round']} steps per variant (order rotated "
                  f"every round) after {st['warmup']} warm-up steps each"
                  + (f", AMP {st['amp']}, channels_last {st['channels_last']}" if title == "CUDA" else "") + ". "
                  + ("Primary clock: the process's CPU time (one torch thread), which other jobs' load on a shared "
                     "machine barely moves; wall-clock figures beside it." if title == "CPU" else
                     "Wall clock with CUDA synchronisation.") + " `ratio` = median(variant) / median(plain); "
                  "`paired` = median over rounds of the per-round ratio (min-max). `hook calls` = CPU time inside "
                  "the method's own hook calls per step (not the autograd of its loss terms, not SPM's gating).", ""]
        clocks = [("cpu_time", "CPU time"), ("wall", "wall")] if "cpu_time" in st else [("wall", "wall")]
        prim = st[clocks[0][0]]
        rows = []
        for v in STEP_VARIANTS:
            row = {"variant": "plain SGD step" if v == "plain" else v}
            for key, label in clocks:
                c = st[key]
                row[f"{label} ms"] = f"{c['median_ms'][v]:.1f}"
                if v == "plain":
                    row[f"{label} ratio"] = "1.000"
                else:
                    lo, hi = c["paired_ratio_range"][v]
                    row[f"{label} ratio"] = f"{c['ratio'][v]:.3f}"
                    row[f"{label} paired (min-max)"] = f"{c['paired_median_ratio'][v]:.3f} ({lo:.2f}-{hi:.2f})"
            if v != "plain":
                row["hook calls ms"] = f"{st['hook_calls_ms'][v]:.1f}"
                row["goal"] = f"<= {GOALS[v]:.2f}: {'met' if prim['ratio'][v] <= GOALS[v] else 'MISSED'}"
            rows.append(row)
        cols = ["variant"] + [f"{label} {k}" for _, label in clocks for k in ("ms", "ratio", "paired (min-max)")]
        lines += [format_table(rows, cols + ["hook calls ms", "goal"]), ""]
    mem = res.get("memory")
    if mem:
        lines += ["## (c) Peak memory", "", f"{mem['what']}; median of {mem['repeats']} fresh process(es) per variant.", ""]
        rows = []
        for v, s in mem["steps"].items():
            row = {"work": f"{mem['steps_tag']} step: {v}", "setup MB": f"{s['setup_rss_mb']:.0f}", "peak MB": f"{s['peak_mb']:.0f}",
                   "increase MB": f"{s['increase_mb']:.0f}", "peak ratio": f"{s['ratio_peak_vs_plain']:.3f}",
                   "increase ratio": f"{s['ratio_increase_vs_plain']:.2f}"}
            if "gpu_peak_alloc_mb" in s:
                row["GPU alloc MB"] = f"{s['gpu_peak_alloc_mb']:.0f}"
            rows.append(row)
        for v, s in mem.get("prune", {}).items():
            rows.append({"work": f"ResNet-50 prune: {v}", "setup MB": f"{s['setup_rss_mb']:.0f}", "peak MB": f"{s['peak_mb']:.0f}",
                         "increase MB": f"{s['increase_mb']:.0f}", "peak ratio": f"{s['ratio_peak_vs_tp_direct']:.3f} (vs tp_direct)",
                         "increase ratio": f"{s['ratio_increase_vs_tp_direct']:.2f} (vs tp_direct)"})
        cols = ["work", "setup MB", "peak MB", "increase MB", "peak ratio", "increase ratio"]
        if any("GPU alloc MB" in r for r in rows):
            cols.append("GPU alloc MB")
        lines += [format_table(rows, cols), ""]
    if not res.get("steps_cuda"):
        lines += ["No CUDA device was available for this run: the CUDA step ratios were not measured.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seconds-scale run: few rounds, 64x64 ResNet-50 input")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on a shared machine)")
    ap.add_argument("--batch", type=int, default=128)
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
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="cost", help="output file stem")
    # internal: one memory measurement in a fresh process
    ap.add_argument("--_child", nargs=2, metavar=("KIND", "VARIANT"), help=argparse.SUPPRESS)
    ap.add_argument("--child-device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--picks-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    for name, full, quick in (("steps", 2, 1), ("repeats", 15, 2), ("warmup", 2, 1), ("prune_repeats", 5, 2),
                              ("image", 224, 64), ("mem_repeats", 3, 1), ("mem_steps", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if q and args.batch == 128 and args._child is None:
        args.batch = 16
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args._child:
        print(json.dumps(child(args._child[0], args._child[1], args)))
        return {}
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    if args.cuda_only and not cuda:
        raise UserError("--cuda-only needs a CUDA device, and torch sees none")
    res: dict[str, Any] = {"benchmark": "cost", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "hardware": hardware_info("cuda" if cuda else "cpu"),
                           "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("picks_file", "child_device")}}
    res["settings"]["out_dir"] = str(args.out_dir)
    if not args.cuda_only:
        log(f"(a) ResNet-50 graph analysis + pruning, {args.prune_repeats} rounds at {args.image}x{args.image}")
        res["prune"] = bench_prune(args.image, args.prune_repeats, args.ratios)
        log(f"(b) training-step time on CPU, batch {args.batch}, {args.repeats} rounds x {args.steps} steps")
        res["steps_cpu"] = bench_steps(torch.device("cpu"), args.batch, args.steps, args.repeats, args.warmup)
    if cuda:
        dev = torch.device("cuda")
        res["steps_cuda"] = []
        for b in args.cuda_batches:
            log(f"(b) training-step time on CUDA (AMP, channels_last), batch {b}")
            res["steps_cuda"].append(bench_steps(dev, b, max(args.steps, 20), args.repeats, max(args.warmup, 10),
                                                 amp=True, channels_last=True))
    if not args.no_memory:
        log(f"(c) peak memory, {args.mem_repeats} fresh process(es) per variant")
        # the picks regprune makes on the seeded ResNet-50, for the TP probes to reproduce
        picks = None
        if not args.cuda_only:
            ref = _resnet50()
            picks = prune_regprune(ref, torch.randn(1, 3, args.image, args.image, generator=torch.Generator().manual_seed(0)), args.ratios)
        res["memory"] = bench_memory(args, "cuda" if cuda else "cpu", picks)
        res["memory"]["steps_tag"] = "CUDA" if cuda else "CPU"
    return H.write_outputs(res, args.out_dir, args.name, markdown, t_start=t_start)


if __name__ == "__main__":
    H.run_script(main)
