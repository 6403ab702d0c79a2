"""Forward kernel: one pass of the LM-head GEMM, folding each logits tile into streaming vocabulary
statistics (max, log-sum-exp, log-sum-exp of 2z, target logit, mean logit) without writing it out."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wpo_kernels.kernels.logits_tile import dot_switches, interpreter_active, logits_tile, transform_args
from wpo_kernels.types import LogitTransform, VocabStats

# Autotune space on a GPU; BLOCK_* >= 16 for tensor-core tl.dot. The interpreter runs one fixed config.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
    for bn, bv, bd, w, s in [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (64, 256, 64, 8, 4),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (256, 128, 64, 8, 3),
    ]
]
_INTERPRETER_CONFIG = {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 32}


@triton.jit
def _vocab_stats_kernel(
    H_ptr, W_ptr, B_ptr, T_ptr,
    TGT_ptr, MAX_ptr, LSE_ptr, LSE2_ptr, MEAN_ptr,
    N, V, D, vocab_start,
    stride_hn, stride_hd, stride_wv, stride_wd,
    pre_scale, softcap, post_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_MEAN: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # target index inside this vocabulary slice (ignored / foreign targets never match a column)
    y = tl.load(T_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64) - vocab_start

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max of z
    s1 = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m)
    s2 = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(2(z - m))
    sz = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m) * z
    z_y = tl.zeros((BLOCK_N,), tl.float32)  # z[target]

    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z, _ = logits_tile(
            H_ptr, W_ptr, B_ptr, offs_n, offs_v, mask_n, mask_v,
            D, stride_hn, stride_hd, stride_wv, stride_wd,
            pre_scale, softcap, post_scale,
            HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        # the target column, if it lies in this tile (never a padding column past V)
        is_y = (offs_v[None, :] == y[:, None]) & mask_v[None, :]
        z_y += tl.sum(tl.where(is_y, z, 0.0), axis=1)

        # online rescale: bring the running sums to the new max; a row that has seen only -inf so far
        # is shifted by 0 instead, so no (-inf) - (-inf) appears
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        e = tl.exp(z - shift[:, None])
        s1 = s1 * alpha + tl.sum(e, axis=1)
        s2 = s2 * alpha * alpha + tl.sum(e * e, axis=1)
        if NEED_MEAN:
            # e == 0 where z == -inf: take 0 there, not 0 * -inf
            sz = sz * alpha + tl.sum(e * tl.where(e > 0, z, 0.0), axis=1)
        m = m_new

    lse = m + tl.log(s1)
    tl.store(TGT_ptr + offs_n, z_y, mask=mask_n)
    tl.store(MAX_ptr + offs_n, m, mask=mask_n)
    tl.store(LSE_ptr + offs_n, lse, mask=mask_n)
    tl.store(LSE2_ptr + offs_n, 2 * m + tl.log(s2), mask=mask_n)
    if NEED_MEAN:
        tl.store(MEAN_ptr + offs_n, sz / s1, mask=mask_n)


_vocab_stats_kernel_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["V", "D", "HAS_SOFTCAP"])(
    _vocab_stats_kernel
)


def triton_vocab_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    transform: LogitTransform,
    *,
    vocab_start: int = 0,
    need_mean_logit: bool = False,
) -> VocabStats:
    """Launch the forward kernel. hidden ``[N, H]``, weight ``[V, H]`` (fp16/bf16/fp32, any strides),
    bias ``[V]`` or None, targets ``[N]`` int. Returns :class:`VocabStats` of ``[N]`` fp32 tensors."""
    n, d = hidden.shape
    v = weight.shape[0]
    out = torch.empty((5 if need_mean_logit else 4, n), device=hidden.device, dtype=torch.float32)
    if n == 0:
        return VocabStats(*out[:4], out[4] if need_mean_logit else None)
    kernel = _vocab_stats_kernel if interpreter_active() else _vocab_stats_kernel_tuned
    config = _INTERPRETER_CONFIG if interpreter_active() else {}

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets,
        out[0], out[1], out[2], out[3], out[4] if need_mean_logit else out[0],
        n, v, d, vocab_start,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        **transform_args(transform),
        HAS_BIAS=bias is not None, NEED_MEAN=need_mean_logit,
        **dot_switches(hidden.dtype), **config,
    )
    return VocabStats(out[0], out[1], out[2], out[3], out[4] if need_mean_logit else None)
