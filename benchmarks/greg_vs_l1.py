"""GReg-1 / GReg-2 against one-shot L1 pruning at the same speedup: a small-scale check of the GReg paper's claim.

The claim (Wang et al., ICLR 2021): at the same speedup GReg beats one-shot L1 pruning, and the gap grows
with the pruning ratio. This script trains ONE base CIFAR-style ResNet on Fashion-MNIST, then, for every
ratio and seed, prunes it four ways through regprune's own pipeline (the code behind `regprune prune`):

  l1        one-shot L1 removal, then fine-tuning
  greg1     GReg-1 regularization, removal, the same fine-tuning
  greg2     GReg-2 regularization, removal, the same fine-tuning
  l1+extra  L1 whose fine-tuning also gets the iterations GReg spent regularizing (equal total training)

All four fine-tune with identical settings (epochs, lr, schedule, batch). Seeds vary pruning/fine-tuning
(data order, augmentation), never the base. Results go to benchmarks/results/greg_vs_l1_<scale>.{md,json}
and the paper's Figure 1 (filter norms separating during GReg) to greg_vs_l1_<scale>_separation.png.

    python benchmarks/greg_vs_l1.py --scale smoke             # seconds; what the test runs
    nice -n 10 python benchmarks/greg_vs_l1.py --scale cpu    # ResNet-20, ~45 min on 2 CPU cores
    python benchmarks/greg_vs_l1.py --scale gpu               # ResNet-56, all data, paper schedules
    python benchmarks/greg_vs_l1.py --scale gpu --dry-run     # print the plan only
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository root on sys.path too)
from common import fmt_pm, log, mean_std, write_json  # noqa: E402

import torch  # noqa: E402

from regprune import engine as E  # noqa: E402
from regprune.api import prune as l1_prune  # noqa: E402
from regprune.errors import UserError  # noqa: E402
from regprune.methods.greg import GRegConfig  # noqa: E402
from regprune.models import create_model  # noqa: E402
from regprune.pipeline import JobOptions, RunDir, prune_job, prune_plan, train_job  # noqa: E402

__all__ = ["main", "Settings", "SCALES", "greg_overrides", "METHODS"]

HERE = Path(__file__).resolve().parent
METHODS = ("l1", "greg1", "greg2", "l1+extra")
DATA = "fashion-mnist"
FASHION_TRAIN, FASHION_TEST = 60000, 10000

# The paper's CIFAR GReg schedule, in the quantities the compressed schedule preserves (see greg_overrides).
PAPER_LR_PRUNE = 1e-3
# GReg-2's pick phase: lambda grows 0 -> 1e-2 over 10,000 iterations at lr 1e-3 with momentum 0.9, i.e.
# an integrated uniform decay of (1e-3 / 0.1) * (1e-2 / 2) * 10,000 = 0.5 nepers on every filter.
PICK_DECAY = 0.5
# Kept filters under GReg-2's recover level -1e-4 through ~99,000 growth iterations: 0.1 nepers of growth.
RECOVER_GROWTH = 0.1
# The pruned filters' integrated decay by the end of growth, if the loss did not resist: twice what the
# stopping rule (kept/pruned magnitude ratio 1000 = e^6.9) needs, so the rule fires ~70% into growth.
GROW_DECAY = 2 * math.log(1000.0)


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Everything that shapes the benchmark (stored verbatim in the JSON)."""

    scale: str
    model: str
    batch_size: int
    base_epochs: float
    base_lr: float
    base_schedule: str
    ft_epochs: float
    ft_lr: float
    ft_schedule: str
    ft_warmup_epochs: float
    reg_iters: int | None          # GReg's iteration budget; None: the paper's full schedule
    reg_lr: float                  # lr_prune: constant lr while regularizing
    greg_levels: str               # "auto" (budget-matched penalties), "scaled" (GRegConfig.scaled), "paper"
    seeds: int
    ratios: list[str]
    limit_train: int | str | None  # "auto": the largest subset the time budget allows
    limit_test: int | None
    device: str = "cpu"
    amp: bool = False
    workers: int = 0
    threads: int = 0               # torch CPU threads; 0: measure 1 vs all and take the faster
    budget_min: float = 45.0       # target wall time of the whole run ("auto" subset only)
    weight_decay: float = 5e-4
    momentum: float = 0.9
    base_seed: int = 0
    candidates: list[list[int]] = field(default_factory=list)  # (train, test) subsets the planner picks from


