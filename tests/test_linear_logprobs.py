"""fused_linear_logprobs vs the materialised fp64 reference: values and gradients, both backends."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import GRAD_RTOL, VALUE_RTOL, as_fp64_leaves, make_inputs, rel_err
from wpo_kernels import OUTPUT_NAMES, fused_linear_logprobs
from wpo_kernels.reference import reference_linear_logprobs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["triton", "torch"]

# (N, H, V): single token, primes, H not a multiple of 16, V below / at / just past a block, ragged tiles
SHAPES = [
    (1, 16, 32),
    (1, 7, 5),
    (2, 3, 2),
    (3, 16, 1),
    (5, 12, 13),
    (7, 17, 97),
    (8, 64, 64),
    (9, 5, 211),
    (13, 40, 131),
    (16, 24, 63),
    (17, 48, 101),
    (23, 33, 65),
    (31, 16, 127),
    (32, 32, 128),
    (33, 31, 129),
    (37, 9, 257),
    (41, 50, 61),
    (47, 2, 37),
    (64, 20, 100),
    (65, 35, 191),
    (70, 64, 67),
    (96, 13, 300),
]


@pytest.fixture(autouse=True)
def small_fallback_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the torch fallback visit the vocabulary in many small chunks, as it does at scale."""
    monkeypatch.setattr("wpo_kernels.fallback.CHUNK_ELEMENTS", 64)


def check_against_reference(
    inputs: dict, dtype: torch.dtype, backend: str, value_floor: float = 1.0, **options
) -> None:
    """Values and gradients of every output against the fp64 reference; ``value_floor`` is the scale
    below which value errors count absolutely (the logits' magnitude for huge logits)."""
    grad_out = torch.randn(inputs["targets"].shape, generator=torch.Generator().manual_seed(1))
    out = fused_linear_logprobs(
        inputs["hidden"],
        inputs["weight"],
        inputs["targets"],
        bias=inputs["bias"],
        outputs=OUTPUT_NAMES,
        backend=backend,
        **options,
    )
    (out.logprobs * grad_out.to(out.logprobs.device)).sum().backward()

    ref_inputs = as_fp64_leaves(inputs)
    ref = reference_linear_logprobs(
        ref_inputs["hidden"], ref_inputs["weight"], ref_inputs["targets"], bias=ref_inputs["bias"], **options
    )
    (ref.logprobs * grad_out.double()).sum().backward()

    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name in OUTPUT_NAMES:
        value = getattr(out, name)
        assert value.dtype == expected_dtype and value.shape == inputs["targets"].shape
        assert rel_err(value, getattr(ref, name), value_floor) < VALUE_RTOL[dtype], name
    for name in ("hidden", "weight", "bias"):
        if inputs[name] is not None:
            assert inputs[name].grad.dtype == dtype
            assert rel_err(inputs[name].grad, ref_inputs[name].grad) < GRAD_RTOL[dtype], f"d{name}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,h,v", SHAPES)
