"""regprune's pruning methods against Torch-Pruning's pruners, on the same trained network at the same MACs.

One CIFAR-style ResNet-20 (1-channel stem) is trained on Fashion-MNIST until its test accuracy stops rising.
Then, for every MACs target (2x, 4x, 8x fewer: kept fractions 0.5 / 0.25 / 0.125) and every seed, a copy of
that one base is pruned nine ways and fine-tuned with exactly the same settings (regprune's Trainer):

  l1             regprune one-shot L1 (`regprune.prune(target_macs=...)`), no extra training
  l1_group       the same with `criterion="group"`: each channel scored over its whole coupled group
  greg1, greg2   regprune GReg-1 / GReg-2 (`regprune.regularizer`), regularization then removal
  spm            regprune SPM gates + nuclear-norm + MACs losses searched on the trained base, gates frozen
                 at the budget, exact reconfiguration (the paper searches from scratch; this starts from the base)
  tp_magnitude   Torch-Pruning MagnitudePruner, L1 group importance, no sparse training (as TP's recipe)
  tp_bnscale     Torch-Pruning BNScalePruner (network slimming): sparse training, then pruning
  tp_groupnorm   Torch-Pruning GroupNormPruner (DepGraph's group sparsity): sparse training, then pruning
  tp_growingreg  Torch-Pruning GrowingRegPruner (NOT the GReg paper's algorithm): sparse training, then pruning

Torch-Pruning is driven as its documentation and benchmark recipe do: `pruner.update_regularizer()`, then
`pruner.regularize(model)` after every backward (and `update_reg()` for GrowingRegPruner) for as many iterations
as GReg's regularization budget, with weight decay off as in TP's recipe and TP's own coefficients; then one
`pruner.step()`. The MACs are matched through TP's own ratio API: a `pruning_ratio_dict` giving each group the
channel count of regprune's plan for the target (so every block-internal method ends with identical widths),
or, with `--tp-scope all`, a uniform `pruning_ratio` found by bisection. Every job's achieved MACs (regprune's
counter: conv + linear) are reported.

Scope: regprune's L1/GReg prune the papers' ResNet scope (each block's first conv; residual streams, stem and
classifier kept). Torch-Pruning is restricted to the same groups by default (`--tp-scope regprune`) so that
the comparison is of criteria and regularizers, not of which layers shrink; `--tp-scope all` gives TP its
default scope (every group but the classifier). SPM gates every group, residual streams included: its
architecture at a given MACs differs by design. The table has a scope column.

    python benchmarks/peers.py --scale smoke             # seconds; what tests/test_peers.py runs
    python benchmarks/peers.py --scale cpu --jobs 2      # about 1.5 h on 2 CPU cores (see --dry-run)
    python benchmarks/peers.py --scale gpu --jobs 12     # all 70,000 images, one GPU shared by 12 workers
    python benchmarks/peers.py --scale cpu --dry-run     # print the plan and a time estimate only

Writes benchmarks/results/peers_<scale>.{md,json} and peers_<scale>.png (accuracy against MACs).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository root on sys.path)
from common import fmt_pm, log, mean_std, write_json  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch_pruning as tp  # noqa: E402

from regprune import engine as E  # noqa: E402
from regprune.api import prune as rp_prune  # noqa: E402
from regprune.api import regularizer as rp_regularizer  # noqa: E402
from regprune.counting import count_macs, count_params  # noqa: E402
from regprune.data import load_data, make_loaders  # noqa: E402
from regprune.errors import UserError  # noqa: E402
from regprune.graph import CUSTOM_PRUNERS, analyze  # noqa: E402
from regprune.ratios import make_plan  # noqa: E402
from regprune.methods.greg import GRegConfig  # noqa: E402
from regprune.methods.spm import SPMRegularizer, insert_gates, reconfigure  # noqa: E402
from regprune.models import create_model  # noqa: E402
from regprune.report import format_table  # noqa: E402
from regprune.scratch import snap_to_budget, spm_settings  # noqa: E402
from regprune.surgery import load_model, save_model  # noqa: E402

__all__ = ["main", "Settings", "SCALES", "METHODS", "TP_METHODS"]

HERE = Path(__file__).resolve().parent
DATA = "fashion-mnist"
METHODS = ("l1", "l1_group", "greg1", "greg2", "spm", "tp_magnitude", "tp_bnscale", "tp_groupnorm", "tp_growingreg")
TP_METHODS = tuple(m for m in METHODS if m.startswith("tp_"))
SPARSE_TP = ("tp_bnscale", "tp_groupnorm", "tp_growingreg")
REFERENCE = "l1"  # what every method is compared against in the table's last column


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Everything that shapes the benchmark (stored verbatim in the JSON)."""

    scale: str
    model: str
    limit_train: int | None
    limit_test: int | None
    batch_size: int
    base_epochs: float          # first cosine cycle of the base
    base_lr: float
    base_cycle_epochs: float    # further cosine cycles while the test accuracy still rises
    base_cycle_lr: float
    base_max_cycles: int
    plateau_tol: float          # a cycle that raises the best test top-1 by less than this (points) ends training
    reg_iters: int              # GReg's budget; TP's sparse training and SPM's search get the same iterations
    reg_lr: float               # constant lr of every regularization / sparse-training / search phase
    ft_epochs: float
    ft_lr: float
    ft_schedule: str
    seeds: int
    targets: list[float]
    methods: list[str]
    tp_reg: float = 5e-4        # TP's benchmark recipe (benchmarks/main.py --reg)
    tp_delta_reg: float = 1e-4  # TP's recipe for GrowingRegPruner (--delta_reg)
    tp_reg_updates: int = 10    # GrowingRegPruner.update_reg() calls spread over the sparse phase
    tp_scope: str = "regprune"
    weight_decay: float = 5e-4
    momentum: float = 0.9
    device: str = "cpu"
    amp: bool = False
    workers: int = 0
    threads: int = 1


