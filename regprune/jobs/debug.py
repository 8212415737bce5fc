"""A debugging aid for distributed runs: each rank's view of the prune job's phase boundaries, written to files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import engine as E
from ..api import Regularizer

__all__ = ["rank_dump"]


def rank_dump(where: str | Path | None, phase: str, model: nn.Module, *, picks: dict | None = None,
              reg: Regularizer | None = None, plan: Any = None) -> None:
    """With `where` (JobOptions.debug_rank_dump, `--debug-rank-dump DIR`), write this rank's view of a phase
    boundary to DIR/rank{r}_{phase}.json; nothing when `where` is None or empty.

    For checking that distributed ranks agree (picks, GReg penalties and masks, weights); the one place where
    every rank writes, and only into DIR, never into the run directory.
    """
    if not where:
        return

    def digest(tensors: dict[str, torch.Tensor]) -> str:
        h = hashlib.sha256()
        for k in sorted(tensors):
            t = tensors[k].detach().cpu().contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    rec: dict[str, Any] = {"phase": phase, "rank": E.get_rank(), "world_size": E.get_world_size(),
                           "weights": digest(model.state_dict()), "picks": picks}
    if plan is not None:
        rec["plan"] = {"removal": plan.removal, "ratios": plan.ratios}
    if reg is not None:
        st = reg.greg.state_dict()
        rec["greg"] = {"phase": st["phase"], "iteration": st["iteration"], "lambdas": digest(st["lambdas"]),
                       "gates": digest(st["pruned"]) if st["pruned"] is not None else None,
                       "picks": reg.picks() if st["pruned"] is not None and not reg.unstructured else None}
    Path(where).mkdir(parents=True, exist_ok=True)
    E.atomic_write_text(Path(where) / f"rank{E.get_rank()}_{phase}.json", json.dumps(E.log.to_jsonable(rec), indent=1))

