"""Pruning from scratch: channel gates, the Shared Pruning Module, nuclear-norm and MACs regularization.

The search trains a network whose prunable activations are multiplied channel-wise by binary gates
`m = 1[w > 0.5]` (straight-through gradient to `w`). There is one gate vector per coupled channel group
(`graph.analyze(..., include_coupled=True)`), so every block that writes into a residual stream shares
the stream's gate: that is the Shared Pruning Module, and it makes the final reconfiguration exact.

Gates are attached WITHOUT editing the model's source: forward hooks multiply the outputs of each
group's writers (their BatchNorm when there is one, else the conv/linear itself, and the option-A
`PadShortcut`) by the group's mask. Gating every writer before the residual add equals gating the
stream after add+ReLU when the mask is binary, because the stream's input is already zero on the
off channels (the stem writer is gated too).

Gate parameters live in an `nn.ModuleDict` attached to the model as `model.regprune_gates`, so any
optimizer built from `model.parameters()` (and DDP) sees them and model checkpoints carry them; the
weight-decay exclusion is `SPMRegularizer.no_weight_decay_params()`.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from ..counting import kept_layer_macs
from ..errors import UserError
from ..graph import ChannelGroup, GroupGraph, analyze
from ..models.cifar import PadShortcut
from ..ratios import estimate_macs

__all__ = ["ChannelGate", "GateSet", "insert_gates", "SPMRegularizer", "reconfigure", "GATES_ATTR"]

GATES_ATTR = "regprune_gates"  # attribute under which the gate ModuleDict hangs on the model

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


class ChannelGate(nn.Module):
    """One learnable scalar per channel; the mask is `w > threshold` forward and identity backward.

    `repeat > 1` is for channels that pass through a grouped conv: the gate holds one weight per
    position inside a channel block and the mask repeats it over the `repeat` blocks, so the kept set
    is block-periodic as the grouped conv requires. At least `min_on` gate positions are always on
    (the largest weights), so a group can never be emptied, in the search or at reconfiguration.
    """

    def __init__(self, channels: int, init: float = 0.6, threshold: float = 0.5, repeat: int = 1,
                 min_on: int = 1) -> None:
        super().__init__()
        if repeat < 1 or channels % repeat:
            raise ValueError(f"{channels} channels do not split into {repeat} equal blocks")
        self.channels = channels
        self.repeat = repeat
        self.threshold = threshold
        self.min_on = min_on
        self.weight = nn.Parameter(torch.full((channels // repeat,), float(init)))
        self.fixed: torch.Tensor | None = None  # the on/off set once frozen

    def fix(self) -> None:
        """Freeze the on/off set: the mask no longer follows the weight, whose gradient becomes zero."""
        self.fixed = self.hard().clone()

    def unfix(self) -> None:
        """Let the mask follow the weight again."""
        self.fixed = None

    def hard(self) -> torch.Tensor:
        """Boolean on/off per gate position (length channels/repeat), with the never-empty guard."""
        if self.fixed is not None:
            return self.fixed
        w = self.weight.detach()
        on = w > self.threshold
        short = min(self.min_on, w.numel()) - int(on.sum())
        if short > 0:
            top = torch.topk(torch.where(on, torch.full_like(w, -math.inf), w), short).indices
            on = on.clone()
            on[top] = True
        return on

    def channel_hard(self) -> torch.Tensor:
        """Boolean on/off per channel (the hard mask repeated over grouped-conv blocks)."""
        return self.hard().repeat(self.repeat)

    def mask(self) -> torch.Tensor:
        """Float mask per channel: exactly 0/1 forward, d mask / d w = 1 backward (straight-through)."""
        w = self.weight
        # hard + (w - w.detach()) is exactly the binary value (w - w == 0), unlike w + (hard - w).detach()
        ste = w - w.detach()
        if self.fixed is not None:
            ste = ste * 0  # still in the graph, so DDP sees a (zero) gradient for every parameter
        m = self.hard().to(w.dtype) + ste
        return m.repeat(self.repeat) if self.repeat > 1 else m

    def count(self) -> torch.Tensor:
        """Soft number of kept channels, sum of the mask (differentiable through the STE)."""
        return self.mask().sum()

    def forward(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """`x` multiplied channel-wise (along `dim`) by the mask."""
        m = self.mask().to(x.dtype)
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * m.view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, repeat={self.repeat}, threshold={self.threshold}"


def _gate_key(root: str, taken: set[str]) -> str:
    # ModuleDict keys may not contain dots; keep them readable and unique
    key = root.replace(".", "_") or "root"
    base, i = key, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    return key


def _gate_sites(graph: GroupGraph, g: ChannelGroup) -> list[tuple[str, int]]:
    """(module name, channel dim) of the outputs that must be gated so the whole group is masked.

    A norm layer's output is gated (it would turn a zero channel into its shift); a conv/linear only
    when its output does not go straight into a norm layer of the group (no BN after it); the option-A
    shortcut always, as it writes the residual stream.
    """
    outs = [m for m in g.members if m.side == "out"]
    norm_mods = {graph.module(m.name) for m in outs if isinstance(graph.module(m.name), _NORMS)}
    sites: list[tuple[str, int]] = []
    for m in outs:
        mod = graph.module(m.name)
        if isinstance(mod, _NORMS) or isinstance(mod, PadShortcut):
            sites.append((m.name, 1))
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            node = graph.dg.module2node.get(mod)
            nexts = [n.module for n in node.outputs] if node is not None else []
            if nexts and all(n in norm_mods for n in nexts):
                continue
            sites.append((m.name, -1 if isinstance(mod, nn.Linear) else 1))
    return sites


class GateSet:
    """The gates of one model: one `ChannelGate` per gated channel group, and the hooks applying them."""

    def __init__(self, model: nn.Module, graph: GroupGraph, roots: Sequence[str], init: float = 0.6,
                 threshold: float = 0.5, attach: bool = True) -> None:
        self.model = model
        self.graph = graph
        self.groups: dict[str, ChannelGroup] = {r: graph.groups[r] for r in roots}
        self.gates = nn.ModuleDict()
        self.keys: dict[str, str] = {}
        self.sites: dict[str, list[str]] = {}
        self.handles: list = []
        self.attached = False
        self.removed = False
        params = next(iter(model.parameters()), None)
        for root in roots:
            g = self.groups[root]
            gate = ChannelGate(g.channels, init, threshold, repeat=max(1, g.ch_groups))
            if params is not None:
                gate = gate.to(device=params.device)
            key = _gate_key(root, set(self.gates.keys()))
            self.keys[root] = key
            self.gates[key] = gate
            self.sites[root] = []
            for name, dim in _gate_sites(graph, g):
                self.sites[root].append(name)
                self.handles.append(graph.module(name).register_forward_hook(self._hook(gate, dim)))
        if attach:
            if hasattr(model, GATES_ATTR):
                raise UserError(f"the model already carries gates ({GATES_ATTR}); remove them before inserting new ones")
            model.add_module(GATES_ATTR, self.gates)
            self.attached = True

    @staticmethod
    def _hook(gate: ChannelGate, dim: int):
        def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            return gate(out, dim)
        return hook

    @property
    def roots(self) -> list[str]:
        """Group roots that carry a gate, in the graph's order."""
        return list(self.keys)

    def gate(self, root: str) -> ChannelGate:
        """The gate of group `root`."""
        return self.gates[self.keys[root]]

    def __len__(self) -> int:
        return len(self.keys)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The gate weights (one tensor per group)."""
        return iter(self.gates.parameters())

    def hard_masks(self) -> dict[str, torch.Tensor]:
        """Boolean kept-channel mask per group root (guard applied)."""
        return {r: self.gate(r).channel_hard() for r in self.keys}

    def removal(self) -> dict[str, int]:
        """Number of channels off per group root."""
        return {r: int((~m).sum()) for r, m in self.hard_masks().items()}

    def picks(self) -> dict[str, list[int]]:
        """Indices of the off channels per group root (what reconfiguration removes)."""
        return {r: torch.nonzero(~m).flatten().tolist() for r, m in self.hard_masks().items()}

    def kept_widths(self) -> dict[str, int]:
        """Number of channels on per group root."""
        return {r: int(m.sum()) for r, m in self.hard_masks().items()}

    def current_macs(self) -> int:
        """Exact per-sample MACs of the network the current hard gates describe."""
        if self.removed:
            raise UserError("these gates were removed from the model; count the reconfigured model instead")
        return estimate_macs(self.graph, {r: k for r, k in self.removal().items() if k})

    def remove(self) -> None:
        """Remove the hooks and detach the gate ModuleDict from the model (the model is dense again)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.attached and getattr(self.model, GATES_ATTR, None) is self.gates:
            delattr(self.model, GATES_ATTR)
        self.attached = False
        self.removed = True


