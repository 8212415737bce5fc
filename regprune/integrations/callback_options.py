"""The arguments of `lightning.RegPruneCallback`, checked when the callback is built (no Lightning needed): the
method, and which options belong to it (GReg: ratios and `GRegConfig` fields; SPM: MACs target, gate groups and
`SPMRegularizer` keywords)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, NamedTuple, Sequence

from ..errors import UserError
from ..gate_regularizer import macs_target
from ..methods.greg import GRegConfig
from ..methods.spm import SPMRegularizer

__all__ = ["METHODS", "GREG_OPTIONS", "SPM_OPTIONS", "CallbackArguments", "check_arguments"]

METHODS = ("greg1", "greg2", "spm")
GREG_OPTIONS = frozenset(f.name for f in dataclasses.fields(GRegConfig))
"""Keywords a GReg callback takes as `**options`: the `GRegConfig` fields."""
SPM_OPTIONS = frozenset(n for n, p in inspect.signature(SPMRegularizer.__init__).parameters.items()
                        if p.kind is inspect.Parameter.KEYWORD_ONLY)
"""Keywords an SPM callback takes as `**options`: `SPMRegularizer`'s keyword-only arguments."""


class CallbackArguments(NamedTuple):
    """The checked arguments whose values the check may change."""

    method: str                 # "greg1", "greg2" or "spm"
    target_macs: float | None   # SPM: the kept MACs fraction from speedup / target_macs; GReg: as given
    iters: int | None           # as given, or None once folded into a `config` built here
    config: GRegConfig | None   # GReg: built here for unstructured=True without a config
    options: dict[str, Any]     # a new dict; SPM: "freeze_after" set from iters


def check_arguments(method: str, *, ratios: str | None, speedup: float | None, target_macs: float | None,
                    iters: int | None, config: GRegConfig | None, skip: list[str] | None, round_to: int | None,
                    include_coupled: bool, unstructured: bool, groups: str | Sequence[str], prune_on_fit_end: bool,
                    options: dict[str, Any]) -> CallbackArguments:
    """Check `RegPruneCallback`'s arguments (see its docstring) and return the normalized ones.

    `method` is lower-cased with "-" dropped ("GReg-1" -> "greg1"). SPM: `target_macs` becomes
    `macs_target(speedup, target_macs)` and `iters` goes into `options["freeze_after"]`. GReg with
    `unstructured=True` and no `config`: the config is built here (`GRegConfig.scaled(iters, method,
    unstructured=True, **options)`, or `GRegConfig(unstructured=True, **options)` without iters) and iters/options
    are cleared. `options` itself is not changed.

    Raises UserError: unknown method, iters not a positive integer, an option of the other method or an unknown
    one, config= together with iters or keywords, unstructured disagreeing with config, both iters and
    freeze_after, speedup with target_macs or below 1, and SPM with no way to finish (no iters, freeze_after,
    freeze_epoch or prune_on_fit_end)."""
    method = str(method).lower().replace("-", "")
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if iters is not None and (isinstance(iters, bool) or int(iters) != iters or iters < 1):
        raise UserError(f"iters={iters!r}: expected a positive number of optimizer steps")
    options = dict(options)
    if method == "spm":
        wrong = [n for n, v in (("ratios", ratios), ("config", config), ("skip", skip), ("round_to", round_to))
                 if v is not None] + [n for n, v in (("include_coupled", include_coupled),
                                                      ("unstructured", unstructured)) if v]
        if wrong:
            raise UserError(f"{wrong[0]}= is a GReg option; SPM takes target_macs/speedup, iters, groups and "
                            "SPMRegularizer keywords")
        unknown = sorted(set(options) - SPM_OPTIONS)
        if unknown:
            raise UserError(f"unknown SPM option {unknown[0]!r}: expected one of {', '.join(sorted(SPM_OPTIONS))}")
        target_macs = macs_target(speedup, target_macs)
        if iters is not None:
            if options.get("freeze_after") is not None:
                raise UserError("give either iters or freeze_after for SPM, not both (they are the same)")
            options["freeze_after"] = int(iters)
        if options.get("freeze_after") is None and options.get("freeze_epoch") is None and not prune_on_fit_end:
            raise UserError("SPM would never prune: give iters (steps), freeze_epoch, or prune_on_fit_end=True")
        return CallbackArguments(method, target_macs, iters, config, options)
    if groups != "all":
        raise UserError("groups= is an SPM option; GReg takes ratios/speedup/target_macs and skip")
    unknown = sorted(set(options) - GREG_OPTIONS)
    if unknown:
        raise UserError(f"unknown GReg option {unknown[0]!r}: expected a GRegConfig field")
    if config is not None and (options or iters is not None):
        raise UserError("give either config= or iters/GRegConfig keywords, not both")
    if config is not None and bool(config.unstructured) != bool(unstructured):
        raise UserError(f"unstructured={unstructured} but config.unstructured={config.unstructured}")
    if "unstructured" in options:
        raise UserError("give unstructured= as the callback's argument, not as a GRegConfig keyword")
    if config is None and unstructured:
        # regprune.regularizer() takes unstructured= for the plan but not into the config it builds
        config = (GRegConfig.scaled(int(iters), method, unstructured=True, **options) if iters
                  else GRegConfig(unstructured=True, **options))
        options, iters = {}, None
    return CallbackArguments(method, target_macs, iters, config, options)