_COMMON = dict(model="resnet20", targets=[0.5, 0.25, 0.125], methods=list(METHODS), ft_schedule="cosine")
SCALES: dict[str, Settings] = {
    # seconds per job: checks that every path runs and writes finite numbers; the numbers mean nothing
    "smoke": Settings(scale="smoke", limit_train=64, limit_test=48, batch_size=16, base_epochs=1, base_lr=0.05,
                      base_cycle_epochs=1, base_cycle_lr=0.01, base_max_cycles=0, plateau_tol=0.3, reg_iters=3,
                      reg_lr=0.01, ft_epochs=0.5, ft_lr=0.01, seeds=1, threads=1,
                      **{**_COMMON, "targets": [0.5, 0.125]}),
    # a subset sized for a 2-core CPU (ResNet-20 trains at ~120 img/s per core there): about 1.5 h with --jobs 2
    "cpu": Settings(scale="cpu", limit_train=3000, limit_test=1000, batch_size=64, base_epochs=15, base_lr=0.1,
                    base_cycle_epochs=5, base_cycle_lr=0.01, base_max_cycles=4, plateau_tol=0.3, reg_iters=100,
                    reg_lr=0.01, ft_epochs=3, ft_lr=0.01, seeds=3, threads=0, **_COMMON),
    # all 70,000 images on one GPU; sized so that the 81 jobs fit in about 20 minutes of an H100 with --jobs 12
    "gpu": Settings(scale="gpu", limit_train=None, limit_test=None, batch_size=128, base_epochs=20, base_lr=0.1,
                    base_cycle_epochs=5, base_cycle_lr=0.01, base_max_cycles=4, plateau_tol=0.1, reg_iters=1000,
                    reg_lr=0.01, ft_epochs=5, ft_lr=0.01, seeds=3, device="cuda", amp=True, workers=2, threads=1,
                    **_COMMON),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--targets", type=float, nargs="+", help="kept MACs fractions (default 0.5 0.25 0.125)")
    ap.add_argument("--methods", nargs="+", choices=METHODS)
    ap.add_argument("--reg-iters", type=int)
    ap.add_argument("--ft-epochs", type=float)
    ap.add_argument("--base-epochs", type=float)
    ap.add_argument("--limit-train", help="training images (an integer or 'all')")
    ap.add_argument("--limit-test", help="test images (an integer or 'all')")
    ap.add_argument("--tp-scope", choices=["regprune", "all"])
    ap.add_argument("--tp-reg", type=float)
    ap.add_argument("--device")
    ap.add_argument("--threads", type=int, help="torch CPU threads (0: measure 1 vs all, take the faster)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--work-dir", type=Path, help="base model and per-job results (default benchmarks/work/peers_<scale>)")
    ap.add_argument("--fresh", action="store_true", help="ignore finished jobs in the work dir")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and a time estimate, run nothing")
    ap.add_argument("--data", default=DATA, help="dataset spec (default fashion-mnist: the Debian package's folder; "
                                                  "fashion-mnist:PATH for IDX files elsewhere)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="pruning jobs run at once in worker processes (they share the device; a small network "
                         "leaves a GPU mostly idle, so several processes raise its throughput)")
    ap.add_argument("--time-budget", type=float,
                    help="seconds: start no job that would likely end after this, then write the summary of what "
                         "is done (the next run with the same work dir continues)")
    ap.add_argument("--_shard", help=argparse.SUPPRESS)      # "k/N": this worker's share of the pending jobs
    ap.add_argument("--_deadline", type=float, help=argparse.SUPPRESS)  # absolute time.time() budget end
    return ap.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    s = copy.deepcopy(SCALES[args.scale])
    for name in ("seeds", "targets", "methods", "reg_iters", "ft_epochs", "base_epochs", "tp_scope", "tp_reg",
                 "device", "threads"):
        v = getattr(args, name)
        if v is not None:
            setattr(s, name, list(v) if isinstance(v, list) else v)
    common.apply_limits(s, args)
    if s.device != "cuda":
        s.amp = False
    if s.seeds < 1 or s.reg_iters < 1:
        raise UserError("--seeds and --reg-iters must be >= 1")
    if any(not 0 < t <= 1 for t in s.targets):
        raise UserError("--targets are kept MACs fractions in (0, 1]")
    return s


def _train_config(s: Settings, seed: int, **kw: Any) -> E.TrainConfig:
    base = dict(lr=s.ft_lr, lr_schedule="constant", momentum=s.momentum, weight_decay=s.weight_decay,
                batch_size=s.batch_size, amp=s.amp, device=s.device, seed=seed, progress=False, log_every=50)
    base.update(kw)
    return E.TrainConfig(**base)


def example_input() -> torch.Tensor:
    return torch.zeros(1, 1, 28, 28)


# ---------------------------------------------------------------------------------------------- base
def _evaluate(model: nn.Module, loader, device: str) -> dict[str, float]:
    """regprune's evaluate on the run's device; the model is left on the CPU."""
    dev = E.resolve_device(device)
    model.to(dev)
    try:
        return E.evaluate(model, loader, dev)
    finally:
        model.cpu()


def _epoch_curve(trainer: E.Trainer, offset: int) -> list[dict[str, float]]:
    return [{"epoch": offset + i + 1, "test_top1": r["test_top1"]}
            for i, r in enumerate(r for r in trainer.metrics if r.get("kind") == "epoch" and "test_top1" in r)]


def train_base(s: Settings, bundle, work: Path) -> tuple[Path, dict[str, Any]]:
    """Train the one base: a cosine cycle, then shorter low-lr cosine cycles until the test top-1 stops rising."""
    f, meta_f = work / "base.safetensors", work / "base.json"
    key = {k: getattr(s, k) for k in ("model", "limit_train", "limit_test", "batch_size", "base_epochs", "base_lr",
                                      "base_cycle_epochs", "base_cycle_lr", "base_max_cycles", "plateau_tol")}
    if f.exists() and meta_f.exists():
        meta = json.loads(meta_f.read_text())
        if meta.get("key") == key:
            log(f"base: reusing {f} ({meta['epochs']} epochs, test top-1 {meta['top1']:.2f})")
            return f, meta
    torch.manual_seed(0)
    model = create_model(s.model, num_classes=bundle.num_classes, in_channels=bundle.in_channels)
    train_loader, test_loader = make_loaders(bundle, s.batch_size, workers=s.workers, seed=0)
    cfg = _train_config(s, 0, epochs=s.base_epochs, lr=s.base_lr, lr_schedule="cosine")
    tr = E.Trainer(model, train_loader, test_loader, cfg, phase="base")
    tr.fit()
    curve = _epoch_curve(tr, 0)
    best = max((c["test_top1"] for c in curve), default=float("nan"))
    cycles, reason = [], "no further cycles at this scale" if s.base_max_cycles == 0 else "cycle limit reached"
    log(f"base: {s.base_epochs:g} epochs, best test top-1 {best:.2f}")
    for c in range(s.base_max_cycles):
        cfg = _train_config(s, c + 1, epochs=s.base_cycle_epochs, lr=s.base_cycle_lr, lr_schedule="cosine")
        tr = E.Trainer(model, train_loader, test_loader, cfg, phase=f"base_cycle{c + 1}")
        tr.fit()
        part = _epoch_curve(tr, len(curve))
        curve += part
        cycle_best = max(p["test_top1"] for p in part)
        cycles.append({"cycle": c + 1, "best_top1": cycle_best, "gain": cycle_best - best})
        log(f"base: cycle {c + 1} ({s.base_cycle_epochs:g} epochs at lr {s.base_cycle_lr:g}): best {cycle_best:.2f} "
            f"({cycle_best - best:+.2f})")
        if cycle_best - best < s.plateau_tol:
            reason = f"a {s.base_cycle_epochs:g}-epoch cycle raised the best test top-1 by < {s.plateau_tol} points"
            best = max(best, cycle_best)
            break
        best = cycle_best
    top1 = _evaluate(model, test_loader, s.device)["top1"]
    save_model(model, f, {"dataset": bundle.name, "top1": top1})
    meta = {"key": key, "epochs": len(curve), "top1": top1, "best_top1": best, "curve": curve, "cycles": cycles,
            "stopped_because": reason, "plateaued": reason.startswith("a "),
            "macs": count_macs(model, example_input()), "params": count_params(model)}
    E.atomic_write_text(meta_f, json.dumps(meta, indent=1))
    return f, meta


# ---------------------------------------------------------------------------------------------- methods
class TPSparseHook:
    """Torch-Pruning's sparse-training calls inside regprune's Trainer: regularize() after every backward,
    and for GrowingRegPruner update_reg() every `update_every` steps (TP's scripts call it per epoch or
    every --update-reg-interval iterations)."""

    def __init__(self, pruner, model: nn.Module, update_every: int) -> None:
        self.pruner = pruner
        self.model = model
        self.update_every = max(1, update_every)
        self.updates = 0

    def after_backward(self, trainer) -> None:
        self.pruner.regularize(self.model)

    def on_step_end(self, trainer) -> None:
        if isinstance(self.pruner, tp.pruner.GrowingRegPruner) and trainer.step % self.update_every == 0:
            self.pruner.update_reg()
            self.updates += 1


def _bn_scale(model: nn.Module, names: set[str]) -> float:
    """Mean |gamma| of the BatchNorms a TP pruner may prune: shows whether its sparse training did anything."""
    vals = [m.weight.detach().abs().mean().item() for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and n in names]
    return statistics.fmean(vals) if vals else float("nan")


def tp_ratios(model: nn.Module, x: torch.Tensor, target: float, s: Settings) -> tuple[dict, float, list]:
    """(pruning_ratio_dict, pruning_ratio, ignored_layers) that bring Torch-Pruning to `target` MACs.

    Scope "regprune": the per-group channel counts of regprune's own plan for the target, handed to TP as
    `pruning_ratio_dict`, so TP's model has exactly the widths of regprune's L1/GReg models (the comparison is
    of which channels go and how the network was prepared, not of architecture). Scope "all": TP's default
    scope (all groups but the classifier) with one uniform `pruning_ratio`, found by bisection on copies (with
    local pruning the widths do not depend on the weights, so the copies give the real model's MACs).
    """
    if s.tp_scope == "regprune":
        graph = analyze(model, x)
        plan = make_plan(graph, target_macs=target)
        roots = set(plan.removal)
        scope_bns = {m.name for r in roots for m in graph.groups[r].members if "BatchNorm" in m.kind}
        # everything else is ignored: TP then neither prunes nor (BNScalePruner) penalises it
        ignored = [m for n, m in model.named_modules()
                   if (isinstance(m, (nn.Conv2d, nn.Linear)) and n not in roots)
                   or (isinstance(m, nn.BatchNorm2d) and n not in scope_bns)]
        # TP keeps int(n * (1 - ratio)) channels: (k - 1e-6) / n removes exactly k whatever the float rounding
        ratios = {model.get_submodule(r): (k - 1e-6) / graph.groups[r].channels for r, k in plan.removal.items()}
        return ratios, 0.0, ignored
    dense = count_macs(model, x)

    def macs_at(r: float) -> float:
        m = copy.deepcopy(model)
        ign = [q for q in m.modules() if isinstance(q, nn.Linear)]
        tp.pruner.MagnitudePruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=r,
                                  ignored_layers=ign, customized_pruners=CUSTOM_PRUNERS).step()
        return count_macs(m, x) / dense

    lo, hi = 0.0, 0.95
    for _ in range(14):
        mid = (lo + hi) / 2
        if macs_at(mid) > target:
            lo = mid
        else:
            hi = mid
    # the side nearer the target
    r = hi if abs(macs_at(hi) - target) <= abs(macs_at(lo) - target) else lo
    return {}, r, [q for q in model.modules() if isinstance(q, nn.Linear)]


def tp_pruner(method: str, model: nn.Module, x: torch.Tensor, target: float, s: Settings):
    """The Torch-Pruning pruner for `method`, with the importance TP's CIFAR recipe pairs it with."""
    ratio_dict, ratio, ignored = tp_ratios(model, x, target, s)
    kw = dict(pruning_ratio=ratio, pruning_ratio_dict=ratio_dict or None, iterative_steps=1, ignored_layers=ignored,
              customized_pruners=CUSTOM_PRUNERS)
    if method == "tp_magnitude":
        p = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=1), **kw)
    elif method == "tp_bnscale":
        p = tp.pruner.BNScalePruner(model, x, importance=tp.importance.BNScaleImportance(), reg=s.tp_reg, **kw)
    elif method == "tp_groupnorm":
        p = tp.pruner.GroupNormPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2, normalizer="max"),
                                      reg=s.tp_reg, **kw)
    elif method == "tp_growingreg":
        p = tp.pruner.GrowingRegPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       reg=s.tp_reg, delta_reg=s.tp_delta_reg, **kw)
    else:
        raise ValueError(method)
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m not in ignored}
    return p, bns, ratio


