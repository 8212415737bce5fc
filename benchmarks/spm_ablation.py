"""Pruning from scratch (SPM) with and without its nuclear-norm loss, against L1 pruning, at one MACs target.

Three variants reach the same MACs budget (default: keep 41% of dense MACs, the paper's ResNet-50 point) on
Fashion-MNIST, each with several seeds, all through regprune's own code paths:

  spm         `regprune scratch` with its defaults: gates from random init, nuclear-norm + MACs losses,
              gates frozen at S_max (65/90 of the epochs) with the budget snap, exact reconfiguration
  spm_no_nuc  the same with alpha_nuc = 0 (MACs loss only): what the nuclear-norm term adds
  l1          a dense model trained from the same init for the same number of epochs as the scratch runs,
              pruned by L1 norm to the same MACs (`regprune prune --method l1 --target-macs`), then fine-tuned
              for a stated number of extra epochs

Seed k fixes the initial weights and the data order of every variant (the L1 base and both SPM runs start from
the same weights), so per-seed differences are paired. Results: benchmarks/results/spm_ablation_<scale>.{md,json,png}.

    python benchmarks/spm_ablation.py --scale smoke              # seconds; what the test runs
    nice -n 10 python benchmarks/spm_ablation.py --scale cpu     # ResNet-20, ~20 min on 2 quiet CPU cores
    python benchmarks/spm_ablation.py --scale gpu                # ResNet-56, all data, --device cuda --amp
    python benchmarks/spm_ablation.py --scale gpu --dry-run      # print the plan only

The cpu scale's default subset (2,000 / 1,000 images) is sized for a quiet machine; on a shared one pass e.g.
`--limit-train 1000 --limit-test 500` (the plan prints an estimate from measured throughput before training).
`--resume` reuses every finished job (each run directory's row.json) and re-renders the outputs.

Library workaround: the S_max budget snap runs through `snap_to_budget_terminating` below, a copy of
`regprune.scratch.snap_to_budget` that cannot toggle one gate forever (see SNAP_WORKAROUND); each SPM run
records how many flips it undid (`snap` in the JSON).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository root on sys.path too)
from common import fmt_pm, log, mean_std, write_json  # noqa: E402

import torch  # noqa: E402

from regprune import engine as E  # noqa: E402
from regprune.errors import UserError  # noqa: E402
from regprune.models import create_model  # noqa: E402
from regprune.pipeline import JobOptions, RunDir, prune_job, prune_plan, train_job  # noqa: E402
from regprune.scratch import scratch_dry_run, scratch_job, spm_settings  # noqa: E402

__all__ = ["main", "Settings", "SCALES", "VARIANTS", "LABELS", "COMPARISONS", "summarize", "markdown",
           "snap_to_budget_terminating"]

HERE = Path(__file__).resolve().parent
DATA = "fashion-mnist"
FASHION_TRAIN, FASHION_TEST = 60000, 10000
INPUT_SHAPE = (1, 28, 28)
VARIANTS = ("spm", "spm_no_nuc", "l1")
LABELS = {
    "spm": "SPM: nuclear + MACs losses (`regprune scratch` defaults)",
    "spm_no_nuc": "SPM: MACs loss only (alpha_nuc = 0)",
    "l1": "L1 pruning of a trained dense model + fine-tuning",
    "dense": "dense, no pruning (the L1 base; reference)",
}
COMPARISONS = (("spm", "spm_no_nuc"), ("spm", "l1"), ("spm_no_nuc", "l1"))


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Everything that shapes the benchmark (stored verbatim in the JSON)."""

    scale: str
    model: str
    target_macs: float          # kept fraction of dense MACs, the same for every variant
    seeds: int
    batch_size: int
    epochs: float               # scratch runs AND the dense base of L1 (the same budget)
    lr: float
    lr_schedule: str
    warmup_epochs: float
    ft_epochs: float            # L1's fine-tuning after removal (extra epochs, stated in the output)
    ft_lr: float
    ft_schedule: str
    limit_train: int | None     # None: all 60,000 training images
    limit_test: int | None      # None: all 10,000 test images
    search_epochs: float | None = None  # None: `regprune scratch`'s default, floor(epochs * 65 / 90)
    alpha_nuc: float | None = None      # variant spm's nuclear weight; None: the library default
    device: str = "cpu"
    amp: bool = False
    workers: int = 0
    threads: int = 0            # torch CPU threads; 0: measure 1 vs all and take the faster
    weight_decay: float = 5e-4
    momentum: float = 0.9


