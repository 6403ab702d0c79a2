"""Chunked PyTorch implementation of the kernels' math, for CPU tensors without the Triton interpreter.

Same API as ``kernels/forward.py`` and ``kernels/backward.py``: the vocabulary is visited in chunks of
``chunk_size(N)`` columns, folding each ``[N, chunk]`` logits block into the same online reductions, so
the full ``[N, V]`` logits never exist. Computes in fp32 (fp64 for fp64 inputs, so that
``torch.autograd.gradcheck`` runs on it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from wpo_kernels.types import LogitTransform, VocabStats

#: Elements of one ``[N, chunk]`` logits block per torch thread (4 MiB in fp32); at most two such blocks
#: live at once. Per thread, because every op on a block is a parallel region with a fixed cost to start
#: and join (measured, Llama-3-8B head / 16, N = 512, forward, 2 threads on a 2-core machine at load ≈ 9:
#: 3.2 s with blocks of 2^18 elements, 0.93 s with 2^20, 0.54 s with 2^21, 0.34 s with 2^22).
CHUNK_ELEMENTS = 1 << 20


def block_elements() -> int:
    """Elements of one logits block: ``CHUNK_ELEMENTS`` per torch thread."""
    return CHUNK_ELEMENTS * max(1, torch.get_num_threads())


def chunk_size(n_tokens: int, vocab: int) -> int:
    """Vocabulary columns per chunk: about ``block_elements() / N``, at least 32, at most ``vocab``."""
    return max(1, min(vocab, max(32, block_elements() // max(n_tokens, 1))))


def keeps_exp(n_tokens: int, vocab: int) -> bool:
    """Whether the forward keeps ``exp(z - max_logit)`` for the backward instead of recomputing the
    logits with a GEMM: when all ``N·V`` of them fit in eight chunks (``8 · CHUNK_ELEMENTS``, 32 MiB in
    fp32). The forward then computes them as one block: one GEMM, no online rescale."""
    return n_tokens * vocab <= 8 * CHUNK_ELEMENTS


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs (gradcheck), fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits_chunk(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, transform: LogitTransform, start: int, stop: int
) -> Tensor:
    """``z`` for vocabulary columns ``[start, stop)``, transformed in place (``hidden`` in compute dtype)."""
    z = hidden @ weight[start:stop].to(hidden.dtype).T
    if bias is not None:
        z += bias[start:stop].to(hidden.dtype)
    if transform.softcap is None:
        scale = transform.logit_scale * transform.post_scale
        return z if scale == 1.0 else z.mul_(scale)
    z.mul_(transform.logit_scale / transform.softcap).tanh_()
    return z.mul_(transform.softcap * transform.post_scale)


def _transform_derivative(z: Tensor, transform: LogitTransform) -> Tensor | float:
    """``dz / dl`` from ``z`` itself: ``scale * (1 - tanh²)`` with ``tanh = z / (softcap / temperature)``,
    in one pass (``scale - scale / c² · z²``)."""
    scale = transform.logit_scale * transform.post_scale
    if transform.softcap is None:
        return scale
    cap = transform.softcap * transform.post_scale
    return torch.addcmul(z.new_tensor(scale), z, z, value=-scale / (cap * cap))


@dataclass
class BlockFold:
    """The vocabulary reductions of one ``[N, chunk]`` logits block (or of several, merged), each ``[N]``:
    ``shift`` is the max (0 in rows that are all ``-inf``) and the sums are taken relative to it."""

    target_logit: Tensor  # z[target], 0 where the target lies outside the block
    max_logit: Tensor
    shift: Tensor
    sum_exp: Tensor  # Σ exp(z - shift)
    sum_exp_sq: Tensor  # Σ exp(z - shift)²
    sum_exp_z: Tensor | None  # Σ exp(z - shift) · z, only if the mean logit is wanted

    def merged(self, other: BlockFold) -> BlockFold:
        """Both blocks' reductions, rescaled to the common max (online softmax)."""
        m = torch.maximum(self.max_logit, other.max_logit)
        shift = torch.where(m == float("-inf"), 0.0, m)
        # from each block's own max, not its shift: exp(-inf - shift) = 0 for an all -inf block
        a, b = torch.exp(self.max_logit - shift), torch.exp(other.max_logit - shift)
        return BlockFold(
            self.target_logit + other.target_logit,
            m,
            shift,
            self.sum_exp * a + other.sum_exp * b,
            self.sum_exp_sq * (a * a) + other.sum_exp_sq * (b * b),
            None if self.sum_exp_z is None else self.sum_exp_z * a + other.sum_exp_z * b,
        )

    def stats(self) -> VocabStats:
        mean = None if self.sum_exp_z is None else self.sum_exp_z / self.sum_exp
        return VocabStats(
            target_logit=self.target_logit,
            max_logit=self.max_logit,
            lse=self.shift + torch.log(self.sum_exp),
            lse2=2 * self.shift + torch.log(self.sum_exp_sq),
            mean_logit=mean,
        )


