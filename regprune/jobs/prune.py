"""The prune job: base -> (GReg regularization) -> picks -> removal -> BN recalibration -> fine-tune -> report,
resumable phase by phase; with its plan, GReg schedule and the checks made before a run directory exists."""

from __future__ import annotations

import copy
import difflib
import json
import sys
import typing
from typing import Any

import torch
import torch.nn as nn

from .. import engine as E
from ..api import Regularizer, l1_picks, plan_targets, unstructured_plan
from ..errors import UserError
from ..graph import analyze
from ..methods.greg import GRegConfig
from ..methods.l1 import CRITERIA
from ..models import model_info
from ..ratios import make_plan
from ..surgery import apply_picks, load_model, save_model
from .common import (NO_BASE, JobInputs, RunDir, check_pretrained, evaluate_on, example_input, job_inputs,
                     job_loaders, train_config)
from .debug import rank_dump
from .options import JobOptions, check_type
from .report import prune_report

__all__ = ["prune_job", "greg_config", "prune_plan", "check_options", "check_plan_options"]


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
        trainer.set_progress(greg=s["phase"], lam=f"{s['lambda_min']:.2g}..{s['lambda_max']:.2g}",
                             kept_pruned=f"{min(ratios):.3g}" if ratios else "-")


def greg_config(o: JobOptions, steps_per_epoch: int) -> GRegConfig:
    """The paper's GReg schedule (budget-aware, scaled to --reg-iters when given, for the run's momentum), with any
    per-name overrides. Raises UserError on an unknown setting, a value not of the setting's type (naming the
    setting and the type) or out of its range, or `lr` / `momentum` settings that contradict the options."""
    hints = typing.get_type_hints(GRegConfig)
    unknown = [k for k in o.prune.greg if k not in hints and k != "lr"]
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(hints), n=1)
        raise UserError(f"unknown GReg setting {unknown[0]!r}" + (f" (did you mean {near[0]}?)" if near else "")
                        + f"; known: {', '.join(sorted(hints))}")
    overrides = {k: check_type(f"--greg {k}", hints[k], v) if k in hints else v for k, v in o.prune.greg.items()}
    if "lr" in overrides and not ("lr_prune" in overrides and overrides["lr"] == overrides["lr_prune"]):
        raise UserError("--greg lr is not a GReg setting: use lr_prune (the regularization phase's learning rate)")
    overrides.pop("lr", None)  # the same value as lr_prune: a redundant alias
    if "momentum" in overrides and overrides["momentum"] != o.train.momentum:
        raise UserError(f"--greg momentum={overrides['momentum']} differs from the optimizer's momentum "
                        f"{o.train.momentum:g}: set it with --momentum (GReg's schedule follows it)")
    overrides.setdefault("pick", o.prune.pick)
    overrides.setdefault("penalty", "group" if o.prune.penalize_coupled else o.prune.penalty)
    overrides.setdefault("criterion", o.prune.criterion)
    overrides.setdefault("unstructured", o.prune.unstructured)
    overrides.setdefault("momentum", o.train.momentum)
    try:
        if o.prune.reg_iters is not None:
            return GRegConfig.scaled(int(o.prune.reg_iters), o.prune.method, **overrides)
        return GRegConfig(**overrides)
    except TypeError as exc:
        raise UserError(f"bad GReg setting: {exc}") from None


def prune_plan(o: JobOptions, model: nn.Module, x: torch.Tensor):
    """Graph and removal plan for the options (shared by the job and --dry-run)."""
    _check_scope(o)
    graph = analyze(model, x, include_coupled=o.prune.include_coupled)
    if o.prune.sparsity is not None:
        if not o.prune.unstructured:
            raise UserError("--sparsity is the unstructured scope: add --unstructured, or plan filters with --ratios, "
                            "--speedup or --target-macs")
        return graph, unstructured_plan(graph, o.prune.sparsity, o.prune.skip or None)
    plan = make_plan(graph, o.prune.ratios, speedup=o.prune.speedup, target_macs=o.prune.target_macs, skip=o.prune.skip or None,
                     round_to=o.prune.round_to)
    if not plan.removal:
        raise UserError("the ratios prune nothing: every selected layer keeps all its channels")
    return graph, plan


def _check_scope(o: JobOptions) -> None:
    """The unstructured scope (--sparsity) against the filter-plan options."""
    if o.prune.sparsity is not None and (o.prune.ratios or o.prune.speedup is not None or o.prune.target_macs is not None):
        raise UserError("give either --sparsity (unstructured) or --ratios/--speedup/--target-macs, not both")
    if o.prune.sparsity is not None and not o.prune.unstructured:
        raise UserError("--sparsity is the unstructured scope: add --unstructured")
    if o.prune.sparsity is not None and o.prune.round_to is not None:
        raise UserError("--round-to applies to filter plans, not to --sparsity: drop it")
    if o.prune.sparsity is not None and o.prune.include_coupled:
        raise UserError("--include-coupled applies to filter plans, not to --sparsity: drop it")


