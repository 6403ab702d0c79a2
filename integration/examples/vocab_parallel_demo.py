"""Vocabulary-parallel WPO log-probs on several processes, checked against the single-process result.

Launch (CPU, gloo; or one GPU per process with NCCL when CUDA is available):

    torchrun --nproc_per_node 2 integration/examples/vocab_parallel_demo.py
    torchrun --nproc_per_node 3 integration/examples/vocab_parallel_demo.py --vocab 32003 --softcap 30

Every rank holds the same tokens and a slice of the head's vocabulary rows (uneven when the vocabulary
does not divide). The script runs one forward + backward, compares values and gradients with
``fused_linear_logprobs`` on the full head, and prints the bytes all-reduced per call, measured and as
the formula ``forward 4·N·(4 + [entropy]) + 4, backward 4·N·H``.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from wpo_kernels import fused_linear_logprobs
from wpo_kernels.distributed import check_vocab_partition, vocab_parallel_linear_logprobs, vocab_shard_bounds
from wpo_kernels.types import OUTPUT_NAMES


@contextmanager
def count_all_reduce_bytes(counter: list[int]):
    """Add the payload of every ``torch.distributed.all_reduce`` in the block to ``counter[0]``."""
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        counter[0] += tensor.numel() * tensor.element_size()
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield
    finally:
        dist.all_reduce = original


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=512, help="N, tokens per call (same on all ranks)")
    parser.add_argument("--hidden", type=int, default=256, help="H")
    parser.add_argument("--vocab", type=int, default=5003, help="V, the global vocabulary size")
    parser.add_argument("--softcap", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    n, h, v = args.tokens, args.hidden, args.vocab

    # the same inputs on every rank (the head would normally be loaded already split)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device, dtype)
    full_weight = (torch.randn(v, h, generator=g) * (2.0 / h**0.5)).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    targets[: n // 10] = -100
    grad_out = torch.randn(n, generator=g).to(device)

    start, stop = vocab_shard_bounds(v, world, rank)
    check_vocab_partition(start, stop - start, v, dist.group.WORLD)
    h_par = hidden.clone().requires_grad_()
    w_shard = full_weight[start:stop].clone().requires_grad_()
    options = dict(
        softcap=args.softcap, temperature=args.temperature, backend=args.backend, outputs=OUTPUT_NAMES
    )

    fwd_bytes, bwd_bytes = [0], [0]
    t0 = time.perf_counter()
    with count_all_reduce_bytes(fwd_bytes):
        out = vocab_parallel_linear_logprobs(
            h_par,
            w_shard,
            targets,
            vocab_start=start,
            vocab_size=v,
            process_group=dist.group.WORLD,
            **options,
        )
    with count_all_reduce_bytes(bwd_bytes):
        (out.logprobs * grad_out).sum().backward()
    if use_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0

    # single-process result over the full head, on every rank
    h_ref = hidden.clone().requires_grad_()
    w_ref = full_weight.clone().requires_grad_()
    ref = fused_linear_logprobs(h_ref, w_ref, targets, **options)
    (ref.logprobs * grad_out).sum().backward()
    errors = [(getattr(out, name) - getattr(ref, name)).abs().max() for name in OUTPUT_NAMES]
    errors.append((h_par.grad - h_ref.grad).abs().max())
    errors.append((w_shard.grad - w_ref.grad[start:stop]).abs().max())
    worst = torch.stack([e.float() for e in errors])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)

    if rank == 0:
        stats_rows = 4 if "entropy" in OUTPUT_NAMES else 3
        print(
            f"{world} ranks ({'nccl' if use_cuda else 'gloo'}), N={n} H={h} V={v} {args.dtype}, "
            f"rows per rank {[vocab_shard_bounds(v, world, r) for r in range(world)]}"
        )
        names = [*OUTPUT_NAMES, "dH", "dW"]
        print(
            "max |vocab-parallel - single process| over ranks: "
            + ", ".join(f"{name} {e:.2e}" for name, e in zip(names, worst.tolist(), strict=True))
        )
        print(
            f"all-reduced per call: forward {fwd_bytes[0]} B (formula 4N(1+{stats_rows})+4 = "
            f"{4 * n * (1 + stats_rows) + 4}), backward {bwd_bytes[0]} B (formula 4NH = {4 * n * h}); "
            f"an all-gather of the logits would move {n * v * 4} B per rank"
        )
        print(f"forward + backward: {elapsed * 1e3:.1f} ms")
    dist.barrier()  # gloo aborts if a rank tears down while another is still in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
