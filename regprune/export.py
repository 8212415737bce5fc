"""Export a model file to ONNX."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .models import model_info
from .surgery import load_model

__all__ = ["export_onnx"]


def export_onnx(model_file: str | Path, onnx_path: str | Path, *, input_size: int | None = None,
                in_channels: int | None = None, overwrite: bool = False) -> Path:
    """Write `model_file` as ONNX (opset 17, dynamic batch); returns the path."""
    out = Path(onnx_path)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    model, meta = load_model(model_file)
    model.eval()
    arch = getattr(model, "regprune_arch", None) or {}
    if input_size is None and isinstance(meta.get("input_size"), int):
        input_size = meta["input_size"]
    if input_size is None:
        input_size = model_info(arch["name"]).input_size if arch.get("name") else 32
    channels = in_channels or arch.get("kwargs", {}).get("in_channels", 3)
    x = torch.zeros(1, channels, input_size, input_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        torch.onnx.export(model, (x,), str(tmp), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
        tmp.replace(out)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