def check_plan_options(o: JobOptions) -> None:
    """The prune job's checks that need neither a base model nor data (the run and --dry-run both make them)."""
    if o.prune.method not in ("l1", "greg1", "greg2"):
        raise UserError(f"unknown method {o.prune.method!r}: expected l1, greg1 or greg2 (or use `regprune scratch`)")
    if o.prune.criterion not in CRITERIA:
        raise UserError(f"unknown criterion {o.prune.criterion!r}: expected one of {', '.join(CRITERIA)}")
    # the same rules make_plan applies, checked here before any data is loaded
    if o.prune.speedup is not None and o.prune.target_macs is not None:
        raise UserError("give either --speedup or --target-macs, not both")
    if o.prune.speedup is not None and not o.prune.speedup >= 1.0:
        raise UserError(f"speedup {o.prune.speedup:g} out of range: expected a number >= 1")
    if o.prune.target_macs is not None and not 0.0 < o.prune.target_macs <= 1.0:
        raise UserError(f"MACs target {o.prune.target_macs:g} out of range: expected a kept fraction in (0, 1]")
    _check_scope(o)
    if o.prune.bn_recal < 0:
        raise UserError(f"--bn-recal must be >= 0 batches, got {o.prune.bn_recal}")
    if o.prune.unstructured and o.prune.method == "l1":
        raise UserError("unstructured pruning is available for greg1 and greg2")
    if o.prune.method == "l1":
        given = [flag for flag, on in (("--penalty group", o.prune.penalty == "group" or o.prune.penalize_coupled),
                                       ("--greg", bool(o.prune.greg)), ("--reg-iters", o.prune.reg_iters is not None),
                                       ("--reg-batch-size", o.prune.reg_batch_size is not None)) if on]
        if given:
            raise UserError(f"{given[0]} is a GReg option; --method l1 has no regularization phase")
    if not o.prune.ratios and o.prune.speedup is None and o.prune.target_macs is None and o.prune.sparsity is None:
        raise UserError("say how much to prune: --ratios SPEC, --speedup X, --target-macs F (or --unstructured "
                        "--sparsity F)")
    if o.prune.method != "l1":
        cfg = greg_config(o, 1)
        train_config(o, epochs=1, lr=cfg.lr_prune, schedule="constant", warmup=0.0,
                      max_steps=cfg.planned_iters(o.prune.method)["total"]).validate()
    train_config(o, o.finetune).validate()


def check_options(o: JobOptions, job: str) -> None:
    """Mistakes visible in the options alone (no data, model file or run directory needed).

    The CLI calls this before it creates a run directory, so a typo leaves nothing behind to --overwrite.
    """
    model_info(o.run.model)
    if job == "train":
        train_config(o, o.train).validate()
        return
    if o.prune.method not in ("l1", "greg1", "greg2"):
        raise UserError(f"unknown method {o.prune.method!r}: expected l1, greg1 or greg2 (or use `regprune scratch`)")
    if o.prune.criterion not in CRITERIA:
        raise UserError(f"unknown criterion {o.prune.criterion!r}: expected one of {', '.join(CRITERIA)}")
    if o.prune.base is None:
        raise UserError(NO_BASE)
    if o.prune.base == "pretrained":
        check_pretrained(o)
    check_plan_options(o)


