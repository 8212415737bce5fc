"""The one configuration schema of a job (JobOptions: nested sections run, data, train, finetune, prune, spm),
validated with its type hints, and where its values come from: a command's defaults, a YAML recipe, a resumed
run's options.json and the command line, merged in that order.

Each option is declared once, here, with its help text and the commands that take it; the command-line flags
(`regprune.cli`), recipes and options.json all come from these declarations. An option's flat name (what the
command line, old recipes and old options.json files use) is its field name, except in `finetune`, where it is
prefixed with `ft_`: `--ft-lr` is `finetune.lr`. Recipes may be flat, nested by section, or mixed.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from ..errors import UserError

__all__ = ["JobOptions", "RunOptions", "DataOptions", "TrainOptions", "FinetuneOptions", "PruneOptions",
           "SPMOptions", "Option", "options_for", "check_value", "check_type", "load_recipe", "merge_options",
           "COMMAND_DEFAULTS"]

JOBS = ("train", "prune", "scratch")


def opt(default: Any, help: str = "", *, commands: tuple[str, ...] = JOBS, choices: tuple[str, ...] | None = None,
        cli: str = "value", metavar: str | None = None, bounds: tuple[float, float] | None = None,
        parse: Any = None, finite: bool = True) -> Any:
    """A schema field: its default, help text, the commands whose command line takes it, allowed values (`choices`,
    or `bounds` [lo, hi) for a number, hi may be math.inf; a float must be finite unless `finite` is False), how
    other plain values read as its type (`parse`, applied to values that are not strings), and how the flag reads
    (`cli`: "value", "flag" (store_true), "negated" (--no-NAME), "both" (--NAME/--no-NAME), "append" (repeatable),
    "hidden" (accepted, not listed))."""
    meta = {"help": help, "commands": commands, "choices": choices, "cli": cli, "metavar": metavar,
            "bounds": bounds, "parse": parse, "finite": finite}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# common bounds [lo, hi)
COUNT = (1, math.inf)          # sizes, counts, batch sizes
AT_LEAST_0 = (0, math.inf)     # epochs, learning rates, weight decay, loss weights, step counts where 0 means "off"
FRACTION = (0, 1)              # momentum, smoothing, ratios


def _spec_text(value: Any) -> Any:
    """A ratio spec given as a number or a list of numbers (as YAML writes them), as its text form."""
    if isinstance(value, (int, float, list)) and not isinstance(value, bool):
        return (json.dumps(value) if isinstance(value, list) else repr(value)).replace(" ", "")
    return value


@dataclass
class RunOptions:
    """What runs, where, on what."""

    model: str = opt("resnet20", "model name (see `regprune models`; default resnet20)")
    out: str = opt("runs/run", "run directory")
    seed: int = opt(0, bounds=(0, 2**63))
    device: str = opt("auto", "auto (default), cpu or cuda")
    amp: bool = opt(False, "mixed precision on CUDA", cli="flag")
    channels_last: bool = opt(False, cli="flag")
    progress: bool = opt(True, cli="negated")
    checkpoint_every: int = opt(0, "optimizer steps between checkpoints (default: each epoch)", bounds=AT_LEAST_0)
    shortcut: str | None = opt(None, "CIFAR ResNet shortcut option (default A)", choices=("A", "B"))
    debug_rank_dump: str | None = opt(None, "write each rank's view of every phase boundary into DIR",
                                      commands=("train", "prune"), cli="hidden", metavar="DIR")


@dataclass
class DataOptions:
    """The dataset and how it is read. Flat name of `name`: `data`."""

    name: str = opt("mnist5k", "dataset (default mnist5k): mnist5k, digits, fashion-mnist[:PATH], cifar10:PATH, "
                               "cifar100:PATH, imagefolder:PATH")
    batch_size: int = opt(128, bounds=COUNT)
    workers: int = opt(0, "data loader worker processes", bounds=AT_LEAST_0)
    limit_train: int | None = opt(None, "use only this many training images", bounds=COUNT)
    limit_test: int | None = opt(None, "use only this many test images", bounds=COUNT)


@dataclass
class TrainOptions:
    """Training from scratch (`train`, `scratch`) and the optimizer of every phase."""

    epochs: float = opt(10, commands=("train", "scratch"), bounds=AT_LEAST_0)
    lr: float = opt(0.1, commands=("train", "scratch"), bounds=AT_LEAST_0)
    lr_schedule: str = opt("cosine", "'cosine', 'constant' or per-epoch steps like 0:0.1,100:0.01",
                           commands=("train", "scratch"))
    warmup_epochs: float | None = opt(None, "linear warm-up epochs (default 0; scratch: the official 8/90 of the "
                                            "epochs)", commands=("train", "scratch"), bounds=AT_LEAST_0)
    momentum: float = opt(0.9, bounds=FRACTION)
    nesterov: bool = opt(False, cli="flag")
    weight_decay: float = opt(5e-4, bounds=AT_LEAST_0)
    no_wd_bn_bias: bool = opt(False, "no weight decay on BatchNorm parameters and biases", cli="flag")
    label_smoothing: float = opt(0.0, bounds=FRACTION)


@dataclass
class FinetuneOptions:
    """Fine-tuning after removal (`prune`). Flat names: `ft_epochs`, `ft_lr`, `ft_lr_schedule`, `ft_warmup_epochs`."""

    epochs: float = opt(10, commands=("prune",), bounds=AT_LEAST_0)
    lr: float = opt(0.01, commands=("prune",), bounds=AT_LEAST_0)
    lr_schedule: str = opt("cosine", "'cosine', 'constant' or per-epoch steps like 0:0.1,100:0.01", commands=("prune",))
    warmup_epochs: float = opt(0.0, commands=("prune",), bounds=AT_LEAST_0)


RATIO_COMMANDS = ("prune", "inspect")


@dataclass
class PruneOptions:
    """What to cut and how (`prune`; `target_macs` also `scratch`). `greg` holds GRegConfig settings by their paper
    names (`regprune.methods.greg_schedule.GRegConfig`)."""

    method: str = opt("l1", commands=("prune",), choices=("l1", "greg1", "greg2"))
    base: str | None = opt(None, "model file to prune, 'pretrained' (torchvision) or 'random' (on purpose)",
                           commands=("prune",))
    ratios: str | None = opt(None, "globs '*layer*.conv1:0.5', stage list '[0,0.75,0.75,0.32,0]', VGG ranges "
                                   "'[1-15:0.7]', or one number for the whole scope", commands=RATIO_COMMANDS,
                            parse=_spec_text)
    speedup: float | None = opt(None, "target MACs speedup, solved over the scope", commands=RATIO_COMMANDS)
    target_macs: float | None = opt(None, "target fraction of dense MACs to keep (e.g. 0.41)",
                                    commands=RATIO_COMMANDS + ("scratch",))
    skip: list[str] = opt([], "glob of layers never to prune (repeatable)", commands=RATIO_COMMANDS, cli="append")
    round_to: int | None = opt(None, "round kept widths to a multiple of this (e.g. 8)", commands=RATIO_COMMANDS,
                               bounds=COUNT)
    include_coupled: bool = opt(False, "also prune residual-coupled groups (and stems)", commands=RATIO_COMMANDS,
                                cli="flag")
    pick: str = opt("min", commands=("prune",), choices=("min", "max", "rand"))
    criterion: str = opt("filter", "how channels are picked (L1, GReg-1 at the start, GReg-2 at its pick): the "
                                   "pruned filter's norm (default, the papers') or the channel's magnitude over its "
                                   "whole coupled group", commands=("prune",), choices=("filter", "group"))
    unstructured: bool = opt(False, "per-weight instead of per-filter", commands=("prune",), cli="flag")
    sparsity: float | None = opt(None, "with --unstructured: zero this fraction of the weights of every conv and "
                                       "linear layer (the paper's ResNet-50: 0.827)", commands=("prune",),
                                bounds=FRACTION)
    penalty: str = opt("filter", "GReg's penalty: on the pruned filters only (default, the paper's) or on every "
                                 "member of their channel group: BN scale and shift and the consumers' input "
                                 "channels (Group-GReg)", commands=("prune",), choices=("filter", "group"))
    penalize_coupled: bool = opt(False, "old name of --penalty group", commands=("prune",), cli="hidden")
    bn_recal: int = opt(100, "re-estimate BatchNorm statistics on N training batches after removal (default 100; "
                             "0: off)", commands=("prune",), metavar="N")
    reg_iters: int | None = opt(None, "fit GReg's whole schedule into about this many iterations, with levels set "
                                      "so the penalty integrates enough decay at the run's lr and momentum without "
                                      "ringing (see --dry-run)", commands=("prune",), bounds=COUNT)
    reg_batch_size: int | None = opt(None, commands=("prune",), bounds=COUNT)
    greg: dict[str, Any] = opt({}, "GReg setting by its paper name, e.g. update_reg_interval=5 (repeatable)",
                               commands=("prune",), cli="append", metavar="NAME=VALUE")


@dataclass
class SPMOptions:
    """Pruning from scratch (`scratch`); None: the method's default (`jobs.scratch.spm_settings`)."""

    search_epochs: float | None = opt(None, "epochs with gates learning (S_max)", commands=("scratch",),
                                      bounds=AT_LEAST_0)
    alpha_nuc: float | None = opt(None, commands=("scratch",), bounds=AT_LEAST_0)
    alpha_mac: float | None = opt(None, commands=("scratch",), bounds=AT_LEAST_0)
    nuc_every: int | None = opt(None, "steps between nuclear-norm terms (on a GPU, 10 or more: see the README)",
                                commands=("scratch",), bounds=COUNT)
    mac_grad_inputs: bool | None = opt(None, "MACs loss differentiable in input counts too (the authors hold them "
                                             "constant)", commands=("scratch",), cli="flag")
    mac_norm: str | None = opt(None, "MACs loss scale: 'matched' (default: the paper's ResNet-50 push relative to "
                                     "the task gradient, at any network size), 'unit' (the paper's formula in GMACs) "
                                     "or 'dense' (alpha-mac x squared gap in fractions of dense MACs)",
                               commands=("scratch",), choices=("matched", "unit", "dense"))
    gate_lr_scale: float | None = opt(None, "gates' learning-rate factor (default 1, as the official code)",
                                      commands=("scratch",), bounds=AT_LEAST_0)
    exact_budget: bool | None = opt(None, "at S_max move gates by importance until MACs are within 1%% of the "
                                          "budget (default off, as in the paper: the gates stay where the search "
                                          "left them)", commands=("scratch",), cli="both")
    tie_spread: float | None = opt(None, "MACs-gradient factor 1 +/- this by the rank of each channel's weight "
                                         "magnitude in its group (default 0.5; 0: the paper's identical push)",
                                   commands=("scratch",), bounds=FRACTION)
    snap_floor: float | None = opt(None, "with --exact-budget, the fraction of each group's channels the snap never "
                                         "goes below (default 0.1)", commands=("scratch",),
                                   bounds=FRACTION)


