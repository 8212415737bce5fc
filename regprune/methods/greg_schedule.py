"""The GReg schedule: its hyperparameters (`GRegConfig`) and the arithmetic that plans and predicts it.

Pure numbers, no tensors: how many iterations each phase lasts (`GRegConfig.planned_iters`), how much decay the
penalty integrates under SGD with momentum (`GRegConfig.predict`, methods.md section 3b), the largest stable
lr * lambda (`stability_bound`), and budget-aware configs (`GRegConfig.scaled`). The runtime that applies the
schedule to a model's gradients is `regprune.methods.greg.GReg`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import UserError
from .l1 import CRITERIA, PICK_MODES

__all__ = ["GRegConfig", "GREG_METHODS", "PENALTIES", "SCHEDULE_FIELDS", "stability_bound", "passes", "reaches",
           "norm_method"]

GREG_METHODS = ("greg1", "greg2")
PENALTIES = ("filter", "group")
# scaled() aims the integrated decay at this multiple of ln(mag_ratio_limit): headroom for the loss gradient,
# which holds the pruned weights up, and for the moving average's lag behind the measured ratio.
_DECAY_HEADROOM = 1.5

# Thresholds are compared with a relative tolerance so that e.g. 1000 * 1e-5 counts as reaching 1e-2
# however the float rounds; schedules then last exactly the number of updates the arithmetic says.
_REL_TOL = 1e-9
# scaled() shrinks the update interval rather than let the growth phase fall below this many updates:
# a penalty that grows in a handful of big jumps is no longer "growing slowly".
_MIN_GROW_UPDATES = 100
# The fields that decide the penalty; a state_dict only loads into a config that agrees on them.
SCHEDULE_FIELDS = (
    "update_reg_interval", "reg_granularity_prune", "reg_upper_limit", "stabilize_reg_interval",
    "mag_ratio_limit", "reg_granularity_pick", "reg_upper_limit_pick", "reg_granularity_recover",
    "pick", "seed", "penalize_coupled", "unstructured", "penalty", "criterion",
)


def stability_bound(momentum: float) -> float:
    """The largest lr * lambda at which heavy-ball SGD still shrinks a penalised weight without ringing.

    The penalty alone gives the iteration z^2 - (1 + m - lr*lambda) z + m = 0; its roots turn complex (the weight
    swings back and forth instead of decaying) once lr * lambda > (1 - sqrt(m))^2: 0.0026 at m = 0.9, 1.0 for plain
    SGD. See methods.md section 3b."""
    return (1.0 - math.sqrt(momentum)) ** 2


def passes(value: float, limit: float) -> bool:
    """True when `value` is above `limit` by more than the relative float tolerance (1e-9 of |limit|)."""
    return value > limit + _REL_TOL * abs(limit)


def reaches(value: float, limit: float) -> bool:
    """True when `value` is at least `limit`, up to the relative float tolerance (1e-9 of |limit|)."""
    return value >= limit - _REL_TOL * abs(limit)


def _updates_to_pass(start: float, step: float, limit: float) -> int:
    # Evaluates the very expression the runtime uses (start + n * step), so plans match runs exactly.
    n = max(1, math.floor((limit - start) / step))
    while n > 1 and passes(start + (n - 1) * step, limit):
        n -= 1
    while not passes(start + n * step, limit):
        n += 1
    return n


def _updates_to_reach(step: float, ceiling: float) -> int:
    n = max(1, math.floor(ceiling / step))
    while n > 1 and reaches((n - 1) * step, ceiling):
        n -= 1
    while not reaches(n * step, ceiling):
        n += 1
    return n


def norm_method(method: str) -> str:
    """The canonical method name ("greg1" or "greg2") for spellings like "GReg-1"; raises UserError otherwise."""
    m = method.lower().replace("-", "").replace("_", "")
    if m not in GREG_METHODS:
        raise UserError(f"unknown GReg method {method!r}: expected one of {', '.join(GREG_METHODS)}")
    return m


@dataclass
class GRegConfig:
    """The paper's hyperparameters under their own names; defaults are the CIFAR settings."""

    update_reg_interval: int = 10  # iterations between penalty updates (5 on ImageNet)
    reg_granularity_prune: float = 1e-4  # added to lambda of the pruned set per update
    reg_upper_limit: float = 1.0  # a layer stops growing once its lambda passes this
    stabilize_reg_interval: int = 10000  # iterations with the penalty frozen (40000 on ImageNet)
    mag_ratio_limit: float = 1000.0  # all layers stop once every kept/pruned magnitude ratio reaches this
    reg_granularity_pick: float = 1e-5  # GReg-2: uniform increment during the pick phase
    reg_upper_limit_pick: float = 1e-2  # GReg-2: pick when the uniform penalty reaches this
    reg_granularity_recover: float = -1e-4  # GReg-2: constant lambda of kept filters after picking
    lr_prune: float = 0.001  # for the caller's optimizer; GReg reads it only to predict the decay
    momentum: float = 0.9  # the caller's SGD momentum (the paper's); used only to predict the decay and bound lambda
    pick: str = "min"  # GReg-1's pruned set: "min" (the paper), "max" or "rand" (ablations)
    seed: int = 0  # for pick="rand"
    # Old name of penalty="group" (kept so that saved options and recipes still load).
    penalize_coupled: bool = False
    # "filter": lambda on the root filter only (the paper, section 3.1). "group" (Group-GReg, not in the paper):
    # the same per-channel lambda on every `coupled` slice too: BN scale and shift, the consumers' input channels.
    penalty: str = "filter"
    # How pruned sets are chosen (GReg-1 at the start, GReg-2 at the pick) and magnitude ratios measured:
    # "filter" (the paper: mean |W[n]| of the root filter) or "group" (the channel's magnitude over its group).
    criterion: str = "filter"
    # One penalty per weight instead of per filter; then n_remove counts weights and the result is
    # masks() rather than filter picks.
    unstructured: bool = False
    record_every: int | None = None  # history sampling period in iterations; None = every penalty update
    track_layers: int | tuple[str, ...] = 3  # history keeps per-filter norms of these (or the first k)
    history_points: int = 500  # history is thinned by half whenever it grows past this

    def __post_init__(self) -> None:
        if self.update_reg_interval < 1:
            raise UserError(f"update_reg_interval must be >= 1, got {self.update_reg_interval}")
        for name in ("reg_granularity_prune", "reg_granularity_pick", "reg_upper_limit",
                     "reg_upper_limit_pick", "lr_prune"):
            if not 0 < getattr(self, name) < math.inf:
                raise UserError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if not 1 < self.mag_ratio_limit < math.inf:
            raise UserError(f"mag_ratio_limit is a kept/pruned magnitude ratio: a finite number > 1, got "
                            f"{self.mag_ratio_limit}")
        if self.stabilize_reg_interval < 0:
            raise UserError(f"stabilize_reg_interval must be >= 0, got {self.stabilize_reg_interval}")
        if self.pick not in PICK_MODES:
            raise UserError(f"pick must be one of {', '.join(PICK_MODES)}, got {self.pick!r}")
        if self.penalty not in PENALTIES:
            raise UserError(f"penalty must be one of {', '.join(PENALTIES)}, got {self.penalty!r}")
        if self.criterion not in CRITERIA:
            raise UserError(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.penalize_coupled:
            self.penalty = "group"
        self.penalize_coupled = self.penalty == "group"
        if self.unstructured and (self.penalty != "filter" or self.criterion != "filter"):
            raise UserError("the group penalty and criterion apply to channels; they cannot be combined with unstructured")
        if not 0.0 <= self.momentum < 1.0:
            raise UserError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.record_every is not None and self.record_every < 1:
            raise UserError(f"record_every must be >= 1, got {self.record_every}")
        if self.history_points < 2:
            raise UserError(f"history_points must be >= 2, got {self.history_points}")

    @classmethod
    def imagenet(cls, **overrides: object) -> GRegConfig:
        """The paper's ImageNet settings (update every 5 iterations, stabilize 40,000)."""
        fields = {"update_reg_interval": 5, "stabilize_reg_interval": 40000}
        fields.update(overrides)
        return cls(**fields)

    def planned_iters(self, method: str = "greg1") -> dict[str, int]:
        """Iterations of each phase (pick, grow, stabilize, total) if no layer stops early by magnitude ratio."""
        m = norm_method(method)
        start, n_pick = 0.0, 0
        if m == "greg2":
            n_pick = _updates_to_reach(self.reg_granularity_pick, self.reg_upper_limit_pick)
            start = n_pick * self.reg_granularity_pick
        n_grow = _updates_to_pass(start, self.reg_granularity_prune, self.reg_upper_limit)
        plan = {
            "pick": n_pick * self.update_reg_interval,
            "grow": n_grow * self.update_reg_interval,
            "stabilize": self.stabilize_reg_interval,
        }
        plan["total"] = sum(plan.values())
        return plan

    def predict(self, method: str = "greg1") -> dict:
        """What this schedule integrates, by the arithmetic of methods.md section 3b (if no layer stops early).

        With SGD at `lr_prune` and `momentum` m, a penalty lambda shrinks a weight by about lr*lambda/(1-m) per step,
        so the pruned filters' magnitude relative to the kept ones falls by exp(integrated decay) (the loss gradient
        and the starting ratio ignored). Returns a dict: "pick_decay" (GReg-2's uniform pick phase; 0.5 in the
        paper's CIFAR schedule), "integrated_decay" (pruned filters, grow + stabilize, less the kept filters'
        recover term), "needed" (ln mag_ratio_limit), "predicted_ratio" (kept/pruned, exp of the decay),
        "lr_lambda_max", "stability_bound" ((1 - sqrt m)^2), "reaches" (bool) and "warning" (str or None)."""
        m = norm_method(method)
        per = self.lr_prune / (1.0 - self.momentum)
        k = self.update_reg_interval
        start, pick_sum, n_pick = 0.0, 0.0, 0
        if m == "greg2":
            n_pick = _updates_to_reach(self.reg_granularity_pick, self.reg_upper_limit_pick)
            pick_sum = k * self.reg_granularity_pick * n_pick * (n_pick - 1) / 2
            start = n_pick * self.reg_granularity_pick
        g = self.reg_granularity_prune
        n_grow = _updates_to_pass(start, g, self.reg_upper_limit)
        top = start + n_grow * g
        grow_sum = k * (n_grow * start + g * n_grow * (n_grow - 1) / 2)
        stab_sum = self.stabilize_reg_interval * top
        recover = -self.reg_granularity_recover * (k * n_grow + self.stabilize_reg_interval) if m == "greg2" else 0.0
        decay = per * (grow_sum + stab_sum + recover)
        needed = math.log(self.mag_ratio_limit)
        bound = stability_bound(self.momentum)
        lr_lam = self.lr_prune * top
        warning = None
        if lr_lam > bound * (1 + 1e-6):
            warning = (f"lr*lambda reaches {lr_lam:.3g}, above the stability bound {bound:.3g} for momentum "
                       f"{self.momentum:g}: pruned filters will ring instead of decaying; lower the ceiling or the lr")
        elif decay < needed:
            # decay grows about linearly with the budget at fixed levels; 10% over that clears the rounding
            iters = math.ceil(1.1 * needed / max(decay, 1e-12) * self.planned_iters(m)["total"])
            at_bound = lr_lam >= 0.99 * bound
            how = (f"the penalty is already at the stability bound for momentum {self.momentum:g}, so only more "
                   f"iterations (or a lower momentum, whose bound is higher) raise it" if at_bound
                   else "or a larger learning rate")
            warning = (f"the schedule integrates a decay of {decay:.2f}, short of ln({self.mag_ratio_limit:g}) = "
                       f"{needed:.2f}: pruned filters end only ~{math.exp(decay):.3g}x below the kept ones; give it "
                       f"about {iters} iterations ({how})")
        return {
            "method": m, "pick_decay": per * pick_sum, "integrated_decay": decay, "needed": needed,
            "predicted_ratio": math.exp(min(decay, 700.0)), "lr_lambda_max": lr_lam, "stability_bound": bound,
            "reaches": warning is None, "warning": warning,
        }

    @classmethod
    def scaled(cls, budget_iters: int, method: str = "greg1", *, lr: float | None = None,
               momentum: float | None = None, **overrides: object) -> GRegConfig:
        """A budget-aware config whose schedule (pick + grow + stabilize) fits in about `budget_iters` steps.

        The phases keep the paper's proportions (CIFAR: pick 10,000, grow 100,000, stabilize 10,000 iterations) and
        the update interval shrinks (never grows) when the growth phase would have fewer than ~100 updates. The
        levels are set by the arithmetic of methods.md section 3b for the caller's optimizer (`lr`, `momentum`:
        default `lr_prune` 0.001 and 0.9, the paper's):
        - GReg-2's uniform pick penalty integrates what the paper's does before picking (about 0.5);
        - the pruned filters' penalty grows to the paper's ceiling `reg_upper_limit`, raised where the budget needs
          more to integrate 1.5 * ln(mag_ratio_limit), and never above the stability bound lr*lambda <=
          (1 - sqrt m)^2 (`stability_bound`), past which SGD with momentum rings instead of decaying.
        `predict()` tells whether the result reaches `mag_ratio_limit`; when the budget is too short it says how many
        iterations would. The paper's full schedules are the unscaled defaults. Raises UserError for a budget < 1; budgets under ~10
        iterations cannot keep every phase and overshoot by a few steps.
        """
        if isinstance(budget_iters, bool) or int(budget_iters) != budget_iters or budget_iters < 1:
            raise UserError(f"the iteration budget must be a whole number >= 1, got {budget_iters!r}")
        budget_iters = int(budget_iters)
        m = norm_method(method)
        if lr is not None:
            if "lr_prune" in overrides and overrides["lr_prune"] != lr:
                raise UserError(f"lr={lr:g} and lr_prune={overrides['lr_prune']:g} disagree: they are the same setting")
            overrides["lr_prune"] = lr
        if momentum is not None:
            overrides["momentum"] = momentum
        base = cls(**overrides)
        paper = dataclasses.replace(base, lr_prune=cls.lr_prune, momentum=cls.momentum)
        plan = base.planned_iters(m)
        factor = budget_iters / plan["total"]
        grow_iters = plan["grow"] * factor
        interval = min(base.update_reg_interval, max(1, int(grow_iters // _MIN_GROW_UPDATES)))
        n_grow = max(2, round(grow_iters / interval))
        n_pick = max(2, round(plan["pick"] * factor / interval)) if m == "greg2" else 0
        stab = 0
        if base.stabilize_reg_interval > 0:  # the paper's share, within what the updates leave of the budget
            stab = max(1, min(round(plan["stabilize"] * factor), budget_iters - interval * (n_pick + n_grow)))
        per = base.lr_prune / (1.0 - base.momentum)
        cap = stability_bound(base.momentum) / base.lr_prune  # the largest stable lambda
        changes: dict[str, object] = {"update_reg_interval": interval, "stabilize_reg_interval": stab}
        start = 0.0
        if m == "greg2":
            # sum of lambda over the pick phase = interval * top * (n_pick - 1) / 2
            top = paper.predict(m)["pick_decay"] / (per * interval * (n_pick - 1) / 2)
            top = min(top, cap / 2)  # leave the push phase room to grow
            changes["reg_granularity_pick"] = top / n_pick
            changes["reg_upper_limit_pick"] = top
            start = top
        # grow from `start` by g per update for n_grow updates to `final`, then hold `final` for `stab` iterations:
        # sum of lambda = interval * start * (n_grow + 1) / 2 + final * (interval * (n_grow - 1) / 2 + stab)
        target = _DECAY_HEADROOM * math.log(base.mag_ratio_limit) / per
        a = interval * start * (n_grow + 1) / 2
        b = interval * (n_grow - 1) / 2 + stab
        final = min(max((target - a) / b, base.reg_upper_limit, 2 * start), cap)
        g = (final - start) / n_grow
        changes["reg_granularity_prune"] = g
        # Half a step below the final level: the n_grow-th update passes it, the one before clearly does not.
        changes["reg_upper_limit"] = final - g / 2
        return dataclasses.replace(base, **changes)
