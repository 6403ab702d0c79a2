"""The fused LM-head log-probabilities as ``torch.library`` custom ops, so that ``torch.compile`` traces
through them (``fullgraph=True``, no graph break) and autograd, ``torch.compile`` and the dispatcher see
one op per direction:

- ``wpo_kernels::linear_logprobs``: ``(hidden [N, H], weight [V, H], bias [V]?, targets [N])`` →
  ``(logprobs, max_logit, lse, lse2, mean_logit)``, each ``[N]`` (``mean_logit`` ``[0]`` unless
  requested), fp32 (fp64 for fp64 inputs); only ``logprobs`` is differentiable;
- ``wpo_kernels::linear_logprobs_backward``: ``(dH, dW, db)`` in the inputs' dtypes (``[0]`` where
  that gradient is not needed, ``db`` ``[0]`` without a bias).

Both run the backend chosen by :func:`wpo_kernels.autograd.resolve_backend` (the Triton kernels on CUDA
and in the interpreter, the chunked torch fallback otherwise); their fake implementations give the
output shapes without computing. The backward saves the inputs and ``lse`` only, nothing ``[N, V]``.
Double backward is refused with an error (:func:`wpo_kernels.autograd.first_order_backward`).
"""

from typing import Optional

import torch
from torch import Tensor

from wpo_kernels.autograd import (
    first_order_backward,
    kept_token_grad,
    linear_logprobs_backward,
    target_logprobs,
    vocab_stats,
)
from wpo_kernels.fallback import compute_dtype
from wpo_kernels.types import LogitTransform

# Annotations stay evaluated (no ``from __future__ import annotations``): torch.library reads the
# op schemas from them.


@torch.library.custom_op("wpo_kernels::linear_logprobs", mutates_args=())
def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045 - the schema inference reads typing.Optional
    targets: Tensor,
    ignore_index: int,
    logit_scale: float,
    softcap: Optional[float],  # noqa: UP045
    temperature: float,
    backend: str,
    need_mean_logit: bool,
    fp32_grad_accumulation: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(logprobs, max_logit, lse, lse2, mean_logit)``, each ``[N]``, for flat ``hidden [N, H]``,
    ``weight [V, H]``, ``bias [V]`` or None and ``targets [N]`` (validated by the caller). ``backend`` is
    ``"triton"`` or ``"torch"``; ``fp32_grad_accumulation`` is used by the backward only.

    Example:
        >>> logprobs, *stats = torch.ops.wpo_kernels.linear_logprobs(
        ...     h, w, None, y, -100, 1.0, None, 1.0, "torch", False, False)
    """
    transform = LogitTransform(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    stats = vocab_stats(backend, hidden, weight, bias, targets, transform, need_mean_logit=need_mean_logit)
    mean_logit = stats.mean_logit if need_mean_logit else stats.lse.new_empty(0)
    logprobs = target_logprobs(stats, targets, ignore_index)
    # a custom op's outputs may not alias each other; a backend may return views of one buffer ([N] each)
    return logprobs, *(t.clone() for t in (stats.max_logit, stats.lse, stats.lse2, mean_logit))


@linear_logprobs.register_fake
def _(
    hidden, weight, bias, targets, ignore_index, logit_scale, softcap, temperature, backend, need_mean_logit,
    fp32_grad_accumulation,
):
    n, dtype = hidden.shape[0], compute_dtype(hidden.dtype)
    per_token = [hidden.new_empty(n, dtype=dtype) for _ in range(4)]
    return (*per_token, hidden.new_empty(n if need_mean_logit else 0, dtype=dtype))


@torch.library.custom_op("wpo_kernels::linear_logprobs_backward", mutates_args=())
def linear_logprobs_grads(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
    targets: Tensor,
    lse: Tensor,
    grad_logprobs: Tensor,
    ignore_index: int,
    logit_scale: float,
    softcap: Optional[float],  # noqa: UP045
    temperature: float,
    backend: str,
    fp32_grad_accumulation: bool,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dH [N, H], dW [V, H], db [V])`` of ``Σ grad_logprobs · logprobs``, in the inputs' dtypes, each
    ``[0]`` where not needed (``db`` without a bias); ignored tokens contribute nothing."""
    transform = LogitTransform(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    grad = kept_token_grad(grad_logprobs, targets, ignore_index, lse.dtype)
    dh, dw, db = linear_logprobs_backward(
        backend, hidden, weight, bias, targets, lse, grad, transform,
        need_grad_hidden=need_grad_hidden, need_grad_weight=need_grad_weight,
        fp32_grad_accumulation=fp32_grad_accumulation,
    )
    # a custom op's outputs may not alias each other: a fresh empty tensor for each one not computed
    return (
        dh.to(hidden.dtype) if need_grad_hidden else hidden.new_empty(0),
        dw.to(weight.dtype) if need_grad_weight else hidden.new_empty(0),
        db.to(bias.dtype) if bias is not None else hidden.new_empty(0),
    )


@linear_logprobs_grads.register_fake
def _(
    hidden, weight, bias, targets, lse, grad_logprobs, ignore_index, logit_scale, softcap, temperature,
    backend, fp32_grad_accumulation, need_grad_hidden, need_grad_weight,
):
    return (
        torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_grad_weight else hidden.new_empty(0),
        torch.empty_like(bias) if bias is not None else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, ignore_index, logit_scale, softcap, temperature, backend, _, fp32 = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[2])
    ctx.options = (ignore_index, logit_scale, softcap, temperature, backend, fp32)
    ctx.mark_non_differentiable(*output[1:])


@first_order_backward
def _backward(ctx, grad_logprobs: Tensor, *unused: Tensor):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    wanted = ctx.needs_input_grad
    dh, dw, db = linear_logprobs_grads(
        hidden, weight, bias, targets, lse, grad_logprobs, *ctx.options, wanted[0], wanted[1]
    )
    return (
        dh if wanted[0] else None,
        dw if wanted[1] else None,
        db if bias is not None and wanted[2] else None,
        *(None,) * 8,
    )


linear_logprobs.register_autograd(_backward, setup_context=_setup_context)
