"""The kept tokens of a ``[chosen; rejected]`` batch laid out pair after pair: what both paired steps (the
torch fallback's, :mod:`wpo_kernels.fallback_step`, and the Triton one, :mod:`wpo_kernels.kernels.step`)
walk in chunks of whole pairs.

Sequence ``k`` of the pair-major order is chosen sequence ``k // 2`` (``k`` even) or rejected sequence
``k // 2`` (``k`` odd), i.e. row ``k // 2 + (k % 2)·B`` of the batch, and holds kept tokens
``[offsets[k], offsets[k + 1])``. Reading the per-sequence token counts is the step's one host read: the
chunks of whole pairs, and so the GEMM sizes, depend on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

#: ``(first, last, logprobs [2B, T], alignment statistic [2B, T] or None) -> coefficients [2, P]`` for
#: pairs ``[first, last)`` (``P = last - first``): the loss's gradient with respect to each kept token's
#: log-prob in each pair's chosen (row 0) and rejected (row 1) sequence. ``logprobs`` / the statistic are
#: the whole batch's (0 where not yet computed); only the rows of these pairs are read.
PairCoefficients = Callable[[int, int, Tensor, Tensor | None], Tensor]


@dataclass
class StepResult:
    """Per-token outputs (``[2B, T]``, 0 at ignored tokens) and the loss's input gradients (the Triton
    step: in the parameters' dtype; the fallback: fp32, fp64 for fp64 inputs; None where not asked for)."""

    logprobs: Tensor
    statistic: Tensor | None
    grad_hidden: Tensor | None
    grad_weight: Tensor | None
    grad_bias: Tensor | None


@dataclass(frozen=True)
class PairLayout:
    """Kept tokens pair after pair.

    - ``kept_rows [K]`` int64: each kept token's row in the flattened ``[2B·T]`` batch, pair-major;
    - ``seq_lengths [2B]`` int64: kept tokens per sequence, pair-major (on the targets' device);
    - ``offsets``: ``2B + 1`` host integers, the prefix sums of ``seq_lengths``;
    - ``row_sequence [K]`` int64: the batch row (``pair + side·B``) of each kept token's sequence.
    """

    n_pairs: int
    seq_len: int
    kept_rows: Tensor
    seq_lengths: Tensor
    offsets: list[int]
    row_sequence: Tensor

    @property
    def kept(self) -> int:
        """``K``, the number of kept tokens."""
        return self.offsets[-1]


def pair_layout(targets: Tensor, ignore_index: int) -> PairLayout:
    """The :class:`PairLayout` of ``targets [2B, T]`` (int64): one host read, the sequences' lengths."""
    n_seq, seq_len = targets.shape
    n_pairs = n_seq // 2
    pair_major = (targets != ignore_index).view(2, n_pairs, seq_len).transpose(0, 1)
    rows = torch.arange(n_seq * seq_len, device=targets.device).view(2, n_pairs, seq_len).transpose(0, 1)
    seq_lengths = pair_major.sum(-1).reshape(-1)
    offsets = [0]
    for length in seq_lengths.tolist():
        offsets.append(offsets[-1] + length)
    flat = pair_major.reshape(-1)
    # nonzero_static: the count is known from the lengths just read, so no second host read
    kept = torch.nonzero_static(flat, size=offsets[-1]).squeeze(1)
    k = torch.arange(n_seq, device=targets.device)
    row_sequence = torch.repeat_interleave(k // 2 + (k % 2) * n_pairs, seq_lengths, output_size=offsets[-1])
    return PairLayout(
        n_pairs, seq_len, rows.reshape(-1).index_select(0, kept), seq_lengths, offsets, row_sequence
    )
