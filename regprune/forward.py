"""Forward passes on example inputs that leave the model and the inputs as they were.

The tracer, the probe and the verification all run a model on the user's example inputs; these helpers make
such a run repeatable and free of side effects: the inputs are checked and copied, every module's train/eval
flag and every buffer (BatchNorm running statistics) is put back, dropout and stochastic depth pass their input
through, and the random state is forked and seeded.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

from .counting import call_model
from .errors import UserError

__all__ = ["check_example_inputs", "batch_size", "train_batch", "cloned_inputs", "float64_copy", "modes_kept",
           "buffers_kept", "run_in_mode"]


def check_example_inputs(example_inputs: Any) -> Any:
    """`example_inputs` as given, once checked to be a form a forward accepts: a tensor, a tuple/list of
    positional inputs, or a dict of keyword inputs (tensors or plain values), holding at least one tensor.

    Raises UserError for any other form."""
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs
    if isinstance(example_inputs, (tuple, list, dict)) and example_inputs:
        leaves, _ = tree_flatten(example_inputs)
        if any(isinstance(t, torch.Tensor) for t in leaves):
            return example_inputs
    raise UserError("example_inputs must be a tensor, a tuple/list of positional inputs or a dict of keyword "
                    f"inputs holding at least one tensor (got {type(example_inputs).__name__})")


def batch_size(example_inputs: Any) -> int | None:
    """Dim 0 of the first tensor of at least one dimension in `example_inputs` (nested inputs are searched in
    order); None when there is none."""
    for t in tree_flatten(example_inputs)[0]:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return None


def train_batch(example_inputs: Any) -> Any:
    """Example inputs with a batch of at least 2 (train-mode BatchNorm needs it): when the batch is 1, every
    tensor of batch 1 gets a second sample, a seeded perturbation of the first for floating-point tensors (shape
    (1, ...) -> (2, ...)) and a repeat for integer tensors (token ids). Any other batch is returned as given."""
    if batch_size(example_inputs) != 1:
        return example_inputs
    gen = torch.Generator().manual_seed(0)

    def grow(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != 1:
            return t
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
            return torch.cat([t, t * 0.5 + noise * (t.detach().abs().mean() + 1.0)])
        return torch.cat([t, t])
    return tree_map(grow, example_inputs)


def cloned_inputs(inputs: Any) -> Any:
    """Copies of the input tensors (same structure, plain values as given), so a forward with in-place ops
    cannot change the caller's examples."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)


def float64_copy(x: Any) -> Any:
    """`x` (a tensor or nested inputs) with every floating-point tensor converted to float64; other leaves as given."""
    return tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, x)


_MODULE_INTERNALS = frozenset(nn.Module().__dict__)  # parameters, buffers, submodules, hooks, training


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Put every module's own train/eval flag back afterwards (a frozen-BN backbone stays in eval mode), and its
    plain attributes: a forward pass regprune runs (tracing, probing, verifying) leaves no trace in the model. Caches
    a forward fills (timm's eval-mode attention biases, a width-keyed scale built in float64 during verification,
    a tensor still holding its autograd graph) would otherwise stay: the model could not be deep-copied, or would
    fail on its next float32 forward. Dicts, lists and sets get their items back in place."""
    flags = [(m, m.training) for m in model.modules()]
    saved = []
    for m in model.modules():
        d = m.__dict__
        saved.append((d, {k: (v, v.copy() if isinstance(v, (dict, list, set)) else None)
                          for k, v in d.items() if k not in _MODULE_INTERNALS}))
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f
        for d, snap in saved:
            for k in [k for k in d if k not in _MODULE_INTERNALS and k not in snap]:
                del d[k]
            for k, (v, items) in snap.items():
                d[k] = v
                if isinstance(v, list):
                    v[:] = items
                elif isinstance(v, (dict, set)):
                    v.clear()
                    v.update(items)


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Put every buffer's values back afterwards (train-mode forwards update BatchNorm running statistics).

    Values are copied in place into the buffer present at exit under the same name, when its shape is unchanged."""
    saved = [(m, k, b.detach().clone()) for m in model.modules() for k, b in m._buffers.items() if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, k, b in saved:
                cur = m._buffers.get(k)
                if cur is not None and cur.shape == b.shape:
                    cur.copy_(b)


@contextlib.contextmanager
def _dropout_off() -> Iterator[None]:
    """Dropout (module or functional) passes its input through: train mode stays comparable across widths."""
    names = ["dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"]
    saved = {n: getattr(F, n) for n in names if hasattr(F, n)}
    try:
        for n in saved:
            setattr(F, n, lambda input, *a, **k: input)
        yield
    finally:
        for n, fn in saved.items():
            setattr(F, n, fn)


def _stochastic_modules(model: nn.Module) -> list[nn.Module]:
    # drop-path / stochastic depth modules draw per-sample masks of their own
    return [m for m in model.modules() if any(s in type(m).__name__ for s in ("DropPath", "StochasticDepth", "DropBlock"))]


def run_in_mode(model: nn.Module, inputs: Any, train: bool, grad: bool = False) -> Any:
    """`model`'s output on a copy of `inputs` in train (`train=True`) or eval mode, without gradients (with them
    when `grad=True`: the autograd graph of the pass is kept), with dropout and stochastic-depth modules passing
    their input through and the random state forked and seeded with 0.

    Every module's own mode flag is restored afterwards; buffers are not (wrap in `buffers_kept` for that).
    Whatever the model raises propagates."""
    with modes_kept(model):
        model.train(train)
        for m in _stochastic_modules(model):
            m.eval()
        with torch.set_grad_enabled(grad), _dropout_off(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return call_model(model, cloned_inputs(inputs))
