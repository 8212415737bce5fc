"""Short Python calls on a user's own `nn.Module`: one-shot pruning and regularizers for any training loop."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .errors import UserError
from .graph import GroupGraph, analyze
from .methods.base import Picks, PruneTarget
from .methods.greg import GReg, GRegConfig, MaskKeeper
from .methods.l1 import CRITERIA, filter_scores, group_scores
from .ratios import Plan, make_plan
from .surgery import apply_picks, periodic_picks

__all__ = ["prune", "regularizer", "Regularizer", "PruneResult", "plan_targets", "l1_picks"]


@dataclass
class PruneResult:
    """A physically pruned model, what was removed, and the plan it followed."""

    model: nn.Module
    picks: Picks
    plan: Plan


def plan_targets(graph: GroupGraph, plan: Plan, penalize_coupled: bool = False,
                 unstructured: bool = False) -> list[PruneTarget]:
    """One PruneTarget per group the plan prunes (root layer, count, coupled slices)."""
    targets = []
    for root, k in plan.removal.items():
        mod = graph.module(root)
        if unstructured:
            k = min(math.ceil(plan.ratios[root] * mod.weight.numel() - 1e-9), mod.weight.numel() - 1)
        coupled = graph.coupled_params(root) if penalize_coupled else []
        targets.append(PruneTarget(root, mod, k, coupled))
    return targets


def l1_picks(graph: GroupGraph, targets: list[PruneTarget], how: str = "min", seed: int = 0,
             criterion: str = "filter") -> Picks:
    """L1 picks per target, keeping grouped-conv blocks even where a group passes through one.

    criterion "filter": the pruned layer's own filter norms (the papers' L1); "group": the channel's magnitude
    over every layer of its channel group (the consumers' input weights and the BN scales too)."""
    if criterion not in CRITERIA:
        raise UserError(f"unknown criterion {criterion!r}: expected one of {', '.join(CRITERIA)}")
    gen = torch.Generator().manual_seed(seed)
    picks: Picks = {}
    for t in targets:
        if criterion == "group":
            scores = group_scores(t.module, graph.coupled_params(t.name, include_bn=True))
        else:
            scores = filter_scores(t.module)
        if how == "max":
            scores = -scores
        elif how == "rand":
            scores = torch.rand(scores.shape, generator=gen)
        elif how != "min":
            raise UserError(f"unknown pick {how!r}: expected min, max or rand")
        picks[t.name] = periodic_picks(graph, t.name, scores, t.n_remove)
    return picks


def _example(model: nn.Module, example_inputs: torch.Tensor | None) -> torch.Tensor:
    if example_inputs is None:
        raise UserError("example_inputs is required: a batch (even of 1) shaped like the model's input")
    return example_inputs[:1]


def prune(model: nn.Module, example_inputs: torch.Tensor, method: str = "l1", ratios: str | None = None, *,
          speedup: float | None = None, target_macs: float | None = None, skip: list[str] | None = None,
          round_to: int | None = None, include_coupled: bool = False, pick: str = "min", seed: int = 0,
          criterion: str = "filter", inplace: bool = False) -> PruneResult:
    """One-shot L1 pruning of any traceable model: returns the smaller dense model (a copy unless `inplace`).

    `criterion="group"` scores each channel over its whole coupled group instead of the pruned filter alone."""
    if method != "l1":
        raise UserError(f"prune() does one-shot pruning (method='l1'); for {method!r} use regprune.regularizer()")
    target = model if inplace else copy.deepcopy(model)
    x = _example(target, example_inputs)
    graph = analyze(target, x, include_coupled=include_coupled)
    plan = make_plan(graph, ratios, speedup=speedup, target_macs=target_macs, skip=skip, round_to=round_to)
    picks = l1_picks(graph, plan_targets(graph, plan), pick, seed, criterion)
    apply_picks(graph, picks)
    return PruneResult(target, picks, plan)


class Regularizer:
    """GReg-1/GReg-2 around an existing training loop: call `after_backward()` between backward and step,
    `on_step_end()` after the step, stop when `done()`, then `prune()`."""

    def __init__(self, graph: GroupGraph, plan: Plan, method: str, config: GRegConfig, unstructured: bool) -> None:
        self.graph = graph
        self.plan = plan
        self.method = method
        self.unstructured = unstructured
        self.targets = plan_targets(graph, plan, config.penalize_coupled, unstructured)
        self.greg = GReg(self.targets, config, method=method)

    # the hook protocol, forwarded so the object can go straight into the engine's hooks list
    def after_backward(self, trainer: Any = None) -> None:
        self.greg.after_backward(trainer)

    def on_step_end(self, trainer: Any = None) -> None:
        self.greg.on_step_end(trainer)

    def should_stop(self, trainer: Any = None) -> bool:
        return self.greg.done()

    def done(self) -> bool:
        """True once the penalty has grown to its ceiling and the stabilize phase has passed."""
        return self.greg.done()

    def status(self) -> dict:
        return self.greg.status()

    def state_dict(self) -> dict:
        return self.greg.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.greg.load_state_dict(state)

    def picks(self) -> Picks:
        return self.greg.picks()

    def prune(self) -> nn.Module:
        """Remove the driven-to-zero filters physically (structured) or fix masks (unstructured); returns the model."""
        if self.unstructured:
            masks = self.greg.masks()
            with torch.no_grad():
                for t in self.targets:
                    t.module.weight.mul_(masks[t.name].to(t.module.weight.dtype))
            return self.graph.model
        picks = self.greg.picks()
        if self.graph.groups and any(self.graph.groups[r].ch_groups > 1 for r in picks):
            raise UserError("GReg picks on groups through grouped convs are not supported yet; skip those layers")
        return apply_picks(self.graph, picks)

    def mask_keeper(self) -> MaskKeeper:
        """For unstructured runs: a hook that holds pruned weights at zero through fine-tuning."""
        return self.greg.mask_keeper()


def regularizer(model: nn.Module, example_inputs: torch.Tensor, method: str = "greg1", ratios: str | None = None, *,
                speedup: float | None = None, target_macs: float | None = None, iters: int | None = None,
                config: GRegConfig | None = None, skip: list[str] | None = None, round_to: int | None = None,
                include_coupled: bool = False, unstructured: bool = False, **config_overrides: Any) -> Regularizer:
    """Build a GReg-1/GReg-2 regularizer for `model`; `iters` scales the paper's schedule to that many steps."""
    if method not in ("greg1", "greg2"):
        raise UserError(f"unknown regularization method {method!r}: expected greg1 or greg2")
    graph = analyze(model, _example(model, example_inputs), include_coupled=include_coupled)
    plan = make_plan(graph, ratios, speedup=speedup, target_macs=target_macs, skip=skip, round_to=round_to)
    if config is None:
        config = GRegConfig.scaled(iters, method, **config_overrides) if iters else GRegConfig(**config_overrides)
    return Regularizer(graph, plan, method, config, unstructured)
