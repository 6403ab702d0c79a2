"""The static H100 report (``python -m benchmarks.static_report``) on this CPU machine: every shipped kernel
variant compiled for sm_90a as a launch compiles it, and the plan's promises at real LM-head shapes.

Both tests run the compiler in a subprocess without ``TRITON_INTERPRET`` (the interpreter skips codegen).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_SHARED_PER_BLOCK = 232_448  # sm_90: 227 KB
GEMMA_16K_BACKWARD_BUDGET = 64 * 2**20
KERNEL_KEYS = {
    "name", "dtype", "config", "switches", "registers", "spill_bytes", "shared_bytes", "wgmma", "atomics"
}
PLAN_KEYS = {"head", "n", "pass", "programs", "sm_count", "workspace_bytes", "predicted_ratio"}


def _compiler_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9's default (fusion on), without its warning
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("static_report") / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.static_report", "--json", str(out)],
        cwd=ROOT, env=_compiler_env(), capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert out.with_suffix(".md").read_text().count("\n|") > 10
    return json.loads(out.read_text())


def test_report_shape_and_coverage(report: dict) -> None:
    """The issue's JSON shape; every Triton kernel of the plan, every shipped config, bf16 and fp16, both
    switch settings; the six plan points, forward and backward."""
    from wpo_kernels.kernels.launch_plan import shipped_configs

    assert set(report) == {"kernels", "plan"}
    assert all(set(k) == KERNEL_KEYS for k in report["kernels"])
    passes = [p for p in report["plan"] if p["pass"] != "step"]  # the step's rows: tests/test_step_report.py
    assert all(set(p) == PLAN_KEYS for p in passes)
    for kernel_name in ("vocab_stats", "grad_logits"):
        for config in shipped_configs(kernel_name, interpreter=False):
            for dtype in ("bf16", "fp16"):
                entries = [
                    k for k in report["kernels"]
                    if k["name"] == f"_{kernel_name}_kernel" and k["dtype"] == dtype
                    and (k["config"]["BLOCK_N"], k["config"]["BLOCK_V"], k["config"]["BLOCK_D"],
                         k["config"]["num_warps"], k["config"]["num_stages"])
                    == (config.block_n, config.block_v, config.block_d, config.num_warps, config.num_stages)
                ]
                switch_sets = {tuple(sorted(k["switches"].items())) for k in entries}
                assert len(switch_sets) >= 2, (kernel_name, config, dtype)
    points = {(p["head"], p["n"], p["pass"]) for p in passes}
    assert points == {
        (head, n, pass_name)
        for head in ("Llama-3-8B", "Gemma-2-9B") for n in (1024, 4096, 16384)
        for pass_name in ("forward", "backward")
    }


def test_half_precision_kernels_neither_spill_nor_overflow_shared_and_use_wgmma(report: dict) -> None:
    half = [k for k in report["kernels"] if k["dtype"] in ("bf16", "fp16")]
    assert half
    for k in half:
        label = (k["name"], k["dtype"], k["config"], k["switches"])
        assert k["spill_bytes"] == 0, label
        assert 0 <= k["shared_bytes"] <= MAX_SHARED_PER_BLOCK, label
        assert k["wgmma"] is True, label
        assert 0 < k["registers"] <= 255, label


def test_every_compiled_kernel_can_launch(report: dict) -> None:
    """fp32 (tf32) included: a config whose pipeline exceeds the per-block shared memory is not a
    candidate the autotuner tries (the report compiles what the autotuner keeps after pruning)."""
    for k in report["kernels"]:
        assert k["shared_bytes"] <= MAX_SHARED_PER_BLOCK, (k["name"], k["dtype"], k["config"])


def test_no_fenced_atomics(report: dict) -> None:
    forms = {form for k in report["kernels"] for form in k["atomics"]}
    assert not any("acq_rel" in form for form in forms), forms


def test_plan_promises_at_real_heads(report: dict) -> None:
    for p in (p for p in report["plan"] if p["pass"] != "step"):
        label = (p["head"], p["n"], p["pass"])
        assert p["sm_count"] == 132
        if p["pass"] == "forward":
            assert p["programs"] >= 2 * p["sm_count"], label
        if p["n"] >= 4096:
            assert p["predicted_ratio"] <= (1.15 if p["pass"] == "forward" else 1.5), (label, p)
        assert p["predicted_ratio"] >= 1.0, label  # nothing beats cuBLAS in this model
    (gemma,) = [
        p for p in report["plan"] if (p["head"], p["n"], p["pass"]) == ("Gemma-2-9B", 16384, "backward")
    ]
    assert gemma["workspace_bytes"] <= GEMMA_16K_BACKWARD_BUDGET


def test_epilogue_count_reads_the_tile_loop_around_the_mma_loop() -> None:
    """Instructions of the innermost loop around the HGMMA loop, minus that loop; the whole kernel when
    there is no such loop; nothing without HGMMA."""
    from benchmarks.launch_compile import epilogue_counts

    def sass(lines: list[str]) -> str:
        return "\n".join(f"        /*{16 * i:04x}*/   {text} ;   /* 0x0 */" for i, text in enumerate(lines))

    mma_loop = ["LDGSTS [R1], [R2]", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24", "@!P6 BRA 0x30"]
    tile_loop = (
        ["MOV R0, R1", "MOV R3, R4"] + mma_loop
        + ["MUFU.EX2 R5, R6", "FADD R7, R5, R7", "@P0 MUFU.RCP R8, R8", "@!P2 BRA 0x10"]
    )
    assert epilogue_counts(sass(["S2R R0, SR_TID.X"] + tile_loop + ["EXIT"])) == (6, 2)
    one_tile = ["S2R R0, SR_TID.X", "MOV R0, R1"] + mma_loop + ["MUFU.EX2 R5, R6", "STG.E [R2], R5", "EXIT"]
    one_tile[4] = "@!P6 BRA 0x20"
    assert epilogue_counts(sass(one_tile)) == (5, 1)
    assert epilogue_counts(sass(["MOV R0, R1", "MUFU.EX2 R5, R6", "EXIT"])) is None


SPECIALISATION_PROBE = textwrap.dedent("""
    import json, torch
    from benchmarks.launch_compile import capture, launch_key
    from wpo_kernels.kernels.forward import triton_vocab_stats
    from wpo_kernels.types import LogitTransform

    def key(hidden, weight):
        targets = torch.empty(hidden.shape[0], dtype=torch.int64, device="meta")
        (launch, *_) = capture(lambda: triton_vocab_stats(hidden, weight, None, targets, LogitTransform()))
        kwargs = {**launch.kwargs, **launch.configs[0].all_kwargs()}
        _, specialization, _ = launch_key(launch.kernel, launch.args, kwargs)
        names = [p.name for p in launch.kernel.params]
        return dict(zip(names, specialization))

    meta = {"device": "meta", "dtype": torch.bfloat16}
    aligned = key(torch.empty(1024, 4096, **meta), torch.empty(32000, 4096, **meta))
    # odd sizes, a hidden with stride 2 along H, a weight view starting 2 bytes in
    weight = torch.empty(32001 * 1000 + 1, **meta)[1:].view(32001, 1000)
    odd = key(torch.empty(1000, 2000, **meta)[:, ::2], weight)
    print(json.dumps({"aligned": aligned, "odd": odd}))
