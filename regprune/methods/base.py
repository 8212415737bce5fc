"""What every method works on (the layers to prune and how many filters each loses) and what it offers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch.nn as nn

__all__ = ["PruneTarget", "Picks", "PruningMethod"]

# root module name -> sorted indices of the filters (output channels) to remove
Picks = dict[str, list[int]]


@dataclass
class PruneTarget:
    """One prunable layer: its filters are scored, penalised and removed together with their group.

    `coupled` lists other parameters whose slices along `dim` belong to the same channels (the BN
    after the conv, the next conv's input slices, ...): (name, parameter, dim). Methods may penalise
    them too (Group-GReg) or score over them (criterion "group") when asked; by default only the root
    layer's filters are. `ch_groups` > 1 means the channels pass through a grouped convolution with that many
    channel blocks: picks remove the same positions from every block.
    """

    name: str
    module: nn.Module
    n_remove: int
    coupled: list[tuple[str, nn.Parameter, int]] = field(default_factory=list)
    ch_groups: int = 1

    @property
    def n_filters(self) -> int:
        return int(self.module.weight.shape[0])


@runtime_checkable
class PruningMethod(Protocol):
    """The protocol every method object follows (GReg, L1Pruner, SPMRegularizer, the `regprune.regularizer` objects).

    A method is a training-loop hook object: the engine (`regprune.engine.Trainer`) or a plain loop calls whichever
    of these hooks it defines, all taking an optional trainer (None outside the engine):

    - `extra_loss(trainer, model, outputs)`: a tensor to add to the loss, or None (SPM's MACs and nuclear terms);
    - `after_backward(trainer)`: edit the gradients between backward and the optimizer step (GReg's lambda * W);
    - `on_step_end(trainer)`: after the optimizer step; counts steps and advances the method's schedule;
    - `should_stop(trainer)`: True ends a regularization phase early (GReg and L1 once `done()`).

    Every method also offers what this protocol requires (checked by `isinstance(obj, PruningMethod)`):
    `on_step_end`, `done()` (True once it is time to cut), `picks()` (the cut: group or layer root -> sorted
    channel indices to remove, a `Picks`), and `state_dict()` / `load_state_dict(state)` for checkpoints.
    """

    def on_step_end(self, trainer: Any = None) -> None:
        """Called after every optimizer step."""

    def done(self) -> bool:
        """True once the method is ready for the cut (`picks()` is final)."""

    def picks(self) -> Picks:
        """Root name -> sorted indices of the channels to remove."""

    def state_dict(self) -> dict:
        """Everything needed to resume (tensors on CPU)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict()` returned."""