SCALES: dict[str, Settings] = {
    # seconds of training; most of a smoke run is the jobs' fixed work (data loading, graph tracing, latency)
    "smoke": Settings(scale="smoke", model="resnet20", target_macs=0.41, seeds=2, batch_size=32, epochs=2,
                      lr=0.05, lr_schedule="cosine", warmup_epochs=0.0, ft_epochs=1, ft_lr=0.01,
                      ft_schedule="cosine", limit_train=128, limit_test=64, threads=1),
    # sized for ~20 minutes on 2 quiet CPU cores (~250 training img/s): 3 seeds x (2 scratch runs + 1 base) x 10
    # epochs + 3 x 3 fine-tuning epochs = 99 passes over 2,000 images, plus a 1,000-image test pass per epoch.
    # Batch 32 gives the gates ~440 search steps (the library's small-network settings were tuned on ~400).
    "cpu": Settings(scale="cpu", model="resnet20", target_macs=0.41, seeds=3, batch_size=32, epochs=10,
                    lr=0.05, lr_schedule="cosine", warmup_epochs=0.0, ft_epochs=3, ft_lr=0.01,
                    ft_schedule="cosine", limit_train=2000, limit_test=1000),
    # the paper's 90-epoch schedule with the gates frozen at epoch 65; L1 fine-tunes for a third of that
    "gpu": Settings(scale="gpu", model="resnet56", target_macs=0.41, seeds=3, batch_size=128, epochs=90,
                    lr=0.1, lr_schedule="cosine", warmup_epochs=1.0, ft_epochs=30, ft_lr=0.01,
                    ft_schedule="cosine", limit_train=None, limit_test=None, device="cuda", amp=True, workers=4),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--target-macs", type=float, help="kept fraction of dense MACs for every variant (default 0.41)")
    ap.add_argument("--seeds", type=int, help="seeds per variant (>= 3 for a real run)")
    ap.add_argument("--epochs", type=float, help="epochs of each scratch run and of each dense base")
    ap.add_argument("--search-epochs", type=float, help="SPM epochs with gates learning (default: 65/90 of --epochs)")
    ap.add_argument("--ft-epochs", type=float, help="L1's fine-tuning epochs after removal")
    ap.add_argument("--lr", type=float, help="lr of the scratch runs and the dense bases")
    ap.add_argument("--ft-lr", type=float, help="L1's fine-tuning lr")
    ap.add_argument("--alpha-nuc", type=float, help="nuclear-norm weight of variant spm (default: the library's)")
    ap.add_argument("--limit-train", help="training images (an integer or 'all')")
    ap.add_argument("--limit-test", help="test images (an integer or 'all')")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--device", help="cpu, cuda, cuda:N")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--threads", type=int, help="torch CPU threads (0: measure 1 vs all and take the faster)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--work-dir", type=Path, help="run directories (default benchmarks/work/spm_<scale>)")
    ap.add_argument("--resume", action="store_true", help="reuse the finished jobs of an interrupted run")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return ap.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    """The scale's settings with the command line's overrides, checked before anything runs."""
    s = copy.deepcopy(SCALES[args.scale])
    for name in ("target_macs", "seeds", "epochs", "search_epochs", "ft_epochs", "lr", "ft_lr", "alpha_nuc",
                 "batch_size", "device", "amp", "workers", "threads"):
        v = getattr(args, name)
        if v is not None:
            setattr(s, name, v)
    common.apply_limits(s, args)
    if s.seeds < 1:
        raise UserError("--seeds must be >= 1")
    if not 0.0 < s.target_macs < 1.0:
        raise UserError(f"--target-macs {s.target_macs:g}: expected a kept fraction in (0, 1)")
    if s.epochs <= 0 or s.ft_epochs < 0:
        raise UserError("--epochs must be > 0 and --ft-epochs >= 0")
    for v in VARIANTS[:2]:
        spm_settings(1, s.epochs, spm_extra(s, v))  # raises the library's own message for a bad search length
    return s


def spm_extra(s: Settings, variant: str) -> dict[str, Any]:
    """What the variant passes to `scratch_job` beyond `regprune scratch`'s defaults."""
    extra: dict[str, Any] = {}
    if s.search_epochs is not None:
        extra["search_epochs"] = s.search_epochs
    if variant == "spm_no_nuc":
        extra["alpha_nuc"] = 0.0
    elif s.alpha_nuc is not None:
        extra["alpha_nuc"] = s.alpha_nuc
    return extra


def job_options(s: Settings, seed: int, **kw: Any) -> JobOptions:
    base = dict(model=s.model, data=DATA, seed=seed, batch_size=s.batch_size, workers=s.workers, device=s.device,
                amp=s.amp, progress=False, limit_train=s.limit_train, limit_test=s.limit_test, epochs=s.epochs,
                lr=s.lr, lr_schedule=s.lr_schedule, warmup_epochs=s.warmup_epochs, weight_decay=s.weight_decay,
                momentum=s.momentum, target_macs=s.target_macs)
    base.update(kw)
    return JobOptions(**base)


def epochs_of(s: Settings, variant: str) -> dict[str, float]:
    """Training epochs each variant gets (over the same training images)."""
    if variant == "l1":
        return {"base": s.epochs, "finetune": s.ft_epochs, "total": s.epochs + s.ft_epochs}
    return {"scratch": s.epochs, "total": s.epochs}


# ---------------------------------------------------------------------------------------------- planning
def _fresh(model: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(model, num_classes=10, in_channels=INPUT_SHAPE[0])


def measure(s: Settings) -> dict[str, Any]:
    """CPU training/eval throughput of the dense model (for the time estimate; also settles the thread count)."""
    out: dict[str, Any] = {}
    if s.threads == 0:
        n, by = common.choose_threads(lambda: _fresh(s.model), s.batch_size, INPUT_SHAPE)
        out["threads_measured_img_s"] = {str(k): round(v, 1) for k, v in by.items()}
        s.threads = n
    else:
        torch.set_num_threads(s.threads)
    out["threads"] = s.threads
    out["train_img_s"] = common.train_throughput(_fresh(s.model), s.batch_size, INPUT_SHAPE, steps=3)
    out["gated_train_img_s"] = gated_train_throughput(s, steps=3)
    out["eval_img_s"] = common.eval_throughput(_fresh(s.model), 256, INPUT_SHAPE)
    return out


def gated_train_throughput(s: Settings, steps: int = 3) -> float:
    """Images per second of SGD steps on the gated model with both SPM losses (the search's step), random data."""
    import torch.nn.functional as F

    from regprune.methods.spm import SPMRegularizer

    model = _fresh(s.model)
    reg = SPMRegularizer.attach(model, torch.zeros(1, *INPUT_SHAPE), s.target_macs,
                                **{k: v for k, v in spm_settings(int(1e6), s.epochs, {}).items()
                                   if k in ("alpha_nuc", "alpha_mac", "mac_norm")})
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.batch_size, *INPUT_SHAPE, generator=g)
    y = torch.randint(0, 10, (s.batch_size,), generator=g)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x), y) + reg.extra_loss()).backward()
        opt.step()
        reg.on_step_end()

    step()  # warm-up
    clock = common.Stopwatch()
    for _ in range(steps):
        step()
    return s.batch_size * steps / max(clock(), 1e-9)