""")


def test_launch_specialisation_is_the_jits() -> None:
    """What the report compiles is keyed by the JIT's own binder on the launch's real arguments: unit
    strides become constexpr 1, 16-divisible pointers and integers get the ``D`` (divisibility 16)
    attribute, and neither happens where the arguments do not allow it."""
    result = subprocess.run(
        [sys.executable, "-c", SPECIALISATION_PROBE],
        cwd=ROOT, env=_compiler_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    spec = json.loads(result.stdout.strip().splitlines()[-1])
    aligned, odd = spec["aligned"], spec["odd"]
    assert aligned["stride_hd"] == aligned["stride_wd"] == "('constexpr', 1)"
    for name in ("H_ptr", "W_ptr", "N", "D", "stride_hn", "stride_wv"):
        assert aligned[name].endswith("'D')"), (name, aligned[name])
    assert odd["stride_hd"] == "('i32', '')"  # stride 2: neither constexpr nor divisible by 16
    assert odd["stride_hn"].endswith("'D')")  # 2000
    assert odd["stride_wd"] == "('constexpr', 1)"
    for name in ("W_ptr", "N", "D", "stride_wv"):
        assert not odd[name].endswith("'D')"), (name, odd[name])


def test_step_rows_and_kernels(report: dict) -> None:
    """The paired training step (issue 18): its plan rows and its two kernels, every dtype, without
    spills or atomics (the rows' own promises: tests/test_step_report.py)."""
    step = [p for p in report["plan"] if p["pass"] == "step"]
    assert len(step) == 2 * 3 * 2 * 2
    assert all({"workspace_bytes", "predicted_ratio", "route"} <= set(p) for p in step)
    names = ("_row_stats_kernel", "_logit_grad_kernel")
    kernels = [k for k in report["kernels"] if k["name"] in names]
    assert {(k["name"], k["dtype"]) for k in kernels} == {
        (name, dtype) for name in names for dtype in ("bf16", "fp16", "fp32")
    }
    assert all(k["spill_bytes"] == 0 and k["atomics"] == [] for k in kernels)
