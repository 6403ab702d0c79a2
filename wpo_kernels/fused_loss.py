"""WPO end to end from hidden states: fused per-token kernels → per-sequence log-probs and weights → loss.

For the common layout where the batch is ``[chosen; rejected]`` concatenated along the first dimension
(as TRL's ``DPOTrainer`` and Liger's ``LigerFusedLinearDPOLoss`` lay it out). The ``[N, V]`` logits are
never materialised, forward or backward.

On the torch fallback (CPU) a paired loss with gradients runs in one GEMM pass
(:mod:`wpo_kernels.fallback_step`): each pair's gradient is formed while its logits are in hand, and the
loss's backward only scales it (:class:`LossWithGradients`). Elsewhere (Triton, KTO, no gradient) the
per-token log-probs come from :func:`fused_linear_logprobs` and autograd does the rest.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from wpo_kernels.autograd import BACKENDS, Backend, autocast_disabled, first_order_backward
from wpo_kernels.fallback_step import one_pass_pair_step
from wpo_kernels.linear_logprobs import (
    checked_backend,
    fused_linear_logprobs,
    int64_targets,
    needs_autograd,
    validate_inputs,
)
from wpo_kernels.losses import _NEEDS_REF, WPOLossOutput, check_loss_options, wpo_loss
from wpo_kernels.types import LogitTransform
from wpo_kernels.weights import Alignment, parse_alignment, wpo_weights

#: The per-token statistic each alignment needs from the kernel, besides ``logprobs``.
_ALIGNMENT_OUTPUT = {
    Alignment.NONE: (),
    Alignment.GREEDY: ("log_max_prob",),
    Alignment.SAMPLED: ("log_sum_sq_probs",),
}


def _check_layout(hidden: Tensor, targets: Tensor) -> int:
    """Half the batch size (``B``) of a ``[chosen; rejected]`` batch; errors name the argument."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if targets.dim() != 2:
        raise ValueError(f"targets must have shape [2B, T] ([chosen; rejected]), got {tuple(targets.shape)}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [2B, T, H] ([chosen; rejected]), got {tuple(hidden.shape)}")
    if targets.shape[0] % 2:
        raise ValueError(
            f"targets must hold an even number of sequences ([chosen; rejected] concatenated), "
            f"got {targets.shape[0]}"
        )
    return targets.shape[0] // 2


def _halves(x: Tensor, half: int) -> tuple[Tensor, Tensor]:
    """``(x[:B], x[B:])``, also for ``B = 0`` (where ``split`` would give a single chunk)."""
    return x[:half], x[half:]


