"""The `regprune` command line: thin parsing over the jobs in `pipeline`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


def _ratio_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(v) or math.isinf(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _common(p: argparse.ArgumentParser, data_default: str | None = None) -> None:
    p.add_argument("--model", help="model name (see `regprune models`)")
    p.add_argument("--data", default=data_default, help="dataset (default mnist5k): mnist5k, digits, fashion-mnist[:PATH], "
                   "cifar10:PATH, cifar100:PATH, imagefolder:PATH")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, help="data loader worker processes")
    p.add_argument("--seed", type=int)
    p.add_argument("--limit-train", type=int, help="use only this many training images")
    p.add_argument("--limit-test", type=int, help="use only this many test images")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--amp", action="store_true", default=None, help="mixed precision on CUDA")
    p.add_argument("--channels-last", action="store_true", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--checkpoint-every", type=int, help="optimizer steps between checkpoints (default: each epoch)")
    p.add_argument("--shortcut", choices=["A", "B"], help="CIFAR ResNet shortcut option (default A)")


def _run_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="run directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    p.add_argument("--recipe", help="YAML recipe with option defaults (command-line flags win)")


def _train_opts(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}epochs", type=float)
    p.add_argument(f"--{prefix}lr", type=float)
    p.add_argument(f"--{prefix}lr-schedule", help="'cosine', 'constant' or per-epoch steps like 0:0.1,100:0.01")
    p.add_argument(f"--{prefix}warmup-epochs", type=float)


def _ratio_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratios", help="globs '*layer*.conv1:0.5', stage list '[0,0.75,0.75,0.32,0]', "
                   "VGG ranges '[1-15:0.7]', or one number for the whole scope")
    p.add_argument("--speedup", type=_ratio_float, help="target MACs speedup, solved over the scope")
    p.add_argument("--target-macs", type=_ratio_float, help="target fraction of dense MACs to keep (e.g. 0.41)")
    p.add_argument("--skip", action="append", help="glob of layers never to prune (repeatable)")
    p.add_argument("--round-to", type=int, help="round kept widths to a multiple of this (e.g. 8)")
    p.add_argument("--include-coupled", action="store_true", default=None,
                   help="also prune residual-coupled groups (and stems)")


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar."""
    ap = _Parser(prog="regprune", description="Structured pruning by regularization: a smaller, faster dense model.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="list model names")
    p.add_argument("pattern", nargs="?", help="glob filter, e.g. 'torchvision.resnet*'")

    p = sub.add_parser("inspect", help="channel groups, scope and the MACs of a ratio spec")
    p.add_argument("--model", required=True)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--shortcut", choices=["A", "B"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _ratio_opts(p)

    p = sub.add_parser("train", help="train a dense base model")
    _common(p)
    _run_opts(p)
    _train_opts(p)
    for flag in ("momentum", "weight-decay", "label-smoothing"):
        p.add_argument(f"--{flag}", type=float)
    p.add_argument("--nesterov", action="store_true", default=None)
    p.add_argument("--no-wd-bn-bias", action="store_true", default=None)

    p = sub.add_parser("eval", help="evaluate a model file")
    p.add_argument("model_file")
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--limit-test", type=int)

    p = sub.add_parser("prune", help="prune a trained model: l1, greg1 or greg2, then fine-tune")
    p.add_argument("--method", choices=["l1", "greg1", "greg2"])
    p.add_argument("--base", help="model file to prune, 'pretrained' (torchvision) or 'random' (on purpose)")
    _common(p)
    _run_opts(p)
    _ratio_opts(p)
    p.add_argument("--pick", choices=["min", "max", "rand"])
    p.add_argument("--criterion", choices=["filter", "group"],  # methods.l1.CRITERIA (not imported: torch-free parsing)
                   help="how channels are picked (L1, GReg-1 at the start, GReg-2 at its pick): the pruned filter's "
                        "norm (default, the papers') or the channel's magnitude over its whole coupled group")
    p.add_argument("--unstructured", action="store_true", default=None, help="per-weight instead of per-filter")
    p.add_argument("--sparsity", type=_ratio_float,
                   help="with --unstructured: zero this fraction of the weights of every conv and linear layer "
                        "(the paper's ResNet-50: 0.827)")
    p.add_argument("--penalty", choices=["filter", "group"],
                   help="GReg's penalty: on the pruned filters only (default, the paper's) or on every member of "
                        "their channel group: BN scale and shift and the consumers' input channels (Group-GReg)")
    p.add_argument("--penalize-coupled", action="store_true", default=None, help=argparse.SUPPRESS)  # old --penalty group
    p.add_argument("--bn-recal", type=int, metavar="N",
                   help="re-estimate BatchNorm statistics on N training batches after removal (default 100; 0: off)")
    p.add_argument("--reg-iters", type=int,
                   help="fit GReg's whole schedule into about this many iterations, with levels set so the penalty "
                        "integrates enough decay at the run's lr and momentum without ringing (see --dry-run)")
    p.add_argument("--reg-batch-size", type=int)
    p.add_argument("--greg", action="append", metavar="NAME=VALUE",
                   help="GReg setting by its paper name, e.g. update_reg_interval=5 (repeatable)")
    _train_opts(p, "ft-")
    for flag in ("momentum", "weight-decay", "label-smoothing"):
        p.add_argument(f"--{flag}", type=float)
    p.add_argument("--dry-run", action="store_true", help="print the plan without data or training")

    p = sub.add_parser("scratch", help="prune from scratch: gates + nuclear-norm + MACs losses, then reconfigure")
    _common(p)
    _run_opts(p)
    _train_opts(p)
    p.add_argument("--target-macs", type=_ratio_float, help="fraction of dense MACs to keep (e.g. 0.41)")
    p.add_argument("--search-epochs", type=float, help="epochs with gates learning (S_max)")
    p.add_argument("--alpha-nuc", type=float)
    p.add_argument("--alpha-mac", type=float)
    p.add_argument("--nuc-every", type=int)
    p.add_argument("--mac-grad-inputs", action="store_true", default=None,
                   help="MACs loss differentiable in input counts too (the authors hold them constant)")
    p.add_argument("--mac-norm", choices=["matched", "unit", "dense"],
                   help="MACs loss scale: 'matched' (default: the paper's ResNet-50 push relative to the task "
                        "gradient, at any network size), 'unit' (the paper's formula in GMACs) or 'dense' "
                        "(alpha-mac x squared gap in fractions of dense MACs)")
    p.add_argument("--gate-lr-scale", type=float, help="gates' learning-rate factor (default 1, as the official code)")
    p.add_argument("--tie-spread", type=float,
                   help="MACs-gradient factor 1 +/- this by the rank of each channel's weight magnitude in its "
                        "group (default 0.5; 0: the paper's identical push)")
    p.add_argument("--exact-budget", dest="exact_budget", action=argparse.BooleanOptionalAction, default=None,
                   help="at S_max move gates by importance until MACs are within 1%% of the budget (default off, "
                        "as in the paper: the gates stay where the search left them)")
    p.add_argument("--snap-floor", type=float,
                   help="with --exact-budget, the fraction of each group's channels the snap never goes below "
                        "(default 0.1)")
    p.add_argument("--no-wd-bn-bias", action="store_true", default=None)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--dry-run", action="store_true")

    p = sub.add_parser("export", help="export a model file to ONNX, checked in ONNX Runtime against PyTorch "
                                      "(needs: pip install 'regprune[export]')")
    p.add_argument("model_file")
    p.add_argument("--onnx", required=True, help="output .onnx path (written only if the check passes)")
    p.add_argument("--input-size", type=int, default=None, help="image side (default: the model's native size)")
    p.add_argument("--in-channels", type=int, default=None)
    p.add_argument("--atol", type=float, default=None,
                   help="refuse the export when max |ONNX - PyTorch| on random inputs (batch 1 and 4) exceeds "
                        "ATOL x max(1, max |output|) (default 1e-4)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("demo", help="the main job: train a base on MNIST, GReg-1 to ~2x fewer MACs, fine-tune, report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    return ap


# ---------------------------------------------------------------------------------------------- helpers
_CLI_TO_OPT = {"lr_schedule": "lr_schedule", "ft_lr_schedule": "ft_lr_schedule"}
_NOT_OPTIONS = {"cmd", "overwrite", "resume", "recipe", "dry_run", "json", "quick", "pattern", "model_file",
                "greg"}


def _load_recipe(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.exists():
        raise UserError(f"recipe {path} does not exist")
    try:
        # safe_load builds only plain data: python/* tags (object construction, calls) are refused
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UserError(f"recipe {path} must be a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _options(args: argparse.Namespace, defaults: dict[str, Any]):
    from .pipeline import JobOptions

    values: dict[str, Any] = dict(defaults)
    recipe: dict[str, Any] = {}
    if getattr(args, "recipe", None):
        recipe = _load_recipe(args.recipe)
        recipe.pop("paper", None)  # the paper's result, for people reading the recipe
        recipe.pop("description", None)
        values.update(recipe)
    if getattr(args, "resume", None):
        saved = Path(args.resume) / "options.json"
        if not saved.is_file():
            raise UserError(f"cannot resume: {args.resume} holds no regprune run (no options.json)")
        try:
            saved_values = json.loads(saved.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot resume: {saved} is unreadable ({exc})") from None
        if not isinstance(saved_values, dict):
            raise UserError(f"cannot resume: {saved} is not a regprune options file")
        values.update(saved_values)
    for k, v in vars(args).items():
        if k in _NOT_OPTIONS or v is None:
            continue
        values[k] = v
    if getattr(args, "greg", None):
        if not isinstance(values.get("greg") or {}, dict):
            raise UserError(f"option greg must be a mapping of GReg settings, got {values['greg']!r}")
        g = dict(values.get("greg") or {})
        for item in args.greg:
            if "=" not in item:
                raise UserError(f"--greg expects NAME=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            try:
                g[k.strip()] = json.loads(v)
            except json.JSONDecodeError:
                g[k.strip()] = v
        values["greg"] = g
    if getattr(args, "resume", None):
        values["out"] = args.resume
    return JobOptions.from_dict(values)


def _print(text: str) -> None:
    from .engine import is_main

    if is_main():
        print(text, flush=True)


# ---------------------------------------------------------------------------------------------- commands
def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    names = list_models(args.pattern)
    if not names:
        raise UserError(f"no model matches {args.pattern!r}")
    print("\n".join(names))
    return 0


def _inspect_model(args: argparse.Namespace):
    import torch

    from .models import create_model, model_info

    info = model_info(args.model)
    classes = args.num_classes or (1000 if info.family in ("torchvision", "timm") else 10)
    size = args.input_size or info.input_size
    kw = {"shortcut": args.shortcut} if args.shortcut else {}
    model = create_model(args.model, num_classes=classes, in_channels=args.in_channels, **kw)
    return model, torch.zeros(1, args.in_channels, size, size)


def cmd_inspect(args: argparse.Namespace) -> int:
    import copy

    from .api import l1_picks, plan_targets
    from .counting import count_macs, count_params
    from .graph import analyze
    from .ratios import make_plan
    from .report import format_table
    from .surgery import apply_picks

    model, x = _inspect_model(args)
    graph = analyze(model, x, include_coupled=bool(args.include_coupled))
    uncounted = graph.uncounted
    plan = pruned = None
    if args.ratios or args.speedup or args.target_macs:
        plan = make_plan(graph, args.ratios, speedup=args.speedup, target_macs=args.target_macs, skip=args.skip,
                         round_to=args.round_to)
        # the plan is carried out on a copy with L1 picks and verified, as `prune` would
        clone = copy.deepcopy(model)
        cgraph = analyze(clone, x, include_coupled=bool(args.include_coupled))
        pruned = apply_picks(cgraph, l1_picks(cgraph, plan_targets(cgraph, plan)))
    groups = [{"root": g.root, "channels": g.channels, "members": [m.name for m in g.members],
               "macs_share": round(g.macs_share, 5), "kind": g.kind, "in_scope": g.in_scope, "unsafe": g.unsafe,
               "reason": g.reason} for g in graph.groups.values()]
    if args.json:
        out: dict[str, Any] = {"model": args.model, "dense_macs": graph.total_macs, "dense_params": count_params(model),
                               "groups": groups, "uncounted_layers": [list(u) for u in uncounted]}
        if plan is not None:
            out.update(pruned_macs=count_macs(pruned, x), planned_macs=plan.pruned_macs,
                       speedup=round(graph.total_macs / max(count_macs(pruned, x), 1), 4),
                       pruned_params=count_params(pruned), ratios=plan.ratios, removed=plan.removal,
                       widths={r: graph.groups[r].channels - k for r, k in plan.removal.items()},
                       verification=pruned.regprune_verification)
        print(json.dumps(out))
        return 0
    rows = []
    for g in graph.groups.values():
        row = {"group (root)": g.root, "kind": g.kind, "channels": g.channels, "members": len(g.members),
               "MACs %": f"{100 * g.macs_share:.1f}", "scope": "yes" if g.in_scope else f"no: {g.reason}"}
        if plan is not None:
            row["kept"] = g.channels - plan.removal.get(g.root, 0)
        rows.append(row)
    print(f"{args.model}: {graph.total_macs / 1e6:.2f} MMACs, {count_params(model) / 1e6:.3f} M params, "
          f"{len(graph.groups)} channel groups, {len(graph.scope())} in scope")
    if rows:
        print(format_table(rows, list(rows[0])))
    if uncounted:
        print(f"note: MACs leave out {len(uncounted)} layer(s) of kinds the counter does not know: "
              + ", ".join(f"{n} ({k})" for n, k in uncounted[:5]))
    if plan is not None:
        real = count_macs(pruned, x)
        ver = pruned.regprune_verification
        print(f"plan: {real / 1e6:.2f} MMACs, speedup {graph.total_macs / max(real, 1):.2f}x "
              f"({len(plan.removal)} groups pruned); carried out on a copy and verified "
              f"(max relative difference {ver['max_rel_diff']:.1e}, {' and '.join(ver['modes'])} mode)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .pipeline import check_options, train_job

    o = _options(args, {"lr_schedule": "cosine", "epochs": 30, "out": "runs/base"})
    if not o.model:
        raise UserError("--model is required")
    check_options(o, "train")
    run = _start_run(o, args)
    _print(train_job(o, run)["table"])
    _print(f"model written to {run.file('model.safetensors')}")
    return 0


def _start_run(o, args):
    from .engine import init_distributed, is_main
    from .pipeline import RunDir

    from .engine import broadcast_object

    init_distributed()
    resume = bool(getattr(args, "resume", None))
    # rank 0 alone checks and prepares the directory, then tells the others: were every rank to check, a slow
    # one could find rank 0's fresh files, refuse "already exists" and leave rank 0 waiting in a collective
    run, error = None, None
    if is_main():
        try:
            run = RunDir(o.out, overwrite=getattr(args, "overwrite", False), resume=resume, write=True)
            from dataclasses import asdict

            from .engine import atomic_write_text

            atomic_write_text(run.file("options.json"), json.dumps(asdict(o), indent=1))
            run.save_state()
        except UserError as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error is not None:
        raise UserError(error)
    if run is None:
        run = RunDir(o.out, overwrite=True, resume=resume, write=False)
    return run


def cmd_eval(args: argparse.Namespace) -> int:
    from .pipeline import eval_job

    _print(eval_job(args.model_file, args.data, args.batch_size, args.device, args.limit_test)["table"])
    return 0


def _dry_run(o) -> int:
    import torch

    from .models import create_model
    from .pipeline import assumed_shapes, greg_config, prune_plan
    from .report import format_table

    ch, size, classes, n = assumed_shapes(o)
    model = create_model(o.model, num_classes=classes, in_channels=ch, **({"shortcut": o.shortcut} if o.shortcut else {}))
    x = torch.zeros(1, ch, size, size)
    graph, plan = prune_plan(o, model, x)
    if o.sparsity is not None:
        rows = [{"layer": r, "weights": graph.module(r).weight.numel(),
                 "zeroed": math.ceil(plan.ratios[r] * graph.module(r).weight.numel() - 1e-9)} for r in plan.ratios]
    else:
        rows = [{"layer": r, "dense": graph.groups[r].channels, "kept": graph.groups[r].channels - k,
                 "ratio": f"{plan.ratios[r]:.3f}"} for r, k in plan.removal.items()]
    print(f"plan for {o.method} on {o.model} ({o.data}, assumed {ch}x{size}x{size}, {classes} classes):")
    print(format_table(rows, list(rows[0])))
    print(f"MACs {plan.dense_macs / 1e6:.2f}M -> {plan.pruned_macs / 1e6:.2f}M, speedup {plan.speedup:.2f}x")
    if o.method in ("greg1", "greg2"):
        bs = o.reg_batch_size or o.batch_size
        spe = max(1, math.ceil(n / bs)) if n else None
        cfg = greg_config(o, spe or 1)
        it = cfg.planned_iters(o.method)
        ep = f" = {it['total'] / spe:.1f} epochs at batch {bs}" if spe else ""
        print(f"regularization schedule: pick {it['pick']} + grow {it['grow']} + stabilize {it['stabilize']} "
              f"= {it['total']} iterations{ep} (update_reg_interval {cfg.update_reg_interval}, "
              f"reg_granularity_prune {cfg.reg_granularity_prune:g}, reg_upper_limit {cfg.reg_upper_limit:g}, "
              f"lr_prune {cfg.lr_prune:g}, momentum {cfg.momentum:g}, penalty {cfg.penalty}, "
              f"criterion {cfg.criterion})")
        pred = cfg.predict(o.method)
        ratio = pred["predicted_ratio"]
        print(f"predicted: integrated decay {pred['integrated_decay']:.2f} (ln {cfg.mag_ratio_limit:g} = "
              f"{pred['needed']:.2f} needed), kept/pruned ratio "
              f"{'> 1e6' if ratio > 1e6 else f'{ratio:.3g}'}, lr*lambda up to {pred['lr_lambda_max']:.3g} "
              f"(stability bound {pred['stability_bound']:.3g})"
              + (f"; GReg-2 pick phase integrates {pred['pick_decay']:.2f} (the paper's CIFAR schedule: 0.50)"
                 if o.method == "greg2" else ""))
        if pred["warning"]:
            print(f"warning: {pred['warning']}")
    print(f"fine-tune: {o.ft_epochs:g} epochs, lr {o.ft_lr:g} ({o.ft_lr_schedule})")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .pipeline import check_options, prune_job

    o = _options(args, {"method": "l1", "out": "runs/prune"})
    if not o.model:
        raise UserError("--model is required")
    if args.dry_run:
        return _dry_run(o)
    check_options(o, "prune")
    run = _start_run(o, args)
    out = prune_job(o, run)
    _print(out["table"])
    rep = out["report"]
    _print(f"MACs speedup {rep['macs_speedup']:.2f}x; CPU latency, batch 1: {rep['latency_verdict_b1']}; "
           f"batch 64: {rep['latency_verdict_b64']}; run in {run.path}")
    return 0


_SPM_KEYS = ("search_epochs", "alpha_nuc", "alpha_mac", "nuc_every", "mac_grad_inputs", "mac_norm", "gate_lr_scale",
             "exact_budget", "tie_spread", "snap_floor")


def cmd_scratch(args: argparse.Namespace) -> int:
    from .scratch import scratch_job, scratch_dry_run

    o = _options(args, {"out": "runs/scratch", "lr_schedule": "cosine", "epochs": 10})
    extra = {k: getattr(o, k) for k in _SPM_KEYS if getattr(o, k) is not None}
    if args.warmup_epochs is not None or o.warmup_epochs:  # else the official 8/90 of the epochs
        extra["warmup_epochs"] = o.warmup_epochs
    if not o.model:
        raise UserError("--model is required")
    if o.target_macs is None:
        raise UserError("--target-macs is required (fraction of dense MACs to keep, e.g. 0.41)")
    if args.dry_run:
        return scratch_dry_run(o, extra)
    run = _start_run(o, args)
    out = scratch_job(o, run, extra)
    _print(out["table"])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import DEFAULT_ATOL, export_onnx

    res = export_onnx(args.model_file, args.onnx, input_size=args.input_size, in_channels=args.in_channels,
                      overwrite=args.overwrite, atol=DEFAULT_ATOL if args.atol is None else args.atol)
    _print(f"checked: {res.check.summary()}")
    _print(f"wrote {res.path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, overwrite=args.overwrite, quick=args.quick)
    return 0


COMMANDS = {"models": cmd_models, "inspect": cmd_inspect, "train": cmd_train, "eval": cmd_eval, "prune": cmd_prune,
            "scratch": cmd_scratch, "export": cmd_export, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one command; user errors print one line and exit with status 2."""
    from .engine.trainer import TrainingInterrupted

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.cmd](args)
    except UserError as exc:
        print(f"regprune: error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        where = f"; checkpoint saved at {exc.checkpoint}, continue with --resume" if exc.checkpoint else ""
        print(f"regprune: interrupted at step {exc.step}{where}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("regprune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
