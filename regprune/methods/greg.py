"""GReg-1 and GReg-2 (Wang et al., "Neural Pruning via Growing Regularization"), as training-loop hooks.

Both drive a set of filters to zero with an L2 penalty `lambda/2 * ||W[n]||^2` whose `lambda` grows
slowly, so that the network adapts before the filters are removed:

- GReg-1 fixes the pruned set up front by magnitude (exactly L1's picks) and grows its penalty.
- GReg-2 first grows a small penalty uniformly on every filter of every pruned layer, lets the
  weights' response to it separate the magnitudes, picks the smallest at the pick ceiling, and then
  grows the penalty on those while holding the kept filters at a small negative penalty.

A `GReg` object only edits gradients and its own state. It never touches the optimizer or the learning
rate: the caller trains with `config.lr_prune` (0.001 in the paper) during regularization, and chooses
the fine-tuning learning rate after pruning. Beware the paper's trap: jumping from 0.001 straight to
0.01 at the start of fine-tuning collapses accuracy; a lower or warmed-up start avoids it.

Plain loop usage::

    reg = GReg(targets, GRegConfig.scaled(2000, "greg1"), method="greg1")
    for x, y in loader:
        loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward()
        reg.after_backward(); opt.step(); reg.on_step_end()
        if reg.done(): break
    picks = reg.picks()   # hand to surgery

Call `after_backward` on unscaled gradients (after `GradScaler.unscale_` under AMP). Under DDP the
added term is identical on every rank, since the weights are.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import UserError
from .base import Picks, PruneTarget
from .l1 import PICK_MODES, filter_scores, pick_filters, select_indices

__all__ = ["GRegConfig", "GReg", "MaskKeeper", "GREG_METHODS"]

GREG_METHODS = ("greg1", "greg2")

# Thresholds are compared with a relative tolerance so that e.g. 1000 * 1e-5 counts as reaching 1e-2
# however the float rounds; schedules then last exactly the number of updates the arithmetic says.
_REL_TOL = 1e-9
# scaled() shrinks the update interval rather than let the growth phase fall below this many updates:
# a penalty that grows in a handful of big jumps is no longer "growing slowly".
_MIN_GROW_UPDATES = 100
# The fields that decide the penalty; a state_dict only loads into a config that agrees on them.
_SCHEDULE_FIELDS = (
    "update_reg_interval", "reg_granularity_prune", "reg_upper_limit", "stabilize_reg_interval",
    "mag_ratio_limit", "reg_granularity_pick", "reg_upper_limit_pick", "reg_granularity_recover",
    "pick", "seed", "penalize_coupled", "unstructured",
)


def _passes(value: float, limit: float) -> bool:
    return value > limit + _REL_TOL * abs(limit)


def _reaches(value: float, limit: float) -> bool:
    return value >= limit - _REL_TOL * abs(limit)


def _updates_to_pass(start: float, step: float, limit: float) -> int:
    # Evaluates the very expression the runtime uses (start + n * step), so plans match runs exactly.
    n = max(1, math.floor((limit - start) / step))
    while n > 1 and _passes(start + (n - 1) * step, limit):
        n -= 1
    while not _passes(start + n * step, limit):
        n += 1
    return n


def _updates_to_reach(step: float, ceiling: float) -> int:
    n = max(1, math.floor(ceiling / step))
    while n > 1 and _reaches((n - 1) * step, ceiling):
        n -= 1
    while not _reaches(n * step, ceiling):
        n += 1
    return n


def _norm_method(method: str) -> str:
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
    lr_prune: float = 0.001  # for the caller's optimizer; GReg itself never reads it
    pick: str = "min"  # GReg-1's pruned set: "min" (the paper), "max" or "rand" (ablations)
    seed: int = 0  # for pick="rand"
    # Penalise every `coupled` entry of a target with the same per-channel lambda. The caller leaves
    # BatchNorm parameters out of `coupled` when using this: the paper never penalises BN.
    penalize_coupled: bool = False
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
                     "reg_upper_limit_pick", "mag_ratio_limit"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.stabilize_reg_interval < 0:
            raise UserError(f"stabilize_reg_interval must be >= 0, got {self.stabilize_reg_interval}")
        if self.pick not in PICK_MODES:
            raise UserError(f"pick must be one of {', '.join(PICK_MODES)}, got {self.pick!r}")
        if self.penalize_coupled and self.unstructured:
            raise UserError("penalize_coupled applies to filters; it cannot be combined with unstructured")
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
        m = _norm_method(method)
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

    @classmethod
    def scaled(cls, budget_iters: int, method: str = "greg1", **overrides: object) -> GRegConfig:
        """A config whose whole schedule (pick + grow + stabilize) fits in about `budget_iters` steps.

        Starts from `cls(**overrides)` and shrinks (or stretches) every phase by the same factor, so the
        ratio of growth to stabilize time stays the paper's (CIFAR: 100,000 vs 10,000 iterations). The
        ceilings `reg_upper_limit` and `reg_upper_limit_pick` and the recover level are kept; the
        granularities grow so that fewer updates reach them, and the update interval shrinks (never
        grows) when the growth phase would otherwise have fewer than ~100 updates.
        """
        if budget_iters < 1:
            raise UserError(f"the iteration budget must be >= 1, got {budget_iters}")
        m = _norm_method(method)
        base = cls(**overrides)
        plan = base.planned_iters(m)
        factor = budget_iters / plan["total"]
        grow_iters = plan["grow"] * factor
        interval = min(base.update_reg_interval, max(1, int(grow_iters // _MIN_GROW_UPDATES)))
        n_grow = max(1, round(grow_iters / interval))
        changes: dict[str, object] = {"update_reg_interval": interval}
        if base.stabilize_reg_interval > 0:
            changes["stabilize_reg_interval"] = max(1, round(plan["stabilize"] * factor))
        start = 0.0
        if m == "greg2":
            n_pick = max(1, round(plan["pick"] * factor / interval))
            g_pick = base.reg_upper_limit_pick / n_pick
            changes["reg_granularity_pick"] = g_pick
            start = n_pick * g_pick
        if base.reg_upper_limit > start:
            # Dividing by (n - 0.5) puts the n-th update clearly past the ceiling and the (n-1)-th clearly
            # below it, so the strict "passes" test fires after exactly n updates.
            changes["reg_granularity_prune"] = (base.reg_upper_limit - start) / (n_grow - 0.5)
        return dataclasses.replace(base, **changes)


class GReg:
    """GReg-1 / GReg-2 as a hook object: after_backward, on_step_end, should_stop, picks, state_dict.

    Phases: "pick" (GReg-2 only) -> "grow" -> "stabilize" -> "done". The iteration counter counts
    on_step_end calls; the penalty changes only every `update_reg_interval` of them.
    """

    def __init__(
        self, targets: list[PruneTarget], config: GRegConfig | None = None, method: str = "greg1"
    ) -> None:
        self.config = config if config is not None else GRegConfig()
        self.method = _norm_method(method)
        self.targets = list(targets)
        self._by_name = {t.name: t for t in self.targets}
        if len(self._by_name) != len(self.targets):
            raise ValueError("PruneTarget names must be unique")
        self._check_targets()
        cfg = self.config

        # L1's picks at the original weights: GReg-1's pruned set (with pick="min"), and GReg-2's
        # reference for the overlap the paper's code logs.
        self._l1_ref = self._initial_masks("min", 0)
        self._pruned: dict[str, torch.Tensor] | None = None
        if self.method == "greg1":
            self._pruned = dict(self._l1_ref) if cfg.pick == "min" else self._initial_masks(cfg.pick, cfg.seed)

        self._lam = {
            t.name: torch.zeros(self._n_units(t), dtype=torch.float32, device=t.module.weight.device)
            for t in self.targets
        }
        self.iteration = 0
        self._phase = "pick" if self.method == "greg2" else "grow"
        self._n_pick = 0
        self._pick_value = 0.0  # lambda at which GReg-2 picked: the push phase grows from there
        self._pick_iteration: int | None = None
        self._n_grow = {t.name: 0 for t in self.targets}
        self._growing = {t.name: t.n_remove > 0 for t in self.targets}
        self._mag_ma: dict[str, float | None] = {t.name: None for t in self.targets}
        self._grow_end: int | None = None
        self._stop_reason: str | None = None

        self.history: list[dict] = []
        self._record_stride = cfg.record_every or cfg.update_reg_interval
        self._tracked = self._choose_tracked()

        if not any(self._growing.values()):
            # Nothing to prune: skip straight to the (frozen, all-zero) stabilize phase.
            if self.method == "greg2":
                self._pruned = {t.name: torch.zeros_like(self._lam[t.name], dtype=torch.bool) for t in self.targets}
            self._finish_growth("nothing to prune")
        self._record()

    # ---- setup helpers -------------------------------------------------------------------------

    def _check_targets(self) -> None:
        for t in self.targets:
            filter_scores(t.module)  # raises on layers whose filters are not on dim 0
            n = self._n_units(t)
            if not 0 <= t.n_remove < n:
                what = "weights" if self.config.unstructured else "filters"
                raise ValueError(f"{t.name}: n_remove={t.n_remove} must be in [0, {n - 1}] ({n} {what})")
            if self.config.penalize_coupled:
                for pname, p, dim in t.coupled:
                    if p.shape[dim] != t.n_filters:
                        raise ValueError(
                            f"{t.name}: coupled {pname} has {p.shape[dim]} channels on dim {dim}, "
                            f"expected {t.n_filters}"
                        )

    def _n_units(self, t: PruneTarget) -> int:
        w = t.module.weight
        return w.numel() if self.config.unstructured else int(w.shape[0])

    def _scores(self, t: PruneTarget) -> torch.Tensor:
        if self.config.unstructured:
            return t.module.weight.detach().abs().float().flatten()
        return filter_scores(t.module)

    def _initial_masks(self, how: str, seed: int) -> dict[str, torch.Tensor]:
        if not self.config.unstructured:
            picks = pick_filters(self.targets, how, seed)
            return {t.name: self._mask_from(t, torch.tensor(picks[t.name], dtype=torch.long)) for t in self.targets}
        gen = torch.Generator().manual_seed(seed)
        return {t.name: self._mask_from(t, select_indices(self._scores(t), t.n_remove, how, gen)) for t in self.targets}

    def _mask_from(self, t: PruneTarget, idx: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(self._n_units(t), dtype=torch.bool, device=t.module.weight.device)
        mask[idx.to(mask.device)] = True
        return mask

    def _smallest_now(self, t: PruneTarget) -> torch.Tensor:
        return self._mask_from(t, select_indices(self._scores(t), t.n_remove, "min"))

    def _choose_tracked(self) -> list[str]:
        tl = self.config.track_layers
        if isinstance(tl, int):
            active = [t.name for t in self.targets if t.n_remove > 0]
            names = active or [t.name for t in self.targets]
            return names[:tl]
        unknown = [n for n in tl if n not in self._by_name]
        if unknown:
            raise UserError(f"track_layers names no target: {', '.join(unknown)}")
        return list(tl)

    # ---- hooks ---------------------------------------------------------------------------------

    def _follow_device(self) -> None:
        # The model may be moved (e.g. .cuda()) after this object was built: keep state beside the weights.
        for t in self.targets:
            dev = t.module.weight.device
            if self._lam[t.name].device != dev:
                self._lam[t.name] = self._lam[t.name].to(dev)
                self._l1_ref[t.name] = self._l1_ref[t.name].to(dev)
                if self._pruned is not None:
                    self._pruned[t.name] = self._pruned[t.name].to(dev)

    def after_backward(self, trainer: object = None) -> None:
        """Add lambda * W to the gradient of every penalised filter (or weight); call before optimizer.step()."""
        self._follow_device()
        for t in self.targets:
            if t.n_remove == 0:
                continue
            lam = self._lam[t.name]
            w = t.module.weight
            if self.config.unstructured:
                _add_grad(w, lam.view_as(w))
                continue
            _add_grad(w, lam.view(-1, *([1] * (w.dim() - 1))))
            if self.config.penalize_coupled:
                for _, p, dim in t.coupled:
                    shape = [1] * p.dim()
                    shape[dim] = -1
                    _add_grad(p, lam.to(p.device).view(shape))

    def on_step_end(self, trainer: object = None) -> None:
        """Count one optimizer step; update the penalty every update_reg_interval steps; advance phases."""
        if self._phase == "done":
            return
        self.iteration += 1
        if self._phase in ("pick", "grow") and self.iteration % self.config.update_reg_interval == 0:
            self._update()
        self._maybe_done()
        # The last record is always kept, so a plot ends where the schedule did.
        if self._phase == "done" or self.iteration % self._record_stride == 0:
            self._record()

    def should_stop(self, trainer: object = None) -> bool:
        """True once regularization is over (same as done())."""
        return self.done()

    def done(self) -> bool:
        """True once growth and the stabilize phase are over: time to prune."""
        return self._phase == "done"

    @property
    def phase(self) -> str:
        """Current phase: "pick", "grow", "stabilize" or "done"."""
        return self._phase

    # ---- schedule ------------------------------------------------------------------------------

    def _update(self) -> None:
        self._follow_device()
        cfg = self.config
        active = [t for t in self.targets if t.n_remove > 0]
        if self._phase == "pick":
            self._n_pick += 1
            value = self._n_pick * cfg.reg_granularity_pick
            for t in active:
                self._lam[t.name].fill_(value)
                if not cfg.unstructured:
                    # Ratio against the picks as they would be now; costly per weight, so filters only.
                    self._update_ma(t, self._smallest_now(t))
            if _reaches(value, cfg.reg_upper_limit_pick):
                self._pruned = {t.name: self._smallest_now(t) for t in self.targets}
                self._pick_value = value
                self._pick_iteration = self.iteration
                self._phase = "grow"
            return

        kept_value = cfg.reg_granularity_recover if self.method == "greg2" else 0.0
        for t in active:
            if not self._growing[t.name]:
                continue  # a stopped layer's ratio freezes too, as in the authors' code
            pruned = self._pruned[t.name]
            self._update_ma(t, pruned)
            self._n_grow[t.name] += 1
            value = self._pick_value + self._n_grow[t.name] * cfg.reg_granularity_prune
            lam = self._lam[t.name]
            lam.fill_(kept_value)
            lam[pruned] = value
            if _passes(value, cfg.reg_upper_limit):
                self._growing[t.name] = False
        if any(self._growing.values()) and all(
            self._mag_ma[t.name] is not None and self._mag_ma[t.name] >= cfg.mag_ratio_limit for t in active
        ):
            for name in self._growing:
                self._growing[name] = False
            self._stop_reason = "mag_ratio_limit"
        if not any(self._growing.values()):
            self._finish_growth(self._stop_reason or "reg_upper_limit")

    def _finish_growth(self, reason: str) -> None:
        self._phase = "stabilize"
        self._grow_end = self.iteration
        self._stop_reason = reason
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._phase == "stabilize" and self.iteration - self._grow_end >= self.config.stabilize_reg_interval:
            self._phase = "done"

    def _mag_ratio(self, t: PruneTarget, pruned: torch.Tensor) -> float:
        scores = self._scores(t)
        m_pruned = scores[pruned].mean().item()
        m_kept = scores[~pruned].mean().item()
        if m_pruned == 0.0:
            return math.inf if m_kept > 0 else 1.0
        return m_kept / m_pruned

    def _update_ma(self, t: PruneTarget, pruned: torch.Tensor) -> None:
        r = self._mag_ratio(t, pruned)
        old = self._mag_ma[t.name]
        self._mag_ma[t.name] = r if old is None else 0.9 * old + 0.1 * r

    # ---- results -------------------------------------------------------------------------------

    def _require_picked(self) -> dict[str, torch.Tensor]:
        if self._pruned is None:
            at = self.config.planned_iters(self.method)["pick"]
            raise RuntimeError(
                f"GReg-2 has not picked yet (iteration {self.iteration}): it picks when the uniform "
                f"penalty reaches reg_upper_limit_pick, planned at iteration {at}"
            )
        return self._pruned

    def picks(self) -> Picks:
        """Sorted filter indices to remove per target (GReg-1: from construction; GReg-2: after picking)."""
        if self.config.unstructured:
            raise RuntimeError("unstructured GReg prunes single weights, not filters: use masks()")
        pruned = self._require_picked()
        return {t.name: torch.nonzero(pruned[t.name]).flatten().tolist() for t in self.targets}

    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean masks shaped like each target's weight: True (1) keeps, False (0) prunes."""
        pruned = self._require_picked()
        out = {}
        for t in self.targets:
            w = t.module.weight
            keep = ~pruned[t.name]
            if self.config.unstructured:
                out[t.name] = keep.view_as(w).clone()
            else:
                out[t.name] = keep.view(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()
        return out

    def mask_keeper(self) -> MaskKeeper:
        """A MaskKeeper holding this object's pruned weights at zero (zeroes them right away)."""
        return MaskKeeper(self.targets, self.masks())

    def lambdas(self) -> dict[str, torch.Tensor]:
        """Current penalty per target: one per filter, or shaped like the weight in unstructured mode."""
        out = {}
        for t in self.targets:
            lam = self._lam[t.name].clone()
            out[t.name] = lam.view_as(t.module.weight) if self.config.unstructured else lam
        return out

    def planned_iters(self) -> dict[str, int]:
        """The config's phase lengths for this method."""
        return self.config.planned_iters(self.method)

    def _penalty_range(self) -> tuple[float, float]:
        vals = []
        for t in self.targets:
            if t.n_remove == 0:
                continue
            lam = self._lam[t.name]
            vals.append(lam if self._pruned is None else lam[self._pruned[t.name]])
        if not vals:
            return 0.0, 0.0
        v = torch.cat([x.flatten().cpu() for x in vals])
        return float(v.min()), float(v.max())

    def status(self) -> dict:
        """Where the schedule stands, for progress bars and logs."""
        lo, hi = self._penalty_range()
        s: dict = {
            "method": self.method,
            "phase": self._phase,
            "iteration": self.iteration,
            "planned_total": self.planned_iters()["total"],
            "lambda_min": lo,
            "lambda_max": hi,
            "layers_growing": sum(self._growing.values()) if self._phase == "grow" else 0,
            "mag_ratio": {t.name: self._mag_ma[t.name] for t in self.targets if t.n_remove > 0},
        }
        if self._grow_end is not None:
            s["grow_end"] = self._grow_end
            s["stop_reason"] = self._stop_reason
            s["stabilize_left"] = max(0, self.config.stabilize_reg_interval - (self.iteration - self._grow_end))
        if self.method == "greg2":
            s["pick_iteration"] = self._pick_iteration
            if self._pruned is not None:
                s["overlap_l1"] = {
                    t.name: (self._pruned[t.name] & self._l1_ref[t.name]).sum().item() / t.n_remove
                    for t in self.targets if t.n_remove > 0
                }
        return s

    def _record(self) -> None:
        lo, hi = self._penalty_range()
        norms = {}
        for name in self._tracked:
            w = self._by_name[name].module.weight.detach()
            norms[name] = w.abs().float().flatten(1).sum(dim=1).cpu().tolist()
        self.history.append({
            "iter": self.iteration,
            "phase": self._phase,
            "lambda_min": lo,
            "lambda_max": hi,
            "mag_ratio": {k: v for k, v in self._mag_ma.items() if v is not None},
            "norms": norms,  # per-filter L1 norms (sum |W[n]|) of the tracked layers, for Figure 1
        })
        if len(self.history) > self.config.history_points:
            # Halve the resolution instead of dropping the start: the plot keeps its whole time axis.
            self.history = self.history[::2]
            self._record_stride *= 2

    # ---- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to resume the schedule exactly (tensors on CPU, plain Python otherwise)."""
        return {
            "version": 1,
            "method": self.method,
            "config": dataclasses.asdict(self.config),
            "names": [t.name for t in self.targets],
            "iteration": self.iteration,
            "phase": self._phase,
            "n_pick": self._n_pick,
            "pick_value": self._pick_value,
            "pick_iteration": self._pick_iteration,
            "n_grow": dict(self._n_grow),
            "growing": dict(self._growing),
            "mag_ma": dict(self._mag_ma),
            "grow_end": self._grow_end,
            "stop_reason": self._stop_reason,
            "lambdas": {k: v.cpu().clone() for k, v in self._lam.items()},
            "pruned": None if self._pruned is None else {k: v.cpu().clone() for k, v in self._pruned.items()},
            "l1_ref": {k: v.cpu().clone() for k, v in self._l1_ref.items()},
            "history": copy.deepcopy(self.history),
            "record_stride": self._record_stride,
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore a state_dict() taken from a GReg with the same method, targets and schedule."""
        if d.get("method") != self.method:
            raise ValueError(f"state is for {d.get('method')!r}, this object runs {self.method!r}")
        names = [t.name for t in self.targets]
        if list(d["names"]) != names:
            raise ValueError("state was saved for different targets")
        mine = dataclasses.asdict(self.config)
        differ = [k for k in _SCHEDULE_FIELDS if k in d["config"] and d["config"][k] != mine[k]]
        if differ:
            raise ValueError(f"state was saved under a different schedule ({', '.join(differ)})")

        def dev(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {t.name: src[t.name].to(t.module.weight.device).clone() for t in self.targets}

        self.iteration = int(d["iteration"])
        self._phase = d["phase"]
        self._n_pick = int(d["n_pick"])
        self._pick_value = float(d["pick_value"])
        self._pick_iteration = d["pick_iteration"]
        self._n_grow = {k: int(v) for k, v in d["n_grow"].items()}
        self._growing = {k: bool(v) for k, v in d["growing"].items()}
        self._mag_ma = dict(d["mag_ma"])
        self._grow_end = d["grow_end"]
        self._stop_reason = d["stop_reason"]
        self._lam = {k: v.float() for k, v in dev(d["lambdas"]).items()}
        self._pruned = None if d["pruned"] is None else dev(d["pruned"])
        self._l1_ref = dev(d["l1_ref"])
        self.history = copy.deepcopy(d["history"])
        self._record_stride = int(d["record_stride"])


def _add_grad(p: nn.Parameter, lam: torch.Tensor) -> None:
    if not p.requires_grad:
        return
    # lam * W, then one add: bit-for-bit the gradient of lambda/2 * ||W||^2 added to the loss's.
    pen = lam * p.detach()
    if p.grad is None:
        p.grad = pen.to(p.dtype)
    else:
        p.grad.add_(pen)


class MaskKeeper:
    """Holds masked weights at zero while fine-tuning the same (unstructured-pruned) model.

    Zeroing the gradients after backward keeps momentum buffers at zero too; zeroing the weights after
    each step is what guarantees the zeros, and works alone for loops that only call on_step_end.
    """

    def __init__(self, targets: list[PruneTarget], masks: dict[str, torch.Tensor]) -> None:
        by_name = {t.name: t for t in targets}
        unknown = [k for k in masks if k not in by_name]
        if unknown:
            raise ValueError(f"masks for unknown targets: {', '.join(unknown)}")
        self._pairs: list[tuple[str, nn.Parameter, torch.Tensor]] = []
        for name, m in masks.items():
            w = by_name[name].module.weight
            if tuple(m.shape) != tuple(w.shape):
                raise ValueError(f"{name}: mask shape {tuple(m.shape)} != weight shape {tuple(w.shape)}")
            self._pairs.append((name, w, m.to(device=w.device, dtype=torch.bool)))
        self.apply()

    def apply(self) -> None:
        """Zero the pruned weights now."""
        with torch.no_grad():
            for _, w, keep in self._pairs:
                w.masked_fill_(~keep, 0.0)

    def after_backward(self, trainer: object = None) -> None:
        """Zero the gradients of pruned weights so optimizer state never accumulates for them."""
        for _, w, keep in self._pairs:
            if w.grad is not None:
                w.grad.masked_fill_(~keep, 0.0)

    def on_step_end(self, trainer: object = None) -> None:
        """Re-zero the pruned weights after the optimizer step."""
        self.apply()

    def sparsity(self) -> float:
        """Fraction of the masked layers' weights that are pruned."""
        total = sum(k.numel() for _, _, k in self._pairs)
        pruned = sum((~k).sum().item() for _, _, k in self._pairs)
        return pruned / total if total else 0.0

    def state_dict(self) -> dict:
        """The masks (on CPU)."""
        return {"masks": {name: keep.cpu().clone() for name, _, keep in self._pairs}}

    def load_state_dict(self, d: dict) -> None:
        """Replace the masks with saved ones and apply them."""
        self._pairs = [(n, w, d["masks"][n].to(device=w.device, dtype=torch.bool)) for n, w, _ in self._pairs]
        self.apply()