SCALES: dict[str, Settings] = {
    # seconds of training; most of a smoke run is the pipeline's fixed per-job work (latency probes, plots)
    "smoke": Settings(scale="smoke", model="resnet20", batch_size=16, base_epochs=1, base_lr=0.05,
                      base_schedule="cosine", ft_epochs=1, ft_lr=0.01, ft_schedule="cosine", ft_warmup_epochs=0.0,
                      reg_iters=20, reg_lr=0.01, greg_levels="auto", seeds=2, ratios=["*.conv1:0.9"],
                      limit_train=160, limit_test=64, threads=1),
    "cpu": Settings(scale="cpu", model="resnet20", batch_size=64, base_epochs=15, base_lr=0.1,
                    base_schedule="cosine", ft_epochs=4, ft_lr=0.01, ft_schedule="cosine", ft_warmup_epochs=0.0,
                    reg_iters=120, reg_lr=0.01, greg_levels="auto", seeds=3, ratios=["*.conv1:0.9"],
                    limit_train="auto", limit_test=None, budget_min=45.0,
                    candidates=[[1000, 1000], [1500, 1000], [2000, 1000], [3000, 2000], [4000, 2000],
                                [6000, 2000], [8000, 3000], [12000, 5000], [16000, 5000], [24000, 10000],
                                [32000, 10000], [45000, 10000], [60000, 10000]]),
    "gpu": Settings(scale="gpu", model="resnet56", batch_size=128, base_epochs=200, base_lr=0.1,
                    base_schedule="cosine", ft_epochs=120, ft_lr=0.01, ft_schedule="0:0.01,60:0.001,90:0.0001",
                    # the paper jumps from lr 1e-3 (regularizing) to 1e-2; a 1-epoch ramp, identical for every
                    # method, avoids the accuracy collapse users of the original code hit (methods.md s.7)
                    ft_warmup_epochs=1.0, reg_iters=None, reg_lr=PAPER_LR_PRUNE, greg_levels="paper", seeds=3,
                    ratios=["*.conv1:0.9"], limit_train=None, limit_test=None, device="cuda", amp=True,
                    workers=4),
}


