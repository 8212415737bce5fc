"""The jobs behind the commands: train a base, prune it (L1, GReg-1, GReg-2), fine-tune, report.

Each job works in one run directory, records what it finished in `state.json`, and picks up from there
(and from the engine's checkpoints) when resumed, so a killed run loses at most one checkpoint interval.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import engine as E
from .api import Regularizer, l1_picks, plan_targets, unstructured_plan
from .counting import count_macs, count_params
from .data import DataBundle, load_data, make_loaders
from .errors import UserError
from .graph import analyze
from .methods.greg import GRegConfig
from .methods.l1 import CRITERIA
from .models import create_model, model_info
from .ratios import make_plan
from .report import compare_latency, format_table, plot_filter_norms, plot_lines, plot_widths, write_widths
from .surgery import apply_picks, load_model, save_model

__all__ = ["RunDir", "JobOptions", "train_job", "prune_job", "eval_job", "load_base", "summary_row"]


# ---------------------------------------------------------------------------------------------- run dirs
class RunDir:
    """One directory per run; refuses to clobber an existing run unless told, records finished phases."""

    def __init__(self, path: str | Path, *, overwrite: bool = False, resume: bool = False, write: bool = True) -> None:
        self.path = Path(path)
        self.write = write
        if resume:
            if not (self.path / "state.json").exists():
                raise UserError(f"cannot resume: {self.path} holds no regprune run (no state.json)")
            state = self._read_state()  # before the write probe below: a run that cannot resume is not touched
        elif self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise UserError(f"run directory {self.path} already exists and is not empty; "
                                "pass --overwrite to replace it or --resume to continue it")
            if write:
                _clear_dir(self.path)
        if write:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                probe = self.path / ".write-test"
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                raise UserError(f"cannot write to run directory {self.path}: {exc.strerror or exc}") from None
        self.state: dict[str, Any] = state if resume else {"done": [], "results": {}}

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads((self.path / "state.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot resume: {self.path / 'state.json'} is unreadable ({exc})") from None
        if (not isinstance(state, dict) or not isinstance(state.get("done"), list)
                or not isinstance(state.setdefault("results", {}), dict)):
            raise UserError(f"cannot resume: {self.path / 'state.json'} is not a regprune run state")
        return state

    def done(self, phase: str) -> bool:
        return phase in self.state["done"]

    def mark(self, phase: str, **results: Any) -> None:
        """Record a finished phase (atomically)."""
        if phase not in self.state["done"]:
            self.state["done"].append(phase)
        self.state["results"].update(E.log.to_jsonable(results))
        self.save_state()

    def save_state(self) -> None:
        if self.write:
            E.atomic_write_text(self.path / "state.json", json.dumps(self.state, indent=1))

    def checkpoint(self, phase: str) -> Path | None:
        p = self.path / "checkpoints" / f"{phase}.pt"
        return p if p.exists() else None

    def file(self, name: str) -> Path:
        return self.path / name


def _clear_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# ---------------------------------------------------------------------------------------------- options
@dataclass
class JobOptions:
    """Everything a job needs, as plain values (what the CLI parsed, or a recipe gave)."""

    model: str = "resnet20"
    data: str = "mnist5k"
    out: str = "runs/run"
    seed: int = 0
    batch_size: int = 128
    workers: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False
    progress: bool = True
    checkpoint_every: int = 0
    shortcut: str | None = None
    # training / fine-tuning
    epochs: float = 10
    lr: float = 0.1
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_wd_bn_bias: bool = False
    label_smoothing: float = 0.0
    # pruning
    method: str = "l1"
    base: str | None = None
    ratios: str | None = None
    speedup: float | None = None
    target_macs: float | None = None
    skip: list[str] = field(default_factory=list)
    round_to: int | None = None
    include_coupled: bool = False
    pick: str = "min"
    criterion: str = "filter"  # channel score for picks: "filter" (the papers') or "group" (the whole coupled group)
    unstructured: bool = False
    sparsity: float | None = None  # unstructured: this fraction of the weights of every conv/linear layer
    penalty: str = "filter"  # GReg's penalty: "filter" (the paper's) or "group" (Group-GReg)
    penalize_coupled: bool = False  # old name of penalty="group"
    bn_recal: int = 100  # training batches to re-estimate BN statistics on after removal (0: off)
    reg_iters: int | None = None  # scale GReg's schedule to this many iterations
    reg_batch_size: int | None = None
    greg: dict[str, Any] = field(default_factory=dict)  # GRegConfig overrides (paper names)
    ft_epochs: float = 10
    ft_lr: float = 0.01
    ft_lr_schedule: str = "cosine"
    ft_warmup_epochs: float = 0.0
    # pruning from scratch (None: the method's defaults, see scratch.spm_settings)
    search_epochs: float | None = None
    alpha_nuc: float | None = None
    alpha_mac: float | None = None
    nuc_every: int | None = None
    mac_grad_inputs: bool | None = None
    mac_norm: str | None = None
    gate_lr_scale: float | None = None
    exact_budget: bool | None = None
    tie_spread: float | None = None
    snap_floor: float | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "JobOptions":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for name, value in values.items():
            _check_type(name, value, cls.__dataclass_fields__[name].type)
        return cls(**values)


# what a value of each annotated option type may be (recipes and options.json are not type-checked by argparse)
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                       "list[str]": (list,), "dict[str,Any]": (dict,)}


def _check_type(name: str, value: Any, annotation: Any) -> None:
    ann = str(annotation).replace(" ", "")
    optional = ann.endswith("|None")
    base = ann[:-len("|None")] if optional else ann
    if value is None:
        if optional or base not in _TYPES:
            return
        raise UserError(f"option {name} needs a value of type {base}, got null")
    kinds = _TYPES.get(base)
    if kinds is None:
        return
    if not isinstance(value, kinds) or (isinstance(value, bool) and base != "bool"):
        raise UserError(f"option {name} must be of type {base}, got {value!r}")
    if base == "list[str]" and not all(isinstance(v, str) for v in value):
        raise UserError(f"option {name} must be a list of strings, got {value!r}")


def _train_config(o: JobOptions, *, epochs: float, lr: float, schedule: str, warmup: float,
                  max_steps: int | None = None) -> E.TrainConfig:
    return E.TrainConfig(epochs=epochs, max_steps=max_steps, lr=lr, lr_schedule=schedule, warmup_epochs=warmup,
                         momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
                         no_wd_bn_bias=o.no_wd_bn_bias, label_smoothing=o.label_smoothing,
                         batch_size=o.batch_size, amp=o.amp, channels_last=o.channels_last, device=o.device,
                         seed=o.seed, checkpoint_every=o.checkpoint_every, progress=o.progress)


def _data(o: JobOptions) -> DataBundle:
    return load_data(o.data, limit_train=o.limit_train, limit_test=o.limit_test)


def _loaders(o: JobOptions, bundle: DataBundle, batch_size: int | None = None):
    return make_loaders(bundle, batch_size or o.batch_size, workers=o.workers,
                        distributed=E.is_distributed(), seed=o.seed)


def example_input(bundle: DataBundle) -> torch.Tensor:
    """One zero image shaped like the dataset's (what tracing and counting need)."""
    return torch.zeros(1, bundle.in_channels, bundle.image_size, bundle.image_size)


