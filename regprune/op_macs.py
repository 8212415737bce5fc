"""Multiply-accumulates of single torch function calls, from their arguments' and result's shapes (used by
`counting.recording`, which attributes them to layers and divides the batch out)."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["function_macs", "matmul_macs"]

# Torch functions (by __name__) whose MACs are counted, and where their two matrix operands are in the arguments
_PRODUCTS = {"matmul": (0, 1), "__matmul__": (0, 1), "__rmatmul__": (1, 0), "mm": (0, 1), "bmm": (0, 1),
             "addmm": (1, 2), "baddbmm": (1, 2), "addbmm": (1, 2)}
_CONVS = {"conv1d", "conv2d", "conv3d"}
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def matmul_macs(a: torch.Tensor, b: torch.Tensor) -> int:
    """MACs of `a @ b` with torch.matmul's rules: a 1-D `a` is a row, a 1-D `b` a column, leading dimensions
    broadcast. (..., n, k) @ (..., k, m): prod(batch) x n x k x m."""
    sa, sb = list(a.shape), list(b.shape)
    if len(sa) == 1:
        sa = [1] + sa
    if len(sb) == 1:
        sb = sb + [1]
    try:
        batch = torch.broadcast_shapes(tuple(sa[:-2]), tuple(sb[:-2]))
    except RuntimeError:
        batch = tuple(sa[:-2])
    return math.prod(batch) * sa[-2] * sa[-1] * sb[-1]


def _einsum_macs(args: tuple) -> tuple[list[torch.Tensor], int] | None:
    """(operands, MACs) of a two-operand einsum without an ellipsis: the product of every index's size."""
    if not args or not isinstance(args[0], str):
        return None
    eq = args[0].replace(" ", "")
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    lhs = eq.split("->")[0].split(",")
    if len(ops) != 2 or len(lhs) != 2 or "..." in eq or any(len(t) != o.dim() for t, o in zip(lhs, ops)):
        return None
    sizes: dict[str, int] = {}
    for term, op in zip(lhs, ops):
        for ch, n in zip(term, op.shape):
            sizes[ch] = max(sizes.get(ch, 1), int(n))
    return ops, math.prod(sizes.values())


def _mha_macs(args: tuple, kwargs: dict) -> list[tuple[Any, int]]:
    """F.multi_head_attention_forward: [(input-projection weight, input projections + QK^T + AV), (output
    projection weight, output projection)], whole batch. Sequences are (L, N, E) or unbatched (L, E)."""
    a = _MHA_SIGNATURE.bind(*args, **kwargs).arguments
    q, k, v = a["query"], a["key"], a["value"]
    e = int(a["embed_dim_to_check"])
    n = int(q.shape[1]) if q.dim() == 3 else 1
    tgt, src = int(q.shape[0]), int(k.shape[0])
    proj = tgt * e * e
    if a.get("static_k") is None:
        proj += src * int(k.shape[-1]) * e
    else:
        src = int(a["static_k"].shape[1])
    if a.get("static_v") is None:
        proj += src * int(v.shape[-1]) * e
    src += int(a.get("bias_k") is not None) + int(bool(a.get("add_zero_attn")))
    w_in = a.get("q_proj_weight") if a.get("use_separate_proj_weight") else a.get("in_proj_weight")
    w_out = a["out_proj_weight"]
    return [(w_in, n * (proj + 2 * tgt * src * e)), (w_out, n * tgt * w_out.numel())]


def function_macs(name: str, args: tuple, kwargs: dict, out: Any) -> list[tuple[Any, int]]:
    """MACs of one call of torch function `name` over the whole batch, as [(the weight they belong to, a
    Parameter or Tensor operand, or None; MACs)] (empty for a function that does none this counts).

    linear: weight.numel() x positions; conv1d/2d/3d: weight.numel() x output positions x batch; matrix products
    as `matmul_macs`; scaled_dot_product_attention (..., L, E) x (..., S, E) x (..., S, Ev): prod(...) x L x S x
    (E + Ev); a two-operand einsum: the product of its index sizes; multi_head_attention_forward: see `_mha_macs`."""
    kwargs = kwargs or {}
    if name == "linear":
        x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
        return [(w, (x.numel() // max(int(w.shape[-1]), 1)) * w.numel())]
    if name in _CONVS:
        w = args[1] if len(args) > 1 else kwargs["weight"]
        if not isinstance(out, torch.Tensor):
            return []
        batch = int(out.shape[0]) if out.dim() == w.dim() else 1
        return [(w, w.numel() * math.prod(out.shape[-(w.dim() - 2):]) * batch)]
    if name in _PRODUCTS:
        i, j = _PRODUCTS[name]
        a = args[i] if len(args) > i else None
        b = args[j] if len(args) > j else kwargs.get("other", kwargs.get("mat2"))
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return []
        weight = b if isinstance(b, torch.nn.Parameter) else a if isinstance(a, torch.nn.Parameter) else None
        return [(weight, matmul_macs(a, b))]
    if name == "scaled_dot_product_attention":
        q = args[0] if args else kwargs["query"]
        k = args[1] if len(args) > 1 else kwargs["key"]
        v = args[2] if len(args) > 2 else kwargs["value"]
        lead = math.prod(q.shape[:-2])
        return [(None, lead * int(q.shape[-2]) * int(k.shape[-2]) * (int(q.shape[-1]) + int(v.shape[-1])))]
    if name == "einsum":
        found = _einsum_macs(args)
        if found is None:
            return []
        ops, macs = found
        weight = next((o for o in ops if isinstance(o, torch.nn.Parameter)), None)
        return [(weight, macs)]
    if name == "multi_head_attention_forward":
        return _mha_macs(args, kwargs)
    return []
