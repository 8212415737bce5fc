"""The one training loop every phase reuses: SGD + schedule + hooks, with DDP, AMP, checkpoints and resume.

Hooks are plain objects that define any subset of these methods (only those present are called):

* ``on_step_start(trainer)``            before the forward pass (the lr for this step is already set)
* ``extra_loss(trainer, model, outputs)`` a tensor added to the loss, or None
* ``after_backward(trainer)``           gradients are final and unscaled (e.g. add lambda*W to grads here)
* ``on_step_end(trainer)``              after optimizer.step() and the step counter increment
* ``should_stop(trainer) -> bool``      checked after each step; True ends fit() early
* ``on_epoch_end(trainer)``             after the epoch's evaluation, before its checkpoint
* ``no_weight_decay_params()``          parameters to put in the zero-weight-decay group
* ``state_dict()`` / ``load_state_dict(state)``  saved in and restored from checkpoints

Hooks receive the unwrapped model (``trainer.model``) even under DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import re
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from ..errors import UserError
from . import dist as D
from .checkpoint import atomic_save, capture_rng_state, check_checkpoint_safe, restore_rng_state, safe_load
from .log import MetricsLogger, Progress, to_jsonable
from .schedule import LRSchedule, parse_lr_schedule

__all__ = ["TrainConfig", "Trainer", "TrainingInterrupted", "TrainingDiverged", "evaluate", "build_param_groups",
           "seed_everything", "resolve_device", "HOOK_METHODS", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "regprune.engine.checkpoint/1"
HOOK_METHODS = ("on_step_start", "extra_loss", "after_backward", "on_step_end", "should_stop", "on_epoch_end",
                "no_weight_decay_params", "state_dict", "load_state_dict")

# config fields whose change between save and resume alters the trajectory; differing values get a warning
_TRAJECTORY_FIELDS = ("epochs", "max_steps", "lr", "lr_schedule", "warmup_epochs", "momentum", "nesterov",
                      "weight_decay", "no_wd_bn_bias", "label_smoothing", "batch_size", "seed")


@dataclass
class TrainConfig:
    """Everything that shapes one training phase; stored in checkpoints."""

    epochs: float = 1              # may be fractional; alternatively max_steps
    max_steps: int | None = None   # stop after this many optimizer steps (overrides epochs when set)
    lr: float = 0.1
    lr_schedule: str = "constant"  # "constant", "cosine", or absolute per-epoch rates "0:0.1,100:0.01"
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_wd_bn_bias: bool = False    # no weight decay on normalization params and biases
    label_smoothing: float = 0.0
    batch_size: int = 128          # recorded for the loaders the caller builds; the trainer uses the loader as given
    amp: bool = False              # only effective on CUDA
    channels_last: bool = False
    device: str = "auto"           # cuda if available else cpu
    seed: int = 0
    checkpoint_every: int = 0      # optimizer steps between checkpoints (0: only at epoch ends)
    eval_every_epoch: bool = True
    progress: bool = True
    log_every: int = 50            # optimizer steps between metrics records (and device syncs on GPU)

    def validate(self) -> None:
        """Raise UserError naming the first nonsensical field."""
        def bad(msg: str) -> None:
            raise UserError(f"training config: {msg}")

        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 0):
            bad(f"max_steps must be a non-negative integer, got {self.max_steps!r}")
        if self.max_steps is None and (not math.isfinite(float(self.epochs)) or self.epochs < 0):
            bad(f"epochs must be >= 0, got {self.epochs!r}")
        for name in ("lr", "weight_decay", "warmup_epochs"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.momentum < 1:
            bad(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.nesterov and self.momentum <= 0:
            bad("nesterov needs momentum > 0")
        if not 0 <= self.label_smoothing < 1:
            bad(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.batch_size < 1:
            bad(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.checkpoint_every < 0:
            bad(f"checkpoint_every must be >= 0, got {self.checkpoint_every!r}")
        if self.log_every < 1:
            bad(f"log_every must be >= 1, got {self.log_every!r}")
        parse_lr_schedule(self.lr_schedule, lr=self.lr, total_epochs=1.0, warmup_epochs=self.warmup_epochs)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a dict (e.g. a checkpoint's "config"), ignoring unknown keys."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by fit() after Ctrl-C, once a checkpoint has been written; `checkpoint` is its path (or None)."""

    def __init__(self, checkpoint: Path | None, step: int) -> None:
        self.checkpoint = checkpoint
        self.step = step
        where = (f"checkpoint saved to {checkpoint}; continue with resume_from={str(checkpoint)!r}"
                 if checkpoint is not None else "no run_dir was given, so no checkpoint was saved")
        super().__init__(f"training interrupted after step {step}; {where}")


