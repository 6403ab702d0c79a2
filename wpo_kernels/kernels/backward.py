"""Backward: an atomics-free, deterministic schedule of one Triton kernel and cuBLAS GEMMs.

For each slab of tokens and chunk of the vocabulary (``launch_plan.backward_plan``), the grad-logits
kernel recomputes the logits tile and writes ``dZ = g·(onehot(y) − softmax(z))·dz/dl`` in the parameter
dtype; then ``dH_slab += dZ @ W_chunk``, ``dW_chunk += dZᵀ @ H_slab`` and ``db_chunk += Σ_rows dZ`` run
as ordinary GEMMs. Every output element is written by one program or summed by one GEMM in a fixed
order, so the gradients are bitwise reproducible; nothing ``[N, V]`` or fp32 ``[V, H]`` is held (unless
``fp32_grad_accumulation`` asks for the latter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wpo_kernels.kernels.launch_plan import (
    PassPlan,
    TileConfig,
    backward_plan,
    device_sm_count,
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
from wpo_kernels.types import LogitTransform

#: Autotune candidates on a GPU for the grad-logits kernel (one tile GEMM and an elementwise epilogue).
GPU_CONFIGS = (
    TileConfig(128, 128, 64, num_warps=8, num_stages=3),
    TileConfig(64, 256, 64, num_warps=8, num_stages=4),
    TileConfig(64, 128, 64, num_warps=4, num_stages=4),
)
#: The one config the interpreter runs.
INTERPRETER_CONFIG = TileConfig(32, 64, 32)


@triton.jit
def _grad_logits_kernel(
    H_ptr, W_ptr, B_ptr, T_ptr, LSE_ptr, G_ptr, DZ_ptr,
    N, V, D, vocab_start, N_BUCKET,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dzn,
    pre_scale, softcap, post_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # N_BUCKET is read only by the autotuner's key
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    dz_ptrs = DZ_ptr + offs_n.to(tl.int64)[:, None] * stride_dzn + offs_v[None, :]
    mask = mask_n[:, None] & mask_v[None, :]
    g = tl.load(G_ptr + offs_n, mask=mask_n, other=0.0)  # 0 at ignored tokens (set by the caller)
    if tl.max(tl.abs(g), axis=0) == 0:
        # every token of this row block is ignored (a prompt, padding): no recompute, the gradient is 0
        tl.store(dz_ptrs, tl.zeros((BLOCK_N, BLOCK_V), tl.float32).to(DZ_ptr.dtype.element_ty), mask=mask)
    else:
        z, dz_dl = logits_tile(
            H_ptr, W_ptr, B_ptr, offs_n, offs_v, mask_n, mask_v,
            D, stride_hn, stride_hd, stride_wv, stride_wd,
            pre_scale, softcap, post_scale,
            HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        y = tl.load(T_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64) - vocab_start
        lse = tl.load(LSE_ptr + offs_n, mask=mask_n, other=0.0)
        # d logp(y) / dz = onehot(y) - softmax(z), then through the transform to the raw logit
        p = tl.exp(z - lse[:, None])
        onehot = ((offs_v[None, :] == y[:, None]) & mask_v[None, :]).to(tl.float32)
        dl = g[:, None] * (onehot - p) * dz_dl
        tl.store(dz_ptrs, dl.to(DZ_ptr.dtype.element_ty), mask=mask)


_grad_logits_kernel_tuned = triton.autotune(
    configs=[triton.Config(c.kwargs(), num_warps=c.num_warps, num_stages=c.num_stages) for c in GPU_CONFIGS],
    key=["N_BUCKET", "V", "D", "HAS_BIAS", "HAS_SOFTCAP"],
    prune_configs_by={"early_config_prune": prune_to_launchable},
)(_grad_logits_kernel)


def plan_for(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    transform: LogitTransform,
    *,
    need_grad_hidden: bool = True,
    need_grad_weight: bool = True,
    grad_hidden_fp32: bool = False,
    fp32_grad_accumulation: bool = False,
) -> PassPlan:
    """The :func:`launch_plan.backward_plan` of a call on these tensors."""
    return backward_plan(
        hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype,
        has_bias=bias is not None, has_softcap=transform.softcap is not None,
        sm_count=device_sm_count(hidden.device), interpreter=interpreter_active(),
        need_grad_hidden=need_grad_hidden, need_grad_weight=need_grad_weight,
        grad_hidden_fp32=grad_hidden_fp32, fp32_grad_accumulation=fp32_grad_accumulation,
    )


def _launch_grad_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logprobs: torch.Tensor,
    transform: LogitTransform,
    vocab_start: int,
    grad_logits: torch.Tensor,
    plan: PassPlan,
) -> None:
    """Write ``dZ [rows, cols]`` of one (slab, chunk) block into ``grad_logits`` (a row-major view)."""
    n, d = hidden.shape
    v = weight.shape[0]
    interpreting = interpreter_active()
    kernel = _grad_logits_kernel if interpreting else _grad_logits_kernel_tuned
    config = plan.launches[0].config.kwargs() if interpreting else {}

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(v, meta["BLOCK_V"]))

    kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, lse, grad_logprobs, grad_logits,
        n, v, d, vocab_start, n_bucket(plan.n),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), grad_logits.stride(0),
        **transform_args(transform),
        HAS_BIAS=bias is not None, **dot_switches(hidden.dtype), **config,
    )


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
    need_grad_hidden: bool = True,
    need_grad_weight: bool = True,
    grad_hidden_fp32: bool = False,
    fp32_grad_accumulation: bool = False,
    plan: PassPlan | None = None,
    grad_weight: torch.Tensor | None = None,
    grad_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_i grad_logprobs[i] * logprobs[i]`` w.r.t. hidden, weight and bias.

    hidden ``[N, H]``, weight ``[V, H]`` (fp16/bf16/fp32), bias ``[V]`` or None, targets ``[N]`` int,
    ``lse`` ``[N]`` the global log-sum-exp per token (fp32), ``grad_logprobs`` ``[N]`` fp32 with zeros at
    ignored tokens. Returns ``(dH [N, H], dW [V, H], db [V])`` in the parameters' dtypes (``dH`` in fp32
    with ``grad_hidden_fp32``); ``dH`` / ``dW`` are None unless ``need_grad_hidden`` /
    ``need_grad_weight``, ``db`` None without bias. ``fp32_grad_accumulation`` sums ``dW`` over token
    slabs in fp32 and rounds once (by default ``dW`` is rounded once per slab, ``cdiv(N, slab_rows)``
    times). ``plan`` defaults to :func:`plan_for` these tensors. ``grad_weight [V, H]`` (the parameter
    dtype) / ``grad_bias [V]`` (any float dtype), if given, receive ``+=`` the gradients instead of fresh
    tensors (the paired step's recompute route adds into its own; they are then returned).
    """
    hidden, weight = addressable_columns(hidden), addressable_columns(weight)
    n, h = hidden.shape
    v = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    plan = plan or plan_for(
        hidden, weight, bias, transform, need_grad_hidden=need_grad_hidden, need_grad_weight=need_grad_weight,
        grad_hidden_fp32=grad_hidden_fp32, fp32_grad_accumulation=fp32_grad_accumulation,
    )
    dw, db = grad_weight, grad_bias
    if dw is None and need_grad_weight:
        dw = torch.empty((v, h), device=device, dtype=dtype)
    if db is None and bias is not None:
        db = torch.empty((v,), device=device, dtype=dtype)
    dh_dtype = torch.float32 if grad_hidden_fp32 else dtype
    dh = torch.empty((n, h), device=device, dtype=dh_dtype) if need_grad_hidden else None
    buffers = {b.name: b.empty(device) for b in plan.buffers}
    grad_logits = buffers["grad_logits"]
    # where dW / db accumulate: the returned tensors, or their fp32 stand-ins
    dw_acc = buffers.get("grad_weight_fp32", dw)
    db_acc = buffers.get("grad_bias_fp32", db)
    if db_acc is not None and db_acc is not grad_bias:
        db_acc.zero_()
    if dw_acc is not None and dw_acc is not grad_weight and (n == 0 or dw_acc is not dw):
        dw_acc.zero_()
    nc, vc = plan.slab_rows, plan.chunk_cols
    for n0 in range(0, n, nc):
        rows = min(nc, n - n0)
        h_slab = hidden[n0 : n0 + rows]
        if dh is not None:
            # dH of this slab accumulates in fp32: in the returned tensor when it is fp32, else in a buffer
            dh_acc = dh[n0 : n0 + rows] if dh.dtype == torch.float32 else buffers["grad_hidden_slab"][:rows]
            dh_acc.zero_()
        for v0 in range(0, v, vc):
            cols = min(vc, v - v0)
            w_chunk = weight[v0 : v0 + cols]
            # a contiguous [rows, cols] block at the buffer's start (CPU bf16 GEMMs misread padded views)
            dz = grad_logits.view(-1)[: rows * cols].view(rows, cols)
            _launch_grad_logits(
                h_slab, w_chunk, bias[v0 : v0 + cols] if bias is not None else None,
                targets[n0 : n0 + rows], lse[n0 : n0 + rows], grad_logprobs[n0 : n0 + rows],
                transform, vocab_start + v0, dz, plan,
            )
            if dh is not None:
                if dz.dtype == torch.float32:
                    dh_acc.addmm_(dz, w_chunk)
                else:
                    # the chunk's product rounds once to the parameter dtype; the sum over chunks is fp32
                    chunk_product = buffers["grad_hidden_chunk"][:rows]
                    torch.mm(dz, w_chunk, out=chunk_product)
                    dh_acc.add_(chunk_product)
            if dw_acc is not None:
                if dw_acc.dtype != dz.dtype:
                    # exact accumulation: the slab's product rounds once, the sum over slabs is fp32
                    chunk_product = buffers["grad_weight_chunk"][:cols]
                    torch.mm(dz.T, h_slab, out=chunk_product)
                    dw_acc[v0 : v0 + cols].add_(chunk_product)
                elif n0 == 0 and grad_weight is None:
                    torch.mm(dz.T, h_slab, out=dw_acc[v0 : v0 + cols])
                else:
                    dw_acc[v0 : v0 + cols].addmm_(dz.T, h_slab)
            if db_acc is not None:
                bias_chunk = buffers["grad_bias_chunk"][:cols]
                torch.sum(dz, dim=0, dtype=torch.float32, out=bias_chunk)
                db_acc[v0 : v0 + cols].add_(bias_chunk)
        if dh is not None and dh.dtype != torch.float32:
            dh[n0 : n0 + rows].copy_(dh_acc)
    if dw is not None and dw_acc is not dw:
        dw.add_(dw_acc) if dw is grad_weight else dw.copy_(dw_acc)
    if db is not None and db_acc is not db:
        db.add_(db_acc) if db is grad_bias else db.copy_(db_acc)
    return dh, dw, db
