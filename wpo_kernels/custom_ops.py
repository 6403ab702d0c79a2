"""The fused LM-head log-probabilities as ``torch.library`` custom ops, so that ``torch.compile`` traces
through them (``fullgraph=True``, no graph break) and autograd, ``torch.compile`` and the dispatcher see
one op per direction:

- ``wpo_kernels::linear_logprobs``: ``(hidden [N, H], weight [V, H], bias [V]?, targets [N])`` →
  ``(logprobs, max_logit, lse, lse2, mean_logit, kept_exp, n_kept)``, each ``[N]`` (``mean_logit``
  ``[0]`` unless requested), fp32 (fp64 for fp64 inputs); only ``logprobs`` is differentiable.
  ``kept_exp`` is ``exp(z - max_logit)`` ``[N, V]`` when ``keep_exp`` (small problems on the torch
  fallback without a softcap, :func:`wpo_kernels.fallback.keeps_exp`: the backward then skips its
  recompute GEMM and every pass over the logits), else ``[0]``. ``n_kept``: a 0-d int64 tensor **on
  the CPU**, the number of tokens not at ``ignore_index`` (-1 on the torch fallback, which computes
  every row);
- ``wpo_kernels::linear_logprobs_backward``: ``(dH, dW, db)`` in the inputs' dtypes (``[0]`` where
  that gradient is not needed, ``db`` ``[0]`` without a bias).

Ignored rows on the Triton backend (the GPU routes): rows whose target is ``ignore_index`` are compacted
out before the kernels and GEMMs (their statistics are 0, their gradient rows 0). Sizing the compacted
GEMMs takes the kept-row count on the host: the forward reads it once (a device sync on CUDA) and hands
it to the backward in ``n_kept``, so a training step reads one number. Inside the custom op the read is
invisible to ``torch.compile`` (no graph break).

Both run the backend chosen by :func:`wpo_kernels.autograd.resolve_backend` (the Triton kernels on CUDA
and in the interpreter, the chunked torch fallback otherwise); their fake implementations give the
output shapes without computing. The backward saves the inputs, ``max_logit`` and ``lse`` (and
``kept_exp``, at most 32 MiB, when asked for), nothing else ``[N, V]``.
Double backward is refused with an error (:func:`wpo_kernels.autograd.first_order_backward`).
"""

from dataclasses import fields
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
from wpo_kernels.types import LogitTransform, VocabStats

# Annotations stay evaluated (no ``from __future__ import annotations``): torch.library reads the
# op schemas from them.


