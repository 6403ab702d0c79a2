"""Small value types shared by every layer: the logit transform and the per-token outputs."""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor

#: Names accepted in ``fused_linear_logprobs(..., outputs=...)``; ``logprobs`` is always returned.
OUTPUT_NAMES: tuple[str, ...] = ("logprobs", "lse", "log_max_prob", "log_sum_sq_probs", "entropy")


@dataclass(frozen=True)
class LogitTransform:
    """``z = softcap * tanh(logit_scale * l / softcap) / temperature`` (tanh step only if softcap is set).

    ``l = hidden @ weight.T + bias`` are the raw head logits. This covers Cohere's ``logit_scale``,
    Granite's ``logits_scaling`` (``logit_scale = 1 / logits_scaling``), Gemma-2's
    ``final_logit_softcapping`` and sampling temperature.
    """

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    @property
    def post_scale(self) -> float:
        return 1.0 / self.temperature


@dataclass
class VocabStats:
    """Raw streaming reductions over (a slice of) the vocabulary, each ``[N]`` float32 (float64 for
    float64 inputs). Everything public is derived from these, and they combine across vocabulary
    shards with a max and log-sum-exps (see ``wpo_kernels.distributed``).

    - ``target_logit``: ``z[target]`` (0 where the target lies outside the slice or is ignored);
    - ``max_logit``: ``max_v z``;
    - ``lse``: ``logsumexp_v z``;
    - ``lse2``: ``logsumexp_v 2z``;
    - ``mean_logit``: ``sum_v softmax(z)_v z_v`` (softmax within the slice), only if entropy is wanted.
    """

    target_logit: Tensor
    max_logit: Tensor
    lse: Tensor
    lse2: Tensor
    mean_logit: Tensor | None


@dataclass
class LogprobOutput:
    """Per-token outputs of :func:`wpo_kernels.fused_linear_logprobs`, each ``[N]``.

    ``logprobs`` (log p of the target, 0 at ignored positions) is differentiable; the other fields are
    detached statistics and are None unless requested.
    """

    logprobs: Tensor
    lse: Tensor | None = None
    log_max_prob: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None
    entropy: Tensor | None = None

    def as_dict(self) -> dict[str, Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
