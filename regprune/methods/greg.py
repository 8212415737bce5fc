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

The schedule's numbers (`GRegConfig`, `stability_bound`, `GRegConfig.predict` / `scaled`) live in
`regprune.methods.greg_schedule` and are re-exported here.

Call `after_backward` on unscaled gradients (after `GradScaler.unscale_` under AMP). Under DDP the
added term is identical on every rank, since the weights are.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from ..errors import UserError
from .base import Picks, PruneTarget
from .greg_schedule import (GREG_METHODS, PENALTIES, SCHEDULE_FIELDS, GRegConfig, norm_method, passes, reaches,
                            stability_bound)
from .l1 import check_targets, lowest_mask, n_units, pick_masks, unit_scores
from .masks import MaskKeeper, add_penalty_grad

__all__ = ["GRegConfig", "GReg", "MaskKeeper", "GREG_METHODS", "PENALTIES", "stability_bound"]


class GReg:
    """GReg-1 / GReg-2 as a hook object: after_backward, on_step_end, should_stop, picks, state_dict.

    Phases: "pick" (GReg-2 only) -> "grow" -> "stabilize" -> "done". The iteration counter counts
    on_step_end calls; the penalty changes only every `update_reg_interval` of them.
    """

    def __init__(
        self, targets: list[PruneTarget], config: GRegConfig | None = None, method: str = "greg1"
    ) -> None:
        self.config = config if config is not None else GRegConfig()
        self.method = norm_method(method)
        self.targets = list(targets)
        self._by_name = {t.name: t for t in self.targets}
        if len(self._by_name) != len(self.targets):
            raise ValueError("PruneTarget names must be unique")
        cfg = self.config
        check_targets(self.targets, cfg.unstructured, cfg.penalty == "group")

        # L1's picks at the original weights: GReg-1's pruned set (with pick="min"), and GReg-2's
        # reference for the overlap the paper's code logs.
        self._l1_ref = pick_masks(self.targets, "min", 0, cfg.criterion, cfg.unstructured)
        self._pruned: dict[str, torch.Tensor] | None = None
        if self.method == "greg1":
            self._pruned = (dict(self._l1_ref) if cfg.pick == "min"
                            else pick_masks(self.targets, cfg.pick, cfg.seed, cfg.criterion, cfg.unstructured))

        self._lam = {
            t.name: torch.zeros(n_units(t, cfg.unstructured), dtype=torch.float32, device=t.module.weight.device)
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
                add_penalty_grad(w, lam.view_as(w))
                continue
            add_penalty_grad(w, lam.view(-1, *([1] * (w.dim() - 1))))
            if self.config.penalty == "group":
                for _, p, dim in t.coupled:
                    shape = [1] * p.dim()
                    shape[dim] = -1
                    add_penalty_grad(p, lam.to(p.device).view(shape))

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
                    self._update_ma(t, lowest_mask(t, cfg.criterion, cfg.unstructured))
            if reaches(value, cfg.reg_upper_limit_pick):
                self._pruned = {t.name: lowest_mask(t, cfg.criterion, cfg.unstructured) for t in self.targets}
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
            if passes(value, cfg.reg_upper_limit):
                self._growing[t.name] = False
            elif self.method == "greg2" and self._mag_ma[t.name] >= cfg.mag_ratio_limit:
                # GReg-2 stops each layer on its own ratio (official code, _greg_2); GReg-1 waits for all layers.
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
        scores = unit_scores(t, self.config.criterion, self.config.unstructured)
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
            "predicted": self.config.predict(self.method),
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
        differ = [k for k in SCHEDULE_FIELDS if k in d["config"] and d["config"][k] != mine[k]]
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