def _linear_logprobs(
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
    keep_exp: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(logprobs, max_logit, lse, lse2, mean_logit, kept_exp, n_kept)`` for flat ``hidden [N, H]``,
    ``weight [V, H]``, ``bias [V]`` or None and ``targets [N]`` (validated by the caller). ``backend`` is
    ``"triton"`` or ``"torch"``; ``fp32_grad_accumulation`` is used by the backward only; ``keep_exp``
    only with ``"torch"`` and no ``softcap``.

    Example:
        >>> logprobs, *stats = torch.ops.wpo_kernels.linear_logprobs(
        ...     h, w, None, y, -100, 1.0, None, 1.0, "torch", False, False, False)
    """
    transform = LogitTransform(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    kept = [] if keep_exp else None
    n_kept = count_kept(targets, ignore_index) if backend == "triton" else -1
    rows = kept_rows(targets, ignore_index, n_kept)
    if rows is None:
        stats = vocab_stats(
            backend, hidden, weight, bias, targets, transform, need_mean_logit=need_mean_logit, kept_exp=kept
        )
    else:  # the kept rows only, their statistics scattered back (0 at ignored rows)
        h, y = hidden.index_select(0, rows), targets.index_select(0, rows)
        stats = vocab_stats(backend, h, weight, bias, y, transform, need_mean_logit=need_mean_logit)
        n = len(targets)
        stats = VocabStats(*(None if t is None else _scattered(t, rows, n) for t in _fields(stats)))
    mean_logit = stats.mean_logit if need_mean_logit else stats.lse.new_empty(0)
    logprobs = target_logprobs(stats, targets, ignore_index)
    kept = kept[0] if kept else stats.lse.new_empty(0)
    # a custom op's outputs may not alias each other; the Triton path returns views of one buffer ([N] each)
    per_token = (stats.max_logit, stats.lse, stats.lse2, mean_logit)
    copy = backend == "triton" and rows is None
    return logprobs, *(t.clone() if copy else t for t in per_token), kept, torch.tensor(n_kept)


def count_kept(targets: Tensor, ignore_index: int) -> int:
    """The number of ``targets [N]`` not at ``ignore_index``: the one host read of a Triton call."""
    return int((targets != ignore_index).sum())


def kept_rows(targets: Tensor, ignore_index: int, n_kept: int) -> Tensor | None:
    """``[n_kept]`` int64, the rows of ``targets [N]`` not at ``ignore_index`` (no host read: the count
    is given); None when every row is kept (or ``n_kept`` < 0: not compacted)."""
    if n_kept < 0 or n_kept == len(targets):
        return None
    return torch.nonzero_static(targets != ignore_index, size=n_kept).squeeze(1)


def _fields(stats: VocabStats) -> list[Tensor | None]:
    return [getattr(stats, f.name) for f in fields(stats)]


def _scattered(values: Tensor, rows: Tensor, n: int, width: int | None = None) -> Tensor:
    """``values`` (``[K]`` or ``[K, width]``) at ``rows`` of a zero ``[n]`` / ``[n, width]`` tensor."""
    shape = (n,) if width is None else (n, width)
    return values.new_zeros(shape).index_copy_(0, rows, values)


linear_logprobs = torch.library.custom_op("wpo_kernels::linear_logprobs", mutates_args=())(_linear_logprobs)


@linear_logprobs.register_fake
def _(
    hidden, weight, bias, targets, ignore_index, logit_scale, softcap, temperature, backend, need_mean_logit,
    fp32_grad_accumulation, keep_exp,
):
    n, dtype = hidden.shape[0], compute_dtype(hidden.dtype)
    per_token = [hidden.new_empty(n, dtype=dtype) for _ in range(4)]
    kept = hidden.new_empty((n, weight.shape[0]) if keep_exp else (0,), dtype=dtype)
    mean_logit = hidden.new_empty(n if need_mean_logit else 0, dtype=dtype)
    return (*per_token, mean_logit, kept, torch.empty((), dtype=torch.int64, device="cpu"))


def _linear_logprobs_grads(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
    targets: Tensor,
    max_logit: Tensor,
    lse: Tensor,
    grad_logprobs: Tensor,
    kept_exp: Tensor,
    n_kept: Tensor,
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
    ``[0]`` where not needed (``db`` without a bias); ignored tokens contribute nothing. ``kept_exp``:
    the forward's ``exp(z - max_logit)`` ``[N, V]``, or ``[0]`` to recompute the logits; ``n_kept``: the
    forward's CPU count (the Triton path runs the kept rows only)."""
    transform = LogitTransform(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    grad = kept_token_grad(grad_logprobs, targets, ignore_index, lse.dtype)
    rows = kept_rows(targets, ignore_index, int(n_kept)) if backend == "triton" else None
    h = hidden
    if rows is not None:
        h, targets, lse, grad = (t.index_select(0, rows) for t in (hidden, targets, lse, grad))
    dh, dw, db = linear_logprobs_backward(
        backend, h, weight, bias, targets, lse, grad, transform,
        need_grad_hidden=need_grad_hidden, need_grad_weight=need_grad_weight,
        fp32_grad_accumulation=fp32_grad_accumulation,
        kept_exp=kept_exp if kept_exp.dim() == 2 else None,
        max_logit=max_logit,
    )
    if rows is not None and dh is not None:
        dh = _scattered(dh, rows, hidden.shape[0], hidden.shape[1])
    # a custom op's outputs may not alias each other: a fresh empty tensor for each one not computed
    return (
        dh.to(hidden.dtype) if need_grad_hidden else hidden.new_empty(0),
        dw.to(weight.dtype) if need_grad_weight else hidden.new_empty(0),
        db.to(bias.dtype) if bias is not None else hidden.new_empty(0),
    )


linear_logprobs_grads = torch.library.custom_op("wpo_kernels::linear_logprobs_backward", mutates_args=())(
    _linear_logprobs_grads
)


@linear_logprobs_grads.register_fake
def _(
    hidden, weight, bias, targets, max_logit, lse, grad_logprobs, kept_exp, n_kept, ignore_index, logit_scale,
    softcap, temperature, backend, fp32_grad_accumulation, need_grad_hidden, need_grad_weight,
):
    return (
        torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_grad_weight else hidden.new_empty(0),
        torch.empty_like(bias) if bias is not None else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, ignore_index, logit_scale, softcap, temperature, backend = inputs[:9]
    fp32 = inputs[10]
    ctx.save_for_backward(hidden, weight, bias, targets, output[1], output[2], output[5], output[6])
    ctx.options = (ignore_index, logit_scale, softcap, temperature, backend, fp32)
    ctx.mark_non_differentiable(*output[1:])
    # no zero gradients materialised for the non-differentiable outputs (kept_exp is [N, V])
    ctx.set_materialize_grads(False)


@first_order_backward
def _backward(ctx, grad_logprobs: Tensor, *unused: Tensor):
    if grad_logprobs is None:
        return (None,) * 12
    hidden, weight, bias, targets, max_logit, lse, kept_exp, n_kept = ctx.saved_tensors
    wanted = ctx.needs_input_grad
    grads = linear_logprobs_grads if torch.compiler.is_compiling() else _linear_logprobs_grads
    dh, dw, db = grads(
        hidden, weight, bias, targets, max_logit, lse, grad_logprobs, kept_exp, n_kept, *ctx.options,
        wanted[0], wanted[1],
    )
    return (
        dh if wanted[0] else None,
        dw if wanted[1] else None,
        db if bias is not None and wanted[2] else None,
        *(None,) * 9,
    )


linear_logprobs.register_autograd(_backward, setup_context=_setup_context)


class _EagerLinearLogprobs(torch.autograd.Function):
    """The op's forward, context and backward as a plain autograd Function, for eager calls: the same
    functions without the dispatcher's round trips (about 0.3 ms a call on the 2-core CPU machine, 4% of a
    Mistral-7B-head / 16 forward + backward at N = 512). ``torch.compile`` traces the custom op."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _linear_logprobs(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward)


def linear_logprobs_op(*args) -> tuple[Tensor, ...]:
    """``linear_logprobs(*args)`` with autograd: the custom op while ``torch.compile`` traces, else the
    same functions as :class:`_EagerLinearLogprobs`."""
    if torch.compiler.is_compiling():
        return linear_logprobs(*args)
    return _EagerLinearLogprobs.apply(*args)
