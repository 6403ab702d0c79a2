"""Shared test helpers: per-dtype tolerances and fresh random inputs."""

from __future__ import annotations

import torch
from torch import Tensor

from wpo_kernels import OUTPUT_NAMES
from wpo_kernels.kernels.logits_tile import interpreter_active
from wpo_kernels.reference import reference_linear_logprobs

#: Backends that take CPU tensors here: the Triton kernels only in the interpreter (tests/conftest.py sets
#: it on machines without CUDA), the torch fallback always.
CPU_BACKENDS = ["triton", "torch"] if interpreter_active() else ["torch"]

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


LAYOUTS = ["contiguous", "sliced", "transposed", "expanded", "expanded_last", "offset"]


def in_layout(values: Tensor, layout: str) -> Tensor:
    """``values`` handed over in ``layout``: a view with the same values over other storage (every other
    element of a larger buffer, reversed dimension order, a storage offset), or a stride-0 broadcast of
    its first slice along dim 0 (``expanded``) or along the last dim (``expanded_last``). Stays in
    ``values``' graph, so gradients can be taken w.r.t. the returned view."""
    shape = tuple(values.shape)
    if layout == "contiguous":
        return values.clone()
    if layout == "sliced":
        return torch.stack([values, torch.zeros_like(values)], dim=-1)[..., 0]
    if layout == "transposed":
        dims = list(reversed(range(values.dim())))
        return values.permute(dims).contiguous().permute(dims)
    if layout == "expanded":
        return values[:1].expand(shape)
    if layout == "expanded_last":
        return values[..., :1].expand(shape)
    if layout == "offset":
        return torch.cat([torch.zeros(5, dtype=values.dtype), values.reshape(-1)])[5:].view(shape)
    raise ValueError(layout)


def check_call(
    entry,
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    backend: str,
    value_floor: float = 1.0,
    outputs: tuple[str, ...] = OUTPUT_NAMES,
    **options,
) -> None:
    """``entry`` (``fused_linear_logprobs`` or a function with its signature) against the fp64 reference
    on contiguous copies: the requested ``outputs`` and the gradients w.r.t. every float argument that
    requires grad, taken w.r.t. the tensor handed over whatever its layout (none: no graph is built).
    ``value_floor``: the scale below which value errors count absolutely (the logits' magnitude)."""
    out = entry(hidden, weight, targets, bias=bias, outputs=outputs, backend=backend, **options)
    grad_out = torch.randn(targets.shape, generator=torch.Generator().manual_seed(7))
    args = {"hidden": hidden, "weight": weight, "bias": bias}
    wrt = {k: t for k, t in args.items() if t is not None and t.requires_grad}
    if not wrt:
        assert out.logprobs.grad_fn is None
    grads = torch.autograd.grad((out.logprobs * grad_out).sum(), list(wrt.values())) if wrt else ()

    ref_args = {k: t.detach().double().contiguous().requires_grad_() if t is not None else None
                for k, t in args.items()}
    h = ref_args["hidden"]
    ref = reference_linear_logprobs(
        h.reshape(-1, h.shape[-1]), ref_args["weight"], targets.reshape(-1).long(), bias=ref_args["bias"],
        **options,
    )
    ref_loss = (ref.logprobs * grad_out.double().reshape(-1)).sum()
    ref_grads = torch.autograd.grad(ref_loss, [ref_args[k] for k in wrt]) if wrt else ()
    dtype = hidden.dtype
    for name in dict.fromkeys(("logprobs", *outputs)):
        value = getattr(out, name).reshape(-1)
        assert rel_err(value, getattr(ref, name), value_floor) < VALUE_RTOL[dtype], name
    for name, g, rg in zip(wrt, grads, ref_grads, strict=True):
        assert g.shape == args[name].shape and g.dtype == dtype
        assert rel_err(g, rg) < GRAD_RTOL[dtype], f"d{name}"
