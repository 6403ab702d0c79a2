"""Timing, peak memory, benchmark inputs and machine info: the one harness every provider runs under.

Timing
    CUDA: CUDA events around each call, after a warm-up; the median over repeats (as
    ``triton.testing.do_bench(return_mode="median")``, but with the repeat count set from a time
    budget instead of five extra estimation calls, which matter when one call takes a second).
    CPU: ``time.perf_counter`` around each call; the median over repeats.

Peak memory (bytes above what was allocated before the call, so inputs are excluded; outputs and
gradients, the same for every implementation, are included; what they hold at the end is recorded
separately as ``retained``, so ``peak - retained`` is the scratch memory alone)
    CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
    ``memory_allocated()`` before the call.
    CPU: the torch CPU allocator's own peak, replayed from ``torch.profiler``'s allocation events
    (``profile_memory=True``): every tensor allocation and free is recorded with its size and time, and
    the running sum's maximum is the peak. This is exact for tensors, independent of glibc's caching of
    freed pages (which makes an RSS high-water mark depend on what ran before in the process), and runs
    in-process. It does not see non-tensor scratch memory (oneDNN/MKL workspaces), which is small next
    to ``[N, V]`` logits. It runs as a separate, untimed call, since the profiler slows small ops.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata

import torch
from torch import Tensor

from benchmarks.shapes import PROMPT_FRACTION, Head

IGNORE_INDEX = -100
MIB = float(1 << 20)


@dataclass
class OpInputs:
    """Inputs of the fused op: ``hidden [N, H]``, ``weight [V, H]``, ``targets [N]`` (all valid) and the
    upstream gradient ``grad_out [N]`` that the forward+backward pass feeds to ``logprobs``."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    grad_out: Tensor
    head: Head

    @property
    def leaves(self) -> tuple[Tensor, ...]:
        return (self.hidden, self.weight)