def fused_linear_wpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    alignment: Alignment | str = "sampled",
    clamp_max: float | None = None,
    loss_type: str = "sigmoid",
    variant: str = "wpo",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    kto_kl: Tensor | float | None = None,
    backend: Backend = "auto",
) -> WPOLossOutput:
    """WPO loss straight from the LM head's input: one fused policy call gives the per-token log-probs
    and the alignment statistic; their per-sequence sums and :func:`wpo_weights` feed :func:`wpo_loss`.

    The reference log-probabilities are either passed in (``ref_chosen_logps``/``ref_rejected_logps``,
    e.g. precomputed) or computed here by a forward-only fused call (under ``no_grad``, nothing saved) on
    the reference head ``ref_weight``/``ref_bias`` applied to ``ref_hidden`` (the reference model's last
    hidden states; defaults to ``hidden``, i.e. a reference that shares the backbone). ``"simpo"`` needs
    neither. Gradients flow only through the policy log-probabilities: the weights and the reference
    are constants.

    Args:
        hidden: ``[2B, T, H]``, the chosen sequences then the rejected ones (row ``i`` and ``B + i`` form
            pair ``i``), already shifted so that position ``t`` predicts ``targets[:, t]``.
        weight: ``[V, H]`` policy LM head; bias: ``[V]`` or None.
        targets: ``[2B, T]`` integer, ``ignore_index`` at prompt and padding positions.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` summed reference log-probs, or None.
        ref_hidden, ref_weight, ref_bias: the reference head, used when the ref log-probs are not given.
        temperature, softcap, logit_scale: the logit transform (see :func:`fused_linear_logprobs`); the
            same for policy, reference and weights.
        alignment, clamp_max: as in :func:`wpo_weights`.
        loss_type, variant, beta, label_smoothing, simpo_gamma, kto_kl: as in :func:`wpo_loss`.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        :class:`WPOLossOutput` (0-d ``loss``, detached metrics).

    Example:
        >>> out = fused_linear_wpo_loss(h, lm_head.weight, labels, ref_c, ref_r, beta=0.01)
        >>> out.loss.backward()
    """
    loss_type, variant, beta, label_smoothing, simpo_gamma = check_loss_options(
        loss_type, variant, beta, label_smoothing, simpo_gamma, kto_kl
    )
    align = parse_alignment(alignment)
    half = _check_layout(hidden, targets)
    targets = int64_targets(targets)  # before `targets != ignore_index`: a uint8 156 would equal -100
    transform = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)

    given = (ref_chosen_logps is not None, ref_rejected_logps is not None)
    if given[0] != given[1]:
        raise ValueError(
            "ref_chosen_logps and ref_rejected_logps must be given together, got "
            f"ref_chosen_logps={'a tensor' if given[0] else None}, "
            f"ref_rejected_logps={'a tensor' if given[1] else None}"
        )
    if all(given) and ref_weight is not None:
        raise ValueError("pass either ref_chosen_logps/ref_rejected_logps or ref_weight, got both")
    if ref_weight is None and (ref_hidden is not None or ref_bias is not None):
        raise ValueError("ref_hidden/ref_bias need ref_weight (the reference head), got ref_weight=None")
    if loss_type in _NEEDS_REF and not all(given) and ref_weight is None:
        raise ValueError(
            f"loss_type={loss_type!r} needs the reference: pass ref_chosen_logps and ref_rejected_logps, "
            "or ref_weight (and ref_hidden), got none of them"
        )

    if ref_weight is not None and loss_type in _NEEDS_REF:
        ref_input = hidden if ref_hidden is None else ref_hidden
        with torch.no_grad():
            ref = fused_linear_logprobs(
                ref_input.detach(),
                ref_weight.detach(),
                targets,
                bias=None if ref_bias is None else ref_bias.detach(),
                ignore_index=ignore_index,
                backend=backend,
                **transform,
            )
        ref_chosen_logps, ref_rejected_logps = _halves(ref.logprobs.sum(dim=-1), half)

    mask = targets != ignore_index
    lengths = mask.sum(dim=-1)
    statistic_name = _ALIGNMENT_OUTPUT[align][0] if _ALIGNMENT_OUTPUT[align] else None

    def weights_of(logprobs: Tensor, statistic: Tensor | None, seq_mask: Tensor) -> Tensor:
        stats = {"log_max_prob": None, "log_sum_sq_probs": None}
        if statistic_name is not None:
            stats[statistic_name] = statistic
        return wpo_weights(
            logprobs, stats["log_max_prob"], stats["log_sum_sq_probs"], seq_mask, align, clamp_max=clamp_max
        )

    def loss_of(
        logps: Tensor,
        weights: Tensor,
        seq_lengths: Tensor,
        ref_c: Tensor | None,
        ref_r: Tensor | None,
        metrics: bool = True,
    ) -> WPOLossOutput:
        """The loss of ``[chosen; rejected]`` per-sequence log-probs ``logps`` and weights ``[2P]``."""
        pairs = logps.shape[0] // 2
        chosen_lengths, rejected_lengths = _halves(seq_lengths, pairs)
        return wpo_loss(
            *_halves(logps, pairs),
            ref_c,
            ref_r,
            *_halves(weights, pairs),
            loss_type=loss_type,
            variant=variant,
            beta=beta,
            label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            kto_kl=kto_kl,
            metrics=metrics,
        )

    if (
        loss_type != "kto"
        and half > 0
        and needs_autograd(hidden, weight, bias)
        and checked_backend(backend, hidden) == "torch"
    ):
        # the torch fallback: the gradient is formed while each block's logits are in hand
        step_transform = LogitTransform(**transform)
        validate_inputs(hidden, weight, targets, bias, ignore_index=ignore_index, transform=step_transform)

        whole_batch: list[WPOLossOutput] = []  # the loss, when one group of pairs was the whole batch

        def pair_coefficients(first: int, last: int, logprobs: Tensor, statistic: Tensor | None) -> Tensor:
            rows = [*range(first, last), *range(half + first, half + last)]
            seq_logps = logprobs.sum(dim=-1).requires_grad_()
            whole = (first, last) == (0, half)
            with warnings.catch_warnings():
                if not whole:
                    warnings.simplefilter("ignore", RuntimeWarning)  # the whole batch's weights warn below
                weights = weights_of(logprobs, statistic, mask[rows])
            with torch.enable_grad():
                out = loss_of(
                    seq_logps,
                    weights,
                    lengths[rows],
                    _pick(ref_chosen_logps, first, last),
                    _pick(ref_rejected_logps, first, last),
                    metrics=whole,
                )
            (grad,) = torch.autograd.grad(out.loss, seq_logps)
            if whole:
                whole_batch.append(WPOLossOutput(loss=out.loss.detach(), metrics=out.metrics))
            # L averages over the B pairs, this loss over these P
            return (grad * ((last - first) / half)).view(2, last - first)

        # the gradients are formed by hand in there; autocast off, as in fused_linear_logprobs
        with torch.no_grad(), autocast_disabled(hidden.device):
            step = one_pass_pair_step(
                hidden,
                weight,
                bias,
                targets,
                step_transform,
                ignore_index,
                statistic_name,
                pair_coefficients,
                need_grad=(
                    hidden.requires_grad,
                    weight.requires_grad,
                    bias is not None and bias.requires_grad,
                ),
            )
            out = whole_batch[0] if whole_batch else loss_of(
                step.logprobs.sum(dim=-1),
                weights_of(step.logprobs, step.statistic, mask),
                lengths,
                ref_chosen_logps,
                ref_rejected_logps,
            )
        loss = LossWithGradients.apply(
            out.loss, hidden, weight, bias, step.grad_hidden, step.grad_weight, step.grad_bias
        )
        return WPOLossOutput(loss=loss, metrics=out.metrics)

    policy = fused_linear_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        ignore_index=ignore_index,
        outputs=_ALIGNMENT_OUTPUT[align],
        backend=backend,
        **transform,
    )
    statistic = getattr(policy, statistic_name) if statistic_name is not None else None
    return loss_of(
        policy.logprobs.sum(dim=-1),
        weights_of(policy.logprobs, statistic, mask),
        lengths,
        ref_chosen_logps,
        ref_rejected_logps,
    )


