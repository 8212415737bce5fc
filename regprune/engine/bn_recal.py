"""BatchNorm recalibration: re-estimate running statistics after channels were removed or zeroed.

Removing channels changes what each BatchNorm layer sees downstream, so the running mean and variance learned on the
dense network no longer match; evaluating right after removal then measures the stale statistics more than the cut.
Recalibration runs training batches forward in train mode without any gradient step, with each BN layer's momentum
set to None (PyTorch's cumulative moving average: the plain mean over the batches seen), and changes nothing but the
BN buffers `running_mean`, `running_var` and `num_batches_tracked`.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

__all__ = ["recalibrate_bn"]


def _inputs(batch: Any) -> Any:
    """The model input of a loader batch: the first element of (inputs, targets) pairs, else the batch itself."""
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    return batch


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int, device: str | torch.device | None = None) -> int:
    """Re-estimate every BatchNorm layer's running statistics on up to `batches` batches of `loader`.

    `loader` yields input tensors (N, C, ...) or (inputs, targets) pairs; `batches` is a whole number >= 0 (an int,
    not a bool or float). The model runs in train mode with gradients off; afterwards each module's own train/eval
    flag and each BN layer's momentum are restored. Parameters, other buffers and dropout-free outputs are
    untouched. Returns the number of batches used: 0 (and nothing changed) when the model has no BatchNorm layer
    with running statistics or `batches` is 0. Raises ValueError for a `batches` that is not an int >= 0 and for a
    loader that yields nothing while `batches` > 0; TypeError for a dict batch (keyword inputs: call the model
    yourself). On any error the BN statistics are left as they were.
    """
    if isinstance(batches, bool) or not isinstance(batches, numbers.Integral):
        raise ValueError(f"batches must be a whole number of batches (an int >= 0), got {batches!r}")
    batches = int(batches)
    if batches < 0:
        raise ValueError(f"batches must be >= 0, got {batches}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
           and m.running_mean is not None]
    if not bns or batches == 0:
        return 0
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    saved = {bn: (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in bns}
    used = 0
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the recalibration batches
        model.train()
        for batch in loader:
            if used >= batches:
                break
            x = _inputs(batch)
            if isinstance(batch, dict) or isinstance(x, dict):
                raise TypeError("recalibrate_bn got a dict batch: pass batches of input tensors or (inputs, targets) "
                                "pairs; for keyword inputs call the model yourself")
            x = x.to(device) if isinstance(x, torch.Tensor) else x
            model(x)
            used += 1
        if used == 0:
            raise ValueError("the loader yielded no batch to recalibrate BatchNorm statistics on")
    except BaseException:
        for bn, (mean, var, n) in saved.items():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(n)
        raise
    finally:
        for bn, mom in momenta.items():
            bn.momentum = mom
        for m, flag in modes.items():
            m.training = flag
    return used