_KNOWN_SHAPES = {"mnist5k": (1, 28, 10), "fashion-mnist": (1, 28, 10), "digits": (1, 8, 10), "cifar10": (3, 32, 10),
                 "cifar100": (3, 32, 100), "imagefolder": (3, 224, 1000)}
_TRAIN_SIZES = {"mnist5k": 4000, "fashion-mnist": 60000, "digits": 1437, "cifar10": 50000, "cifar100": 50000,
                "imagefolder": 1281167}


def assumed_shapes(o: JobOptions) -> tuple[int, int, int, int]:
    """(channels, image side, classes, training images) a dataset spec implies, without reading any data (dry runs)."""
    from .models import model_info

    key = o.data.split(":", 1)[0].lower()
    ch, size, classes = _KNOWN_SHAPES.get(key, (3, model_info(o.model).input_size, 10))
    return ch, size, classes, o.limit_train or _TRAIN_SIZES.get(key, 0)


def _model_kwargs(o: JobOptions) -> dict[str, Any]:
    return {"shortcut": o.shortcut} if o.shortcut else {}


def new_model(o: JobOptions, bundle: DataBundle) -> nn.Module:
    """A freshly initialised model for the dataset (seeded)."""
    torch.manual_seed(o.seed)
    return create_model(o.model, num_classes=bundle.num_classes, in_channels=bundle.in_channels, **_model_kwargs(o))


