"""The launch plan and the kernels' schedule: the plan's promises at real head sizes, the kernels under
forced many-split / many-slab / many-chunk plans against the fp64 reference, exact accumulation,
bitwise determinism, no host syncs, and real allocations equal to the plan's workspace."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import GRAD_RTOL, make_inputs, rel_err
from tests.test_linear_logprobs import check_against_reference
from wpo_kernels import fused_linear_logprobs
from wpo_kernels.kernels import backward, forward
from wpo_kernels.kernels.launch_plan import backward_plan, forward_plan
from wpo_kernels.kernels.logits_tile import interpreter_active
from wpo_kernels.types import LogitTransform

#: (H, V, softcap) of the heads the plan is sized for.
HEADS = {"llama-3-8b": (4096, 128256, False), "gemma-2-9b": (3584, 256000, True)}

needs_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreter_active()), reason="needs CUDA or TRITON_INTERPRET=1"
)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("n", [256, 1000, 1024, 4096, 16384, 65536])
def test_forward_plan_fills_the_gpu_for_every_config(head: str, n: int) -> None:
    h, v, softcap = HEADS[head]
    plan = forward_plan(
        n, v, h, torch.bfloat16, has_bias=False, has_softcap=softcap, need_mean=True, sm_count=132
    )
    for config in plan.launches[0].configs:
        programs = -(-n // config.block_n) * plan.vocab_splits
        assert programs >= 2 * 132, config
    # the splits tile the vocabulary exactly, none empty
    assert (plan.vocab_splits - 1) * plan.split_len < v <= plan.vocab_splits * plan.split_len
    assert plan.workspace_bytes == (5 * plan.vocab_splits * n * 4 if plan.vocab_splits > 1 else 0)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("n", [1024, 4096, 16384])
def test_backward_workspace_within_budget(head: str, n: int) -> None:
    h, v, softcap = HEADS[head]
    plan = backward_plan(n, v, h, torch.bfloat16, has_bias=False, has_softcap=softcap, sm_count=132)
    assert plan.workspace_bytes <= 64 * 2**20
    assert {b.name for b in plan.buffers} == {"grad_logits", "grad_hidden_slab", "grad_hidden_chunk"}
    # every (slab, chunk) block is launched and multiplied exactly once
    assert sum(g.m * g.k * g.count for g in plan.gemms if g.name == "grad_hidden") == n * v
    exact = backward_plan(
        n, v, h, torch.bfloat16, has_bias=False, has_softcap=softcap, sm_count=132,
        fp32_grad_accumulation=True,
    )
    assert exact.workspace_bytes - exact.buffer("grad_weight_fp32").nbytes <= 64 * 2**20
    assert exact.buffer("grad_weight_fp32").shape == (v, h)


@pytest.fixture
def small_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans that cut the call into many vocabulary splits, token slabs and vocabulary chunks."""

    def forward_plan_for(hidden, weight, bias, transform, need_mean_logit):
        return forward_plan(
            hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype, has_bias=bias is not None,
            has_softcap=transform.softcap is not None, need_mean=need_mean_logit, sm_count=2,
            interpreter=interpreter_active(), vocab_splits=5,
        )

    def backward_plan_for(hidden, weight, bias, transform, **options):
        return backward_plan(
            hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype, has_bias=bias is not None,
            has_softcap=transform.softcap is not None, sm_count=2, interpreter=interpreter_active(),
            slab_rows=32, chunk_cols=64, **options,
        )

    monkeypatch.setattr(forward, "plan_for", forward_plan_for)
    monkeypatch.setattr(backward, "plan_for", backward_plan_for)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,h,v,bias", [(97, 24, 389, True), (64, 16, 320, False)])
def test_many_splits_slabs_and_chunks_match_reference(
    small_plans: None, n: int, h: int, v: int, bias: bool, dtype: torch.dtype, device: str
) -> None:
    """5 vocabulary splits in the forward; 2–4 token slabs × 5–7 vocabulary chunks in the backward,
    ragged at both edges; a row block of ignored tokens (the dZ kernel's skip)."""
    inputs = make_inputs(n, h, v, dtype, device, bias=bias, n_ignored=40, seed=n + v)
    check_against_reference(inputs, dtype, "triton", softcap=15.0)


