"""Export a model to ONNX and check the file against the PyTorch model in ONNX Runtime.

Needs the `export` extra (onnx, onnxruntime): pip install 'regprune[export]'.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from .counting import output_tensors
from .errors import UserError, first_line
from .io import atomic_path
from .models import model_info
from .surgery import load_model

__all__ = ["export_onnx", "export_module", "check_onnx", "OnnxCheck", "OnnxExport", "require_onnxruntime",
           "DEFAULT_ATOL", "CHECK_BATCH_SIZES"]

#: Default tolerance of the export check: |ONNX - PyTorch| may reach DEFAULT_ATOL x max(1, max |PyTorch output|).
#: float32 kernels of the two runtimes differ by ~1e-6 of the output scale on these networks; 1e-4 leaves room
#: for deeper nets while any real graph difference (a wrong op, a baked-in batch size) lands far above it.
DEFAULT_ATOL = 1e-4
#: Batch sizes the check runs: 1 and one more, so a batch size frozen into the graph fails the check.
CHECK_BATCH_SIZES = (1, 4)
_EXTRA_HINT = "pip install 'regprune[export]'"


def require_onnxruntime() -> Any:
    """Import and return the `onnxruntime` module (and check `onnx` imports too).

    Raises:
        UserError: onnx or onnxruntime is not installed (the message names the extra to install).
    """
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
        import onnxruntime
    except ImportError as exc:
        raise UserError(f"ONNX export needs the packages onnx and onnxruntime ({exc.name or 'one'} is missing): "
                        f"{_EXTRA_HINT}") from None
    return onnxruntime


@dataclass
class OnnxCheck:
    """How closely an ONNX file reproduces its PyTorch model, over random N(0, 1) inputs.

    Attributes:
        batch_sizes: the batch sizes run (the file's batch axis is dynamic).
        max_abs_diff: max |ONNX - PyTorch| over every output element of every batch.
        max_rel_diff: max_abs_diff / max |PyTorch output| (relative to the output's scale, not elementwise,
            so outputs near zero do not inflate it).
        output_scale: max |PyTorch output|.
        atol: the tolerance asked for; `tolerance` = atol x max(1, output_scale) is the allowed max_abs_diff.
    """

    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    output_scale: float
    atol: float
    by_batch: dict[int, float] = field(default_factory=dict)

    @property
    def tolerance(self) -> float:
        """The largest max_abs_diff that passes: atol x max(1, output_scale)."""
        return self.atol * max(1.0, self.output_scale)

    @property
    def passed(self) -> bool:
        """Whether max_abs_diff is within `tolerance` (a NaN difference fails)."""
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        """One line: batch sizes, both differences and the tolerance."""
        batches = " and ".join(str(b) for b in self.batch_sizes)
        return (f"ONNX Runtime vs PyTorch on random inputs at batch {batches}: max |diff| {self.max_abs_diff:.2e}, "
                f"max relative diff {self.max_rel_diff:.2e} (|diff| / max |output|, output scale "
                f"{self.output_scale:.3g}); tolerance {self.tolerance:.2e} (--atol {self.atol:g} x max(1, scale))")

    def to_dict(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes), "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff, "output_scale": self.output_scale, "atol": self.atol,
                "tolerance": self.tolerance, "passed": self.passed,
                "max_abs_diff_by_batch": {str(k): v for k, v in self.by_batch.items()}}


@dataclass
class OnnxExport(os.PathLike):
    """What `export_onnx` returns: the written file and the check it passed. Usable as a path (os.fspath)."""

    path: Path
    check: OnnxCheck
    sample_shape: tuple[int, ...]  # one input sample without the batch axis: (C, H, W)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)


def _outputs(out: Any) -> list[torch.Tensor]:
    """A forward's tensors in order (a tensor, or a tuple/list/dict of them); UserError for any other output."""
    try:
        return output_tensors(out, strict=True)
    except TypeError as exc:
        raise UserError(f"the model returns {exc}, not tensors: ONNX export needs tensor outputs") from None


def export_module(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, *, opset: int = 17) -> Path:
    """Write `model` (taken as is; call .eval() first) to `path` as ONNX with a dynamic batch axis.

    `example` is one input of shape (N, C, H, W) (any batch size). The graph's input is named "input" and its
    output(s) "logits" (then "output_1", ...). `path` is written directly; `export_onnx` is the careful,
    checked, atomic route for users' files.

    Raises:
        UserError: onnx/onnxruntime missing; the model does not run on `example` (its shape and the first line of
            the error are given); the exporter fails (its first message line is given).
    """
    require_onnxruntime()
    path = Path(path)
    try:
        with torch.no_grad():
            out = model(example)
    except RuntimeError as exc:
        raise UserError(f"the model does not run on inputs of shape {tuple(example.shape)}: "
                        f"{first_line(exc)}") from None
    n_out = len(_outputs(out))
    names = ["logits"] + [f"output_{i}" for i in range(1, n_out)]
    axes = {n: {0: "batch"} for n in ["input", *names]}
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter's deprecation notice and tracer warnings would reach the CLI's stderr;
            # the numerical check in export_onnx is what decides whether a file is right
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=names,
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"ONNX export failed: {type(exc).__name__}: {first_line(exc)}") from None
    return path