def fold_block(z: Tensor, y: Tensor, start: int, need_mean_logit: bool = False) -> tuple[BlockFold, Tensor]:
    """Reduce the logits block ``z`` ``[N, C]`` of vocabulary columns ``[start, start + C)`` for targets
    ``y`` ``[N]`` (int64, relative to the weight's first row); returns the reductions and
    ``e = exp(z - shift)``, computed in ``z``'s storage unless ``need_mean_logit`` (which reads ``z``)."""
    in_block = (y >= start) & (y < start + z.shape[1])
    target = z.gather(1, torch.where(in_block, y - start, 0)[:, None]).squeeze(1)
    m = z.amax(dim=1)
    shift = torch.where(m == float("-inf"), 0.0, m)
    e = (torch.sub(z, shift[:, None]) if need_mean_logit else z.sub_(shift[:, None])).exp_()
    # e == 0 where z == -inf: clamp z so those terms are 0, not 0 * -inf
    sum_exp_z = torch.linalg.vecdot(e, z.clamp_(min=torch.finfo(z.dtype).min)) if need_mean_logit else None
    fold = BlockFold(
        torch.where(in_block, target, 0.0),
        m,
        shift,
        e.sum(1),
        torch.linalg.vector_norm(e, dim=1).square_(),
        sum_exp_z,
    )
    return fold, e