SECTIONS: dict[str, type] = {"run": RunOptions, "data": DataOptions, "train": TrainOptions,
                             "finetune": FinetuneOptions, "prune": PruneOptions, "spm": SPMOptions}
PREFIX = {"finetune": "ft_"}  # flat names of a section's fields: prefix + field name
RENAMED = {("data", "name"): "data"}  # flat names that differ otherwise


@dataclass(frozen=True)
class Option:
    """One option of the schema: where it lives, its flat name, type hint, default and command-line metadata."""

    section: str
    name: str
    flat: str
    hint: Any
    default: Any
    meta: dict[str, Any]


def _options() -> Iterator[Option]:
    for sec, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            flat = RENAMED.get((sec, f.name), PREFIX.get(sec, "") + f.name)
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            yield Option(sec, f.name, flat, hints[f.name], default, dict(f.metadata))


OPTIONS: dict[str, Option] = {o.flat: o for o in _options()}  # by flat name, in declaration order
PLACES: dict[tuple[str, str], Option] = {(o.section, o.name): o for o in OPTIONS.values()}  # by (section, field)


def options_for(command: str) -> list[Option]:
    """The options whose flags `command` ("train", "prune", "scratch", "inspect") takes, in declaration order."""
    return [o for o in OPTIONS.values() if command in o.meta["commands"]]


