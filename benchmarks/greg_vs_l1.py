"""GReg-1 / GReg-2 against one-shot L1 pruning at the same speedup: a small-scale check of the GReg paper's claim.

The claim (Wang et al., ICLR 2021): at the same speedup GReg beats one-shot L1 pruning, and the gap grows
with the pruning ratio. This script trains ONE base CIFAR-style ResNet on Fashion-MNIST, then, for every
ratio and seed, prunes it four ways through regprune's own pipeline (the code behind `regprune prune`):

  l1        one-shot L1 removal, then fine-tuning
  greg1     GReg-1 regularization (the library's budget-aware schedule for `reg_iters`, `reg_lr` and the
            momentum), removal, the same fine-tuning
  greg2     GReg-2 likewise
  l1+extra  L1 whose fine-tuning also gets GReg's regularization budget (equal total training)

All four fine-tune with identical settings (epochs, lr, schedule, batch). Seeds vary pruning/fine-tuning
(data order, augmentation), never the base. The skeleton (presets, seeds, job pool, resume, time budget,
summary) is benchmarks/harness.py. Results go to benchmarks/results/greg_vs_l1_<scale>.{md,json} and the
paper's Figure 1 (filter norms separating during GReg) to greg_vs_l1_<scale>_separation.png.

    python benchmarks/greg_vs_l1.py --scale smoke             # seconds; what the test runs
    nice -n 10 python benchmarks/greg_vs_l1.py --scale cpu    # ResNet-20, ~45 min on 2 CPU cores
    python benchmarks/greg_vs_l1.py --scale gpu               # ResNet-56, all data, paper schedules
    python benchmarks/greg_vs_l1.py --scale gpu --dry-run     # print the plan only
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402  (puts the repository root on sys.path too)
from harness import fmt_pm, log, mean_std  # noqa: E402

import torch  # noqa: E402

from regprune import engine as E  # noqa: E402
from regprune.api import prune as l1_prune  # noqa: E402
from regprune.errors import UserError  # noqa: E402
from regprune.methods.greg import GRegConfig  # noqa: E402
from regprune.models import create_model  # noqa: E402
from regprune.pipeline import JobOptions, RunDir, prune_job, prune_plan, train_job  # noqa: E402

__all__ = ["main", "Settings", "SCALES", "greg_overrides", "METHODS", "BENCH"]

HERE = Path(__file__).resolve().parent
METHODS = ("l1", "greg1", "greg2", "l1+extra")
DATA = "fashion-mnist"
FASHION_TRAIN, FASHION_TEST = 60000, 10000


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class Settings(H.BaseSettings):
    model: str = "resnet20"
    base_epochs: float = 1
    base_lr: float = 0.1
    base_schedule: str = "cosine"
    ft_epochs: float = 1
    ft_lr: float = 0.01
    ft_schedule: str = "cosine"
    ft_warmup_epochs: float = 0.0
    reg_iters: int | None = 100    # GReg's iteration budget; None: the paper's full schedule
    reg_lr: float = 0.01           # lr_prune: constant lr while regularizing
    ratios: list[str] = field(default_factory=lambda: ["*.conv1:0.9"])
    limit_train: int | str | None = None  # "auto": the largest subset the time budget allows
    threads: int = 0               # torch CPU threads; 0: measure 1 vs all and take the faster
    budget_min: float = 45.0       # target wall time of the whole run ("auto" subset only)
    base_seed: int = 0
    candidates: list[list[int]] = field(default_factory=list)  # (train, test) subsets the planner picks from


SCALES: dict[str, Settings] = {
    # seconds of training; most of a smoke run is the pipeline's fixed per-job work (latency probes, plots)
    "smoke": Settings(scale="smoke", model="resnet20", batch_size=16, base_epochs=1, base_lr=0.05,
                      ft_epochs=1, ft_lr=0.01, reg_iters=20, reg_lr=0.01, seeds=2, limit_train=160, limit_test=64,
                      threads=1, methods=list(METHODS)),
    "cpu": Settings(scale="cpu", model="resnet20", batch_size=64, base_epochs=15, base_lr=0.1, ft_epochs=4,
                    ft_lr=0.01, reg_iters=120, reg_lr=0.01, seeds=3, limit_train="auto", limit_test=None,
                    budget_min=45.0, methods=list(METHODS),
                    candidates=[[1000, 1000], [1500, 1000], [2000, 1000], [3000, 2000], [4000, 2000],
                                [6000, 2000], [8000, 3000], [12000, 5000], [16000, 5000], [24000, 10000],
                                [32000, 10000], [45000, 10000], [60000, 10000]]),
    "gpu": Settings(scale="gpu", model="resnet56", batch_size=128, base_epochs=200, base_lr=0.1, ft_epochs=120,
                    ft_lr=0.01, ft_schedule="0:0.01,60:0.001,90:0.0001",
                    # the paper jumps from lr 1e-3 (regularizing) to 1e-2; a 1-epoch ramp, identical for every
                    # method, avoids the accuracy collapse users of the original code hit (methods.md s.7)
                    ft_warmup_epochs=1.0, reg_iters=None, reg_lr=1e-3, seeds=3, limit_train=None,
                    limit_test=None, device="cuda", amp=True, workers=4, methods=list(METHODS)),
}


def _ratio_spec(text: str) -> str:
    """A bare number means that ratio for every block's first conv (the papers' ResNet convention)."""
    t = text.strip()
    try:
        r = float(t)
    except ValueError:
        return t
    return f"*.conv1:{r:g}"


def add_args(ap) -> None:
    ap.add_argument("--ratios", nargs="+", metavar="SPEC", type=_ratio_spec,
                    help="ratio specs (e.g. '*.conv1:0.9'); a bare number r means '*.conv1:r'")
    ap.add_argument("--base-epochs", type=float)
    ap.add_argument("--ft-epochs", type=float)
    ap.add_argument("--ft-schedule", help="fine-tuning lr schedule: cosine or EPOCH:LR,... (same for every method)")
    ap.add_argument("--reg-iters", type=int, help="GReg's iteration budget (0: the paper's full schedule)")
    ap.add_argument("--reg-lr", type=float, help="GReg's constant lr while regularizing (lr_prune)")
    ap.add_argument("--budget-min", type=float, help="wall-time target in minutes for --limit-train auto")
    ap.add_argument("--amp", action="store_true", default=None)
    ap.add_argument("--workers", type=int)


def check(s: Settings) -> None:
    if s.reg_iters == 0:
        s.reg_iters = None  # 0 on the command line: the paper's full schedule


def jobs(s: Settings) -> list[dict[str, Any]]:
    check(s)
    return [{"ratio_spec": spec, "method": m, "seed": k} for k in range(s.seeds) for spec in s.ratios
            for m in s.methods]


# ---------------------------------------------------------------------------------------------- GReg config
def greg_overrides(method: str, s: Settings, track: list[str]) -> dict[str, Any]:
    """GRegConfig overrides handed to the pipeline (JobOptions.greg; the pipeline calls GRegConfig.scaled with
    JobOptions.reg_iters): the caller's optimizer (lr, momentum) for the library's budget-aware levels, or,
    without a budget, the paper's CIFAR schedule."""
    out: dict[str, Any] = {"track_layers": list(track), "lr_prune": s.reg_lr}
    if s.reg_iters is None:
        out.update(update_reg_interval=10, stabilize_reg_interval=10000)
    else:
        out.update(lr=s.reg_lr, momentum=s.momentum)
    return out


