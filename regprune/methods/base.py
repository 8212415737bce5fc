"""What every method works on: the layers to prune and how many filters each loses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

__all__ = ["PruneTarget", "Picks"]

# root module name -> sorted indices of the filters (output channels) to remove
Picks = dict[str, list[int]]


@dataclass
class PruneTarget:
    """One prunable layer: its filters are scored, penalised and removed together with their group.

    `coupled` lists other parameters whose slices along `dim` belong to the same channels (the BN
    after the conv, the next conv's input slices, ...): (name, parameter, dim). Methods may penalise
    them too when asked; by default only the root layer's filters are.
    """

    name: str
    module: nn.Module
    n_remove: int
    coupled: list[tuple[str, nn.Parameter, int]] = field(default_factory=list)

    @property
    def n_filters(self) -> int:
        return int(self.module.weight.shape[0])