def _ratio_spec(text: str) -> str:
    """A bare number means that ratio for every block's first conv (the papers' ResNet convention)."""
    t = text.strip()
    try:
        r = float(t)
    except ValueError:
        return t
    return f"*.conv1:{r:g}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--ratios", nargs="+", metavar="SPEC",
                    help="one or more ratio specs (regprune's languages, e.g. '*.conv1:0.9' or "
                         "'[0,0.75,0.75,0.32,0]'); a bare number r means '*.conv1:r'. Default '*.conv1:0.9'")
    ap.add_argument("--seeds", type=int, help="pruning/fine-tuning seeds per method (>= 3 for a real run)")
    ap.add_argument("--base-epochs", type=float)
    ap.add_argument("--ft-epochs", type=float)
    ap.add_argument("--ft-schedule", help="fine-tuning lr schedule: cosine or EPOCH:LR,... (same for every method)")
    ap.add_argument("--reg-iters", type=int, help="GReg's iteration budget (0: the paper's full schedule)")
    ap.add_argument("--reg-lr", type=float, help="GReg's constant lr while regularizing (lr_prune)")
    ap.add_argument("--greg-levels", choices=["auto", "scaled", "paper"],
                    help="penalty levels of a compressed GReg schedule (see the README)")
    ap.add_argument("--limit-train", help="training images (an integer, 'all', or 'auto' to fit --budget-min)")
    ap.add_argument("--limit-test", help="test images (an integer or 'all')")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--budget-min", type=float, help="wall-time target in minutes for --limit-train auto")
    ap.add_argument("--device", help="cpu, cuda, cuda:N")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--threads", type=int, help="torch CPU threads (0: measure and pick)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--work-dir", type=Path, help="run directories (default benchmarks/work/<scale>)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run in the same work dir")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return ap.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    s = copy.deepcopy(SCALES[args.scale])
    if args.ratios:
        s.ratios = [_ratio_spec(r) for r in args.ratios]
    for name in ("seeds", "base_epochs", "ft_epochs", "reg_lr", "greg_levels", "batch_size", "budget_min",
                 "device", "amp", "workers", "threads"):
        v = getattr(args, name)
        if v is not None:
            setattr(s, name, v)
    if args.ft_schedule:
        s.ft_schedule = args.ft_schedule
    if args.reg_iters is not None:
        s.reg_iters = args.reg_iters or None
    common.apply_limits(s, args, allow_auto_train=True)
    if s.seeds < 1:
        raise UserError("--seeds must be >= 1")
    if s.reg_iters is None and s.greg_levels != "paper":
        raise UserError("the paper's full GReg schedule (--reg-iters 0) runs with --greg-levels paper")
    return s


# ---------------------------------------------------------------------------------------------- GReg config
def greg_overrides(method: str, s: Settings, track: list[str]) -> dict[str, Any]:
    """GRegConfig fields (paper names) for one method, handed to the pipeline as JobOptions.greg.

    * "paper": the paper's CIFAR schedule (update every 10 iterations, 10,000 to stabilize), lr_prune 1e-3.
    * "scaled": `GRegConfig.scaled(reg_iters)`, the library's compression: phase lengths shrink to the
      budget, the paper's penalty ceilings stay. Under a ~1000x compression the penalties then act for so
      few iterations that the pruned filters barely shrink (about e^-0.5 at lr 1e-3).
    * "auto": the phase lengths of "scaled", with the penalty levels set from the budget so that the
      compressed schedule does what the paper's does: GReg-2's pick phase applies the paper's uniform
      decay (0.5 nepers), kept filters get the paper's recover growth (0.1 nepers), and the pruned filters'
      decay by the end of growth is 2 x ln(1000), so the paper's stopping rule (kept/pruned magnitude 1000)
      fires inside the budget. The decay of a filter under penalty lambda is ~ lr/(1 - momentum) * lambda
      per iteration.
    """
    out: dict[str, Any] = {"track_layers": list(track)}
    if s.greg_levels == "paper" or s.reg_iters is None:
        out.update(update_reg_interval=10, stabilize_reg_interval=10000, lr_prune=s.reg_lr)
        return out
    base = GRegConfig.scaled(int(s.reg_iters), method)
    cfg = dataclasses.replace(base, lr_prune=s.reg_lr)
    if s.greg_levels == "auto":
        plan = base.planned_iters(method)
        interval = base.update_reg_interval
        n_grow = plan["grow"] // interval
        lr_eff = s.reg_lr / (1.0 - s.momentum)
        start, changes = 0.0, {}
        if method == "greg2":
            n_pick = plan["pick"] // interval
            pick = 2.0 * PICK_DECAY / (lr_eff * plan["pick"])
            changes.update(reg_upper_limit_pick=pick, reg_granularity_pick=pick / n_pick,
                           reg_granularity_recover=-RECOVER_GROWTH / (lr_eff * plan["grow"]))
            start = n_pick * (pick / n_pick)
        ceiling = max(2.0 * GROW_DECAY / (lr_eff * plan["grow"]) - start, 2.0 * start)
        # (n - 0.5) puts the n-th update clearly past the ceiling, as GRegConfig.scaled does
        changes.update(reg_upper_limit=ceiling, reg_granularity_prune=(ceiling - start) / (n_grow - 0.5))
        cfg = dataclasses.replace(cfg, **changes)
        got = cfg.planned_iters(method)
        if got != plan:  # the levels must not change the phase lengths the budget fixed
            raise RuntimeError(f"auto GReg levels changed the schedule: {plan} -> {got}")
    for name in ("update_reg_interval", "reg_granularity_prune", "reg_upper_limit", "stabilize_reg_interval",
                 "mag_ratio_limit", "reg_granularity_pick", "reg_upper_limit_pick", "reg_granularity_recover",
                 "lr_prune"):
        out[name] = getattr(cfg, name)
    return out