def estimate_s(s: Settings, n_train: int, n_test: int, tp: dict[str, Any]) -> float:
    """Seconds the run should take at the measured dense throughput (the pruned fine-tuning counted as dense:
    an upper bound), with ~15 s of fixed work per job (data, graph tracing, latency probes, plots)."""
    train = (2 * s.epochs * n_train / tp["gated_train_img_s"]  # the two scratch runs (gated, SPM losses)
             + (s.epochs + s.ft_epochs) * n_train / tp["train_img_s"])  # dense base; pruned fine-tuning as dense
    evals = (3 * s.epochs + s.ft_epochs + 8) * n_test / tp["eval_img_s"]  # a test pass per epoch, + a few per job
    return (train + evals + 4 * 15.0) * s.seeds


def l1_plan(s: Settings) -> dict[str, Any]:
    """The ratios regprune's solver picks for L1 at the MACs target (no data needed)."""
    o = job_options(s, 0, method="l1")
    _, plan = prune_plan(o, _fresh(s.model), torch.zeros(1, *INPUT_SHAPE))
    return {"ratios": plan.ratios, "removal": plan.removal, "macs_fraction": plan.pruned_macs / plan.dense_macs}


def print_plan(s: Settings, plan: dict[str, Any], dry_run: bool = False) -> None:
    log(f"spm_ablation plan ({s.scale} scale)")
    for k, v in dataclasses.asdict(s).items():
        print(f"    {k:14s} {v}")
    for v in VARIANTS:
        ep = epochs_of(s, v)
        print(f"  {v}: {LABELS[v]}; training epochs {ep}")
    for v in VARIANTS[:2]:
        if dry_run:
            print(f"  --- {v}: what `regprune scratch` will do (its --dry-run) ---")
            scratch_dry_run(job_options(s, 0), spm_extra(s, v))
        else:
            print(f"  {v}: scratch settings {spm_settings(int(1e6), s.epochs, spm_extra(s, v))}")
    lp = plan["l1_plan"]
    print(f"  --- l1: ratios for {100 * s.target_macs:.1f}% of dense MACs (plan reaches "
          f"{100 * lp['macs_fraction']:.2f}%): {lp['ratios']}")
    if "throughput" in plan:
        tp = plan["throughput"]
        print(f"  measured: {tp['threads']} torch thread(s) {tp.get('threads_measured_img_s', '')}; dense train "
              f"{tp['train_img_s']:.0f} img/s, gated search {tp['gated_train_img_s']:.0f} img/s, eval "
              f"{tp['eval_img_s']:.0f} img/s; load average "
              f"{plan.get('loadavg')}")
        print(f"  estimate at that throughput: {plan['estimate_s'] / 60:.1f} min")
    n_jobs = s.seeds * 4
    print(f"  jobs: {s.seeds} seeds x (spm, spm_no_nuc, dense base, l1) = {n_jobs}", flush=True)


# ---------------------------------------------------------------------------------------------- running
def _curve(run_path: Path, phase: str) -> list[dict[str, float]]:
    recs = E.read_metrics(run_path / E.METRICS_FILE) if (run_path / E.METRICS_FILE).exists() else []
    return [{"epoch": r["epoch"], "test_top1": r["test_top1"]}
            for r in recs if r.get("kind") == "epoch" and r.get("phase") == phase and "test_top1" in r]


def _spm_trajectory(run_path: Path) -> list[dict[str, Any]]:
    recs = E.read_metrics(run_path / E.METRICS_FILE) if (run_path / E.METRICS_FILE).exists() else []
    return [{"epoch": r["epoch"], "macs_fraction": r["macs_fraction"], "frozen": r.get("frozen"),
             "kept": r.get("kept")} for r in recs if r.get("kind") == "spm"]


def plateau(curve: list[dict[str, float]], tail: int = 3, tol: float = 0.3) -> dict[str, Any]:
    """Had test accuracy stopped rising? Best of the last `tail` epochs against the best before them."""
    accs = [c["test_top1"] for c in curve]
    if len(accs) <= tail:
        return {"plateaued": False, "gain_last_epochs": None, "tail_epochs": tail, "tolerance": tol}
    gain = max(accs[-tail:]) - max(accs[:-tail])
    return {"plateaued": gain <= tol, "gain_last_epochs": round(gain, 3), "tail_epochs": tail, "tolerance": tol}


def spm_groups(s: Settings) -> dict[str, dict[str, Any]]:
    """Channels of every gated group of the model, and whether it is shared across a residual stream (SPM)."""
    from regprune.methods.spm import insert_gates

    gates = insert_gates(_fresh(s.model), torch.zeros(1, *INPUT_SHAPE))
    return {r: {"channels": gates.groups[r].channels, "shared": bool(gates.groups[r].coupled)} for r in gates.roots}


def _cached(path: Path, resume: bool) -> dict[str, Any] | None:
    f = path / "row.json"
    if resume and f.is_file():
        return json.loads(f.read_text())
    return None


