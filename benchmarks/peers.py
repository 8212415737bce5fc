"""regprune's pruning methods against Torch-Pruning's pruners: one trained ResNet-20 (1-channel stem) on
Fashion-MNIST, pruned by every method to the same MACs and fine-tuned to the same total training (see
benchmarks/README.md for the protocol and how to read the tables).

    python benchmarks/peers.py --scale smoke                    # seconds; what tests/test_peers.py runs
    python benchmarks/peers.py --scale cpu --jobs 2 --dry-run   # the plan and a time estimate
    python benchmarks/peers.py --scale cpu --jobs 2             # about an hour on 2 CPU cores
    python benchmarks/peers.py --scale gpu --jobs 12            # all 70,000 images, one GPU, 12 workers

Writes benchmarks/results/peers_<scale>.{md,json,png}.
"""

from __future__ import annotations

import copy
import json
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
from regprune.jobs.common import evaluate_on  # noqa: E402
from regprune.methods.greg import GRegConfig  # noqa: E402
from regprune.models.cifar import CifarResNet  # noqa: E402
from regprune.ratios import make_plan  # noqa: E402
from regprune.surgery import load_model, save_model  # noqa: E402

GREG_METHODS = ("greg1", "greg2", "greg1_group", "greg2_group")
SPARSE_TP = ("tp_bnscale", "tp_groupnorm", "tp_growingreg")
L1_METHODS = ("l1", "l1_group", "l1_same_ft")
DEFAULT_METHODS = ("l1", "l1_group", *GREG_METHODS, *SPARSE_TP)
METHODS = (*DEFAULT_METHODS, "tp_magnitude", "spm", "l1_same_ft")
TRAINS_BEFORE_REMOVAL = (*GREG_METHODS, *SPARSE_TP, "spm")
REFERENCE = "l1"  # what every method is compared against in the table's `vs l1` column
TRAINER_OVERHEAD = 1.15  # bare training throughput / the Trainer's steps with loaders, augmentation and hooks
JOB_FIXED_S = 6.0        # per job: model load, graph analysis, TP pruner construction, BN recalibration
X1 = torch.zeros(1, *H.INPUT_SHAPE)  # the example input of tracing and counting


@dataclass
class Settings(H.BaseSettings):
    model: str = "resnet20"
    width: int = 16             # first-stage channels (16: the papers' network)
    base_epochs: float = 1      # first cosine cycle of the base
    base_lr: float = 0.1
    base_cycle_epochs: float = 1  # further cosine cycles while the best test top-1 still rises by plateau_tol
    base_cycle_lr: float = 0.01
    base_max_cycles: int = 0
    plateau_tol: float = 0.3
    reg_iters: int = 1000       # every method that trains before removal gets these iterations at reg_lr
    reg_lr: float = 0.01
    ft_iters: int = 1000        # fine-tuning after removal; rows without training before removal get reg_iters more
    ft_lr: float = 0.01
    ft_schedule: str = "cosine"
    recal_batches: int = 50     # training batches re-estimating BN statistics right after removal
    ft_without_recal: bool = False  # also fine-tune the non-recalibrated copy (doubles fine-tuning)
    targets: list[float] = field(default_factory=lambda: [0.25, 0.125])
    tp_reg: float = 5e-4        # Torch-Pruning's benchmark recipe (--reg)
    tp_delta_reg: float = 1e-4  # its recipe for GrowingRegPruner (--delta_reg)
    tp_reg_updates: int = 10    # GrowingRegPruner.update_reg() calls spread over the sparse phase
    tp_scope: str = "regprune"
    data: str = "fashion-mnist"