_NO_BASE = ("pruning needs a trained base: --base FILE (a regprune model file), --base pretrained "
            "(torchvision weights), or --base random to prune an untrained network on purpose")


def load_base(o: JobOptions, bundle: DataBundle) -> nn.Module:
    """The trained model to prune: a model file, torchvision's published weights, or (only by name) random init."""
    if o.base is None:
        raise UserError(_NO_BASE)
    if o.base == "random":
        return new_model(o, bundle)
    if o.base == "pretrained":
        return _pretrained(o, bundle)
    model, _ = load_model(o.base)
    name = getattr(model, "regprune_arch", {}).get("name")
    if name and o.model and name != o.model:
        raise UserError(f"--base {o.base} holds a {name}, but --model says {o.model}")
    kw = getattr(model, "regprune_arch", {}).get("kwargs", {})
    if kw.get("num_classes", bundle.num_classes) != bundle.num_classes or kw.get("in_channels", bundle.in_channels) != bundle.in_channels:
        raise UserError(f"--base {o.base} was built for {kw.get('num_classes')} classes / {kw.get('in_channels')} "
                        f"input channels, but {bundle.name} has {bundle.num_classes} / {bundle.in_channels}")
    return model


def _check_pretrained(o: JobOptions) -> None:
    if model_info(o.model).family != "torchvision":
        raise UserError(f"--base pretrained is for torchvision.* models; {o.model} has no published weights")


def _pretrained(o: JobOptions, bundle: DataBundle) -> nn.Module:
    _check_pretrained(o)
    if bundle.num_classes != 1000 or bundle.in_channels != 3:
        raise UserError(f"torchvision's weights for {o.model} are for 1000 classes of RGB images; "
                        f"{bundle.name} has {bundle.num_classes} classes and {bundle.in_channels} channel(s)")
    from torchvision import models as tvm

    tv_name = o.model.split(".", 1)[1]
    try:
        weights = tvm.get_model_weights(tv_name).DEFAULT
        model = tvm.get_model(tv_name, weights=weights)
    except Exception as exc:  # torchvision raises URLError/RuntimeError/OSError when offline without a cache
        raise UserError(f"cannot get torchvision's pretrained weights for {tv_name}: not in torch's cache "
                        f"({torch.hub.get_dir()}/checkpoints) and no network ({type(exc).__name__})") from None
    model.regprune_arch = {"name": o.model, "kwargs": {"num_classes": 1000, "in_channels": 3}}
    return model


def _eval(model: nn.Module, loader, device: str) -> dict[str, float]:
    return E.evaluate(model, loader, E.resolve_device(device, E.get_local_rank()))


def summary_row(label: str, model: nn.Module, x: torch.Tensor, metrics: dict[str, float] | None) -> dict[str, Any]:
    """The numbers a user compares for one model (one function for every report)."""
    metrics = metrics or {}
    return {"model": label, "top1": round(metrics.get("top1", float("nan")), 2),
            "top5": round(metrics.get("top5", float("nan")), 2) if "top5" in metrics else "",
            "params_M": round(count_params(model) / 1e6, 4), "MMACs": round(count_macs(model, x) / 1e6, 3)}


# ---------------------------------------------------------------------------------------------- train
def train_job(o: JobOptions, run: RunDir) -> dict[str, Any]:
    """Train a dense base model from scratch and write run/model.safetensors."""
    bundle = _data(o)
    train_loader, test_loader = _loaders(o, bundle)
    model = new_model(o, bundle)
    if run.done("train"):
        model, _ = load_model(run.file("model.safetensors"))
    else:
        cfg = _train_config(o, epochs=o.epochs, lr=o.lr, schedule=o.lr_schedule, warmup=o.warmup_epochs)
        trainer = E.Trainer(model, train_loader, test_loader, cfg, run_dir=run.path, phase="train")
        trainer.fit(resume_from=run.checkpoint("train"))
        metrics = _eval(model, test_loader, o.device)
        if E.is_main():
            save_model(model.cpu(), run.file("model.safetensors"),
                       {"dataset": bundle.name, "top1": metrics["top1"], "epochs": o.epochs, "seed": o.seed,
                        "input_size": bundle.image_size})
        run.mark("train", base=metrics)
    x = example_input(bundle)
    row = summary_row(o.model, model.cpu(), x, run.state["results"].get("base"))
    return {"table": format_table([row], list(row)), "row": row}


