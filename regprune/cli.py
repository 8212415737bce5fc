"""The `regprune` command line: parsing and printing over the jobs in `regprune.jobs`."""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any, Sequence

from .errors import UserError, first_line

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        where = "" if self.prog == "regprune" else f"{self.prog}: "  # one "regprune" per line
        raise UserError(f"{where}{message} (see --help)")


def _count(text: str) -> int:
    """A whole number >= 1 (a size or a count), for the flags outside the options schema."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return v


def _schema_flags(p: argparse.ArgumentParser, command: str) -> None:
    """The flags of every schema option `command` takes (`regprune.jobs.options`: one declaration per option)."""
    from .jobs.options import options_for

    for o in options_for(command):
        m = o.meta
        flag = "--" + o.flat.replace("_", "-")
        kw: dict[str, Any] = {"dest": o.flat, "default": None,
                              "help": argparse.SUPPRESS if m["cli"] == "hidden" else (m["help"] or None)}
        if m["metavar"]:
            kw["metavar"] = m["metavar"]
        base = next((a for a in typing.get_args(o.hint) or (o.hint,) if a is not type(None)), str)
        if m["cli"] == "negated":
            p.add_argument("--no-" + o.flat.replace("_", "-"), action="store_false", **kw)
        elif m["cli"] == "both":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif base is bool:
            p.add_argument(flag, action="store_true", **kw)
        elif m["cli"] == "append":
            p.add_argument(flag, action="append", **kw)
        else:
            p.add_argument(flag, type=base if base in (int, float) else str, choices=m["choices"], **kw)


def _run_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    p.add_argument("--recipe", help="YAML recipe with option defaults (command-line flags win)")


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar."""
    ap = _Parser(prog="regprune", description="Structured pruning by regularization: a smaller, faster dense model.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    p = sub.add_parser("models", help="list model names")
    p.add_argument("pattern", nargs="?", help="glob filter, e.g. 'torchvision.resnet*'")

    p = sub.add_parser("inspect", help="channel groups, scope and the MACs of a ratio spec")
    p.add_argument("--model", required=True)
    p.add_argument("--num-classes", type=_count, default=None)
    p.add_argument("--in-channels", type=_count, default=3)
    p.add_argument("--input-size", type=_count, default=None)
    p.add_argument("--shortcut", choices=["A", "B"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _schema_flags(p, "inspect")

    p = sub.add_parser("train", help="train a dense base model")
    _schema_flags(p, "train")
    _run_opts(p)

    p = sub.add_parser("eval", help="evaluate a model file")
    p.add_argument("model_file")
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--limit-test", type=int)

    p = sub.add_parser("prune", help="prune a trained model: l1, greg1 or greg2, then fine-tune")
    _schema_flags(p, "prune")
    _run_opts(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan without data or training")

    p = sub.add_parser("scratch", help="prune from scratch: gates + nuclear-norm + MACs losses, then reconfigure")
    _schema_flags(p, "scratch")
    _run_opts(p)
    p.add_argument("--dry-run", action="store_true", help="print the search plan without data or training")

    p = sub.add_parser("export", help="export a model file to ONNX, checked in ONNX Runtime against PyTorch "
                                      "(needs: pip install 'regprune[export]')")
    p.add_argument("model_file")
    p.add_argument("--onnx", required=True, help="output .onnx path (written only if the check passes)")
    p.add_argument("--input-size", type=_count, default=None, help="image side (default: the model's native size)")
    p.add_argument("--in-channels", type=_count, default=None)
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


def _check_schema_values(args: argparse.Namespace, command: str) -> None:
    """Check the values given to `command`'s schema flags as a job's are (types, finite numbers, bounds, choices);
    for commands whose flags do not become JobOptions (`inspect`). Raises UserError naming the option."""
    from .jobs.options import check_value, options_for

    for o in options_for(command):
        if getattr(args, o.flat) is not None:
            check_value(o, getattr(args, o.flat))


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

    _check_schema_values(args, "inspect")
    print(inspect_text(args.model, num_classes=args.num_classes, in_channels=args.in_channels,
                       input_size=args.input_size, shortcut=args.shortcut, ratios=args.ratios, speedup=args.speedup,
                       target_macs=args.target_macs, skip=args.skip, round_to=args.round_to,
                       include_coupled=bool(args.include_coupled), as_json=args.json))
    return 0


def _job(kind: str):
    def cmd(args: argparse.Namespace) -> int:
        from .jobs.options import COMMAND_DEFAULTS
        from .jobs.runner import dry_run_text, run_job

        o = _options(args, COMMAND_DEFAULTS[kind])
        if getattr(args, "dry_run", False):
            print(dry_run_text(kind, o))
            return 0
        out = run_job(kind, o, overwrite=args.overwrite, resume=bool(args.resume))
        for text in [out["table"], *out["lines"]]:
            _print(text)
        return 0

    cmd.__doc__ = f"`regprune {kind}`: the {kind} job through the one job runner."
    return cmd


cmd_train, cmd_prune, cmd_scratch = _job("train"), _job("prune"), _job("scratch")


def cmd_eval(args: argparse.Namespace) -> int:
    from .jobs import eval_job

    _print(eval_job(args.model_file, args.data, args.batch_size, args.device, args.limit_test)["table"])
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
        rc = COMMANDS[args.cmd](args)
        from .engine.dist import cleanup

        cleanup()  # under torchrun, the ranks leave the process group together
        return rc
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
    except (MemoryError, RuntimeError) as exc:  # out of memory (CPU allocator or CUDA): one line, not a traceback
        if not isinstance(exc, MemoryError) and "allocate" not in str(exc) and "out of memory" not in str(exc):
            raise
        print("regprune: error: out of memory (a smaller --input-size, --batch-size or model may fit): "
              f"{first_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
