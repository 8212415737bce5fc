"""Checkpoint helpers: RNG seeding, capture and restore; the crash-safe writes and safe loads live in regprune.io."""

from __future__ import annotations

import random
from typing import Any

import torch

from ..io import atomic_save, atomic_write, atomic_write_bytes, atomic_write_text, check_checkpoint_safe, safe_load

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_save", "safe_load",
           "check_checkpoint_safe", "capture_rng_state", "restore_rng_state", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)


def capture_rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as tensors and lists only."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    version, internal, gauss = random.getstate()
    state["python"] = {"version": int(version), "state": list(internal), "gauss": gauss}
    try:
        import numpy as np
    except ImportError:
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"name": str(name), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state; parts missing from `state` are left as they are."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in saved])
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"]), py["gauss"]))
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            return
        npst = state["numpy"]
        np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                             npst["has_gauss"], npst["cached_gaussian"]))