def eval_job(model_file: str, data: str, batch_size: int, device: str, limit_test: int | None = None) -> dict[str, Any]:
    """Evaluate a model file on a dataset."""
    model, meta = load_model(model_file)
    bundle = load_data(data, limit_test=limit_test, augment=False)
    kw = getattr(model, "regprune_arch", {}).get("kwargs", {})
    if kw.get("num_classes", bundle.num_classes) != bundle.num_classes:
        raise UserError(f"{model_file} predicts {kw.get('num_classes')} classes but {bundle.name} has {bundle.num_classes}")
    _, test_loader = make_loaders(bundle, batch_size)
    metrics = _eval(model, test_loader, device)
    row = summary_row(Path(model_file).name, model.cpu(), example_input(bundle), metrics)
    return {"table": format_table([row], list(row)), "row": row, "meta": meta}


# ---------------------------------------------------------------------------------------------- prune
class _StatusLine:
    """A hook that logs GReg's schedule (phase, penalty range, magnitude ratios, GReg-2 overlap) as it goes."""

    def __init__(self, reg: Regularizer, every: int = 100) -> None:
        self.reg = reg
        self.every = every

    def on_step_end(self, trainer) -> None:
        if trainer.step % self.every:
            return
        s = self.reg.status()
        ratios = [v for v in s.get("mag_ratio", {}).values() if v is not None]
        rec = {"greg_phase": s["phase"], "lambda_min": s["lambda_min"], "lambda_max": s["lambda_max"],
               "mag_ratio_min": min(ratios) if ratios else None, "mag_ratio_per_layer": s.get("mag_ratio")}
        if "overlap_l1" in s:
            rec["overlap_l1"] = s["overlap_l1"]
        trainer.log(rec)
        trainer._progress.set(greg=s["phase"], lam=f"{s['lambda_min']:.2g}..{s['lambda_max']:.2g}",
                              kept_pruned=f"{min(ratios):.3g}" if ratios else "-")


def greg_config(o: JobOptions, steps_per_epoch: int) -> GRegConfig:
    """The paper's GReg schedule (budget-aware, scaled to --reg-iters when given, for the run's momentum), with any
    per-name overrides."""
    overrides = dict(o.greg)
    overrides.setdefault("pick", o.pick)
    overrides.setdefault("penalty", "group" if o.penalize_coupled else o.penalty)
    overrides.setdefault("criterion", o.criterion)
    overrides.setdefault("unstructured", o.unstructured)
    overrides.setdefault("momentum", o.momentum)
    try:
        if o.reg_iters is not None:
            return GRegConfig.scaled(int(o.reg_iters), o.method, **overrides)
        return GRegConfig(**overrides)
    except TypeError as exc:
        raise UserError(f"bad GReg setting: {exc}") from None


def prune_plan(o: JobOptions, model: nn.Module, x: torch.Tensor):
    """Graph and removal plan for the options (shared by the job and --dry-run)."""
    graph = analyze(model, x, include_coupled=o.include_coupled)
    if o.sparsity is not None:
        if not o.unstructured:
            raise UserError("--sparsity is the unstructured scope: add --unstructured, or plan filters with --ratios, "
                            "--speedup or --target-macs")
        return graph, unstructured_plan(graph, o.sparsity, o.skip or None)
    plan = make_plan(graph, o.ratios, speedup=o.speedup, target_macs=o.target_macs, skip=o.skip or None,
                     round_to=o.round_to)
    if not plan.removal:
        raise UserError("the ratios prune nothing: every selected layer keeps all its channels")
    return graph, plan