# what a resumed run may change: where and how it runs, not what it computes
RESUME_FREE = frozenset({"out", "device", "workers", "progress", "checkpoint_every", "debug_rank_dump"})

# per-command defaults over the schema's (flat names)
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"epochs": 30, "lr_schedule": "cosine", "out": "runs/base"},
    "prune": {"method": "l1", "out": "runs/prune"},
    "scratch": {"epochs": 10, "lr_schedule": "cosine", "out": "runs/scratch"},
}


def check_value(option: Option, value: Any) -> Any:
    """`value` if it fits the option's type hint and allowed values (an int passes as a float; a bool never as a
    number; a string that reads as a number passes as one, since YAML reads `1e-3` as a string; a ratio spec may
    be a number or a list of numbers; a float must be finite unless the option says otherwise; a number must lie
    within the option's `bounds`), else UserError naming the option, what it expects and the value."""
    parse = option.meta.get("parse")
    if parse is not None and not isinstance(value, str) and value is not None:
        value = parse(value)
    value = check_type(f"option {option.flat}", option.hint, value, finite=option.meta.get("finite", True))
    choices = option.meta.get("choices")
    if choices and value is not None and value not in choices:
        raise UserError(f"option {option.flat} must be one of {', '.join(choices)}, got {value!r}")
    bounds = option.meta.get("bounds")
    if bounds and value is not None and not bounds[0] <= value < bounds[1]:
        lo, hi = bounds
        expected = f"be >= {lo:g}" if hi == math.inf else f"lie in [{lo:g}, {hi:g})"
        raise UserError(f"option {option.flat} must {expected}, got {value}")
    return value