def _select_roots(graph: GroupGraph, groups: str | Sequence[str]) -> list[str]:
    skip = ("network output", "single channel", "unsafe")
    if groups == "all":
        return [r for r, g in graph.groups.items() if not g.reason.startswith(skip) and g.channels >= 2]
    if groups == "scope":
        return [g.root for g in graph.scope()]
    if isinstance(groups, str):
        raise UserError(f"groups={groups!r}: expected 'all', 'scope' or a list of group roots")
    roots = []
    for name in groups:
        g = graph.groups.get(name)
        if g is None:
            hits = [x for x in graph.groups.values() if name in x.writers]
            if not hits:
                raise UserError(f"{name!r} is not a channel group of this model; see `regprune inspect`")
            g = hits[0]
        if g.reason.startswith(skip) or g.channels < 2:
            raise UserError(f"group {g.root} cannot be gated: {g.reason or 'single channel'}")
        if g.root not in roots:
            roots.append(g.root)
    # model order, whatever order the user wrote
    return [r for r in graph.groups if r in roots]


def _analyze(model: nn.Module, example_inputs: torch.Tensor) -> GroupGraph:
    # Torch-Pruning's tracer leaves the model in eval mode; a search must go on in the mode it was in
    return analyze(model, example_inputs, include_coupled=True)  # every module's mode is kept by the graph