# ---------------------------------------------------------------------------------------------- workaround
SNAP_WORKAROUND = (
    "regprune.scratch.snap_to_budget is replaced, for these runs only, by a copy that flips each channel at most "
    "once and undoes a flip that jumps over the whole tolerance window. The library's loop toggles the same gate "
    "on and off until its 100,000-iteration cap when the gate nearest the threshold moves MACs by more than the "
    "window (2 x 1% of the target; one stage-1 residual-stream channel of ResNet-20 is ~2.4% of dense MACs), "
    "each iteration an exact MACs count: a stall of many minutes at S_max. The channel choice (nearest the "
    "threshold first) and the 1% tolerance are the library's.")


def snap_to_budget_terminating(reg: Any, tol: float = 0.01) -> tuple[float, float]:
    """`regprune.scratch.snap_to_budget`'s rule (flip the gate nearest the threshold toward the budget until MACs
    are within `tol` of it), made to terminate: a channel is flipped at most once, and a flip that jumps from one
    side of the window to the other is undone. Returns the MACs fraction before and after, like the original."""
    dense, target = reg.dense_macs, reg.target_macs
    before = frac = reg.current_macs() / dense
    gates = {r: reg.gates.gate(r) for r in reg.gates.roots}
    thr = {r: getattr(g, "threshold", 0.5) for r, g in gates.items()}
    used: dict[str, set[int]] = {r: set() for r in gates}
    stats = {"flips": 0, "undone": 0}
    while abs(frac - target) > tol * target:
        turn_off = frac > target
        best = None
        for r, g in gates.items():
            w = g.weight.detach()
            on = g.hard().to(w.device).bool()
            if w.numel() != on.numel():  # block-periodic gates: left to the search, as the library does
                continue
            if turn_off and int(on.sum()) <= max(1, getattr(g, "min_on", 1)):
                continue
            cand = (on if turn_off else ~on).clone()
            for i in used[r]:
                cand[i] = False
            if not bool(cand.any()):
                continue
            dist = (w - thr[r]).abs().masked_fill(~cand, float("inf"))
            i = int(dist.argmin())
            if best is None or float(dist[i]) < best[0]:
                best = (float(dist[i]), r, i)
        if best is None:
            break
        _, r, i = best
        used[r].add(i)
        with torch.no_grad():
            old = float(gates[r].weight[i])
            gates[r].weight[i] = thr[r] - 0.01 if turn_off else thr[r] + 0.01
        new = reg.current_macs() / dense
        if (new - target) * (frac - target) < 0 and abs(new - target) > tol * target:
            with torch.no_grad():
                gates[r].weight[i] = old
            stats["undone"] += 1
            continue
        stats["flips"] += 1
        frac = new
    snap_to_budget_terminating.last = {**stats, "before": before, "after": frac}
    return before, frac


snap_to_budget_terminating.last = {}


def run_spm(s: Settings, variant: str, seed: int, path: Path, resume: bool) -> dict[str, Any]:
    if (row := _cached(path, resume)) is not None:
        return row
    import regprune.scratch as scratch_mod

    clock = common.Stopwatch()
    o = job_options(s, seed, out=str(path))
    original = scratch_mod.snap_to_budget
    scratch_mod.snap_to_budget = snap_to_budget_terminating  # _Monitor.freeze looks it up at call time
    snap_to_budget_terminating.last = {}
    try:
        rep = scratch_job(o, RunDir(path, overwrite=True), spm_extra(s, variant))["report"]
    finally:
        scratch_mod.snap_to_budget = original
    dense_row, pruned_row = rep["rows"]
    traj = _spm_trajectory(path)
    row = {"variant": variant, "seed": seed, "top1": float(pruned_row["top1"]),
           "top5": pruned_row.get("top5"), "macs_fraction": float(rep["macs_fraction"]),
           "params_M": pruned_row["params_M"], "MMACs": pruned_row["MMACs"],
           "dense_params_M": dense_row["params_M"], "dense_MMACs": dense_row["MMACs"],
           "gated_top1": rep["gated"]["top1"], "search_macs_fraction": rep["search_macs_fraction"],
           "reconfig_max_abs_diff": rep["reconfig_max_abs_diff"], "spm_settings": rep["settings"],
           "snap": dict(snap_to_budget_terminating.last),
           "kept_widths": traj[-1]["kept"] if traj else None, "macs_trajectory": [
               {k: t[k] for k in ("epoch", "macs_fraction", "frozen")} for t in traj],
           "latency_speedup_b1": rep["latency_speedup_b1"], "epochs": epochs_of(s, variant),
           "curve": _curve(path, "scratch"), "wall_s": round(clock(), 1), "run_dir": str(path)}
    write_json(path / "row.json", row)
    return row


def run_dense(s: Settings, seed: int, path: Path, resume: bool) -> dict[str, Any]:
    if (row := _cached(path, resume)) is not None and (path / "model.safetensors").is_file():
        return row
    clock = common.Stopwatch()
    out = train_job(job_options(s, seed, out=str(path)), RunDir(path, overwrite=True))
    r = out["row"]
    row = {"variant": "dense", "seed": seed, "top1": float(r["top1"]), "top5": r.get("top5"), "macs_fraction": 1.0,
           "params_M": r["params_M"], "MMACs": r["MMACs"], "dense_params_M": r["params_M"], "dense_MMACs": r["MMACs"],
           "epochs": {"train": s.epochs, "total": s.epochs}, "curve": _curve(path, "train"),
           "plateau": plateau(_curve(path, "train")),
           "wall_s": round(clock(), 1), "run_dir": str(path), "model_file": str(path / "model.safetensors")}
    write_json(path / "row.json", row)
    return row


