"""Short Python calls on a user's own `nn.Module`: one-shot pruning and regularizers for any training loop."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .errors import UserError
from .gate_regularizer import GateRegularizer, spm_regularizer
from .graph import GroupGraph, analyze
from .methods.base import Picks, PruneTarget
from .methods.greg import GReg, GRegConfig, MaskKeeper
from .methods.l1 import CRITERIA, PICK_MODES, pick_filters
from .ratios import Plan, make_plan
from .surgery import apply_picks
from .verify import check_example_inputs

__all__ = ["prune", "regularizer", "Regularizer", "GateRegularizer", "PruneResult", "plan_targets", "l1_picks",
           "unstructured_plan", "as_example_inputs"]


@dataclass
class PruneResult:
    """A physically pruned model, what was removed, the plan it followed, and the verification that ran
    (`verification`: modes, outputs compared, largest relative difference from the dense model with the
    removed channels zeroed)."""

    model: nn.Module
    picks: Picks
    plan: Plan
    verification: dict | None = None


def plan_targets(graph: GroupGraph, plan: Plan, coupled: bool = False, unstructured: bool = False) -> list[PruneTarget]:
    """One PruneTarget per group the plan prunes: root layer, count, grouped-conv channel blocks, and with
    `coupled` the group's other slices (BN scale and shift, consumers' input channels) for Group-GReg's penalty
    and the "group" criterion."""
    targets = []
    for root, k in plan.removal.items():
        mod = graph.module(root)
        if unstructured:
            k = min(math.ceil(plan.ratios[root] * mod.weight.numel() - 1e-9), mod.weight.numel() - 1)
        # slices whose channel count differs from the root's (behind a concat or a grouped conv) are left out
        group = graph.coupled_params(root, include_bn=True) if coupled and not unstructured else []
        slices = [c for c in group if c[1].shape[c[2]] == mod.weight.shape[0]]
        if len(slices) < len(group):
            left = ", ".join(n for n, p, d in group if p.shape[d] != mod.weight.shape[0])
            warnings.warn(f"{root}: the group penalty and criterion leave out {left} (behind a concat or a grouped "
                          "conv, its channels do not line up with the root's); those slices are not penalised",
                          stacklevel=3)
        blocks = graph.groups[root].ch_groups if root in graph.groups else 1
        targets.append(PruneTarget(root, mod, k, slices, blocks))
    return targets


def l1_picks(graph: GroupGraph, targets: list[PruneTarget], how: str = "min", seed: int = 0,
             criterion: str = "filter") -> Picks:
    """L1 picks per target (`methods.l1.pick_filters`), keeping grouped-conv blocks where a group passes through one.

    criterion "filter": the pruned layer's own filter norms (the papers' L1); "group": the channel's magnitude
    over every layer of its channel group (the consumers' input weights and the BN scales too)."""
    if criterion not in CRITERIA:
        raise UserError(f"unknown criterion {criterion!r}: expected one of {', '.join(CRITERIA)}")
    if how not in PICK_MODES:
        raise UserError(f"unknown pick {how!r}: expected one of {', '.join(PICK_MODES)}")
    if criterion == "group":
        targets = [dataclasses.replace(t, coupled=graph.coupled_params(t.name, include_bn=True)) for t in targets]
    return pick_filters(targets, how, seed, criterion)


def as_example_inputs(model: nn.Module, example_inputs: Any) -> Any:
    """The example inputs as the graph takes them: a tensor (its first sample), a tuple/list of positional inputs
    or a dict of keyword inputs (as given: every input is used). Raises UserError when they are None or hold no
    tensor."""
    if example_inputs is None:
        raise UserError("example_inputs is required: a batch (even of 1) shaped like the model's input, a tuple "
                        "of positional inputs or a dict of keyword inputs")
    return check_example_inputs(example_inputs)  # the whole batch: a forward may branch on its size


def _prune_with_optimizer(graph: GroupGraph, picks: Picks, optimizer, include_coupled: bool) -> None:
    """Surgery (verified) that keeps a training loop's optimizer right: it gets the new parameters and its
    per-parameter state (momentum, Adam moments) sliced to the kept channels."""
    if optimizer is None:
        apply_picks(graph, picks)
        return
    from .optim_state import kept_indices, rebind_optimizer

    old = dict(graph.model.named_parameters())
    own = {id(p) for p in old.values()}
    foreign = [p for grp in optimizer.param_groups for p in grp["params"] if id(p) not in own]
    if foreign:  # checked before anything changes
        raise UserError(f"the optimizer holds {len(foreign)} parameter(s) that are not this model's; pass an "
                        "optimizer over the pruned model's parameters only")
    kept = kept_indices(graph.model, graph.example_inputs, picks, include_coupled)
    apply_picks(graph, picks)
    rebind_optimizer(optimizer, old, graph.model, kept)


def prune(model: nn.Module, example_inputs: torch.Tensor, method: str = "l1", ratios: str | None = None, *,
          speedup: float | None = None, target_macs: float | None = None, skip: list[str] | None = None,
          round_to: int | None = None, include_coupled: bool = False, pick: str = "min", seed: int = 0,
          criterion: str = "filter", inplace: bool = False, optimizer: torch.optim.Optimizer | None = None
          ) -> PruneResult:
    """One-shot L1 pruning of any traceable model: returns the smaller dense model (a copy unless `inplace`).

    `example_inputs`: a tensor (N, ...), a tuple/list of positional inputs, or a dict of keyword inputs.
    `criterion="group"` scores each channel over its whole coupled group instead of the pruned filter alone.
    Every result is verified (see `regprune.verify`): the pruned model equals the dense model with the removed
    channels zeroed, in eval and train mode, or UserError names the groups at fault and the model is left as it
    was. With `inplace=True, optimizer=opt` the optimizer is pointed at the new parameters and its state sliced.
    Raises UserError for an unreachable target, a plan that removes nothing, or a model wrapped in DDP."""
    if method != "l1":
        raise UserError(f"prune() does one-shot pruning (method='l1'); for {method!r} use regprune.regularizer()")
    if optimizer is not None and not inplace:
        raise UserError("optimizer= needs inplace=True: a pruned copy's parameters are not in your optimizer")
    target = model if inplace else copy.deepcopy(model)
    x = as_example_inputs(target, example_inputs)
    graph = analyze(target, x, include_coupled=include_coupled)
    plan = make_plan(graph, ratios, speedup=speedup, target_macs=target_macs, skip=skip, round_to=round_to)
    if plan.note:
        warnings.warn(plan.note, stacklevel=2)
    picks = l1_picks(graph, plan_targets(graph, plan), pick, seed, criterion)
    _prune_with_optimizer(graph, picks, optimizer, include_coupled)
    return PruneResult(target, picks, plan, getattr(target, "regprune_verification", None))


def unstructured_plan(graph: GroupGraph, sparsity: float, skip: list[str] | None = None) -> Plan:
    """Unstructured scope: every conv and linear layer (any dimension, transposed too) at one sparsity, the fraction
    of its weights to zero (the paper's unstructured ResNet-50 runs at 0.827, section 4.3). `skip` takes module-name
    glob patterns. MACs are unchanged: a sparse layer still runs dense. Raises UserError for a sparsity outside
    (0, 1) or a scope left empty by `skip`."""
    import fnmatch

    from .counting import count_macs, is_counted

    if not 0.0 < sparsity < 1.0:
        raise UserError(f"sparsity {sparsity:g} out of range: expected a fraction of weights to zero in (0, 1)")
    layers = [n for n, m in graph.model.named_modules() if is_counted(m) and m.weight is not None
              and not any(fnmatch.fnmatchcase(n, p) for p in skip or [])]
    if not layers:
        raise UserError("nothing to prune: no conv or linear layer is left in the unstructured scope")
    macs = count_macs(graph.model, graph.example_inputs)
    return Plan({n: sparsity for n in layers}, {n: 1 for n in layers}, macs, macs)


class Regularizer:
    """GReg-1/GReg-2 around an existing training loop: call `after_backward()` between backward and step,
    `on_step_end()` after the step, stop when `done()`, then `prune()`."""

    def __init__(self, graph: GroupGraph, plan: Plan, method: str, config: GRegConfig, unstructured: bool,
                 include_coupled: bool = False) -> None:
        self.graph = graph
        self.plan = plan
        self.method = method
        self.unstructured = unstructured
        self.include_coupled = include_coupled
        self.targets = plan_targets(graph, plan, "group" in (config.penalty, config.criterion), unstructured)
        self.greg = GReg(self.targets, config, method=method)
        self.pruned = False

    def _live(self, what: str) -> None:
        if self.pruned:
            raise UserError(f"Regularizer.{what}() after prune(): the model is already pruned; build a new "
                            "regularizer for another round")

    # the hook protocol, forwarded so the object can go straight into the engine's hooks list
    def extra_loss(self, trainer: Any = None, model: nn.Module | None = None, outputs: Any = None) -> None:
        """None: GReg adds its penalty to the gradients (`after_backward`), not to the loss."""
        return None

    def after_backward(self, trainer: Any = None) -> None:
        self._live("after_backward")
        self.greg.after_backward(trainer)

    def on_step_end(self, trainer: Any = None) -> None:
        self._live("on_step_end")
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

    def prune(self, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
        """Remove the driven-to-zero filters physically (structured) or fix masks (unstructured); returns the model.

        The removal is verified like every other (UserError and the model unchanged on a mismatch). Pass the
        training loop's `optimizer` to have it point at the new parameters with its momentum sliced to the kept
        channels; for unstructured pruning, `optimizer` gets a step hook that keeps the pruned weights at zero. A
        second call, or GReg-2 before its pick, raises UserError."""
        self._live("prune")
        try:
            self.greg.masks() if self.unstructured else self.greg.picks()
        except RuntimeError as exc:  # GReg-2 before its pick
            raise UserError(str(exc)) from None
        if self.unstructured:
            self.pruned = True
            self.keeper = self.greg.mask_keeper()  # zeroes the pruned weights now
            if optimizer is not None:
                # the zeros hold through fine-tuning: re-applied after every step of the user's optimizer
                optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: self.keeper.apply())
            else:
                warnings.warn("unstructured prune() without optimizer=: the zeroed weights grow back when training "
                              "goes on; pass optimizer= or add mask_keeper()'s hooks to the loop", stacklevel=2)
            return self.graph.model
        picks = self.greg.picks()
        _prune_with_optimizer(self.graph, picks, optimizer, self.include_coupled)
        self.pruned = True
        return self.graph.model

    def mask_keeper(self) -> MaskKeeper:
        """For unstructured runs: a hook that holds pruned weights at zero through fine-tuning."""
        return self.greg.mask_keeper()


def regularizer(model: nn.Module, example_inputs: torch.Tensor, method: str = "greg1", ratios: str | None = None, *,
                speedup: float | None = None, target_macs: float | None = None, iters: int | None = None,
                config: GRegConfig | None = None, skip: list[str] | None = None, round_to: int | None = None,
                include_coupled: bool = False, unstructured: bool = False, sparsity: float | None = None,
                **config_overrides: Any) -> Regularizer | GateRegularizer:
    """Build a GReg-1/GReg-2 (`Regularizer`) or SPM (`GateRegularizer`) regularizer for `model`.

    SPM (`method="spm"`) hooks one binary gate per channel group into `model` (in place) and drives the gated
    network's MACs to `target_macs` (kept fraction of dense MACs, 0.41 by default; or `speedup` = 1 / target);
    `iters` is the number of steps after which the gates freeze; `config_overrides` take `groups` ("all",
    "scope" or a list of group roots) and `SPMRegularizer` keywords (`alpha_mac`, `alpha_nuc`, `tie_spread`,
    `freeze_epoch`, ...). The GReg-only options (ratios, config, skip, round_to, include_coupled, unstructured,
    sparsity) raise UserError with it. Build the optimizer after this call, so that it holds the gates.

    How much: `ratios` / `speedup` / `target_macs` plan filter removal per channel group; with `unstructured=True`
    either the same plan's ratios apply per weight, or `sparsity` (a fraction in (0, 1)) zeroes that share of the
    weights of every conv and linear layer. `iters` makes the schedule budget-aware (`GRegConfig.scaled`): pass the
    optimizer's `lr_prune=` and `momentum=` among `config_overrides` (GRegConfig field names, e.g. `penalty="group"`,
    `criterion="group"`) so that the penalty integrates enough decay without ringing. Raises UserError for an
    unknown method, an unreachable target, a plan that removes nothing or bad settings."""
    if method == "spm":
        return spm_regularizer(model, as_example_inputs(model, example_inputs), ratios=ratios, speedup=speedup, target_macs=target_macs,
                                iters=iters, config=config, skip=skip, round_to=round_to,
                                include_coupled=include_coupled, unstructured=unstructured, sparsity=sparsity,
                                options=config_overrides)
    if method not in ("greg1", "greg2"):
        raise UserError(f"unknown regularization method {method!r}: expected greg1, greg2 or spm")
    graph = analyze(model, as_example_inputs(model, example_inputs), include_coupled=include_coupled)
    if sparsity is not None:
        if not unstructured:
            raise UserError("sparsity= is the unstructured scope; pass unstructured=True, or plan filters with "
                            "ratios, speedup or target_macs")
        if ratios is not None or speedup is not None or target_macs is not None:
            raise UserError("give either sparsity= or ratios/speedup/target_macs, not both")
        plan = unstructured_plan(graph, sparsity, skip)
    else:
        plan = make_plan(graph, ratios, speedup=speedup, target_macs=target_macs, skip=skip, round_to=round_to)
    if plan.note:
        warnings.warn(plan.note, stacklevel=2)
    transposed = [r for r in plan.removal if getattr(graph.module(r), "transposed", False)]
    if transposed and not unstructured:
        raise UserError(f"GReg on transposed-conv filters is not supported yet ({transposed[0]}); skip those layers "
                        "or prune them with method l1")
    if config is None:
        config_overrides.setdefault("unstructured", unstructured)
        if "lr" in config_overrides:  # the optimizer's name for GReg's lr_prune
            lr = config_overrides.pop("lr")
            if config_overrides.get("lr_prune", lr) != lr:
                raise UserError(f"lr={lr:g} and lr_prune={config_overrides['lr_prune']:g} disagree: they are the same "
                                "setting")
            config_overrides["lr_prune"] = lr
        unknown = sorted(set(config_overrides) - {f.name for f in dataclasses.fields(GRegConfig)})
        if unknown:
            raise UserError(f"unknown GReg setting {unknown[0]!r}: expected a GRegConfig field (e.g. lr_prune, "
                            "momentum, penalty, criterion, mag_ratio_limit)")
        config = (GRegConfig.scaled(iters, method, **config_overrides) if iters is not None
                  else GRegConfig(**config_overrides))
    warning = config.predict(method)["warning"]
    if warning:
        warnings.warn(f"GReg schedule: {warning}", stacklevel=2)
    return Regularizer(graph, plan, method, config, unstructured, include_coupled)
