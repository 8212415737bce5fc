"""Verification of every channel removal, and the per-group safety trial that decides the pruning scope.

The rule: a physically pruned network must compute exactly what the dense network computes once the removed
channels are ignored by every layer that reads them. The reference (`regprune.reference`) is the dense model
with the *input* columns of every consumer of a removed channel set to zero; `verify_outputs` compares the
pruned model with it on the example inputs in eval mode and in train mode (dropout off, the same RNG state,
BatchNorm running statistics restored afterwards; see `regprune.forward`).

A group whose removal cannot be shown exact this way is unsafe: `group_safety` cuts a few channels of every
candidate group on a copy of the model, verifies, and bisects to the failing groups (cached per architecture).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .errors import UserError
# the side-effect-free runs and the reference, importable from here as well
from .forward import (buffers_kept, check_example_inputs, cloned_inputs, float64_copy, modes_kept, run_in_mode,
                      train_batch)
from .reference import consumer_columns, zero_consumers

__all__ = ["RTOL", "RTOL_FLOAT32", "Verification", "Mismatch", "verify_outputs", "ModelSnapshot", "group_safety",
           "trial_picks", "zero_consumers", "consumer_columns", "modes_kept", "buffers_kept", "cloned_inputs",
           "run_in_mode", "train_batch", "float64_copy", "check_example_inputs"]

RTOL = 1e-6  # largest |pruned - reference| allowed, relative to the reference output's largest magnitude (float64)
RTOL_FLOAT32 = 1e-4  # the same, for models that cannot run in float64


class Mismatch(Exception):
    """The pruned model does not compute the reference (internal: turned into a UserError naming the groups)."""


@dataclass
class Verification:
    """What the check ran and found: modes run, outputs compared, the largest relative difference."""

    modes: list[str]
    outputs: int
    max_rel_diff: float
    tolerance: float = RTOL
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able record stored with a pruned model (`regprune_verification`): verified, modes, outputs,
        max_rel_diff, tolerance, notes."""
        return {"verified": True, "modes": self.modes, "outputs": self.outputs,
                "max_rel_diff": self.max_rel_diff, "tolerance": self.tolerance, "notes": self.notes}

    def summary(self) -> str:
        """One line for people: what was compared, in which modes, and the largest relative difference."""
        note = f"; {'; '.join(self.notes)}" if self.notes else ""
        return (f"verified: pruned == dense with removed channels zeroed, {self.outputs} output(s), "
                f"{' and '.join(self.modes)} mode, max relative difference {self.max_rel_diff:.1e} "
                f"(tolerance {self.tolerance:.0e}){note}")