def _number_text(args: tuple, value: Any) -> Any:
    """A string that reads as a number, as that number when the type allows one (YAML reads `1e-3` as a string)."""
    if isinstance(value, str) and (float in args or int in args):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if int in args and number.is_integer() and "." not in value else number
    return value


def check_type(what: str, hint: Any, value: Any, *, finite: bool = True) -> Any:
    """`value` if it fits the type `hint` (an int passes as a float, as a float; a bool never as a number; a string
    that reads as a number passes as one; a list or tuple as a list or tuple of the hint's item type; with
    `finite`, a float must be a finite number), else UserError "WHAT must be of type ..., got VALUE" (`what` names
    the setting, e.g. "option lr")."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    value = _number_text(args, value)
    if value is None:
        if type(None) in args:
            return value
        raise UserError(f"{what} needs a value of type {_name(hint)}, got null")
    for a in args:
        if a is type(None):
            continue
        origin = typing.get_origin(a) or a
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if finite and not math.isfinite(value):
                raise UserError(f"{what} must be a finite number, got {value}")
            return float(value) if isinstance(value, int) else value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool) and isinstance(value, origin):
            return value
        if origin in (list, tuple) and isinstance(value, (list, tuple)):
            item = (typing.get_args(a) or (Any,))[0]
            if item is Any or all(isinstance(v, item) for v in value):
                return origin(value)
        if origin is dict and isinstance(value, dict):
            return dict(value)
    raise UserError(f"{what} must be of type {_name(hint)}, got {value!r}")


def _name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


@dataclass
class JobOptions:
    """Everything a job needs, in sections; `JobOptions.from_dict` reads flat, nested or mixed values."""

    run: RunOptions = field(default_factory=RunOptions)
    data: DataOptions = field(default_factory=DataOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    prune: PruneOptions = field(default_factory=PruneOptions)
    spm: SPMOptions = field(default_factory=SPMOptions)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "JobOptions":
        """From flat names (`{"lr": 0.1, "ft_lr": 0.01}`), sections (`{"train": {"lr": 0.1}}`) or both; later
        keys win. Raises UserError on an unknown option or section, or a value of the wrong type."""
        return cls(**{sec: SECTIONS[sec](**vals) for sec, vals in _by_section(values).items()})

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values (what options.json holds)."""
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """Flat name -> value, for every option."""
        return {o.flat: getattr(getattr(self, o.section), o.name) for o in OPTIONS.values()}


def _by_section(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {sec: {} for sec in SECTIONS}
    unknown = []
    for key, value in values.items():
        if key in SECTIONS and key not in OPTIONS and not isinstance(value, dict):
            raise UserError(f"section {key} must be a mapping of its option names to values, got {value!r}")
        if key in SECTIONS and isinstance(value, dict):  # a section ("data" is also a flat name, with a string)
            for name, v in value.items():
                o = PLACES.get((key, name))
                if o is None:
                    unknown.append(f"{key}.{name}")
                else:
                    out[key][name] = check_value(o, v)
        elif key in OPTIONS:
            o = OPTIONS[key]
            out[o.section][o.name] = check_value(o, value)
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(sorted(unknown))}{_suggest(unknown)}; options are the "
                        f"command's flags (`--help`) with underscores, flat or nested under {', '.join(SECTIONS)}")
    return out