def run_tp(method: str, model: nn.Module, x: torch.Tensor, target: float, s: Settings, loader, seed: int):
    pruner, bns, ratio = tp_pruner(method, model, x, target, s)
    info: dict[str, Any] = {"reg_iters": 0, "tp_uniform_ratio": ratio if s.tp_scope == "all" else None}
    if method in SPARSE_TP:
        info["bn_scale_before"] = _bn_scale(model, bns)
        pruner.update_regularizer()
        hook = TPSparseHook(pruner, model, s.reg_iters // max(1, s.tp_reg_updates))
        # TP's recipe trains without weight decay while regularizing (benchmarks/main.py)
        cfg = _train_config(s, seed, max_steps=s.reg_iters, lr=s.reg_lr, weight_decay=0.0)
        tr = E.Trainer(model, loader, None, cfg, phase="sparse", hooks=[hook])
        tr.fit()
        model.cpu()
        info.update(reg_iters=tr.step, bn_scale_after=_bn_scale(model, bns), reg_updates=hook.updates)
    model.eval()
    pruner.step()
    return model, info


def run_greg(method: str, model: nn.Module, x: torch.Tensor, target: float, s: Settings, loader, seed: int):
    cfg = dataclasses.replace(GRegConfig.scaled(s.reg_iters, method), lr_prune=s.reg_lr)
    reg = rp_regularizer(model, x, method, target_macs=target, config=cfg)
    tcfg = _train_config(s, seed, max_steps=cfg.planned_iters(method)["total"], lr=s.reg_lr)
    tr = E.Trainer(model, loader, None, tcfg, phase="regularize", hooks=[reg])
    tr.fit()
    model.cpu()
    st = reg.status()
    ratios = [v for v in st.get("mag_ratio", {}).values() if v is not None]
    info = {"reg_iters": tr.step, "greg_phase": st["phase"], "stop_reason": st.get("stop_reason"),
            "min_mag_ratio": min(ratios) if ratios else None}
    return reg.prune(), info


def run_spm(model: nn.Module, x: torch.Tensor, target: float, s: Settings, loader, seed: int):
    gates = insert_gates(model, x)
    st = spm_settings(gates.graph.total_macs, 1.0, {"search_epochs": 1.0})
    reg = SPMRegularizer(gates, target, alpha_nuc=st["alpha_nuc"], alpha_mac=st["alpha_mac"], nuc_every=st["nuc_every"],
                         mac_grad_inputs=st["mac_grad_inputs"], mac_norm=st["mac_norm"], gate_lr_scale=st["gate_lr_scale"])
    tcfg = _train_config(s, seed, max_steps=s.reg_iters, lr=s.reg_lr)
    tr = E.Trainer(model, loader, None, tcfg, phase="search", hooks=[reg], extra_param_groups=reg.param_groups())
    tr.fit()
    model.cpu()  # before freezing: the fixed masks are made on the weights' device
    before, after = snap_to_budget(reg)
    reg.freeze()
    info = {"reg_iters": tr.step, "search_macs_fraction": before, "snapped_macs_fraction": after,
            "spm_settings": {k: v for k, v in st.items() if k != "search_epochs"}}
    return reconfigure(model, reg, x), info


def run_one(s: Settings, bundle, base_file: Path, target: float, seed: int, method: str) -> dict[str, Any]:
    """Prune a fresh copy of the base with `method` to `target`, fine-tune it, evaluate it."""
    model, _ = load_model(base_file)
    x = example_input()
    dense_macs, dense_params = count_macs(model, x), count_params(model)
    E.seed_everything(seed)
    train_loader, test_loader = make_loaders(bundle, s.batch_size, workers=s.workers, seed=seed)
    t0 = time.perf_counter()
    if method in ("l1", "l1_group"):
        criterion = "group" if method == "l1_group" else "filter"
        pruned, info = rp_prune(model, x, target_macs=target, criterion=criterion, inplace=True).model, {"reg_iters": 0}
    elif method in ("greg1", "greg2"):
        pruned, info = run_greg(method, model, x, target, s, train_loader, seed)
    elif method == "spm":
        pruned, info = run_spm(model, x, target, s, train_loader, seed)
    else:
        pruned, info = run_tp(method, model, x, target, s, train_loader, seed)
    t_prune = time.perf_counter() - t0
    pruned.cpu()
    macs, params = count_macs(pruned, x), count_params(pruned)
    before = _evaluate(pruned, test_loader, s.device)["top1"]
    cfg = _train_config(s, seed, epochs=s.ft_epochs, lr=s.ft_lr, lr_schedule=s.ft_schedule)
    tr = E.Trainer(pruned, train_loader, test_loader, cfg, phase="finetune")
    t1 = time.perf_counter()
    tr.fit()
    t_ft = time.perf_counter() - t1
    final = _evaluate(pruned, test_loader, s.device)
    scope = "all groups" if method == "spm" or (method in TP_METHODS and s.tp_scope == "all") else "block-internal"
    return {"target": target, "method": method, "seed": seed, "scope": scope, "top1": final["top1"],
            "before_ft_top1": before, "ft_curve": [c["test_top1"] for c in _epoch_curve(tr, 0)],
            "macs": macs, "macs_fraction": macs / dense_macs, "macs_gap": macs / dense_macs / target - 1.0,
            "params": params, "params_fraction": params / dense_params, "ft_epochs": s.ft_epochs,
            "prune_phase_s": t_prune, "ft_s": t_ft, **info}


# ---------------------------------------------------------------------------------------------- summary
def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[float, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["method"]), []).append(r)
    out = []
    for (target, method), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], METHODS.index(kv[0][1]))):
        rs = sorted(rs, key=lambda r: r["seed"])
        m, sd = mean_std([r["top1"] for r in rs])
        bm, bsd = mean_std([r["before_ft_top1"] for r in rs])
        out.append({"target": target, "method": method, "scope": rs[0]["scope"], "n_seeds": len(rs),
                    "top1_mean": m, "top1_std": sd, "top1_seeds": [r["top1"] for r in rs],
                    "before_ft_mean": bm, "before_ft_std": bsd,
                    "macs_fraction": statistics.fmean(r["macs_fraction"] for r in rs),
                    "macs_gap_max": max(abs(r["macs_gap"]) for r in rs),
                    "mmacs": statistics.fmean(r["macs"] for r in rs) / 1e6,
                    "params_m": statistics.fmean(r["params"] for r in rs) / 1e6,
                    "reg_iters": statistics.fmean(r["reg_iters"] for r in rs)})
    return out