def greg_config_of(method: str, s: Settings) -> GRegConfig:
    o = greg_overrides(method, s, [])
    return GRegConfig.scaled(s.reg_iters, method, **o) if s.reg_iters else GRegConfig(**o)


def reg_total_iters(s: Settings, method: str) -> int:
    return greg_config_of(method, s).planned_iters(method)["total"]


# ---------------------------------------------------------------------------------------------- planning
def _input_shape() -> tuple[int, int, int]:
    return (1, 28, 28)


def _fresh(model: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(model, num_classes=10, in_channels=1)


def _pruned(model: str, spec: str) -> torch.nn.Module:
    return l1_prune(_fresh(model), torch.zeros(1, *_input_shape()), ratios=spec).model


def measure(s: Settings) -> dict[str, Any]:
    """Training/eval throughput of the dense and each pruned model (CPU), for the time estimate."""
    shape = _input_shape()
    out: dict[str, Any] = {}
    if s.threads == 0:
        n, by = H.choose_threads(lambda: _fresh(s.model), s.batch_size, shape)
        out["threads_measured_img_s"] = {str(k): round(v, 1) for k, v in by.items()}
        s.threads = n
    else:
        torch.set_num_threads(s.threads)
    out["threads"] = s.threads
    out["dense_train_img_s"] = H.train_throughput(_fresh(s.model), s.batch_size, shape, steps=4)
    out["dense_eval_img_s"] = H.eval_throughput(_fresh(s.model), 256, shape)
    out["pruned"] = {}
    for spec in s.ratios:
        out["pruned"][spec] = {
            "train_img_s": H.train_throughput(_pruned(s.model, spec), s.batch_size, shape, steps=4),
            "eval_img_s": H.eval_throughput(_pruned(s.model, spec), 256, shape),
        }
    return out


def estimate_s(s: Settings, n_train: int, n_test: int, tp: dict[str, Any]) -> dict[str, float]:
    """Seconds the run should take with these subset sizes at the measured throughputs (worst case: GReg
    runs its whole planned schedule; it usually stops earlier by the magnitude-ratio rule)."""
    td, ed = tp["dense_train_img_s"], tp["dense_eval_img_s"]
    # data, graph, base/pruned/final evals, latency probes (~1,000 dense images), plots, BN re-estimation
    per_job = 10.0 + 3 * n_test / ed + 1000 / ed + min(n_train, 200 * s.batch_size) * 2 / ed
    base = s.base_epochs * (n_train / td + n_test / ed) + per_job
    prune = 0.0
    for spec in s.ratios:
        tpp, epp = tp["pruned"][spec]["train_img_s"], tp["pruned"][spec]["eval_img_s"]
        ft = s.ft_epochs * (n_train / tpp + n_test / epp)
        reg_imgs = [reg_total_iters(s, m) * s.batch_size for m in ("greg1", "greg2")]
        for imgs in reg_imgs:  # greg1, greg2
            prune += imgs / td + math.ceil(imgs / n_train) * n_test / ed + ft + per_job
        prune += ft + per_job  # l1
        extra = max(reg_imgs)
        prune += ft + extra / tpp + math.ceil(extra / n_train) * n_test / epp + per_job  # l1+extra
    prune *= s.seeds
    return {"base_s": base, "prune_s": prune, "total_s": base + prune}


def choose_subset(s: Settings, tp: dict[str, Any]) -> dict[str, Any]:
    """The largest (train, test) candidate whose estimate fits 85% of the budget (the rest is margin)."""
    budget = 60.0 * s.budget_min * 0.85
    rows = []
    pick = s.candidates[0]
    for n_train, n_test in s.candidates:
        est = estimate_s(s, n_train, n_test, tp)["total_s"]
        rows.append({"train": n_train, "test": n_test, "estimate_min": round(est / 60, 1)})
        if est <= budget:
            pick = [n_train, n_test]
    return {"chosen": pick, "budget_min": s.budget_min, "planned_within_min": round(budget / 60, 1),
            "candidates": rows, "fits": any(r["estimate_min"] * 60 <= budget for r in rows)}


def estimate(s: Settings, args) -> dict[str, Any]:
    """--dry-run and cpu planning: measured throughput, the "auto" subset, the GReg schedules, a time estimate."""
    plan: dict[str, Any] = {"greg_configs": {m: greg_overrides(m, s, ["<tracked>"]) for m in ("greg1", "greg2")},
                            "greg_schedules": {m: greg_config_of(m, s).planned_iters(m) for m in ("greg1", "greg2")},
                            "greg_predicted": {m: greg_config_of(m, s).predict(m) for m in ("greg1", "greg2")}
                            if s.reg_iters else None}
    if str(s.device).startswith("cpu"):
        plan["throughput"] = measure(s)  # also settles the thread count
    if s.limit_train == "auto":
        plan["subset"] = choose_subset(s, plan["throughput"])
        s.limit_train, s.limit_test = plan["subset"]["chosen"]
    n_train = s.limit_train if isinstance(s.limit_train, int) else FASHION_TRAIN
    n_test = s.limit_test if isinstance(s.limit_test, int) else FASHION_TEST
    if "throughput" in plan:
        plan["estimate"] = estimate_s(s, n_train, n_test, plan["throughput"])
        plan["summary"] = f"estimated {plan['estimate']['total_s'] / 60:.1f} min (worst case) on {n_train}/{n_test} images"
    for m in ("greg1", "greg2"):
        print(f"    {m} schedule: {plan['greg_schedules'][m]}", flush=True)
    return plan


# ---------------------------------------------------------------------------------------------- running
def job_options(s: Settings, **kw: Any) -> JobOptions:
    common_kw = dict(model=s.model, data=DATA, batch_size=s.batch_size, workers=s.workers, device=s.device,
                     amp=s.amp, progress=False, weight_decay=s.weight_decay, momentum=s.momentum,
                     limit_train=s.limit_train if isinstance(s.limit_train, int) else None,
                     limit_test=s.limit_test)
    common_kw.update(kw)
    return JobOptions(**common_kw)


def stretch_schedule(schedule: str, factor: float) -> str:
    """A step schedule 'E:LR,...' with every breakpoint epoch multiplied by factor (cosine stretches itself)."""
    if ":" not in schedule:
        return schedule
    parts = []
    for entry in schedule.split(","):
        e, lr = entry.split(":")
        parts.append(f"{float(e) * factor:g}:{lr.strip()}")
    return ",".join(parts)


def run_prune(s: Settings, spec: str, method: str, seed: int, base_file: Path, work: Path, track: list[str], extra_iters: int = 0, n_train: int = 0, loaders: tuple | None = None) -> dict[str, Any]:
    lib_method = "l1" if method == "l1+extra" else method
    ft_epochs = s.ft_epochs
    ft_schedule = s.ft_schedule
    extra_epochs = 0.0
    if method == "l1+extra":
        extra_epochs = extra_iters * s.batch_size / n_train
        ft_epochs = s.ft_epochs + extra_epochs
        ft_schedule = stretch_schedule(s.ft_schedule, ft_epochs / s.ft_epochs)
    o = job_options(s, method=lib_method, base=str(base_file), ratios=spec, seed=seed, ft_epochs=ft_epochs,
                    reg_iters=s.reg_iters if lib_method != "l1" else None,
                    ft_lr=s.ft_lr, ft_lr_schedule=ft_schedule, ft_warmup_epochs=s.ft_warmup_epochs,
                    greg=greg_overrides(lib_method, s, track) if lib_method != "l1" else {})
    path = work / _slug(spec) / f"{method.replace('+', '_')}-s{seed}"
    t0 = time.perf_counter()
    out = prune_job(o, RunDir(path, overwrite=True))
    rep = out["report"]
    reg = rep.get("regularize") or {}
    # The pipeline's best_top1 misses the per-epoch evaluations (it looks for "top1" in records that say
    # "test_top1"), so it always equals the final accuracy; read the fine-tuning curve from the metrics.
    curve = [c["test_top1"] for c in H.epoch_curve(path, "finetune")]
    final = float(rep["rows"][1]["top1"])
    recal = _recalibrated(s, path, lib_method, loaders) if loaders is not None else {}
    status = reg.get("status") or {}
    row = {
        "ratio_spec": spec, "method": method, "seed": seed,
        "top1": final, "best_top1": round(max(curve + [final]), 2), "pipeline_best_top1": rep.get("best_top1"),
        "ft_curve": curve,
        "before_ft_top1": (rep.get("pruned_before_finetune") or {}).get("top1"),
        "after_reg_top1": (reg.get("eval") or {}).get("top1"),
        "before_ft_top1_bn_recal": recal.get("before_ft"), "after_reg_top1_bn_recal": recal.get("after_reg"),
        "macs_speedup": rep["macs_speedup"], "latency_speedup_b1": rep["latency_speedup_b1"],
        "latency_speedup_b64": rep["latency_speedup_b64"],
        "dense_MMACs": rep["rows"][0]["MMACs"], "pruned_MMACs": rep["rows"][1]["MMACs"],
        "dense_params_M": rep["rows"][0]["params_M"], "pruned_params_M": rep["rows"][1]["params_M"],
        "reg_iters": status.get("iteration", 0), "reg_planned_iters": status.get("planned_total", 0),
        "reg_stop_reason": status.get("stop_reason"), "reg_mag_ratio": status.get("mag_ratio"),
        "greg2_overlap_with_l1": status.get("overlap_l1"),
        "ft_epochs": ft_epochs, "ft_schedule": ft_schedule, "extra_epochs": extra_epochs,
        "extra_iters": extra_iters, "wall_s": round(time.perf_counter() - t0, 1), "run_dir": str(path),
    }
    return row


def _recalibrated(s: Settings, path: Path, method: str, loaders: tuple) -> dict[str, float]:
    """BN-recalibrated test top-1 of the model right after removal (and, for GReg, right after regularizing).

    The pipeline evaluates those models with the BatchNorm statistics they carry; after a removal, or after
    a penalty has changed filter scales quickly, those statistics are stale and the accuracy shown can be
    near chance although the weights are fine. Re-estimating the statistics (no training) tells the two apart.
    """
    from regprune.surgery import load_model

    train_loader, test_loader = loaders
    out = {}
    for key, name in (("before_ft", "pruned_init.safetensors"), ("after_reg", "regularized.safetensors")):
        f = path / name
        if f.exists() and (key == "before_ft" or method != "l1"):
            model, _ = load_model(f)
            E.recalibrate_bn(model, train_loader, batches=200, device=E.resolve_device(_device(s)))
            out[key] = round(H.evaluate(model, test_loader, _device(s))["top1"], 2)
    return out


def _device(s: Settings) -> str:
    return "cpu" if str(s.device).startswith("cpu") else str(s.device)


def _slug(spec: str) -> str:
    """A directory name for a ratio spec: '*.conv1:0.9' -> 'all.conv1-0.9' (never hidden, never nested)."""
    text = spec.replace("*", "all").replace(":", "-")
    keep = "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in text)
    return keep.strip("._-") or "ratios"


def tracked_layers(s: Settings, spec: str) -> list[str]:
    """GReg history layers: the first pruned layer and the widest pruned one (the figure's layer)."""
    model = _fresh(s.model)
    o = job_options(s, ratios=spec)
    graph, plan = prune_plan(o, model, torch.zeros(1, *_input_shape()))
    active = [n for n, k in plan.removal.items() if k > 0]
    widest = max(active, key=lambda n: (graph.module(n).weight.shape[0], -active.index(n)))
    return list(dict.fromkeys([active[0], widest]))


# ---------------------------------------------------------------------------------------------- context
def prepare(s: Settings, work: Path) -> dict[str, Any]:
    """The one base (the pipeline's train job in <work>/base; reused when done) and the loaders of the BN
    re-estimation diagnostic."""
    from regprune.data import load_data, make_loaders

    if s.limit_train == "auto":  # a run without planning: the smallest candidate
        s.limit_train, s.limit_test = s.candidates[0]
    t_base = time.perf_counter()
    base_path = work / "base"
    o_base = job_options(s, seed=s.base_seed, epochs=s.base_epochs, lr=s.base_lr, lr_schedule=s.base_schedule)
    key = json.dumps(E.log.to_jsonable(o_base.__dict__), sort_keys=True, default=str)
    row_f = base_path / "base_row.json"
    if (base_path / "model.safetensors").exists() and row_f.exists() and json.loads(row_f.read_text())["key"] == key:
        base_row = json.loads(row_f.read_text())["row"]
    else:
        log(f"training the base {s.model} for {s.base_epochs:g} epochs")
        base_row = train_job(o_base, RunDir(base_path, overwrite=True))["row"]
        E.atomic_write_text(row_f, json.dumps(E.log.to_jsonable({"key": key, "row": base_row})))
    curve = H.epoch_curve(base_path, "train")
    base = {"top1": float(base_row["top1"]), "params_M": base_row["params_M"], "MMACs": base_row["MMACs"],
            "epochs": s.base_epochs, "curve": curve, "plateau": H.plateau(curve), "wall_s": round(time.perf_counter() - t_base, 1),
            "model_file": str(base_path / "model.safetensors")}
    bundle = load_data(DATA, limit_train=o_base.limit_train, limit_test=o_base.limit_test)
    loaders = make_loaders(bundle, s.batch_size, seed=12345)  # for the BN re-estimation diagnostic only
    return {"base": base, "loaders": loaders, "work": work, "n_train": len(bundle.train), "n_test": len(bundle.test)}


def run_one(s: Settings, ctx: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    spec, method, seed = job["ratio_spec"], job["method"], job["seed"]
    extra = max(reg_total_iters(s, m) for m in ("greg1", "greg2")) if method == "l1+extra" and s.reg_iters else 0
    return run_prune(s, spec, method, seed, Path(ctx["base"]["model_file"]), ctx["work"], tracked_layers(s, spec),
                     extra_iters=extra, n_train=ctx["n_train"], loaders=ctx["loaders"])


# ---------------------------------------------------------------------------------------------- summary
PAIRS = (("greg1", "l1"), ("greg2", "l1"), ("greg1", "l1+extra"), ("greg2", "l1+extra"))


def summarize(rows: list[dict[str, Any]], s: Settings) -> tuple[list[dict], list[dict]]:
    groups = H.summarize(rows, ("ratio_spec", "method"), ("top1", "best_top1", "before_ft_top1",
                         "before_ft_top1_bn_recal", "after_reg_top1_bn_recal", "latency_speedup_b64", "reg_iters",
                         "ft_epochs"), order=lambda k: (s.ratios.index(k[0]), METHODS.index(k[1])))
    for g in groups:
        g["macs_speedup"] = next(r["macs_speedup"] for r in rows if r["ratio_spec"] == g["ratio_spec"]
                                 and r["method"] == g["method"])
    comps = H.compare(groups, rows, ("ratio_spec",), "top1", pairs=PAIRS)
    for c in comps:
        c["delta_mean"], c["paired_deltas"] = c["diff"], c["paired_diffs"]
    return groups, comps


def _opt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def diagnostic_notes(rows: list[dict[str, Any]], s: Settings) -> list[str]:
    """What the GReg runs actually did: stop reasons, magnitude ratios reached, GReg-2's agreement with L1."""
    notes = []
    for spec in s.ratios:
        for method in ("greg1", "greg2"):
            rs = [r for r in rows if r["ratio_spec"] == spec and r["method"] == method]
            if not rs:
                continue
            ratios = [v for r in rs for v in (r.get("reg_mag_ratio") or {}).values() if v is not None]
            stops = sorted({str(r.get("reg_stop_reason")) for r in rs})
            text = (f"`{spec}` {method}: {mean_std([r['reg_iters'] for r in rs])[0]:.0f} regularization iterations, "
                    f"stopped by {', '.join(stops)}; kept/pruned magnitude ratio at the end "
                    + (f"{min(ratios):.3g}-{max(ratios):.3g} across layers and seeds (the paper's rule aims at 1000)"
                       if ratios else "not recorded"))
            overlaps = [v for r in rs for v in (r.get("greg2_overlap_with_l1") or {}).values()]
            if overlaps:
                text += (f"; GReg-2's picks coincide with L1's for {100 * statistics.fmean(overlaps):.0f}% of the "
                         "pruned filters")
            notes.append(text + ".")
    return notes


def build_notes(rows: list[dict[str, Any]], s: Settings, base: dict[str, Any], comps: list[dict]) -> list[str]:
    """The Markdown's notes: comparisons in words, what GReg did, and the caveats of this scale."""
    notes = []
    for c in comps:
        notes.append(f"`{c['ratio_spec']}` {c['a']} vs {c['b']}: Δ {c['delta_mean']:+.2f} points, spread "
                     f"{c['spread']:.2f}: {H.verdict(c)}"
                     + ("; same sign on every seed" if c["paired_same_sign"] else "; sign differs between seeds"))
    notes += diagnostic_notes(rows, s)
    if not base["plateau"]["plateaued"]:
        notes.append("The base had not plateaued by the 0.3-point rule within this scale's epoch budget; a "
                     "better-trained base may change the gaps.")
    if s.scale != "gpu":
        notes.append("Small-scale caveat: the paper's 110k-iteration GReg schedule is compressed to "
                     f"{s.reg_iters} iterations here (the library's budget-aware schedule); fine-tuning is "
                     f"{s.ft_epochs:g} epochs rather than 120.")
    return notes


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    base = result["base"]
    hw = result["hardware"]
    lines = [f"# GReg vs one-shot L1 pruning: {s['scale']} scale", ""]
    data = (f"Fashion-MNIST, {result['data']['train_images']} training / {result['data']['test_images']} test images"
            + (" (class-balanced subsets)" if result['data']['subset'] else ""))
    pl = base["plateau"]
    lines += [
        f"- Model: {s['model']} (1-channel input, option-A shortcuts); data: {data}.",
        f"- Base: trained once (seed {s['base_seed']}), {s['base_epochs']:g} epochs, lr {s['base_lr']:g} "
        f"{s['base_schedule']}, batch {s['batch_size']}: **top-1 {base['top1']:.2f}%**. "
        + (f"Best test accuracy of the last {pl['tail_epochs']} epochs minus the best before them: "
           f"{pl['gain_last_epochs']:+.2f} points: {'plateaued' if pl['plateaued'] else 'NOT yet plateaued'} "
           f"(tolerance {pl['tolerance']} points)." if pl.get("gain_last_epochs") is not None
           else f"Too few epochs to judge a plateau ({pl.get('reason')})."),
        f"- Fine-tuning, identical for l1 / greg1 / greg2: {s['ft_epochs']:g} epochs, lr {s['ft_lr']:g} "
        f"{s['ft_schedule']}, warm-up {s['ft_warmup_epochs']:g} epochs. l1+extra: the same schedule stretched by "
        f"GReg's regularization budget (the larger of GReg-1's and GReg-2's planned schedules).",
        "- GReg regularization (before removal, on top of the fine-tuning): "
        + (f"budget {s['reg_iters']} iterations" if s["reg_iters"] else "the paper's full schedule")
        + f" at constant lr {s['reg_lr']:g}, the library's `GRegConfig.scaled` levels for this lr and momentum"
        " (see the JSON `greg_configs`);"
        f" it ends early when every layer's kept/pruned magnitude ratio reaches 1000.",
        f"- Seeds: {s['seeds']} per method (they vary data order and augmentation in regularization and "
        f"fine-tuning; L1's picks are deterministic). Top-1 is the final epoch's accuracy on the test images "
        f"(`best` is the best epoch's, which selects on the test set as the paper's code does; it is read from "
        f"the run's metrics because the pipeline's own `best_top1` equals the final accuracy).",
        "- 'before fine-tuning' is the pipeline's evaluation of the model right after removal, with the "
        "BatchNorm statistics it carries; in parentheses, the same weights after re-estimating BN statistics on "
        "training batches (a diagnostic that no method uses: it separates real damage from stale statistics). "
        "'after reg.' is the dense model at the end of GReg's regularization, BN re-estimated.",
        f"- Hardware: {hw.get('processor')} ({hw.get('cpus_usable')} usable cores, {hw.get('torch_threads')} torch "
        f"threads), torch {hw.get('torch')}, device {hw.get('device')}; load average at start "
        f"{hw.get('loadavg_1_5_15')}. Wall time {result['wall_time_s'] / 60:.1f} min.",
        "",
        "| method | ratios | MACs speedup | top-1 % (mean ± std) | per seed | best-epoch top-1 | before fine-tuning (BN re-estimated) | after reg., BN re-estimated | reg. iters | ft epochs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in result["summary"]:
        lines.append(
            f"| {g['method']} | `{g['ratio_spec']}` | {g['macs_speedup']:.2f}x | {fmt_pm(g['top1_mean'], g['top1_std'])} | "
            f"{', '.join(f'{v:.2f}' for v in g['top1_values'])} | {fmt_pm(g['best_top1_mean'], g['best_top1_std'])} | "
            f"{_opt(g['before_ft_top1_mean'])} ({_opt(g['before_ft_top1_bn_recal_mean'])}) | "
            f"{_opt(g['after_reg_top1_bn_recal_mean'])} | {g['reg_iters_mean']:.0f} | {g['ft_epochs_mean']:.2f} |")
    lines.append(f"| dense base | - | 1.00x | {base['top1']:.2f} | - | - | - | - | - | {s['base_epochs']:g} (training) |")
    lines += ["", "Differences (mean of a − mean of b, in top-1 points; spread = std a + std b; "
              "'exceeds' means the ±1 std intervals do not overlap):", "",
              "| ratios | a vs b | Δ mean | spread | Δ per seed (paired) | exceeds the seed spread? |",
              "|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        lines.append(f"| `{c['ratio_spec']}` | {c['a']} vs {c['b']} | {c['delta_mean']:+.2f} | {c['spread']:.2f} | "
                     f"{', '.join(f'{d:+.2f}' for d in c['paired_deltas'])} | {H.verdict(c)} |")
    if result.get("separation_plot"):
        lines += ["", f"Figure: `{Path(result['separation_plot']).name}`: filter L1 norms of "
                  f"`{result['separation_layer']}` during GReg-1 and GReg-2 (seed {result['separation_seed']}), "
                  "pruned filters red, kept blue (the paper's Figure 1)."]
    if result.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def separation_plot(path: Path, runs: dict[str, Path], layer: str) -> Path | None:
    """Two panels (GReg-1, GReg-2): each filter's L1 norm against iteration, pruned red, kept blue."""
    from regprune.report import _plt  # the library's headless matplotlib setup

    panels = []
    for method, run in runs.items():
        state_file, picks_file = run / "greg_state.pt", run / "picks.json"
        if not state_file.exists() or not picks_file.exists():
            continue
        state = E.safe_load(state_file)
        picks = set(json.loads(picks_file.read_text()).get(layer, []))
        pts = [(h["iter"], h["norms"][layer]) for h in state["history"] if layer in h.get("norms", {})]
        if pts:
            panels.append((method, pts, picks, state))
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.2), dpi=110, squeeze=False)
    for ax, (method, pts, picks, state) in zip(axes[0], panels):
        iters = [p[0] for p in pts]
        norms = torch.tensor([p[1] for p in pts]).clamp_min(1e-12)
        for j in range(norms.shape[1]):
            ax.plot(iters, norms[:, j].tolist(), color="#d62728" if j in picks else "#1f77b4",
                    linewidth=0.8, alpha=0.75)
        if state.get("pick_iteration"):
            ax.axvline(state["pick_iteration"], color="gray", linestyle=":", linewidth=1)
            ax.text(state["pick_iteration"], ax.get_ylim()[1], " pick", va="top", fontsize=7, color="gray")
        if state.get("grow_end"):
            ax.axvline(state["grow_end"], color="gray", linestyle="--", linewidth=1)
            ax.text(state["grow_end"], ax.get_ylim()[1], " growth stops", va="top", fontsize=7, color="gray")
        ax.set_yscale("log")
        ax.set_xlabel("regularization iteration")
        ax.set_ylabel("filter L1 norm")
        ax.set_title(f"{method.upper().replace('GREG', 'GReg-')}: {layer}, {len(picks)} pruned (red) / "
                     f"{norms.shape[1] - len(picks)} kept (blue)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- main
BENCH = H.Bench(name="greg_vs_l1", doc=__doc__, settings_cls=Settings, scales=SCALES, methods=METHODS,
                script=Path(__file__).resolve(), job_keys=("ratio_spec", "method", "seed"), jobs=jobs,
                prepare=prepare, run_one=run_one, add_args=add_args, default_scale="cpu",
                overrides=("ratios", "base_epochs", "ft_epochs", "ft_schedule", "reg_iters", "reg_lr", "budget_min",
                           "amp", "workers"),
                estimate=estimate, dense_model=lambda s: _fresh(s.model), input_shape=(1, 28, 28))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or print its plan); returns the result written to the JSON."""
    r = H.main(BENCH, argv)
    if r["dry_run"]:
        return {"settings": r["settings"], "plan": r["plan"], "dry_run": True}
    s, ctx, rows = r["settings_obj"], r["ctx"], r["rows"]
    groups, comps = summarize(rows, s)
    notes = build_notes(rows, s, ctx["base"], comps)
    out_dir = r["args"].out_dir.resolve()
    stem = f"greg_vs_l1_{s.scale}"
    spec = s.ratios[-1]
    fig_runs = {x["method"]: Path(x["run_dir"]) for x in rows
                if x["method"] in ("greg1", "greg2") and x["seed"] == 0 and x["ratio_spec"] == spec}
    fig_layer = tracked_layers(s, spec)[-1]
    fig_path = out_dir / f"{stem}_separation.png"
    result = {
        "benchmark": "greg_vs_l1", "scale": s.scale, "argv": r["argv"], "started": r["date"],
        "wall_time_s": round(r["wall_time_s"], 1), "hardware": r["hardware"], "n_workers": r["n_workers"],
        "settings": r["settings"], "plan": r["plan"],
        "greg_configs": {f"{sp} {m}": greg_overrides(m, s, tracked_layers(s, sp)) for sp in s.ratios
                         for m in ("greg1", "greg2")},
        "data": {"spec": DATA, "train_images": ctx["n_train"], "test_images": ctx["n_test"],
                 "subset": ctx["n_train"] < FASHION_TRAIN or ctx["n_test"] < FASHION_TEST},
        "base": ctx["base"], "results": rows, "summary": groups, "comparisons": comps,
        "jobs_done": r["jobs_done"], "jobs_expected": r["jobs_expected"], "complete": r["complete"],
        "separation_plot": str(fig_path) if fig_runs else None, "separation_layer": fig_layer,
        "separation_seed": 0, "work_dir": str(r["work"]), "notes": notes,
    }
    res = H.write_outputs(result, out_dir, stem, markdown,
                          [lambda d: separation_plot(fig_path, fig_runs, fig_layer)] if fig_runs else [])
    return res


if __name__ == "__main__":
    H.run_script(main)
