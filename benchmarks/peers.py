"""regprune's pruning methods against Torch-Pruning's pruners, on the same trained network at the same MACs.

One CIFAR-style ResNet-20 (1-channel stem; `width` channels in the first stage, 8 at the cpu scale) is trained
once on Fashion-MNIST. Then, for every MACs target (4x and 8x fewer by default: kept fractions 0.25 / 0.125)
and every seed, a copy of that base is pruned each way below and fine-tuned with the same settings:

  l1, l1_group     regprune one-shot L1 (`regprune.prune`), filter or whole-group criterion; no training before
                   removal, so their fine-tuning gets the regularization budget too (same total training)
  greg1, greg2     regprune GReg-1 / GReg-2 (`regprune.regularizer(iters=...)`: the library's budget-aware
                   schedule for this budget, lr and momentum), regularization then removal
  greg1_group,     Group-GReg: the same with penalty="group" (BN scale/shift and the consumers' input weights
  greg2_group      penalised with the filter) and criterion="group"
  tp_bnscale       Torch-Pruning BNScalePruner (network slimming): sparse training, then pruning
  tp_groupnorm     Torch-Pruning GroupNormPruner (DepGraph's group sparsity): sparse training, then pruning
  tp_growingreg    Torch-Pruning GrowingRegPruner (NOT the GReg paper's algorithm): sparse training, then pruning
  tp_magnitude,    optional: TP MagnitudePruner (no training before removal) and regprune SPM (gates searched on
  spm              the base, all groups); not in the default list

Fairness: every method that trains before removal gets `reg_iters` iterations at `reg_lr` (GReg may stop
earlier by its magnitude-ratio rule); every row then fine-tunes so that its total training is exactly
reg_iters + ft_iters iterations. Right after removal every model is evaluated twice, with the BatchNorm
statistics it carries and after `regprune.engine.recalibrate_bn` (the same number of training batches for
every row); fine-tuning starts from the recalibrated model. Accuracy is on the whole 10,000-image test set.
Torch-Pruning is driven as its recipe does (`update_regularizer()`, `regularize(model)` after every backward,
`update_reg()` for GrowingRegPruner, no weight decay while regularizing, its own coefficients), restricted by
default to regprune's groups and widths (`pruning_ratio_dict` from regprune's plan: identical architectures);
`--tp-scope all` gives TP its default scope with a bisected uniform ratio.

    python benchmarks/peers.py --scale smoke                    # seconds; what tests/test_peers.py runs
    python benchmarks/peers.py --scale cpu --jobs 2 --dry-run   # the plan and a time estimate
    python benchmarks/peers.py --scale cpu --jobs 2             # about an hour on 2 CPU cores
    python benchmarks/peers.py --scale gpu --jobs 12            # all 70,000 images, one GPU, 12 workers

Writes benchmarks/results/peers_<scale>.{md,json} and peers_<scale>.png (accuracy against MACs).
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402  (puts the repository root on sys.path)
from harness import fmt_pm, log  # noqa: E402

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
from regprune.methods.greg import GRegConfig  # noqa: E402
from regprune.models.cifar import CifarResNet  # noqa: E402
from regprune.ratios import make_plan  # noqa: E402
from regprune.surgery import load_model, save_model  # noqa: E402

__all__ = ["main", "Settings", "SCALES", "METHODS", "DEFAULT_METHODS", "TP_METHODS", "BENCH"]

HERE = Path(__file__).resolve().parent
DATA = "fashion-mnist"
GREG_METHODS = ("greg1", "greg2", "greg1_group", "greg2_group")
SPARSE_TP = ("tp_bnscale", "tp_groupnorm", "tp_growingreg")
DEFAULT_METHODS = ("l1", "l1_group", *GREG_METHODS, *SPARSE_TP)
METHODS = (*DEFAULT_METHODS, "tp_magnitude", "spm")
TP_METHODS = tuple(m for m in METHODS if m.startswith("tp_"))
TRAINS_BEFORE_REMOVAL = (*GREG_METHODS, *SPARSE_TP, "spm")
REFERENCE = "l1"  # what every method is compared against in the table's last column
INPUT_SHAPE = (1, 28, 28)


@dataclass
class Settings(H.BaseSettings):
    model: str = "resnet20"
    width: int = 16             # first-stage channels of the CIFAR ResNet (16: the papers' network)
    base_epochs: float = 1      # first cosine cycle of the base
    base_lr: float = 0.1
    base_cycle_epochs: float = 1  # further cosine cycles while the test accuracy still rises
    base_cycle_lr: float = 0.01
    base_max_cycles: int = 0
    plateau_tol: float = 0.3    # a cycle raising the best test top-1 by less than this (points) ends training
    reg_iters: int = 1000       # every method that trains before removal gets these iterations
    reg_lr: float = 0.01        # constant lr of every regularization / sparse-training / search phase
    ft_iters: int = 1000        # fine-tuning after removal; rows without reg. get reg_iters more
    ft_lr: float = 0.01
    ft_schedule: str = "cosine"
    recal_batches: int = 50     # training batches re-estimating BN statistics right after removal
    ft_without_recal: bool = False  # also fine-tune the non-recalibrated copy (doubles fine-tuning)
    targets: list[float] = field(default_factory=lambda: [0.25, 0.125])
    tp_reg: float = 5e-4        # TP's benchmark recipe (benchmarks/main.py --reg)
    tp_delta_reg: float = 1e-4  # TP's recipe for GrowingRegPruner (--delta_reg)
    tp_reg_updates: int = 10    # GrowingRegPruner.update_reg() calls spread over the sparse phase
    tp_scope: str = "regprune"
    data: str = DATA            # dataset spec (fashion-mnist:PATH for IDX files elsewhere)


SCALES: dict[str, Settings] = {
    # seconds: checks that every path runs and writes finite numbers; the numbers mean nothing
    "smoke": Settings(scale="smoke", width=8, limit_train=64, limit_test=48, batch_size=16, base_epochs=1,
                      base_lr=0.05, reg_iters=10, reg_lr=0.01, ft_iters=3, recal_batches=2, seeds=1,
                      targets=[0.5, 0.125], methods=list(DEFAULT_METHODS)),
    # 2-core CPU, --jobs 2, about an hour (see --dry-run): the full test set, a 20,000-image training subset,
    # ResNet-20 at width 8, batch 32
    "cpu": Settings(scale="cpu", width=8, limit_train=20000, limit_test=None, batch_size=32, base_epochs=12,
                    base_lr=0.1, base_cycle_epochs=3, base_cycle_lr=0.01, base_max_cycles=2, reg_iters=1000,
                    reg_lr=0.01, ft_iters=1000, recal_batches=50, seeds=3, methods=list(DEFAULT_METHODS)),
    # all 70,000 images on one GPU, the papers' width, 2x to 8x, with --jobs 12
    "gpu": Settings(scale="gpu", width=16, limit_train=None, limit_test=None, batch_size=128, base_epochs=30,
                    base_lr=0.1, base_cycle_epochs=5, base_cycle_lr=0.01, base_max_cycles=4, plateau_tol=0.1,
                    reg_iters=5000, reg_lr=0.01, ft_iters=5000, recal_batches=100, seeds=3,
                    targets=[0.5, 0.25, 0.125], methods=list(DEFAULT_METHODS), device="cuda", amp=True, workers=2),
}


def add_args(ap) -> None:
    ap.add_argument("--targets", type=float, nargs="+", help="kept MACs fractions (default 0.25 0.125)")
    ap.add_argument("--reg-iters", type=int)
    ap.add_argument("--ft-iters", type=int)
    ap.add_argument("--base-epochs", type=float)
    ap.add_argument("--width", type=int, help="first-stage channels of the ResNet (16: the papers')")
    ap.add_argument("--tp-scope", choices=["regprune", "all"])
    ap.add_argument("--tp-reg", type=float)
    ap.add_argument("--ft-without-recal", action="store_true", default=None,
                    help="also fine-tune the copy without BN recalibration")
    ap.add_argument("--data", help="dataset spec (default fashion-mnist: the Debian package's folder)")


def check(s: Settings) -> None:
    if s.reg_iters < 1 or s.ft_iters < 0:
        raise UserError("--reg-iters must be >= 1 and --ft-iters >= 0")
    if any(not 0 < t <= 1 for t in s.targets):
        raise UserError("--targets are kept MACs fractions in (0, 1]")


def dense_model(s: Settings) -> nn.Module:
    depth = int(s.model.removeprefix("resnet"))
    return CifarResNet(depth, num_classes=10, in_channels=1, option="A", width=s.width)


def example_input() -> torch.Tensor:
    return torch.zeros(1, *INPUT_SHAPE)


# ---------------------------------------------------------------------------------------------- context
def prepare(s: Settings, work: Path) -> dict[str, Any]:
    """Data and the one base (trained here the first time; every worker then reuses the file)."""
    check(s)
    bundle = load_data(s.data, limit_train=s.limit_train, limit_test=s.limit_test)
    key = {k: getattr(s, k) for k in ("model", "width", "limit_train", "limit_test", "batch_size", "base_epochs",
                                      "base_lr", "base_cycle_epochs", "base_cycle_lr", "base_max_cycles", "plateau_tol")}
    f, meta = H.train_base(s, lambda: dense_model(s), bundle, work, save_model, key)
    m, _ = load_model(f, model=dense_model(s))
    meta = {**meta, "macs": count_macs(m, example_input()), "params": count_params(m)}
    return {"bundle": bundle, "base_file": f, "base": meta}


# ---------------------------------------------------------------------------------------------- Torch-Pruning
class TPSparseHook:
    """Torch-Pruning's sparse-training calls inside regprune's Trainer: regularize() after every backward, and
    for GrowingRegPruner update_reg() every `update_every` steps."""

    def __init__(self, pruner, model: nn.Module, update_every: int) -> None:
        self.pruner, self.model, self.update_every, self.updates = pruner, model, max(1, update_every), 0

    def after_backward(self, trainer) -> None:
        self.pruner.regularize(self.model)

    def on_step_end(self, trainer) -> None:
        if isinstance(self.pruner, tp.pruner.GrowingRegPruner) and trainer.step % self.update_every == 0:
            self.pruner.update_reg()
            self.updates += 1


def _bn_scale(model: nn.Module, names: set[str]) -> float:
    vals = [m.weight.detach().abs().mean().item() for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and n in names]
    return statistics.fmean(vals) if vals else float("nan")


def tp_ratios(model: nn.Module, x: torch.Tensor, target: float, s: Settings) -> tuple[dict, float, list]:
    """(pruning_ratio_dict, pruning_ratio, ignored_layers) that bring Torch-Pruning to `target` MACs.

    Scope "regprune": the per-group channel counts of regprune's plan, as `pruning_ratio_dict` (identical
    widths). Scope "all": TP's default scope with one uniform ratio found by bisection on copies. This is
    Torch-Pruning's ratio API driven to a MACs target, not a regprune solver.
    """
    if s.tp_scope == "regprune":
        graph = analyze(model, x)
        plan = make_plan(graph, target_macs=target)
        roots = set(plan.removal)
        scope_bns = {m.name for r in roots for m in graph.groups[r].members if "BatchNorm" in m.kind}
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
        lo, hi = (mid, hi) if macs_at(mid) > target else (lo, mid)
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
        cfg = H.train_config(s, seed, max_steps=s.reg_iters, lr=s.reg_lr, weight_decay=0.0)
        tr = E.Trainer(model, loader, None, cfg, phase="sparse", hooks=[hook])
        tr.fit()
        model.cpu()
        info.update(reg_iters=tr.step, bn_scale_after=_bn_scale(model, bns), reg_updates=hook.updates)
    model.eval()
    pruner.step()
    return model, info


# ---------------------------------------------------------------------------------------------- regprune
def greg_kwargs(method: str, s: Settings) -> tuple[str, dict[str, Any]]:
    """The library method and the config overrides for one of GREG_METHODS (the library's own schedule)."""
    group = method.endswith("_group")
    kw = dict(lr=s.reg_lr, lr_prune=s.reg_lr, momentum=s.momentum,
              penalty="group" if group else "filter", criterion="group" if group else "filter")
    return method.removesuffix("_group"), kw


def run_greg(method: str, model: nn.Module, x: torch.Tensor, target: float, s: Settings, loader, seed: int):
    lib, kw = greg_kwargs(method, s)
    predicted = GRegConfig.scaled(s.reg_iters, lib, **kw).predict(lib)
    reg = rp_regularizer(model, x, lib, target_macs=target, iters=s.reg_iters, **kw)
    tcfg = H.train_config(s, seed, max_steps=s.reg_iters, lr=s.reg_lr)
    tr = E.Trainer(model, loader, None, tcfg, phase="regularize", hooks=[reg])
    tr.fit()
    model.cpu()
    st = reg.status()
    ratios = [v for v in (st.get("mag_ratio") or {}).values() if v is not None]
    overlaps = [v for v in (st.get("overlap_l1") or {}).values() if v is not None]
    info = {"reg_iters": tr.step, "greg_phase": st.get("phase"), "stop_reason": st.get("stop_reason"),
            "mag_ratio": st.get("mag_ratio"), "min_mag_ratio": min(ratios) if ratios else None,
            "median_mag_ratio": statistics.median(ratios) if ratios else None,
            "overlap_l1": statistics.fmean(overlaps) if overlaps else None,
            "overlap_l1_layers": st.get("overlap_l1"),
            "predicted_ratio": predicted.get("predicted_ratio"), "predicted_reaches": predicted.get("reaches"),
            "predicted_decay": predicted.get("integrated_decay"), "schedule_warning": predicted.get("warning")}
    return reg.prune(), info


def run_spm(model: nn.Module, x: torch.Tensor, target: float, s: Settings, loader, seed: int):
    from regprune.methods.spm import SPMRegularizer, insert_gates
    from regprune.reconfigure import reconfigure
    from regprune.scratch import snap_to_budget, spm_settings

    gates = insert_gates(model, x)
    st = spm_settings(gates.graph.total_macs, 1.0, {"search_epochs": 1.0})
    reg = SPMRegularizer(gates, target, alpha_nuc=st["alpha_nuc"], alpha_mac=st["alpha_mac"], nuc_every=st["nuc_every"],
                         mac_grad_inputs=st["mac_grad_inputs"], mac_norm=st["mac_norm"], gate_lr_scale=st["gate_lr_scale"])
    tcfg = H.train_config(s, seed, max_steps=s.reg_iters, lr=s.reg_lr)
    tr = E.Trainer(model, loader, None, tcfg, phase="search", hooks=[reg], extra_param_groups=reg.param_groups())
    tr.fit()
    model.cpu()  # before freezing: the fixed masks are made on the weights' device
    before, after = snap_to_budget(reg)
    reg.freeze()
    info = {"reg_iters": tr.step, "search_macs_fraction": before, "snapped_macs_fraction": after}
    return reconfigure(model, reg, x), info


# ---------------------------------------------------------------------------------------------- one job
def jobs(s: Settings) -> list[dict[str, Any]]:
    check(s)
    # seed-major: a run cut short by its time budget still covers every target and method at seed 0
    return [{"target": t, "method": m, "seed": k} for k in range(s.seeds) for t in s.targets for m in s.methods]


def _finetune(s: Settings, model: nn.Module, loader, seed: int, iters: int) -> int:
    if iters <= 0:
        return 0
    cfg = H.train_config(s, seed, max_steps=iters, lr=s.ft_lr, lr_schedule=s.ft_schedule)
    tr = E.Trainer(model, loader, None, cfg, phase="finetune")
    tr.fit()
    model.cpu()
    return tr.step


def run_one(s: Settings, ctx: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Prune a fresh copy of the base with `method` to `target`; evaluate right after removal without and with
    BN recalibration; fine-tune the recalibrated model to the common total of training; evaluate."""
    target, method, seed = job["target"], job["method"], job["seed"]
    model, _ = load_model(ctx["base_file"], model=dense_model(s))
    x = example_input()
    dense_macs, dense_params = count_macs(model, x), count_params(model)
    E.seed_everything(seed)
    train_loader, test_loader = make_loaders(ctx["bundle"], s.batch_size, workers=s.workers, seed=seed)
    t0 = time.perf_counter()
    if method in ("l1", "l1_group"):
        crit = "group" if method == "l1_group" else "filter"
        pruned, info = rp_prune(model, x, target_macs=target, criterion=crit, inplace=True).model, {"reg_iters": 0}
    elif method in GREG_METHODS:
        pruned, info = run_greg(method, model, x, target, s, train_loader, seed)
    elif method == "spm":
        pruned, info = run_spm(model, x, target, s, train_loader, seed)
    else:
        pruned, info = run_tp(method, model, x, target, s, train_loader, seed)
    t_prune = time.perf_counter() - t0
    pruned.cpu()
    macs, params = count_macs(pruned, x), count_params(pruned)
    plain = copy.deepcopy(pruned) if s.ft_without_recal else None
    removal = H.evaluate(pruned, test_loader, s.device)["top1"]
    used = E.recalibrate_bn(pruned, train_loader, batches=s.recal_batches, device=E.resolve_device(s.device))
    pruned.cpu()
    removal_recal = H.evaluate(pruned, test_loader, s.device)["top1"]
    ft_iters = s.reg_iters + s.ft_iters - info["reg_iters"]  # the same total training for every row
    t1 = time.perf_counter()
    done = _finetune(s, pruned, train_loader, seed, ft_iters)
    t_ft = time.perf_counter() - t1
    row = {"top1": H.evaluate(pruned, test_loader, s.device)["top1"], "removal_top1": removal,
           "removal_recal_top1": removal_recal, "recal_batches": used, "ft_iters": done,
           "total_iters": info["reg_iters"] + done, "macs": macs, "macs_fraction": macs / dense_macs,
           "macs_gap": macs / dense_macs / target - 1.0, "params": params, "params_fraction": params / dense_params,
           "scope": "all groups" if method == "spm" or (method in TP_METHODS and s.tp_scope == "all")
           else "block-internal", "prune_phase_s": t_prune, "ft_s": t_ft, **info}
    if plain is not None:
        _finetune(s, plain, train_loader, seed, ft_iters)
        row["top1_without_recal"] = H.evaluate(plain, test_loader, s.device)["top1"]
    return row


# ---------------------------------------------------------------------------------------------- plan
def estimate(s: Settings, args) -> dict[str, Any]:
    """Wall time from measured throughput of one process: the dense network (base, training before removal) and
    the L1-pruned network at each target (fine-tuning, evaluation), times TRAINER_OVERHEAD for what the Trainer,
    the data pipeline and the hooks add to a bare step, plus JOB_FIXED_S per job (TP's graph, loaders)."""
    n_train = s.limit_train or 60000
    n_test = s.limit_test or 10000
    torch.set_num_threads(max(1, s.threads))
    dense = H.throughput(lambda: dense_model(s), s.batch_size, INPUT_SHAPE, s.device)
    pruned = {t: H.throughput(lambda: rp_prune(dense_model(s), example_input(), target_macs=t).model, s.batch_size,
                              INPUT_SHAPE, s.device) for t in s.targets}
    workers = min(args.jobs, len(jobs(s)))
    d_train, d_eval = dense["train_img_s"] / TRAINER_OVERHEAD, dense["eval_img_s"]
    base_epochs = s.base_epochs + s.base_max_cycles * s.base_cycle_epochs
    base_s = base_epochs * (n_train / d_train + n_test / d_eval)
    jobs_s = 0.0
    for j in jobs(s):
        p_train, p_eval = pruned[j["target"]]["train_img_s"] / TRAINER_OVERHEAD, pruned[j["target"]]["eval_img_s"]
        reg = s.reg_iters if j["method"] in TRAINS_BEFORE_REMOVAL else 0
        ft = s.reg_iters + s.ft_iters - reg
        jobs_s += (JOB_FIXED_S + reg * s.batch_size / d_train + (ft + s.recal_batches) * s.batch_size / p_train
                   + 3 * n_test / p_eval)
        if s.ft_without_recal:
            jobs_s += ft * s.batch_size / p_train + n_test / p_eval
    n_jobs = len(jobs(s))
    jobs_s /= workers
    total = base_s + jobs_s
    return {"dense": dense, "pruned": {str(t): v for t, v in pruned.items()}, "trainer_overhead": TRAINER_OVERHEAD,
            "jobs": n_jobs, "workers": workers, "base_min": base_s / 60, "jobs_min": jobs_s / 60,
            "total_min": total / 60,
            "summary": f"estimated {total / 60:.0f} min ({base_s / 60:.0f} base + {jobs_s / 60:.0f} for {n_jobs} jobs on "
                       f"{workers} worker(s)) at {dense['train_img_s']:.0f} dense train img/s and "
                       f"{dense['eval_img_s']:.0f} eval img/s per process, measured now; other load on the machine "
                       "slows it"}


TRAINER_OVERHEAD = 1.15  # bare train_throughput / the Trainer's steps with loaders, augmentation and hooks
JOB_FIXED_S = 6.0        # per job: model load, graph analysis, TP pruner construction, BN recalibration


# ---------------------------------------------------------------------------------------------- report
METRICS = ("top1", "removal_top1", "removal_recal_top1", "top1_without_recal", "macs_fraction", "macs", "params",
           "reg_iters", "ft_iters", "total_iters", "min_mag_ratio", "median_mag_ratio", "overlap_l1",
           "predicted_ratio")


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = H.summarize(rows, ("target", "method"), METRICS, order=lambda k: (-k[0], METHODS.index(k[1])))
    for g in out:
        rs = [r for r in rows if r["target"] == g["target"] and r["method"] == g["method"]]
        g["scope"] = rs[0]["scope"]
        g["macs_gap_max"] = max(abs(r["macs_gap"]) for r in rs)
        g["mag_ratio_goal_met"] = all((r.get("min_mag_ratio") or 0) >= 1000 for r in rs) if g["method"] in GREG_METHODS else None
        g["schedule_warnings"] = sorted({r["schedule_warning"] for r in rs if r.get("schedule_warning")})
    return out


def _pm(g: dict[str, Any], m: str) -> str:
    return "-" if g.get(f"{m}_mean") is None else fmt_pm(g[f"{m}_mean"], g[f"{m}_std"])


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _vs_ref(res: dict[str, Any], g: dict[str, Any], metric: str) -> str:
    c = next((c for c in res["comparisons"][metric] if c["target"] == g["target"]
              and {c["a"], c["b"]} == {REFERENCE, g["method"]} and c["a"] != c["b"]), None)
    if c is None:
        return ""
    d = c["diff"] if c["a"] == g["method"] else -c["diff"]
    return f"{d:+.2f}" + (" *" if c["exceeds_spread"] else "")


def markdown(res: dict[str, Any]) -> str:
    s, base = res["settings"], res["base"]
    lines = H.header_lines(res, "Peers at the same MACs: ResNet-20 on Fashion-MNIST")
    lines += [f"Data: {res['data']['train']} training / {res['data']['test']} test images"
              + (" (the whole test set)" if res["data"]["test"] == 10000 else " (NOT the whole test set)")
              + f". Network: ResNet-20, width {s['width']} ({base['macs'] / 1e6:.2f} MMACs, "
              f"{base['params'] / 1e6:.3f} M params). Base: {base['epochs']} epoch(s) ({base['stopped_because']}; "
              f"plateaued: {base['plateaued']}), test top-1 {base['top1']:.2f}. Torch-Pruning "
              f"{res.get('torch_pruning', '?')}, scope {s['tp_scope']}.", "",
              f"Training: every method that trains before removal gets {s['reg_iters']} iterations at lr "
              f"{s['reg_lr']:g} (GReg: the library's budget-aware schedule for this budget, lr and momentum; it may "
              f"stop earlier by its magnitude-ratio rule). Every row's fine-tuning brings its total to "
              f"{s['reg_iters'] + s['ft_iters']} iterations (lr {s['ft_lr']:g} {s['ft_schedule']}, batch "
              f"{s['batch_size']}): L1 and Group-L1 fine-tune for all of it. Right after removal every model's BN "
              f"statistics are re-estimated on {s['recal_batches']} training batches; fine-tuning starts from that "
              f"model. {s['seeds']} seed(s) (data order and augmentation of every phase after the base).", ""]
    rows = []
    for g in res["summary"]:
        rows.append({"target": f"{1 / g['target']:g}x", "method": g["method"], "seeds": g["n_seeds"],
                     "top-1 after FT": _pm(g, "top1"), f"vs {REFERENCE}": _vs_ref(res, g, "top1"),
                     "per seed": " ".join(f"{v:.2f}" for v in g["top1_values"]),
                     "removal (recal)": _pm(g, "removal_recal_top1"), "reg iters": f"{g['reg_iters_mean']:.0f}",
                     "total iters": f"{g['total_iters_mean']:.0f}",
                     "kept/pruned ratio (min)": _ratio(g["min_mag_ratio_mean"]),
                     "predicted ratio": _ratio(g["predicted_ratio_mean"]),
                     "overlap with L1": "-" if g["overlap_l1_mean"] is None else f"{100 * g['overlap_l1_mean']:.0f}%",
                     "MACs kept": f"{100 * g['macs_fraction_mean']:.1f}%"})
    lines += ["## Top-1 after fine-tuning (BN recalibrated at removal, every row alike)", "", H.table(rows), "",
              f"`vs {REFERENCE}`: difference of mean top-1 from one-shot L1 at the same target; `*` marks a difference "
              "larger than the seed spread (std a + std b), a rough screen, not a significance test. `kept/pruned "
              "ratio (min)`: the smallest per-layer ratio of kept to pruned filter magnitude GReg measured at removal "
              "(mean over seeds; the paper's rule aims at 1000); `predicted ratio`: what `GRegConfig.predict` expects "
              "of the schedule; `overlap with L1`: the fraction of GReg-2's picks equal to L1's.", ""]
    rows = []
    for g in res["summary"]:
        r = {"target": f"{1 / g['target']:g}x", "method": g["method"],
             "removal, no recal": _pm(g, "removal_top1"), f"vs {REFERENCE} (no recal)": _vs_ref(res, g, "removal_top1"),
             "removal, BN recal": _pm(g, "removal_recal_top1"),
             f"vs {REFERENCE} (recal)": _vs_ref(res, g, "removal_recal_top1")}
        if g.get("top1_without_recal_mean") is not None:
            r["after FT, no recal"] = _pm(g, "top1_without_recal")
        rows.append(r)
    lines += ["## Top-1 right after removal, without and with BN recalibration", "", H.table(rows), ""]
    lines += ["## What this run can and cannot say", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


def notes(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    s = res["settings"]
    for c in res["comparisons"]["top1"]:
        a_greg, b_greg = c["a"] in GREG_METHODS, c["b"] in GREG_METHODS
        if a_greg == b_greg or not ({c["a"], c["b"]} & set(SPARSE_TP) or {c["a"], c["b"]} & {"l1", "l1_group"}):
            continue
        out.append(f"{1 / c['target']:g}x, {c['a']} vs {c['b']}: {c['diff']:+.2f} points (spread {c['spread']:.2f}): "
                   f"{H.verdict(c)}" + ("; same sign on every seed." if c["paired_same_sign"] else "."))
    beyond = [c for c in res["comparisons"]["top1"] if c["exceeds_spread"]]
    if not beyond:
        out.append("No pair of methods differs by more than the spread of its seeds after fine-tuning: this run does "
                   "not rank them.")
    for g in res["summary"]:
        if g["mag_ratio_goal_met"] is False:
            out.append(f"{1 / g['target']:g}x {g['method']}: the goal of a kept/pruned magnitude ratio of 1000 in every "
                       f"layer was not met (smallest ratio {_ratio(g['min_mag_ratio_mean'])}, mean over seeds).")
        for w in g["schedule_warnings"]:
            out.append(f"{1 / g['target']:g}x {g['method']}: the library warns about this schedule: {w}")
    if res["macs_gap_max"] > 0.03:
        out.append(f"Achieved MACs miss their target by up to {100 * res['macs_gap_max']:.1f}%.")
    if not res["base"]["plateaued"]:
        out.append("The base's test accuracy had not plateaued by the 0.3-point rule when its training stopped.")
    if res["data"]["test"] < 10000:
        out.append("This run did not score on the whole 10,000-image test set.")
    if s["seeds"] < 3:
        out.append(f"Only {s['seeds']} seed(s): differences cannot be weighed against a spread.")
    return out


def report(r: dict[str, Any]) -> dict[str, Any]:
    s, ctx, rows = r["settings_obj"], r["ctx"], r["rows"]
    summary = summarize(rows)
    res: dict[str, Any] = {
        "benchmark": "peers", "scale": s.scale, "date": r["date"], "argv": r["argv"], "settings": r["settings"],
        "hardware": r["hardware"], "n_workers": r["n_workers"], "plan": r["plan"],
        "data": {"name": ctx["bundle"].name, "train": len(ctx["bundle"].train), "test": len(ctx["bundle"].test)},
        "torch_pruning": getattr(tp, "__version__", "unknown"),
        "base": {k: v for k, v in ctx["base"].items() if k != "key"}, "results": rows, "summary": summary,
        "jobs_done": r["jobs_done"], "jobs_expected": r["jobs_expected"], "complete": r["complete"],
        "comparisons": {m: H.compare(summary, rows, ("target",), m) for m in ("top1", "removal_top1", "removal_recal_top1")},
        "macs_gap_max": max((abs(x["macs_gap"]) for x in rows), default=0.0), "work_dir": str(r["work"]),
        "wall_time_s": r["wall_time_s"]}
    res["notes"] = notes(res)
    base = res["base"]

    def plot(out: Path) -> None:
        H.plot_series(out / f"peers_{s.scale}.png", summary, lambda g: 100 * g["macs_fraction_mean"], "top1", "method",
                      METHODS, f"ResNet-20 (width {s.width}) / Fashion-MNIST: regprune (solid) vs Torch-Pruning (dashed)",
                      "MACs kept (% of dense, log scale)", "test top-1 after fine-tuning (%), mean ± std over seeds",
                      hline=(base["top1"], f"dense base ({base['top1']:.2f})"), dashed=lambda m: m.startswith("tp_"))

    return H.write_outputs(res, r["args"].out_dir, f"peers_{s.scale}", markdown, [plot])


BENCH = H.Bench(name="peers", doc=__doc__, settings_cls=Settings, scales=SCALES, methods=METHODS,
                script=Path(__file__).resolve(), job_keys=("target", "method", "seed"), jobs=jobs, prepare=prepare,
                run_one=run_one, add_args=add_args,
                overrides=("targets", "reg_iters", "ft_iters", "base_epochs", "width", "tp_scope", "tp_reg",
                           "ft_without_recal", "data"),
                estimate=estimate, dense_model=dense_model, input_shape=INPUT_SHAPE)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    r = H.main(BENCH, argv)
    if r["dry_run"]:
        return {"settings": r["settings"], "estimate": r["plan"]}
    return report(r)


if __name__ == "__main__":
    H.run_script(main)
