"""PyTorch Lightning callback: GReg-1/GReg-2 or SPM regularization, pruning and fine-tuning in one `Trainer.fit`.

    from regprune.integrations.lightning import RegPruneCallback

    cb = RegPruneCallback("greg1", ratios="*conv*:0.5", iters=2000, save_path="pruned.safetensors")
    trainer = lightning.Trainer(max_steps=5000, callbacks=[cb])
    trainer.fit(lit_module, loader)     # regularize 2000 steps, prune, fine-tune the rest

Where the callback acts in Lightning 2.x (see `lightning/pytorch/plugins/precision/amp.py` and `precision.py`):

- `setup` (stage "fit"): SPM inserts its gates (`module.regprune_gates`) before `configure_optimizers` runs, so
  they are parameters your optimizer is built from. `on_fit_start`: GReg is built once the strategy has moved
  the model and DDP has broadcast rank 0's weights (GReg-1 picks its filters from them).
- `on_before_optimizer_step`: Lightning calls it after the backward pass (and the DDP all-reduce), after
  `GradScaler.unscale_` under `precision="16-mixed"`, and before gradient clipping and `optimizer.step()`.
  There the GReg penalty `lambda * W` (or the gradient of the SPM MACs/nuclear-norm loss) is added to the
  UNSCALED gradients, once per optimizer step (so also once per `accumulate_grad_batches` window).
- `on_train_batch_end`: after the step, the schedule advances (only on batches where the optimizer stepped);
  once it is done the module is pruned in place and training continues on the smaller model (fine-tuning), or
  stops with `stop_after_prune=True`.

After pruning, the Trainer's own optimizers are kept and rebound to the new parameters (`optim_state.
rebind_optimizer`): momentum / Adam moments are sliced to the kept channels, SPM gate parameters are dropped, and
the optimizer objects stay the same, so LR schedulers, the AMP GradScaler and Lightning's optimizer wrappers keep
working. Rebuilding them with `trainer.strategy.setup_optimizers(trainer)` would call `configure_optimizers()`
again, which restarts LR schedules and loses momentum. Under DDP the module is wrapped again after pruning.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..errors import UserError

try:
    import lightning.pytorch as pl
except ImportError as _exc:  # ModuleNotFoundError, or a broken install
    raise UserError(f"the Lightning callback needs PyTorch Lightning ({type(_exc).__name__}: {_exc}): "
                    "pip install 'regprune[lightning]'") from None

from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..api import Regularizer, as_example_inputs, regularizer
from ..methods.greg import GRegConfig
from ..methods.spm import SPMRegularizer
from .callback_options import METHODS, check_arguments
from .pruning import (add_loss_gradient, device_of, held_param_ids, prune_and_rebind, regularized_params,
                      regularizer_metrics, to_device)

__all__ = ["RegPruneCallback", "METHODS"]


class RegPruneCallback(pl.Callback):
    """Regularize, prune and fine-tune a LightningModule's network inside `Trainer.fit` (GReg-1/2 or SPM).

    Args:
        method: "greg1" or "greg2" (growing L2 penalty on the filters to remove, then `Regularizer.prune`), or
            "spm" (channel gates with MACs and nuclear-norm losses, then exact reconfiguration).
        ratios: GReg only: per-layer pruning ratios, e.g. "*conv*:0.5" (the `regprune prune --ratios` syntax;
            layer names are relative to the pruned module, see `module`).
        speedup: MACs speedup to reach (dense MACs / pruned MACs, >= 1); for SPM it sets `target_macs=1/speedup`.
        target_macs: kept fraction of dense MACs. SPM's default is `SPMRegularizer`'s, 0.41.
        iters: optimizer steps of regularization before pruning. GReg: the paper's schedule scaled to fit
            (`GRegConfig.scaled`; without it the paper's CIFAR schedule, about 110,000 steps). SPM: the gates
            freeze (and the model is pruned) after this many steps (`freeze_after`).
        config: GReg only: a full `GRegConfig` instead of `iters` / keyword overrides.
        skip, round_to, include_coupled, unstructured: GReg only, as for `regprune.regularizer`.
        groups: SPM only: which channel groups get gates ("all", "scope" or a list of group roots).
        module: attribute path of the network to prune inside the LightningModule ("backbone", "net.body").
            Default None: `pl_module.model` when that is an `nn.Module`, else the LightningModule itself;
            "" always means the LightningModule itself. The module must exist when `setup` runs (not be created
            in `configure_model`).
        example_inputs: an input batch of that network (tensor (N, ...), tuple of positional inputs or dict of
            keyword inputs); default `pl_module.example_input_array`.
        save_path: write the pruned network here in regprune's format (`regprune.save`; ".safetensors" is
            appended when missing) right after pruning, from global rank 0. Load with
            `regprune.load(path, model=dense_network)`.
        stop_after_prune: end `fit` right after pruning instead of fine-tuning on in the same run.
        prune_on_fit_end: prune at the end of `fit` even if the schedule has not finished (SPM: the gates are
            frozen where they are; GReg-2: only once it has picked). Otherwise a warning says nothing was pruned.
        log_metrics: log "regprune/..." scalars (penalty, MACs fraction, pruned flag) with `pl_module.log`.
        **options: GReg: `GRegConfig` fields (e.g. `reg_upper_limit=0.5`); SPM: `SPMRegularizer` keywords
            (`alpha_mac`, `alpha_nuc`, `mac_norm`, `freeze_epoch`, `gate_lr_scale`, ...).

    After `fit`: `regularizer` (the `Regularizer` or `SPMRegularizer`), `pruned`, `pruned_at_step` (global step),
    `saved_path`, `summary` (parameter counts before/after).

    Optimizers: build them in `configure_optimizers` from the LightningModule's parameters (the pruned layers'
    weights, and for SPM the gates, must be in an optimizer: `on_train_start` raises UserError otherwise). For
    SPM, exclude the gates from weight decay with `cb.no_weight_decay_params()`. The penalty is added before
    Lightning clips gradients, so `gradient_clip_val` clips it together with the loss gradient. GReg does not
    touch the learning rate: train at `GRegConfig.lr_prune` (0.001 in the paper) while regularizing.

    Supported strategies: single device and DDP (the module is wrapped in DDP again after pruning). Checkpoints
    taken before pruning resume the schedule (`state_dict`); ones taken after pruning hold the pruned shapes and
    cannot be resumed with this callback (load the saved file with `regprune.load` and fine-tune without it).

    Raises:
        UserError: unknown method or option, options of the other method, SPM without a way to finish, a missing
            submodule or example inputs, an unsupported strategy, optimizers not holding the regularized
            parameters, a checkpoint taken after pruning; and whatever `regprune.regularizer` /
            `SPMRegularizer.attach` raise for the plan.
    """

    def __init__(self, method: str = "greg1", ratios: str | None = None, *, speedup: float | None = None,
                 target_macs: float | None = None, iters: int | None = None, config: GRegConfig | None = None,
                 skip: list[str] | None = None, round_to: int | None = None, include_coupled: bool = False,
                 unstructured: bool = False, groups: str | Sequence[str] = "all", module: str | None = None,
                 example_inputs: Any = None, save_path: str | None = None, stop_after_prune: bool = False,
                 prune_on_fit_end: bool = False, log_metrics: bool = True, **options: Any) -> None:
        super().__init__()
        method, target_macs, iters, config, options = check_arguments(
            method, ratios=ratios, speedup=speedup, target_macs=target_macs, iters=iters, config=config, skip=skip,
            round_to=round_to, include_coupled=include_coupled, unstructured=unstructured, groups=groups,
            prune_on_fit_end=prune_on_fit_end, options=options)
        self.method = method
        self.is_spm = method == "spm"
        self.ratios, self.speedup, self.target_macs, self.iters, self.config = ratios, speedup, target_macs, iters, config
        self.skip, self.round_to, self.include_coupled, self.unstructured = skip, round_to, include_coupled, unstructured
        self.groups = groups
        self.module = module
        self.example_inputs = example_inputs
        self.save_path = save_path
        self.stop_after_prune = stop_after_prune
        self.prune_on_fit_end = prune_on_fit_end
        self.log_metrics = log_metrics
        self.options = options

        self.regularizer: Regularizer | SPMRegularizer | None = None
        self.pruned = False
        self.pruned_at_step: int | None = None
        self.saved_path: str | None = None
        self.summary: dict[str, Any] = {}
        self.steps = 0  # optimizer steps the regularizer has seen
        self._module_name: str | None = None
        self._example: Any = None
        self._stepped = False
        self._keeper = None  # unstructured GReg: holds pruned weights at zero while fine-tuning
        self._pending_state: dict | None = None

    # ---- what is pruned --------------------------------------------------------------------------
    def _resolve(self, pl_module: pl.LightningModule) -> str:
        if self.module is None:
            return "model" if isinstance(getattr(pl_module, "model", None), nn.Module) else ""
        if self.module:
            try:
                sub = pl_module.get_submodule(self.module)
            except AttributeError:
                raise UserError(f"module={self.module!r}: the LightningModule has no such submodule") from None
            if not isinstance(sub, nn.Module):
                raise UserError(f"module={self.module!r} is not an nn.Module")
        return self.module

    def target(self, pl_module: pl.LightningModule) -> nn.Module:
        """The network being pruned: `pl_module` or its submodule named by `module` (resolved at `setup`)."""
        name = self._module_name if self._module_name is not None else self._resolve(pl_module)
        return pl_module.get_submodule(name) if name else pl_module

    def _reg_params(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters the penalty lands on, named as in the LightningModule."""
        return regularized_params(self.regularizer, f"{self._module_name}." if self._module_name else "")

    def no_weight_decay_params(self) -> list[nn.Parameter]:
        """SPM: the gate weights, to put in a zero-weight-decay group in `configure_optimizers`; GReg: []."""
        if isinstance(self.regularizer, SPMRegularizer):
            return self.regularizer.no_weight_decay_params()
        return []

    # ---- Lightning hooks -------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.regularizer is not None or self.pruned:
            return
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise UserError(f"RegPruneCallback supports single-device and DDP training, not {type(strategy).__name__}")
        if getattr(strategy, "_start_method", "popen") != "popen":
            # the spawned workers prune; the launching process would then load pruned weights into its dense model
            raise UserError(f"RegPruneCallback cannot run under {type(strategy).__name__} with start method "
                            f"{strategy._start_method!r} (ddp_spawn/ddp_fork): use strategy='ddp'")
        self._module_name = self._resolve(pl_module)
        net = self.target(pl_module)
        x = self.example_inputs if self.example_inputs is not None else getattr(pl_module, "example_input_array", None)
        if x is None:
            raise UserError("RegPruneCallback needs example inputs: pass example_inputs= or set "
                            "example_input_array on the LightningModule")
        self._example = as_example_inputs(net, x)
        if self.is_spm:
            # now, so that configure_optimizers (run by the strategy's setup, next) sees the gate parameters;
            # the gates start equal on every rank, whatever the weights
            target = 0.41 if self.target_macs is None else self.target_macs
            self.regularizer = SPMRegularizer.attach(net, to_device(self._example, device_of(net)), target,
                                                     self.groups, **self.options)
            self._apply_pending()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.regularizer is not None or self.pruned or self._example is None:
            return
        # GReg-1 fixes its picks from the weights at construction: build it after the strategy moved the model and
        # DDP broadcast rank 0's weights, so every rank picks the same filters
        net = self.target(pl_module)
        was = net.training
        try:
            self.regularizer = regularizer(
                net, self._inputs(trainer, net), self.method, self.ratios, speedup=self.speedup,
                target_macs=self.target_macs, iters=self.iters, config=self.config, skip=self.skip,
                round_to=self.round_to, include_coupled=self.include_coupled, unstructured=self.unstructured,
                **self.options)
        finally:
            net.train(was)  # the tracer leaves the model in eval mode
        self._apply_pending()

    def _inputs(self, trainer: pl.Trainer, net: nn.Module) -> Any:
        """The example inputs on the network's device, in the dtype the precision plugin feeds it."""
        return trainer.precision_plugin.convert_input(to_device(self._example, device_of(net)))

    def _apply_pending(self) -> None:
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.regularizer is None or self.pruned:
            return
        held = held_param_ids(trainer.optimizers)
        missing = [n for n, p in self._reg_params() if id(p) not in held]
        if missing:
            raise UserError(f"no optimizer holds {missing[0]}: build the optimizer in configure_optimizers from the "
                            "LightningModule's parameters (after RegPruneCallback.setup)")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.regularizer is None:
            return
        if self.pruned:
            if self._keeper is not None:
                self._keeper.after_backward()
                self._stepped = True
            return
        reg_params = self._reg_params()
        held = held_param_ids([optimizer])
        if not any(id(p) in held for _, p in reg_params):
            return  # another optimizer's step (manual optimization with several optimizers)
        if all(p.grad is None for p in self.target(pl_module).parameters()):
            return  # no backward reached the network (training_step returned None): no step to regularize
        if isinstance(self.regularizer, SPMRegularizer):
            # the gradient of the SPM loss on the gates: the same as adding the loss to the task loss, whose only
            # dependence on it is through the gates
            reg = self.regularizer
            add_loss_gradient(reg.extra_loss(), list(reg.gates.parameters()))
        else:
            self.regularizer.after_backward()
        self._stepped = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._stepped:
            return
        self._stepped = False
        if self.pruned:
            if self._keeper is not None:
                self._keeper.on_step_end()
            return
        self.steps += 1
        reg = self.regularizer
        reg.on_step_end()
        metrics = regularizer_metrics(reg)  # read before pruning: SPM's MACs count needs the gates
        if reg.frozen if isinstance(reg, SPMRegularizer) else reg.done():
            self.prune_now(trainer, pl_module)
        if self.log_metrics:
            metrics["regprune/pruned"] = float(self.pruned)
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reg = self.regularizer
        if isinstance(reg, SPMRegularizer) and not self.pruned:
            # SPMRegularizer reads the number of ended epochs; Lightning's current_epoch counts it after this hook
            reg.on_epoch_end(SimpleNamespace(epoch=trainer.current_epoch + 1))
            if reg.frozen:
                self.prune_now(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.regularizer is None or self.pruned:
            return
        if self.prune_on_fit_end:
            self.prune_now(trainer, pl_module)
            return
        reg = self.regularizer
        where = (f"gates not frozen after {self.steps} steps" if isinstance(reg, SPMRegularizer) else
                 f"schedule at step {self.steps} of {reg.status()['planned_total']} ({reg.status()['phase']})")
        rank_zero_warn(f"RegPruneCallback: the model was NOT pruned ({where}); train longer, lower iters, or pass "
                       "prune_on_fit_end=True")

    # ---- pruning ---------------------------------------------------------------------------------
    def prune_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
        """Prune the network in place now, rebind the Trainer's optimizers, re-wrap DDP, save; returns the network.

        Called by the hooks when the schedule is done; callable by hand (e.g. from another callback). Raises
        UserError when already pruned, or when GReg-2 has not picked its filters yet."""
        if self.pruned:
            raise UserError("RegPruneCallback.prune_now(): the model is already pruned")
        net = self.target(pl_module)
        x = self._inputs(trainer, net)
        prefix = f"{self._module_name}." if self._module_name else ""
        n_before = sum(p.numel() for p in net.parameters())
        self._keeper = prune_and_rebind(pl_module, net, prefix, self.regularizer, x, list(trainer.optimizers))
        self._rewrap(trainer)
        self.pruned = True
        self.pruned_at_step = int(trainer.global_step)
        n_after = sum(p.numel() for p in net.parameters())
        self.summary = {"step": self.pruned_at_step, "params_before": n_before, "params_after": n_after,
                        "verification": getattr(net, "regprune_verification", None)}
        if self.save_path is not None and trainer.is_global_zero:
            from ..surgery import save_model

            meta = {"method": self.method, "step": self.pruned_at_step, "source": "RegPruneCallback"}
            self.saved_path = str(save_model(net, self.save_path, meta=meta))
        rank_zero_info(f"RegPruneCallback: pruned at step {self.pruned_at_step} ({self.method}), parameters "
                       f"{n_before:,} -> {n_after:,}" + (f", saved to {self.saved_path}" if self.saved_path else ""))
        if self.stop_after_prune:
            trainer.should_stop = True
        return net

    @staticmethod
    def _rewrap(trainer: pl.Trainer) -> None:
        """DDP holds the old parameters (its gradient buckets): wrap the pruned LightningModule again."""
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, nn.parallel.DistributedDataParallel):
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()

    # ---- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.regularizer is None:
            return {}
        return {"version": 1, "method": self.method, "pruned": self.pruned, "steps": self.steps,
                "regularizer": None if self.pruned else self.regularizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("pruned"):
            raise UserError("this checkpoint was taken after RegPruneCallback pruned the model: fine-tune the pruned "
                            "model (regprune.load) without the callback")
        if state_dict.get("method") != self.method:
            raise UserError(f"this checkpoint's RegPruneCallback ran {state_dict.get('method')!r}, not {self.method!r}")
        if self.regularizer is None:  # restored before the regularizer was built (GReg: at on_fit_start)
            self._pending_state = state_dict
            return
        try:
            self.regularizer.load_state_dict(state_dict["regularizer"])
        except ValueError as exc:
            raise UserError(f"cannot resume the regularizer from this checkpoint: {exc}") from None
        self.steps = int(state_dict.get("steps", 0))

