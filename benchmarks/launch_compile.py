"""Compile exactly what a launch compiles, for Hopper (sm_90a), on a machine without a GPU.

A launch specialises a Triton kernel on its arguments: an integer equal to 1 (a unit stride) becomes a
constexpr, pointers and integers divisible by 16 get ``tt.divisibility=16``. A kernel compiled without
that specialisation is a different kernel (other loads, other atomics, other registers). So nothing here
rebuilds a signature by hand:

1. :func:`captured_launches` runs the real launcher on ``meta`` tensors (real shapes, strides, dtypes
   and pointer offsets, no storage) and records each ``kernel[grid](...)`` call instead of launching it;
2. :func:`launch_source` feeds the recorded arguments through the JIT's own binder
   (``create_function_from_signature`` + ``JITFunction._pack_args``, the code ``JITFunction.run`` uses)
   with the sm_90 backend, giving the signature, constexprs and attributes a launch on an H100 compiles;
3. :func:`compile_facts` compiles that source with the real compiler chain (Triton -> PTX -> Triton's
   bundled ptxas) and reads the static facts: registers and spills (ptxas ``-v``), shared memory, whether
   every ``tl.dot`` became a Hopper ``wgmma``, the PTX atomic / reduction forms, and the epilogue's SASS
   instruction and MUFU counts per tile (``cuobjdump -sass``, see :func:`epilogue_counts`).

The interpreter must be off in the compiling process (``TRITON_INTERPRET`` unset): it skips codegen.
Works with triton 3.6 (the GPU image) and 3.9 (this project's pin); the APIs used are the same in both.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import triton
from torch.utils._python_dispatch import TorchDispatchMode
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

HOPPER = GPUTarget("cuda", 90, 32)


@dataclass
class CapturedLaunch:
    """One ``kernel[grid](*args, **kwargs)`` call a launcher made. ``configs`` are the autotune candidates
    when the launch went through ``triton.autotune`` (after its ``early_config_prune``, as the autotuner
    would benchmark them), else empty (``kwargs`` carry the one config the launcher chose)."""

    kernel: JITFunction
    args: tuple
    kwargs: dict[str, Any]
    configs: list[triton.Config] = field(default_factory=list)


@contextlib.contextmanager
def captured_launches() -> Iterator[list[CapturedLaunch]]:
    """Within the block, Triton launches are recorded (in call order) instead of run."""
    launches: list[CapturedLaunch] = []

    def record_jit(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches.append(CapturedLaunch(self, args, kwargs))

    def record_autotuned(self: Autotuner, *args: Any, **kwargs: Any) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        # what Autotuner.run sets before pruning (keyword arguments are not in it there either)
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        try:
            configs = list(self.prune_configs(kwargs))
        finally:
            self.nargs = None
        launches.append(CapturedLaunch(self.fn, args, kwargs, configs))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = record_jit, record_autotuned
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = saved


@functools.cache
def _backend() -> Any:
    return make_backend(HOPPER)


@functools.cache
def _binder(kernel: JITFunction) -> Callable:
    return create_function_from_signature(kernel.signature, kernel.params, _backend())


def launch_key(kernel: JITFunction, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """What the JIT's kernel cache keys an sm_90 launch on: the kernel, each argument's specialisation
    (type, divisibility, constexpr value) and the options. Equal keys compile to the same kernel."""
    _, specialization, options = _binder(kernel)(*args, **kwargs)
    return kernel, tuple(map(str, specialization)), tuple(sorted((k, str(v)) for k, v in options.items()))


def launch_source(kernel: JITFunction, args: tuple, kwargs: dict[str, Any]) -> tuple[ASTSource, dict]:
    """The ``(ASTSource, options)`` an sm_90 launch of ``kernel(*args, **kwargs)`` compiles: the JIT's
    own argument specialisation (unit-stride constexprs, divisibility-16 attributes) on these values."""
    bound_args, specialization, options = _binder(kernel)(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        _backend(), kwargs, bound_args, specialization, options
    )
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTX_ATOMICS = re.compile(r"\b(?:atom|red)\.[a-z0-9_.]+")


@dataclass
class StaticFacts:
    """What ptxas and the PTX say about one compiled kernel (per thread for registers and spills)."""

    registers: int
    spill_bytes: int  # spill stores + spill loads
    shared_bytes: int
    wgmma: bool  # every tl.dot became a Hopper wgmma (none left to mma.sync or FMA)
    atomics: list[str]  # PTX atomic / reduction instruction forms, sorted, e.g. red.global.gpu.add.f32
    epilogue_instructions: int | None  # SASS instructions per thread per logits tile outside the MMA loop
    epilogue_mufu: int | None  # of which MUFU (exp, reciprocal, ...)


def compile_facts(source: ASTSource, options: dict[str, Any]) -> StaticFacts:
    """Compile ``source`` for sm_90a (ptxas always runs: the triton cache is bypassed, the ptxas ``-v``
    log read) and return its :class:`StaticFacts`. Raises what the compiler raises."""
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # triton prints the ptxas -v log when asked to dump it
            compiled = triton.compile(source, target=HOPPER, options=options)
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    ptxas_log = log.getvalue()
    registers = _PTXAS_REGISTERS.search(ptxas_log)
    spills = _PTXAS_SPILLS.search(ptxas_log)
    if registers is None or spills is None:
        raise RuntimeError(f"no register / spill line in the ptxas log:\n{ptxas_log}")
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    has_dot = re.search(r"\btt\.dot\b", compiled.asm["ttir"]) is not None
    # a tl.dot not converted to a warp-group dot stays `tt.dot` in TTGIR (-> mma.sync or FMA)
    all_wgmma = re.search(r"\btt\.dot\b", ttgir) is None and "mma.sync" not in ptx
    epilogue = epilogue_counts(_sass(compiled.asm["cubin"]))
    return StaticFacts(
        registers=int(registers.group(1)),
        spill_bytes=int(spills.group(1)) + int(spills.group(2)),
        shared_bytes=int(compiled.metadata.shared),
        wgmma=all_wgmma and (not has_dot or "wgmma.mma_async" in ptx),
        atomics=sorted(set(_PTX_ATOMICS.findall(ptx))),
        epilogue_instructions=epilogue[0] if epilogue else None,
        epilogue_mufu=epilogue[1] if epilogue else None,
    )


def _sass(cubin: bytes) -> str:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        dump = subprocess.run([cuobjdump, "-sass", file.name], capture_output=True, text=True, check=True)
    return dump.stdout


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]+);")
_BACK_BRANCH = re.compile(r"\bBRA (0x[0-9a-f]+)")


def epilogue_counts(sass: str) -> tuple[int, int] | None:
    """``(instructions, MUFU instructions)`` per thread per logits tile outside the tensor-core loop, from
    a kernel's SASS; None without ``HGMMA``. The MMA loop is the innermost loop (backward branch)
    around the first ``HGMMA``; the tile is the innermost loop around that (the forward's vocabulary
    loop) or, without one (one tile per program), the whole kernel. A static count of the loop body
    (the epilogue is straight-line code, unrolled over each thread's logits); it reproduces
    ``../shared/HOPPER_STATIC.md``'s 25.6 / 42.7 instructions per logit for the eafe6c5 forward."""
    code = [(int(m.group(1), 16), m.group(2)) for m in _SASS_LINE.finditer(sass)]
    loops = [
        (int(b.group(1), 16), address) for address, text in code
        if (b := _BACK_BRANCH.search(text)) and int(b.group(1), 16) < address
    ]
    mma = next((address for address, text in code if "HGMMA" in text), None)
    if mma is None:
        return None
    inner = min((l for l in loops if l[0] <= mma <= l[1]), key=lambda l: l[1] - l[0])
    around = [l for l in loops if l[0] < inner[0] and inner[1] < l[1]]
    first, last = min(around, key=lambda l: l[1] - l[0]) if around else (code[0][0], code[-1][0])
    body = [text for at, text in code if first <= at <= last and not inner[0] <= at <= inner[1]]
    return len(body), sum("MUFU." in text for text in body)


class _SkipInplaceMath(TorchDispatchMode):
    """In-place tensor ops return their target unchanged: on meta tensors nothing is computed anyway,
    and torch's meta ``addmm_`` (a decomposition) costs milliseconds per call."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func._schema.name.endswith("_"):
            return args[0]
        return func(*args, **(kwargs or {}))


def capture(launcher: Callable[[], Any]) -> list[CapturedLaunch]:
    """Run ``launcher()`` (a call of a real launcher on meta tensors) and return its Triton launches."""
    with captured_launches() as launches, _SkipInplaceMath():
        launcher()
    return launches
