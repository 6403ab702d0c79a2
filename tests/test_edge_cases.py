"""No silent wrong answers (issue 11): the seven regressions, then every tensor argument of every public
function in every layout a user can hand over, and every integer dtype of the targets — exact against
the fp64 reference, or refused with an error that names the argument."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from tests.helpers import (
    CPU_BACKENDS,
    GRAD_RTOL,
    LAYOUTS,
    VALUE_RTOL,
    check_call,
    in_layout,
    make_preference_batch,
    rel_err,
)
from wpo_kernels import (
    fused_linear_logprobs,
    fused_linear_wpo_loss,
    vocab_parallel_linear_logprobs,
    wpo_loss,
    wpo_weights,
)

BACKENDS = CPU_BACKENDS


def single_process_vocab_parallel(hidden: Tensor, weight: Tensor, targets: Tensor, **options) -> object:
    """:func:`vocab_parallel_linear_logprobs` over the whole head (one process, no group)."""
    bias = options.pop("bias", None)
    return vocab_parallel_linear_logprobs(
        hidden, weight, targets, vocab_start=0, vocab_size=weight.shape[0], bias_shard=bias, **options
    )


ENTRY_POINTS = {"fused": fused_linear_logprobs, "vocab_parallel": single_process_vocab_parallel}


def head(n: int = 7, h: int = 9, v: int = 37, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.7).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[2] = -100
    return hidden, weight, targets


# --- 1. a strided or stride-0 bias is read through its strides ---


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["column", "expanded"])
def test_strided_and_expanded_bias(layout: str, backend: str, entry: str) -> None:
    hidden, weight, targets = head()
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(37, 2, generator=g) if layout == "column" else torch.randn(1, generator=g))
    base.requires_grad_()
    bias = base[:, 1] if layout == "column" else base.expand(37)
    check_call(ENTRY_POINTS[entry], hidden, weight, targets, bias, backend=backend)
    # the gradient reaches the caller's own tensor through the copy made for the kernels
    out = ENTRY_POINTS[entry](hidden, weight, targets, bias=bias, backend=backend)
    out.logprobs.sum().backward()
    assert base.grad is not None and torch.isfinite(base.grad).all()


# --- 2. narrow integer targets are compared as int64 ---

TARGET_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", TARGET_DTYPES, ids=str)
def test_integer_target_dtypes(dtype: torch.dtype, backend: str, entry: str) -> None:
    """V = 300 > 255: uint8 token 156 is -100 mod 256, and 300 wraps in uint8/int8."""
    hidden, weight, _ = head(n=6, v=300)
    ids = {torch.uint8: [156, 255, 0, 3, 200, 1], torch.int8: [127, -100, 0, 3, 100, 1]}
    targets = torch.tensor(ids.get(dtype, [156, 299, -100, 3, 200, 1]), dtype=dtype)
    check_call(ENTRY_POINTS[entry], hidden, weight, targets, backend=backend)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_narrow_targets_in_the_fused_loss(dtype: torch.dtype) -> None:
    """The fused loss's token mask (``targets != ignore_index``) is taken on int64 targets too."""
    h, w, b, ref_w, y = make_preference_batch(2, 5, 300, 8, seed=3, dtype=torch.float32)
    y = y.clamp(max=127)
    y[y >= 0] = y[y >= 0] + (128 if dtype == torch.uint8 else 0)  # uint8 ids in [128, 255]: 156 among them
    y[0, 1] = 156 if dtype == torch.uint8 else 100
    y_narrow = y.clamp(min=0).to(dtype) if dtype == torch.uint8 else y.to(dtype)
    ignore = 0 if dtype == torch.uint8 else -100
    y_wide = y_narrow.long()
    if dtype == torch.uint8:
        y_narrow[:, 0] = 0  # ignore_index=0 marks the prompt of every sequence
        y_wide[:, 0] = 0
    common = dict(ignore_index=ignore, ref_weight=ref_w, variant="wpo", backend="torch")
    got = fused_linear_wpo_loss(h, w, y_narrow, **common)
    want = fused_linear_wpo_loss(h, w, y_wide, **common)
    assert torch.equal(got.loss, want.loss)
    assert all(torch.equal(got.metrics[k], want.metrics[k]) for k in want.metrics)


