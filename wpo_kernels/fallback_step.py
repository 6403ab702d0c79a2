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

from dataclasses import dataclass, field

import torch
from torch import Tensor

from wpo_kernels import fallback
from wpo_kernels.fallback import _logits_chunk, _transform_derivative, compute_dtype, fold_block
from wpo_kernels.kernels.launch_plan import pair_groups
from wpo_kernels.pair_layout import PairCoefficients, PairLayout, StepResult, pair_layout
from wpo_kernels.types import LogitTransform


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
        targets: ``[2B, T]`` int64, in ``[0, V)`` or ``ignore_index``.
        statistic: ``"log_sum_sq_probs"``, ``"log_max_prob"`` or None: the per-token statistic the
            weights need, passed to ``pair_coefficients`` and returned.
        pair_coefficients: see :data:`~wpo_kernels.pair_layout.PairCoefficients`; called once per group
            of pairs, in order.
        need_grad: whether the gradients of ``(hidden, weight, bias)`` are wanted.

    Returns:
        :class:`~wpo_kernels.pair_layout.StepResult`: ``logprobs``/``statistic`` ``[2B, T]``;
        ``grad_hidden [2B, T, H]``, ``grad_weight [V, H]``, ``grad_bias [V]`` of ``L`` (not yet
        multiplied by the upstream gradient).
    """
    step = _FallbackStep.start(
        hidden,
        weight,
        bias,
        targets,
        transform,
        statistic,
        pair_coefficients,
        need_grad,
        pair_layout(targets, ignore_index),
    )
    rows = rows_per_block(weight.shape[0], 1 if transform.softcap is None else 2)
    for first, last, fits in pair_groups(step.layout.offsets, rows):
        if fits:
            step.group(first, last)
        else:
            step.long_pair(first, rows)
    return step.finish()


@dataclass
class _FallbackStep:
    """The state of one step: the kept tokens' rows (compute dtype), the outputs, and whether ``dW`` /
    ``db`` hold a partial sum yet (``filled``)."""

    layout: PairLayout
    w: Tensor
    b: Tensor | None
    h: Tensor  # [K, H]
    y: Tensor  # [K]
    transform: LogitTransform
    statistic: str | None
    pair_coefficients: PairCoefficients
    logprobs: Tensor  # [2B·T]
    stat: Tensor | None
    dh: Tensor | None  # [K, H]
    dw: Tensor | None
    db: Tensor | None
    filled: bool = False
    scratch: dict[int, tuple[Tensor | None, Tensor | None]] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        transform: LogitTransform,
        statistic: str | None,
        pair_coefficients: PairCoefficients,
        need_grad: tuple[bool, bool, bool],
        layout: PairLayout,
    ) -> _FallbackStep:
        """Gather the kept tokens (in the compute dtype) and allocate the outputs."""
        n_seq, seq_len, width = hidden.shape
        dtype = compute_dtype(hidden.dtype)
        kept_rows = layout.kept_rows
        h = hidden.reshape(-1, width).index_select(0, kept_rows).to(dtype)  # [K, H]
        y = targets.reshape(-1).index_select(0, kept_rows).long()  # [K]
        logprobs = h.new_zeros(n_seq * seq_len)
        stat = h.new_zeros(n_seq * seq_len) if statistic is not None else None
        want_db = need_grad[2] and bias is not None
        return cls(
            layout,
            weight.to(dtype),
            None if bias is None else bias.to(dtype),
            h,
            y,
            transform,
            statistic,
            pair_coefficients,
            logprobs,
            stat,
            h.new_empty(h.shape) if need_grad[0] else None,
            h.new_empty((weight.shape[0], width)) if need_grad[1] else None,
            h.new_empty(weight.shape[0]) if want_db else None,
        )

    def unit_grad(self, start: int, stop: int) -> Tensor:
        """Kept tokens ``[start, stop)`` against the vocabulary: their outputs written out, and ``dl``
        ``[stop - start, V]`` (in the logits' storage)."""
        yb = self.y[start:stop]
        z = _logits_chunk(self.h[start:stop], self.w, self.b, self.transform, 0, self.w.shape[0])
        dz_dl = _transform_derivative(z, self.transform)
        fold, e = fold_block(z, yb, 0)
        stats = fold.stats()
        rows = self.layout.kept_rows[start:stop]
        self.logprobs.index_copy_(0, rows, stats.target_logit - stats.lse)
        if self.statistic == "log_sum_sq_probs":
            self.stat.index_copy_(0, rows, stats.lse2 - 2 * stats.lse)
        elif self.statistic == "log_max_prob":
            self.stat.index_copy_(0, rows, stats.max_logit - stats.lse)
        # d logp(y) / dz = onehot(y) - softmax(z), then through the transform (all in place)
        dl = e.mul_(fold.sum_exp.reciprocal().neg_()[:, None])
        dl[torch.arange(stop - start), yb] += 1
        if not (isinstance(dz_dl, float) and dz_dl == 1.0):
            dl.mul_(dz_dl)
        return dl

    def coefficients_of(self, first: int, last: int) -> Tensor:
        """``[2P]`` for pairs ``[first, last)``, in the kept tokens' sequence order (c_0, c'_0, c_1, ...)."""
        n_seq = 2 * self.layout.n_pairs
        stat = None if self.stat is None else self.stat.view(n_seq, -1)
        coefficients = self.pair_coefficients(first, last, self.logprobs.view(n_seq, -1), stat)
        return coefficients.to(self.h.dtype).T.reshape(-1)

    def group(self, first: int, last: int) -> None:
        """Pairs ``[first, last)``, within one block: every coefficient is known before the GEMMs."""
        offsets = self.layout.offsets
        start, stop = offsets[2 * first], offsets[2 * last]
        if start == stop:
            return
        dl = self.unit_grad(start, stop)
        lengths = self.layout.seq_lengths[2 * first : 2 * last]
        row_coefficient = torch.repeat_interleave(self.coefficients_of(first, last), lengths)
        if self.dh is not None:
            torch.mm(dl, self.w, out=self.dh[start:stop]).mul_(row_coefficient[:, None])
        # scaling dl's rows instead: Σ_rows c_r dl_rᵀ h_r
        dl.mul_(row_coefficient[:, None])
        _accumulate(self.dw, self.db, dl, self.h[start:stop], fresh=not self.filled)
        self.filled = True

    def long_pair(self, pair: int, budget: int) -> None:
        """A pair longer than a block: each sequence walked in blocks of ``budget`` tokens into an
        accumulator, scaled once the pair's coefficients are known."""
        offsets = self.layout.offsets
        # until dw holds something, the chosen side accumulates straight into it
        chosen_into_total = not self.filled
        accumulators = []
        for side in (0, 1):
            if side == 0 and chosen_into_total:
                accumulators.append((self.dw, self.db))
                continue
            if side not in self.scratch:
                self.scratch[side] = tuple(
                    None if t is None else torch.empty_like(t) for t in (self.dw, self.db)
                )
            accumulators.append(self.scratch[side])
        for side, (acc_w, acc_b) in enumerate(accumulators):
            k = 2 * pair + side
            for start in range(offsets[k], offsets[k + 1], budget):
                stop = min(start + budget, offsets[k + 1])
                dl = self.unit_grad(start, stop)
                if self.dh is not None:
                    torch.mm(dl, self.w, out=self.dh[start:stop])
                _accumulate(acc_w, acc_b, dl, self.h[start:stop], fresh=start == offsets[k])
        self._scale_long_pair(pair, accumulators)

    def _scale_long_pair(self, pair: int, accumulators: list[tuple[Tensor | None, Tensor | None]]) -> None:
        """A long pair's dH rows times its coefficients, and its accumulators into ``dW`` / ``db``."""
        offsets = self.layout.offsets
        for side, coefficient in enumerate(self.coefficients_of(pair, pair + 1).tolist()):
            k = 2 * pair + side
            if self.dh is not None:
                self.dh[offsets[k] : offsets[k + 1]].mul_(coefficient)
            if offsets[k] == offsets[k + 1]:
                continue  # nothing was accumulated
            for total, acc in zip((self.dw, self.db), accumulators[side], strict=True):
                if total is None:
                    continue
                if acc is total:
                    total.mul_(coefficient)
                elif self.filled:
                    total.add_(acc, alpha=coefficient)
                else:
                    torch.mul(acc, coefficient, out=total)
            self.filled = True

    def finish(self) -> StepResult:
        """The outputs in the batch's layout (dH scattered back; zero ``dW`` / ``db`` if nothing was kept)."""
        if not self.filled:
            for total in (self.dw, self.db):
                if total is not None:
                    total.zero_()
        n_seq, seq_len = 2 * self.layout.n_pairs, self.layout.seq_len
        grad_hidden = None
        if self.dh is not None:
            grad_hidden = self.h.new_zeros((n_seq * seq_len, self.h.shape[1]))
            grad_hidden = grad_hidden.index_copy_(0, self.layout.kept_rows, self.dh).view(n_seq, seq_len, -1)
        return StepResult(
            self.logprobs.view(n_seq, seq_len),
            None if self.stat is None else self.stat.view(n_seq, seq_len),
            grad_hidden,
            self.dw,
            self.db,
        )


def _accumulate(acc_w: Tensor | None, acc_b: Tensor | None, dl: Tensor, rows: Tensor, fresh: bool) -> None:
    """``acc_w += dlᵀ rows`` and ``acc_b += Σ dl`` (overwritten instead when ``fresh``)."""
    if acc_w is not None:
        torch.mm(dl.T, rows, out=acc_w) if fresh else acc_w.addmm_(dl.T, rows)
    if acc_b is not None:
        torch.sum(dl, 0, out=acc_b) if fresh else acc_b.add_(dl.sum(0))