def prune_job(o: JobOptions, run: RunDir, inputs: JobInputs | None = None) -> dict[str, Any]:
    """Base -> (regularize) -> remove -> fine-tune -> evaluate -> report, resumable phase by phase. `inputs`: the
    dataset and base when already read (default: `job_inputs(o, "prune")`). Raises UserError on a mistake in the
    options, the data or the base (see `job_inputs`) or the plan."""
    if o.prune.method not in ("l1", "greg1", "greg2"):
        raise UserError(f"unknown method {o.prune.method!r}: expected l1, greg1 or greg2 (or use `regprune scratch`)")
    if o.prune.criterion not in CRITERIA:
        raise UserError(f"unknown criterion {o.prune.criterion!r}: expected one of {', '.join(CRITERIA)}")
    bundle, model, planned = inputs or job_inputs(o, "prune")
    model = model.cpu()
    x = example_input(bundle)
    train_loader, test_loader = job_loaders(o, bundle)
    dense = copy.deepcopy(model)
    results = run.state["results"]
    if "base" not in results:
        run.mark("base", base=evaluate_on(model, test_loader, o.run.device))
    model.cpu()
    rank_dump(o.run.debug_rank_dump, "base", model)
    graph, plan = planned or prune_plan(o, model, x)
    run.mark("plan", plan={"ratios": plan.ratios, "removal": plan.removal, "dense_macs": plan.dense_macs,
                           "pruned_macs": plan.pruned_macs, "speedup": plan.speedup, "note": plan.note})
    if plan.note and E.is_main():
        print(f"note: {plan.note}", file=sys.stderr)
    rank_dump(o.run.debug_rank_dump, "plan", model, plan=plan)
    history: list[dict] = []
    picks: dict[str, list[int]] | None = None
    keeper = None

    if o.prune.method == "l1":
        picks = l1_picks(graph, plan_targets(graph, plan), o.prune.pick, o.run.seed, o.prune.criterion)
    else:
        reg_loader, _ = job_loaders(o, bundle, o.prune.reg_batch_size)
        cfg = greg_config(o, len(reg_loader))
        reg = Regularizer(graph, plan, o.prune.method, cfg, o.prune.unstructured)
        if run.done("regularize"):
            model, _ = load_model(run.file("regularized.safetensors"), model=model)
            reg.load_state_dict(E.safe_load(run.file("greg_state.pt")))
        else:
            warning = cfg.predict(o.prune.method)["warning"]
            if warning and E.is_main() and run.checkpoint("regularize") is None:  # said once, not again on resume
                print(f"warning: {warning}", file=sys.stderr, flush=True)
            tcfg = train_config(o, epochs=1, lr=cfg.lr_prune, schedule="constant", warmup=0.0,
                                 max_steps=cfg.planned_iters(o.prune.method)["total"])
            trainer = E.Trainer(model, reg_loader, test_loader, tcfg, run_dir=run.path, phase="regularize",
                                hooks=[reg, _StatusLine(reg, max(1, cfg.update_reg_interval * 10))])
            trainer.fit(resume_from=run.checkpoint("regularize"))
            model.cpu()
            if E.is_main():
                save_model(model, run.file("regularized.safetensors"))
                E.atomic_save(reg.state_dict(), run.file("greg_state.pt"))
            run.mark("regularize", regularize={"status": reg.status(), "eval": evaluate_on(model, test_loader, o.run.device),
                                               "warning": warning})
            model.cpu()
        history = reg.greg.history
        if o.prune.unstructured:
            keeper = reg.mask_keeper()
        else:
            picks = reg.picks()
        rank_dump(o.run.debug_rank_dump, "regularize", model, reg=reg, picks=picks)

    if o.prune.unstructured:
        if o.prune.method == "l1":
            raise UserError("unstructured pruning is available for greg1 and greg2")
        pruned = reg.prune()
        if not run.done("prune"):
            before = evaluate_on(pruned, test_loader, o.run.device)
            run.mark("prune", pruned_before_recal=before, pruned_before_ft=_recalibrate(o, pruned, train_loader,
                                                                                         test_loader, before))
    else:
        if run.done("prune"):
            pruned, _ = load_model(run.file("pruned_init.safetensors"))
        else:
            pruned = apply_picks(analyze(model, x, include_coupled=o.prune.include_coupled), picks)
            before = evaluate_on(pruned, test_loader, o.run.device)
            after = _recalibrate(o, pruned, train_loader, test_loader, before)
            if E.is_main():
                save_model(pruned, run.file("pruned_init.safetensors"))
                E.atomic_write_text(run.file("picks.json"), json.dumps(picks, indent=1))
            run.mark("prune", pruned_before_recal=before, pruned_before_ft=after,
                     verification=getattr(pruned, "regprune_verification", None))
            pruned.cpu()
    rank_dump(o.run.debug_rank_dump, "prune", pruned, picks=picks)

    if not run.done("finetune"):
        fcfg = train_config(o, o.finetune)
        hooks = [keeper] if keeper is not None else []
        ft_loader = train_loader
        trainer = E.Trainer(pruned, ft_loader, test_loader, fcfg, run_dir=run.path, phase="finetune", hooks=hooks)
        trainer.fit(resume_from=run.checkpoint("finetune"))
        pruned.cpu()
        final = evaluate_on(pruned, test_loader, o.run.device)
        best = max([r["test_top1"] for r in trainer.metrics if "test_top1" in r] + [final["top1"]])
        if E.is_main():
            save_model(pruned, run.file("model.safetensors"),
                       {"method": o.prune.method, "dataset": bundle.name, "top1": final["top1"], "ratios": plan.ratios,
                        "speedup": plan.speedup, "seed": o.run.seed, "input_size": bundle.image_size})
        run.mark("finetune", final=final, best_top1=best)
    else:
        pruned, _ = load_model(run.file("model.safetensors"), model=pruned if o.prune.unstructured else None)
    rank_dump(o.run.debug_rank_dump, "finetune", pruned, picks=picks)
    return prune_report(o, run, dense.cpu(), pruned.cpu(), x, bundle, history, picks)


def _recalibrate(o: JobOptions, model: nn.Module, train_loader, test_loader, before: dict) -> dict:
    """BN recalibration after removal (`--bn-recal N` training batches, no gradient steps); returns the evaluation
    the fine-tuning starts from (`before` itself when recalibration is off or the model has no BatchNorm)."""
    used = 0
    if o.prune.bn_recal:
        dev = E.resolve_device(o.run.device, E.get_local_rank())
        used = E.recalibrate_bn(model.to(dev), train_loader, o.prune.bn_recal, dev)
        if E.is_distributed():  # each rank saw its own shard: every rank takes rank 0's statistics
            import torch.distributed as dist

            for buf in model.buffers():
                dist.broadcast(buf, src=0)
    model.cpu()
    if not used:
        return dict(before, bn_recal_batches=0)
    return dict(evaluate_on(model, test_loader, o.run.device), bn_recal_batches=used)
