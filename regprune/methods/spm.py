"""Pruning from scratch: nuclear-norm and MACs regularization of channel gates (the SPM search).

`SPMRegularizer` drives the gates of `regprune.methods.gates` (one binary, straight-through gate vector per
coupled channel group, hooked after the activations: the Shared Pruning Module) towards a kept fraction of the
dense MACs, with the paper's nuclear-norm term keeping the gated convolutions' spectrum. When the search is
over, `regprune.reconfigure.reconfigure` removes the off channels physically and exactly.

Gate parameters live in an `nn.ModuleDict` attached to the model as `model.regprune_gates`, so any
optimizer built from `model.parameters()` (and DDP) sees them and model checkpoints carry them; the
weight-decay exclusion is `SPMRegularizer.no_weight_decay_params()`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..counting import channels, is_depthwise, kept_layer_macs
from ..errors import UserError
from ..graph import GroupGraph
from .base import Picks
from .gates import GATES_ATTR, ChannelGate, GateSet, insert_gates

__all__ = ["ChannelGate", "GateSet", "insert_gates", "SPMRegularizer", "reference_scale", "GATES_ATTR",
           "REF_DENSE_GMACS", "REF_SHARE_SUM"]

# The paper's setting (official code, ResNet-50 on ImageNet at 224 px): alpha_mac 0.5 on (GMACs - budget)^2.
# REF_DENSE_GMACS: torchvision ResNet-50's dense GMACs at 224 px; REF_SHARE_SUM: its `SPMRegularizer.share_sum()`
# with the paper's gates (stem, four shared streams, conv1/conv2 of every bottleneck). Both measured by
# `regprune.methods.spm.reference_scale()`; the tests recompute them.
REF_DENSE_GMACS = 4.089
REF_SHARE_SUM = 0.9995


class _Layer:
    """A conv/linear layer's dense MACs and which gated groups feed its output and input channels."""

    def __init__(self, name: str, mod: nn.Module, macs: int) -> None:
        self.name = name
        self.macs = macs
        self.c_out, self.c_in = channels(mod)
        self.depthwise = is_depthwise(mod)
        self.out_roots: list[str] = []
        self.in_roots: list[str] = []