def greg_config_of(overrides: dict[str, Any]) -> GRegConfig:
    return GRegConfig(**overrides)


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
        n, by = common.choose_threads(lambda: _fresh(s.model), s.batch_size, shape)
        out["threads_measured_img_s"] = {str(k): round(v, 1) for k, v in by.items()}
        s.threads = n
    else:
        torch.set_num_threads(s.threads)
    out["threads"] = s.threads
    out["dense_train_img_s"] = common.train_throughput(_fresh(s.model), s.batch_size, shape, steps=4)
    out["dense_eval_img_s"] = common.eval_throughput(_fresh(s.model), 256, shape)
    out["pruned"] = {}
    for spec in s.ratios:
        out["pruned"][spec] = {
            "train_img_s": common.train_throughput(_pruned(s.model, spec), s.batch_size, shape, steps=4),
            "eval_img_s": common.eval_throughput(_pruned(s.model, spec), 256, shape),
        }
    return out


def reg_total_iters(s: Settings, method: str) -> int:
    return greg_config_of(greg_overrides(method, s, [])).planned_iters(method)["total"]


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


# ---------------------------------------------------------------------------------------------- running
def _run_dir(path: Path, resume: bool) -> RunDir:
    if resume and (path / "state.json").exists():
        return RunDir(path, resume=True)
    return RunDir(path, overwrite=True)


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


def base_curve(run_path: Path) -> list[dict[str, float]]:
    recs = E.read_metrics(run_path / E.METRICS_FILE)
    return [{"epoch": r["epoch"], "test_top1": r["test_top1"], "train_loss": r.get("loss")}
            for r in recs if r.get("kind") == "epoch" and r.get("phase") == "train" and "test_top1" in r]


def plateau(curve: list[dict[str, float]], tail: int = 3, tol: float = 0.3) -> dict[str, Any]:
    """Did test accuracy stop rising? Best of the last `tail` epochs vs the best before them."""
    accs = [c["test_top1"] for c in curve]
    if len(accs) <= tail:
        return {"plateaued": False, "reason": f"only {len(accs)} epochs", "gain_last_epochs": None}
    gain = max(accs[-tail:]) - max(accs[:-tail])
    return {"plateaued": gain <= tol, "gain_last_epochs": round(gain, 3), "tail_epochs": tail, "tolerance": tol}


