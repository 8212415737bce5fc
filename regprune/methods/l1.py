"""L1-norm filter pruning (Li et al. 2017): score filters by mean |W[n]|, remove the lowest at once.

L1 is one-shot: this module only scores and picks. The surgery layer removes the picked filters and
their coupled channels physically; fine-tuning is the engine's job.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Picks, PruneTarget

__all__ = ["CRITERIA", "PICK_MODES", "filter_scores", "group_scores", "select_indices", "pick_filters", "L1Pruner"]

PICK_MODES = ("min", "max", "rand")
CRITERIA = ("filter", "group")


def _check_root(module: nn.Module) -> torch.Tensor:
    # Transposed convs keep output channels on dim 1 of (in, out/groups, k...): view them filter-first.
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        if module.groups != 1:
            raise TypeError("filter scores of a grouped transposed conv are not supported")
        return module.weight.transpose(0, 1)
    if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        raise TypeError(f"filter scores need a Conv or Linear layer, got {type(module).__name__}")
    return module.weight


def filter_scores(module: nn.Module) -> torch.Tensor:
    """Mean |W[n]| of every filter (output channel) of a Conv or Linear layer, shape [n_filters]."""
    w = _check_root(module).detach()
    return w.abs().float().flatten(1).mean(dim=1)


def group_scores(module: nn.Module, coupled: list[tuple[str, torch.Tensor, int]]) -> torch.Tensor:
    """Channel magnitude over the whole coupled group: the mean, over the root filters and every coupled
    slice, of sum |W| per channel (BN: |gamma|; biases left out). This is the group L1 importance of
    DepGraph / Torch-Pruning's GroupMagnitudeImportance(p=1); a slice whose channel count differs from the
    root's (a concat or grouped conv in between) is left out rather than guessed."""
    root = _check_root(module).detach().float()
    n = root.shape[0]
    parts = [root.abs().flatten(1).sum(dim=1)]
    for name, param, dim in coupled:
        if name.endswith(".bias"):
            continue
        w = param.detach().float()
        if w.dim() == 0 or w.shape[dim] != n:
            continue
        parts.append(w.abs().transpose(0, dim).reshape(n, -1).sum(dim=1))
    return torch.stack(parts).mean(dim=0)


def select_indices(
    scores: torch.Tensor, n: int, how: str = "min", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sorted indices of the `n` lowest ("min"), highest ("max") or random ("rand") entries of a 1-D score."""
    if how not in PICK_MODES:
        raise ValueError(f"pick must be one of {PICK_MODES}, got {how!r}")
    scores = scores.detach().flatten()
    if not 0 <= n <= scores.numel():
        raise ValueError(f"cannot pick {n} of {scores.numel()} entries")
    if how == "rand":
        order = torch.randperm(scores.numel(), generator=generator).to(scores.device)
    else:
        # Stable sort: equal scores resolve by index, so picks never depend on the sorting backend.
        order = torch.sort(scores, descending=(how == "max"), stable=True).indices
    return torch.sort(order[:n]).values


def pick_filters(targets: list[PruneTarget], how: str = "min", seed: int = 0) -> Picks:
    """For every target, the sorted indices of its `n_remove` filters to remove, chosen by mean |W[n]|."""
    # One generator across targets so that "rand" picks are reproducible from a single seed.
    gen = torch.Generator().manual_seed(seed)
    picks: Picks = {}
    for t in targets:
        scores = filter_scores(t.module)
        if t.n_remove >= scores.numel():
            raise ValueError(f"{t.name}: n_remove={t.n_remove} would empty a layer of {scores.numel()} filters")
        picks[t.name] = select_indices(scores, t.n_remove, how, gen).tolist()
    return picks


class L1Pruner:
    """One-shot L1 pruning as a method object: picks from the weights at construction, nothing to train."""

    def __init__(self, targets: list[PruneTarget], pick: str = "min", seed: int = 0) -> None:
        self.targets = list(targets)
        self.pick = pick
        self.seed = seed
        self._picks = pick_filters(self.targets, pick, seed)

    def picks(self) -> Picks:
        """The filters to remove, per target name."""
        return {k: list(v) for k, v in self._picks.items()}

    def done(self) -> bool:
        """Always True: L1 has no regularization phase."""
        return True

    def should_stop(self, trainer: object = None) -> bool:
        """Same as done(): the engine skips straight to surgery."""
        return True

    def state_dict(self) -> dict:
        """The picks, so that a resumed run removes the same filters."""
        return {"method": "l1", "pick": self.pick, "seed": self.seed, "picks": self.picks()}

    def load_state_dict(self, d: dict) -> None:
        """Restore the picks saved by state_dict()."""
        self._picks = {k: [int(i) for i in v] for k, v in d["picks"].items()}