@dataclass
class StepInputs:
    """Inputs of one preference-loss step on ``B`` pairs of ``T``-token sequences, chosen first:
    ``hidden [2B, T, H]``, ``targets [2B, T]`` (the prompt part is ``IGNORE_INDEX``), reference
    sequence log-probs ``ref_chosen``/``ref_rejected [B]`` (precomputed, as in TRL's DPO trainer)."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    head: Head
    beta: float = 0.1

    @property
    def leaves(self) -> tuple[Tensor, ...]:
        return (self.hidden, self.weight)

    @property
    def mask(self) -> Tensor:
        return self.targets != IGNORE_INDEX


def _random_head(head: Head, n: int, device: str, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    # logits of a few units (std ~2), never zeros: zeros hide wrong indexing and can run faster.
    # Drawn on the device: a real head's weight is ~10^9 numbers, seconds of work for a CPU generator.
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, head.hidden, generator=g, device=device).to(dtype)
    weight = torch.randn(head.vocab, head.hidden, generator=g, device=device).mul_(2.0 / head.hidden**0.5)
    return hidden, weight.to(dtype)


def make_op_inputs(
    head: Head, n: int, device: str, dtype: torch.dtype, *, requires_grad: bool, seed: int = 0
) -> OpInputs:
    """Fresh random inputs of the fused op for ``head`` at ``n`` tokens."""
    hidden, weight = _random_head(head, n, device, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, head.vocab, (n,), generator=g).to(device)
    grad_out = torch.randn(n, generator=g).to(device)
    return OpInputs(
        hidden.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), targets, grad_out, head
    )


def make_step_inputs(
    head: Head, n: int, seq_len: int, device: str, dtype: torch.dtype, *, seed: int = 0
) -> StepInputs:
    """Fresh random inputs of one loss step: ``n // seq_len`` sequences (at least 2, an even number)."""
    n_seq = max(2, (n // seq_len) // 2 * 2)
    hidden, weight = _random_head(head, n_seq * seq_len, device, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, head.vocab, (n_seq, seq_len), generator=g)
    targets[:, : int(seq_len * PROMPT_FRACTION)] = IGNORE_INDEX
    n_pairs = n_seq // 2
    completion = (targets != IGNORE_INDEX).sum(1)[:n_pairs].float()
    # reference sequence log-probs of the size a random head gives (about -log V per token)
    typical = -completion * torch.log(torch.tensor(float(head.vocab)))
    ref_chosen = typical + torch.randn(n_pairs, generator=g)
    ref_rejected = typical + torch.randn(n_pairs, generator=g)
    return StepInputs(
        hidden.reshape(n_seq, seq_len, head.hidden).requires_grad_(),
        weight.requires_grad_(),
        targets.to(device),
        ref_chosen.to(device),
        ref_rejected.to(device),
        head,
    )


@dataclass
class Timing:
    """Wall time of one call in milliseconds: median, 20th/80th percentiles and minimum over ``repeats``."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    repeats: int


def _clear_grads(tensors: Sequence[Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _summarise(times_ms: list[float]) -> Timing:
    qs = statistics.quantiles(times_ms, n=5) if len(times_ms) > 1 else [times_ms[0]] * 4
    return Timing(statistics.median(times_ms), qs[0], qs[-1], min(times_ms), len(times_ms))


def _timed_call(fn: Callable[[], object], cuda: bool) -> float:
    """Milliseconds of one ``fn()``: CUDA events on a GPU, ``time.perf_counter`` on a CPU."""
    if cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_fn(
    fn: Callable[[], object],
    device: str,
    *,
    grad_to_none: Sequence[Tensor] = (),
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 50,
    budget_s: float = 1.0,
) -> Timing:
    """Median wall time of ``fn()``: ``warmup`` untimed calls, then repeats until both ``min_repeats``
    and ``budget_s`` seconds (or ``max_repeats``) are reached. Gradients of ``grad_to_none`` are reset
    before each call, outside the timed region."""
    return time_interleaved(
        [fn],
        device,
        grad_to_none=grad_to_none,
        warmup=warmup,
        min_repeats=min_repeats,
        max_repeats=max_repeats,
        budget_s=budget_s,
    )[0]


def time_interleaved(
    fns: Sequence[Callable[[], object]],
    device: str,
    *,
    grad_to_none: Sequence[Tensor] = (),
    warmup: int = 1,
    min_repeats: int = 5,
    max_repeats: int = 50,
    budget_s: float = 1.0,
) -> list[Timing]:
    """Median wall time of each of ``fns``, timed in rounds: every round calls each function once (the
    order rotating from round to round), so that a change of load on a shared machine falls on all of
    them alike. ``warmup`` untimed rounds, then rounds until both ``min_repeats`` and ``budget_s``
    seconds of the whole (or ``max_repeats``) are reached. Gradients of ``grad_to_none`` are reset
    before each call, outside the timed region."""
    cuda = device == "cuda"
    for _ in range(warmup):
        for fn in fns:
            _clear_grads(grad_to_none)
            fn()
    if cuda:
        torch.cuda.synchronize()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    rounds = 0
    while rounds < min_repeats or (rounds < max_repeats and time.perf_counter() - start < budget_s):
        for k in range(len(fns)):
            i = (k + rounds) % len(fns)
            _clear_grads(grad_to_none)
            times[i].append(_timed_call(fns[i], cuda))
        rounds += 1
    return [_summarise(t) for t in times]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (kineto prints a line to it at every profiler start and stop)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocator_peak(fn: Callable[[], object]) -> tuple[int, int]:
    """``(peak, retained)``: bytes the torch CPU allocator held above its level at the start of ``fn()``,
    at most and at the end (outputs and gradients)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    del out
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak, level


def peak_memory(
    fn: Callable[[], object], device: str, *, grad_to_none: Sequence[Tensor] = ()
) -> tuple[int, int]:
    """``(peak, retained)`` bytes of one call of ``fn()`` above what was allocated before it (module
    docstring): the most held during the call, and what is still held after it (outputs, gradients)."""
    _clear_grads(grad_to_none)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        retained = torch.cuda.memory_allocated() - base
        del out
        return peak, retained
    return _cpu_allocator_peak(fn)


def matmul_floor(inputs: OpInputs, device: str, *, budget_s: float = 0.5) -> Timing:
    """Time of the bare ``hidden @ weight.T`` (cuBLAS on a GPU, oneDNN/MKL on a CPU) at the same shape and
    dtype: the physical floor of the forward (a backward adds two GEMMs of the same size). Use its
    ``min_ms``: a floor is the best the GEMM does, not its typical time on a busy machine."""
    h, w = inputs.hidden.detach(), inputs.weight.detach()
    with torch.no_grad():
        return time_fn(lambda: h @ w.T, device, budget_s=budget_s)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, *, date: str | None = None) -> dict[str, object]:
    """Device, versions and date, for the JSON and the markdown header."""
    info: dict[str, object] = {
        "date": date or datetime.date.today().isoformat(),
        "device": device,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            name: _version(dist)
            for name, dist in (
                ("torch", "torch"),
                ("triton", "triton"),
                ("trl", "trl"),
                ("liger-kernel", "liger-kernel"),
                ("cut-cross-entropy", "cut-cross-entropy"),
                ("transformers", "transformers"),
                ("wpo-kernels", "wpo-kernels"),
            )
        },
        "memory_method": (
            "torch.cuda.max_memory_allocated above the pre-call level"
            if device == "cuda"
            else "torch CPU allocator peak above the pre-call level, from torch.profiler allocation events"
        ),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def device_tag(device: str) -> str:
    """``cpu``, or ``cuda-h100`` / ``cuda-h200`` / ``cuda`` from the GPU's name (result file names)."""
    if device != "cuda":
        return device
    name = torch.cuda.get_device_name(0).lower()
    for chip in ("h200", "h100", "a100", "l40s", "b200"):
        if chip in name:
            return f"cuda-{chip}"
    return "cuda"