def check_options(o: JobOptions, job: str) -> None:
    """Mistakes visible in the options alone (no data, model file or run directory needed).

    The CLI calls this before it creates a run directory, so a typo leaves nothing behind to --overwrite.
    """
    model_info(o.model)
    if job == "train":
        _train_config(o, epochs=o.epochs, lr=o.lr, schedule=o.lr_schedule, warmup=o.warmup_epochs).validate()
        return
    if o.method not in ("l1", "greg1", "greg2"):
        raise UserError(f"unknown method {o.method!r}: expected l1, greg1 or greg2 (or use `regprune scratch`)")
    if o.criterion not in CRITERIA:
        raise UserError(f"unknown criterion {o.criterion!r}: expected one of {', '.join(CRITERIA)}")
    if o.base is None:
        raise UserError(_NO_BASE)
    if o.base == "pretrained":
        _check_pretrained(o)
    # the same rules make_plan applies, checked here before any data is loaded
    if o.speedup is not None and o.target_macs is not None:
        raise UserError("give either --speedup or --target-macs, not both")
    if o.speedup is not None and not o.speedup >= 1.0:
        raise UserError(f"speedup {o.speedup:g} out of range: expected a number >= 1")
    if o.target_macs is not None and not 0.0 < o.target_macs <= 1.0:
        raise UserError(f"MACs target {o.target_macs:g} out of range: expected a kept fraction in (0, 1]")
    if o.sparsity is not None and (o.ratios or o.speedup is not None or o.target_macs is not None):
        raise UserError("give either --sparsity (unstructured) or --ratios/--speedup/--target-macs, not both")
    if o.sparsity is not None and not o.unstructured:
        raise UserError("--sparsity is the unstructured scope: add --unstructured")
    if o.bn_recal < 0:
        raise UserError(f"--bn-recal must be >= 0 batches, got {o.bn_recal}")
    if o.unstructured and o.method == "l1":
        raise UserError("unstructured pruning is available for greg1 and greg2")
    if not o.ratios and o.speedup is None and o.target_macs is None and o.sparsity is None:
        raise UserError("say how much to prune: --ratios SPEC, --speedup X, --target-macs F (or --unstructured "
                        "--sparsity F)")
    if o.method != "l1":
        cfg = greg_config(o, 1)
        _train_config(o, epochs=1, lr=cfg.lr_prune, schedule="constant", warmup=0.0,
                      max_steps=cfg.planned_iters(o.method)["total"]).validate()
    _train_config(o, epochs=o.ft_epochs, lr=o.ft_lr, schedule=o.ft_lr_schedule, warmup=o.ft_warmup_epochs).validate()


def _debug_rank_dump(phase: str, model: nn.Module, *, picks: dict | None = None, reg: Regularizer | None = None,
                     plan: Any = None) -> None:
    """With REGPRUNE_DEBUG_RANK_DUMP=DIR, write this rank's view of a phase boundary to DIR/rank{r}_{phase}.json.

    For checking that distributed ranks agree (picks, GReg penalties and masks, weights); the one place where
    every rank writes, and only into DIR, never into the run directory.
    """
    where = os.environ.get("REGPRUNE_DEBUG_RANK_DUMP")
    if not where:
        return

    def digest(tensors: dict[str, torch.Tensor]) -> str:
        h = hashlib.sha256()
        for k in sorted(tensors):
            t = tensors[k].detach().cpu().contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    rec: dict[str, Any] = {"phase": phase, "rank": E.get_rank(), "world_size": E.get_world_size(),
                           "weights": digest(model.state_dict()), "picks": picks}
    if plan is not None:
        rec["plan"] = {"removal": plan.removal, "ratios": plan.ratios}
    if reg is not None:
        st = reg.greg.state_dict()
        rec["greg"] = {"phase": st["phase"], "iteration": st["iteration"], "lambdas": digest(st["lambdas"]),
                       "gates": digest(st["pruned"]) if st["pruned"] is not None else None,
                       "picks": reg.picks() if st["pruned"] is not None and not reg.unstructured else None}
    Path(where).mkdir(parents=True, exist_ok=True)
    E.atomic_write_text(Path(where) / f"rank{E.get_rank()}_{phase}.json", json.dumps(E.log.to_jsonable(rec), indent=1))