def _suggest(unknown: list[str]) -> str:
    """" (did you mean ...?)" for the close names of the unknown ones, flat or section.field."""
    import difflib

    names = list(OPTIONS) + [f"{o.section}.{o.name}" for o in OPTIONS.values()]
    close = sorted({m for u in unknown for m in difflib.get_close_matches(u, names, n=2, cutoff=0.75)})
    return f" (did you mean {', '.join(close)}?)" if close else ""


def load_recipe(path: str) -> dict[str, Any]:
    """The option values of a YAML recipe: a mapping of option names (dashes or underscores) to plain values, or
    of section names to such mappings. Raises UserError when the file is missing, unreadable, not YAML or not
    such a mapping."""
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

    def norm(d: dict) -> dict:
        return {k.replace("-", "_"): (norm(v) if k in SECTIONS and isinstance(v, dict) else v) for k, v in d.items()}

    return norm(data)


def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    """Nested or mixed values as flat names (checked by `_by_section` first)."""
    flat: dict[str, Any] = {}
    for sec, vals in _by_section(values).items():
        for name, v in vals.items():
            flat[PLACES[sec, name].flat] = v
    return flat


def merge_options(defaults: dict[str, Any], given: dict[str, Any], *, recipe: str | None = None,
                  resume: str | None = None, greg: list[str] | None = None) -> JobOptions:
    """JobOptions from, later winning: the command's `defaults`, a `recipe` file, the options.json of the run
    directory `resume` (nested, or flat as older versions wrote it), the values `given` on the command line, and
    `greg` items "NAME=VALUE" (values parsed as JSON where they parse, else kept as strings) merged into the greg
    mapping. A resumed run keeps its directory as `out`. Raises UserError on an unreadable source, an unknown
    option or a value of the wrong type."""
    values: dict[str, Any] = _flatten(defaults)
    if recipe and resume:
        raise UserError("a resumed run keeps the options it started with: drop --recipe")
    if recipe:
        loaded = load_recipe(recipe)
        loaded.pop("paper", None)  # the paper's result, for people reading the recipe
        loaded.pop("description", None)
        values.update(_flatten(loaded))
    if resume:
        saved = Path(resume) / "options.json"
        if not saved.is_file():
            raise UserError(f"cannot resume: {resume} holds no regprune run (no options.json)")
        try:
            saved_values = json.loads(saved.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot resume: {saved} is unreadable ({exc})") from None
        if not isinstance(saved_values, dict):
            raise UserError(f"cannot resume: {saved} is not a regprune options file")
        old_flat = not any(isinstance(saved_values.get(sec), dict) for sec in SECTIONS)
        if old_flat and saved_values.get("warmup_epochs") == 0:
            saved_values["warmup_epochs"] = None  # the flat files of older versions wrote "not given" as 0
        values.update(_flatten(saved_values))
        changed = {k: v for k, v in _flatten({k: v for k, v in given.items() if v is not None}).items()
                   if k not in RESUME_FREE and values.get(k) != v}
        if changed or greg:
            k = next(iter(changed), "greg")
            raise UserError(f"a resumed run keeps the options it started with: {k} was "
                            f"{values.get(k)!r} (drop --{k.replace('_', '-')}, or start a new run); only "
                            f"{', '.join('--' + f.replace('_', '-') for f in sorted(RESUME_FREE))} may change")
    values.update(_flatten({k: v for k, v in given.items() if v is not None}))
    if greg:
        g = dict(values.get("greg") or {})
        for item in greg:
            if "=" not in item:
                raise UserError(f"--greg expects NAME=VALUE, got {item!r}")
            k, v = item.split("=", 1)
            try:
                g[k.strip()] = json.loads(v)
            except json.JSONDecodeError:
                g[k.strip()] = v
        values["greg"] = g
    if resume:
        values["out"] = resume
    return JobOptions.from_dict(values)