class ModelSnapshot:
    """Everything channel surgery may change in a model, kept so a failed surgery can be undone in place: every
    module's attributes, parameter and buffer tables, and each tensor's data and grad. The caller's parameter
    objects come back (an optimizer holding them stays valid)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers)) for m in model.modules()]
        self.tensors = [(p, p.data, p.grad) for p in model.parameters()]
        self.buffers = [(m, k, b) for m in model.modules() for k, b in m._buffers.items() if b is not None]

    def restore(self) -> None:
        """Put the model back as it was at the snapshot, in place (modules, tables, tensors' data and grads)."""
        for m, attrs, params, buffers in self.modules:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
        for p, data, grad in self.tensors:
            p.data = data
            p.grad = grad


def _compare(ref_out: Any, out: Any, mode: str, rtol: float) -> tuple[int, float]:
    """(tensor outputs compared, largest relative difference) of two outputs of the same structure; Mismatch
    otherwise."""
    ref_leaves, ref_spec = tree_flatten(ref_out)
    leaves, spec = tree_flatten(out)
    if len(ref_leaves) != len(leaves):
        raise Mismatch(f"{mode} mode: the output structure changed ({len(ref_leaves)} -> {len(leaves)} values)")
    n, worst = 0, 0.0
    for i, (a, b) in enumerate(zip(ref_leaves, leaves)):
        if not isinstance(a, torch.Tensor):
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise Mismatch(f"{mode} mode: output {i} changed shape {tuple(a.shape)} -> {shape}")
        n += 1
        if not a.is_floating_point():
            if not torch.equal(a, b):
                raise Mismatch(f"{mode} mode: integer output {i} differs")
            continue
        if not torch.isfinite(b).all() and torch.isfinite(a).all():
            raise Mismatch(f"{mode} mode: output {i} is not finite")
        scale = float(a.detach().abs().max()) if a.numel() else 0.0
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        rel = diff / max(scale, 1e-12)
        if math.isnan(rel) or rel > rtol:
            raise Mismatch(f"{mode} mode: output {i} differs from the reference by {rel:.2e} of its scale "
                           f"(tolerance {rtol:.0e})")
        worst = max(worst, rel)
    return n, worst


@contextlib.contextmanager
def _in_float64(model: nn.Module) -> Iterator[None]:
    """Run `model` in float64 and put its float32 tensors back exactly afterwards (float32 -> float64 -> float32
    is lossless; parameter objects stay the same). Models holding other float dtypes are left as they are."""
    dtypes = {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}
    if dtypes != {torch.float32}:
        yield
        return
    model.double()
    try:
        yield
    finally:
        model.float()


def verify_outputs(pruned: nn.Module, reference: nn.Module, example_inputs: Any, rtol: float = RTOL) -> Verification:
    """Compare `pruned` with `reference` on the example inputs in eval and in train mode, in float64 so that
    rounding (about 1e-15) cannot hide a real difference; models that cannot run in float64 are compared in
    their own precision with tolerance RTOL_FLOAT32 (noted).

    Returns a Verification; raises Mismatch (the pruned model fails, an output changes shape, or differs by
    more than `rtol` of the reference output's largest magnitude) and UserError when the dense reference
    itself cannot run the example inputs in eval mode. `reference` is a throwaway copy (it is left in float64)."""
    dtypes = {t.dtype for t in list(pruned.parameters()) + list(pruned.buffers()) if t.is_floating_point()}
    inputs64 = float64_copy(example_inputs)
    try:
        if dtypes != {torch.float32}:
            raise TypeError("not a float32 model")
        with torch.no_grad(), buffers_kept(reference):
            reference.double()
            ref_eval = run_in_mode(reference, inputs64, False)  # also the eval-mode reference output below
    except Exception:  # the model builds float32 tensors of its own, or an op lacks float64: check as it is
        reference.to(next(iter(dtypes))) if len(dtypes) == 1 else None
        result = _verify(pruned, reference, example_inputs, max(rtol, RTOL_FLOAT32))
        result.notes.append("compared in the model's own precision (it does not run in float64)")
        return result
    with _in_float64(pruned):
        return _verify(pruned, reference, inputs64, rtol, ref_eval)


def _verify(pruned: nn.Module, reference: nn.Module, example_inputs: Any, rtol: float,
            ref_eval: Any = None) -> Verification:
    """Both modes; `ref_eval`, when given, is the reference's eval-mode output on these inputs (not rerun)."""
    modes, notes, outputs, worst = [], [], 0, 0.0
    for mode in ("eval", "train"):
        inputs = example_inputs if mode == "eval" else train_batch(example_inputs)
        try:
            if mode == "eval" and ref_eval is not None:
                ref_out = ref_eval
            else:
                with buffers_kept(reference):
                    ref_out = run_in_mode(reference, inputs, mode == "train")
        except Exception as exc:  # the user's own model fails: in eval a user error, in train a note
            if mode == "eval":
                raise UserError(f"the model fails on the example inputs: {type(exc).__name__}: {str(exc)[:160]}") from None
            notes.append(f"train mode not checked (the dense model fails in train mode: {type(exc).__name__})")
            continue
        try:
            with buffers_kept(pruned):
                out = run_in_mode(pruned, inputs, mode == "train")
        except Exception as exc:
            raise Mismatch(f"{mode} mode: the pruned model fails: {type(exc).__name__}: {str(exc)[:160]}") from None
        n, w = _compare(ref_out, out, mode, rtol)
        modes.append(mode)
        outputs = max(outputs, n)
        worst = max(worst, w)
    return Verification(modes, outputs, worst, rtol, notes)


# ---------------------------------------------------------------------------------------------- safety trial
_CACHE: dict[str, dict[str, str]] = {}


def _fingerprint(model: nn.Module, example_inputs: Any) -> str:
    """Architecture, forward code and plain attributes of every module, tensor shapes and input shapes: what
    decides whether a cut is exact (weights do not: the trial uses its own)."""
    h = hashlib.sha256(repr(model).encode())
    for m in model.modules():
        fwd = getattr(type(m).forward, "__code__", None)
        h.update(type(m).__qualname__.encode() + (fwd.co_code + repr(fwd.co_consts).encode() if fwd else b""))
        plain = sorted((k, repr(v)) for k, v in vars(m).items()
                       if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple, type(None))))
        h.update(repr(plain).encode())
    for k, v in model.state_dict().items():
        h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode())
    for t in tree_flatten(example_inputs)[0]:
        h.update(repr(tuple(t.shape) if isinstance(t, torch.Tensor) else t).encode())
    h.update(type(model).__qualname__.encode())
    return h.hexdigest()