def prune_job(o: JobOptions, run: RunDir) -> dict[str, Any]:
    """Base -> (regularize) -> remove -> fine-tune -> evaluate -> report, resumable phase by phase."""
    if o.method not in ("l1", "greg1", "greg2"):
        raise UserError(f"unknown method {o.method!r}: expected l1, greg1 or greg2 (or use `regprune scratch`)")
    if o.criterion not in CRITERIA:
        raise UserError(f"unknown criterion {o.criterion!r}: expected one of {', '.join(CRITERIA)}")
    bundle = _data(o)
    x = example_input(bundle)
    train_loader, test_loader = _loaders(o, bundle)
    model = load_base(o, bundle).cpu()
    dense = copy.deepcopy(model)
    results = run.state["results"]
    if "base" not in results:
        run.mark("base", base=_eval(model, test_loader, o.device))
    model.cpu()
    _debug_rank_dump("base", model)
    graph, plan = prune_plan(o, model, x)
    run.mark("plan", plan={"ratios": plan.ratios, "removal": plan.removal, "dense_macs": plan.dense_macs,
                           "pruned_macs": plan.pruned_macs, "speedup": plan.speedup, "note": plan.note})
    if plan.note and E.is_main():
        print(f"note: {plan.note}", file=sys.stderr)
    _debug_rank_dump("plan", model, plan=plan)
    history: list[dict] = []
    picks: dict[str, list[int]] | None = None
    keeper = None

    if o.method == "l1":
        picks = l1_picks(graph, plan_targets(graph, plan), o.pick, o.seed, o.criterion)
    else:
        reg_loader, _ = _loaders(o, bundle, o.reg_batch_size)
        cfg = greg_config(o, len(reg_loader))
        reg = Regularizer(graph, plan, o.method, cfg, o.unstructured)
        if run.done("regularize"):
            model, _ = load_model(run.file("regularized.safetensors"), model=model)
            reg.load_state_dict(E.safe_load(run.file("greg_state.pt")))
        else:
            tcfg = _train_config(o, epochs=1, lr=cfg.lr_prune, schedule="constant", warmup=0.0,
                                 max_steps=cfg.planned_iters(o.method)["total"])
            trainer = E.Trainer(model, reg_loader, test_loader, tcfg, run_dir=run.path, phase="regularize",
                                hooks=[reg, _StatusLine(reg, max(1, cfg.update_reg_interval * 10))])
            trainer.fit(resume_from=run.checkpoint("regularize"))
            model.cpu()
            if E.is_main():
                save_model(model, run.file("regularized.safetensors"))
                E.atomic_save(reg.state_dict(), run.file("greg_state.pt"))
            run.mark("regularize", regularize={"status": reg.status(), "eval": _eval(model, test_loader, o.device)})
            model.cpu()
        history = reg.greg.history
        if o.unstructured:
            keeper = reg.mask_keeper()
        else:
            picks = reg.picks()
        _debug_rank_dump("regularize", model, reg=reg, picks=picks)

    if o.unstructured:
        if o.method == "l1":
            raise UserError("unstructured pruning is available for greg1 and greg2")
        pruned = reg.prune()
        if not run.done("prune"):
            before = _eval(pruned, test_loader, o.device)
            run.mark("prune", pruned_before_recal=before, pruned_before_ft=_recalibrate(o, pruned, train_loader,
                                                                                         test_loader, before))
    else:
        if run.done("prune"):
            pruned, _ = load_model(run.file("pruned_init.safetensors"))
        else:
            pruned = apply_picks(analyze(model, x, include_coupled=o.include_coupled), picks)
            before = _eval(pruned, test_loader, o.device)
            after = _recalibrate(o, pruned, train_loader, test_loader, before)
            if E.is_main():
                save_model(pruned, run.file("pruned_init.safetensors"))
                E.atomic_write_text(run.file("picks.json"), json.dumps(picks, indent=1))
            run.mark("prune", pruned_before_recal=before, pruned_before_ft=after,
                     verification=getattr(pruned, "regprune_verification", None))
            pruned.cpu()
    _debug_rank_dump("prune", pruned, picks=picks)

    if not run.done("finetune"):
        fcfg = _train_config(o, epochs=o.ft_epochs, lr=o.ft_lr, schedule=o.ft_lr_schedule, warmup=o.ft_warmup_epochs)
        hooks = [keeper] if keeper is not None else []
        ft_loader = train_loader
        trainer = E.Trainer(pruned, ft_loader, test_loader, fcfg, run_dir=run.path, phase="finetune", hooks=hooks)
        trainer.fit(resume_from=run.checkpoint("finetune"))
        pruned.cpu()
        final = _eval(pruned, test_loader, o.device)
        best = max([r["test_top1"] for r in trainer.metrics if "test_top1" in r] + [final["top1"]])
        if E.is_main():
            save_model(pruned, run.file("model.safetensors"),
                       {"method": o.method, "dataset": bundle.name, "top1": final["top1"], "ratios": plan.ratios,
                        "speedup": plan.speedup, "seed": o.seed, "input_size": bundle.image_size})
        run.mark("finetune", final=final, best_top1=best)
    else:
        pruned, _ = load_model(run.file("model.safetensors"), model=pruned if o.unstructured else None)
    _debug_rank_dump("finetune", pruned, picks=picks)
    return _report(o, run, dense.cpu(), pruned.cpu(), x, bundle, history, picks)


