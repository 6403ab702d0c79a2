"""Compile the Triton kernels for Hopper (sm_90) on a machine without a GPU.

The interpreter forgives what the GPU compiler rejects (dot shapes, dtype mixes, control flow); this
runs the real compiler down to a cubin with Triton's bundled ptxas. Run as
``python -m tests.hopper_compile_probe [--all-configs]`` with ``TRITON_INTERPRET`` unset; prints one line
per kernel variant and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from wpo_kernels.kernels import backward, forward

HOPPER = GPUTarget("cuda", 90, 32)
_FLOAT_ARGS = {"pre_scale", "softcap", "post_scale", "filter_eps"}
_FP32_BUFFERS = {
    "TGT_ptr", "MAX_ptr", "LSE_ptr", "LSE2_ptr", "MEAN_ptr", "G_ptr", "DH_ptr", "DW_ptr", "DB_ptr"
}


def signature(fn: triton.JITFunction, dtype: str, constexprs: dict) -> dict[str, str]:
    """Kernel argument types: inputs of ``dtype``, fp32 statistics/gradient buffers, int64 targets."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "T_ptr":
            sig[name] = "*i64"
        elif name in _FP32_BUFFERS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}"
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


def variants(all_configs: bool):
    """(kernel, dtype, switches, config) to compile: every dtype with every switch off and on."""
    kernels = [
        (forward._vocab_stats_kernel, forward._GPU_CONFIGS, ("HAS_BIAS", "HAS_SOFTCAP", "NEED_MEAN")),
        (
            backward._linear_logprobs_bwd_kernel,
            backward._GPU_CONFIGS,
            ("HAS_BIAS", "HAS_SOFTCAP", "FILTER_GRAD"),
        ),
    ]
    for fn, configs, switches in kernels:
        for dtype in ("bf16", "fp16", "fp32"):
            for on in (False, True):
                for config in configs if all_configs else configs[:1]:
                    flags = dict.fromkeys(switches, on)
                    yield fn, dtype, {**flags, "UPCAST_DOT": False, "DOT_PRECISION": "ieee"}, config


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not the first")
    args = parser.parse_args()
    failures = 0
    for fn, dtype, switches, config in variants(args.all_configs):
        constexprs = {**switches, **config.kwargs}
        label = f"{fn.__name__} {dtype} {switches} {config.kwargs}"
        try:
            compiled = triton.compile(
                ASTSource(fn, signature(fn, dtype, constexprs), constexprs=constexprs),
                target=HOPPER,
                options={"num_warps": config.num_warps, "num_stages": config.num_stages},
            )
            print(f"ok   {label} shared={compiled.metadata.shared}", flush=True)
        except Exception as error:  # noqa: BLE001 - report every variant, then fail
            failures += 1
            print(f"FAIL {label}: {type(error).__name__}: {error}", flush=True)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