@torch.no_grad()
def check_onnx(onnx_path: str | os.PathLike, model: nn.Module, sample_shape: Sequence[int], *,
               batch_sizes: Sequence[int] = CHECK_BATCH_SIZES, atol: float = DEFAULT_ATOL, seed: int = 0) -> OnnxCheck:
    """Run the ONNX file in ONNX Runtime (CPU) and `model` in PyTorch on the same N(0, 1) float32 inputs.

    `sample_shape` is one sample's shape without the batch axis, e.g. (3, 32, 32); each batch size in
    `batch_sizes` gets its own input of shape (b, *sample_shape), drawn from a generator seeded with `seed`.
    Returns the figures (see `OnnxCheck`); whether they pass is `OnnxCheck.passed`, nothing is raised for it.

    Raises:
        UserError: onnxruntime missing; it cannot load or run the file; the output count or shapes differ.
    """
    ort = require_onnxruntime()
    model.eval()
    try:
        sess = ort.InferenceSession(os.fspath(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise UserError(f"ONNX Runtime cannot load the exported file: {first_line(exc)}") from None
    input_name = sess.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    max_abs, scale, by_batch = 0.0, 0.0, {}
    for b in batch_sizes:
        x = torch.randn(b, *sample_shape, generator=gen)
        ref = [t.detach().float().cpu() for t in _outputs(model(x))]
        try:
            got = sess.run(None, {input_name: x.numpy()})
        except Exception as exc:
            raise UserError(f"ONNX Runtime failed to run the exported file at batch {b}: "
                            f"{first_line(exc)}") from None
        if len(got) != len(ref):
            raise UserError(f"refused: the ONNX file gives {len(got)} outputs, the model {len(ref)}")
        worst = 0.0
        for r, g in zip(ref, got):
            g = torch.from_numpy(g).float()
            if tuple(g.shape) != tuple(r.shape):
                raise UserError(f"refused: the ONNX file's output has shape {tuple(g.shape)} at batch {b}, "
                                f"the model's {tuple(r.shape)} (a batch size fixed in the graph?)")
            d = (g - r).abs().max().item() if r.numel() else 0.0
            worst = max(worst, math.inf if math.isnan(d) else d)  # a NaN anywhere must fail the check
            scale = max(scale, r.abs().max().item() if r.numel() else 0.0)
        by_batch[b] = worst
        max_abs = max(max_abs, worst)
    rel = max_abs / scale if scale > 0 else max_abs
    return OnnxCheck(tuple(batch_sizes), max_abs, rel, scale, atol, by_batch)


def export_onnx(model_file: str | os.PathLike | nn.Module, onnx_path: str | os.PathLike, *,
                input_size: int | None = None, in_channels: int | None = None, overwrite: bool = False,
                atol: float = DEFAULT_ATOL, batch_sizes: Sequence[int] = CHECK_BATCH_SIZES,
                model: nn.Module | None = None, seed: int = 0) -> OnnxExport:
    """Write a model as ONNX (opset 17, dynamic batch) after checking it in ONNX Runtime against PyTorch.

    `model_file` is a regprune model file (`model` = the dense custom model, as for `regprune.load`) or an
    nn.Module. Inputs are (N, in_channels, input_size, input_size) float32; both default to the model's own
    (the file's recorded input size, the registry's, else 3 channels and 32 pixels). The file is first written
    beside `onnx_path` under a temporary name, then run by `check_onnx` at `batch_sizes`; only if max |diff| <=
    atol x max(1, max |output|) is it moved to `onnx_path` (atomically). Returns an `OnnxExport` (path, check
    figures), which also works as a path.

    Raises:
        UserError: `onnx_path` exists and not `overwrite` (it is left untouched); onnx/onnxruntime missing
            (the message says `pip install 'regprune[export]'`); an unreadable model file; `in_channels` other
            than the model file's recorded input channels; a model that does not run on the input shape (e.g. an
            input too small for it); an export failure; a check over the tolerance (the figures are in the
            message). No file is left at `onnx_path` on any error, and an existing one is kept.
    """
    out = Path(onnx_path)
    if not (atol >= 0):
        raise UserError(f"--atol must be a number >= 0, got {atol}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise UserError(f"check batch sizes must be >= 1, got {list(batch_sizes)}")
    if out.is_dir():
        raise UserError(f"{out} is a folder; give the .onnx file's path")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    require_onnxruntime()
    if isinstance(model_file, nn.Module):
        net, meta = model_file, {}
    else:
        net, meta = load_model(model_file, model=model)
    net.eval()
    arch = getattr(net, "regprune_arch", None) or {}
    if input_size is None and isinstance(meta.get("input_size"), int):
        input_size = meta["input_size"]
    if input_size is None:
        input_size = model_info(arch["name"]).input_size if arch.get("name") else 32
    recorded = arch.get("kwargs", {}).get("in_channels")
    channels = in_channels or recorded or 3
    if input_size < 1 or channels < 1:
        raise UserError(f"input size and channels must be >= 1, got {input_size} and {channels}")
    if recorded is not None and channels != recorded:
        raise UserError(f"--in-channels {channels} does not match the model: it was built for {recorded} input "
                        f"channel(s) (leave out --in-channels to use the model's own)")
    sample = (channels, input_size, input_size)

    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out.parent}: {exc.strerror or exc}") from None
    try:
        with atomic_path(out) as tmp:  # moved onto `out` only when the block succeeds
            export_module(net, torch.zeros(1, *sample), tmp)
            check = check_onnx(tmp, net, sample, batch_sizes=batch_sizes, atol=atol, seed=seed)
            if not check.passed:
                raise UserError(f"refused: the ONNX file does not reproduce the model ({check.summary()}); "
                                f"nothing written to {out}")
            if out.exists() and not overwrite:  # appeared while exporting: never replace it unasked
                raise UserError(f"{out} already exists; pass --overwrite to replace it")
    except BaseException:
        for p in made:  # folders this call created, innermost first, if still empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return OnnxExport(out, check, sample)
