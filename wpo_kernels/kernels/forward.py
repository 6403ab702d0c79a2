"""Forward kernels: one pass of the LM-head GEMM, folding each logits tile into streaming vocabulary
statistics (max, Σe^z, Σe^2z, Σe^z·z, target logit) without writing it out.

The programs cover ``row blocks × vocabulary splits`` (see ``launch_plan.forward_plan``), so that small
batches still fill the GPU. With one split a program writes the final statistics; with several each
writes its partial ones to an fp32 workspace and :func:`_merge_vocab_stats_kernel` combines them in split
order, so the result does not depend on scheduling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wpo_kernels.kernels.launch_plan import (
    GROUP_ROWS,
    MERGE_BLOCK,
    PassPlan,
    TileConfig,
    device_sm_count,
    forward_plan,
    n_bucket,
    prune_to_launchable,
)
from wpo_kernels.kernels.logits_tile import (
    addressable_columns,
    dot_switches,
    interpreter_active,
    logits_tile,
    transform_args,
)
from wpo_kernels.types import LogitTransform, VocabStats

#: Autotune candidates on a GPU (BLOCK_* >= 16 for tensor-core ``tl.dot``): the configs of the old
#: kernel that compiled without spills for sm_90 (../shared/HOPPER_STATIC.md), largest BLOCK_N first.
GPU_CONFIGS = (
    TileConfig(128, 128, 64, num_warps=8, num_stages=3),
    TileConfig(64, 256, 64, num_warps=8, num_stages=4),
    TileConfig(64, 128, 64, num_warps=4, num_stages=4),
)
#: The one config the interpreter runs.
INTERPRETER_CONFIG = TileConfig(32, 64, 32)


@triton.jit
def _finish_stats(
    TGT_ptr, MAX_ptr, LSE_ptr, LSE2_ptr, MEAN_ptr, offs_n, mask_n, z_y, m, s1, s2, sz,
    NEED_MEAN: tl.constexpr,
):
    """Store the final statistics from running sums measured from the max ``m``."""
    tl.store(TGT_ptr + offs_n, z_y, mask=mask_n)
    tl.store(MAX_ptr + offs_n, m, mask=mask_n)
    tl.store(LSE_ptr + offs_n, m + tl.log(s1), mask=mask_n)
    tl.store(LSE2_ptr + offs_n, 2 * m + tl.log(s2), mask=mask_n)
    if NEED_MEAN:
        tl.store(MEAN_ptr + offs_n, sz / s1, mask=mask_n)


@triton.jit
def _vocab_stats_kernel(
    H_ptr, W_ptr, B_ptr, T_ptr, OUT_ptr,
    N, V, D, vocab_start, split_len, splits, group_rows, stride_out_stat, N_BUCKET,
    stride_hn, stride_hd, stride_wv, stride_wd,
    pre_scale, softcap, post_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_MEAN: tl.constexpr, PARTIAL: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # N_BUCKET is read only by the autotuner's key.
    # Grouped program order (launch_plan.KernelLaunch): group_rows row blocks × all splits per group,
    # rows fastest, so a wave of programs shares few hidden-state blocks and many weight tiles in L2.
    pid = tl.program_id(0)
    per_group = group_rows * splits
    first_row = (pid // per_group) * group_rows
    rows_here = tl.minimum(tl.cdiv(N, BLOCK_N) - first_row, group_rows)
    pid_n = first_row + (pid % per_group) % rows_here
    pid_s = (pid % per_group) // rows_here
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # target index inside this vocabulary slice (ignored / foreign targets never match a column)
    y = tl.load(T_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64) - vocab_start
    v_begin = pid_s * split_len
    v_end = tl.minimum(v_begin + split_len, V)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max of z
    s1 = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m)
    s2 = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(2(z - m))
    sz = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m) * z
    z_y = tl.zeros((BLOCK_N,), tl.float32)  # z[target]

    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z, _ = logits_tile(
            H_ptr, W_ptr, B_ptr, offs_n, offs_v, mask_n, mask_v,
            D, stride_hn, stride_hd, stride_wv, stride_wd,
            pre_scale, softcap, post_scale,
            HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        # the target column, if it lies in this tile (never a padding column past the split)
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

    # 64-bit row offsets: stat * stride_out_stat + split * N + n can pass 2^31 only for huge N, but cheaply
    offs_out = offs_n.to(tl.int64)
    if PARTIAL:
        # raw partial sums, measured from this split's own max (0-shifted where it is -inf), merged later
        base = OUT_ptr + pid_s.to(tl.int64) * N + offs_out
        tl.store(base, z_y, mask=mask_n)
        tl.store(base + stride_out_stat, m, mask=mask_n)
        tl.store(base + 2 * stride_out_stat, s1, mask=mask_n)
        tl.store(base + 3 * stride_out_stat, s2, mask=mask_n)
        if NEED_MEAN:
            tl.store(base + 4 * stride_out_stat, sz, mask=mask_n)
    else:
        _finish_stats(
            OUT_ptr, OUT_ptr + stride_out_stat, OUT_ptr + 2 * stride_out_stat, OUT_ptr + 3 * stride_out_stat,
            OUT_ptr + 4 * stride_out_stat, offs_out, mask_n, z_y, m, s1, s2, sz, NEED_MEAN,
        )


@triton.jit
def _merge_vocab_stats_kernel(
    PART_ptr, OUT_ptr, N, SPLITS, stride_part_stat, stride_out_stat,
    NEED_MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    """Combine ``[k, SPLITS, N]`` partial statistics into ``[k, N]`` final ones, splits in order."""
    offs_n = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask_n = offs_n < N
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    for s in range(0, SPLITS):
        m = tl.maximum(m, tl.load(PART_ptr + stride_part_stat + s * N + offs_n, mask=mask_n, other=0.0))
    # a token whose logits are all -inf in every split is measured from 0 (its sums are all 0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    z_y = tl.zeros((BLOCK,), tl.float32)
    s1 = tl.zeros((BLOCK,), tl.float32)
    s2 = tl.zeros((BLOCK,), tl.float32)
    sz = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, SPLITS):
        base = PART_ptr + s * N + offs_n
        m_s = tl.load(base + stride_part_stat, mask=mask_n, other=0.0)
        alpha = tl.exp(tl.where(m_s == float("-inf"), 0.0, m_s) - shift)
        z_y += tl.load(base, mask=mask_n, other=0.0)
        s1 += alpha * tl.load(base + 2 * stride_part_stat, mask=mask_n, other=0.0)
        s2 += alpha * alpha * tl.load(base + 3 * stride_part_stat, mask=mask_n, other=0.0)
        if NEED_MEAN:
            sz += alpha * tl.load(base + 4 * stride_part_stat, mask=mask_n, other=0.0)
    _finish_stats(
        OUT_ptr, OUT_ptr + stride_out_stat, OUT_ptr + 2 * stride_out_stat, OUT_ptr + 3 * stride_out_stat,
        OUT_ptr + 4 * stride_out_stat, offs_n, mask_n, z_y, m, s1, s2, sz, NEED_MEAN,
    )


_vocab_stats_kernel_tuned = triton.autotune(
    configs=[triton.Config(c.kwargs(), num_warps=c.num_warps, num_stages=c.num_stages) for c in GPU_CONFIGS],
    key=["N_BUCKET", "V", "D", "HAS_BIAS", "HAS_SOFTCAP", "NEED_MEAN", "PARTIAL"],
    prune_configs_by={"early_config_prune": prune_to_launchable},
)(_vocab_stats_kernel)


def plan_for(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transform: LogitTransform,
    need_mean_logit: bool,
) -> PassPlan:
    """The :func:`launch_plan.forward_plan` of a call on these tensors."""
    return forward_plan(
        hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype,
        has_bias=bias is not None, has_softcap=transform.softcap is not None, need_mean=need_mean_logit,
        sm_count=device_sm_count(hidden.device), interpreter=interpreter_active(),
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
    plan: PassPlan | None = None,
) -> VocabStats:
    """Launch the forward. hidden ``[N, H]``, weight ``[V, H]`` (fp16/bf16/fp32, any strides), bias
    ``[V]`` or None, targets ``[N]`` int (``vocab_start`` is the slice's first global row). ``plan``
    defaults to :func:`plan_for` these tensors. Returns :class:`VocabStats` of ``[N]`` fp32 tensors."""
    hidden, weight = addressable_columns(hidden), addressable_columns(weight)
    n, d = hidden.shape
    v = weight.shape[0]
    k = 5 if need_mean_logit else 4
    out = torch.empty((k, n), device=hidden.device, dtype=torch.float32)
    if n == 0:
        return VocabStats(*out[:4], out[4] if need_mean_logit else None)
    plan = plan or plan_for(hidden, weight, bias, transform, need_mean_logit)
    partial = plan.buffer("partial_stats")
    stats_out = partial.empty(hidden.device) if partial is not None else out
    interpreting = interpreter_active()
    kernel = _vocab_stats_kernel if interpreting else _vocab_stats_kernel_tuned
    launch = plan.launches[0]
    config = launch.config.kwargs() if interpreting else {}

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK_N"]) * plan.vocab_splits,)

    kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, stats_out,
        n, v, d, vocab_start, plan.split_len, plan.vocab_splits, GROUP_ROWS, stats_out.stride(0), n_bucket(n),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        **transform_args(transform),
        HAS_BIAS=bias is not None, NEED_MEAN=need_mean_logit, PARTIAL=partial is not None,
        **dot_switches(hidden.dtype), **config,
    )
    if partial is not None:
        _merge_vocab_stats_kernel[(triton.cdiv(n, MERGE_BLOCK),)](
            stats_out, out, n, plan.vocab_splits, stats_out.stride(0), out.stride(0),
            NEED_MEAN=need_mean_logit, BLOCK=MERGE_BLOCK,
        )
    return VocabStats(out[0], out[1], out[2], out[3], out[4] if need_mean_logit else None)