def test_uint64_targets_are_refused() -> None:
    hidden, weight, _ = head()
    with pytest.raises(TypeError, match="targets must be an integer tensor.*uint64"):
        fused_linear_logprobs(hidden, weight, torch.zeros(7, dtype=torch.uint64))


# --- 3. an infinite margin gives a finite loss, never NaN ---


@pytest.mark.parametrize("variant", ["wpo_w", "none"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "simpo"])
def test_infinite_margin_is_not_nan(loss_type: str, variant: str) -> None:
    """The rejected answer has log-prob -inf (margin +inf): the pair's loss is 0 with zero gradient."""
    pc = torch.tensor([-3.0, -2.0], requires_grad=True)
    pr = torch.tensor([float("-inf"), -4.0], requires_grad=True)
    ref, ones, lengths = torch.tensor([-3.5, -3.0]), torch.ones(2), torch.tensor([3, 4])
    out = wpo_loss(pc, pr, ref, ref, ones, torch.tensor([0.0, 1.0]), loss_type=loss_type, variant=variant,
                   chosen_lengths=lengths, rejected_lengths=lengths)
    finite_pair = wpo_loss(pc[1:], pr[1:], ref[1:], ref[1:], ones[1:], ones[1:], loss_type=loss_type,
                           variant=variant, chosen_lengths=lengths[1:], rejected_lengths=lengths[1:])
    assert torch.isclose(out.loss, finite_pair.loss / 2, rtol=1e-6, atol=0)  # mean over 2 pairs, one is 0
    out.loss.backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all() and pr.grad[0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["wpo_w", "none"])
def test_fused_loss_with_rejected_token_masked_by_bias(variant: str, backend: str) -> None:
    h, w, b, ref_w, y = make_preference_batch(2, 6, 40, 8, seed=5, dtype=torch.float32, empty=False)
    b[7] = float("-inf")
    y[2, 3] = 7  # a token of rejected sequence 0 sits on the masked entry: its log-prob is -inf
    w.requires_grad_()
    out = fused_linear_wpo_loss(h, w, y, ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2),
                                bias=b, variant=variant, alignment="none", backend=backend)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(w.grad).all()


# --- 4. backend is validated ---


def test_unknown_backend_is_refused() -> None:
    hidden, weight, targets = head()
    for entry in ENTRY_POINTS.values():
        with pytest.raises(ValueError, match=r"backend must be one of \[.*\], got 'cuda'"):
            entry(hidden, weight, targets, backend="cuda")


def test_triton_backend_without_cuda_or_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    hidden, weight, targets = head()
    if hidden.is_cuda:
        pytest.skip("CPU tensors only")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors.*TRITON_INTERPRET"):
        fused_linear_logprobs(hidden, weight, targets, backend="triton")
    # auto falls back to the chunked torch implementation
    assert fused_linear_logprobs(hidden, weight, targets).logprobs.shape == (7,)


def test_triton_backend_refuses_float64() -> None:
    hidden, weight, targets = head()
    with pytest.raises(ValueError, match="backend='triton' takes .* inputs, got float64"):
        fused_linear_logprobs(hidden.double(), weight.double(), targets, backend="triton")


# --- 5. double backward is refused ---


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused(backend: str, entry: str) -> None:
    hidden, weight, targets = head()
    out = ENTRY_POINTS[entry](hidden, weight, targets, backend=backend)
    with pytest.raises(RuntimeError, match="do not support double backward.*create_graph=True"):
        torch.autograd.grad(out.logprobs.sum(), hidden, create_graph=True)
    # the first-order gradient of the same graph still works
    (dh,) = torch.autograd.grad(out.logprobs.sum(), hidden)
    assert torch.isfinite(dh).all()


