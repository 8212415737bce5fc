"""What makes a Trainer run resumable: checkpoints, Ctrl-C handling and divergence checks.

`Checkpointer` does this for one `Trainer`, which builds it for itself; it reads the trainer's public attributes
and its `RunState` (`trainer.run_state`).
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import threading
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..errors import UserError
from . import dist as D
from .checkpoint import atomic_save, capture_rng_state, check_checkpoint_safe, restore_rng_state, safe_load
from .config import CHECKPOINT_FORMAT, TRAJECTORY_FIELDS, TrainingDiverged

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["Checkpointer"]


class Checkpointer:
    """Checkpoint writing and loading, the Ctrl-C handler and divergence checks of `trainer`."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    # ------------------------------------------------------------------ Ctrl-C
    def install_sigint(self) -> Callable[..., Any] | None:
        """Make the first Ctrl-C only set `run_state.interrupt_requested`, so the current step finishes and the
        checkpoint is consistent; a second one raises KeyboardInterrupt at once.

        Returns the handler to put back when the run ends, or None when nothing was installed: outside the main
        thread, or when somebody else manages Ctrl-C (the loop then relies on catching KeyboardInterrupt)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return None
        run = self.trainer.run_state

        def on_sigint(signum, frame):
            if run.interrupt_requested:
                raise KeyboardInterrupt
            run.interrupt_requested = True

        signal.signal(signal.SIGINT, on_sigint)
        return signal.default_int_handler

    def save_after_interrupt(self) -> Path | None:
        """Write the automatic checkpoint after an interrupt, without collectives (the other ranks may be
        anywhere; rank 0 writes what it has). The loop must have settled the interrupted step first. Returns the
        checkpoint's path, None without run_dir."""
        path = self.trainer.checkpoint_path
        if path is None:
            return None
        self.save(path, collective=False)
        return path

    # ------------------------------------------------------------------ divergence
    def flush_losses(self, collective: bool = True) -> None:
        """Sync the pending per-step losses into the running sums; raise `TrainingDiverged` at a non-finite one.

        With `collective` (and several ranks) the losses are all-reduced: call on every rank."""
        t = self.trainer
        bad = t.run_state.stats.flush(t.step, t.world_size if collective else 1)
        if bad is not None:
            raise self.diverged(bad[0], f"the loss is {bad[1]}")

    def diverged(self, step: int, what: str) -> TrainingDiverged:
        """The `TrainingDiverged` to raise for `what` going wrong at `step`, naming the checkpoint kept; drops the
        pending losses and records a "diverged" metrics record."""
        t = self.trainer
        path = t.checkpoint_path
        if path is not None and path.is_file():
            at = f" (step {t.run_state.checkpoint_step})" if t.run_state.checkpoint_step >= 0 else ""
            kept = f"the last good checkpoint {path}{at} is kept"
        elif path is not None:
            kept = "no checkpoint had been written yet"
        else:
            kept = "no run_dir was given, so there is no checkpoint to fall back to"
        t.run_state.stats.pending.clear()
        if t.is_main:
            with contextlib.suppress(Exception):
                t.log({"kind": "diverged", "diverged_step": step})
        return TrainingDiverged(f"training diverged at step {step} (phase {t.phase}): {what}; {kept}. "
                                "Try a lower learning rate or regularization strength.", step, path)

    def _weights_finite(self) -> bool:
        model = self.trainer.model
        tensors = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]
        if not tensors:
            return True
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    # ------------------------------------------------------------------ checkpoints
    def save_auto(self) -> None:
        """Write the automatic checkpoint (`trainer.checkpoint_path`); without run_dir only check divergence, as
        a checkpoint would."""
        path = self.trainer.checkpoint_path
        if path is None:
            self.flush_losses()
            return
        self.save(path)

    def save(self, path: str | Path, *, collective: bool = True) -> Path:
        """Write everything needed to continue bit-exactly to `path` (rank 0 writes).

        With `collective` call on every rank (the RNG states of all ranks are gathered); without, only this rank's
        RNG state is saved. Raises `TrainingDiverged` (and writes nothing) when a loss or a weight is not finite."""
        t = self.trainer
        run = t.run_state
        path = Path(path)
        self.flush_losses(collective=collective)
        if not self._weights_finite():
            raise self.diverged(t.step, "the weights contain NaN or infinite values")
        rng = capture_rng_state()
        rngs = D.all_gather_object(rng) if (collective and t.world_size > 1) else [rng]
        if t.is_main:
            hook_states = [{"index": i, "type": type(h).__qualname__, "state": h.state_dict()}
                           for i, h in enumerate(t.hooks) if callable(getattr(h, "state_dict", None))]
            state = {
                "format": CHECKPOINT_FORMAT,
                "phase": t.phase,
                "step": t.step,
                "epoch": t.epoch,
                "batch_in_epoch": t.batch_in_epoch,
                "world_size": t.world_size,
                "model": t.model.state_dict(),
                "optimizer": t.optimizer.state_dict(),
                "scaler": t.scaler.state_dict(),
                "hooks": hook_states,
                "rng": rngs,
                "config": asdict(t.config),
                "metrics": list(t.metrics),
                "accum": run.stats.state_dict(),
                "last_eval": dict(t.last_eval) if t.last_eval is not None else None,
                "last_eval_step": run.last_eval_step,
                "final_step": run.final_step,
            }
            check_checkpoint_safe(state, "checkpoint")
            atomic_save(state, path)
        if path == t.checkpoint_path:
            run.checkpoint_step = t.step
        return path

    def load(self, path: str | Path) -> None:
        """Restore a checkpoint written by `save` into the trainer (weights_only loading; bad files raise
        UserError). Warnings about a changed config or world size name the caller of `Trainer.load_checkpoint`."""
        t = self.trainer
        run = t.run_state
        path = Path(path)
        state = safe_load(path)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path} is not a regprune training checkpoint")
        if state["phase"] != t.phase:
            raise UserError(f"checkpoint {path} belongs to phase {state['phase']!r}, not {t.phase!r}")
        try:
            t.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise UserError(f"checkpoint {path} does not match the model: {str(e).strip().splitlines()[0]}") from None
        try:
            t.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"checkpoint {path} does not match the optimizer's parameter groups: {e}") from None
        if state.get("scaler") and t.scaler.is_enabled():
            t.scaler.load_state_dict(state["scaler"])
        saved_hooks = {h["index"]: h for h in state.get("hooks", [])}
        for i, h in enumerate(t.hooks):
            if not callable(getattr(h, "load_state_dict", None)):
                continue
            entry = saved_hooks.get(i)
            if entry is None or entry["type"] != type(h).__qualname__:
                raise UserError(f"checkpoint {path} has no state for hook #{i} ({type(h).__qualname__}); "
                                "resume with the same hooks it was saved with")
            h.load_state_dict(entry["state"])
        t.step = int(state["step"])
        t.epoch = int(state["epoch"])
        t.batch_in_epoch = int(state["batch_in_epoch"])
        t.metrics = list(state.get("metrics", []))
        run.stats.load_state_dict(state.get("accum", {}))
        t.last_eval = state.get("last_eval")
        run.last_eval_step = int(state.get("last_eval_step", -1))
        run.final_step = int(state.get("final_step", -1))
        run.last_loss = None
        rngs = state.get("rng", [])
        if rngs:
            restore_rng_state(rngs[t.rank] if len(rngs) == t.world_size else rngs[0])
        saved_cfg = state.get("config", {})
        changed = [k for k in TRAJECTORY_FIELDS if k in saved_cfg and saved_cfg[k] != getattr(t.config, k)]
        if changed:
            warnings.warn(f"resuming {path} with a different {', '.join(changed)} than it was saved with; "
                          "the run will not match an uninterrupted one", stacklevel=3)
        if int(state.get("world_size", 1)) != t.world_size:
            warnings.warn(f"checkpoint {path} was written by {state.get('world_size')} ranks, resuming on "
                          f"{t.world_size}; the data order after the resume point differs", stacklevel=3)
        run.started = True
        if path == t.checkpoint_path:
            run.checkpoint_step = t.step
        run.logger.drop_after(t.phase, t.step)