def _recalibrate(o: JobOptions, model: nn.Module, train_loader, test_loader, before: dict) -> dict:
    """BN recalibration after removal (`--bn-recal N` training batches, no gradient steps); returns the evaluation
    the fine-tuning starts from (`before` itself when recalibration is off or the model has no BatchNorm)."""
    used = 0
    if o.bn_recal:
        dev = E.resolve_device(o.device, E.get_local_rank())
        used = E.recalibrate_bn(model.to(dev), train_loader, o.bn_recal, dev)
        if E.is_distributed():  # each rank saw its own shard: every rank takes rank 0's statistics
            import torch.distributed as dist

            for buf in model.buffers():
                dist.broadcast(buf, src=0)
    model.cpu()
    if not used:
        return dict(before, bn_recal_batches=0)
    return dict(_eval(model, test_loader, o.device), bn_recal_batches=used)


def _greg_lines(reg: dict | None, res: dict) -> list[str]:
    """The report's lines on GReg's regularization: measured vs predicted kept/pruned ratio, GReg-2's overlap with
    L1, and what BN recalibration did to the accuracy right after removal."""
    lines = []
    st = (reg or {}).get("status") or {}
    ratios = [v for v in (st.get("mag_ratio") or {}).values() if v is not None]
    pred = st.get("predicted") or {}
    if ratios:
        lines.append(f"GReg kept/pruned magnitude ratio at removal: min {min(ratios):.3g} over {len(ratios)} layers "
                     f"(schedule predicts {pred.get('predicted_ratio', float('nan')):.3g}, integrated decay "
                     f"{pred.get('integrated_decay', float('nan')):.2f}; growth stopped by {st.get('stop_reason')})")
    if st.get("overlap_l1"):
        ov = list(st["overlap_l1"].values())
        lines.append(f"GReg-2 picks shared with L1's: {100 * sum(ov) / len(ov):.1f}% on average over {len(ov)} layers")
    b, a = res.get("pruned_before_recal"), res.get("pruned_before_ft")
    if b and a and a.get("bn_recal_batches"):
        lines.append(f"BN recalibration ({a['bn_recal_batches']} batches): top-1 right after removal "
                     f"{b['top1']:.2f}% -> {a['top1']:.2f}%")
    return lines