def run_prune(s: Settings, spec: str, method: str, seed: int, base_file: Path, work: Path, resume: bool,
              track: list[str], extra_iters: int = 0, n_train: int = 0, loaders: tuple | None = None) -> dict[str, Any]:
    lib_method = "l1" if method == "l1+extra" else method
    ft_epochs = s.ft_epochs
    ft_schedule = s.ft_schedule
    extra_epochs = 0.0
    if method == "l1+extra":
        extra_epochs = extra_iters * s.batch_size / n_train
        ft_epochs = s.ft_epochs + extra_epochs
        ft_schedule = stretch_schedule(s.ft_schedule, ft_epochs / s.ft_epochs)
    o = job_options(s, method=lib_method, base=str(base_file), ratios=spec, seed=seed, ft_epochs=ft_epochs,
                    ft_lr=s.ft_lr, ft_lr_schedule=ft_schedule, ft_warmup_epochs=s.ft_warmup_epochs,
                    greg=greg_overrides(lib_method, s, track) if lib_method != "l1" else {})
    path = work / _slug(spec) / f"{method.replace('+', '_')}-s{seed}"
    clock = common.Stopwatch()
    out = prune_job(o, _run_dir(path, resume))
    rep = out["report"]
    reg = rep.get("regularize") or {}
    # The pipeline's best_top1 misses the per-epoch evaluations (it looks for "top1" in records that say
    # "test_top1"), so it always equals the final accuracy; read the fine-tuning curve from the metrics.
    curve = [r["test_top1"] for r in E.read_metrics(path / E.METRICS_FILE)
             if r.get("phase") == "finetune" and r.get("kind") == "epoch" and "test_top1" in r]
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
        "extra_iters": extra_iters, "wall_s": round(clock(), 1), "run_dir": str(path),
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
            out[key] = round(common.bn_recalibrated_top1(model, train_loader, test_loader, device=_device(s)), 2)
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


# ---------------------------------------------------------------------------------------------- summary
def summarize(rows: list[dict[str, Any]], s: Settings) -> tuple[list[dict], list[dict]]:
    groups: list[dict] = []
    for spec in s.ratios:
        for method in METHODS:
            rs = [r for r in rows if r["ratio_spec"] == spec and r["method"] == method]
            if not rs:
                continue
            m, sd = mean_std([r["top1"] for r in rs])
            bm, bsd = mean_std([r["best_top1"] for r in rs])
            pm, _ = mean_std([r["before_ft_top1"] for r in rs])
            pr = _mean_or_none([r.get("before_ft_top1_bn_recal") for r in rs])
            ar = _mean_or_none([r.get("after_reg_top1_bn_recal") for r in rs])
            groups.append({"ratio_spec": spec, "method": method, "n_seeds": len(rs), "seeds": [r["seed"] for r in rs],
                           "top1_mean": m, "top1_std": sd, "top1_values": [r["top1"] for r in rs],
                           "best_top1_mean": bm, "best_top1_std": bsd, "before_ft_top1_mean": pm, "before_ft_top1_bn_recal_mean": pr,
                           "after_reg_top1_bn_recal_mean": ar,
                           "macs_speedup": rs[0]["macs_speedup"],
                           "latency_speedup_b64_mean": mean_std([r["latency_speedup_b64"] for r in rs])[0],
                           "reg_iters_mean": mean_std([r["reg_iters"] for r in rs])[0],
                           "ft_epochs_mean": mean_std([r["ft_epochs"] for r in rs])[0]})
    comps: list[dict] = []
    for spec in s.ratios:
        by = {g["method"]: g for g in groups if g["ratio_spec"] == spec}
        for a, b in (("greg1", "l1"), ("greg2", "l1"), ("greg1", "l1+extra"), ("greg2", "l1+extra")):
            if a not in by or b not in by:
                continue
            ga, gb = by[a], by[b]
            delta = ga["top1_mean"] - gb["top1_mean"]
            spread = ga["top1_std"] + gb["top1_std"]
            va = {r["seed"]: r["top1"] for r in rows if r["ratio_spec"] == spec and r["method"] == a}
            vb = {r["seed"]: r["top1"] for r in rows if r["ratio_spec"] == spec and r["method"] == b}
            paired = [round(va[k] - vb[k], 2) for k in sorted(va) if k in vb]
            comps.append({"ratio_spec": spec, "a": a, "b": b, "delta_mean": delta, "spread": spread,
                          "exceeds_spread": abs(delta) > spread and ga["n_seeds"] > 1 and gb["n_seeds"] > 1,
                          "paired_deltas": paired,
                          "paired_same_sign": bool(paired) and (all(d > 0 for d in paired) or all(d < 0 for d in paired))})
    return groups, comps


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
                     f"{c['spread']:.2f}: {verdict(c)}"
                     + ("; same sign on every seed" if c["paired_same_sign"] else "; sign differs between seeds"))
    notes += diagnostic_notes(rows, s)
    if not base["plateau"]["plateaued"]:
        notes.append("The base had not plateaued by the 0.3-point rule within this scale's epoch budget; a "
                     "better-trained base may change the gaps.")
    if s.scale != "gpu":
        notes.append("Small-scale caveat: the paper's 110k-iteration GReg schedule is compressed to "
                     f"{s.reg_iters} iterations here (see the README's 'penalty levels'); fine-tuning is "
                     f"{s.ft_epochs:g} epochs rather than 120.")
    return notes


