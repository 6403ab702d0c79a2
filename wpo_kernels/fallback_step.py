"""A paired preference-loss step on the torch fallback with the gradient formed while the logits are in hand.

The two-pass route (forward statistics, then a backward that recomputes every logit) costs four GEMMs per
logit: the forward, the recompute, ``dH`` and ``dW``. A paired loss ``L = mean_i[ω_i ℓ_i(π_w,i, π_l,i)]``
(ω detached) lets the step skip the recompute: pair ``i``'s gradient with respect to its per-token
log-probs is ``c_i`` on each kept token of its chosen sequence and ``c'_i`` on its rejected one, and
``(c_i, c'_i)`` depend on that pair's two sequences alone. The kept tokens are laid out pair after pair
and computed against the whole vocabulary in ``[R, V]`` blocks (``R·V`` ≤ one chunk, so every statistic
is exact in one go), with the unit-coefficient gradient ``dl = (onehot(y) − softmax(z)) · dz/dl``
formed in place of the block's logits:

- **pairs that fit in a block** go several to a block: the block's statistics give their coefficients at
  once, so ``dH = c ⊙ (dl @ W)`` and ``dW += dlᵀ (c ⊙ h)`` are formed with each row's coefficient;
- **a pair longer than a block** is walked one sequence at a time in blocks, giving its ``dH`` rows at
  unit coefficient and a per-sequence accumulator ``A = Σ dlᵀ h``; once both are done,
  ``dW += c·A_w + c'·A_l`` and its ``dH`` rows are scaled.

Tokens at ``ignore_index`` (prompt, padding) are never computed: their log-prob is 0 and their gradient
is 0. Three GEMMs per kept token-vocabulary pair. Extra memory: ``[R, V]`` blocks of one chunk in all,
the kept rows of ``hidden`` and ``dH``, an fp32 copy of a half-precision weight and, only if some pair is
longer than a block, two ``[V, H]`` accumulators (one while such a pair comes first, whose chosen side
accumulates straight into ``dW``). Computes in fp32 (fp64 for fp64 inputs), like the rest of the fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from wpo_kernels import fallback
from wpo_kernels.fallback import _logits_chunk, _transform_derivative, compute_dtype, fold_block
from wpo_kernels.types import LogitTransform

#: ``(first, last, logprobs [2P, T], alignment statistic [2P, T] or None) -> coefficients [2, P]`` for
#: pairs ``[first, last)`` (``P = last - first``; rows: their chosen sequences, then their rejected ones):
#: the loss's gradient with respect to each kept token's log-prob in each pair's chosen (row 0) and
#: rejected (row 1) sequence.
PairCoefficients = Callable[[int, int, Tensor, Tensor | None], Tensor]


@dataclass
class StepResult:
    """Per-token outputs (``[2B, T]``, 0 at ignored tokens) and the loss's input gradients (fp32, or
    fp64 for fp64 inputs; None where not asked for)."""

    logprobs: Tensor
    statistic: Tensor | None
    grad_hidden: Tensor | None
    grad_weight: Tensor | None
    grad_bias: Tensor | None


def rows_per_block(vocab: int, blocks: int) -> int:
    """Kept tokens per ``[R, V]`` logits block when ``blocks`` of them live at once (two with a softcap:
    the logits and their transform's derivative): ``block_elements() // (blocks · V)``, at least 1."""
    return max(1, fallback.block_elements() // (blocks * vocab))


def one_pass_pair_step(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    transform: LogitTransform,
    ignore_index: int,
    statistic: str | None,
    pair_coefficients: PairCoefficients,
    *,
    need_grad: tuple[bool, bool, bool],
) -> StepResult:
    """Per-token log-probs, the alignment statistic and the gradients of a paired loss in one GEMM pass.

    Args:
        hidden: ``[2B, T, H]``, chosen sequences then rejected ones (row ``i`` pairs with ``B + i``).
        weight: ``[V, H]``; bias: ``[V]`` or None (same dtype as ``hidden``).
        targets: ``[2B, T]`` integer, in ``[0, V)`` or ``ignore_index``.
        statistic: ``"log_sum_sq_probs"``, ``"log_max_prob"`` or None: the per-token statistic the
            weights need, passed to ``pair_coefficients`` and returned.
        pair_coefficients: see :data:`PairCoefficients`; called once per group of pairs, in order.
        need_grad: whether the gradients of ``(hidden, weight, bias)`` are wanted.

    Returns:
        :class:`StepResult`: ``logprobs``/``statistic`` ``[2B, T]``; ``grad_hidden [2B, T, H]``,
        ``grad_weight [V, H]``, ``grad_bias [V]`` of ``L`` (not yet multiplied by the upstream gradient).
    """
    n_seq, seq_len, width = hidden.shape
    vocab, n_pairs = weight.shape[0], n_seq // 2
    dtype = compute_dtype(hidden.dtype)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    # the kept tokens pair after pair (chosen i, then rejected i); sequence k of that order is row
    # k // 2 + (k % 2) * B of the batch and holds kept tokens [offsets[k], offsets[k + 1])
    pair_major = (targets != ignore_index).view(2, n_pairs, seq_len).transpose(0, 1)
    kept_rows = torch.arange(n_seq * seq_len).view(2, n_pairs, seq_len).transpose(0, 1)[pair_major]
    seq_lengths = pair_major.sum(-1).reshape(-1)
    offsets = [0]
    for length in seq_lengths.tolist():
        offsets.append(offsets[-1] + length)
    h = hidden.reshape(-1, width).index_select(0, kept_rows).to(dtype)  # [K, H]
    y = targets.reshape(-1).index_select(0, kept_rows).long()  # [K]
    logprobs = h.new_zeros(n_seq * seq_len)
    stat = h.new_zeros(n_seq * seq_len) if statistic is not None else None
    want_db = need_grad[2] and bias is not None
    dh = h.new_empty(h.shape) if need_grad[0] else None
    dw = h.new_empty((vocab, width)) if need_grad[1] else None
    db = h.new_empty(vocab) if want_db else None
    budget = rows_per_block(vocab, 1 if transform.softcap is None else 2)
    filled = False  # whether dw / db hold a partial sum yet

    def unit_grad(start: int, stop: int) -> Tensor:
        """Kept tokens ``[start, stop)`` against the vocabulary: their outputs written out, and ``dl``
        ``[stop - start, V]`` (in the logits' storage)."""
        yb = y[start:stop]
        z = _logits_chunk(h[start:stop], w, b, transform, 0, vocab)
        dz_dl = _transform_derivative(z, transform)
        fold, e = fold_block(z, yb, 0)
        stats = fold.stats()
        rows = kept_rows[start:stop]
        logprobs.index_copy_(0, rows, stats.target_logit - stats.lse)
        if statistic == "log_sum_sq_probs":
            stat.index_copy_(0, rows, stats.lse2 - 2 * stats.lse)
        elif statistic == "log_max_prob":
            stat.index_copy_(0, rows, stats.max_logit - stats.lse)
        # d logp(y) / dz = onehot(y) - softmax(z), then through the transform (all in place)
        dl = e.mul_(fold.sum_exp.reciprocal().neg_()[:, None])
        dl[torch.arange(stop - start), yb] += 1
        if not (isinstance(dz_dl, float) and dz_dl == 1.0):
            dl.mul_(dz_dl)
        return dl

    def coefficients_of(first: int, last: int) -> Tensor:
        """``[2P]`` for pairs ``[first, last)``, in the kept tokens' sequence order (c_0, c'_0, c_1, ...)."""
        seqs = [*range(first, last), *range(n_pairs + first, n_pairs + last)]
        coefficients = pair_coefficients(
            first,
            last,
            logprobs.view(n_seq, seq_len)[seqs],
            None if stat is None else stat.view(n_seq, seq_len)[seqs],
        )
        return coefficients.to(dtype).T.reshape(-1)

    def accumulate(acc_w: Tensor | None, acc_b: Tensor | None, dl: Tensor, rows: Tensor, fresh: bool) -> None:
        """``acc_w += dlᵀ rows`` and ``acc_b += Σ dl`` (overwritten instead when ``fresh``)."""
        if acc_w is not None:
            torch.mm(dl.T, rows, out=acc_w) if fresh else acc_w.addmm_(dl.T, rows)
        if acc_b is not None:
            torch.sum(dl, 0, out=acc_b) if fresh else acc_b.add_(dl.sum(0))

    def group(first: int, last: int) -> None:
        """Pairs ``[first, last)``, within one block: every coefficient is known before the GEMMs."""
        nonlocal filled
        start, stop = offsets[2 * first], offsets[2 * last]
        if start == stop:
            return
        dl = unit_grad(start, stop)
        lengths = seq_lengths[2 * first : 2 * last]
        row_coefficient = torch.repeat_interleave(coefficients_of(first, last), lengths)
        if dh is not None:
            torch.mm(dl, w, out=dh[start:stop]).mul_(row_coefficient[:, None])
        # scaling dl's rows instead: Σ_rows c_r dl_rᵀ h_r
        dl.mul_(row_coefficient[:, None])
        accumulate(dw, db, dl, h[start:stop], fresh=not filled)
        filled = True

    scratch: dict[int, tuple[Tensor | None, Tensor | None]] = {}

    def long_pair(pair: int) -> None:
        """A pair longer than a block: each sequence walked in blocks into an accumulator, scaled once the
        pair's coefficients are known."""
        nonlocal filled
        # until dw holds something, the chosen side accumulates straight into it
        chosen_into_total = not filled
        accumulators = []
        for side in (0, 1):
            if side == 0 and chosen_into_total:
                accumulators.append((dw, db))
                continue
            if side not in scratch:
                scratch[side] = tuple(None if t is None else torch.empty_like(t) for t in (dw, db))
            accumulators.append(scratch[side])
        for side, (acc_w, acc_b) in enumerate(accumulators):
            k = 2 * pair + side
            for start in range(offsets[k], offsets[k + 1], budget):
                stop = min(start + budget, offsets[k + 1])
                dl = unit_grad(start, stop)
                if dh is not None:
                    torch.mm(dl, w, out=dh[start:stop])
                accumulate(acc_w, acc_b, dl, h[start:stop], fresh=start == offsets[k])
        for side, coefficient in enumerate(coefficients_of(pair, pair + 1).tolist()):
            k = 2 * pair + side
            if dh is not None:
                dh[offsets[k] : offsets[k + 1]].mul_(coefficient)
            if offsets[k] == offsets[k + 1]:
                continue  # nothing was accumulated
            for total, acc in zip((dw, db), accumulators[side], strict=True):
                if total is None:
                    continue
                if acc is total:
                    total.mul_(coefficient)
                elif filled:
                    total.add_(acc, alpha=coefficient)
                else:
                    torch.mul(acc, coefficient, out=total)
            filled = True

    pair = 0
    while pair < n_pairs:
        last = pair + 1
        while last < n_pairs and offsets[2 * last + 2] - offsets[2 * pair] <= budget:
            last += 1
        if offsets[2 * last] - offsets[2 * pair] <= budget:
            group(pair, last)
        else:
            long_pair(pair)
        pair = last
    if not filled:
        for total in (dw, db):
            if total is not None:
                total.zero_()
    grad_hidden = None
    if dh is not None:
        grad_hidden = h.new_zeros((n_seq * seq_len, width)).index_copy_(0, kept_rows, dh)
        grad_hidden = grad_hidden.view(n_seq, seq_len, width)
    return StepResult(
        logprobs.view(n_seq, seq_len),
        None if stat is None else stat.view(n_seq, seq_len),
        grad_hidden,
        dw,
        db,
    )
