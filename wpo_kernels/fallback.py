"""Chunked PyTorch implementation of the kernels' math, for CPU tensors without the Triton interpreter.

Same API as ``kernels/forward.py`` and ``kernels/backward.py``: the vocabulary is visited in chunks of
``chunk_size(N)`` columns, folding each ``[N, chunk]`` logits block into the same online reductions, so
the full ``[N, V]`` logits never exist. Computes in fp32 (fp64 for fp64 inputs, so that
``torch.autograd.gradcheck`` runs on it).
"""

from __future__ import annotations

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


def keeps_logits(n_tokens: int, vocab: int) -> bool:
    """Whether the forward keeps its logits for the backward instead of recomputing them with a GEMM:
    when all ``N·V`` of them fit in four chunks (``4 · CHUNK_ELEMENTS``, 16 MiB in fp32)."""
    return n_tokens * vocab <= 4 * CHUNK_ELEMENTS


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


def torch_vocab_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    transform: LogitTransform,
    *,
    vocab_start: int = 0,
    need_mean_logit: bool = False,
    kept_logits: list[Tensor] | None = None,
) -> VocabStats:
    """Chunked twin of :func:`wpo_kernels.kernels.forward.triton_vocab_stats`; with a ``kept_logits``
    list, each chunk's logits are appended to it for :func:`torch_linear_logprobs_backward`."""
    n, v = hidden.shape[0], weight.shape[0]
    h = hidden.to(compute_dtype(hidden.dtype))
    y = targets.long() - vocab_start
    m = h.new_full((n,), float("-inf"))
    s1, s2, sz, z_y = (h.new_zeros(n) for _ in range(4))
    step = chunk_size(n, v)
    for start in range(0, v, step):
        stop = min(start + step, v)
        z = _logits_chunk(h, weight, bias, transform, start, stop)
        in_chunk = (y >= start) & (y < stop)
        col = torch.where(in_chunk, y - start, 0).unsqueeze(1)
        z_y += torch.where(in_chunk, z.gather(1, col).squeeze(1), 0.0)
        # online rescale to the new running max (shift 0 for rows that are still all -inf)
        m_new = torch.maximum(m, z.amax(dim=1))
        shift = torch.where(m_new == float("-inf"), 0.0, m_new)
        alpha = torch.exp(m - shift)
        if kept_logits is not None:
            kept_logits.append(z)
        # in place unless z is still needed
        keep_z = need_mean_logit or kept_logits is not None
        e = (torch.sub(z, shift[:, None]) if keep_z else z.sub_(shift[:, None])).exp_()
        s1 = s1 * alpha + e.sum(1)
        s2 = s2 * alpha * alpha + torch.linalg.vector_norm(e, dim=1).square_()
        if need_mean_logit:
            # e == 0 where z == -inf: clamp z so those terms are 0, not 0 * -inf
            sz = sz * alpha + torch.linalg.vecdot(e, z.clamp_(min=torch.finfo(z.dtype).min))
        m = m_new
    return VocabStats(
        target_logit=z_y,
        max_logit=m,
        lse=m + torch.log(s1),
        lse2=2 * m + torch.log(s2),
        mean_logit=sz / s1 if need_mean_logit else None,
    )


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
    kept_logits: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Chunked twin of :func:`wpo_kernels.kernels.backward.triton_linear_logprobs_backward`; the logits
    come from ``kept_logits`` (``[N, V]``: the forward's chunks side by side, left unchanged) when given,
    else are recomputed.

    Each chunk forms the unit gradient ``u = (softmax(z) - onehot(y)) · dz/dl`` in place; the upstream
    gradient is a per-token factor, applied once per call instead of once per logit:
    ``dH = -g ⊙ Σ_chunks u @ W``, ``dW = uᵀ (-g ⊙ H)``, ``db = uᵀ (-g)``.
    """
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
        if kept_logits is None:
            z = _logits_chunk(h, weight, bias, transform, start, stop)
            u = z
        else:
            z = kept_logits[:, start:stop]
            u = torch.empty_like(z)
        dz_dl = _transform_derivative(z, transform)
        u = torch.sub(z, lse, out=u).exp_()
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