@needs_kernels
def test_fp32_grad_accumulation_exact_and_close(small_plans: None, device: str) -> None:
    """bf16 over 8 token slabs: both accumulations within tolerance of fp64; the fp32 one rounds once,
    so it is at least as close and differs from the per-slab rounding."""
    n, h, v = 256, 16, 128
    inputs = make_inputs(n, h, v, torch.bfloat16, device, seed=3)
    ref = make_inputs(n, h, v, torch.float64, "cpu", seed=3)
    grads = {}
    for exact in (False, True, None):
        src = ref if exact is None else inputs
        w = src["weight"].detach().clone().requires_grad_()
        out = fused_linear_logprobs(
            src["hidden"].detach(), w, src["targets"], fp32_grad_accumulation=bool(exact)
        )
        (grads[exact],) = torch.autograd.grad(out.logprobs.sum(), w)
    per_slab, once = rel_err(grads[False], grads[None]), rel_err(grads[True], grads[None])
    assert once <= per_slab < GRAD_RTOL[torch.bfloat16]
    assert not torch.equal(grads[False], grads[True])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradients_bitwise_reproducible_in_deterministic_mode(backend: str, device: str) -> None:
    """No atomics anywhere: two runs give identical bits, and torch's deterministic mode is accepted."""
    if backend == "triton" and not (torch.cuda.is_available() or interpreter_active()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    if backend == "torch" and device == "cuda":
        pytest.skip("the torch fallback is for CPU tensors")
    inputs = make_inputs(70, 24, 200, torch.bfloat16, device, bias=True, n_ignored=5)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            leaves = [inputs[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]
            out = fused_linear_logprobs(*leaves[:2], inputs["targets"], bias=leaves[2], backend=backend)
            runs.append(torch.autograd.grad(out.logprobs.sum(), leaves))
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@needs_kernels
def test_launchers_never_sync_with_the_host(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """Loop bounds come from shapes only: the launchers run with ``item`` / ``__bool__`` raising."""
    inputs = make_inputs(50, 16, 150, torch.bfloat16, device, bias=True, n_ignored=3)
    h, w, b, y = (inputs[k].detach() for k in ("hidden", "weight", "bias", "targets"))
    transform = LogitTransform(softcap=10.0)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync")

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
    stats = forward.triton_vocab_stats(h, w, b, y, transform, need_mean_logit=True)
    grad = torch.ones(50, device=device)
    backward.triton_linear_logprobs_backward(h, w, b, y, stats.lse, grad, transform)
    monkeypatch.undo()
    assert torch.isfinite(stats.lse).all()


class _NewStorages(TorchDispatchMode):
    """Records the bytes of every storage an op creates (outputs of aten ops whose storage is new)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()
        self.created: dict[int, int] = {}

    def remember(self, *tensors: torch.Tensor | None) -> None:
        self.seen.update(t.untyped_storage().data_ptr() for t in tensors if t is not None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for arg in [*args, *(kwargs or {}).values()]:
            if isinstance(arg, torch.Tensor):
                self.seen.add(arg.untyped_storage().data_ptr())
        result = func(*args, **(kwargs or {}))
        for out in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(out, torch.Tensor):
                storage = out.untyped_storage()
                if storage.data_ptr() not in self.seen and storage.nbytes() > 0:
                    self.created[storage.data_ptr()] = storage.nbytes()
                self.seen.add(storage.data_ptr())
        return result


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("bias,exact", [(False, False), (True, False), (True, True)])
def test_real_allocations_equal_the_plan(dtype: torch.dtype, bias: bool, exact: bool, device: str) -> None:
    """Every storage the launchers create is a returned tensor or one of the plan's buffers."""
    n, h, v = 70, 24, 200
    inputs = make_inputs(n, h, v, dtype, device, bias=bias)
    hid, w, b, y = (inputs[k].detach() if inputs[k] is not None else None for k in inputs)
    transform = LogitTransform(softcap=10.0)
    plan = forward.plan_for(hid, w, b, transform, True)
    assert plan.vocab_splits > 1 and plan.workspace_bytes > 0
    with _NewStorages() as mode:
        mode.remember(hid, w, b, y)
        stats = forward.triton_vocab_stats(hid, w, b, y, transform, need_mean_logit=True)
    returned = 5 * n * 4  # the five [N] fp32 statistics, one [5, N] tensor
    assert sum(mode.created.values()) - returned == plan.workspace_bytes

    grad = torch.randn(n, device=device)
    bplan = backward.plan_for(hid, w, b, transform, fp32_grad_accumulation=exact)
    with _NewStorages() as mode:
        mode.remember(hid, w, b, y, stats.lse, grad)
        dh, dw, db = backward.triton_linear_logprobs_backward(
            hid, w, b, y, stats.lse, grad, transform, fp32_grad_accumulation=exact
        )
    returned = sum(t.untyped_storage().nbytes() for t in (dh, dw, db) if t is not None)
    assert sum(mode.created.values()) - returned == bplan.workspace_bytes
    half = dtype != torch.float32
    expected = {"grad_logits"} | ({"grad_hidden_slab", "grad_hidden_chunk"} if half else set())
    if bias:
        expected |= {"grad_bias_chunk"} | ({"grad_bias_fp32"} if half else set())
    if exact and half:
        expected |= {"grad_weight_chunk", "grad_weight_fp32"}
    assert {buf.name for buf in bplan.buffers} == expected


def test_autotuner_and_plan_drop_configs_that_cannot_launch() -> None:
    """fp32 (tf32) operands double the pipeline's shared memory: configs over sm_90's 227 KiB leave
    both the plan's candidates and the autotuner's list; every half-precision config stays."""
    from wpo_kernels.kernels.launch_plan import MAX_SHARED_BYTES, prune_to_launchable

    for kernel_name, tuned in (
        ("vocab_stats", forward._vocab_stats_kernel_tuned),
        ("grad_logits", backward._grad_logits_kernel_tuned),
    ):
        shipped = forward.GPU_CONFIGS if kernel_name == "vocab_stats" else backward.GPU_CONFIGS
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            kept = prune_to_launchable(tuned.configs, {"H_ptr": torch.empty(0, dtype=dtype)})
            fits = [c for c in shipped if c.shared_bytes(dtype) <= MAX_SHARED_BYTES]
            assert [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"]) for c in kept] == [
                (c.block_n, c.block_v) for c in fits
            ]
            assert len(fits) == (len(shipped) - 1 if dtype == torch.float32 else len(shipped))
            plan = forward_plan(4096, 128256, 4096, dtype, has_bias=False, has_softcap=False,
                                need_mean=False, sm_count=132)
            if kernel_name == "vocab_stats":
                assert plan.launches[0].configs == tuple(fits)


@pytest.mark.gpu
def test_fp32_without_tf32_takes_the_cublas_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 CUDA inputs reach the Triton kernels only with tf32 allowed; otherwise the torch path."""
    from wpo_kernels.autograd import resolve_backend

    hidden = torch.zeros(4, 8, device="cuda")
    for allowed, expected in ((False, "torch"), (True, "triton")):
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allowed)
        assert resolve_backend("auto", hidden) == expected
        assert resolve_backend("triton", hidden) == expected
    assert resolve_backend("auto", hidden.bfloat16()) == "triton"
