"""pytest-benchmark view of the suite: every provider × mode on one tiny head, on CUDA when there is
one, else CPU. ``pytest benchmarks/ --benchmark-only``; the runner (``python -m benchmarks.run``) is
what produces the tables."""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import make_op_inputs, make_step_inputs
from benchmarks.providers import MODES, PROVIDERS
from benchmarks.shapes import Head

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
HEADS = [Head("tiny", 128, 4000, trl_chunk_size=1024), Head("tiny-softcap", 128, 4000, 30.0, 1024)]
N_TOKENS, SEQ_LEN = 512, 128


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.name)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider_cls", PROVIDERS, ids=lambda c: c.name)
def test_bench(benchmark, provider_cls, mode: str, head: Head) -> None:
    provider = provider_cls(DEVICE)
    ok, why = provider.available()
    if not ok:
        pytest.skip(why)
    ok, why = provider.supports(mode, head)
    if not ok:
        pytest.skip(why)
    if mode == "step":
        inputs = make_step_inputs(head, N_TOKENS, SEQ_LEN, DEVICE, DTYPE)
        fn = provider.make_step(inputs)
    else:
        inputs = make_op_inputs(head, N_TOKENS, DEVICE, DTYPE, requires_grad=mode != "forward")
        fn = provider.make_forward(inputs) if mode == "forward" else provider.make_forward_backward(inputs)

    def run() -> None:
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    def clear_grads() -> None:
        for t in inputs.leaves:
            t.grad = None

    benchmark.group = f"{head.name} {mode}"
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), n_tokens=N_TOKENS, vocab=head.vocab)
    benchmark.pedantic(run, setup=clear_grads, rounds=5, warmup_rounds=1)