def test_shapes_and_dtypes(n: int, h: int, v: int, dtype: torch.dtype, backend: str, device: str) -> None:
    if backend == "torch" and device == "cuda":
        pytest.skip("the torch fallback is for CPU tensors")
    inputs = make_inputs(n, h, v, dtype, device, bias=(n % 2 == 1), n_ignored=n // 4, seed=n * 1000 + v)
    check_against_reference(inputs, dtype, backend)


OPTION_CASES = {
    "softcap": dict(softcap=3.0),
    "temperature": dict(temperature=0.6),
    "logit_scale": dict(logit_scale=0.25),
    "all_transforms": dict(softcap=5.0, temperature=1.7, logit_scale=3.0),
    "ignore_index": dict(ignore_index=7),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", OPTION_CASES)
def test_options(case: str, dtype: torch.dtype, backend: str, device: str) -> None:
    if backend == "torch" and device == "cuda":
        pytest.skip("the torch fallback is for CPU tensors")
    options = OPTION_CASES[case]
    inputs = make_inputs(
        29,
        19,
        83,
        dtype,
        device,
        bias=True,
        n_ignored=5,
        ignore_index=options.get("ignore_index", -100),
        weight_scale=4.0,
    )
    check_against_reference(inputs, dtype, backend, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", [c for c, options in OPTION_CASES.items() if "softcap" not in options])
def test_fallback_backward_from_kept_exp(
    case: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback's backward from the ``exp(z - max)`` its forward kept (fallback.keeps_exp; no
    softcap), two GEMMs and the one-hot terms, against the reference (confident rows included)."""
    monkeypatch.setattr("wpo_kernels.linear_logprobs.keeps_exp", lambda n_tokens, vocab: True)
    options = OPTION_CASES[case]
    inputs = make_inputs(
        29, 19, 83, dtype, "cpu", bias=True, n_ignored=5,
        ignore_index=options.get("ignore_index", -100), weight_scale=4.0,
    )
    check_against_reference(inputs, dtype, "torch", **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_ignored(backend: str, device: str) -> None:
    inputs = make_inputs(6, 8, 20, torch.float32, device, bias=True, n_ignored=6)
    out = fused_linear_logprobs(
        inputs["hidden"], inputs["weight"], inputs["targets"], bias=inputs["bias"], backend=backend
    )
    assert torch.equal(out.logprobs, torch.zeros_like(out.logprobs))
    out.logprobs.sum().backward()
    for name in ("hidden", "weight", "bias"):
        assert torch.equal(inputs[name].grad, torch.zeros_like(inputs[name].grad)), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend: str, device: str) -> None:
    inputs = make_inputs(0, 8, 20, torch.float32, device, bias=True)
    out = fused_linear_logprobs(
        inputs["hidden"],
        inputs["weight"],
        inputs["targets"],
        bias=inputs["bias"],
        outputs=OUTPUT_NAMES,
        backend=backend,
    )
    assert all(t.shape == (0,) for t in out.as_dict().values())
    out.logprobs.sum().backward()
    assert torch.equal(inputs["weight"].grad, torch.zeros_like(inputs["weight"].grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_and_huge_logits(backend: str, device: str) -> None:
    """-inf bias entries (a masked vocabulary) and logits of order 1e4 stay finite and exact."""
    inputs = make_inputs(12, 16, 40, torch.float32, device, bias=True)
    with torch.no_grad():
        inputs["bias"][::3] = float("-inf")
        inputs["hidden"].mul_(3e3)
    inputs["targets"] = 3 * (inputs["targets"] // 3 % 13) + 1  # never a masked entry
    check_against_reference(inputs, torch.float32, backend, value_floor=1e4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_on_masked_entry_gives_minus_inf_not_nan(backend: str, device: str) -> None:
    inputs = make_inputs(4, 8, 10, torch.float32, device, bias=True)
    with torch.no_grad():
        inputs["bias"][3] = float("-inf")
    inputs["targets"][0] = 3
    out = fused_linear_logprobs(
        inputs["hidden"],
        inputs["weight"],
        inputs["targets"],
        bias=inputs["bias"],
        outputs=OUTPUT_NAMES,
        backend=backend,
    )
    assert out.logprobs[0] == float("-inf") and torch.isfinite(out.logprobs[1:]).all()
    assert all(torch.isfinite(t).all() for name, t in out.as_dict().items() if name != "logprobs")
    out.logprobs[1:].sum().backward()
    assert torch.isfinite(inputs["weight"].grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_and_non_contiguous_inputs(backend: str, device: str) -> None:
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(24, 3, 5, generator=g).to(device).permute(1, 2, 0).requires_grad_()  # [3, 5, 24]
    weight_full = torch.randn(24, 90, generator=g).to(device) * 0.3
    weight = weight_full.T[::2].detach().requires_grad_()  # [45, 24], strided rows and columns
    weight_nc = weight.T.contiguous().T  # non-contiguous view with the same values
    targets = torch.randint(0, 45, (3, 5), generator=g).to(device)
    targets[1, 2] = -100
    out = fused_linear_logprobs(hidden, weight_nc, targets, outputs=OUTPUT_NAMES, backend=backend)
    ref = reference_linear_logprobs(hidden.reshape(-1, 24), weight, targets.reshape(-1))
    assert out.logprobs.shape == (3, 5)
    for name in OUTPUT_NAMES:
        assert rel_err(getattr(out, name).reshape(-1), getattr(ref, name)) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_only_path_saves_nothing(backend: str, device: str) -> None:
    inputs = make_inputs(10, 8, 30, torch.float32, device)
    with torch.no_grad():
        out = fused_linear_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], backend=backend)
    assert out.logprobs.grad_fn is None and out.lse is None
    ref = reference_linear_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"])
    assert rel_err(out.logprobs, ref.logprobs) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_outputs(backend: str, device: str) -> None:
    inputs = make_inputs(4, 8, 30, torch.float32, device)
    out = fused_linear_logprobs(
        inputs["hidden"], inputs["weight"], inputs["targets"], outputs=("log_sum_sq_probs",), backend=backend
    )
    assert set(out.as_dict()) == {"logprobs", "log_sum_sq_probs"}
    assert not out.log_sum_sq_probs.requires_grad and out.logprobs.requires_grad


def test_gradcheck_fallback_fp64() -> None:
    inputs = make_inputs(6, 5, 11, torch.float64, "cpu", bias=True, n_ignored=1)
    fn = lambda h, w, b: (
        fused_linear_logprobs(
            h, w, inputs["targets"], bias=b, softcap=2.0, temperature=0.8, logit_scale=1.5, backend="torch"
        ).logprobs
    )
    assert torch.autograd.gradcheck(fn, (inputs["hidden"], inputs["weight"], inputs["bias"]))


def test_auto_backend_matches_explicit(device: str) -> None:
    inputs = make_inputs(9, 8, 30, torch.float32, device)
    a = fused_linear_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"]).logprobs
    b = fused_linear_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], backend="triton")
    b = b.logprobs
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,h,v", [(1000, 512, 32003), (4096, 1024, 8192)])
def test_compiled_kernels_at_model_scale(n: int, h: int, v: int, dtype: torch.dtype) -> None:
    """Compiled (not interpreted) kernels on real-sized heads, including autotuned block sizes."""
    inputs = make_inputs(n, h, v, dtype, "cuda", bias=True, n_ignored=17, weight_scale=3.0)
    check_against_reference(inputs, dtype, "triton", softcap=30.0)


@pytest.mark.parametrize("n,h,v", [(33, 40, 131), (64, 32, 64)])
def test_gpu_operand_path_fp16_in_interpreter(
    n: int, h: int, v: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU's operand path (no upcast: ``tl.dot`` on fp16 tiles, ``dL`` rounded to fp16 for the
    gradient GEMMs) run in the interpreter, whose fp16 dot is exact: the GPU's precision budget holds."""
    from wpo_kernels.kernels import backward, forward, logits_tile

    if not logits_tile.interpreter_active():
        pytest.skip("runs the GPU operand path in the interpreter; on a GPU the other tests cover it")

    def gpu_switches(dtype: torch.dtype) -> dict[str, object]:
        return {**logits_tile.dot_switches(dtype), "UPCAST_DOT": dtype == torch.bfloat16}

    monkeypatch.setattr(forward, "dot_switches", gpu_switches)
    monkeypatch.setattr(backward, "dot_switches", gpu_switches)
    inputs = make_inputs(n, h, v, torch.float16, "cpu", bias=True, n_ignored=3)
    check_against_reference(inputs, torch.float16, "triton", softcap=20.0)