def insert_gates(model: nn.Module, example_inputs: torch.Tensor, groups: str | Sequence[str] = "all",
                 init: float = 0.6, threshold: float = 0.5, attach: bool = True) -> GateSet:
    """Hook one shared gate per channel group into `model` (no source edit); returns the `GateSet`.

    `groups`: "all" (every group but the classifier output and single channels: stem, residual
    streams, private convs, the paper's setting), "scope" (the graph's default pruning scope), or a
    list of group roots / writer names. Grouped-conv groups get block-periodic gates.
    """
    if hasattr(model, GATES_ATTR):
        raise UserError(f"the model already carries gates ({GATES_ATTR}); remove them before inserting new ones")
    graph = _analyze(model, example_inputs)
    roots = _select_roots(graph, groups)
    if not roots:
        raise UserError("no channel group of this model can be gated")
    return GateSet(model, graph, roots, init=init, threshold=threshold, attach=attach)


class _Layer:
    """A conv/linear layer's dense MACs and which gated groups feed its output and input channels."""

    def __init__(self, name: str, mod: nn.Module, macs: int) -> None:
        from ..counting import channels, is_depthwise

        self.name = name
        self.macs = macs
        self.c_out, self.c_in = channels(mod)
        self.depthwise = is_depthwise(mod)
        self.out_roots: list[str] = []
        self.in_roots: list[str] = []