def _report(o: JobOptions, run: RunDir, dense: nn.Module, pruned: nn.Module, x: torch.Tensor, bundle: DataBundle,
            history: list[dict], picks: dict[str, list[int]] | None) -> dict[str, Any]:
    from .report import latency_lines, try_onnxruntime_latency

    res = run.state["results"]
    lat1 = compare_latency({"dense": dense, "pruned": pruned}, x, repeats=20)
    xb = x.expand(64, *x.shape[1:]).contiguous()
    lat64 = compare_latency({"dense": dense, "pruned": pruned}, xb, repeats=5, warmup=0)  # rounds calibrate = warm up
    ort1, ort_note = try_onnxruntime_latency({"dense": dense, "pruned": pruned}, x, repeats=20)
    lats = {"cpu_ms_b1": (lat1, 3), "cpu_ms_b64": (lat64, 2), "ort_ms_b1": (ort1, 3)}
    rows = [summary_row("dense", dense, x, res.get("base")), summary_row(f"pruned ({o.method})", pruned, x, res.get("final"))]
    shown = [dict(r) for r in rows]  # the table shows "median ± IQR"; the JSON rows keep the numbers
    for r, d, k in zip(rows, shown, ("dense", "pruned")):
        for col, (lat, digits) in lats.items():
            if lat is not None:
                r[col], r[f"{col}_iqr"] = round(lat[k], digits), round(lat.stats[k].iqr_ms, digits)
                d[col] = lat.stats[k].text(digits)
    if o.unstructured:
        total = sum(p.numel() for n, p in pruned.named_parameters() if p.dim() > 1)
        zeros = sum(int((p == 0).sum()) for n, p in pruned.named_parameters() if p.dim() > 1)
        rows[1]["sparsity"] = shown[1]["sparsity"] = f"{100 * zeros / total:.1f}%"
    columns = list(shown[0]) + (["sparsity"] if o.unstructured else [])
    table = format_table(shown, columns)
    table += "\n" + latency_lines({"PyTorch CPU batch 1": lat1, "PyTorch CPU batch 64": lat64,
                                   "ONNX Runtime CPU batch 1": ort1})
    if ort_note:
        table += "\n" + ort_note
    for line in _greg_lines(res.get("regularize"), res):
        table += "\n" + line
    ver = res.get("verification")
    if ver:
        table += (f"\nverified: the pruned model equals the dense one with the removed channels zeroed "
                  f"({' and '.join(ver['modes'])} mode, max relative difference {ver['max_rel_diff']:.1e})")
    macs_speedup = rows[0]["MMACs"] / rows[1]["MMACs"]
    report = {"method": o.method, "model": o.model, "data": bundle.name, "rows": rows, "macs_speedup": macs_speedup,
              "latency_speedup_b1": lat1["dense"] / lat1["pruned"], "latency_speedup_b64": lat64["dense"] / lat64["pruned"],
              "latency_verdict_b1": lat1.verdict().text(), "latency_verdict_b64": lat64.verdict().text(),
              "latency": {"cpu_b1": lat1.to_dict(), "cpu_b64": lat64.to_dict(),
                          "onnxruntime_b1": ort1.to_dict() if ort1 is not None else None,
                          "onnxruntime_note": ort_note or None},
              "pruned_before_finetune": res.get("pruned_before_ft"), "best_top1": res.get("best_top1"),
              "pruned_before_bn_recal": res.get("pruned_before_recal"),
              "plan": res.get("plan"), "regularize": res.get("regularize"),
              "verification": res.get("verification")}
    if E.is_main():
        E.atomic_write_text(run.file("report.json"), json.dumps(E.log.to_jsonable(report), indent=1))
        E.atomic_write_text(run.file("report.md"), f"# {o.method} on {o.model} / {bundle.name}\n\n{table}\n")
        _plots(run, dense, pruned, history, picks)
    return {"table": table, "report": report}


def _plots(run: RunDir, dense: nn.Module, pruned: nn.Module, history: list[dict], picks: dict | None) -> None:
    plots = run.path / "plots"
    plots.mkdir(exist_ok=True)
    widths = write_widths(run.file("widths.json"), dense, pruned)
    plot_widths(plots / "widths.png", widths)
    metrics = E.read_metrics(run.path / E.METRICS_FILE) if (run.path / E.METRICS_FILE).exists() else []
    evals = [r for r in metrics if "test_top1" in r and r.get("kind") == "epoch"]
    if evals:
        series: dict[str, tuple[list, list]] = {}
        offset, last_phase, xs_all = 0.0, None, []
        for r in evals:
            if r["phase"] != last_phase and last_phase is not None:
                offset = xs_all[-1] if xs_all else 0.0
            last_phase = r["phase"]
            xs, ys = series.setdefault(r["phase"], ([], []))
            xs.append(offset + float(r.get("epoch", 0)))
            ys.append(float(r["test_top1"]))
            xs_all.append(xs[-1])
        plot_lines(plots / "accuracy.png", series, "epoch (phases in sequence)", "test top-1 (%)", "accuracy over the run")
    if history:
        its = [h["iter"] for h in history]
        plot_lines(plots / "penalty.png", {"lambda max (pruned)": (its, [h["lambda_max"] for h in history]),
                                           "lambda min": (its, [h["lambda_min"] for h in history])},
                   "iteration", "penalty lambda", "GReg penalty over time")
        for layer in history[-1].get("norms", {}):
            plot_filter_norms(plots / f"filter_norms_{layer}.png", history, layer, (picks or {}).get(layer))