def run_l1(s: Settings, seed: int, base_file: Path, path: Path, resume: bool) -> dict[str, Any]:
    if (row := _cached(path, resume)) is not None:
        return row
    clock = common.Stopwatch()
    o = job_options(s, seed, out=str(path), method="l1", base=str(base_file), ft_epochs=s.ft_epochs,
                    ft_lr=s.ft_lr, ft_lr_schedule=s.ft_schedule)
    rep = prune_job(o, RunDir(path, overwrite=True))["report"]
    dense_row, pruned_row = rep["rows"]
    plan = rep.get("plan") or {}
    row = {"variant": "l1", "seed": seed, "top1": float(pruned_row["top1"]), "top5": pruned_row.get("top5"),
           "macs_fraction": 1.0 / float(rep["macs_speedup"]), "params_M": pruned_row["params_M"],
           "MMACs": pruned_row["MMACs"], "dense_params_M": dense_row["params_M"], "dense_MMACs": dense_row["MMACs"],
           "base_top1": dense_row["top1"], "before_ft_top1": (rep.get("pruned_before_finetune") or {}).get("top1"),
           "best_top1": rep.get("best_top1"), "ratios": plan.get("ratios"),
           "plan_macs_fraction": plan["pruned_macs"] / plan["dense_macs"] if plan.get("dense_macs") else None,
           "latency_speedup_b1": rep["latency_speedup_b1"], "epochs": epochs_of(s, "l1"),
           "curve": _curve(path, "finetune"), "wall_s": round(clock(), 1), "run_dir": str(path)}
    write_json(path / "row.json", row)
    return row


# ---------------------------------------------------------------------------------------------- summary
def summarize(rows: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """Per-variant mean/std over seeds, and pairwise comparisons against the seed spread."""
    groups: list[dict] = []
    for v in (*VARIANTS, "dense"):
        rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["seed"])
        if not rs:
            continue
        m, sd = mean_std([r["top1"] for r in rs])
        mm, msd = mean_std([r["macs_fraction"] for r in rs])
        pm, psd = mean_std([r["params_M"] for r in rs])
        g = {"variant": v, "label": LABELS[v], "n_seeds": len(rs), "seeds": [r["seed"] for r in rs],
             "top1_mean": m, "top1_std": sd, "top1_values": [r["top1"] for r in rs],
             "macs_fraction_mean": mm, "macs_fraction_std": msd, "macs_fraction_values": [r["macs_fraction"] for r in rs],
             "params_M_mean": pm, "params_M_std": psd, "dense_params_M": rs[0]["dense_params_M"],
             "epochs_total": rs[0]["epochs"]["total"], "epochs": rs[0]["epochs"]}
        if v.startswith("spm"):
            g["search_macs_fraction_mean"] = mean_std([r["search_macs_fraction"] for r in rs
                                                       if r["search_macs_fraction"] is not None] or [float("nan")])[0]
            g["search_macs_fraction_values"] = [r["search_macs_fraction"] for r in rs]
            g["gated_top1_mean"] = mean_std([r["gated_top1"] for r in rs])[0]
            g["reconfig_max_abs_diff_max"] = max(r["reconfig_max_abs_diff"] for r in rs)
        if v == "l1":
            g["before_ft_top1_mean"] = mean_std([r["before_ft_top1"] for r in rs])[0]
        groups.append(g)
    by = {g["variant"]: g for g in groups}
    comps: list[dict] = []
    for a, b in COMPARISONS:
        if a not in by or b not in by:
            continue
        ga, gb = by[a], by[b]
        delta = ga["top1_mean"] - gb["top1_mean"]
        spread = ga["top1_std"] + gb["top1_std"]
        va = {r["seed"]: r["top1"] for r in rows if r["variant"] == a}
        vb = {r["seed"]: r["top1"] for r in rows if r["variant"] == b}
        paired = [round(va[k] - vb[k], 2) for k in sorted(va) if k in vb]
        comps.append({"a": a, "b": b, "delta_mean": delta, "spread": spread,
                      "exceeds_spread": bool(abs(delta) > spread and ga["n_seeds"] > 1 and gb["n_seeds"] > 1),
                      "paired_deltas": paired,
                      "paired_same_sign": bool(paired) and (all(d > 0 for d in paired) or all(d < 0 for d in paired)),
                      "macs_fraction_gap": ga["macs_fraction_mean"] - gb["macs_fraction_mean"]})
    return groups, comps


def verdict(c: dict[str, Any]) -> str:
    sign = "higher" if c["delta_mean"] > 0 else "lower"
    if c["exceeds_spread"]:
        return f"yes: {c['a']} is {sign} by more than the seed spread"
    return "no: inside the seed spread"


def _epochs_text(g: dict[str, Any]) -> str:
    ep = g["epochs"]
    if g["variant"] == "l1":
        return f"{ep['total']:g} ({ep['base']:g} base + {ep['finetune']:g} fine-tune)"
    return f"{ep['total']:g}"


