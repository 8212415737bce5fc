"""What the trace does not say, read from forward passes: the MACs record of an eval pass, the layers whose
output reaches a network output (by graph position, walking back through autograd), and the layers that run only
in train mode (auxiliary heads) with the layers whose channels they read."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn

from .counting import MacsRecord, call_model, is_counted, is_depthwise, output_tensors, recording
from .forward import buffers_kept, cloned_inputs, modes_kept, run_in_mode, train_batch

__all__ = ["probe"]


def _walk_back(fns, produced: dict) -> set[str]:
    """Names of the counted layers whose outputs the autograd nodes `fns` are computed from without another counted
    layer in between: a walk back through the autograd graph that stops at the nodes in `produced` (a counted
    layer's output node -> its name)."""
    found: set[str] = set()
    seen = set()
    stack = [fn for fn in fns if fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in produced:
            found.add(produced[fn])
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


def _marking(model: nn.Module, produced: dict) -> list:
    """Forward hooks on every counted layer (depthwise convs aside: their channels are their inputs') that note its
    output's autograd node in `produced` (node -> layer name)."""
    def mark(name):
        def hook(mod, inp, out):
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                produced[out.grad_fn] = name
        return hook

    return [m.register_forward_hook(mark(name)) for name, m in model.named_modules()
            if is_counted(m) and not is_depthwise(m)]


def probe(model: nn.Module, example_inputs) -> tuple[MacsRecord, set[str], set[str], dict[str, set[str]]]:
    """Forward passes that read what the trace does not say: the MACs record of an eval-mode pass (per-sample MACs
    by layer, the modules that ran: `counting.recording`), the layers whose output reaches a network output
    through parameter-free or per-channel functions only (found by graph position: a walk back from every output
    through the autograd graph that stops at counted layers), the modules that run only in train mode (auxiliary
    heads), and which layers those read: for every counted layer that runs only in train mode, a walk back from its
    inputs in a train-mode pass to the counted layers that produced them (producer name -> train-only readers)."""
    produced: dict[Any, str] = {}
    hooks = _marking(model, produced)
    try:
        with modes_kept(model), recording(model, example_inputs) as record, _grads_on(model):
            model.eval()
            out = call_model(model, cloned_inputs(example_inputs))
    finally:
        for h in hooks:
            h.remove()
    outputs = _walk_back([t.grad_fn for t in output_tensors(out)], produced)
    del out, produced
    called_train, readers = _train_pass(model, example_inputs, record.ran)
    return record, outputs, called_train - record.ran, readers


@contextlib.contextmanager
def _grads_on(model: nn.Module) -> Iterator[None]:
    """Inside: gradients are recorded and every parameter requires them (so each layer's output has an autograd
    node, frozen layers too); the parameters' own flags come back afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _train_pass(model: nn.Module, example_inputs, ran_in_eval: set[str]) -> tuple[set[str], dict[str, set[str]]]:
    """One train-mode pass: (names of the modules that ran, producer layer -> the train-only counted layers reading
    its output). It records gradients (so the counted layers that run only in train mode can be walked back from)
    only when some counted layer did not run in eval mode, and passes again without them when the model fails so.
    Nothing of either when the model cannot run in train mode."""
    called: set[str] = set()
    produced: dict[Any, str] = {}
    read: dict[str, list] = {}

    def reader(name):
        def pre(mod, args, kwargs):
            read.setdefault(name, []).extend(t.grad_fn for t in output_tensors((args, kwargs)))
        return pre

    unseen = [(name, m) for name, m in model.named_modules() if is_counted(m) and name not in ran_in_eval]
    for grad in ((True, False) if unseen else (False,)):
        hooks = [m.register_forward_hook(lambda mod, i, o, _n=name: called.add(_n))
                 for name, m in model.named_modules()]
        if grad:
            hooks += _marking(model, produced)
            hooks += [m.register_forward_pre_hook(reader(name), with_kwargs=True) for name, m in unseen]
        try:
            with buffers_kept(model), (_grads_on(model) if grad else contextlib.nullcontext()):
                run_in_mode(model, train_batch(example_inputs), train=True, grad=grad)
            break
        except Exception:  # a model that cannot run in train mode: nothing runs only there
            called.clear()
            produced.clear()
            read.clear()
        finally:
            for h in hooks:
                h.remove()
    readers: dict[str, set[str]] = {}
    for name, fns in read.items():
        for layer in _walk_back(fns, produced):
            readers.setdefault(layer, set()).add(name)
    return called, readers
