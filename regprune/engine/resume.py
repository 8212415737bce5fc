"""What makes a Trainer run resumable: checkpoints, Ctrl-C handling and divergence checks.

`ResumableMixin` is mixed into `Trainer` and works on its attributes; it is not meant to be used alone.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import threading
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import UserError
from . import dist as D
from .checkpoint import atomic_save, capture_rng_state, check_checkpoint_safe, restore_rng_state, safe_load
from .config import CHECKPOINT_FORMAT, TRAJECTORY_FIELDS, TrainingDiverged

__all__ = ["ResumableMixin"]


class ResumableMixin:
    """Checkpoint writing and loading, the Ctrl-C handler and divergence reporting of `Trainer`."""

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
        self._stats.pending.clear()
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
                "accum": self._stats.state_dict(),
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
        self._stats.load_state_dict(state.get("accum", {}))
        self.last_eval = state.get("last_eval")
        self._last_eval_step = int(state.get("last_eval_step", -1))
        self._final_step = int(state.get("final_step", -1))
        self._last_loss_t = None
        rngs = state.get("rng", [])
        if rngs:
            restore_rng_state(rngs[self.rank] if len(rngs) == self.world_size else rngs[0])
        saved_cfg = state.get("config", {})
        changed = [k for k in TRAJECTORY_FIELDS if k in saved_cfg and saved_cfg[k] != getattr(self.config, k)]
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