def _notes_cell(g: dict[str, Any]) -> str:
    if g["variant"].startswith("spm"):
        ends = ", ".join("?" if x is None else f"{x:.3f}" for x in g.get("search_macs_fraction_values", []))
        return (f"the search itself ended at {ends} of dense MACs (per seed) before the S_max snap; "
                f"reconfiguration max abs diff {g['reconfig_max_abs_diff_max']:.1e}")
    if g["variant"] == "l1":
        return f"top-1 right after removal, before fine-tuning: {g['before_ft_top1_mean']:.2f} (mean)"
    return "-"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    first = result.get("first_invocation") or {}
    hw = first.get("hardware") or result["hardware"]  # a --resume reports the machine the jobs first ran on
    d = result["data"]
    spm_s = result.get("spm_settings", {})
    lines = [f"# SPM ablation: pruning from scratch with / without the nuclear-norm loss, vs L1: {s['scale']} scale", ""]
    data = (f"Fashion-MNIST, {d['train_images']} training / {d['test_images']} test images"
            + (" (deterministic class-balanced subsets)" if d["subset"] else ""))
    a = spm_s.get("spm", {})
    lines += [
        f"- Model: {s['model']} (1-channel input); data: {data}.",
        f"- Target: keep **{100 * s['target_macs']:.1f}% of dense MACs** ({1 / s['target_macs']:.2f}x fewer) for every "
        "variant; the MACs column is what the pruned model actually has (Conv2d + Linear MACs).",
        f"- Training budgets, in epochs over the same training images: SPM variants {s['epochs']:g} from random init "
        f"(gates learning for {a.get('search_epochs', '?'):g}, then frozen; lr {s['lr']:g} {s['lr_schedule']}, "
        f"warm-up {s['warmup_epochs']:g}); L1: a dense base trained {s['epochs']:g} epochs with the same settings "
        f"and init, pruned to the target, then fine-tuned {s['ft_epochs']:g} epochs (lr {s['ft_lr']:g} "
        f"{s['ft_schedule']}): **{s['epochs'] + s['ft_epochs']:g} epochs in total**, "
        f"{s['ft_epochs']:g} more than the scratch runs. Batch {s['batch_size']}, momentum {s['momentum']:g}, "
        f"weight decay {s['weight_decay']:g} everywhere.",
        f"- SPM losses: spm alpha_nuc {a.get('alpha_nuc', '?'):g}, alpha_mac {a.get('alpha_mac', '?'):g} "
        f"({a.get('mac_norm', '?')} scale), gate lr x{a.get('gate_lr_scale', '?'):g}; spm_no_nuc identical with "
        "alpha_nuc 0. At S_max the gates nearest the threshold are moved until MACs are within 1% of the budget "
        "(`regprune scratch`'s default); the notes column says where the search itself had got to.",
        f"- L1 picks (regprune's solver for the target; the residual streams and the stem are not in its scope): "
        f"{result.get('l1_plan', {}).get('ratios')}.",
        f"- Seeds: {s['seeds']}; seed k fixes the initial weights and data order of all variants (the L1 base and "
        "both SPM runs start from the same weights), so the per-seed differences below are paired. Top-1 is the "
        "final model's accuracy on the test images (no selection on the test set).",
        f"- Hardware: {hw.get('processor')} ({hw.get('cpus_usable')} usable cores, {hw.get('torch_threads')} torch "
        f"threads), torch {hw.get('torch')}, device {hw.get('device')}"
        + (f", GPU {hw['gpu']}" if hw.get("gpu") else "")
        + f"; load average at start {hw.get('loadavg_1_5_15')}"
        + (f" (first invocation, {first['started']})" if first.get("started") else "")
        + f". Wall time {result['wall_time_s'] / 60:.1f} min"
        + (f" (this invocation reused finished jobs with --resume; the {len(result['results'])} jobs took "
           f"{result['jobs_wall_s'] / 60:.1f} min when they ran"
           + (f", the first invocation {first['wall_time_s'] / 60:.1f} min in all" if first.get("wall_time_s") else "")
           + ")" if result.get("resumed") else "") + ".",
        "",
        "| variant | training epochs | MACs fraction (mean ± std) | params M (dense " + f"{result['summary'][0]['dense_params_M']:.4f})"
        + " | top-1 % (mean ± std) | per seed | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in result["summary"]:
        lines.append(
            f"| {g['variant']}: {g['label']} | {_epochs_text(g)} | "
            f"{g['macs_fraction_mean']:.3f} ± {g['macs_fraction_std']:.3f} | {g['params_M_mean']:.4f} | "
            f"{fmt_pm(g['top1_mean'], g['top1_std'])} | {', '.join(f'{v:.2f}' for v in g['top1_values'])} | "
            f"{_notes_cell(g)} |")
    lines += ["", "Differences (mean of a − mean of b, in top-1 points; spread = std a + std b; "
              "'exceeds' means the ±1 std intervals do not overlap; with so few seeds a rough screen, not a test):", "",
              "| a vs b | Δ mean | spread | Δ per seed (paired) | exceeds the seed spread? |",
              "|---|---|---|---|---|"]
    for c in result["comparisons"]:
        lines.append(f"| {c['a']} vs {c['b']} | {c['delta_mean']:+.2f} | {c['spread']:.2f} | "
                     f"{', '.join(f'{x:+.2f}' for x in c['paired_deltas'])} | {verdict(c)} |")
    groups = result.get("spm_groups") or {}
    spm_rows = [r for r in result["results"] if r["variant"].startswith("spm") and r.get("kept_widths")]
    if groups and spm_rows:
        lines += ["", "Channels the SPM runs kept per gated group (of the dense count in the header; * = one gate "
                  "shared by a whole residual stream):", "",
                  "| run | " + " | ".join(f"{r}{'*' if g['shared'] else ''} ({g['channels']})" for r, g in groups.items())
                  + " |", "|---|" + "---|" * len(groups)]
        for r in spm_rows:
            lines.append(f"| {r['variant']} s{r['seed']} | "
                         + " | ".join(str(r["kept_widths"].get(g, "-")) for g in groups) + " |")
    if result.get("plot"):
        lines += ["", f"Figure: `{Path(result['plot']).name}`: top-1 against the achieved MACs fraction, mean ± std "
                  "over seeds per variant (per-seed points faint)."]
    if result.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def accuracy_plot(path: Path, rows: list[dict[str, Any]], groups: list[dict[str, Any]], target: float) -> Path:
    """Top-1 against the achieved MACs fraction: mean ± std per variant (error bars), seeds as faint points; the
    left panel with the dense reference, the right one zoomed on the pruned variants around the target."""
    from regprune.report import _plt  # the library's headless matplotlib setup

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.4), dpi=110, gridspec_kw={"width_ratios": [1, 1.2]})
    colors = {"spm": "#1f77b4", "spm_no_nuc": "#ff7f0e", "l1": "#2ca02c", "dense": "#7f7f7f"}
    markers = {"spm": "o", "spm_no_nuc": "s", "l1": "^", "dense": "D"}
    for ax, zoom in zip(axes, (False, True)):
        shown = [g for g in groups if not (zoom and g["variant"] == "dense")]
        for g in shown:
            v = g["variant"]
            pts = [(r["macs_fraction"], r["top1"]) for r in rows if r["variant"] == v]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colors[v], marker=markers[v], alpha=0.35, s=20)
            ax.errorbar(g["macs_fraction_mean"], g["top1_mean"], xerr=g["macs_fraction_std"], yerr=g["top1_std"],
                        color=colors[v], marker=markers[v], markersize=7, capsize=4, linewidth=1.4,
                        label=f"{v} ({g['epochs_total']:g} ep): {g['top1_mean']:.2f} ± {g['top1_std']:.2f}")
        ax.axvline(target, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("MACs kept (fraction of dense)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        if zoom:
            xs = [r["macs_fraction"] for r in rows if r["variant"] != "dense"] + [target]
            pad = max(0.01, (max(xs) - min(xs)) * 0.5)
            ax.set_xlim(min(xs) - pad, max(xs) + pad)
            ax.set_title(f"pruned variants near the target ({target:g}, dotted)", fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
        else:
            ax.set_title("SPM ablation: accuracy vs MACs (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def make_notes(groups: list[dict], comps: list[dict], s: Settings, rows: list[dict]) -> list[str]:
    by = {g["variant"]: g for g in groups}
    notes = []
    for c in comps:
        notes.append(f"{c['a']} vs {c['b']}: Δ {c['delta_mean']:+.2f} points, spread {c['spread']:.2f}: {verdict(c)}"
                     + ("; same sign on every seed" if c["paired_same_sign"] else "; the sign differs between seeds"))
    for v in ("spm", "spm_no_nuc"):
        g = by.get(v)
        if g and math.isfinite(g["search_macs_fraction_mean"]) and \
                abs(g["search_macs_fraction_mean"] - s.target_macs) > 0.02:
            notes.append(f"{v}: the search alone ended at {g['search_macs_fraction_mean']:.3f} of dense MACs on "
                         f"average (target {s.target_macs:g}); the budget snap at S_max moved the least decided gates "
                         "the rest of the way.")
    plats = [plateau(r["curve"]) for r in rows if r["variant"] == "dense"]
    if plats:
        flat = sum(bool(p["plateaued"]) for p in plats)
        gains = ", ".join(f"{p['gain_last_epochs']:+.1f}" if p["gain_last_epochs"] is not None else "n/a"
                          for p in plats)
        notes.append(f"Dense bases: test accuracy had plateaued (best of the last 3 epochs within 0.3 points of the "
                     f"best before them) on {flat} of {len(plats)} seeds (gains over the last 3 epochs: {gains}); "
                     + ("longer training would raise every variant, and may change the gaps." if flat < len(plats)
                        else "the schedule is long enough for the dense model."))
    if "l1" in by and "dense" in by:
        notes.append(f"L1 trains {s.ft_epochs:g} epochs more than the scratch runs in total "
                     f"({by['l1']['epochs_total']:g} vs {s.epochs:g}); its dense bases reach "
                     f"{fmt_pm(by['dense']['top1_mean'], by['dense']['top1_std'])}.")
    if s.scale != "gpu":
        notes.append("Small-scale caveat: a subset of Fashion-MNIST and a short schedule (the paper searches for 65 of "
                     "90 ImageNet epochs); differences of a point or less need more seeds or the gpu scale.")
    return notes


def collapse_notes(rows: list[dict[str, Any]], groups: dict[str, dict[str, Any]]) -> list[str]:
    """Gated groups the SPM runs cut to (almost) nothing: a search that removed a whole residual stream."""
    runs = [r for r in rows if r["variant"].startswith("spm") and r.get("kept_widths")]
    notes = []
    for root, g in groups.items():
        low = [r for r in runs if r["kept_widths"].get(root, g["channels"]) <= max(1, g["channels"] // 16)]
        if low:
            notes.append(f"{'Residual-stream' if g['shared'] else 'Private'} group `{root}` ({g['channels']} channels) "
                         f"was cut to {', '.join(str(r['kept_widths'][root]) for r in low)} channel(s) in {len(low)} of "
                         f"{len(runs)} SPM runs (the gates of a group start tied at 0.6 and get the same MACs gradient, "
                         "so they cross the threshold together; the per-epoch widths are in each run's metrics.jsonl).")
    return notes


def workaround_note(rows: list[dict[str, Any]]) -> str:
    snaps = [r.get("snap") or {} for r in rows if r["variant"].startswith("spm")]
    undone = sum(int(x.get("undone", 0)) for x in snaps)
    return ("Library workaround: the S_max budget snap ran through a terminating copy of "
            "`regprune.scratch.snap_to_budget` (the library's loop can toggle one gate until its 100,000-iteration "
            f"cap); {undone} flip(s) that would have jumped over the tolerance window were undone in these runs "
            "(see `workarounds` and each run's `snap` in the JSON).")


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or print its plan); returns the result written to the JSON."""
    args = parse_args(argv)
    clock = common.Stopwatch()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    s = make_settings(args)
    work = (args.work_dir or HERE / "work" / f"spm_{s.scale}").resolve()
    out_dir = args.out_dir.resolve()
    n_train = s.limit_train or FASHION_TRAIN
    n_test = s.limit_test or FASHION_TEST

    plan: dict[str, Any] = {"l1_plan": l1_plan(s)}
    on_cpu = str(s.device).startswith("cpu")
    if on_cpu and (s.threads == 0 or s.scale != "smoke"):  # smoke needs no estimate
        plan["throughput"] = measure(s)
        plan["loadavg"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
        plan["estimate_s"] = estimate_s(s, n_train, n_test, plan["throughput"])
    print_plan(s, plan, args.dry_run)
    if args.dry_run:
        return {"settings": dataclasses.asdict(s), "plan": plan, "dry_run": True}
    if str(s.device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {s.device}: no CUDA device here (use --dry-run to see the plan, or --device cpu)")
    if "throughput" not in plan and s.threads:
        torch.set_num_threads(s.threads)

    work.mkdir(parents=True, exist_ok=True)
    settings_file = work / "settings.json"
    if args.resume and settings_file.exists():
        old = json.loads(settings_file.read_text())
        now = E.log.to_jsonable(dataclasses.asdict(s))
        if {k: v for k, v in old.items() if k != "threads"} != {k: v for k, v in now.items() if k != "threads"}:
            raise UserError(f"--resume: {settings_file} was written with other settings; rerun without --resume")
    write_json(settings_file, dataclasses.asdict(s))
    hardware = common.hardware_info(str(s.device))
    info_file = work / "run_info.json"  # what the first invocation measured, kept for a later --resume
    first = json.loads(info_file.read_text()) if args.resume and info_file.is_file() else None
    if first is None:
        write_json(info_file, {"started": started, "hardware": hardware, "plan": plan,
                               "argv": sys.argv[1:] if argv is None else list(argv)})

    rows: list[dict[str, Any]] = []
    for seed in range(s.seeds):
        for v in ("spm", "spm_no_nuc"):
            log(f"seed {seed}: {v} ({s.epochs:g} epochs from random init)")
            row = run_spm(s, v, seed, work / f"seed{seed}" / v, args.resume)
            rows.append(row)
            log(f"    top-1 {row['top1']:.2f}% (gated {row['gated_top1']:.2f}%), MACs {row['macs_fraction']:.3f} of "
                f"dense (search ended at {row['search_macs_fraction']:.3f}), {row['params_M']:.4f} M params, "
                f"{row['wall_s']:.0f} s; elapsed {clock() / 60:.1f} min")
        log(f"seed {seed}: dense base ({s.epochs:g} epochs)")
        dense = run_dense(s, seed, work / f"seed{seed}" / "dense", args.resume)
        rows.append(dense)
        log(f"    top-1 {dense['top1']:.2f}%, {dense['wall_s']:.0f} s; elapsed {clock() / 60:.1f} min")
        log(f"seed {seed}: l1 to {s.target_macs:g} of dense MACs, fine-tune {s.ft_epochs:g} epochs")
        row = run_l1(s, seed, Path(dense["model_file"]), work / f"seed{seed}" / "l1", args.resume)
        rows.append(row)
        log(f"    top-1 {row['top1']:.2f}% (after removal {row['before_ft_top1']:.2f}%), MACs "
            f"{row['macs_fraction']:.3f}, {row['params_M']:.4f} M params, {row['wall_s']:.0f} s; "
            f"elapsed {clock() / 60:.1f} min")

    groups, comps = summarize(rows)
    gate_groups = spm_groups(s)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"spm_ablation_{s.scale}"
    fig = accuracy_plot(out_dir / f"{stem}.png", rows, groups, s.target_macs)
    spm_cfg = {v: next(r["spm_settings"] for r in rows if r["variant"] == v) for v in ("spm", "spm_no_nuc")}
    result = {
        "benchmark": "spm_ablation", "scale": s.scale, "argv": sys.argv[1:] if argv is None else list(argv),
        "started": started, "wall_time_s": round(clock(), 1), "hardware": hardware,
        "settings": dataclasses.asdict(s), "plan": plan, "l1_plan": plan["l1_plan"], "spm_settings": spm_cfg,
        "epochs_per_variant": {v: epochs_of(s, v) for v in VARIANTS},
        "data": {"spec": DATA, "train_images": n_train, "test_images": n_test,
                 "subset": n_train < FASHION_TRAIN or n_test < FASHION_TEST},
        "results": rows, "summary": groups, "comparisons": comps, "plot": str(fig), "work_dir": str(work),
        "workarounds": [SNAP_WORKAROUND], "spm_groups": gate_groups, "resumed": bool(args.resume),
        "first_invocation": first,
        "jobs_wall_s": round(sum(r["wall_s"] for r in rows), 1),
        "notes": make_notes(groups, comps, s, rows) + collapse_notes(rows, gate_groups) + [workaround_note(rows)],
    }
    write_json(out_dir / f"{stem}.json", result)
    if first is None:
        write_json(info_file, {**json.loads(info_file.read_text()), "wall_time_s": result["wall_time_s"]})
    (out_dir / f"{stem}.md").write_text(markdown(result))
    log(f"wrote {out_dir / (stem + '.md')}, {stem}.json, {stem}.png in {clock() / 60:.1f} min")
    print(markdown(result), flush=True)
    return result


if __name__ == "__main__":
    common.run_script(main)
