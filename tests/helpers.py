"""Shared test helpers: per-dtype tolerances and fresh random inputs."""

from __future__ import annotations

import torch
from torch import Tensor

#: Relative-norm tolerances ``|x - ref| / |ref|`` against the fp64 reference, per input dtype.
#: Values are accumulated in fp32 everywhere; gradients of half inputs go through a half-precision dL
#: on the GPU (tensor cores), hence looser gradient bounds there.
VALUE_RTOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.float64: 1e-10}
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}


def rel_err(x: Tensor, ref: Tensor, floor: float = 1.0) -> float:
    """Norm error of ``x`` against ``ref``, relative to ``max(|ref|, floor)`` (so outputs that are ~0
    are compared absolutely); equal infinities count as exact; a NaN fails."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(x).any(), "result has NaN"
    same_inf = torch.isinf(x) & (x == ref)
    x, ref = x.masked_fill(same_inf, 0), ref.masked_fill(same_inf, 0)
    return ((x - ref).norm() / ref.norm().clamp_min(floor)).item()


def make_inputs(
    n: int,
    h: int,
    v: int,
    dtype: torch.dtype,
    device: str,
    *,
    bias: bool = False,
    n_ignored: int = 0,
    ignore_index: int = -100,
    seed: int = 0,
    weight_scale: float = 1.0,
) -> dict[str, Tensor | None]:
    """Random ``hidden [n, h]``, ``weight [v, h]`` (logits of order a few units), targets with the first
    ``n_ignored`` positions set to ``ignore_index``, optional bias. Leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (weight_scale * 2.0 / max(h, 1) ** 0.5)
    b = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[:n_ignored] = ignore_index
    cast = lambda t: t.to(device=device, dtype=dtype).requires_grad_()
    return {
        "hidden": cast(hidden),
        "weight": cast(weight),
        "bias": cast(b) if b is not None else None,
        "targets": targets.to(device),
    }


def as_fp64_leaves(inputs: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
    """The same inputs, upcast to fp64 on CPU as fresh leaves (for the reference)."""
    out: dict[str, Tensor | None] = {}
    for k, t in inputs.items():
        if t is None or not t.dtype.is_floating_point:
            out[k] = t.cpu() if t is not None else None
        else:
            out[k] = t.detach().cpu().double().requires_grad_()
    return out


def make_preference_batch(
    pairs: int,
    length: int,
    vocab: int,
    hidden: int,
    *,
    seed: int,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    empty: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``[chosen; rejected]``: hidden ``[2B, T, H]``, heads ``[V, H]``, bias ``[V]``, ragged targets
    ``[2B, T]`` (sequence 1 has no tokens when ``empty``). Drawn in fp64, then cast."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    f64 = dict(generator=g, dtype=torch.float64)
    h = torch.randn(n, length, hidden, **f64)
    w = torch.randn(vocab, hidden, **f64) * (2 / hidden**0.5)
    b = 0.3 * torch.randn(vocab, **f64)
    ref_w = w + 0.3 * torch.randn(vocab, hidden, **f64) / hidden**0.5
    y = torch.randint(0, vocab, (n, length), generator=g)
    starts = torch.randint(0, length // 2, (n,), generator=g)
    ends = torch.randint(length // 2 + 1, length + 1, (n,), generator=g)
    pos = torch.arange(length)
    keep = (pos >= starts[:, None]) & (pos < ends[:, None])
    if empty:
        keep[1] = False
    cast = lambda t: t.to(device=device, dtype=dtype)
    return cast(h), cast(w), cast(b), cast(ref_w), y.masked_fill(~keep, -100).to(device)


def tiny_decoder_config(vocab: int, hidden: int, **overrides: object) -> dict[str, object]:
    """Keyword arguments of a one-layer, two-head decoder config (Llama family) for tests; ``overrides``
    replace or add fields (``tie_word_embeddings``, ``final_logit_softcapping``, ...)."""
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32,
        "pad_token_id": 0,
        "bos_token_id": None,
        "eos_token_id": 1,
        **overrides,
    }
