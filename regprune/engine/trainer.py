"""The one training loop every phase reuses: SGD + schedule + hooks, with DDP, AMP, checkpoints and resume.

The hook protocol (`on_step_start`, `extra_loss`, `after_backward`, `on_step_end`, `should_stop`, `on_epoch_end`,
`no_weight_decay_params`, `state_dict` / `load_state_dict`) is described in `regprune.engine.hooks`; one step's
device work is in `regprune.engine.step`, checkpoints and Ctrl-C in `regprune.engine.resume`, and the run's
bookkeeping they share in `regprune.engine.state`.
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from ..errors import UserError
from . import dist as D
from .build import build_optimizer, check_phase, place_model, steps_per_epoch
from .checkpoint import seed_everything
from .config import CHECKPOINT_FORMAT, HOOK_METHODS, TrainConfig, TrainingDiverged, TrainingInterrupted
from .data import prepare_epoch_order, skipping_iterator
from .evaluate import evaluate
from .hooks import HookSet
from .log import MetricsLogger, Progress, epoch_line, fmt_value, to_jsonable
from .optim import build_param_groups, resolve_device
from .resume import Checkpointer
from .schedule import LRSchedule, build_lr_scheduler, parse_lr_schedule
from .state import RunState
from .step import forward_backward, optimizer_step, place_batch

__all__ = ["TrainConfig", "Trainer", "TrainingInterrupted", "TrainingDiverged", "evaluate", "build_param_groups",
           "seed_everything", "resolve_device", "HOOK_METHODS", "CHECKPOINT_FORMAT"]


class Trainer:
    """Runs SGD training of `model` with hooks (see `regprune.engine.hooks` for the hook protocol).

    The learning rate follows `config.lr_schedule` per optimizer step through `lr_scheduler`, a torch LambdaLR
    that fit() builds at the run's position (see `build_lr_scheduler`); a group's rate is its ``lr_scale``
    (1.0 unless an extra group sets it) times the schedule's.

    `step`, `epoch` and `batch_in_epoch` say where the run is; `run_state` (a `RunState`) holds the rest of the
    run's bookkeeping, which the loop shares with the checkpoint logic (`regprune.engine.resume.Checkpointer`).
    """

    def __init__(self, model: nn.Module, train_loader: Iterable, test_loader: Iterable | None,
                 config: TrainConfig | None = None, *, run_dir: str | Path | None = None, phase: str = "train",
                 hooks: Sequence[Any] = (), extra_param_groups: list[dict] | None = None) -> None:
        self.config = config = config if config is not None else TrainConfig()
        config.validate()
        self.phase = check_phase(phase)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.hooks = list(hooks)
        self._hook_set = HookSet(self.hooks)
        self.rank, self.world_size, self.local_rank = D.get_rank(), D.get_world_size(), D.get_local_rank()
        self.is_main = self.rank == 0
        self.device = resolve_device(config.device, self.local_rank)
        self.amp = bool(config.amp and self.device.type == "cuda")
        self._channels_last = bool(config.channels_last)

        self.model = model
        self.forward_model: nn.Module = place_model(model, self.device, self._channels_last, self.world_size)
        self.optimizer = build_optimizer(model, config, self._hook_set.no_weight_decay_params(), extra_param_groups)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

        self.train_loader = train_loader
        self.test_loader = test_loader
        self.steps_per_epoch = steps_per_epoch(train_loader)

        self._progress = Progress(False, 0, 0, "")

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.metrics: list[dict] = []
        self.last_eval: dict | None = None
        self.run_state = RunState(logger=MetricsLogger(self.run_dir, enabled=self.is_main))
        self._checkpointer = Checkpointer(self)
        self._interval_t0 = time.perf_counter()
        self._epoch_t0 = time.perf_counter()
        # built by fit() for the run length it finds (config may change until then)
        self.lr_scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self._lr = self._make_schedule()(0.0)

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
        loss = self.run_state.last_loss
        return None if loss is None else float(loss)

    @property
    def checkpoint_path(self) -> Path | None:
        """Where the automatic checkpoints of this phase go (None without run_dir)."""
        return None if self.run_dir is None else self.run_dir / "checkpoints" / f"{self.phase}.pt"

    def log(self, values: dict) -> None:
        """Add a metrics record (phase, step and epoch are filled in); written to disk by rank 0 only."""
        record: dict[str, Any] = {"phase": self.phase, "step": self.step, "epoch": round(self.epoch_float, 6)}
        record.update(to_jsonable(dict(values)))
        self.metrics.append(record)
        self.run_state.logger.write(record)

    def set_progress(self, **fields: Any) -> None:
        """Show `fields` (name -> value; None: left out) after the progress bar at its next refresh, e.g. a hook's
        state; nothing when the bar is off (no TTY, `progress=False`, rank > 0, outside `fit`)."""
        self._progress.set(**fields)

    def progress_line(self, text: str) -> None:
        """Print one line to stderr without breaking the progress bar (nothing when progress is off)."""
        self._progress.line(text)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path) -> Path:
        """Write everything needed to continue bit-exactly (call on every rank; rank 0 writes)."""
        return self._checkpointer.save(path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by save_checkpoint (weights_only loading; bad files raise UserError)."""
        self._checkpointer.load(path)

    # ------------------------------------------------------------------ the loop
    def _make_schedule(self) -> LRSchedule:
        total_epochs = self.total_steps / self.steps_per_epoch
        return parse_lr_schedule(self.config.lr_schedule, lr=self.config.lr, total_epochs=max(total_epochs, 1e-12),
                                 warmup_epochs=self.config.warmup_epochs)

    @property
    def _position(self) -> int:
        return self.epoch * self.steps_per_epoch + self.batch_in_epoch

    def _sync_lr_scheduler(self, rebuild: bool = False) -> None:
        """Build the LambdaLR at the current position (at fit(), or when an epoch ended short of its length)."""
        if rebuild or self.lr_scheduler is None or self.lr_scheduler.last_epoch != self._position:
            self.lr_scheduler = build_lr_scheduler(self.optimizer, self._make_schedule(), self.steps_per_epoch,
                                                   self._position)

    def fit(self, resume_from: str | Path | None = None) -> dict:
        """Train until max_steps/epochs or a hook's should_stop; returns a summary dict."""
        run = self.run_state
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif not run.started and self.step == 0:
            seed_everything(self.config.seed + self.rank)
        run.started = True
        self._sync_lr_scheduler(rebuild=True)
        total = self.total_steps
        run.stop_requested = False
        if resume_from is not None and self.step > 0:
            # the checkpoint may be from the very step a hook asked to stop at (the phase's final checkpoint, an
            # epoch end, a Ctrl-C): ask again, or the resumed run would train steps the original never took
            run.stop_requested = self._hook_set.should_stop(self)
        run.interrupt_requested = False
        self._progress = Progress(self.config.progress and self.is_main, total, min(self.step, total), self._desc())
        self._interval_t0 = self._epoch_t0 = t0 = time.perf_counter()
        previous_handler = self._checkpointer.install_sigint()
        try:
            while self.step < total and not run.stop_requested:
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
            if not run.interrupt_requested or isinstance(exc, UserError):
                raise
            path = self._save_after_interrupt()
            raise TrainingInterrupted(path, self.step) from None
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            self._progress.close()
            run.logger.close()
        return summary

    def _save_after_interrupt(self) -> Path | None:
        run = self.run_state
        if run.stage == "commit":
            self._commit_step()          # optimizer.step() finished; only the bookkeeping was cut short
        elif run.stage == "forward":
            self.optimizer.zero_grad(set_to_none=True)  # this batch is redone after resume
            run.inflight = None
        # "optimizer": interrupted inside optimizer.step(); saving the state as it is is the best we can do
        run.stage = "idle"
        return self._checkpointer.save_after_interrupt()

    def _desc(self) -> str:
        epochs = max(1, math.ceil(self.total_steps / self.steps_per_epoch))
        return f"{self.phase} {min(self.epoch + 1, epochs)}/{epochs}"

    def _run_epoch(self, total: int) -> None:
        cfg, run = self.config, self.run_state
        prepare_epoch_order(self.train_loader, cfg.seed, self.epoch, self.rank)
        self._sync_lr_scheduler()
        if self.batch_in_epoch == 0:
            run.stats.epoch = [0.0, 0.0, 0, 0]
            self._epoch_t0 = time.perf_counter()
        self._progress.set(desc=self._desc())
        self.forward_model.train()
        batches = skipping_iterator(self.train_loader, self.batch_in_epoch)
        for batch in batches:
            self._train_step(batch)
            if run.interrupt_requested:
                self._progress.line(f"{self.phase}: interrupted, saving a checkpoint at step {self.step}")
                raise KeyboardInterrupt
            run.stop_requested = self._hook_set.should_stop(self)
            if self.step % cfg.log_every == 0:
                self._log_interval()
            epoch_done = self.batch_in_epoch >= self.steps_per_epoch
            if epoch_done:
                break
            if self.step >= total or run.stop_requested:
                return
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                t_save = time.perf_counter()
                self._checkpointer.save_auto()
                self._interval_t0 += time.perf_counter() - t_save  # keep img/s about training only
        self._end_epoch()

    def _train_step(self, batch: Any) -> None:
        x, y = place_batch(batch, self.device, self._channels_last)
        # the scheduler already put this step's rate (times each group's lr_scale) into the parameter groups
        sched = self.lr_scheduler
        self._lr = sched.lr_lambdas[0](sched.last_epoch)
        run = self.run_state
        run.stage = "forward"
        hooks = self._hook_set
        hooks.notify("on_step_start", self)
        run.inflight = forward_backward(
            self.forward_model, x, y, optimizer=self.optimizer, scaler=self.scaler, amp=self.amp,
            label_smoothing=self.config.label_smoothing,
            add_extra_losses=lambda outputs, loss: hooks.add_extra_losses(self, self.model, outputs, loss),
            after_backward=lambda: hooks.notify("after_backward", self))
        run.stage = "optimizer"
        optimizer_step(self.optimizer, self.scaler, self.amp)
        run.stage = "commit"
        self._commit_step()
        hooks.notify("on_step_end", self)

    def _commit_step(self) -> None:
        run = self.run_state
        assert run.inflight is not None
        loss_d, correct, n = run.inflight
        self.step += 1
        self.batch_in_epoch += 1
        with warnings.catch_warnings():
            # with AMP, GradScaler skips optimizer.step() on overflow; the rate still follows the step count
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
            self.lr_scheduler.step()
        run.stats.add(loss_d, correct, n)
        run.last_loss = loss_d
        run.inflight = None
        run.stage = "idle"
        self._progress.update()

    def _log_interval(self) -> None:
        self._checkpointer.flush_losses()
        now = time.perf_counter()
        acc = self.run_state.stats
        stats = acc.summarize(acc.interval)
        n = acc.interval[3]
        img_s = n / max(now - self._interval_t0, 1e-9)
        self.log({"kind": "interval", **stats, "lr": self._lr, "img_s": round(img_s, 2)})
        self._progress.set(loss=fmt_value(stats["loss"], ".4f"), acc=fmt_value(stats["train_top1"], ".1f"),
                           lr=fmt_value(self._lr, ".4g"), **{"img/s": fmt_value(img_s, ".0f")})
        acc.interval = [0.0, 0.0, 0, 0]
        self._interval_t0 = now

    def _eval_now(self) -> dict | None:
        if self.test_loader is None:
            return None
        if self.run_state.last_eval_step == self.step and self.last_eval is not None:
            return self.last_eval
        self.last_eval = evaluate(self.model, self.test_loader, self.device, amp=self.amp,
                                  channels_last=self._channels_last)
        self.run_state.last_eval_step = self.step
        return self.last_eval

    def _sync_buffers(self) -> None:
        # DDP broadcasts buffers before each forward, so after the last one the ranks' BN running stats
        # differ by one local update; make them rank 0's so evaluation and the final model agree everywhere
        if self.world_size > 1:
            for b in self.model.buffers():
                torch.distributed.broadcast(b, 0)

    def _end_epoch(self) -> None:
        self._checkpointer.flush_losses()
        self._sync_buffers()
        t_end = time.perf_counter()
        elapsed = t_end - self._epoch_t0
        acc = self.run_state.stats
        train = acc.summarize(acc.epoch)
        acc.last_train = train
        n = acc.epoch[3]
        ev = self._eval_now() if self.config.eval_every_epoch else None
        self.epoch += 1
        self.batch_in_epoch = 0
        self._hook_set.notify("on_epoch_end", self)
        record: dict[str, Any] = {"kind": "epoch", **train, "lr": self._lr, "img_s": round(n / max(elapsed, 1e-9), 2),
                                  "time_s": round(elapsed, 3)}
        if ev is not None:
            record.update({f"test_{k}": v for k, v in ev.items()})
        self.log(record)
        epochs = max(1, math.ceil(self.total_steps / self.steps_per_epoch))
        self._progress.line(epoch_line(f"{self.phase} epoch {self.epoch}/{epochs}", record))
        self._checkpointer.save_auto()
        self._interval_t0 += time.perf_counter() - t_end  # evaluation and saving are not training throughput

    def _finish(self, wall_s: float) -> dict:
        run = self.run_state
        self._checkpointer.flush_losses()
        self._sync_buffers()
        if self.batch_in_epoch > 0:
            run.stats.last_train = run.stats.summarize(run.stats.epoch)
        ev = self._eval_now()
        if run.final_step != self.step:
            record: dict[str, Any] = {"kind": "final", **run.stats.last_train, "stopped_early": run.stop_requested}
            if ev is not None:
                record.update({f"test_{k}": v for k, v in ev.items()})
            run.final_step = self.step
            self.log(record)
        if run.checkpoint_step != self.step:
            self._checkpointer.save_auto()
        saved = self.checkpoint_path if run.checkpoint_step >= 0 else None
        last = run.stats.last_train
        return {"phase": self.phase, "step": self.step, "epoch": self.epoch_float, "lr": self._lr,
                "train_loss": last.get("loss"), "train_top1": last.get("train_top1"),
                "eval": ev, "stopped_early": run.stop_requested, "wall_s": wall_s,
                "checkpoint": str(saved) if saved is not None else None}
