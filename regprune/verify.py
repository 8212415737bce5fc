"""Verification of every channel removal, and the per-group safety trial that decides the pruning scope.

The rule: a physically pruned network must compute exactly what the dense network computes once the removed
channels are ignored by every layer that reads them. The reference is therefore the dense model with the
*input* columns of every consumer of a removed channel set to zero (conv / linear input channels, a transposed
conv's input rows, an option-A shortcut's index). That reference is right whatever sits between producer and
consumer (BatchNorm shifts, per-channel bias parameters, activations, squeeze-excitation gates), and it is
compared with the pruned model on the example inputs in eval mode and in train mode (dropout off, the same RNG
state, BatchNorm running statistics restored afterwards).

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
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

from .counting import call_model, is_depthwise
from .errors import UserError
from .models.cifar import PadShortcut

__all__ = ["RTOL", "Verification", "Mismatch", "verify_outputs", "zero_consumers", "ModelSnapshot", "modes_kept",
           "group_safety", "train_batch", "check_example_inputs"]

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
        return {"verified": True, "modes": self.modes, "outputs": self.outputs,
                "max_rel_diff": self.max_rel_diff, "tolerance": self.tolerance, "notes": self.notes}

    def summary(self) -> str:
        note = f"; {'; '.join(self.notes)}" if self.notes else ""
        return (f"verified: pruned == dense with removed channels zeroed, {self.outputs} output(s), "
                f"{' and '.join(self.modes)} mode, max relative difference {self.max_rel_diff:.1e} "
                f"(tolerance {self.tolerance:.0e}){note}")


def check_example_inputs(example_inputs: Any) -> Any:
    """Validate the forms a forward accepts: a tensor, a tuple/list of positional inputs, or a dict of keyword
    inputs (tensors or plain values). Raises UserError otherwise."""
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs
    if isinstance(example_inputs, (tuple, list, dict)) and example_inputs:
        leaves, _ = tree_flatten(example_inputs)
        if any(isinstance(t, torch.Tensor) for t in leaves):
            return example_inputs
    raise UserError("example_inputs must be a tensor, a tuple/list of positional inputs or a dict of keyword "
                    f"inputs holding at least one tensor (got {type(example_inputs).__name__})")


def _batch(example_inputs: Any) -> int | None:
    for t in tree_flatten(example_inputs)[0]:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return None


def train_batch(example_inputs: Any) -> Any:
    """Example inputs with a batch of at least 2 (train-mode BatchNorm needs it): a batch of 1 gets a second,
    perturbed sample (integer tensors, e.g. token ids, are repeated)."""
    if _batch(example_inputs) != 1:
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


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Train-mode forwards update BatchNorm running statistics: put them back afterwards."""
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
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Put every module's own train/eval flag back afterwards (a frozen-BN backbone stays in eval mode)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