class SPMRegularizer:
    """Nuclear-norm and MACs regularization of the gates, as a hook object for the training engine.

    Engine protocol: `extra_loss(trainer, model, outputs)` returns the term to add to the loss (or
    None), `no_weight_decay_params()`, `on_step_end(trainer)`, `state_dict()` / `load_state_dict()`; as every
    method (`methods.base.PruningMethod`), `done()` (the gates are frozen) and `picks()` (the channels they cut).
    All trainer/model/outputs arguments may be None, so any training loop can call them.

    - `target_macs`: kept fraction of dense MACs (0.41 = 41% kept); budget = target * dense MACs.
    - `alpha_nuc` (0.001): weight of mean_l | ||W_l||_* - ||diag(m_l) W_l||_* | over gated convs/linears,
      W detached. `nuc_every=k` adds the term only on every k-th `extra_loss` call, unscaled (scale
      alpha_nuc by k yourself to keep its time-averaged strength).
    - `alpha_mac` (0.5, paper / official `--alpha_mac`) and `mac_norm` ("matched"): the loss is
      `mac_scale * (MACs / dense - target)^2`. "matched" sets `mac_scale = alpha_mac * D_ref^2 * S_ref / S`
      (see `mac_scale`): the paper's `alpha * (GMACs - budget)^2` on ResNet-50, whose total push on the gates
      relative to the task gradient is kept at any network size (the GMAC form vanishes on a 40 MMAC network,
      and a fraction-of-dense form with its own weight pushes far harder than the paper). "unit" is the paper's
      formula as written (`mac_unit` 1e9: GMACs); "dense" is `alpha_mac * (fraction - target)^2`.
    - `tie_spread` (0.5): the MACs gradient of each gate is weighted by `tie_weights` (1 +/- tie_spread by the
      rank of the channel's weight magnitude, mean 1 per group), so the gates of a group, which the MACs loss
      pushes identically, leave the threshold one at a time, weakest first. 0 gives the paper's uniform push.
    - `mac_grad_inputs` (False): as the authors, each layer's input count is a constant; True makes
      the MACs fully differentiable in both channel counts.
    - `freeze_epoch` / `freeze_after`: freeze the gates once that many epochs have ended
      (`on_epoch_end`, read from `trainer.epoch`; the paper's 65 of 90) or after that many
      `on_step_end` calls (the S_max switch); or call `freeze()` yourself.
    - `gate_lr_scale` (1.0): learning-rate factor of the gates in `param_groups()`, for engines that
      take extra parameter groups with an "lr_scale".
    """

    def __init__(self, gates: GateSet, target_macs: float = 0.41, *, alpha_nuc: float = 1e-3,
                 alpha_mac: float = 0.5, nuc_every: int = 1, mac_grad_inputs: bool = False,
                 mac_norm: str = "matched", mac_unit: float = 1e9, freeze_after: int | None = None,
                 freeze_epoch: int | None = None, gate_lr_scale: float = 1.0, tie_spread: float = 0.5) -> None:
        if not (0.0 < target_macs <= 1.0):
            raise UserError(f"MACs target {target_macs:g} out of range: expected a kept fraction in (0, 1]")
        if mac_norm not in ("matched", "unit", "dense"):
            raise UserError(f"mac_norm={mac_norm!r}: expected 'matched' (the paper's push at any network size), "
                            "'unit' (MACs / mac_unit) or 'dense' (fraction of dense MACs)")
        if not (0.0 <= tie_spread < 1.0):
            raise UserError(f"tie_spread={tie_spread:g}: expected a number in [0, 1)")
        if nuc_every < 1:
            raise UserError(f"nuc_every={nuc_every}: expected a positive integer")
        if mac_unit <= 0:
            raise UserError(f"mac_unit={mac_unit:g}: expected a positive number of MACs")
        if gate_lr_scale <= 0:
            raise UserError(f"gate_lr_scale={gate_lr_scale:g}: expected a positive factor")
        self.gates = gates
        self.target_macs = float(target_macs)
        self.alpha_nuc = float(alpha_nuc)
        self.alpha_mac = float(alpha_mac)
        self.nuc_every = int(nuc_every)
        self.mac_grad_inputs = bool(mac_grad_inputs)
        self.mac_norm = mac_norm
        self.mac_unit = float(mac_unit)
        self.freeze_after = freeze_after
        self.freeze_epoch = freeze_epoch
        self.gate_lr_scale = float(gate_lr_scale)
        self.frozen = False
        self.steps = 0  # on_step_end calls
        self.calls = 0  # extra_loss calls (drives nuc_every)
        self.last: dict[str, float] = {}
        graph = gates.graph
        self.dense_macs = int(graph.total_macs)
        self.budget = self.target_macs * self.dense_macs
        self._layers = self._layer_table(graph)
        self.tie_spread = float(tie_spread)
        self._writer_weights: dict[str, list[str]] = {
            r: [w for w in gates.groups[r].writers if isinstance(graph.module(w), (nn.Conv2d, nn.Linear))]
            for r in gates.roots}
        self.dense_share_sum = self.share_sum()  # S with every gate on; constant
        # convs/linears whose output channels carry a gate: the nuclear-norm terms
        self.nuc_layers: list[tuple[str, str]] = []
        for root in gates.roots:
            for w in gates.groups[root].writers:
                if isinstance(graph.module(w), (nn.Conv2d, nn.Linear)):
                    self.nuc_layers.append((w, root))

    @classmethod
    def attach(cls, model: nn.Module, example_inputs: torch.Tensor, target_macs: float = 0.41,
               groups: str | Sequence[str] = "all", **kwargs: Any) -> "SPMRegularizer":
        """Insert gates into `model` and return the regularizer driving them."""
        return cls(insert_gates(model, example_inputs, groups), target_macs, **kwargs)

    def _layer_table(self, graph: GroupGraph) -> list[_Layer]:
        layers = {n: _Layer(n, graph.module(n), macs) for n, macs in graph.layer_macs.items()}
        for root in self.gates.roots:
            for m in self.gates.groups[root].members:
                if m.name in layers:
                    side = layers[m.name].out_roots if m.side == "out" else layers[m.name].in_roots
                    if root not in side:
                        side.append(root)
        return list(layers.values())

    # ---- losses -------------------------------------------------------------------------------
    def _macs_of(self, counts: dict[str, Any]) -> torch.Tensor:
        """Per-sample MACs for the given kept-channel count of every gated group (tensors or numbers)."""
        widths = {r: self.gates.groups[r].channels for r in self.gates.roots}
        total = torch.zeros((), device=self.gates.gate(self.gates.roots[0]).weight.device)
        for lay in self._layers:
            removed_out = sum(widths[r] - counts[r] for r in lay.out_roots)
            removed_in = sum(widths[r] - counts[r] for r in lay.in_roots)
            if isinstance(removed_in, torch.Tensor) and not self.mac_grad_inputs:
                removed_in = removed_in.detach()  # input counts held constant (the default)
            total = total + kept_layer_macs(lay.macs, lay.c_out, lay.c_in, removed_out, removed_in, lay.depthwise)
        return total

    def soft_macs(self) -> torch.Tensor:
        """Per-sample MACs as a differentiable function of the gates (equals `current_macs()` in value).

        Each gate's share of the MACs gradient is weighted by its tie-break factor (`tie_weights`, mean 1 per
        group), so the gates of one group do not all get the same push."""
        counts = {r: self._count(r) for r in self.gates.roots}
        return self._macs_of(counts)

    def _count(self, root: str) -> torch.Tensor:
        gate = self.gates.gate(root)
        m = gate.mask()
        if self.tie_spread <= 0 or gate.fixed is not None:
            return m.sum()
        w = gate.weight
        r = self.tie_weights(root).to(w.device, w.dtype)
        # value: the hard count; gradient: r_i per gate position (times the grouped-conv repeat)
        return gate.hard().to(w.dtype).sum() * gate.repeat + gate.repeat * ((w - w.detach()) * r).sum()

    def channel_importance(self, root: str) -> torch.Tensor:
        """Weight magnitude of each gate position of group `root` (shape `[channels // repeat]`, no unit): the L2
        norm of the channel's filter in every conv/linear writing the group, each layer divided by its mean, summed
        (a grouped-conv gate sums its blocks). Ones where the group has no conv/linear writer."""
        gate = self.gates.gate(root)
        total = torch.zeros(gate.weight.numel(), device=gate.weight.device)
        for name in self._writer_weights.get(root, []):
            w = self.gates.graph.module(name).weight.detach()
            norms = w.float().reshape(w.shape[0], -1).norm(dim=1)
            if norms.numel() != gate.channels:
                continue
            norms = norms / norms.mean().clamp_min(1e-12)
            total = total + norms.reshape(gate.repeat, -1).sum(0).to(total.device)
        if not bool(total.any()):
            total = torch.ones_like(total)
        return total

    def tie_weights(self, root: str) -> torch.Tensor:
        """Per-gate factor on the MACs gradient of group `root` (shape `[channels // repeat]`, mean 1): from
        `1 + tie_spread` for the channel of smallest weight magnitude to `1 - tie_spread` for the largest, linear in
        rank. It breaks the tie between gates that the MACs loss otherwise pushes identically, so a group's gates
        cross the threshold one by one, weakest first, instead of together."""
        imp = self.channel_importance(root)
        n = imp.numel()
        if n < 2 or self.tie_spread <= 0:
            return torch.ones_like(imp)
        rank = torch.empty_like(imp)
        rank[torch.argsort(imp, stable=True)] = torch.arange(n, dtype=imp.dtype, device=imp.device)
        return 1 + self.tie_spread * (1 - 2 * rank / (n - 1))

    def share_sum(self) -> float:
        """S = sum over every gated channel of d(MACs / dense MACs) / d(its gate) with all gates on (no unit).

        The MACs loss's total push on the gates is 2 * scale * (MACs fraction - target) * S; the task loss's total
        push, sum_i dL/dm_i (its sensitivity to scaling every gated channel at once) does not grow with the number
        of channels. Matching S-weighted scales therefore matches the push relative to the task gradient.
        Computed once at construction as `dense_share_sum` (it does not depend on the gates' state)."""
        widths = {r: self.gates.groups[r].channels for r in self.gates.roots}
        counts = {r: torch.tensor(float(c), dtype=torch.float64, requires_grad=True) for r, c in widths.items()}
        macs = self._macs_of(counts)
        grads = torch.autograd.grad(macs, [counts[r] for r in self.gates.roots], allow_unused=True)
        total = sum(widths[r] * float(g) for r, g in zip(self.gates.roots, grads) if g is not None)
        return total / self.dense_macs

    @property
    def mac_scale(self) -> float:
        """The weight on (MACs fraction - target)^2 that `macs_loss` applies (no unit).

        "matched": alpha_mac * D_ref^2 * S_ref / S, where D_ref = 4.089 (torchvision ResNet-50's dense GMACs at 224
        px) and S_ref = 0.9995 (its `share_sum` with the paper's gates) and S this network's `share_sum`: the paper's
        loss, alpha_mac * (GMACs - budget)^2, rewritten in fractions of dense MACs, scaled so that the total push
        on the gates relative to the task gradient is the paper's at any network size (for ResNet-50 at 224 px
        it is the paper's loss). "unit": alpha_mac * (dense MACs / mac_unit)^2 (the paper's formula as written).
        "dense": alpha_mac."""
        if self.mac_norm == "matched":
            return self.alpha_mac * REF_DENSE_GMACS ** 2 * REF_SHARE_SUM / self.dense_share_sum
        if self.mac_norm == "unit":
            return self.alpha_mac * (self.dense_macs / self.mac_unit) ** 2
        return self.alpha_mac

    def macs_loss(self) -> torch.Tensor:
        """mac_scale * (MACs / dense MACs - target)^2 (a number, no unit); see `mac_scale` for the three scales."""
        diff = self.soft_macs() / self.dense_macs - self.target_macs
        return self.mac_scale * diff * diff

    def nuclear_loss(self) -> torch.Tensor:
        """alpha_nuc * mean over gated convs of | ||W||_* - ||diag(m) W||_* |, W detached."""
        graph = self.gates.graph
        terms = []
        for name, root in self.nuc_layers:
            w = graph.module(name).weight.detach()
            # SVD needs float32 or better; AMP must not lower it
            with torch.autocast(device_type=w.device.type, enabled=False):
                w = w.float().reshape(w.shape[0], -1)
                m = self.gates.gate(root).mask().float()
                full = torch.linalg.svdvals(w).sum()
                kept = torch.linalg.svdvals(m.unsqueeze(1) * w).sum()
            terms.append((full - kept).abs())
        if not terms:
            return torch.zeros((), device=self.gates.gate(self.gates.roots[0]).weight.device)
        return self.alpha_nuc * torch.stack(terms).mean()

    def extra_loss(self, trainer: Any = None, model: nn.Module | None = None, outputs: Any = None) -> torch.Tensor | None:
        """The regularization term to add to this step's loss; None once frozen."""
        if self.frozen:
            return None
        use_nuc = self.alpha_nuc > 0 and self.calls % self.nuc_every == 0
        self.calls += 1
        loss = None
        if self.alpha_mac > 0:
            loss = self.macs_loss()
            self.last["mac_loss"] = float(loss.detach())
        if use_nuc:
            nuc = self.nuclear_loss()
            self.last["nuc_loss"] = float(nuc.detach())
            loss = nuc if loss is None else loss + nuc
        return loss

    # ---- engine hooks and state ---------------------------------------------------------------
    def no_weight_decay_params(self) -> list[nn.Parameter]:
        """Parameters the optimizer must not decay: the gate weights."""
        return list(self.gates.parameters())

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimizer group for the gates: no weight decay, learning rate times `gate_lr_scale`."""
        return [{"params": list(self.gates.parameters()), "weight_decay": 0.0, "lr_scale": self.gate_lr_scale,
                 "name": "spm_gates"}]

    def on_step_end(self, trainer: Any = None) -> None:
        """Count the step, record the MACs fraction, and freeze at `freeze_after` steps."""
        self.steps += 1
        self.last["macs_fraction"] = self.current_macs() / self.dense_macs
        if self.freeze_after is not None and self.steps >= self.freeze_after and not self.frozen:
            self.freeze()

    def on_epoch_end(self, trainer: Any = None) -> None:
        """Freeze once `freeze_epoch` epochs have ended (`trainer.epoch` counts ended epochs)."""
        epoch = getattr(trainer, "epoch", None)
        if self.freeze_epoch is not None and epoch is not None and epoch >= self.freeze_epoch and not self.frozen:
            self.freeze()

    def freeze(self) -> None:
        """Stop the search: the on/off set is fixed, gates stop learning, both losses are off."""
        self.frozen = True
        for gate in self.gates.gates.values():
            gate.fix()
        if _distributed():
            # DDP expects a gradient for every parameter it was built with: keep them in the graph
            # (their gradient is zero and the fixed mask ignores any drift of the weights)
            return
        for p in self.gates.parameters():
            p.requires_grad_(False)
            p.grad = None  # a stale grad would let momentum keep moving the gates

    def done(self) -> bool:
        """True once the gates are frozen: the on/off set is final and `reconfigure` may cut it."""
        return self.frozen

    def picks(self) -> Picks:
        """Group root -> sorted indices of the channels the hard gates turn off (what reconfiguration removes)."""
        return self.gates.picks()

    def current_macs(self) -> int:
        """Exact per-sample MACs of the network the hard gates describe."""
        return self.gates.current_macs()

    def kept_widths(self) -> dict[str, int]:
        """Number of channels on per gated group root."""
        return self.gates.kept_widths()

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging: MACs fraction now and the last loss values."""
        return {**self.last, "macs_fraction": self.current_macs() / self.dense_macs, "frozen": float(self.frozen)}

    def state_dict(self) -> dict[str, Any]:
        """Gate weights, counters and the frozen flag (the model's own state also carries the gates)."""
        state: dict[str, Any] = {
            "gates": {r: self.gates.gate(r).weight.detach().cpu().clone() for r in self.gates.roots},
            "frozen": self.frozen, "steps": self.steps, "calls": self.calls}
        if self.frozen:
            state["fixed"] = {r: self.gates.gate(r).hard().cpu().clone() for r in self.gates.roots}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned."""
        gates = state.get("gates", {})
        missing = [r for r in self.gates.roots if r not in gates]
        if missing:
            raise UserError(f"SPM state has no gates for {len(missing)} groups, e.g. {missing[0]}: saved from another model?")
        with torch.no_grad():
            for r in self.gates.roots:
                w = self.gates.gate(r).weight
                if gates[r].shape != w.shape:
                    raise UserError(f"SPM state: gate {r} has {tuple(gates[r].shape)} weights, the model needs {tuple(w.shape)}")
                w.copy_(gates[r].to(w.device))
        self.steps = int(state.get("steps", 0))
        self.calls = int(state.get("calls", 0))
        if state.get("frozen", False):
            self.freeze()
            fixed = state.get("fixed", {})
            for r in self.gates.roots:
                if r in fixed:
                    gate = self.gates.gate(r)
                    gate.fixed = fixed[r].to(device=gate.weight.device, dtype=torch.bool)
        else:
            self.frozen = False
            for gate in self.gates.gates.values():
                gate.unfix()
            for p in self.gates.parameters():
                p.requires_grad_(True)


def reference_scale(size: int = 224) -> tuple[float, float]:
    """(dense GMACs, `share_sum`) of torchvision ResNet-50 with the paper's gates at `size` px: the reference of
    the "matched" MACs scale (REF_DENSE_GMACS, REF_SHARE_SUM). Builds the model on CPU (seconds)."""
    from ..models import create_model

    model = create_model("torchvision.resnet50", num_classes=1000, in_channels=3)
    reg = SPMRegularizer(insert_gates(model, torch.zeros(1, 3, size, size)), 0.41)
    return reg.dense_macs / 1e9, reg.dense_share_sum


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)