def _pick(per_pair: Tensor | None, first: int, last: int) -> Tensor | None:
    """``per_pair[first:last]``, or None."""
    return None if per_pair is None else per_pair[first:last]


class LossWithGradients(torch.autograd.Function):
    """A loss whose input gradients were formed in its forward (:func:`one_pass_pair_step`): the backward
    only scales them by the upstream gradient and casts them to the inputs' dtypes."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss.clone()

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_loss: Tensor):
        unit = bool(grad_loss == 1)
        grads = tuple(
            None if g is None or not needed else (g if unit else g * grad_loss).to(dtype)
            for g, needed, dtype in zip(ctx.saved_tensors, ctx.needs_input_grad[1:4], ctx.dtypes, strict=True)
        )
        return (None, *grads, None, None, None)


class FusedLinearWPOLoss(nn.Module):
    """:func:`fused_linear_wpo_loss` as a module, in the style of Liger's ``LigerFusedLinearDPOLoss``:
    options at construction (validated there), tensors at call time.

    ``forward(lin_weight, hidden, targets, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
    ref_chosen_logps=None, ref_rejected_logps=None, kto_kl=None) -> WPOLossOutput`` with
    ``hidden [2B, T, H]`` and ``targets [2B, T]`` laid out ``[chosen; rejected]``.

    Example:
        >>> loss_fn = FusedLinearWPOLoss(beta=0.01, variant="wpo", alignment="sampled")
        >>> out = loss_fn(model.lm_head.weight, hidden, labels, ref_weight=ref_model.lm_head.weight,
        ...               ref_hidden=ref_hidden)
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        variant: str = "wpo",
        alignment: Alignment | str = "sampled",
        clamp_max: float | None = None,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        temperature: float = 1.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        check_loss_options(loss_type, variant, beta, label_smoothing, simpo_gamma)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.options = dict(
            ignore_index=ignore_index,
            beta=beta,
            loss_type=loss_type,
            variant=variant,
            alignment=parse_alignment(alignment),
            clamp_max=clamp_max,
            label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma,
            temperature=temperature,
            softcap=softcap,
            logit_scale=logit_scale,
            backend=backend,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    def forward(
        self,
        lin_weight: Tensor,
        hidden: Tensor,
        targets: Tensor,
        bias: Tensor | None = None,
        ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        kto_kl: Tensor | float | None = None,
    ) -> WPOLossOutput:
        """The loss for ``hidden [2B, T, H]`` / ``targets [2B, T]`` laid out ``[chosen; rejected]`` under the
        head ``lin_weight [V, H]`` (+ ``bias``); the reference as in :func:`fused_linear_wpo_loss`.

        Example:
            >>> out = loss_fn(lm_head.weight, hidden, labels, ref_chosen_logps=rc, ref_rejected_logps=rr)
        """
        return fused_linear_wpo_loss(
            hidden,
            lin_weight,
            targets,
            ref_chosen_logps,
            ref_rejected_logps,
            bias=bias,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            kto_kl=kto_kl,
            **self.options,
        )