SCALES: dict[str, Settings] = {
    "smoke": Settings(scale="smoke", width=8, limit_train=64, limit_test=48, batch_size=16, base_epochs=1,
                      base_lr=0.05, reg_iters=10, reg_lr=0.01, ft_iters=3, recal_batches=2, seeds=1,
                      targets=[0.5, 0.125], methods=list(DEFAULT_METHODS)),
    "cpu": Settings(scale="cpu", width=8, limit_train=20000, limit_test=None, batch_size=32, base_epochs=12,
                    base_lr=0.1, base_cycle_epochs=3, base_cycle_lr=0.01, base_max_cycles=2, reg_iters=1000,
                    reg_lr=0.01, ft_iters=1000, recal_batches=50, seeds=3, methods=list(DEFAULT_METHODS)),
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
    ap.add_argument("--tp-scope", choices=["regprune", "all"],
                    help="regprune (default): TP prunes regprune's groups to its widths; all: TP's default scope, "
                         "one uniform ratio found by bisection")
    ap.add_argument("--tp-reg", type=float)
    ap.add_argument("--ft-without-recal", action="store_true", default=None,
                    help="also fine-tune the copy without BN recalibration")
    ap.add_argument("--data", help="dataset spec (default fashion-mnist: the Debian package's folder)")


def jobs(s: Settings) -> list[dict[str, Any]]:
    if s.reg_iters < 1 or s.ft_iters < 0:
        raise UserError("--reg-iters must be >= 1 and --ft-iters >= 0")
    if any(not 0 < t <= 1 for t in s.targets):
        raise UserError("--targets are kept MACs fractions in (0, 1]")
    return [{"target": t, "method": m, "seed": k} for k in range(s.seeds) for t in s.targets for m in s.methods]


def dense_model(s: Settings) -> nn.Module:
    return CifarResNet(int(s.model.removeprefix("resnet")), num_classes=10, in_channels=1, option="A", width=s.width)


def fit(s: Settings, model: nn.Module, loader, seed: int, phase: str, test_loader=None, hooks=(),
        extra_param_groups=None, **kw) -> E.Trainer:
    """regprune's Trainer on the run's settings (`kw` overrides them); the model is left on the CPU."""
    cfg = E.TrainConfig(**{**dict(lr=0.01, lr_schedule="constant", momentum=s.momentum, weight_decay=s.weight_decay,
                                  batch_size=s.batch_size, amp=s.amp, device=s.device, seed=seed, progress=False,
                                  log_every=50), **kw})
    tr = E.Trainer(model, loader, test_loader, cfg, phase=phase, hooks=hooks, extra_param_groups=extra_param_groups)
    tr.fit()
    model.cpu()
    return tr


def evaluate(model: nn.Module, loader, device: str) -> float:
    return evaluate_on(model, loader, device)["top1"]


# ---------------------------------------------------------------------------------------------- base
def prepare(s: Settings, work: Path) -> dict[str, Any]:
    """Data and the one base: a cosine cycle, then further cycles while the best test top-1 rises by plateau_tol
    (trained the first time, reused when <work>/base.json has the same settings)."""
    bundle = load_data(s.data, limit_train=s.limit_train, limit_test=s.limit_test)
    key = {k: getattr(s, k) for k in ("model", "width", "limit_train", "limit_test", "batch_size", "base_epochs",
                                      "base_lr", "base_cycle_epochs", "base_cycle_lr", "base_max_cycles", "plateau_tol")}
    f, meta_f = work / "base.safetensors", work / "base.json"
    meta = json.loads(meta_f.read_text()) if f.exists() and meta_f.exists() else {}
    if meta.get("key") == key:
        log(f"base: reusing {f} ({meta['epochs']} epochs, test top-1 {meta['top1']:.2f})")
    else:
        torch.manual_seed(0)
        model = dense_model(s)
        train_loader, test_loader = make_loaders(bundle, s.batch_size, workers=s.workers, seed=0)
        curve, cycles, best = [], [], float("nan")
        reason = "no further cycles at this scale" if s.base_max_cycles == 0 else "cycle limit reached"
        for c in range(s.base_max_cycles + 1):
            tr = fit(s, model, train_loader, c, f"base_cycle{c}" if c else "base", test_loader, lr_schedule="cosine",
                     epochs=s.base_cycle_epochs if c else s.base_epochs, lr=s.base_cycle_lr if c else s.base_lr)
            part = [r["test_top1"] for r in tr.metrics if r.get("kind") == "epoch" and "test_top1" in r]
            curve += [{"epoch": len(curve) + i + 1, "test_top1": v} for i, v in enumerate(part)]
            top = max(part, default=float("nan"))
            log(f"base: cycle {c}: best test top-1 {top:.2f}")
            if c:
                cycles.append({"cycle": c, "best_top1": top, "gain": top - best})
                if top - best < s.plateau_tol:
                    reason = f"a {s.base_cycle_epochs:g}-epoch cycle raised the best test top-1 by < {s.plateau_tol} points"
                    best = max(best, top)
                    break
            best = top
        top1 = evaluate(model, test_loader, s.device)
        save_model(model, f, {"dataset": bundle.name, "top1": top1})
        meta = {"key": key, "epochs": len(curve), "top1": top1, "best_top1": best, "curve": curve, "cycles": cycles,
                "stopped_because": reason, "plateaued": reason.startswith("a ")}
        E.atomic_write_text(meta_f, json.dumps(meta, indent=1))
    m, _ = load_model(f, model=dense_model(s))
    return {"bundle": bundle, "base_file": f,
            "base": {**meta, "macs": count_macs(m, X1), "params": count_params(m)}}


# ---------------------------------------------------------------------------------------------- Torch-Pruning
class TPSparseHook:
    """Torch-Pruning's sparse training inside regprune's Trainer: regularize() after every backward; for
    GrowingRegPruner also update_reg() every `every` steps."""

    def __init__(self, pruner, model: nn.Module, every: int) -> None:
        self.pruner, self.model, self.every, self.updates = pruner, model, max(1, every), 0

    def after_backward(self, trainer) -> None:
        self.pruner.regularize(self.model)

    def on_step_end(self, trainer) -> None:
        if isinstance(self.pruner, tp.pruner.GrowingRegPruner) and trainer.step % self.every == 0:
            self.pruner.update_reg()
            self.updates += 1


def _bn_scale(model: nn.Module, names: set[str]) -> float:
    vals = [m.weight.detach().abs().mean().item() for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and n in names]
    return statistics.fmean(vals) if vals else float("nan")


def tp_ratios(model: nn.Module, x: torch.Tensor, target: float, s: Settings) -> tuple[dict, float, list]:
    """(pruning_ratio_dict, pruning_ratio, ignored_layers) that bring Torch-Pruning to `target` MACs: scope
    "regprune", the per-group channel counts of regprune's plan (identical widths); scope "all", TP's default
    scope with one uniform ratio found by bisection on copies."""
    if s.tp_scope == "regprune":
        graph = analyze(model, x)
        plan = make_plan(graph, target_macs=target)
        roots = set(plan.removal)
        scope_bns = {m.name for r in roots for m in graph.groups[r].members if "BatchNorm" in m.kind}
        ignored = [m for n, m in model.named_modules()
                   if (isinstance(m, (nn.Conv2d, nn.Linear)) and n not in roots)
                   or (isinstance(m, nn.BatchNorm2d) and n not in scope_bns)]
        # TP keeps int(n * (1 - ratio)) channels: (k - 1e-6) / n removes exactly k whatever the float rounding
        return {model.get_submodule(r): (k - 1e-6) / graph.groups[r].channels for r, k in plan.removal.items()}, 0.0, ignored
    dense = count_macs(model, x)

    def macs_at(r: float) -> float:
        m = copy.deepcopy(model)
        tp.pruner.MagnitudePruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=r,
                                  ignored_layers=[q for q in m.modules() if isinstance(q, nn.Linear)],
                                  customized_pruners=CUSTOM_PRUNERS).step()
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
    imp = tp.importance.GroupMagnitudeImportance
    cls, kw = {"tp_magnitude": (tp.pruner.MagnitudePruner, dict(importance=imp(p=1))),
               "tp_bnscale": (tp.pruner.BNScalePruner, dict(importance=tp.importance.BNScaleImportance(), reg=s.tp_reg)),
               "tp_groupnorm": (tp.pruner.GroupNormPruner, dict(importance=imp(p=2, normalizer="max"), reg=s.tp_reg)),
               "tp_growingreg": (tp.pruner.GrowingRegPruner, dict(importance=imp(p=2), reg=s.tp_reg,
                                                                  delta_reg=s.tp_delta_reg))}[method]
    p = cls(model, x, pruning_ratio=ratio, pruning_ratio_dict=ratio_dict or None, iterative_steps=1,
            ignored_layers=ignored, customized_pruners=CUSTOM_PRUNERS, **kw)
    return p, {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m not in ignored}, ratio


