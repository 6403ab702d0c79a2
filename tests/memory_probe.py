"""Peak extra memory of one fused_linear_logprobs call on CPU, measured in a fresh process.

Run as ``python -m tests.memory_probe N V H [--backward]``; prints JSON with the peak resident-set
growth (bytes) over the inputs, and the size of the fp32 logits it avoids. Used by test_memory.py and
for the number in the README, both with ``MALLOC_MMAP_THRESHOLD_=1048576`` set (glibc's dynamic mmap
threshold otherwise keeps freed blocks resident and the peak varies from run to run).
"""

from __future__ import annotations

import argparse
import json

import torch

from wpo_kernels import OUTPUT_NAMES, fused_linear_logprobs


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", type=int)
    parser.add_argument("v", type=int)
    parser.add_argument("h", type=int)
    parser.add_argument("--backward", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    # warm up the libraries on a tiny problem, so their one-off allocations are not counted
    tiny = fused_linear_logprobs(
        torch.randn(8, args.h, requires_grad=True), torch.randn(16, args.h), torch.zeros(8, dtype=torch.long)
    )
    tiny.logprobs.sum().backward()

    hidden = torch.randn(args.n, args.h, requires_grad=args.backward)
    weight = torch.randn(args.v, args.h).div_(args.h**0.5).requires_grad_(args.backward)
    targets = torch.randint(0, args.v, (args.n,))
    reset_peak_rss()
    baseline = current_rss_bytes()

    grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    out = fused_linear_logprobs(hidden, weight, targets, outputs=OUTPUT_NAMES, backend="torch")
    if args.backward:
        out.logprobs.sum().backward()
    print(
        json.dumps(
            {
                "n": args.n,
                "v": args.v,
                "h": args.h,
                "backward": args.backward,
                # the parameter gradients are outputs the caller keeps, not working memory
                "extra_peak_bytes": peak_rss_bytes() - baseline - (grad_bytes if args.backward else 0),
                "fp32_logits_bytes": args.n * args.v * 4,
            }
        )
    )


if __name__ == "__main__":
    main()