def torch_vocab_stats(
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
    """Chunked twin of :func:`wpo_kernels.kernels.forward.triton_vocab_stats`. With a ``kept_exp`` list
    (no softcap), the whole vocabulary is one block and ``exp(z - max_logit)`` ``[N, V]`` (0 where
    ``z = -inf``; ``max_logit`` read as 0 in rows that are all ``-inf``) is appended to it for
    :func:`torch_linear_logprobs_backward`."""
    n, v = hidden.shape[0], weight.shape[0]
    if kept_exp is not None and transform.softcap is not None:
        raise ValueError("kept_exp: the backward needs the softcapped logits themselves, not exp(z - max)")
    h = hidden.to(compute_dtype(hidden.dtype))
    y = targets.long() - vocab_start
    step = v if kept_exp is not None else chunk_size(n, v)
    total = None
    for start in range(0, v, step):
        z = _logits_chunk(h, weight, bias, transform, start, min(start + step, v))
        fold, e = fold_block(z, y, start, need_mean_logit)
        if kept_exp is not None:
            kept_exp.append(e)
        total = fold if total is None else total.merged(fold)
        del z, e  # before the next block is allocated: one block lives at a time
    return total.stats()


def torch_linear_logprobs_backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    grad_logprobs: Tensor,
    transform: LogitTransform,
    *,
    vocab_start: int = 0,
    kept_exp: Tensor | None = None,
    max_logit: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Chunked twin of :func:`wpo_kernels.kernels.backward.triton_linear_logprobs_backward`: the logits
    are recomputed chunk by chunk, unless the forward kept ``kept_exp = exp(z - max_logit)`` ``[N, V]``
    (see :func:`torch_vocab_stats`; pass its ``max_logit`` too), which is then read, not changed.

    Each chunk forms the unit gradient ``u = (softmax(z) - onehot(y)) · dz/dl`` in place; the upstream
    gradient is a per-token factor, applied once per call instead of once per logit:
    ``dH = -g ⊙ Σ_chunks u @ W``, ``dW = uᵀ (-g ⊙ H)``, ``db = uᵀ (-g)``.
    """
    if kept_exp is not None:
        if max_logit is None:
            raise ValueError("max_logit: needed with kept_exp, which is exp(z - max_logit)")
        return _grads_from_kept_exp(
            hidden, weight, bias, targets, lse, grad_logprobs, transform, vocab_start, kept_exp, max_logit
        )
    n, v = hidden.shape[0], weight.shape[0]
    h = hidden.to(compute_dtype(hidden.dtype))
    neg_g = grad_logprobs.to(h.dtype).neg()
    h_scaled = h * neg_g[:, None]
    y = targets.long() - vocab_start
    lse = lse.to(h.dtype)[:, None]
    u_w = torch.zeros_like(h)  # Σ_chunks u @ W, scaled by -g at the end
    dw = h.new_empty((v, h.shape[1]))
    db = h.new_empty(v) if bias is not None else None
    step = chunk_size(n, v)
    for start in range(0, v, step):
        stop = min(start + step, v)
        z = _logits_chunk(h, weight, bias, transform, start, stop)
        dz_dl = _transform_derivative(z, transform)
        u = z.sub_(lse).exp_()
        # minus the one-hot of the targets in this chunk (a 0 added elsewhere): no host sync
        in_chunk = (y >= start) & (y < stop)
        u.scatter_add_(1, torch.where(in_chunk, y - start, 0)[:, None], -in_chunk.to(h.dtype)[:, None])
        if not (isinstance(dz_dl, float) and dz_dl == 1.0):
            u.mul_(dz_dl)
        w_chunk = weight[start:stop].to(h.dtype)
        u_w.addmm_(u, w_chunk)
        torch.mm(u.T, h_scaled, out=dw[start:stop])
        if db is not None:
            torch.mv(u.T, neg_g, out=db[start:stop])
    return u_w.mul_(neg_g[:, None]), dw, db


def _grads_from_kept_exp(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    grad_logprobs: Tensor,
    transform: LogitTransform,
    vocab_start: int,
    kept_exp: Tensor,
    max_logit: Tensor,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The backward from ``E = exp(z - max_logit)`` as two GEMMs and no pass over ``[N, V]``.

    ``dL/dz = g · (onehot(y) - softmax(z)) · s = a ⊙ E + g·s · onehot(y)`` with ``s = dz/dl`` (a constant
    without a softcap) and the per-token factor ``a = -g·s · exp(max_logit - lse)``, so
    ``dH = a ⊙ (E @ W) + g·s ⊙ W[y]``, ``dW = Eᵀ (a ⊙ H) + Σ_tokens onehot(y) (g·s ⊙ H)``,
    ``db = Eᵀ a + Σ_tokens g·s onehot(y)``: the one-hot terms are row gathers and index-adds.
    """
    dtype = kept_exp.dtype
    h = hidden.to(dtype)
    w = weight.to(dtype)
    y = targets.long() - vocab_start
    in_vocab = (y >= 0) & (y < w.shape[0])
    g = grad_logprobs.to(dtype) * (transform.logit_scale * transform.post_scale)
    shift = torch.where(max_logit == float("-inf"), 0.0, max_logit).to(dtype)
    # tokens without a gradient contribute exact zeros (also in rows whose exp(shift - lse) is not finite)
    a = torch.where(g == 0, 0.0, -g * torch.exp(shift - lse.to(dtype)))
    g_y = torch.where(in_vocab, g, 0.0)
    y = torch.where(in_vocab, y, 0)
    dh = torch.mm(kept_exp, w).mul_(a[:, None]).addcmul_(w.index_select(0, y), g_y[:, None])
    dw = torch.mm(kept_exp.T, h * a[:, None]).index_add_(0, y, h * g_y[:, None])
    db = None if bias is None else torch.mv(kept_exp.T, a).index_add_(0, y, g_y)
    return dh, dw, db
