"""The paired training step on the Triton backend, at three GEMMs per kept token (design (b) of
``../shared/HOPPER_REVIEW.md`` §3).

A paired loss's gradient with respect to a token's log-prob is its pair's coefficient ``c`` (one per
sequence), and ``c`` needs only the pair's own statistics. So for each chunk of whole pairs
(``launch_plan.step_plan``; kept tokens only, pair after pair):

1. **logits**: ``L = H_rows @ Wᵀ`` by cuBLAS into a reused ``[R, V]`` buffer in the parameter dtype;
2. **row statistics**: :func:`_row_stats_kernel` reads each row once with the full logit transform (bias,
   ``logit_scale``, softcap, temperature) and writes its log-prob, alignment statistic and log-sum-exp;
3. **pair coefficients**: one loss evaluation over the chunk's pairs (the caller's
   :data:`~wpo_kernels.pair_layout.PairCoefficients`);
4. **logit gradient**: :func:`_logit_grad_kernel` overwrites ``L`` with
   ``D = c·(onehot(y) − softmax(z))·dz/dl`` (softcap derivative included). The chunk holds whole pairs,
   so ``c`` is known here and folded into ``D``: neither GEMM needs a row-scaling pass;
5. **dH / dW**: ``dH_rows = D @ W`` and ``dW += Dᵀ H_rows`` by cuBLAS, chunk after chunk (``db += Σ_rows D``
   in fp32): a fixed order, no atomics, so the step is bitwise reproducible.

Chunks whose pairs do not fit the memory budget take the **recompute** route: today's forward statistics
kernel per slab, the coefficients, then today's backward (``dW`` accumulated into the same gradient).

Rounding: the logits are rounded once to the parameter dtype before the statistics (as a model's own
``[B, T, V]`` logits are), where the recompute route keeps them in fp32 registers; ``dW`` is rounded to
the parameter dtype once per chunk. In the interpreter (``TRITON_INTERPRET=1``) ``torch.matmul`` on CPU
stands in for cuBLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from wpo_kernels.kernels.backward import triton_linear_logprobs_backward
from wpo_kernels.kernels.forward import triton_vocab_stats
from wpo_kernels.kernels.launch_plan import (
    StepChunk,
    StepPlan,
    TileConfig,
    device_sm_count,
    step_plan,
)
from wpo_kernels.kernels.logits_tile import interpreter_active, tanh_from_exp2x, transform_args
from wpo_kernels.pair_layout import PairCoefficients, PairLayout, StepResult
from wpo_kernels.types import LogitTransform

#: One row per program, ``BLOCK_V`` columns per step (both kernels are memory bound: wide vector loads).
GPU_CONFIG = TileConfig(1, 2048, 1, num_warps=8, num_stages=1)
#: The interpreter's: small, so that test vocabularies take several column blocks.
INTERPRETER_CONFIG = TileConfig(1, 16, 1, num_warps=1, num_stages=1)
#: The alignment statistic the row-statistics kernel writes (its ``STATISTIC`` switch).
STATISTIC_CODES = {None: 0, "log_max_prob": 1, "log_sum_sq_probs": 2}


def step_config() -> TileConfig:
    """The kernels' tile: :data:`INTERPRETER_CONFIG` in the interpreter, else :data:`GPU_CONFIG`."""
    return INTERPRETER_CONFIG if interpreter_active() else GPU_CONFIG