# --- 6. autocast does not change the fallback's precision ---


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_under_bf16_autocast_fp32_inputs_stay_exact(backend: str, entry: str) -> None:
    """fp32 head under CPU bf16 autocast, forward and backward inside it, logits |z| ~ 90."""
    hidden, weight, targets = head(n=8, h=16, v=50, seed=4)
    with torch.no_grad():
        hidden.mul_(15.0)
    bias = torch.randn(50, generator=torch.Generator().manual_seed(2)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_call(ENTRY_POINTS[entry], hidden, weight, targets, bias, backend=backend, value_floor=100.0)
        out = ENTRY_POINTS[entry](hidden, weight, targets, bias=bias, backend=backend)
        (db,) = torch.autograd.grad(out.logprobs.sum(), bias)
    # Σ_v d logp(y) / d b_v = 1 - Σ_v p_v = 0 for every kept token
    assert abs(db.sum().item()) < 1e-4


# --- 7. wpo_weights checks the mask's device ---


def test_mask_on_another_device_is_refused() -> None:
    logprobs = torch.randn(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=r"mask must be on the device of logprobs \(cpu\), got meta"):
        wpo_weights(logprobs, None, None, mask, "none")


def test_mask_that_is_not_binary_is_refused() -> None:
    """Labels passed as the mask by mistake: -100 would count as a token."""
    labels = torch.tensor([[-100, 5, 7], [3, 4, -100]])
    with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1, found -100"):
        wpo_weights(torch.randn(2, 3), None, None, labels, "none")
    w01 = wpo_weights(torch.tensor([[-1.0, -2.0, -3.0]]), None, None, torch.tensor([[0, 1, 1]]), "none")
    assert torch.isclose(w01, torch.exp(torch.tensor([-2.5]))).all()


# --- wpo_loss: negative weights, devices ---


@pytest.mark.parametrize("name", ["chosen_weight", "rejected_weight"])
@pytest.mark.parametrize("bad", [-0.5, float("nan")])
def test_negative_or_nan_weights_are_refused(name: str, bad: float) -> None:
    """WPO weights are exp(·) >= 0; log-weights passed by mistake would turn pairs into gradient ascent."""
    args = {"chosen_weight": torch.ones(3), "rejected_weight": torch.ones(3)}
    args[name][1] = bad
    with pytest.raises(ValueError, match=rf"{name} must be >= 0 .*found {bad}"):
        wpo_loss(torch.randn(3), torch.randn(3), torch.randn(3), torch.randn(3), **args)


def test_zero_weights_are_accepted() -> None:
    logps = [torch.randn(3) for _ in range(4)]
    out = wpo_loss(*logps, torch.zeros(3), torch.ones(3))
    assert out.loss == 0


@pytest.mark.parametrize(
    "name", ["policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "chosen_weight"]
)
def test_wpo_loss_vector_on_another_device_is_refused(name: str) -> None:
    args = dict(policy_rejected_logps=torch.randn(3), ref_chosen_logps=torch.randn(3),
                ref_rejected_logps=torch.randn(3), chosen_weight=torch.ones(3), rejected_weight=torch.ones(3))
    args[name] = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match=rf"{name} must be on the device of policy_chosen_logps"):
        wpo_loss(torch.randn(3), **args)


# --- every layout of every tensor argument ---

def test_layouts_are_what_they_say() -> None:
    x = torch.arange(12.0).reshape(3, 4)
    assert in_layout(x, "sliced").stride() == (8, 2)
    assert in_layout(x, "transposed").stride() == (1, 3)
    assert in_layout(x, "expanded").stride() == (0, 1) and in_layout(x, "expanded_last").stride() == (4, 0)
    assert in_layout(x, "offset").storage_offset() == 5
    for layout in ("contiguous", "sliced", "transposed", "offset"):
        assert torch.equal(in_layout(x, layout), x)


ARGUMENTS = ["hidden", "hidden_3d", "weight", "bias", "targets", "targets_2d"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("argument", ARGUMENTS)
def test_every_layout_of_every_argument(argument: str, layout: str, backend: str) -> None:
    """One argument in ``layout``, the others contiguous; 3-D hidden ``[2, 4, H]`` with 2-D targets."""
    g = torch.Generator().manual_seed(hash((argument, layout)) % 1000)
    batched = argument in ("hidden_3d", "targets_2d")
    shape = (2, 4) if batched else (8,)
    hidden = torch.randn(*shape, 9, generator=g).requires_grad_()
    weight = (0.7 * torch.randn(37, 9, generator=g)).requires_grad_()
    bias = torch.randn(37, generator=g).requires_grad_()
    targets = torch.randint(0, 37, shape, generator=g)
    targets.view(-1)[3] = -100
    args = {"hidden": hidden, "weight": weight, "bias": bias, "targets": targets}
    name = argument.split("_")[0]
    args[name] = in_layout(args[name], layout)
    for entry in ENTRY_POINTS.values():
        check_call(entry, args["hidden"], args["weight"], args["targets"], args["bias"], backend=backend)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_wpo_weights_layouts(layout: str) -> None:
    """Every ``[B, T]`` argument of :func:`wpo_weights` in ``layout`` (mask as bool and as 0/1 int8)."""
    g = torch.Generator().manual_seed(11)
    logprobs = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 4
    stat = -torch.rand(3, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) > 0.3
    mask[:, 0] = True
    for mask_dtype in (torch.bool, torch.int8):
        lp, st, mk = (in_layout(t, layout) for t in (logprobs, stat, mask.to(mask_dtype)))
        keep = mk.bool().double()
        want = torch.exp(((lp - st) * keep).sum(-1) / keep.sum(-1))
        for got in (wpo_weights(lp, None, st, mk, "sampled"), wpo_weights(lp, st, None, mk, "greedy")):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("layout", ["sliced", "expanded", "offset"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "kto"])
def test_wpo_loss_layouts(layout: str, loss_type: str) -> None:
    """Every ``[B]`` argument of :func:`wpo_loss` in ``layout`` gives the loss and policy gradients of
    contiguous copies (1-D: transposed is contiguous)."""
    g = torch.Generator().manual_seed(12)
    vectors = [-torch.rand(4, generator=g, dtype=torch.float64) * 9 for _ in range(4)]
    vectors += [torch.rand(4, generator=g, dtype=torch.float64) for _ in range(2)]
    vectors += [torch.randint(1, 9, (4,), generator=g) for _ in range(2)]
    handed = [in_layout(t, layout) for t in vectors]
    copies = [t.clone() for t in handed]
    results = []
    for args in (handed, copies):
        policy = [t.requires_grad_() if t.is_leaf else t for t in args[:2]]
        out = wpo_loss(*policy, *args[2:6], loss_type=loss_type, chosen_lengths=args[6],
                       rejected_lengths=args[7])
        results.append((out.loss, *torch.autograd.grad(out.loss, policy)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("argument", ["hidden", "weight", "bias", "targets"])
def test_fused_wpo_loss_layouts(argument: str, layout: str, backend: str) -> None:
    """:func:`fused_linear_wpo_loss` with one argument in ``layout`` (targets also as int32) against the
    fp64 reference loss and gradients."""
    from wpo_kernels.reference import reference_wpo_loss

    h, w, b, ref_w, y = make_preference_batch(2, 5, 30, 8, seed=7, dtype=torch.float32, empty=False)
    leaves = {"hidden": h.requires_grad_(), "weight": w.requires_grad_(), "bias": b.requires_grad_()}
    args = {**leaves, "targets": y.to(torch.int32) if argument == "targets" else y}
    args[argument] = in_layout(args[argument], layout)
    out = fused_linear_wpo_loss(args["hidden"], args["weight"], args["targets"], bias=args["bias"],
                                ref_weight=ref_w, beta=0.5, backend=backend)
    handed = [args[k] for k in leaves]  # gradients w.r.t. the tensors handed over, whatever their layout
    grads = torch.autograd.grad(out.loss, handed)
    exact = [t.detach().double().contiguous().requires_grad_() for t in handed]
    want = reference_wpo_loss(exact[0], exact[1], args["targets"].long().contiguous(), bias=exact[2],
                              ref_weight=ref_w.double(), beta=0.5)
    want_grads = torch.autograd.grad(want, exact)
    assert rel_err(out.loss, want) < VALUE_RTOL[torch.float32]
    for name, got_g, want_g in zip(leaves, grads, want_grads, strict=True):
        assert rel_err(got_g, want_g) < GRAD_RTOL[torch.float32], f"d{name}"


# --- beyond 2^31 elements ---


def test_fallback_is_exact_beyond_int32_element_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``[V, H]`` head of V·H = 2^31 + 2^16 elements (a 256k vocabulary at H = 8192 is the real case),
    held in V floats as a stride-0 view (``weight[v, d] = a_v``), so the logits have the closed form
    ``z = a_v · Σ_d hidden[n, d]``; forward only (the backward's ``dW`` would be 8 GiB). The torch path
    indexes in int64: the far end of the vocabulary is scored exactly. About 9 s of CPU time (it streams
    8 GiB through the chunk copies)."""
    monkeypatch.setattr("wpo_kernels.fallback.CHUNK_ELEMENTS", 1024)  # 256-column chunks: 64 MiB copies
    v, h = 2**15 + 1, 2**16
    assert v * h > 2**31
    g = torch.Generator().manual_seed(9)
    a = torch.randn(v, 1, generator=g)
    hidden = torch.randn(4, h, generator=g) / h**0.5
    targets = torch.tensor([v - 1, 0, 2**15 - 7, v // 2])
    with torch.no_grad():
        out = fused_linear_logprobs(hidden, a.expand(v, h), targets, outputs=("lse",), backend="torch")
    z = a.double().T * hidden.double().sum(1, keepdim=True)  # [N, V] in closed form
    lse = torch.logsumexp(z, dim=1)
    assert rel_err(out.lse, lse) < VALUE_RTOL[torch.float32]
    assert rel_err(out.logprobs, z.gather(1, targets[:, None]).squeeze(1) - lse) < VALUE_RTOL[torch.float32]


def test_non_integer_ignore_index_is_refused() -> None:
    hidden, weight, targets = head()
    with pytest.raises(TypeError, match="ignore_index must be an int, got 0.5"):
        fused_linear_logprobs(hidden, weight, targets, ignore_index=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_module_and_loss_module_take_narrow_targets_and_strided_tensors(backend: str) -> None:
    """:func:`head_linear_logprobs` (an ``nn.Linear`` head with bias) and :class:`FusedLinearWPOLoss` go
    through the same entry: uint8 targets over V = 300 and a transposed hidden are exact there too."""
    from torch import nn

    from wpo_kernels import FusedLinearWPOLoss, head_linear_logprobs

    g = torch.Generator().manual_seed(13)
    lm_head = nn.Linear(8, 300)
    hidden = in_layout(torch.randn(4, 6, 8, generator=g), "transposed").requires_grad_()
    targets = torch.randint(128, 256, (4, 6), generator=g, dtype=torch.uint8)
    targets[:, :2] = 0
    out = head_linear_logprobs(lm_head, hidden, targets, ignore_index=0, backend=backend)
    want = fused_linear_logprobs(hidden, lm_head.weight, targets.long(), bias=lm_head.bias, ignore_index=0,
                                 backend="torch")
    assert rel_err(out.logprobs, want.logprobs) < VALUE_RTOL[torch.float32]
    loss_fn = FusedLinearWPOLoss(ignore_index=0, backend=backend, alignment="none")
    ref = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    got = loss_fn(lm_head.weight, hidden, targets, bias=lm_head.bias, **ref).loss
    plain = hidden.detach().contiguous()
    exact = loss_fn(lm_head.weight, plain, targets.long(), bias=lm_head.bias, **ref).loss
    assert rel_err(got, exact) < VALUE_RTOL[torch.float32]


def test_patched_hf_model_takes_uint8_labels() -> None:
    """``add_wpo_lm_head``'s label mask (``labels != -100``) is taken on int64 labels: a uint8 label 156
    is a token, not an ignored position."""
    transformers = pytest.importorskip("transformers")
    from tests.helpers import tiny_decoder_config
    from wpo_kernels.integration.hf import add_wpo_lm_head

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_decoder_config(300, 16)))
    add_wpo_lm_head(model, backend="torch")
    ids = torch.tensor([[5, 156, 200, 156, 7, 250]])
    got = model(input_ids=ids, labels=ids.to(torch.uint8), wpo_head=True)
    want = model(input_ids=ids, labels=ids, wpo_head=True)
    assert bool(got.mask.all()) and torch.equal(got.logprobs, want.logprobs)


def test_kernels_copy_a_layout_whose_column_offsets_pass_int32() -> None:
    """The kernels form ``d × stride(1)`` in 32 bits: a transposed view whose last column lies past 2³¹
    elements is copied to contiguous (meta tensors: no memory), every other layout is read in place."""
    from wpo_kernels.kernels.logits_tile import INT32_OFFSET_LIMIT, addressable_columns

    huge = torch.empty_strided((4, 3), (1, INT32_OFFSET_LIMIT // 2 + 1), device="meta")
    assert addressable_columns(huge).stride() == (3, 1)
    edge = torch.empty_strided((4, 3), (1, INT32_OFFSET_LIMIT // 2), device="meta")
    assert addressable_columns(edge) is edge
    transposed = torch.randn(5, 7).T
    assert addressable_columns(transposed) is transposed
