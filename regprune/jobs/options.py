"""The options of a job (JobOptions), their type checks, and where they come from: defaults, a YAML recipe, a
resumed run's options.json and the command line, merged in that order."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = ["JobOptions", "load_recipe", "merge_options"]


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
    # debugging: write each rank's view of every prune phase boundary into this directory (see jobs.debug)
    debug_rank_dump: str | None = None

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


def load_recipe(path: str) -> dict[str, Any]:
    """The option values of a YAML recipe (a mapping of option names, dashes or underscores, to plain values).

    Raises UserError when the file is missing, unreadable, not YAML or not such a mapping."""
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


def merge_options(defaults: dict[str, Any], given: dict[str, Any], *, recipe: str | None = None,
                  resume: str | None = None, greg: list[str] | None = None) -> JobOptions:
    """JobOptions from, later winning: the command's `defaults`, a `recipe` file, the options.json of the run
    directory `resume`, the values `given` on the command line, and `greg` items "NAME=VALUE" (values parsed as
    JSON where they parse, else kept as strings) merged into the greg mapping. A resumed run keeps its directory
    as `out`. Raises UserError on an unreadable source, an unknown option or a value of the wrong type."""
    values: dict[str, Any] = dict(defaults)
    if recipe:
        loaded = load_recipe(recipe)
        loaded.pop("paper", None)  # the paper's result, for people reading the recipe
        loaded.pop("description", None)
        values.update(loaded)
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
        values.update(saved_values)
    values.update({k: v for k, v in given.items() if v is not None})
    if greg:
        if not isinstance(values.get("greg") or {}, dict):
            raise UserError(f"option greg must be a mapping of GReg settings, got {values['greg']!r}")
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