def cloned_inputs(inputs: Any) -> Any:
    """Copies of the input tensors, so a forward with in-place ops cannot change the caller's examples."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)


def run_in_mode(model: nn.Module, inputs: Any, train: bool) -> Any:
    """`model`'s output on a copy of `inputs` in train (`train=True`) or eval mode; every module's own mode flag is
    restored afterwards."""
    with modes_kept(model):
        model.train(train)
        for m in _stochastic_modules(model):
            m.eval()
        with torch.no_grad(), _dropout_off(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return call_model(model, cloned_inputs(inputs))


def _compare(ref_out: Any, out: Any, mode: str, rtol: float) -> tuple[int, float]:
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


def float64_copy(x: Any) -> Any:
    """`x` (a tensor or nested inputs) with every floating-point tensor converted to float64; other leaves as given."""
    return tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, x)


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
    try:
        if dtypes != {torch.float32}:
            raise TypeError("not a float32 model")
        with torch.no_grad():
            reference.double()
            run_in_mode(reference, float64_copy(example_inputs), False)
    except Exception:  # the model builds float32 tensors of its own, or an op lacks float64: check as it is
        reference.to(next(iter(dtypes))) if len(dtypes) == 1 else None
        result = _verify(pruned, reference, example_inputs, max(rtol, RTOL_FLOAT32))
        result.notes.append("compared in the model's own precision (it does not run in float64)")
        return result
    with _in_float64(pruned):
        return _verify(pruned, reference, float64_copy(example_inputs), rtol)


def _verify(pruned: nn.Module, reference: nn.Module, example_inputs: Any, rtol: float) -> Verification:
    modes, notes, outputs, worst = [], [], 0, 0.0
    for mode in ("eval", "train"):
        inputs = example_inputs if mode == "eval" else train_batch(example_inputs)
        try:
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


# ---------------------------------------------------------------------------------------------- reference
def _zero_inputs(mod: nn.Module, idxs: list[int]) -> None:
    """Make `mod` ignore its input channels `idxs` (in place, on the reference copy)."""
    idx = torch.tensor(sorted(set(idxs)), dtype=torch.long)
    with torch.no_grad():
        if isinstance(mod, nn.Linear):
            mod.weight[:, idx] = 0
        elif isinstance(mod, nn.modules.conv._ConvNd) and mod.transposed:
            mod.weight[idx] = 0  # (in, out/groups, k...): every input channel has its own row
        elif isinstance(mod, nn.modules.conv._ConvNd):
            per_in = mod.in_channels // mod.groups
            per_out = mod.out_channels // mod.groups
            for i in idx.tolist():
                b, j = divmod(i, per_in)
                mod.weight[b * per_out:(b + 1) * per_out, j] = 0
        elif isinstance(mod, PadShortcut):
            mod.index = torch.where(torch.isin(mod.index, idx), torch.full_like(mod.index, -1), mod.index)
        else:
            raise UserError(f"cannot build a reference for a {type(mod).__name__} that reads removed channels")


def consumer_columns(graph, picks: dict[str, list[int]]) -> list[tuple[str, list[int]]]:
    """(layer name, input-channel indices) of every layer that reads a removed channel, from the pre-surgery
    dependency graph (indices already mapped through concat, split and flatten)."""
    out = []
    with graph.mapped_once():  # nothing is cut here: the index mappings are computed once for all picks
        for root, idxs in picks.items():
            if idxs:
                out += _readers(graph, graph.tp_group(root, sorted(set(int(i) for i in idxs))))
    return out


def _readers(graph, group) -> list[tuple[str, list[int]]]:
    """(layer name, input-channel indices) of the layers in a Torch-Pruning group that read its channels."""
    out = []
    for item in group:
        mod = item.dep.target.module
        if graph.dg.is_out_channel_pruning_fn(item.dep.handler) or mod not in graph.names:
            continue
        if is_depthwise(mod) or isinstance(mod, nn.modules.batchnorm._BatchNorm):
            continue  # a depthwise conv's inputs are its outputs: their readers are zeroed instead
        # conv / linear / shortcut readers get their inputs zeroed; any other reader with a weight matrix is
        # listed too, and refused by _zero_inputs
        if (isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd, PadShortcut))
                or any(p.dim() >= 2 for p in mod.parameters(recurse=False))):
            out.append((graph.names[mod], [int(i) for i in item.idxs]))
    return out


def zero_consumers(model: nn.Module, columns: list[tuple[str, list[int]]]) -> nn.Module:
    """A deep copy of the dense `model` whose layers ignore the removed channels: the reference."""
    ref = copy.deepcopy(model)
    for name, idxs in columns:
        _zero_inputs(ref.get_submodule(name), idxs)
    return ref


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
    """A few channels to cut in a trial: the first two (one if the group is small); for a group through a
    grouped conv, position 0 of every channel block. None when nothing can be cut."""
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
    and d unsafe groups among n about 2 d log2(n / d).
    Cached per architecture, input shapes and candidate set."""
    key = _fingerprint(model, example_inputs) + repr(sorted(roots))
    if key in _CACHE:
        return dict(_CACHE[key])

    base = copy.deepcopy(model)
    _sensitise(base)
    def traced(subset):
        # a fresh trace per attempt: Torch-Pruning's graph keeps index mappings that an undone surgery can leave
        # stale (seen on GoogLeNet), so a traced copy is never reused; it forms the groups cut in this attempt only
        return graph_factory(copy.deepcopy(base), example_inputs, roots=list(subset))

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
