"""Backward kernel: recompute each logits tile, form dZ = g * (onehot(y) - softmax(z)) through the
transform's chain rule, and accumulate dH = dL @ W and dW = dL^T @ H (and db) tile by tile.

Each program owns one ``[BLOCK_N, BLOCK_V]`` tile, so dL exists only in registers. Contributions from
different tiles meet in fp32 buffers through atomic adds: the cost is an fp32 ``[N, H]`` buffer for dH
and an fp32 ``[V, H]`` buffer for dW (plus ``[V]`` for db) while the backward runs, cast to the inputs'
dtype at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wpo_kernels.kernels.logits_tile import dot_switches, interpreter_active, logits_tile, transform_args
from wpo_kernels.types import LogitTransform

_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
    for bn, bv, bd, w, s in [
        (128, 128, 64, 8, 3),
        (64, 128, 64, 4, 3),
        (128, 64, 64, 4, 3),
        (64, 64, 64, 4, 4),
    ]
]
_INTERPRETER_CONFIG = {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 32}


@triton.jit
def _linear_logprobs_bwd_kernel(
    H_ptr, W_ptr, B_ptr, T_ptr, LSE_ptr, G_ptr,
    DH_ptr, DW_ptr, DB_ptr,
    N, V, D, vocab_start,
    stride_hn, stride_hd, stride_wv, stride_wd,
    pre_scale, softcap, post_scale, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER_GRAD: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V

    z, dz_dl = logits_tile(
        H_ptr, W_ptr, B_ptr, offs_n, offs_v, mask_n, mask_v,
        D, stride_hn, stride_hd, stride_wv, stride_wd,
        pre_scale, softcap, post_scale,
        HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
    )
    y = tl.load(T_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64) - vocab_start
    lse = tl.load(LSE_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(G_ptr + offs_n, mask=mask_n, other=0.0)  # 0 at ignored tokens (set by the caller)

    # d logp(y) / dz = onehot(y) - softmax(z), then through the transform to the raw logit
    p = tl.exp(z - lse[:, None])
    onehot = ((offs_v[None, :] == y[:, None]) & mask_v[None, :]).to(tl.float32)
    dl = g[:, None] * (onehot - p) * dz_dl
    if FILTER_GRAD:
        # gradient filtering: a tile whose live tokens (g != 0) all have softmax probability below
        # filter_eps and no target here adds less than the output precision holds: skip its GEMMs
        live = (g != 0)[:, None]
        keep = tl.max(tl.where(live, tl.maximum(p, onehot), 0.0)) >= filter_eps
    else:
        keep = True
    if keep:
        if HAS_BIAS:
            tl.atomic_add(DB_ptr + offs_v, tl.sum(dl, axis=0), mask=mask_v)

        if UPCAST_DOT:
            dl_op = dl
        else:
            dl_op = dl.to(H_ptr.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_nd = mask_n[:, None] & (offs_d < D)[None, :]
            mask_vd = mask_v[:, None] & (offs_d < D)[None, :]
            h_ptrs = H_ptr + offs_n[:, None] * stride_hn + offs_d[None, :] * stride_hd
            w_ptrs = W_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd
            h = tl.load(h_ptrs, mask=mask_nd, other=0.0)
            w = tl.load(w_ptrs, mask=mask_vd, other=0.0)
            if UPCAST_DOT:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            dh = tl.dot(dl_op, w, input_precision=DOT_PRECISION)
            dw = tl.dot(tl.trans(dl_op), h, input_precision=DOT_PRECISION)
            tl.atomic_add(DH_ptr + offs_n[:, None] * D + offs_d[None, :], dh, mask=mask_nd)
            tl.atomic_add(DW_ptr + offs_v[:, None] * D + offs_d[None, :], dw, mask=mask_vd)


_linear_logprobs_bwd_kernel_tuned = triton.autotune(
    configs=_GPU_CONFIGS,
    key=["V", "D", "HAS_SOFTCAP", "FILTER_GRAD"],
    reset_to_zero=["DH_ptr", "DW_ptr", "DB_ptr"],
)(_linear_logprobs_bwd_kernel)


def triton_linear_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logprobs: torch.Tensor,
    transform: LogitTransform,
    *,
    vocab_start: int = 0,
    filter_eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``sum_i grad_logprobs[i] * logprobs[i]`` w.r.t. hidden, weight and bias.

    ``lse`` ``[N]`` is the global log-sum-exp per token (fp32), ``grad_logprobs`` ``[N]`` fp32 with zeros
    at ignored tokens. ``filter_eps`` turns on gradient filtering (tiles whose probabilities are all
    below it, holding no target, are skipped). Returns fp32 ``dH [N, H]``, ``dW [V, H]``, ``db [V]``
    (None without bias).
    """
    n, d = hidden.shape
    v = weight.shape[0]
    dh = torch.zeros((n, d), device=hidden.device, dtype=torch.float32)
    dw = torch.zeros((v, d), device=hidden.device, dtype=torch.float32)
    db = torch.zeros((v,), device=hidden.device, dtype=torch.float32) if bias is not None else None
    if n == 0:
        return dh, dw, db
    kernel = _linear_logprobs_bwd_kernel if interpreter_active() else _linear_logprobs_bwd_kernel_tuned
    config = _INTERPRETER_CONFIG if interpreter_active() else {}

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(v, meta["BLOCK_V"]))

    kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, lse, grad_logprobs,
        dh, dw, db if db is not None else dh,
        n, v, d, vocab_start,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        **transform_args(transform), filter_eps=float(filter_eps or 0.0),
        HAS_BIAS=bias is not None, FILTER_GRAD=filter_eps is not None,
        **dot_switches(hidden.dtype), **config,
    )
    return dh, dw, db
