"""The autograd Function: dispatch to a backend, derive the outputs, save what the backward needs."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from wpo_kernels.fallback import keeps_logits, torch_linear_logprobs_backward, torch_vocab_stats
from wpo_kernels.kernels.backward import triton_linear_logprobs_backward
from wpo_kernels.kernels.forward import triton_vocab_stats
from wpo_kernels.kernels.logits_tile import interpreter_active
from wpo_kernels.types import LogitTransform, VocabStats

Backend = Literal["auto", "triton", "torch"]


def resolve_backend(backend: Backend, hidden: Tensor) -> Literal["triton", "torch"]:
    """``auto``: Triton for CUDA tensors and under ``TRITON_INTERPRET=1``, the chunked torch fallback
    otherwise (and always for float64, which the kernels do not take)."""
    if backend != "auto":
        return backend
    if hidden.dtype == torch.float64:
        return "torch"
    return "triton" if hidden.is_cuda or interpreter_active() else "torch"


def vocab_stats(
    backend: Literal["triton", "torch"],
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    transform: LogitTransform,
    *,
    vocab_start: int = 0,
    need_mean_logit: bool = False,
    kept_logits: list[Tensor] | None = None,
) -> VocabStats:
    """Raw per-token statistics (:class:`VocabStats`, ``[N]`` each) of ``weight``'s vocabulary slice
    starting at ``vocab_start``, from the chosen backend; hidden ``[N, H]``, weight ``[V, H]``.
    ``kept_logits`` (torch fallback only): a list that receives the logits chunks for the backward."""
    if backend == "torch":
        return torch_vocab_stats(
            hidden, weight, bias, targets, transform, vocab_start=vocab_start,
            need_mean_logit=need_mean_logit, kept_logits=kept_logits,
        )
    return triton_vocab_stats(
        hidden, weight, bias, targets, transform, vocab_start=vocab_start, need_mean_logit=need_mean_logit
    )


def linear_logprobs_backward(
    backend: Literal["triton", "torch"],
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    grad_logprobs: Tensor,
    transform: LogitTransform,
    *,
    vocab_start: int = 0,
    filter_eps: float | None = None,
    kept_logits: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """fp32 ``(dH, dW, db)``; ``filter_eps`` (gradient filtering) applies to the Triton kernel only, the
    torch fallback always computes the exact gradient (from ``kept_logits`` when the forward kept them)."""
    if backend == "torch":
        return torch_linear_logprobs_backward(
            hidden, weight, bias, targets, lse, grad_logprobs, transform,
            vocab_start=vocab_start, kept_logits=kept_logits,
        )
    return triton_linear_logprobs_backward(
        hidden, weight, bias, targets, lse, grad_logprobs, transform,
        vocab_start=vocab_start, filter_eps=filter_eps,
    )


def target_logprobs(stats: VocabStats, targets: Tensor, ignore_index: int) -> Tensor:
    """``z[target] - lse``, and exactly 0 at ignored positions."""
    return torch.where(targets == ignore_index, 0.0, stats.target_logit - stats.lse)


def finish_forward(
    ctx: Any,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    stats: VocabStats,
    ignore_index: int,
    need_mean_logit: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The end of every logprobs Function's forward: save the inputs and ``lse`` (nothing ``[N, V]``),
    mark the statistics non-differentiable and return ``(logprobs, max_logit, lse, lse2, mean_logit)``
    (``mean_logit`` empty unless requested)."""
    logprobs = target_logprobs(stats, targets, ignore_index)
    ctx.save_for_backward(hidden, weight, bias, targets, stats.lse)
    ctx.ignore_index = ignore_index
    mean_logit = stats.mean_logit if need_mean_logit else stats.lse.new_empty(0)
    ctx.mark_non_differentiable(stats.max_logit, stats.lse, stats.lse2, mean_logit)
    return logprobs, stats.max_logit, stats.lse, stats.lse2, mean_logit


def kept_token_grad(grad_logprobs: Tensor, targets: Tensor, ignore_index: int, dtype: torch.dtype) -> Tensor:
    """The upstream gradient with exact zeros at ignored tokens, contiguous, in the kernels' dtype."""
    return torch.where(targets == ignore_index, 0.0, grad_logprobs).to(dtype).contiguous()


def input_grads(
    ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, dh: Tensor, dw: Tensor, db: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """fp32 kernel gradients cast to the inputs' dtypes, None where no gradient was asked for."""
    return (
        dh.to(hidden.dtype) if ctx.needs_input_grad[0] else None,
        dw.to(weight.dtype) if ctx.needs_input_grad[1] else None,
        db.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None,
    )


class LinearLogprobsFunction(torch.autograd.Function):
    """``logprobs[i] = log softmax(transform(hidden @ weight.T + bias))[i, targets[i]]`` without the
    ``[N, V]`` logits. Returns ``(logprobs, max_logit, lse, lse2, mean_logit)`` (``mean_logit`` empty
    unless requested); only ``logprobs`` carries gradient. Saves the inputs and ``lse``, nothing
    ``[N, V]``."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        ignore_index: int,
        transform: LogitTransform,
        backend: Literal["triton", "torch"],
        need_mean_logit: bool,
        grad_filter_eps: float | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        # small problems on the fallback keep their logits: the backward then skips the recompute GEMM
        keep = backend == "torch" and keeps_logits(hidden.shape[0], weight.shape[0])
        ctx.kept_logits = [] if keep else None
        stats = vocab_stats(
            backend, hidden, weight, bias, targets, transform,
            need_mean_logit=need_mean_logit, kept_logits=ctx.kept_logits,
        )
        ctx.transform, ctx.backend, ctx.grad_filter_eps = transform, backend, grad_filter_eps
        return finish_forward(ctx, hidden, weight, bias, targets, stats, ignore_index, need_mean_logit)

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor, *unused: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grad = kept_token_grad(grad_logprobs, targets, ctx.ignore_index, lse.dtype)
        dh, dw, db = linear_logprobs_backward(
            ctx.backend, hidden, weight, bias, targets, lse, grad, ctx.transform,
            filter_eps=ctx.grad_filter_eps, kept_logits=ctx.kept_logits,
        )
        return (*input_grads(ctx, hidden, weight, bias, dh, dw, db), None, None, None, None, None, None)
