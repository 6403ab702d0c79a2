"""The autograd Function: dispatch to a backend, derive the outputs, save what the backward needs."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from wpo_kernels.fallback import torch_linear_logprobs_backward, torch_vocab_stats
from wpo_kernels.kernels.backward import triton_linear_logprobs_backward
from wpo_kernels.kernels.forward import triton_vocab_stats
from wpo_kernels.kernels.logits_tile import interpreter_active
from wpo_kernels.types import LogitTransform, VocabStats

Backend = Literal["auto", "triton", "torch"]
#: The accepted ``backend`` names.
BACKENDS: tuple[str, ...] = get_args(Backend)


def autocast_disabled(device: torch.device) -> AbstractContextManager:
    """Autocast off on ``device`` for the kernels and the fallback, which choose their own precision
    (fp32 accumulation, fp64 for fp64 inputs): under an enclosing bf16 autocast the fallback's matmuls
    would otherwise run in bf16, and its backward would no longer match its forward."""
    if not torch.amp.is_autocast_available(device.type):
        return nullcontext()
    return torch.autocast(device.type, enabled=False)


def first_order_backward(backward: Callable[..., tuple]) -> Callable[..., tuple]:
    """Wrap a logprobs Function's ``backward``: refuse double backward with an error (the gradients are
    computed by kernels, not by differentiable torch ops, so a second-order term would be silently
    dropped), and run with autocast off like the forward."""

    @functools.wraps(backward)
    def wrapped(ctx: Any, grad_logprobs: Tensor, *grads: Tensor) -> tuple:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "wpo_kernels log-probs do not support double backward: their backward is not itself "
                "differentiable. Call backward / torch.autograd.grad without create_graph=True (for a "
                "gradient penalty, compute that term from wpo_kernels.reference instead)."
            )
        if grad_logprobs is None:  # nothing flowed into logprobs (grads not materialised)
            return backward(ctx, grad_logprobs, *grads)
        with autocast_disabled(grad_logprobs.device):
            return backward(ctx, grad_logprobs, *grads)

    return wrapped


def resolve_backend(backend: Backend, hidden: Tensor) -> Literal["triton", "torch"]:
    """``auto``: Triton for CUDA tensors and under ``TRITON_INTERPRET=1``, the chunked torch fallback
    otherwise (and always for float64, which the kernels do not take). fp32 CUDA tensors without tf32
    (``torch.backends.cuda.matmul.allow_tf32`` False, torch's default) take the torch path on cuBLAS
    even when ``"triton"`` is asked for: the kernels would run their GEMM on FMA units and spill."""
    if backend == "auto":
        if hidden.dtype == torch.float64:
            return "torch"
        backend = "triton" if hidden.is_cuda or interpreter_active() else "torch"
    if (
        backend == "triton"
        and hidden.is_cuda
        and hidden.dtype == torch.float32
        and not torch.backends.cuda.matmul.allow_tf32
    ):
        return "torch"
    return backend


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
    kept_exp: list[Tensor] | None = None,
) -> VocabStats:
    """Raw per-token statistics (:class:`VocabStats`, ``[N]`` each) of ``weight``'s vocabulary slice
    starting at ``vocab_start``, from the chosen backend; hidden ``[N, H]``, weight ``[V, H]``.
    ``kept_exp`` (torch fallback only, no softcap): a list that receives ``exp(z - max_logit)``
    ``[N, V]`` for the backward."""
    if backend == "torch":
        return torch_vocab_stats(
            hidden, weight, bias, targets, transform, vocab_start=vocab_start,
            need_mean_logit=need_mean_logit, kept_exp=kept_exp,
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
    need_grad_hidden: bool = True,
    need_grad_weight: bool = True,
    grad_hidden_fp32: bool = False,
    fp32_grad_accumulation: bool = False,
    kept_exp: Tensor | None = None,
    max_logit: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dH, dW, db)`` from the chosen backend: the Triton path returns them in the parameters' dtypes
    (``dH`` in fp32 with ``grad_hidden_fp32``; None where not needed), the torch fallback in its compute
    dtype (fp32, fp64 for fp64 inputs); :func:`input_grads` casts. ``fp32_grad_accumulation`` applies
    to the Triton path (the fallback always accumulates in fp32); ``kept_exp`` ``[N, V]`` (with the
    forward's ``max_logit``) to the fallback, which then skips its recompute GEMM."""
    if backend == "torch":
        return torch_linear_logprobs_backward(
            hidden, weight, bias, targets, lse, grad_logprobs, transform,
            vocab_start=vocab_start, kept_exp=kept_exp, max_logit=max_logit,
        )
    return triton_linear_logprobs_backward(
        hidden, weight, bias, targets, lse, grad_logprobs, transform,
        vocab_start=vocab_start, need_grad_hidden=need_grad_hidden, need_grad_weight=need_grad_weight,
        grad_hidden_fp32=grad_hidden_fp32, fp32_grad_accumulation=fp32_grad_accumulation,
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
    ctx: Any,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    dh: Tensor | None,
    dw: Tensor | None,
    db: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backend gradients cast to the inputs' dtypes (a no-op where they already match), None where no
    gradient was asked for."""
    return (
        dh.to(hidden.dtype) if ctx.needs_input_grad[0] else None,
        dw.to(weight.dtype) if ctx.needs_input_grad[1] else None,
        db.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None,
    )