def run_tp(method: str, model: nn.Module, x: torch.Tensor, target: float, s: Settings, loader, seed: int):
    pruner, bns, ratio = tp_pruner(method, model, x, target, s)
    info: dict[str, Any] = {"reg_iters": 0, "tp_uniform_ratio": ratio if s.tp_scope == "all" else None}
    if method in SPARSE_TP:
        info["bn_scale_before"] = _bn_scale(model, bns)
        pruner.update_regularizer()
        hook = TPSparseHook(pruner, model, s.reg_iters // max(1, s.tp_reg_updates))
        # TP's recipe trains without weight decay while regularizing
        tr = fit(s, model, loader, seed, "sparse", hooks=[hook], max_steps=s.reg_iters, lr=s.reg_lr, weight_decay=0.0)
        info.update(reg_iters=tr.step, bn_scale_after=_bn_scale(model, bns), reg_updates=hook.updates)
    model.eval()
    pruner.step()
    return model, info


# ---------------------------------------------------------------------------------------------- regprune
def greg_kwargs(method: str, s: Settings) -> tuple[str, dict[str, Any]]:
    """The library method and the config overrides for one of GREG_METHODS (the library's own schedule)."""
    crit = "group" if method.endswith("_group") else "filter"
    return method.removesuffix("_group"), dict(lr=s.reg_lr, lr_prune=s.reg_lr, momentum=s.momentum, penalty=crit,
                                               criterion=crit)


def run_greg(method: str, model: nn.Module, x: torch.Tensor, target: float, s: Settings, loader, seed: int):
    lib, kw = greg_kwargs(method, s)
    predicted = GRegConfig.scaled(s.reg_iters, lib, **kw).predict(lib)
    reg = rp_regularizer(model, x, lib, target_macs=target, iters=s.reg_iters, **kw)
    tr = fit(s, model, loader, seed, "regularize", hooks=[reg], max_steps=s.reg_iters, lr=s.reg_lr)
    st = reg.status()
    ratios = [v for v in (st.get("mag_ratio") or {}).values() if v is not None]
    overlaps = [v for v in (st.get("overlap_l1") or {}).values() if v is not None]
    info = {"reg_iters": tr.step, "greg_phase": st.get("phase"), "stop_reason": st.get("stop_reason"),
            "mag_ratio": st.get("mag_ratio"), "min_mag_ratio": min(ratios) if ratios else None,
            "median_mag_ratio": statistics.median(ratios) if ratios else None,
            "overlap_l1": statistics.fmean(overlaps) if overlaps else None, "overlap_l1_layers": st.get("overlap_l1"),
            "predicted_ratio": predicted.get("predicted_ratio"), "predicted_reaches": predicted.get("reaches"),
            "predicted_decay": predicted.get("integrated_decay"), "schedule_warning": predicted.get("warning")}
    return reg.prune(), info


def run_spm(method: str, model: nn.Module, x: torch.Tensor, target: float, s: Settings, loader, seed: int):
    from regprune.methods.spm import SPMRegularizer
    from regprune.reconfigure import reconfigure
    from regprune.scratch import snap_to_budget, spm_settings

    st = spm_settings(0, 1.0, {"search_epochs": 1.0})
    reg = SPMRegularizer.attach(model, x, target, **{k: st[k] for k in (
        "alpha_nuc", "alpha_mac", "nuc_every", "mac_grad_inputs", "mac_norm", "gate_lr_scale", "tie_spread")})
    tr = fit(s, model, loader, seed, "search", hooks=[reg], extra_param_groups=reg.param_groups(),
             max_steps=s.reg_iters, lr=s.reg_lr)
    snap = snap_to_budget(reg)  # on the CPU: the fixed masks are made on the weights' device
    reg.freeze()
    info = {"reg_iters": tr.step, "search_macs_fraction": snap.before, "snapped_macs_fraction": snap.after}
    return reconfigure(model, reg, x), info


def run_one(s: Settings, ctx: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Prune a fresh copy of the base; evaluate right after removal without and with BN recalibration; fine-tune
    the recalibrated model to the common total of training; evaluate."""
    target, method, seed = job["target"], job["method"], job["seed"]
    model, _ = load_model(ctx["base_file"], model=dense_model(s))
    x = X1
    dense_macs, dense_params = count_macs(model, x), count_params(model)
    E.seed_everything(seed)
    train_loader, test_loader = make_loaders(ctx["bundle"], s.batch_size, workers=s.workers, seed=seed)
    t0 = time.perf_counter()
    if method in L1_METHODS:
        crit = "group" if method == "l1_group" else "filter"
        pruned, info = rp_prune(model, x, target_macs=target, criterion=crit, inplace=True).model, {"reg_iters": 0}
    else:
        run = run_greg if method in GREG_METHODS else run_spm if method == "spm" else run_tp
        pruned, info = run(method, model, x, target, s, train_loader, seed)
    t_prune = time.perf_counter() - t0
    pruned.cpu()
    macs, params = count_macs(pruned, x), count_params(pruned)
    plain = copy.deepcopy(pruned) if s.ft_without_recal else None
    removal = evaluate(pruned, test_loader, s.device)
    used = E.recalibrate_bn(pruned, train_loader, batches=s.recal_batches, device=E.resolve_device(s.device))
    pruned.cpu()
    removal_recal = evaluate(pruned, test_loader, s.device)
    # the same total training for every row (l1_same_ft: the fine-tuning of a method that used its whole budget)
    ft_iters = s.ft_iters if method == "l1_same_ft" else s.reg_iters + s.ft_iters - info["reg_iters"]
    t1 = time.perf_counter()
    done = _finetune(s, pruned, train_loader, seed, ft_iters)
    t_ft = time.perf_counter() - t1
    row = {"top1": evaluate(pruned, test_loader, s.device), "removal_top1": removal,
           "removal_recal_top1": removal_recal, "recal_batches": used, "ft_iters": done,
           "total_iters": info["reg_iters"] + done, "macs": macs, "macs_fraction": macs / dense_macs,
           "macs_gap": macs / dense_macs / target - 1.0, "params": params, "params_fraction": params / dense_params,
           "scope": "all groups" if method == "spm" or (method.startswith("tp_") and s.tp_scope == "all")
           else "block-internal", "prune_phase_s": t_prune, "ft_s": t_ft, **info}
    if plain is not None:
        _finetune(s, plain, train_loader, seed, ft_iters)
        row["top1_without_recal"] = evaluate(plain, test_loader, s.device)
    return row


def _finetune(s: Settings, model: nn.Module, loader, seed: int, iters: int) -> int:
    if iters <= 0:
        return 0
    return fit(s, model, loader, seed, "finetune", max_steps=iters, lr=s.ft_lr, lr_schedule=s.ft_schedule).step


def estimate(s: Settings, args) -> dict[str, Any]:
    """Wall time from the throughput of one process measured now (dense: base and training before removal;
    L1-pruned at each target: fine-tuning and evaluation), times TRAINER_OVERHEAD, plus JOB_FIXED_S per job."""
    n_train, n_test = s.limit_train or 60000, s.limit_test or 10000
    torch.set_num_threads(max(1, s.threads))
    dense = H.throughput(lambda: dense_model(s), s.batch_size, device=s.device)
    pruned = {t: H.throughput(lambda: rp_prune(dense_model(s), X1, target_macs=t).model, s.batch_size,
                              device=s.device) for t in s.targets}
    all_jobs = jobs(s)
    workers = min(args.jobs, len(all_jobs))
    d_train, d_eval = dense["train_img_s"] / TRAINER_OVERHEAD, dense["eval_img_s"]
    base_s = (s.base_epochs + s.base_max_cycles * s.base_cycle_epochs) * (n_train / d_train + n_test / d_eval)
    jobs_s = 0.0
    for j in all_jobs:
        p_train, p_eval = pruned[j["target"]]["train_img_s"] / TRAINER_OVERHEAD, pruned[j["target"]]["eval_img_s"]
        reg = s.reg_iters if j["method"] in TRAINS_BEFORE_REMOVAL else 0
        ft = s.ft_iters if j["method"] == "l1_same_ft" else s.reg_iters + s.ft_iters - reg
        jobs_s += (JOB_FIXED_S + reg * s.batch_size / d_train + (ft + s.recal_batches) * s.batch_size / p_train
                   + 3 * n_test / p_eval + (ft * s.batch_size / p_train + n_test / p_eval if s.ft_without_recal else 0))
    jobs_s /= workers
    total = base_s + jobs_s
    return {"dense": dense, "pruned": {str(t): v for t, v in pruned.items()}, "trainer_overhead": TRAINER_OVERHEAD,
            "jobs": len(all_jobs), "workers": workers, "base_min": base_s / 60, "jobs_min": jobs_s / 60,
            "total_min": total / 60,
            "summary": f"estimated {total / 60:.0f} min ({base_s / 60:.0f} base + {jobs_s / 60:.0f} for "
                       f"{len(all_jobs)} jobs on {workers} worker(s)) at {dense['train_img_s']:.0f} dense train img/s "
                       f"and {dense['eval_img_s']:.0f} eval img/s per process, measured now; other load slows it"}


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
        g["mag_ratio_goal_met"] = (all((r.get("min_mag_ratio") or 0) >= 1000 for r in rs)
                                   if g["method"] in GREG_METHODS else None)
        g["schedule_warnings"] = sorted({r["schedule_warning"] for r in rs if r.get("schedule_warning")})
    return out


def num(v: float | None, f: str = "{:.3g}") -> str:
    return "-" if v is None else f.format(v)


def markdown(res: dict[str, Any]) -> str:
    s, base, d = res["settings"], res["base"], res["data"]
    pm = lambda g, m: "-" if g.get(f"{m}_mean") is None else fmt_pm(g[f"{m}_mean"], g[f"{m}_std"])  # noqa: E731

    def vs_ref(g: dict[str, Any], metric: str) -> str:
        c = next((c for c in res["comparisons"][metric] if c["target"] == g["target"]
                  and {c["a"], c["b"]} == {REFERENCE, g["method"]} and c["a"] != c["b"]), None)
        return "" if c is None else (f"{c['diff'] if c['a'] == g['method'] else -c['diff']:+.2f}"
                                     + (" *" if c["exceeds_spread"] else ""))

    after, removal = [], []
    for g in res["summary"]:
        key = {"target": f"{1 / g['target']:g}x", "method": g["method"]}
        after.append({**key, "seeds": g["n_seeds"], "top-1 after FT": pm(g, "top1"),
                      f"vs {REFERENCE}": vs_ref(g, "top1"), "per seed": " ".join(f"{v:.2f}" for v in g["top1_values"]),
                      "removal (recal)": pm(g, "removal_recal_top1"), "reg iters": f"{g['reg_iters_mean']:.0f}",
                      "total iters": f"{g['total_iters_mean']:.0f}",
                      "kept/pruned ratio (min)": num(g["min_mag_ratio_mean"]),
                      "predicted ratio": num(g["predicted_ratio_mean"]),
                      "overlap with L1": num(g["overlap_l1_mean"] and 100 * g["overlap_l1_mean"], "{:.0f}%"),
                      "MACs kept": f"{100 * g['macs_fraction_mean']:.1f}%"})
        removal.append({**key, "removal, no recal": pm(g, "removal_top1"),
                        f"vs {REFERENCE} (no recal)": vs_ref(g, "removal_top1"),
                        "removal, BN recal": pm(g, "removal_recal_top1"),
                        f"vs {REFERENCE} (recal)": vs_ref(g, "removal_recal_top1"),
                        **({"after FT, no recal": pm(g, "top1_without_recal")}
                           if g.get("top1_without_recal_mean") is not None else {})})
    return "\n".join(H.header_lines(res, "Peers at the same MACs: ResNet-20 on Fashion-MNIST") + [
        f"Data: {d['train']} training / {d['test']} test images"
        + (" (the whole test set)" if d["test"] == 10000 else " (NOT the whole test set)")
        + f". Network: ResNet-20, width {s['width']} ({base['macs'] / 1e6:.2f} MMACs, {base['params'] / 1e6:.3f} M "
        f"params). Base: {base['epochs']} epoch(s) ({base['stopped_because']}; plateaued: {base['plateaued']}), test "
        f"top-1 {base['top1']:.2f}. Torch-Pruning {res.get('torch_pruning', '?')}, scope {s['tp_scope']}.", "",
        f"Training: {s['reg_iters']} iterations at lr {s['reg_lr']:g} before removal where a method trains then, "
        f"{s['reg_iters'] + s['ft_iters']} in total for every row"
        + (f" (`l1_same_ft`: {s['ft_iters']})" if "l1_same_ft" in s["methods"] else "")
        + f"; fine-tuning lr {s['ft_lr']:g} {s['ft_schedule']}, batch {s['batch_size']}; BN statistics re-estimated "
        f"on {s['recal_batches']} training batches at removal; {s['seeds']} seed(s). Columns: benchmarks/README.md.", "",
        "## Top-1 after fine-tuning (BN recalibrated at removal, every row alike)", "", H.table(after), "",
        "## Top-1 right after removal, without and with BN recalibration", "", H.table(removal), "",
        "## What this run can and cannot say", ""] + [f"- {n}" for n in res["notes"]] + [""])


def notes(res: dict[str, Any]) -> list[str]:
    s, comps = res["settings"], res["comparisons"]["top1"]
    out = [f"{1 / c['target']:g}x, {c['a']} vs {c['b']}: {c['diff']:+.2f} points (spread {c['spread']:.2f}): "
           f"{H.verdict(c)}" + ("; same sign on every seed." if c["paired_same_sign"] else ".") for c in comps
           if (c["a"] in GREG_METHODS) != (c["b"] in GREG_METHODS) and {c["a"], c["b"]} & {*SPARSE_TP, *L1_METHODS}]
    if not any(c["exceeds_spread"] for c in comps):
        out.append("No pair of methods differs by more than the spread of its seeds after fine-tuning: this run does "
                   "not rank them.")
    for g in res["summary"]:
        at = f"{1 / g['target']:g}x {g['method']}"
        if g["mag_ratio_goal_met"] is False:
            out.append(f"{at}: the goal of a kept/pruned magnitude ratio of 1000 in every layer was not met (smallest "
                       f"ratio {num(g['min_mag_ratio_mean'])}, mean over seeds).")
        out += [f"{at}: the library warns about this schedule: {w}" for w in g["schedule_warnings"]]
    if res["macs_gap_max"] > 0.03:
        out.append(f"Achieved MACs miss their target by up to {100 * res['macs_gap_max']:.1f}%.")
    if not res["base"]["plateaued"]:
        out.append("The base's test accuracy had not plateaued by the 0.3-point rule when its training stopped.")
    if res["data"]["test"] < 10000:
        out.append("This run did not score on the whole 10,000-image test set.")
    if s["seeds"] < 3:
        out.append(f"Only {s['seeds']} seed(s): differences cannot be weighed against a spread.")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    r = H.main(BENCH, argv)
    if r["dry_run"]:
        return {"settings": r["settings"], "estimate": r["plan"]}
    s, ctx, rows = r["settings_obj"], r["ctx"], r["rows"]
    summary = summarize(rows)
    bundle, base = ctx["bundle"], {k: v for k, v in ctx["base"].items() if k != "key"}
    res: dict[str, Any] = {
        "benchmark": "peers", "scale": s.scale, "date": r["date"], "argv": r["argv"], "settings": r["settings"],
        "hardware": r["hardware"], "n_workers": r["n_workers"], "plan": r["plan"],
        "data": {"name": bundle.name, "train": len(bundle.train), "test": len(bundle.test)},
        "torch_pruning": getattr(tp, "__version__", "unknown"), "base": base, "results": rows, "summary": summary,
        "jobs_done": r["jobs_done"], "jobs_expected": r["jobs_expected"], "complete": r["complete"],
        "comparisons": {m: H.compare(summary, rows, ("target",), m) for m in ("top1", "removal_top1", "removal_recal_top1")},
        "macs_gap_max": max((abs(x["macs_gap"]) for x in rows), default=0.0), "work_dir": str(r["work"]),
        "wall_time_s": r["wall_time_s"]}
    res["notes"] = notes(res)

    return H.write_outputs(res, r["args"].out_dir, f"peers_{s.scale}", markdown,
                           [lambda out: plot(out / f"peers_{s.scale}.png", summary, s.width, base["top1"])])


def plot(path: Path, summary: list[dict[str, Any]], width: int, base_top1: float) -> Path:
    """Top-1 after fine-tuning (mean ± std over seeds) against the MACs kept, one line per method (log x axis)."""
    import matplotlib.ticker

    fig, ax = H.pyplot().subplots(figsize=(7.5, 5))
    x = lambda g: 100 * g["macs_fraction_mean"]  # noqa: E731
    for m, marker in zip(METHODS, "os^vD<>pP*hX"):
        if gs := sorted((g for g in summary if g["method"] == m and g["top1_mean"] is not None), key=x):
            ax.errorbar([x(g) for g in gs], [g["top1_mean"] for g in gs], yerr=[g["top1_std"] for g in gs], label=m,
                        marker=marker, linestyle="--" if m.startswith("tp_") else "-", capsize=3)
    ax.axhline(base_top1, color="gray", linestyle=":", label=f"dense base ({base_top1:.2f})")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(sorted({x(g) for g in summary}))
    ax.set(xlabel="MACs kept (% of dense, log scale)", ylabel="test top-1 after fine-tuning (%), mean ± std over seeds")
    ax.set_title(f"ResNet-20 (width {width}) / Fashion-MNIST: regprune (solid) vs Torch-Pruning (dashed)", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return H.save_fig(fig, path, dpi=120)


BENCH = H.Bench(name="peers", doc=__doc__, scales=SCALES, methods=METHODS, script=Path(__file__).resolve(),
                job_keys=("target", "method", "seed"), jobs=jobs, prepare=prepare, run_one=run_one, add_args=add_args,
                estimate=estimate, dense_model=dense_model)

if __name__ == "__main__":
    H.run_script(main)