class SPMRegularizer:
    """Nuclear-norm and MACs regularization of the gates, as a hook object for the training engine.

    Engine protocol: `extra_loss(trainer, model, outputs)` returns the term to add to the loss (or
    None), `no_weight_decay_params()`, `on_step_end(trainer)`, `state_dict()` / `load_state_dict()`.
    All trainer/model/outputs arguments may be None, so any training loop can call them.

    - `target_macs`: kept fraction of dense MACs (0.41 = 41% kept); budget = target * dense MACs.
    - `alpha_nuc` (0.001): weight of mean_l | ||W_l||_* - ||diag(m_l) W_l||_* | over gated convs/linears,
      W detached. `nuc_every=k` adds the term only on every k-th `extra_loss` call, unscaled (scale
      alpha_nuc by k yourself to keep its time-averaged strength).
    - `alpha_mac` (0.5) and `mac_norm`: "unit" is the paper's `alpha * ((MACs - budget) / mac_unit)^2`
      with mac_unit=1e9 (GMACs); that is far too weak for CIFAR/MNIST-sized networks (tens of MMACs),
      where "dense", `alpha * (MACs/dense - target)^2`, reaches the budget. Measured (ResNet-56,
      MNIST-5k at 14x14, 400 SGD steps, lr 0.1 cosine with 40 warm-up steps, frozen at 70%):
      alpha_mac=20 with gate_lr_scale=0.1 ended at 0.499 of dense for a 0.5 target and trained well;
      with gate_lr_scale=1 (alpha 5/20/50) it also landed within 2% but the stage-3 stream collapsed
      to one channel early (gates flip on the first large task gradients) and accuracy suffered.
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
                 mac_norm: str = "unit", mac_unit: float = 1e9, freeze_after: int | None = None,
                 freeze_epoch: int | None = None, gate_lr_scale: float = 1.0) -> None:
        if not (0.0 < target_macs <= 1.0):
            raise UserError(f"MACs target {target_macs:g} out of range: expected a kept fraction in (0, 1]")
        if mac_norm not in ("unit", "dense"):
            raise UserError(f"mac_norm={mac_norm!r}: expected 'unit' (MACs / mac_unit) or 'dense' (fraction of dense MACs)")
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
    def soft_macs(self) -> torch.Tensor:
        """Per-sample MACs as a differentiable function of the gates (equals `current_macs()` in value)."""
        counts = {r: self.gates.gate(r).count() for r in self.gates.roots}
        widths = {r: self.gates.groups[r].channels for r in self.gates.roots}
        total = torch.zeros((), device=self.gates.gate(self.gates.roots[0]).weight.device)
        for lay in self._layers:
            removed_out = sum(widths[r] - counts[r] for r in lay.out_roots)
            removed_in = sum(widths[r] - counts[r] for r in lay.in_roots)
            if isinstance(removed_in, torch.Tensor) and not self.mac_grad_inputs:
                removed_in = removed_in.detach()  # input counts held constant (the default)
            total = total + kept_layer_macs(lay.macs, lay.c_out, lay.c_in, removed_out, removed_in, lay.depthwise)
        return total

    def macs_loss(self) -> torch.Tensor:
        """alpha_mac * (MACs - budget)^2, in units of mac_unit ("unit") or of dense MACs ("dense")."""
        macs = self.soft_macs()
        if self.mac_norm == "dense":
            diff = macs / self.dense_macs - self.target_macs
        else:
            diff = (macs - self.budget) / self.mac_unit
        return self.alpha_mac * diff * diff

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


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def reconfigure(model: nn.Module, gates: GateSet | SPMRegularizer, example_inputs: torch.Tensor,
                before_surgery=None) -> nn.Module:
    """Threshold the gates, remove the off channels physically, drop the gates; returns `model`, pruned in place.

    The result computes the same function as the gated network (the gates were binary and shared
    per group), and is verified like every removal (UserError and the model unpruned otherwise). The gate
    hooks are removed before the model is traced again. `before_surgery(picks)`, when given, is called with
    the picks (group root -> channel indices) on the gate-free dense model just before the removal (for
    example to compute `optim_state.kept_indices` for an optimizer).
    """
    from ..surgery import apply_picks  # lazy: surgery imports regprune.methods, which may import this module

    gateset = gates.gates if isinstance(gates, SPMRegularizer) else gates
    if gateset.model is not model:
        raise UserError("reconfigure: these gates belong to another model")
    if gateset.removed:
        raise UserError("reconfigure: the gates were already removed from this model")
    picks = gateset.picks()
    old_groups = gateset.groups
    gateset.remove()
    graph = _analyze(model, example_inputs)
    new_picks: dict[str, list[int]] = {}
    for root, idxs in picks.items():
        if not idxs:
            continue
        # the new trace may root the same group at another member: find it by (root, "out")
        hit = [g for g in graph.groups.values() if any(m.name == root and m.side == "out" for m in g.members)]
        if not hit or hit[0].channels != old_groups[root].channels:
            raise UserError(f"reconfigure: group {root} is not found again in the traced model")
        new_picks[hit[0].root] = idxs
    if before_surgery is not None:
        before_surgery(new_picks)
    if not new_picks:
        return model
    return apply_picks(graph, new_picks)