class TrainingDiverged(UserError):
    """The loss (or the weights) became NaN or infinite; the last good checkpoint is left untouched.

    Losses are checked in batches (every log_every steps and before every checkpoint) to avoid a device sync
    per step; the message still names the first bad step.
    """

    def __init__(self, message: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' means this rank's GPU when CUDA is present, else the CPU; explicit names are checked."""
    if spec in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} requested but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif dev.index >= torch.cuda.device_count():
            raise UserError(f"device {spec!r} does not exist ({torch.cuda.device_count()} GPUs visible)")
    return dev


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def build_param_groups(model: nn.Module, weight_decay: float, no_wd_bn_bias: bool = False,
                       no_wd_params: Iterable[nn.Parameter] = (),
                       extra_groups: Sequence[dict] | None = None) -> list[dict]:
    """SGD parameter groups: 'decay', 'no_decay' (norm params/biases when asked, plus `no_wd_params`), then extras."""
    extras = [dict(g) for g in (extra_groups or [])]
    taken: set[int] = set()
    for g in extras:
        if "params" not in g:
            raise ValueError("each extra parameter group needs a 'params' entry")
        g["params"] = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
        for p in g["params"]:
            if id(p) in taken:
                raise ValueError("a parameter appears in two extra parameter groups")
            taken.add(id(p))
    no_wd = {id(p) for p in no_wd_params}
    if no_wd_bn_bias:
        for m in model.modules():
            if isinstance(m, _NORM_TYPES):
                no_wd.update(id(p) for p in m.parameters(recurse=False))
        no_wd.update(id(p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias")
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicates shared parameters
        if p.requires_grad and id(p) not in taken:
            (no_decay if id(p) in no_wd else decay).append(p)
    groups: list[dict] = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay), "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    groups.extend(extras)
    if not groups:
        raise UserError("the model has no trainable parameters")
    return groups


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["input"], batch["target"]
    return batch[0], batch[1]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str | None = None, *, amp: bool = False,
             channels_last: bool = False, distributed: bool | None = None) -> dict:
    """Top-1/top-5 accuracy (%), mean cross-entropy and sample count of `model` on `loader`.

    top5 is present only for >= 5 classes. Under DDP with a DistributedSampler the sums are all-reduced so
    every rank returns the same numbers (`distributed=None` decides that automatically).
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if distributed is None:
        distributed = D.is_distributed() and isinstance(getattr(loader, "sampler", None), DistributedSampler)
    use_amp = amp and device.type == "cuda"
    was_training = model.training
    model.eval()
    # accumulate on the device: one sync at the end instead of one per batch
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1 hits, top5 hits, n
    num_classes = 0
    try:
        for batch in loader:
            x, y = _split_batch(batch)
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext():
                out = model(x)
            out = out.float()
            num_classes = out.shape[1]
            k = min(5, num_classes)
            hits = out.topk(k, dim=1).indices == y[:, None]
            sums[0] += F.cross_entropy(out, y, reduction="sum").double()
            sums[1] += hits[:, 0].sum()
            sums[2] += hits.any(dim=1).sum()
            sums[3] += y.shape[0]
    finally:
        model.train(was_training)
    if distributed:
        sums = D.all_reduce_sum(sums)
        # a rank with an empty shard saw no logits; take the class count from the others
        classes = torch.tensor([float(num_classes)], device=device)
        torch.distributed.all_reduce(classes, op=torch.distributed.ReduceOp.MAX)
        num_classes = int(classes.item())
    loss_sum, top1, top5, n = sums.tolist()
    n = int(n)
    if n == 0:
        return {"top1": 0.0, "loss": 0.0, "n": 0}
    result = {"top1": 100.0 * top1 / n}
    if num_classes >= 5:
        result["top5"] = 100.0 * top5 / n
    result["loss"] = loss_sum / n
    result["n"] = n
    return result


class _SkipBatches:
    """Batch sampler yielding all but the first `skip` batches of `inner`, without loading the skipped data."""

    def __init__(self, inner: Iterable, skip: int) -> None:
        self.inner = inner
        self.skip = skip

    def __iter__(self) -> Iterator:
        it = iter(self.inner)
        for _ in range(self.skip):
            if next(it, None) is None:
                return
        yield from it

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(rank) * 104_729) % (2**63 - 1)


