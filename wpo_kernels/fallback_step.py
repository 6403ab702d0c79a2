"""A paired preference-loss step on the torch fallback with the gradient formed while the logits are in hand.

The two-pass route (forward statistics, then a backward that recomputes every logit) costs four GEMMs per
logit: the forward, the recompute, ``dH`` and ``dW``. A paired loss ``L = mean_i[ω_i ℓ_i(π_w,i, π_l,i)]``
(ω detached) lets the step skip the recompute: pair ``i``'s gradient with respect to its per-token
log-probs is ``c_i`` on each kept token of its chosen sequence and ``c'_i`` on its rejected one, and
``(c_i, c'_i)`` depend on that pair's two sequences alone. So the pair's sequences are walked in blocks
of kept tokens against the whole vocabulary (``[R, V]``, ``R·V`` ≤ one chunk, so every statistic is
exact in one go); while a block's logits are in hand, the unit-coefficient gradient
``dl = (onehot(y) − softmax(z)) · dz/dl`` gives the block's ``dH`` rows (``dl @ W``) and is folded into a
per-sequence accumulator ``A = Σ dlᵀ h`` of the weight gradient. Once both sequences are done, the pair's
coefficients come from ``pair_coefficients`` and ``dW += c·A_w + c'·A_l``. Tokens at ``ignore_index``
(prompt, padding) are never computed: their log-prob is 0 and their gradient is 0.

Three GEMMs per kept token-vocabulary pair. Extra memory: ``[R, V]`` blocks of one chunk in all, the
kept rows of ``hidden`` and ``dH``, and two ``[V, H]`` accumulators (one while the first pair runs, whose
chosen side accumulates straight into ``dW``), and an fp32 copy of a half-precision weight. Computes in
fp32 (fp64 for fp64 inputs), like the rest of the fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from wpo_kernels import fallback
from wpo_kernels.fallback import _logits_chunk, _transform_derivative, compute_dtype, fold_block
from wpo_kernels.types import LogitTransform

#: ``(pair index, logprobs [2, T], alignment statistic [2, T] or None) -> (c_chosen, c_rejected)``: the
#: loss's gradient with respect to each kept token's log-prob in the pair's chosen and rejected sequence.
PairCoefficients = Callable[[int, Tensor, Tensor | None], tuple[float, float]]


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
        pair_coefficients: see :data:`PairCoefficients`; called once per pair, in order.
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
    kept = targets != ignore_index
    offsets = [0]
    for length in kept.sum(1).tolist():
        offsets.append(offsets[-1] + length)
    kept_rows = kept.reshape(-1).nonzero().squeeze(1)
    # the kept tokens, sequence after sequence: [K, H] and [K]
    h = hidden.reshape(-1, width).index_select(0, kept_rows).to(dtype)
    y = targets.reshape(-1).index_select(0, kept_rows).long()
    logprobs = h.new_zeros(n_seq * seq_len)
    stat = h.new_zeros(n_seq * seq_len) if statistic is not None else None
    kept_logprobs, kept_stat = h.new_empty(h.shape[0]), h.new_empty(h.shape[0])
    want_dh, want_dw, want_db = need_grad[0], need_grad[1], need_grad[2] and bias is not None
    dh = h.new_empty(h.shape) if want_dh else None
    dw = h.new_empty((vocab, width)) if want_dw else None
    db = h.new_empty(vocab) if want_db else None
    step = rows_per_block(vocab, 1 if transform.softcap is None else 2)

    def walk(seq: int, acc_w: Tensor | None, acc_b: Tensor | None) -> bool:
        """Sequence ``seq`` block by block: statistics, its ``dH`` rows at coefficient 1, and
        ``acc_w = Σ dlᵀ h`` / ``acc_b = Σ dl`` (overwritten, not added to). False if it has no tokens."""
        fresh = True
        for start in range(offsets[seq], offsets[seq + 1], step):
            stop = min(start + step, offsets[seq + 1])
            hb, yb = h[start:stop], y[start:stop]
            z = _logits_chunk(hb, w, b, transform, 0, vocab)
            dz_dl = _transform_derivative(z, transform)
            fold, e = fold_block(z, yb, 0)
            stats = fold.stats()
            kept_logprobs[start:stop] = stats.target_logit - stats.lse
            if statistic == "log_sum_sq_probs":
                kept_stat[start:stop] = stats.lse2 - 2 * stats.lse
            elif statistic == "log_max_prob":
                kept_stat[start:stop] = stats.max_logit - stats.lse
            # d logp(y) / dz = onehot(y) - softmax(z), then through the transform (all in place)
            dl = e.mul_(fold.sum_exp.reciprocal().neg_()[:, None])
            dl[torch.arange(stop - start), yb] += 1
            if not (isinstance(dz_dl, float) and dz_dl == 1.0):
                dl.mul_(dz_dl)
            if dh is not None:
                torch.mm(dl, w, out=dh[start:stop])
            if acc_w is not None:
                torch.mm(dl.T, hb, out=acc_w) if fresh else acc_w.addmm_(dl.T, hb)
            if acc_b is not None:
                torch.sum(dl, 0, out=acc_b) if fresh else acc_b.add_(dl.sum(0))
            fresh = False
        return not fresh

    def scratch() -> tuple[Tensor | None, Tensor | None]:
        return (None if dw is None else torch.empty_like(dw), None if db is None else torch.empty_like(db))

    chosen_scratch = rejected_scratch = None
    filled = False  # whether dw / db hold a partial sum yet
    for pair in range(n_pairs):
        seqs = (pair, n_pairs + pair)
        if rejected_scratch is None:
            rejected_scratch = scratch()
        if filled and chosen_scratch is None:
            chosen_scratch = scratch()
        # until dw holds something, the chosen side accumulates straight into it
        sides = (chosen_scratch if filled else (dw, db), rejected_scratch)
        wrote = [walk(seq, *acc) for seq, acc in zip(seqs, sides, strict=True)]
        for seq in seqs:
            rows = kept_rows[offsets[seq] : offsets[seq + 1]]
            logprobs.index_copy_(0, rows, kept_logprobs[offsets[seq] : offsets[seq + 1]])
            if stat is not None:
                stat.index_copy_(0, rows, kept_stat[offsets[seq] : offsets[seq + 1]])
        coefficients = pair_coefficients(
            pair,
            logprobs.view(n_seq, seq_len)[list(seqs)],
            None if stat is None else stat.view(n_seq, seq_len)[list(seqs)],
        )
        for seq, coefficient in zip(seqs, coefficients, strict=True):
            if dh is not None:
                dh[offsets[seq] : offsets[seq + 1]].mul_(coefficient)
        for k, ((acc_w, acc_b), coefficient) in enumerate(zip(sides, coefficients, strict=True)):
            if not wrote[k]:
                continue
            for total, acc in ((dw, acc_w), (db, acc_b)):
                if total is None:
                    continue
                if acc is total:
                    total.mul_(coefficient)
                elif filled:
                    total.add_(acc, alpha=coefficient)
                else:
                    torch.mul(acc, coefficient, out=total)
            filled = True
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
