"""L1-norm filter pruning (Li et al. 2017): score filters by mean |W[n]|, remove the lowest at once.

L1 is one-shot: this module only scores and picks. The surgery layer removes the picked filters and
their coupled channels physically; fine-tuning is the engine's job.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Picks, PruneTarget

__all__ = ["CRITERIA", "PICK_MODES", "filter_scores", "group_scores", "target_scores", "select_indices",
           "pick_channels", "pick_filters", "n_units", "unit_scores", "pick_masks", "lowest_mask", "check_targets",
           "L1Pruner"]

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


def target_scores(t: PruneTarget, criterion: str = "filter") -> torch.Tensor:
    """One score per channel of a target, shape [n_filters]: "filter" is the root's mean |W[n]| (Li et al. 2017,
    the papers' L1); "group" is `group_scores` over the target's `coupled` slices (DepGraph's group L1).
    Raises ValueError for an unknown criterion."""
    if criterion == "filter":
        return filter_scores(t.module)
    if criterion == "group":
        return group_scores(t.module, t.coupled)
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


def pick_channels(scores: torch.Tensor, n: int, how: str = "min", generator: torch.Generator | None = None,
                  blocks: int = 1) -> list[int]:
    """The one channel picker every method uses: sorted indices of `n` channels to remove.

    `scores`: shape [C], one per channel (lower = less important). `how`: "min" removes the lowest (the papers'
    default), "max" the highest, "rand" uniformly random ones (ablations). `blocks` > 1 means the channels pass
    through a grouped convolution with that many channel blocks of C / blocks channels each: the same positions
    are removed from every block (scores summed per position), so `n` must be a multiple of `blocks`.
    Ties resolve by index. Raises ValueError for n outside [0, C), a bad `how`, or n not divisible by blocks."""
    scores = scores.detach().flatten()
    c = scores.numel()
    if not 0 <= n < c:
        raise ValueError(f"cannot remove {n} of {c} channels (at least one must stay)")
    if blocks <= 1:
        return select_indices(scores, n, how, generator).tolist()
    if c % blocks or n % blocks:
        raise ValueError(f"{n} of {c} channels cannot be removed evenly from {blocks} grouped-conv channel blocks")
    size = c // blocks
    per_pos = scores.view(blocks, size).sum(0)
    rel = select_indices(per_pos, n // blocks, how, generator).tolist()
    return sorted(b * size + r for b in range(blocks) for r in rel)


def pick_filters(targets: list[PruneTarget], how: str = "min", seed: int = 0, criterion: str = "filter") -> Picks:
    """For every target, the sorted indices of its `n_remove` channels to remove (see `pick_channels`), scored by
    `target_scores(t, criterion)` and respecting the target's grouped-conv channel blocks."""
    # One generator across targets so that "rand" picks are reproducible from a single seed.
    gen = torch.Generator().manual_seed(seed)
    return {t.name: pick_channels(target_scores(t, criterion), t.n_remove, how, gen, t.ch_groups) for t in targets}


def n_units(t: PruneTarget, unstructured: bool = False) -> int:
    """How many prunable units a target has: its filters (output channels), or with `unstructured` its weights."""
    w = t.module.weight
    return w.numel() if unstructured else int(w.shape[0])


def unit_scores(t: PruneTarget, criterion: str = "filter", unstructured: bool = False) -> torch.Tensor:
    """One score per prunable unit (lower = less important): `target_scores(t, criterion)`, shape [n_filters], or
    with `unstructured` every weight's |W| flattened, shape [weight.numel()] (float32)."""
    if unstructured:
        return t.module.weight.detach().abs().float().flatten()
    return target_scores(t, criterion)


def _unit_mask(t: PruneTarget, idx: torch.Tensor, unstructured: bool) -> torch.Tensor:
    mask = torch.zeros(n_units(t, unstructured), dtype=torch.bool, device=t.module.weight.device)
    mask[idx.to(mask.device)] = True
    return mask


def pick_masks(targets: list[PruneTarget], how: str = "min", seed: int = 0, criterion: str = "filter",
               unstructured: bool = False) -> dict[str, torch.Tensor]:
    """`pick_filters` as boolean masks over each target's units (True = removed, shape [n_units(t)], on the weight's
    device). With `unstructured` the `n_remove` weights are chosen by |W| (one generator seeded by `seed`)."""
    if not unstructured:
        picks = pick_filters(targets, how, seed, criterion)
        return {t.name: _unit_mask(t, torch.tensor(picks[t.name], dtype=torch.long), False) for t in targets}
    gen = torch.Generator().manual_seed(seed)
    return {t.name: _unit_mask(t, select_indices(unit_scores(t, criterion, True), t.n_remove, how, gen), True)
            for t in targets}


def lowest_mask(t: PruneTarget, criterion: str = "filter", unstructured: bool = False) -> torch.Tensor:
    """Boolean mask (True = removed, shape [n_units(t)]) of the target's `n_remove` lowest-scored units now,
    keeping grouped-conv channel blocks (`pick_channels`)."""
    scores = unit_scores(t, criterion, unstructured)
    if unstructured:
        return _unit_mask(t, select_indices(scores, t.n_remove, "min"), True)
    picked = pick_channels(scores, t.n_remove, "min", blocks=t.ch_groups)
    return _unit_mask(t, torch.tensor(picked, dtype=torch.long), False)


def check_targets(targets: list[PruneTarget], unstructured: bool = False, coupled: bool = False) -> None:
    """Raise ValueError unless every target can be scored (TypeError for a layer that is not a Conv/Linear),
    removes fewer units than it has, and, with `coupled`, every coupled slice has the root's channel count."""
    for t in targets:
        filter_scores(t.module)  # raises on layers whose filters are not on dim 0
        n = n_units(t, unstructured)
        if not 0 <= t.n_remove < n:
            what = "weights" if unstructured else "filters"
            raise ValueError(f"{t.name}: n_remove={t.n_remove} must be in [0, {n - 1}] ({n} {what})")
        if coupled:
            for pname, p, dim in t.coupled:
                if p.shape[dim] != t.n_filters:
                    raise ValueError(
                        f"{t.name}: coupled {pname} has {p.shape[dim]} channels on dim {dim}, expected {t.n_filters}"
                    )


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

    def on_step_end(self, trainer: object = None) -> None:
        """Nothing to do: the picks were fixed at construction."""

    def state_dict(self) -> dict:
        """The picks, so that a resumed run removes the same filters."""
        return {"method": "l1", "pick": self.pick, "seed": self.seed, "picks": self.picks()}

    def load_state_dict(self, d: dict) -> None:
        """Restore the picks saved by state_dict()."""
        self._picks = {k: [int(i) for i in v] for k, v in d["picks"].items()}
