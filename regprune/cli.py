"""The `regprune` command line: parsing and printing over the jobs in `regprune.jobs`."""

from __future__ import annotations

import argparse
import math
import sys
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
    p.add_argument("--debug-rank-dump", metavar="DIR", help=argparse.SUPPRESS)

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
    p.add_argument("--debug-rank-dump", metavar="DIR", help=argparse.SUPPRESS)  # each rank's phase views, to DIR

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
_NOT_OPTIONS = {"cmd", "overwrite", "resume", "recipe", "dry_run", "json", "quick", "pattern", "model_file",
                "greg"}


def _options(args: argparse.Namespace, defaults: dict[str, Any]):
    from .jobs.options import merge_options

    given = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS}
    return merge_options(defaults, given, recipe=getattr(args, "recipe", None), resume=getattr(args, "resume", None),
                         greg=getattr(args, "greg", None))


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


def cmd_inspect(args: argparse.Namespace) -> int:
    from .jobs.plan import inspect_text

    print(inspect_text(args.model, num_classes=args.num_classes, in_channels=args.in_channels,
                       input_size=args.input_size, shortcut=args.shortcut, ratios=args.ratios, speedup=args.speedup,
                       target_macs=args.target_macs, skip=args.skip, round_to=args.round_to,
                       include_coupled=bool(args.include_coupled), as_json=args.json))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .jobs import check_options, train_job

    o = _options(args, {"lr_schedule": "cosine", "epochs": 30, "out": "runs/base"})
    if not o.model:
        raise UserError("--model is required")
    check_options(o, "train")
    run = _start_run(o, args)
    _print(train_job(o, run)["table"])
    _print(f"model written to {run.file('model.safetensors')}")
    return 0


def _start_run(o, args):
    from .jobs.common import start_run

    return start_run(o, overwrite=getattr(args, "overwrite", False), resume=bool(getattr(args, "resume", None)))


def cmd_eval(args: argparse.Namespace) -> int:
    from .jobs import eval_job

    _print(eval_job(args.model_file, args.data, args.batch_size, args.device, args.limit_test)["table"])
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .jobs import check_options, prune_job

    o = _options(args, {"method": "l1", "out": "runs/prune"})
    if not o.model:
        raise UserError("--model is required")
    if args.dry_run:
        from .jobs.plan import prune_plan_text

        print(prune_plan_text(o))
        return 0
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
    from .jobs.scratch import scratch_job, scratch_dry_run

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