def _prepare_epoch_order(loader: Any, seed: int, epoch: int, rank: int) -> None:
    """Make the loader's order (and worker seeds) a function of (seed, epoch, rank) only."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if not isinstance(loader, DataLoader):
        return
    s = _epoch_seed(seed, epoch, rank)
    if loader.generator is None:
        # without a generator the order would come from the global RNG, whose state at the epoch start a
        # mid-epoch checkpoint does not hold; give the loader (and its shuffling sampler) one we control
        loader.generator = torch.Generator()
        if isinstance(sampler, RandomSampler) and sampler.generator is None:
            sampler.generator = loader.generator
    loader.generator.manual_seed(s)
    own = getattr(sampler, "generator", None) if isinstance(sampler, RandomSampler) else None
    if own is not None and own is not loader.generator:
        own.manual_seed(s ^ 0x5DEECE66D)


def _skipping_iterator(loader: Any, skip: int) -> Iterator:
    """Iterator over `loader` starting at batch `skip` of the current epoch order."""
    if skip <= 0:
        return iter(loader)
    if (type(loader) is DataLoader and loader.batch_sampler is not None
            and not isinstance(loader.dataset, IterableDataset)):
        # same sampler objects and generator, so the order is identical; skipped batches are never loaded
        kwargs: dict[str, Any] = dict(batch_sampler=_SkipBatches(loader.batch_sampler, skip),
                                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                      pin_memory=loader.pin_memory, timeout=loader.timeout,
                                      worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                                      in_order=getattr(loader, "in_order", True))
        if loader.num_workers > 0:
            kwargs.update(multiprocessing_context=loader.multiprocessing_context,
                          prefetch_factor=loader.prefetch_factor)
        return iter(DataLoader(loader.dataset, **kwargs))
    return itertools.islice(iter(loader), skip, None)


class Trainer:
    """Runs SGD training of `model` with hooks; see the module docstring for the hook protocol."""

    def __init__(self, model: nn.Module, train_loader: Iterable, test_loader: Iterable | None,
                 config: TrainConfig | None = None, *, run_dir: str | Path | None = None, phase: str = "train",
                 hooks: Sequence[Any] = (), extra_param_groups: list[dict] | None = None) -> None:
        self.config = config = config if config is not None else TrainConfig()
        config.validate()
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", phase or ""):
            raise UserError(f"phase name {phase!r} must be letters, digits, '_', '-' or '.' (it names files)")
        self.phase = phase
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.hooks = list(hooks)
        self.rank, self.world_size, self.local_rank = D.get_rank(), D.get_world_size(), D.get_local_rank()
        self.is_main = self.rank == 0
        self.device = resolve_device(config.device, self.local_rank)
        self.amp = bool(config.amp and self.device.type == "cuda")
        self._channels_last = bool(config.channels_last)

        model.to(self.device)
        if self._channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # hooks work on self.model; the wrapper is only used for the forward pass (gradient all-reduce)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model: nn.Module = DDP(model, device_ids=ids)
        else:
            self.forward_model = model

        no_wd: list[nn.Parameter] = []
        for h in self.hooks:
            if callable(getattr(h, "no_weight_decay_params", None)):
                no_wd.extend(h.no_weight_decay_params())
        groups = build_param_groups(model, config.weight_decay, config.no_wd_bn_bias, no_wd, extra_param_groups)
        try:
            self.optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                                             nesterov=config.nesterov, weight_decay=config.weight_decay)
        except ValueError as e:
            raise UserError(f"cannot build the optimizer: {e}") from None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

        self.train_loader = train_loader
        self.test_loader = test_loader
        try:
            self.steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            raise UserError("the training loader must have a length (batches per epoch)") from None
        if self.steps_per_epoch == 0:
            raise UserError("the training set yields no batches (is it smaller than one batch with drop_last?)")

        self._fns = {name: [getattr(h, name) for h in self.hooks if callable(getattr(h, name, None))]
                     for name in ("on_step_start", "extra_loss", "after_backward", "on_step_end", "should_stop",
                                  "on_epoch_end")}
        self._logger = MetricsLogger(self.run_dir, enabled=self.is_main)
        self._progress = Progress(False, 0, 0, "")

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.metrics: list[dict] = []
        self.last_eval: dict | None = None
        self._last_eval_step = -1
        self._final_step = -1
        self._ckpt_step = -1            # step of the last checkpoint this trainer wrote to checkpoint_path
        self._started = False
        self._stage = "idle"            # where in a step we are, so an interrupt can save a consistent state
        self._inflight: tuple | None = None
        self._interrupt_requested = False
        self._stop_requested = False
        self._pending: list[tuple[torch.Tensor, torch.Tensor | None, int]] = []
        self._last_loss_t: torch.Tensor | None = None
        # [loss_sum, correct, n_with_accuracy, n] over the current epoch and the current log interval
        self._acc_epoch = [0.0, 0.0, 0, 0]
        self._acc_interval = [0.0, 0.0, 0, 0]
        self._last_train: dict = {}
        self._interval_t0 = time.perf_counter()
        self._epoch_t0 = time.perf_counter()
        self._schedule = self._make_schedule()
        self._lr = self._schedule(0.0)

    # ------------------------------------------------------------------ read-only views
    @property
    def epoch_float(self) -> float:
        """Training progress in epochs at the start of the next step."""
        return self.epoch + self.batch_in_epoch / self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        """Optimizer steps this phase runs in total (from max_steps, else from epochs)."""
        if self.config.max_steps is not None:
            return int(self.config.max_steps)
        return int(math.ceil(float(self.config.epochs) * self.steps_per_epoch - 1e-9))

    @property
    def lr(self) -> float:
        """Learning rate of the current (or last) step, before any per-group lr_scale."""
        return self._lr

    @property
    def last_loss(self) -> float | None:
        """Loss of the last step on this rank (reading it forces a device sync)."""
        return None if self._last_loss_t is None else float(self._last_loss_t)

    @property
    def checkpoint_path(self) -> Path | None:
        """Where the automatic checkpoints of this phase go (None without run_dir)."""
        return None if self.run_dir is None else self.run_dir / "checkpoints" / f"{self.phase}.pt"

    def log(self, values: dict) -> None:
        """Add a metrics record (phase, step and epoch are filled in); written to disk by rank 0 only."""
        record: dict[str, Any] = {"phase": self.phase, "step": self.step, "epoch": round(self.epoch_float, 6)}
        record.update(to_jsonable(dict(values)))
        self.metrics.append(record)
        self._logger.write(record)

    # ------------------------------------------------------------------ the loop
    def _make_schedule(self) -> LRSchedule:
        total_epochs = self.total_steps / self.steps_per_epoch
        return parse_lr_schedule(self.config.lr_schedule, lr=self.config.lr, total_epochs=max(total_epochs, 1e-12),
                                 warmup_epochs=self.config.warmup_epochs)

    def fit(self, resume_from: str | Path | None = None) -> dict:
        """Train until max_steps/epochs or a hook's should_stop; returns a summary dict."""
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif not self._started and self.step == 0:
            seed_everything(self.config.seed + self.rank)
        self._started = True
        self._schedule = self._make_schedule()
        total = self.total_steps
        self._stop_requested = False
        if resume_from is not None and self.step > 0:
            # the checkpoint may be from the very step a hook asked to stop at (the phase's final checkpoint, an
            # epoch end, a Ctrl-C): ask again, or the resumed run would train steps the original never took
            self._stop_requested = self._poll_should_stop()
        self._interrupt_requested = False
        self._progress = Progress(self.config.progress and self.is_main, total, min(self.step, total), self._desc())
        self._interval_t0 = self._epoch_t0 = t0 = time.perf_counter()
        previous_handler = self._install_sigint()
        try:
            while self.step < total and not self._stop_requested:
                self._run_epoch(total)
            summary = self._finish(time.perf_counter() - t0)
        except KeyboardInterrupt as exc:
            if isinstance(exc, TrainingInterrupted):
                raise
            path = self._save_after_interrupt()
            raise TrainingInterrupted(path, self.step) from None
        except Exception as exc:
            # Ctrl-C also reaches DataLoader workers, which exit quietly; the loader then raises a
            # RuntimeError about dead workers. Once an interrupt is pending, treat that as the interrupt.
            if not self._interrupt_requested or isinstance(exc, UserError):
                raise
            path = self._save_after_interrupt()
            raise TrainingInterrupted(path, self.step) from None
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            self._progress.close()
            self._logger.close()
        return summary

    def _desc(self) -> str:
        epochs = max(1, math.ceil(self.total_steps / self.steps_per_epoch))
        return f"{self.phase} {min(self.epoch + 1, epochs)}/{epochs}"

    def _install_sigint(self):
        # first Ctrl-C only sets a flag so the current step finishes and the checkpoint is consistent;
        # a second Ctrl-C raises at once
        if threading.current_thread() is not threading.main_thread():
            return None
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return None  # somebody else manages Ctrl-C; fall back to catching KeyboardInterrupt

        def on_sigint(signum, frame):
            if self._interrupt_requested:
                raise KeyboardInterrupt
            self._interrupt_requested = True

        signal.signal(signal.SIGINT, on_sigint)
        return signal.default_int_handler

    def _run_epoch(self, total: int) -> None:
        cfg = self.config
        _prepare_epoch_order(self.train_loader, cfg.seed, self.epoch, self.rank)
        if self.batch_in_epoch == 0:
            self._acc_epoch = [0.0, 0.0, 0, 0]
            self._epoch_t0 = time.perf_counter()
        self._progress.set(desc=self._desc())
        self.forward_model.train()
        batches = _skipping_iterator(self.train_loader, self.batch_in_epoch)
        for batch in batches:
            self._train_step(batch)
            if self._interrupt_requested:
                self._progress.line(f"{self.phase}: interrupted, saving a checkpoint at step {self.step}")
                raise KeyboardInterrupt
            self._stop_requested = self._poll_should_stop()
            if self.step % cfg.log_every == 0:
                self._log_interval()
            epoch_done = self.batch_in_epoch >= self.steps_per_epoch
            if epoch_done:
                break
            if self.step >= total or self._stop_requested:
                return
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                t_save = time.perf_counter()
                self._save_auto()
                self._interval_t0 += time.perf_counter() - t_save  # keep img/s about training only
        self._end_epoch()

    def _train_step(self, batch: Any) -> None:
        x, y = _split_batch(batch)
        if x.device != self.device:
            x = x.to(self.device, non_blocking=True)
        if y.device != self.device:
            y = y.to(self.device, non_blocking=True)
        if self._channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # sample the schedule mid-step: warm-up's first step and cosine's last step get a non-zero lr
        lr = self._schedule(self.epoch_float + 0.5 / self.steps_per_epoch)
        self._lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self._stage = "forward"
        for fn in self._fns["on_step_start"]:
            fn(self)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext():
            outputs = self.forward_model(x)
            loss = F.cross_entropy(outputs, y, label_smoothing=self.config.label_smoothing)
        for fn in self._fns["extra_loss"]:
            term = fn(self, self.model, outputs)
            if term is not None:
                loss = loss + term
        if self.amp:
            self.scaler.scale(loss).backward()
            # hooks must see true gradients, so unscale before them (scaler.step will not unscale twice)
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        for fn in self._fns["after_backward"]:
            fn(self)
        out_d = outputs.detach()
        correct = (out_d.argmax(1) == y).sum() if (y.dim() == 1 and out_d.dim() == 2) else None
        self._inflight = (loss.detach(), correct, int(y.shape[0]))
        self._stage = "optimizer"
        if self.amp:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self._stage = "commit"
        self._commit_step()
        for fn in self._fns["on_step_end"]:
            fn(self)

    def _commit_step(self) -> None:
        assert self._inflight is not None
        loss_d, correct, n = self._inflight
        self.step += 1
        self.batch_in_epoch += 1
        self._pending.append((loss_d, correct, n))
        self._last_loss_t = loss_d
        self._inflight = None
        self._stage = "idle"
        self._progress.update()

    def _poll_should_stop(self) -> bool:
        fns = self._fns["should_stop"]
        if not fns:
            return False
        stop = False
        for fn in fns:  # call every hook so each sees every step
            if fn(self):
                stop = True
        if self.world_size > 1:
            # all ranks must leave the loop at the same step or the next all-reduce hangs
            flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
            stop = bool(D.all_reduce_sum(flag).item() > 0)
        return stop

    def _flush(self, collective: bool = True) -> None:
        """Sync pending per-step losses: detect divergence and update the running averages."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        k = len(pending)
        first_step = self.step - k + 1
        has_acc = all(p[1] is not None for p in pending)
        # one stacked tensor and one host transfer per flush rather than one sync per step
        parts = [torch.stack([p[0] for p in pending]).double()]
        if has_acc:
            parts.append(torch.stack([p[1] for p in pending]).double())
        values = torch.cat(parts) if len(parts) > 1 else parts[0]
        ns = [float(p[2]) for p in pending]
        scale = 1
        if collective and self.world_size > 1:
            # a NaN on any rank shows up on every rank, so all of them stop at the same flush
            counts = torch.tensor(ns + [1.0 if has_acc else 0.0], dtype=torch.float64, device=values.device)
            summed = D.all_reduce_sum(torch.cat([values, counts])).tolist()
            scale = self.world_size
            acc_ranks = summed[-1]
            has_acc = acc_ranks == self.world_size
            values_l, ns = summed[:len(values)], summed[len(values):-1]
        else:
            values_l = values.tolist()
        loss_l = values_l[:k]
        corr_l = values_l[k:2 * k] if has_acc else [0.0] * k
        for i in range(k):
            if not math.isfinite(loss_l[i]):
                raise self._diverged(first_step + i, f"the loss is {loss_l[i]}")
            mean_loss = loss_l[i] / scale
            for acc in (self._acc_epoch, self._acc_interval):
                acc[0] += mean_loss * ns[i]
                acc[1] += corr_l[i]
                acc[2] += int(ns[i]) if has_acc else 0
                acc[3] += int(ns[i])

    @staticmethod
    def _summarize(acc: list) -> dict:
        loss_sum, correct, n_known, n = acc
        out: dict[str, Any] = {"loss": loss_sum / n if n else None}
        out["train_top1"] = 100.0 * correct / n_known if n_known else None
        return out

    def _log_interval(self) -> None:
        self._flush()
        now = time.perf_counter()
        stats = self._summarize(self._acc_interval)
        n = self._acc_interval[3]
        img_s = n / max(now - self._interval_t0, 1e-9)
        self.log({"kind": "interval", **stats, "lr": self._lr, "img_s": round(img_s, 2)})
        self._progress.set(loss=_fmt(stats["loss"], ".4f"), acc=_fmt(stats["train_top1"], ".1f"),
                           lr=_fmt(self._lr, ".4g"), **{"img/s": _fmt(img_s, ".0f")})
        self._acc_interval = [0.0, 0.0, 0, 0]
        self._interval_t0 = now

    def _eval_now(self) -> dict | None:
        if self.test_loader is None:
            return None
        if self._last_eval_step == self.step and self.last_eval is not None:
            return self.last_eval
        self.last_eval = evaluate(self.model, self.test_loader, self.device, amp=self.amp,
                                  channels_last=self._channels_last)
        self._last_eval_step = self.step
        return self.last_eval

    def _sync_buffers(self) -> None:
        # DDP broadcasts buffers before each forward, so after the last one the ranks' BN running stats
        # differ by one local update; make them rank 0's so evaluation and the final model agree everywhere
        if self.world_size > 1:
            for b in self.model.buffers():
                torch.distributed.broadcast(b, 0)

    def _end_epoch(self) -> None:
        self._flush()
        self._sync_buffers()
        t_end = time.perf_counter()
        elapsed = t_end - self._epoch_t0
        train = self._summarize(self._acc_epoch)
        self._last_train = train
        n = self._acc_epoch[3]
        ev = self._eval_now() if self.config.eval_every_epoch else None
        self.epoch += 1
        self.batch_in_epoch = 0
        for fn in self._fns["on_epoch_end"]:
            fn(self)
        record: dict[str, Any] = {"kind": "epoch", **train, "lr": self._lr, "img_s": round(n / max(elapsed, 1e-9), 2),
                                  "time_s": round(elapsed, 3)}
        if ev is not None:
            record.update({f"test_{k}": v for k, v in ev.items()})
        self.log(record)
        self._progress.line(self._epoch_line(record))
        self._save_auto()
        self._interval_t0 += time.perf_counter() - t_end  # evaluation and saving are not training throughput

    def _epoch_line(self, rec: dict) -> str:
        epochs = max(1, math.ceil(self.total_steps / self.steps_per_epoch))
        parts = [f"{self.phase} epoch {self.epoch}/{epochs}", f"loss {_fmt(rec.get('loss'), '.4f')}",
                 f"acc {_fmt(rec.get('train_top1'), '.2f')}%"]
        if "test_top1" in rec:
            parts.append(f"test top1 {_fmt(rec['test_top1'], '.2f')}%")
        parts += [f"lr {_fmt(rec.get('lr'), '.4g')}", f"{_fmt(rec.get('img_s'), '.0f')} img/s"]
        return " | ".join(parts)

    def _finish(self, wall_s: float) -> dict:
        self._flush()
        self._sync_buffers()
        if self.batch_in_epoch > 0:
            self._last_train = self._summarize(self._acc_epoch)
        ev = self._eval_now()
        if self._final_step != self.step:
            record: dict[str, Any] = {"kind": "final", **self._last_train, "stopped_early": self._stop_requested}
            if ev is not None:
                record.update({f"test_{k}": v for k, v in ev.items()})
            self._final_step = self.step
            self.log(record)
        if self._ckpt_step != self.step:
            self._save_auto()
        saved = self.checkpoint_path if self._ckpt_step >= 0 else None
        return {"phase": self.phase, "step": self.step, "epoch": self.epoch_float, "lr": self._lr,
                "train_loss": self._last_train.get("loss"), "train_top1": self._last_train.get("train_top1"),
                "eval": ev, "stopped_early": self._stop_requested, "wall_s": wall_s,
                "checkpoint": str(saved) if saved is not None else None}

    # ------------------------------------------------------------------ divergence, interrupts
    def _diverged(self, step: int, what: str) -> TrainingDiverged:
        path = self.checkpoint_path
        if path is not None and path.is_file():
            at = f" (step {self._ckpt_step})" if self._ckpt_step >= 0 else ""
            kept = f"the last good checkpoint {path}{at} is kept"
        elif path is not None:
            kept = "no checkpoint had been written yet"
        else:
            kept = "no run_dir was given, so there is no checkpoint to fall back to"
        self._pending.clear()
        if self.is_main:
            with contextlib.suppress(Exception):
                self.log({"kind": "diverged", "diverged_step": step})
        return TrainingDiverged(f"training diverged at step {step} (phase {self.phase}): {what}; {kept}. "
                                "Try a lower learning rate or regularization strength.", step, path)

    def _weights_finite(self) -> bool:
        tensors = [t for t in itertools.chain(self.model.parameters(), self.model.buffers()) if t.is_floating_point()]
        if not tensors:
            return True
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def _save_after_interrupt(self) -> Path | None:
        if self._stage == "commit":
            self._commit_step()          # optimizer.step() finished; only the bookkeeping was cut short
        elif self._stage == "forward":
            self.optimizer.zero_grad(set_to_none=True)  # this batch is redone after resume
            self._inflight = None
        # "optimizer": interrupted inside optimizer.step(); saving the state as it is is the best we can do
        self._stage = "idle"
        path = self.checkpoint_path
        if path is None:
            return None
        # other ranks may be anywhere, so no collectives here; rank 0 writes what it has
        self.save_checkpoint(path, _collective=False)
        return path

    # ------------------------------------------------------------------ checkpoints
    def _save_auto(self) -> None:
        path = self.checkpoint_path
        if path is None:
            self._flush()  # still check divergence at the points a checkpoint would be written
            return
        self.save_checkpoint(path)

    def save_checkpoint(self, path: str | Path, *, _collective: bool = True) -> Path:
        """Write everything needed to continue bit-exactly (call on every rank; rank 0 writes)."""
        path = Path(path)
        self._flush(collective=_collective)
        if not self._weights_finite():
            raise self._diverged(self.step, "the weights contain NaN or infinite values")
        rng = capture_rng_state()
        rngs = D.all_gather_object(rng) if (_collective and self.world_size > 1) else [rng]
        if self.is_main:
            hook_states = [{"index": i, "type": type(h).__qualname__, "state": h.state_dict()}
                           for i, h in enumerate(self.hooks) if callable(getattr(h, "state_dict", None))]
            state = {
                "format": CHECKPOINT_FORMAT,
                "phase": self.phase,
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "world_size": self.world_size,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "hooks": hook_states,
                "rng": rngs,
                "config": asdict(self.config),
                "metrics": list(self.metrics),
                "accum": {"epoch": list(self._acc_epoch), "interval": list(self._acc_interval),
                          "last_train": dict(self._last_train)},
                "last_eval": dict(self.last_eval) if self.last_eval is not None else None,
                "last_eval_step": self._last_eval_step,
                "final_step": self._final_step,
            }
            check_checkpoint_safe(state, "checkpoint")
            atomic_save(state, path)
        if path == self.checkpoint_path:
            self._ckpt_step = self.step
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by save_checkpoint (weights_only loading; bad files raise UserError)."""
        path = Path(path)
        state = safe_load(path)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path} is not a regprune training checkpoint")
        if state["phase"] != self.phase:
            raise UserError(f"checkpoint {path} belongs to phase {state['phase']!r}, not {self.phase!r}")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise UserError(f"checkpoint {path} does not match the model: {str(e).strip().splitlines()[0]}") from None
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"checkpoint {path} does not match the optimizer's parameter groups: {e}") from None
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        saved_hooks = {h["index"]: h for h in state.get("hooks", [])}
        for i, h in enumerate(self.hooks):
            if not callable(getattr(h, "load_state_dict", None)):
                continue
            entry = saved_hooks.get(i)
            if entry is None or entry["type"] != type(h).__qualname__:
                raise UserError(f"checkpoint {path} has no state for hook #{i} ({type(h).__qualname__}); "
                                "resume with the same hooks it was saved with")
            h.load_state_dict(entry["state"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.metrics = list(state.get("metrics", []))
        accum = state.get("accum", {})
        self._acc_epoch = list(accum.get("epoch", [0.0, 0.0, 0, 0]))
        self._acc_interval = list(accum.get("interval", [0.0, 0.0, 0, 0]))
        self._last_train = dict(accum.get("last_train", {}))
        self.last_eval = state.get("last_eval")
        self._last_eval_step = int(state.get("last_eval_step", -1))
        self._final_step = int(state.get("final_step", -1))
        self._pending.clear()
        self._last_loss_t = None
        rngs = state.get("rng", [])
        if rngs:
            restore_rng_state(rngs[self.rank] if len(rngs) == self.world_size else rngs[0])
        saved_cfg = state.get("config", {})
        changed = [k for k in _TRAJECTORY_FIELDS if k in saved_cfg and saved_cfg[k] != getattr(self.config, k)]
        if changed:
            warnings.warn(f"resuming {path} with a different {', '.join(changed)} than it was saved with; "
                          "the run will not match an uninterrupted one", stacklevel=2)
        if int(state.get("world_size", 1)) != self.world_size:
            warnings.warn(f"checkpoint {path} was written by {state.get('world_size')} ranks, resuming on "
                          f"{self.world_size}; the data order after the resume point differs", stacklevel=2)
        self._started = True
        if path == self.checkpoint_path:
            self._ckpt_step = self.step
        self._logger.drop_after(self.phase, self.step)


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)