def _mean_or_none(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return mean_std(vals)[0] if vals else None


def _opt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def verdict(c: dict[str, Any]) -> str:
    sign = "higher" if c["delta_mean"] > 0 else "lower"
    if c["exceeds_spread"]:
        return f"yes: {c['a']} is {sign} by more than the seed spread"
    return "no: inside the seed spread"


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
        f"the iterations GReg spent regularizing (the larger of GReg-1's and GReg-2's, per seed).",
        "- GReg regularization (before removal, on top of the fine-tuning): "
        + (f"budget {s['reg_iters']} iterations" if s["reg_iters"] else "the paper's full schedule")
        + f" at constant lr {s['reg_lr']:g}, penalty levels '{s['greg_levels']}' (see the JSON `greg_configs`);"
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
            f"{g['before_ft_top1_mean']:.2f} ({_opt(g['before_ft_top1_bn_recal_mean'])}) | "
            f"{_opt(g['after_reg_top1_bn_recal_mean'])} | {g['reg_iters_mean']:.0f} | {g['ft_epochs_mean']:.2f} |")
    lines.append(f"| dense base | - | 1.00x | {base['top1']:.2f} | - | - | - | - | - | {s['base_epochs']:g} (training) |")
    lines += ["", "Differences (mean of a − mean of b, in top-1 points; spread = std a + std b; "
              "'exceeds' means the ±1 std intervals do not overlap):", "",
              "| ratios | a vs b | Δ mean | spread | Δ per seed (paired) | exceeds the seed spread? |",
              "|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        lines.append(f"| `{c['ratio_spec']}` | {c['a']} vs {c['b']} | {c['delta_mean']:+.2f} | {c['spread']:.2f} | "
                     f"{', '.join(f'{d:+.2f}' for d in c['paired_deltas'])} | {verdict(c)} |")
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
def print_plan(s: Settings, plan: dict[str, Any]) -> None:
    log(f"greg_vs_l1 plan ({s.scale} scale)")
    for k, v in dataclasses.asdict(s).items():
        if k != "candidates":
            print(f"    {k:18s} {v}")
    for m in ("greg1", "greg2"):
        cfg = plan["greg_configs"][m]
        it = greg_config_of(cfg).planned_iters(m)
        short = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in cfg.items() if k != "track_layers"}
        print(f"    {m} schedule: {it} iterations; {short}")
    if "subset" in plan:
        sub = plan["subset"]
        print("    subset candidates (train, test, estimated minutes): "
              + "; ".join(f"{r['train']}/{r['test']}: {r['estimate_min']}" for r in sub["candidates"]))
        print(f"    chosen: {sub['chosen'][0]} train / {sub['chosen'][1]} test images "
              f"(the largest estimated within {sub['planned_within_min']} of the {sub['budget_min']:g}-minute budget)")
    if "throughput" in plan:
        tp = plan["throughput"]
        print(f"    measured: {tp['threads']} torch thread(s) {tp.get('threads_measured_img_s', '')}; dense train "
              f"{tp['dense_train_img_s']:.0f} img/s, eval {tp['dense_eval_img_s']:.0f} img/s; pruned "
              + ", ".join(f"{k}: train {v['train_img_s']:.0f} / eval {v['eval_img_s']:.0f} img/s"
                          for k, v in tp["pruned"].items()))
    if "estimate" in plan:
        print(f"    estimate (worst case, GReg running its whole budget): {plan['estimate']['total_s'] / 60:.1f} min")
    n_jobs = 1 + len(s.ratios) * s.seeds * len(METHODS)
    print(f"    jobs: 1 base + {len(s.ratios)} ratio(s) x {s.seeds} seeds x {len(METHODS)} methods = {n_jobs}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or print its plan); returns the result written to the JSON."""
    args = parse_args(argv)
    clock = common.Stopwatch()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    s = make_settings(args)
    work = (args.work_dir or HERE / "work" / s.scale).resolve()
    out_dir = args.out_dir.resolve()

    previous = work / "settings.json"
    if args.resume and previous.exists() and s.limit_train == "auto":
        # keep the subset the interrupted run chose; a new measurement could pick another
        old = json.loads(previous.read_text())
        s.limit_train, s.limit_test = old.get("limit_train"), old.get("limit_test")
    plan: dict[str, Any] = {"greg_configs": {m: greg_overrides(m, s, ["<tracked>"]) for m in ("greg1", "greg2")}}
    on_cpu = str(s.device).startswith("cpu")
    if on_cpu and (s.limit_train == "auto" or s.threads == 0):
        plan["throughput"] = measure(s)  # also settles the thread count
    elif on_cpu and s.threads:
        torch.set_num_threads(s.threads)
    if s.limit_train == "auto":
        plan["subset"] = choose_subset(s, plan["throughput"])
        s.limit_train, s.limit_test = plan["subset"]["chosen"]
        if not plan["subset"]["fits"]:
            log("WARNING: even the smallest subset is estimated above the budget; running it anyway")
    n_train = s.limit_train if isinstance(s.limit_train, int) else FASHION_TRAIN
    n_test = s.limit_test if isinstance(s.limit_test, int) else FASHION_TEST
    if "throughput" in plan:
        plan["estimate"] = estimate_s(s, n_train, n_test, plan["throughput"])
    print_plan(s, plan)
    if args.dry_run:
        return {"settings": dataclasses.asdict(s), "plan": plan, "dry_run": True}

    work.mkdir(parents=True, exist_ok=True)
    settings_file = work / "settings.json"
    if args.resume and settings_file.exists():
        old = json.loads(settings_file.read_text())
        if {k: v for k, v in old.items() if k != "threads"} != {k: v for k, v in E.log.to_jsonable(dataclasses.asdict(s)).items() if k != "threads"}:
            raise UserError(f"--resume: {settings_file} was written with other settings; rerun without --resume")
    write_json(settings_file, dataclasses.asdict(s))
    hardware = common.hardware_info(str(s.device))

    # 1. the one base model
    log(f"training the base {s.model} on {n_train} images for {s.base_epochs:g} epochs")
    t_base = common.Stopwatch()
    base_path = work / "base"
    o_base = job_options(s, seed=s.base_seed, epochs=s.base_epochs, lr=s.base_lr, lr_schedule=s.base_schedule)
    base_run = _run_dir(base_path, args.resume)
    base_row = train_job(o_base, base_run)["row"]
    curve = base_curve(base_path)
    base = {"top1": float(base_row["top1"]), "params_M": base_row["params_M"], "MMACs": base_row["MMACs"],
            "epochs": s.base_epochs, "curve": curve, "plateau": plateau(curve), "wall_s": round(t_base(), 1),
            "model_file": str(base_path / "model.safetensors")}
    log(f"base top-1 {base['top1']:.2f}% after {s.base_epochs:g} epochs ({base['wall_s']:.0f} s); "
        f"plateau check: {base['plateau']}")

    # 2. every ratio x seed x method, GReg first so that l1+extra knows how many iterations to add
    from regprune.data import load_data, make_loaders

    bundle = load_data(DATA, limit_train=o_base.limit_train, limit_test=o_base.limit_test)
    loaders = make_loaders(bundle, s.batch_size, seed=12345)  # for the BN re-estimation diagnostic only
    rows: list[dict[str, Any]] = []
    greg_cfgs: dict[str, dict] = {}
    fig_runs: dict[str, Path] = {}
    fig_layer = None
    for spec in s.ratios:
        track = tracked_layers(s, spec)
        if fig_layer is None:
            fig_layer = track[-1]
        for m in ("greg1", "greg2"):
            greg_cfgs[f"{spec} {m}"] = greg_overrides(m, s, track)
        for seed in range(s.seeds):
            seed_rows: dict[str, dict] = {}
            for method in ("greg1", "greg2", "l1", "l1+extra"):
                extra = max(seed_rows["greg1"]["reg_iters"], seed_rows["greg2"]["reg_iters"]) if method == "l1+extra" else 0
                log(f"{spec} seed {seed}: {method}" + (f" (+{extra} iterations of fine-tuning)" if extra else ""))
                row = run_prune(s, spec, method, seed, base_path / "model.safetensors", work, args.resume, track,
                                extra_iters=extra, n_train=n_train, loaders=loaders)
                seed_rows[method] = row
                rows.append(row)
                log(f"    top-1 {row['top1']:.2f}% (before fine-tuning {row['before_ft_top1']:.2f}%, "
                    f"{row['before_ft_top1_bn_recal']}% with BN statistics re-estimated"
                    + (f", after {row['reg_iters']} reg. iterations {row['after_reg_top1']:.2f}% "
                       f"({row['after_reg_top1_bn_recal']}% BN re-estimated), "
                       f"stop: {row['reg_stop_reason']}" if method.startswith("greg") else "")
                    + f"), MACs speedup {row['macs_speedup']:.2f}x, {row['wall_s']:.0f} s; elapsed {clock() / 60:.1f} min")
            if spec == s.ratios[-1] and seed == 0:
                fig_runs = {m: Path(seed_rows[m]["run_dir"]) for m in ("greg1", "greg2")}

    groups, comps = summarize(rows, s)
    notes = build_notes(rows, s, base, comps)

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"greg_vs_l1_{s.scale}"
    fig_path = None
    try:
        fig_path = separation_plot(out_dir / f"{stem}_separation.png", fig_runs, fig_layer) if fig_runs else None
    except Exception as exc:  # a plotting failure must not lose an hour of results
        log(f"WARNING: the separation plot failed ({type(exc).__name__}: {exc}); the run dirs have the pipeline's plots")
    result = {
        "benchmark": "greg_vs_l1", "scale": s.scale, "argv": sys.argv[1:] if argv is None else list(argv),
        "started": started, "wall_time_s": round(clock(), 1), "hardware": hardware,
        "settings": dataclasses.asdict(s), "plan": plan, "greg_configs": greg_cfgs,
        "data": {"spec": DATA, "train_images": n_train, "test_images": n_test,
                 "subset": n_train < FASHION_TRAIN or n_test < FASHION_TEST},
        "base": base, "results": rows, "summary": groups, "comparisons": comps,
        "separation_plot": str(fig_path) if fig_path else None, "separation_layer": fig_layer,
        "separation_seed": 0, "work_dir": str(work), "notes": notes,
    }
    write_json(out_dir / f"{stem}.json", result)
    (out_dir / f"{stem}.md").write_text(markdown(result))
    log(f"wrote {out_dir / (stem + '.md')}, {stem}.json" + (f", {fig_path.name}" if fig_path else "")
        + f" in {clock() / 60:.1f} min")
    print(markdown(result), flush=True)
    return result


if __name__ == "__main__":
    common.run_script(main)
