"""Measure the kernels at the launch plan's points on a GPU: forward ÷ one cuBLAS GEMM, backward ÷ three.

``python -m benchmarks.plan_timing [--json PATH] [--n 1024 4096 16384]`` (CUDA only, ``TRITON_INTERPRET``
unset). For the Llama-3-8B and Gemma-2-9B heads (bf16, all five statistics, no bias) it times, with
``triton.testing.do_bench`` (median), the forward launcher and the backward launcher (``dH`` and ``dW``)
against ``hidden @ weight.T`` and against the backward's three GEMMs on a materialised ``[N, V]`` bf16
``dZ``, and records the plan's programs and workspace beside them. These are the measurements that
check the cost model's predictions (``benchmarks/cost_model.py``).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from wpo_kernels.kernels import backward, forward
from wpo_kernels.types import LogitTransform

HEADS = {"Llama-3-8B": (4096, 128256, None), "Gemma-2-9B": (3584, 256000, 30.0)}


def measure(head: str, n: int) -> dict[str, object]:
    """One plan point: times in ms and the ratios to the cuBLAS floors."""
    h, v, softcap = HEADS[head]
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.randn(v, h, device="cuda", generator=g) * h**-0.5).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    transform = LogitTransform(softcap=softcap)
    grad = torch.randn(n, device="cuda", generator=g)

    def fwd():
        return forward.triton_vocab_stats(hidden, weight, None, targets, transform, need_mean_logit=True)

    lse = fwd().lse

    def bwd():
        return backward.triton_linear_logprobs_backward(hidden, weight, None, targets, lse, grad, transform)

    t_fwd = triton.testing.do_bench(fwd, warmup=50, rep=200)
    t_bwd = triton.testing.do_bench(bwd, warmup=50, rep=200)
    t_gemm = triton.testing.do_bench(lambda: hidden @ weight.T, warmup=50, rep=200)
    dz = torch.empty((n, v), device="cuda", dtype=torch.bfloat16)
    t_dh = triton.testing.do_bench(lambda: dz @ weight, warmup=50, rep=200)
    t_dw = triton.testing.do_bench(lambda: dz.T @ hidden, warmup=50, rep=200)
    fplan = forward.plan_for(hidden, weight, None, transform, True)
    bplan = backward.plan_for(hidden, weight, None, transform)
    three = t_gemm + t_dh + t_dw
    return {
        "head": head, "n": n, "forward_ms": t_fwd, "gemm_ms": t_gemm, "forward_ratio": t_fwd / t_gemm,
        "backward_ms": t_bwd, "three_gemms_ms": three, "backward_ratio": t_bwd / three,
        "forward_programs": fplan.programs, "forward_workspace_bytes": fplan.workspace_bytes,
        "backward_workspace_bytes": bplan.workspace_bytes, "slab_rows": bplan.slab_rows,
        "chunk_cols": bplan.chunk_cols,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--heads", nargs="+", default=list(HEADS))
    args = parser.parse_args()
    rows = []
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}")
    for head in args.heads:
        for n in args.n:
            row = measure(head, n)
            rows.append(row)
            print(
                f"{head} N={n}: forward {row['forward_ms']:.2f} ms = {row['forward_ratio']:.2f}x GEMM "
                f"({row['gemm_ms']:.2f}); backward {row['backward_ms']:.2f} ms = "
                f"{row['backward_ratio']:.2f}x three GEMMs ({row['three_gemms_ms']:.2f}); "
                f"programs {row['forward_programs']}, "
                f"workspace fwd {row['forward_workspace_bytes']} bwd {row['backward_workspace_bytes']}",
                flush=True,
            )
            torch.cuda.empty_cache()
    if args.json:
        meta = {
            "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