def compare(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of methods at each target: difference of means against the seed spread (std a + std b)."""
    out = []
    by_target: dict[float, list[dict]] = {}
    for g in summary:
        by_target.setdefault(g["target"], []).append(g)
    for target, gs in by_target.items():
        for a, b in itertools.combinations(gs, 2):
            diff = a["top1_mean"] - b["top1_mean"]
            spread = a["top1_std"] + b["top1_std"]
            enough = min(a["n_seeds"], b["n_seeds"]) >= 2
            out.append({"target": target, "a": a["method"], "b": b["method"], "diff": diff, "spread": spread,
                        "exceeds_spread": bool(enough and abs(diff) > spread), "n_seeds": min(a["n_seeds"], b["n_seeds"])})
    return out


def plot(path: Path, summary: list[dict[str, Any]], base: dict[str, Any]) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = itertools.cycle("os^vD<>pP*")
    for method in METHODS:
        gs = sorted((g for g in summary if g["method"] == method), key=lambda g: g["macs_fraction"])
        if not gs:
            continue
        style = "-" if not method.startswith("tp_") else "--"
        ax.errorbar([100 * g["macs_fraction"] for g in gs], [g["top1_mean"] for g in gs], yerr=[g["top1_std"] for g in gs],
                    label=method, marker=next(markers), linestyle=style, capsize=3)
    ax.axhline(base["top1"], color="gray", linestyle=":", label=f"dense base ({base['top1']:.2f})")
    ax.plot([100.0], [base["top1"]], marker="*", color="black", markersize=10, linestyle="none")
    ax.set_xscale("log")
    ticks = sorted({100.0} | {100 * g["target"] for g in summary})  # the targets; points sit at the achieved MACs
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("MACs kept (% of dense, log scale)")
    ax.set_ylabel("test top-1 after fine-tuning (%), mean ± std over seeds")
    ax.set_title("ResNet-20 / Fashion-MNIST: regprune (solid) vs Torch-Pruning (dashed)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(res: dict[str, Any]) -> str:
    s, base = res["settings"], res["base"]
    lines = [f"# Peers at the same MACs: ResNet-20 on Fashion-MNIST ({s['scale']} scale)", ""]
    if not res.get("complete", True):
        lines += [f"**Partial: {res['jobs_done']} of {res['jobs_expected']} jobs finished; the `seeds` column shows "
                  "how many each mean covers.**", ""]
    hw = res.get("hardware", {})
    lines += [f"Hardware: {hw.get('gpu') or hw.get('processor') or 'unknown'}; torch {hw.get('torch', '?')}, "
              f"Torch-Pruning {res.get('torch_pruning', '?')}.", ""]
    if s["scale"] == "smoke":
        lines += ["**Smoke scale: a few iterations on a hundred images. It checks that every path runs; its "
                  "accuracies say nothing about the methods.**", ""]
    lines += [f"Data: {res['data']['train']} training / {res['data']['test']} test images. Base: "
              f"{base['epochs']} epoch(s) ({base['stopped_because']}; plateaued: {base['plateaued']}), test top-1 "
              f"{base['top1']:.2f}, {base['macs'] / 1e6:.2f} MMACs, {base['params'] / 1e6:.3f} M params.", "",
              f"Every method: {s['reg_iters']} iterations of regularization / sparse training / gate search at lr "
              f"{s['reg_lr']:g} (none for l1 and tp_magnitude; GReg may stop earlier by its magnitude-ratio rule), "
              f"then the same fine-tuning: {s['ft_epochs']:g} epochs, lr {s['ft_lr']:g} {s['ft_schedule']}, batch "
              f"{s['batch_size']}. {s['seeds']} seed(s) (data order and augmentation of every phase after the base). "
              f"Torch-Pruning scope: {s['tp_scope']}.", ""]
    rows = []
    cmp = {(c["target"], c["a"], c["b"]): c for c in res["comparisons"]}
    for g in res["summary"]:
        ref = cmp.get((g["target"], REFERENCE, g["method"])) or cmp.get((g["target"], g["method"], REFERENCE))
        vs = ""
        if ref is not None:
            d = g["top1_mean"] - next(x["top1_mean"] for x in res["summary"] if x["target"] == g["target"] and x["method"] == REFERENCE)
            vs = f"{d:+.2f}" + (" *" if ref["exceeds_spread"] else "")
        rows.append({"target": f"{1 / g['target']:g}x", "method": g["method"], "scope": g["scope"],
                     "top-1": fmt_pm(g["top1_mean"], g["top1_std"]),
                     "seeds": " ".join(f"{v:.2f}" for v in g["top1_seeds"]),
                     "before FT": fmt_pm(g["before_ft_mean"], g["before_ft_std"]),
                     "MACs kept": f"{100 * g['macs_fraction']:.1f}%", "MMACs": f"{g['mmacs']:.2f}",
                     "params (M)": f"{g['params_m']:.3f}", "extra iters": f"{g['reg_iters']:.0f}",
                     f"vs {REFERENCE}": vs})
    lines += [format_table(rows, list(rows[0])) if rows else "(no results)", "",
              f"`vs {REFERENCE}`: difference of mean top-1 from regprune's one-shot L1 at the same target; `*` marks "
              "a difference larger than the seed spread (std a + std b). With 3 seeds this is a rough screen, not a "
              "significance test; with 1 seed nothing can be marked. `MACs kept` is the achieved fraction "
              "(regprune's counter, conv + linear).", ""]
    beyond = [c for c in res["comparisons"] if c["exceeds_spread"]]
    lines += ["## Differences larger than the seed spread (all pairs)", ""]
    if beyond:
        lines += [f"- {1 / c['target']:g}x: {c['a']} vs {c['b']}: {c['diff']:+.2f} (spread {c['spread']:.2f})" for c in beyond]
    else:
        lines += ["None: at this scale no pair of methods differs by more than the spread of its seeds."]
    lines += ["", f"Largest |achieved/target - 1| of MACs over all jobs: {100 * res['macs_gap_max']:.2f}%.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plan
def estimate(s: Settings, n_train: int, n_test: int) -> dict[str, float]:
    """Rough wall time from measured dense training/eval throughput (pruned models are faster: an upper bound)."""
    shape = (1, 28, 28)
    dev = "cuda" if s.device == "cuda" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    train_ips = common.train_throughput(create_model(s.model, 10, 1), s.batch_size, shape, steps=3, device=dev)
    eval_ips = common.eval_throughput(create_model(s.model, 10, 1), 256, shape, device=dev)
    base_epochs = s.base_epochs + s.base_max_cycles * s.base_cycle_epochs
    jobs = len(s.targets) * s.seeds * len(s.methods)
    with_reg = len(s.targets) * s.seeds * sum(m not in ("l1", "l1_group", "tp_magnitude") for m in s.methods)
    train_imgs = base_epochs * n_train + jobs * s.ft_epochs * n_train + with_reg * s.reg_iters * s.batch_size
    eval_imgs = (base_epochs + jobs * (math.ceil(s.ft_epochs) + 2)) * n_test
    return {"train_img_s": train_ips, "eval_img_s": eval_ips, "jobs": jobs,
            "hours_upper": (train_imgs / train_ips + eval_imgs / eval_ips) / 3600}


# ---------------------------------------------------------------------------------------------- jobs
def _read_rows(done_f: Path, key: str) -> list[dict[str, Any]]:
    rows = []
    if done_f.exists():
        for line in done_f.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec.get("key") == key:
                    rows.append(rec["row"])
    return rows


def _append_row(done_f: Path, key: str, row: dict[str, Any]) -> None:
    """One JSON line per finished job; workers append to the same file under an exclusive lock."""
    import fcntl

    line = json.dumps(E.log.to_jsonable({"key": key, "row": row})) + "\n"
    with open(done_f, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.write(line)
            fh.flush()
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _likely_seconds(method: str, rows: list[dict[str, Any]]) -> float:
    """How long a job of `method` will take: the slowest finished one of that method, else of any (0 if none)."""
    same = [r["wall_s"] for r in rows if r["method"] == method and "wall_s" in r]
    any_ = [r["wall_s"] for r in rows if "wall_s" in r]
    return max(same) if same else (max(any_) if any_ else 0.0)


def run_jobs(s: Settings, bundle, base_file: Path, jobs: list[tuple[float, int, str]], done_f: Path, key: str,
             deadline: float | None) -> int:
    """Run `jobs` one after another, appending each result; skip those that would likely end after `deadline`."""
    ran = 0
    for target, seed, method in jobs:
        if deadline is not None and time.time() + _likely_seconds(method, _read_rows(done_f, key)) > deadline:
            log(f"{1 / target:g}x seed {seed} {method}: not started (time budget)")
            continue
        t0 = time.perf_counter()
        row = run_one(s, bundle, base_file, target, seed, method)
        row["wall_s"] = time.perf_counter() - t0
        _append_row(done_f, key, row)
        ran += 1
        log(f"{1 / target:g}x seed {seed} {method:13s}: top-1 {row['top1']:.2f} (before FT {row['before_ft_top1']:.2f}), "
            f"MACs {100 * row['macs_fraction']:.1f}% (gap {100 * row['macs_gap']:+.2f}%), "
            f"extra iters {row['reg_iters']}, {row['wall_s']:.0f} s")
    return ran


def _spawn_workers(argv: list[str], n: int, deadline: float | None) -> None:
    """Run this script `n` times with --_shard k/n (same arguments otherwise) and wait for all of them."""
    import subprocess

    procs = []
    for k in range(n):
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--_shard", f"{k}/{n}", "--threads", "1"]
        if deadline is not None:
            cmd += ["--_deadline", repr(deadline)]
        procs.append(subprocess.Popen(cmd))
    codes = [p.wait() for p in procs]
    if any(codes):
        log(f"worker exit codes {codes}: the summary covers the jobs that finished")


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    s = make_settings(args)
    t_start = time.perf_counter()
    if args.jobs < 1:
        raise UserError("--jobs must be >= 1")
    deadline = args._deadline if args._deadline is not None else (
        time.time() + args.time_budget if args.time_budget is not None else None)
    if s.threads == 0:
        s.threads, _ = common.choose_threads(lambda: create_model(s.model, 10, 1), s.batch_size, (1, 28, 28))
    torch.set_num_threads(s.threads)
    bundle = load_data(args.data, limit_train=s.limit_train, limit_test=s.limit_test)
    n_train, n_test = len(bundle.train), len(bundle.test)
    work = args.work_dir or HERE / "work" / f"peers_{s.scale}"
    # the estimate measures throughput for a few seconds: not worth it at smoke scale or in a worker
    est = estimate(s, n_train, n_test) if (args.dry_run or (s.scale != "smoke" and not args._shard)) else None
    if not args._shard:
        log(f"peers {s.scale}: {n_train}/{n_test} images, targets {s.targets}, {s.seeds} seed(s), methods "
            f"{', '.join(s.methods)}" + (f"; {est['jobs']} jobs, estimated <= {est['hours_upper']:.2f} h at "
                                         f"{est['train_img_s']:.0f} train img/s ({s.threads} thread(s), one process)"
                                         if est else ""))
    if args.dry_run:
        return {"settings": dataclasses.asdict(s), "estimate": est}
    work.mkdir(parents=True, exist_ok=True)
    base_file, base = train_base(s, bundle, work)
    done_f = work / "results.jsonl"
    key = json.dumps({k: v for k, v in dataclasses.asdict(s).items()
                      if k not in ("seeds", "targets", "methods", "threads", "workers")}, sort_keys=True)
    if args.fresh and done_f.exists() and not args._shard:
        done_f.unlink()
    have = {(r["target"], r["method"], r["seed"]) for r in _read_rows(done_f, key)}
    # seed-major order: a run cut short by its time budget still covers every target and method at seed 0
    pending = [(t, k, m) for k in range(s.seeds) for t in s.targets for m in s.methods if (t, m, k) not in have]
    if args._shard:
        i, n = (int(v) for v in args._shard.split("/"))
        run_jobs(s, bundle, base_file, pending[i::n], done_f, key, deadline)
        return {}
    if args.jobs > 1 and len(pending) > 1:
        log(f"{len(pending)} job(s) pending, {min(args.jobs, len(pending))} worker process(es)")
        worker_argv = [a for a in argv if a != "--fresh"]
        _spawn_workers(worker_argv, min(args.jobs, len(pending)), deadline)
    else:
        run_jobs(s, bundle, base_file, pending, done_f, key, deadline)
    rows = [r for r in _read_rows(done_f, key)
            if r["target"] in s.targets and r["method"] in s.methods and r["seed"] < s.seeds]
    expected = len(s.targets) * len(s.methods) * s.seeds
    summary = summarize(rows)
    res: dict[str, Any] = {
        "benchmark": "peers", "scale": s.scale, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": dataclasses.asdict(s), "hardware": common.hardware_info(s.device),
        "data": {"name": bundle.name, "train": n_train, "test": n_test}, "estimate": est,
        "torch_pruning": getattr(tp, "__version__", "unknown"),
        "base": {k: v for k, v in base.items() if k != "key"}, "results": rows, "summary": summary,
        "jobs_done": len(rows), "jobs_expected": expected, "complete": len(rows) == expected,
        "comparisons": compare(summary), "macs_gap_max": max((abs(r["macs_gap"]) for r in rows), default=0.0),
        "work_dir": str(work)}
    res["wall_time_s"] = time.perf_counter() - t_start
    out = args.out_dir
    write_json(out / f"peers_{s.scale}.json", res)
    E.atomic_write_text(out / f"peers_{s.scale}.md", markdown(res) + "\n")
    plot(out / f"peers_{s.scale}.png", summary, base)
    log(f"wrote {out}/peers_{s.scale}.{{md,json,png}} ({len(rows)}/{expected} jobs) in {res['wall_time_s']:.0f} s")
    return json.loads(json.dumps(E.log.to_jsonable(res)))


if __name__ == "__main__":
    common.run_script(main)