@triton.jit
def _transformed(
    L_ptr,
    B_ptr,
    offs_v,
    mask_v,
    pre_scale,
    softcap,
    post_scale,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """``(z, dz_dl)`` of one row's columns ``offs_v`` of the raw logits at ``L_ptr`` (-inf past ``V``):
    the transform of ``logits_tile.logits_tile``, on logits read from memory."""
    l = tl.load(L_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    if HAS_BIAS:
        l += tl.load(B_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        t = tanh_from_exp2x(tl.exp(l * (2 * pre_scale / softcap)))
        z = t * (softcap * post_scale)
        dz_dl = (1 - t * t) * (pre_scale * post_scale)
    else:
        z = l * (pre_scale * post_scale)
        dz_dl = tl.full(l.shape, 1.0, tl.float32) * (pre_scale * post_scale)
    return tl.where(mask_v, z, float("-inf")), dz_dl


@triton.jit
def _row_stats_kernel(
    L_ptr,
    B_ptr,
    Y_ptr,
    ROWS_ptr,
    LOGP_ptr,
    STAT_ptr,
    LSE_ptr,
    V,
    stride_l,
    pre_scale,
    softcap,
    post_scale,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    STATISTIC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Row ``r`` of a logits chunk: ``logp = z_y − lse`` and the alignment statistic (``max − lse``, or
    ``lse2 − 2·lse``) at the row's batch position ``ROWS[r]``; ``lse`` at ``r``."""
    r = tl.program_id(0)
    row = L_ptr + r.to(tl.int64) * stride_l
    y = tl.load(Y_ptr + r)
    m = float("-inf")  # the row's running max; the per-lane sums are measured from it
    s1 = tl.zeros((BLOCK_V,), tl.float32)
    s2 = tl.zeros((BLOCK_V,), tl.float32)
    z_y = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        z, _ = _transformed(
            row, B_ptr, offs_v, offs_v < V, pre_scale, softcap, post_scale, HAS_BIAS, HAS_SOFTCAP
        )
        z_y += tl.where(offs_v == y, z, 0.0)
        # online rescale (one exp per block); a row that has seen only -inf is shifted by 0
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        e = tl.exp(z - shift)
        s1 = s1 * alpha + e
        s2 = s2 * (alpha * alpha) + e * e
        m = m_new
    shift = tl.where(m == float("-inf"), 0.0, m)
    lse = shift + tl.log(tl.sum(s1, axis=0))
    out = tl.load(ROWS_ptr + r)
    tl.store(LOGP_ptr + out, tl.sum(z_y, axis=0) - lse)
    if STATISTIC == 1:
        tl.store(STAT_ptr + out, m - lse)
    if STATISTIC == 2:
        tl.store(STAT_ptr + out, 2 * shift + tl.log(tl.sum(s2, axis=0)) - 2 * lse)
    tl.store(LSE_ptr + r, lse)


@triton.jit
def _logit_grad_kernel(
    L_ptr,
    B_ptr,
    Y_ptr,
    LSE_ptr,
    G_ptr,
    V,
    stride_l,
    pre_scale,
    softcap,
    post_scale,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Columns block ``pid(1)`` of row ``pid(0)``: ``L ← g·(onehot(y) − exp(z − lse))·dz/dl``, in place."""
    r = tl.program_id(0)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    row = L_ptr + r.to(tl.int64) * stride_l
    z, dz_dl = _transformed(row, B_ptr, offs_v, mask_v, pre_scale, softcap, post_scale, HAS_BIAS, HAS_SOFTCAP)
    p = tl.exp(z - tl.load(LSE_ptr + r))
    onehot = (offs_v == tl.load(Y_ptr + r)).to(tl.float32)
    d = tl.load(G_ptr + r) * (onehot - p) * dz_dl
    tl.store(row + offs_v, d.to(L_ptr.dtype.element_ty), mask=mask_v)


def launch_row_stats(
    logits: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    rows: Tensor,
    logprobs: Tensor,
    stat: Tensor | None,
    statistic: str | None,
    lse: Tensor,
    transform: LogitTransform,
) -> None:
    """Stage 2: :func:`_row_stats_kernel` over ``logits [n, V]`` (row stride ``logits.stride(0)``, unit
    column stride); ``targets [n]`` int64; writes ``logprobs[rows]`` (and ``stat[rows]``) of the flat
    ``[2B·T]`` outputs and ``lse [n]`` fp32."""
    n, v = logits.shape
    config = step_config()
    _row_stats_kernel[(n,)](
        logits,
        logits if bias is None else bias,
        targets,
        rows,
        logprobs,
        logprobs if stat is None else stat,
        lse,
        v,
        logits.stride(0),
        **transform_args(transform),
        HAS_BIAS=bias is not None,
        STATISTIC=STATISTIC_CODES[statistic],
        BLOCK_V=config.block_v,
        num_warps=config.num_warps,
    )


def launch_logit_grad(
    logits: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    coefficient: Tensor,
    transform: LogitTransform,
) -> None:
    """Stage 4: :func:`_logit_grad_kernel` turns ``logits [n, V]`` into ``D`` in place (``coefficient [n]``
    fp32 per row)."""
    n, v = logits.shape
    config = step_config()
    _logit_grad_kernel[(n, triton.cdiv(v, config.block_v))](
        logits,
        logits if bias is None else bias,
        targets,
        lse,
        coefficient,
        v,
        logits.stride(0),
        **transform_args(transform),
        HAS_BIAS=bias is not None,
        BLOCK_V=config.block_v,
        num_warps=config.num_warps,
    )


@dataclass
class _Step:
    """One step's inputs, outputs and workspace (``buffers``: the plan's, by name)."""

    plan: StepPlan
    layout: PairLayout
    hidden: Tensor  # [2B·T, H]
    weight: Tensor
    bias: Tensor | None
    targets: Tensor  # [2B·T] int64
    row_sequence: Tensor  # [K]: each kept token's batch row (for its coefficient)
    transform: LogitTransform
    statistic: str | None
    pair_coefficients: PairCoefficients
    buffers: dict[str, Tensor]
    logprobs: Tensor  # [2B·T] fp32
    stat: Tensor | None
    dh: Tensor | None  # [2B·T, H]
    dw: Tensor | None
    db: Tensor | None  # the parameter dtype (returned)
    db_acc: Tensor | None  # where db accumulates (fp32)
    filled: bool = False  # whether dW / db hold a partial sum yet

    def coefficients(self, chunk: StepChunk, start: int, stop: int, out: Tensor) -> Tensor:
        """Stage 3, once per chunk (at its first rows): the chunk's pairs' coefficients, into the
        per-sequence buffer; returns those of kept tokens ``[start, stop)`` gathered into ``out``."""
        first, last = chunk.first_pair, chunk.last_pair
        sequence = self.buffers["sequence_coefficient"].view(2, -1)
        if start == chunk.start:
            n_seq = 2 * self.layout.n_pairs
            stat = None if self.stat is None else self.stat.view(n_seq, -1)
            sequence[:, first:last].copy_(
                self.pair_coefficients(first, last, self.logprobs.view(n_seq, -1), stat)
            )
        return torch.index_select(
            sequence.view(-1), 0, self.row_sequence[start:stop], out=out[: stop - start]
        )

    def accumulate(self, d: Tensor, h_rows: Tensor) -> None:
        """Stage 5's weight and bias gradients: ``dW += Dᵀ H_rows``, ``db += Σ_rows D`` (fp32)."""
        if self.dw is not None:
            torch.mm(d.T, h_rows, out=self.dw) if not self.filled else self.dw.addmm_(d.T, h_rows)
        if self.db_acc is not None:
            if not self.filled:
                torch.sum(d, 0, dtype=torch.float32, out=self.db_acc)
            else:
                chunk = self.buffers["grad_bias_chunk"]
                torch.sum(d, 0, dtype=torch.float32, out=chunk)
                self.db_acc.add_(chunk)
        self.filled = True


def one_pass_chunk(step: _Step, chunk: StepChunk) -> None:
    """A chunk of whole pairs on the one-pass route: stages 1–5 with three GEMMs."""
    rows, buffers = chunk.rows, step.buffers
    kept = step.layout.kept_rows[chunk.start : chunk.stop]
    h_rows = torch.index_select(step.hidden, 0, kept, out=buffers["hidden_rows"][:rows])
    y = torch.index_select(step.targets, 0, kept, out=buffers["row_targets"][:rows])
    # a contiguous [rows, V] block at the buffer's start (CPU half-precision GEMMs misread padded views)
    logits = buffers["logits"].view(-1)[: rows * step.plan.v].view(rows, step.plan.v)
    torch.mm(h_rows, step.weight.T, out=logits)  # stage 1
    lse = buffers["row_lse"][:rows]
    launch_row_stats(
        logits, step.bias, y, kept, step.logprobs, step.stat, step.statistic, lse, step.transform
    )
    coefficient = step.coefficients(chunk, chunk.start, chunk.stop, buffers["row_coefficient"])
    launch_logit_grad(logits, step.bias, y, lse, coefficient, step.transform)
    if step.dh is not None:
        step.dh.index_copy_(0, kept, torch.mm(logits, step.weight, out=buffers["grad_hidden_rows"][:rows]))
    step.accumulate(logits, h_rows)


def recompute_chunk(step: _Step, chunk: StepChunk, recompute: dict) -> None:
    """A chunk whose pairs do not fit the budget: the forward statistics kernel slab by slab, the
    coefficients, then the recompute backward slab by slab, ``dW`` / ``db`` accumulated in place."""
    buffers, chunk_lse = step.buffers, step.buffers["recompute_lse"]
    for start, stop in chunk.slabs():
        kept, h_rows, y = _recompute_rows(step, start, stop)
        fwd, _ = recompute[stop - start]
        stats = triton_vocab_stats(h_rows, step.weight, step.bias, y, step.transform, plan=fwd)
        step.logprobs.index_copy_(0, kept, stats.target_logit.sub_(stats.lse))
        if step.statistic == "log_max_prob":
            step.stat.index_copy_(0, kept, stats.max_logit.sub_(stats.lse))
        elif step.statistic == "log_sum_sq_probs":
            step.stat.index_copy_(0, kept, stats.lse2.sub_(stats.lse, alpha=2))
        chunk_lse[start - chunk.start : stop - chunk.start].copy_(stats.lse)
    if not step.filled:
        for total in (step.dw, step.db_acc):
            if total is not None:
                total.zero_()
        step.filled = True
    for start, stop in chunk.slabs():
        kept, h_rows, y = _recompute_rows(step, start, stop)
        coefficient = step.coefficients(chunk, start, stop, buffers["recompute_coefficient"])
        _, bwd = recompute[stop - start]
        dh, _, _ = triton_linear_logprobs_backward(
            h_rows,
            step.weight,
            step.bias,
            y,
            chunk_lse[start - chunk.start : stop - chunk.start],
            coefficient,
            step.transform,
            need_grad_hidden=step.dh is not None,
            need_grad_weight=step.dw is not None,
            plan=bwd,
            grad_weight=step.dw,
            grad_bias=step.db_acc,
        )
        if step.dh is not None:
            step.dh.index_copy_(0, kept, dh)


def _recompute_rows(step: _Step, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
    """Kept tokens ``[start, stop)``: their batch rows, hidden rows and targets (gathered into buffers)."""
    kept = step.layout.kept_rows[start:stop]
    h_rows = torch.index_select(
        step.hidden, 0, kept, out=step.buffers["recompute_hidden_rows"][: stop - start]
    )
    y = torch.index_select(step.targets, 0, kept, out=step.buffers["recompute_targets"][: stop - start])
    return kept, h_rows, y


def plan_step(
    layout: PairLayout,
    weight: Tensor,
    bias: Tensor | None,
    transform: LogitTransform,
    memory_budget: int,
    need_grad: tuple[bool, bool, bool],
) -> StepPlan:
    """The :func:`launch_plan.step_plan` of a batch with this layout on these tensors."""
    return step_plan(
        layout.offsets,
        weight.shape[0],
        weight.shape[1],
        weight.dtype,
        memory_budget=memory_budget,
        has_bias=bias is not None,
        has_softcap=transform.softcap is not None,
        sm_count=device_sm_count(weight.device),
        interpreter=interpreter_active(),
        need_grad_hidden=need_grad[0],
        need_grad_weight=need_grad[1],
        need_grad_bias=need_grad[2] and bias is not None,
    )


def triton_pair_step(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    transform: LogitTransform,
    layout: PairLayout,
    plan: StepPlan,
    statistic: str | None,
    pair_coefficients: PairCoefficients,
) -> StepResult:
    """Per-token log-probs, the alignment statistic and the gradients of a paired loss, chunk by chunk.

    Args:
        hidden: ``[2B, T, H]`` fp16 / bf16 / fp32 (``[chosen; rejected]``); weight ``[V, H]``, bias
            ``[V]`` or None, of its dtype; targets ``[2B, T]`` int64.
        layout / plan: :func:`~wpo_kernels.pair_layout.pair_layout` of ``targets`` and its
            :func:`plan_step` (which gradients are wanted is the plan's).
        statistic / pair_coefficients: as in :func:`wpo_kernels.fallback_step.one_pass_pair_step`.

    Returns:
        :class:`~wpo_kernels.pair_layout.StepResult`, gradients in the parameters' dtype (``[2B, T, H]``,
        ``[V, H]``, ``[V]``; zero rows at ignored tokens), not yet multiplied by the upstream gradient.
    """
    step = _start(hidden, weight, bias, targets, transform, layout, plan, statistic, pair_coefficients)
    recompute = {fwd.n: (fwd, bwd) for fwd, bwd in plan.recompute}
    for chunk in plan.chunks:
        if chunk.rows == 0:
            continue
        if chunk.route == "one_pass":
            one_pass_chunk(step, chunk)
        else:
            recompute_chunk(step, chunk, recompute)
    if not step.filled:
        for total in (step.dw, step.db_acc):
            if total is not None:
                total.zero_()
    if step.db is not None and step.db_acc is not step.db:
        step.db.copy_(step.db_acc)
    n_seq, seq_len = 2 * layout.n_pairs, layout.seq_len
    return StepResult(
        step.logprobs.view(n_seq, seq_len),
        None if step.stat is None else step.stat.view(n_seq, seq_len),
        None if step.dh is None else step.dh.view(n_seq, seq_len, -1),
        step.dw,
        step.db,
    )


def _start(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    transform: LogitTransform,
    layout: PairLayout,
    plan: StepPlan,
    statistic: str | None,
    pair_coefficients: PairCoefficients,
) -> _Step:
    """Allocate the plan's buffers and the outputs."""
    n_seq, seq_len, width = hidden.shape
    device, dtype = hidden.device, hidden.dtype
    buffers = {b.name: b.empty(device) for b in plan.buffers}
    logprobs = torch.zeros(n_seq * seq_len, device=device, dtype=torch.float32)
    stat = torch.zeros_like(logprobs) if statistic is not None else None
    dh = torch.zeros((n_seq * seq_len, width), device=device, dtype=dtype) if plan.need_grad_hidden else None
    dw = torch.empty(weight.shape, device=device, dtype=dtype) if plan.need_grad_weight else None
    db = db_acc = None
    if plan.need_grad_bias:
        db = torch.empty(weight.shape[0], device=device, dtype=dtype)
        db_acc = buffers["grad_bias_fp32"] if dtype != torch.float32 else db
    return _Step(
        plan,
        layout,
        hidden.reshape(-1, width),
        weight,
        None if bias is None else bias.contiguous(),  # the kernels read it at unit stride
        targets.reshape(-1),
        layout.row_sequence,
        transform,
        statistic,
        pair_coefficients,
        buffers,
        logprobs,
        stat,
        dh,
        dw,
        db,
        db_acc,
    )