def _sensitise(model: nn.Module) -> None:
    """Give a trial copy weights under which every channel matters: all-zero weight tensors (zero-initialised
    heads, layer scales) get small random values, norm layers non-trivial statistics and affine parameters."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    t = getattr(m, name, None)
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        r = torch.rand(t.shape, generator=gen, dtype=t.dtype)
                        t.copy_(r + 0.5 if name in ("weight", "running_var") else (r - 0.5) * 0.4)
            for p in m.parameters(recurse=False):
                if p.is_floating_point() and p.numel() and float(p.abs().max()) == 0.0:
                    fan_in = max(1, p[0].numel()) if p.dim() >= 2 else max(1, p.numel())
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / math.sqrt(fan_in))


def trial_picks(g) -> list[int] | None:
    """A few channels to cut in a trial of the channel group `g` (a `graph.ChannelGroup`: `channels`,
    `ch_groups`): the first two (one if the group has fewer than 4 channels); for a group through a grouped conv,
    position 0 of every channel block. None when nothing can be cut (fewer than 2 channels, or blocks of 1)."""
    if g.ch_groups > 1:
        block = g.channels // g.ch_groups
        return None if block < 2 else [b * block for b in range(g.ch_groups)]
    if g.channels < 2:
        return None
    return [0, 1] if g.channels >= 4 else [0]


def group_safety(model: nn.Module, example_inputs: Any, graph_factory: Callable, roots: dict[str, list[int]],
                 surgery: Callable) -> dict[str, str]:
    """Roots whose removal is not exact, with the reason; the others are safe.

    `graph_factory(model, x, roots=[...])` traces a raw GroupGraph with (at least) the groups rooted at those
    layers; `surgery(graph, picks)` prunes and verifies, raising Mismatch. All candidate groups are cut together
    on one copy; a failing set is bisected on fresh copies, so the common case (every group safe) costs one trace
    and d unsafe groups among n about 2 d log2(n / d). `roots` maps each candidate root to the channel indices
    its trial cuts (`trial_picks`); the result maps each unsafe root to a one-line reason. A failing trace or
    surgery becomes a reason, never an exception; `model` is left untouched (trials run on copies).
    Cached per architecture, input shapes and candidate set."""
    key = _fingerprint(model, example_inputs) + repr(sorted(roots))
    if key in _CACHE:
        return dict(_CACHE[key])

    def traced(subset):
        # a fresh copy and trace per attempt: Torch-Pruning's graph keeps index mappings that an undone surgery can
        # leave stale (seen on GoogLeNet), so a traced copy is never reused; it forms the groups cut in this
        # attempt only. _sensitise is seeded: every attempt's copy has the same weights.
        trial = copy.deepcopy(model)
        _sensitise(trial)
        return graph_factory(trial, example_inputs, roots=list(subset))

    def attempt(subset: dict[str, list[int]]) -> str | None:
        try:
            graph = traced(subset)
            missing = [r for r in subset if r not in graph.groups]
            if missing:
                return f"not found again when the model is traced a second time ({missing[0]})"
            surgery(graph, subset)
        except Mismatch as exc:
            return str(exc)
        except UserError as exc:
            return str(exc)
        except Exception as exc:  # the surgery itself fails on this structure
            return f"the surgery fails: {type(exc).__name__}: {str(exc)[:160]}"
        return None

    bad: dict[str, str] = {}

    def search(subset: dict[str, list[int]], why: str | None = None) -> bool:
        """True when `subset` fails; failing groups (or a combination that fails only together) go to `bad`."""
        why = why or attempt(subset)
        if why is None:
            return False
        if len(subset) == 1:
            bad.update({r: why for r in subset})
            return True
        items = list(subset.items())
        found_a = search(dict(items[: len(items) // 2]))
        found_b = search(dict(items[len(items) // 2:]))
        if not (found_a or found_b):  # each half is exact alone: the groups fail only in combination
            names = ", ".join(r for r, _ in items[:6]) + (" ..." if len(items) > 6 else "")
            bad.update({r: f"{why} (only when cut together with {names})" for r in subset})
        return True

    if roots:
        search(dict(roots))
    _CACHE[key] = dict(bad)
    return bad
