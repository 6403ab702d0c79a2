"""The one tile every kernel starts from: ``z = transform(H_tile @ W_tile.T + b)`` in fp32 registers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from wpo_kernels.types import LogitTransform


def interpreter_active() -> bool:
    """True when Triton runs kernels in its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_switches(dtype: torch.dtype) -> dict[str, object]:
    """Compile-time switches for ``tl.dot`` on operands of ``dtype``.

    - ``UPCAST_DOT``: the interpreter computes bf16 ``tl.dot`` wrongly, so there operands are upcast to
      fp32 first; on a GPU they stay in their dtype for the tensor cores.
    - ``DOT_PRECISION``: fp32 operands follow ``torch.backends.cuda.matmul.allow_tf32``, like ``h @ W.T``.
    """
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST_DOT": interpreter_active(), "DOT_PRECISION": "tf32" if tf32 else "ieee"}


def transform_args(transform: LogitTransform) -> dict[str, object]:
    """Kernel arguments for a :class:`LogitTransform` (softcap is a constexpr switch)."""
    return {
        "pre_scale": float(transform.logit_scale),
        "softcap": float(transform.softcap or 1.0),
        "post_scale": float(transform.post_scale),
        "HAS_SOFTCAP": transform.softcap is not None,
    }


#: Largest element offset the kernels form in 32 bits: a hidden-unit index times the column stride.
INT32_OFFSET_LIMIT = 2**31 - 1


def addressable_columns(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[rows, D]`` as the kernels can address it. Row offsets are 64-bit, column offsets
    (``d × t.stride(1)``) 32-bit, so a layout whose last column lies more than 2³¹ elements from its
    first (a transposed view of a huge matrix) is copied to contiguous first; every other layout is
    read in place through its strides."""
    return t.contiguous() if (t.shape[1] - 1) * t.stride(1) > INT32_OFFSET_LIMIT else t


@triton.jit
def tanh_from_exp2x(e2x):
    """``tanh(x)`` from ``e2x = exp(2x)``: ``1 − 2 / (e2x + 1)`` with an approximate (2-ulp) reciprocal
    instead of IEEE division, so one MUFU exp and one MUFU rcp per element; the limits ±1 are exact and
    the absolute error stays below 2e-7 (tl has no portable tanh across triton versions and the
    interpreter)."""
    return 1 - tl.fdiv(tl.full(e2x.shape, 2.0, tl.float32), e2x + 1, ieee_rounding=False)


@triton.jit
def logits_tile(
    H_ptr, W_ptr, B_ptr,
    offs_n, offs_v, mask_n, mask_v,
    D, stride_hn, stride_hd, stride_wv, stride_wd,
    pre_scale, softcap, post_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Returns ``(z, dz_dl)``: the transformed logits tile ``[BLOCK_N, BLOCK_V]`` (-inf outside the
    vocabulary) and the derivative of the transform w.r.t. the raw logit, for the backward's chain rule."""
    # l = H @ W.T, accumulated over the hidden dimension in fp32
    l = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    # 64-bit row offsets: N·H and V·H pass 2^31 for real heads and batches (e.g. 16k tokens × 256k vocab)
    rows_h = offs_n.to(tl.int64)[:, None] * stride_hn
    rows_w = offs_v.to(tl.int64)[:, None] * stride_wv
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(
            H_ptr + rows_h + offs_d[None, :] * stride_hd,
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        )
        w = tl.load(
            W_ptr + rows_w + offs_d[None, :] * stride_wd,
            mask=mask_v[:, None] & mask_d[None, :], other=0.0,
        )
        if UPCAST_DOT:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        l = tl.dot(h, tl.trans(w), l, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        l += tl.load(B_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    # scalar factors folded once per tile, so each logit costs one multiply before the statistics
    if HAS_SOFTCAP:
        t = tanh_from_exp2x(tl.exp(l * (2 * pre_scale / softcap)))
        z = t * (softcap * post_scale)
        dz_dl = (1 - t * t) * (pre_scale * post_scale)
    else:
        z = l * (pre_scale * post_scale)
        dz_dl = tl.full((BLOCK_N, BLOCK_V), 1.0, tl.float32) * (pre_scale * post_scale)
    z = tl.where(mask_v[None, :], z, float("-inf"))
    return z, dz_dl
