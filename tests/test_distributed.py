"""Vocabulary-parallel logprobs and sharded-head helpers on 2 and 3 CPU processes (gloo, loopback only),
against the single-process fp64 reference on the full head.

Each test spawns its processes once and runs every case inside them (process start-up dominates).
Workers inherit ``TRITON_INTERPRET=1`` from the environment conftest sets before the spawn; it is set
again below for a worker that imports this module first.
"""

from __future__ import annotations

import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (by wpo_kernels)

from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from tests.helpers import GRAD_RTOL, VALUE_RTOL, rel_err  # noqa: E402
from wpo_kernels import OUTPUT_NAMES, fused_linear_logprobs  # noqa: E402
from wpo_kernels.distributed import (  # noqa: E402
    check_vocab_partition,
    combine_vocab_stats,
    dtensor_vocab_parallel_linear_logprobs,
    head_linear_logprobs,
    vocab_parallel_linear_logprobs,
    vocab_shard_bounds,
)
from wpo_kernels.reference import reference_linear_logprobs  # noqa: E402
from wpo_kernels.types import VocabStats  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _entry(rank: int, world_size: int, init_method: str, worker, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(seconds=300)
    )
    try:
        worker(rank, world_size, *args)
        dist.barrier()  # gloo aborts if a rank tears down while another is still in a collective
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalisation: a gloo thread still joinable when C++ statics are destroyed
    # aborts the process ("terminate called without an active exception") after the test has passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(world_size: int, tmp_path: Path, worker, *args) -> None:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` gloo processes; a failure on any rank
    fails the test (the others are terminated)."""
    init_method = f"file://{tmp_path / f'rendezvous_{world_size}'}"
    mp.spawn(_entry, args=(world_size, init_method, worker, args), nprocs=world_size, join=True)


# (N, H, V, slice sizes per rank in rank order, rank owning each slice in vocabulary order, options)
CASES = {
    2: [
        (
            24,
            32,
            70,
            [23, 47],
            [0, 1],
            dict(bias=True, softcap=5.0, temperature=0.7, n_ignored=5, ignore_index=-100),
        ),
        (13, 16, 37, [30, 7], [1, 0], dict(logit_scale=0.5, n_ignored=2, ignore_index=-1)),
        (9, 8, 11, [0, 11], [0, 1], dict(bias=True, softcap=2.0, n_ignored=9)),
    ],
    3: [
        (
            24,
            32,
            70,
            [40, 1, 29],
            [0, 1, 2],
            dict(bias=True, softcap=5.0, temperature=0.7, n_ignored=5, ignore_index=-100),
        ),
        (17, 12, 61, [20, 0, 41], [2, 1, 0], dict(bias=True, temperature=1.5, n_ignored=3, ignore_index=7)),
    ],
}


def _case_inputs(n: int, h: int, v: int, seed: int, bias: bool, n_ignored: int, ignore_index: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (2.0 / h**0.5)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    # an ignore_index inside [0, V) must still be ignored: keep it out of the real targets
    targets = torch.where(targets == ignore_index, (ignore_index + 1) % v, targets)
    targets[torch.randperm(n, generator=g)[:n_ignored]] = ignore_index
    grad_out = torch.randn(n, generator=g, dtype=torch.float64)
    return hidden, weight, b, targets, grad_out


def _vocab_parallel_worker(rank: int, world_size: int, backend: str) -> None:
    dtype = torch.float32
    # compiled kernels on a GPU (all ranks may share it: gloo stages through the host), else the interpreter
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for case_id, (n, h, v, sizes, order, opts) in enumerate(CASES[world_size]):
        opts = dict(opts)
        bias, n_ignored = opts.pop("bias", False), opts.pop("n_ignored", 0)
        ignore_index = opts.setdefault("ignore_index", -100)
        hidden, weight, b, targets, grad_out = _case_inputs(n, h, v, case_id, bias, n_ignored, ignore_index)
        starts, edge = {}, 0
        for owner in order:  # slices laid out in vocabulary order, owned by ranks in `order`
            starts[owner], edge = edge, edge + sizes[owner]
        start, stop = starts[rank], starts[rank] + sizes[rank]
        check_vocab_partition(start, stop - start, v, dist.group.WORLD)

        ref_in = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
        ref = reference_linear_logprobs(ref_in[0], ref_in[1], targets, bias=ref_in[2], **opts)
        (ref.logprobs * grad_out).sum().backward()

        h_local = hidden.to(device, dtype).requires_grad_()
        w_local = weight[start:stop].to(device, dtype).requires_grad_()
        b_local = b[start:stop].to(device, dtype).requires_grad_() if b is not None else None
        y_local = targets.to(device)
        # later cases hand over a strided bias shard and int32 targets (the entry copies / converts them)
        strided = case_id > 0
        b_arg = torch.stack([b_local, torch.zeros_like(b_local)], -1)[:, 0] if strided and bias else b_local
        out = vocab_parallel_linear_logprobs(
            h_local,
            w_local,
            y_local.to(torch.int32) if strided else y_local,
            vocab_start=start,
            vocab_size=v,
            process_group=dist.group.WORLD,
            bias_shard=b_arg,
            outputs=OUTPUT_NAMES,
            backend=backend,
            **opts,
        )
        (out.logprobs * grad_out.to(device, dtype)).sum().backward()
        where = f"rank {rank} case {case_id} slice [{start}, {stop})"
        for name in OUTPUT_NAMES:
            err = rel_err(getattr(out, name), getattr(ref, name))
            assert err < VALUE_RTOL[dtype], f"{where}: {name} off by {err:.2e}"
        assert bool((out.logprobs[y_local == ignore_index] == 0).all()), f"{where}: ignored logprobs not 0"
        grads = [(h_local.grad, ref_in[0].grad, "dH"), (w_local.grad, ref_in[1].grad[start:stop], "dW")]
        if b is not None:
            grads.append((b_local.grad, ref_in[2].grad[start:stop], "db"))
        for got, want, name in grads:
            assert got.shape == want.shape, f"{where}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}"
            err = rel_err(got, want)
            assert err < GRAD_RTOL[dtype], f"{where}: {name} off by {err:.2e}"

        # forward only (no autograd Function): same values
        with torch.no_grad():
            plain = vocab_parallel_linear_logprobs(
                h_local,
                w_local,
                y_local,
                vocab_start=start,
                vocab_size=v,
                process_group=dist.group.WORLD,
                bias_shard=b_local,
                outputs=("entropy",),
                backend=backend,
                **opts,
            )
        assert rel_err(plain.logprobs, ref.logprobs) < VALUE_RTOL[dtype], f"{where}: no-grad logprobs"
        assert rel_err(plain.entropy, ref.entropy) < VALUE_RTOL[dtype], f"{where}: no-grad entropy"

    if backend == "torch":
        _tensor_parallel_dtensor_check(rank, world_size)

    # a slice whose logits are all -inf for a token (an empty slice, or masked out) adds nothing, no NaN
    n = 3
    lse = torch.tensor([0.5, 1.0, 2.0]) + rank
    local = VocabStats(
        target_logit=torch.full((n,), float(rank)),
        max_logit=lse - 0.1,
        lse=lse,
        lse2=2 * lse - 0.3,
        mean_logit=lse - 0.5,
    )
    if rank == 1:
        for t in (local.max_logit, local.lse, local.lse2):
            t[0] = float("-inf")
        local.mean_logit[0] = float("nan")
    every = [torch.tensor([0.5, 1.0, 2.0]) + r for r in range(world_size)]
    live = [[r for r in range(world_size) if not (r == 1 and i == 0)] for i in range(n)]
    got = combine_vocab_stats(local, 5, 5 * world_size, dist.group.WORLD)
    want_lse = torch.stack(
        [torch.logsumexp(torch.stack([every[r][i] for r in live[i]]), 0) for i in range(n)]
    )
    want_mean = torch.stack(
        [sum(torch.exp(every[r][i] - want_lse[i]) * (every[r][i] - 0.5) for r in live[i]) for i in range(n)]
    )
    assert torch.allclose(got.lse, want_lse, atol=1e-6), f"rank {rank}: -inf slice lse"
    assert torch.allclose(got.mean_logit, want_mean, atol=1e-6), f"rank {rank}: -inf slice mean"
    assert torch.equal(got.target_logit, torch.full((n,), float(sum(range(world_size)))))

    # slices that do not add up to vocab_size fail on every rank; overlaps are caught by the check
    h_small, y_small = torch.randn(4, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="rows in all"):
        vocab_parallel_linear_logprobs(
            h_small,
            torch.randn(3, 8),
            y_small,
            vocab_start=3 * rank,
            vocab_size=3 * world_size + 1,
            process_group=dist.group.WORLD,
            backend=backend,
        )
    with pytest.raises(ValueError, match="without gap or overlap"):
        check_vocab_partition(0, 3, 3 * world_size, dist.group.WORLD)


def _tensor_parallel_dtensor_check(rank: int, world_size: int) -> None:
    """A tensor-parallel head (DTensor ``Shard(0)``, DTensor's own split: uneven, and with 3 ranks over
    4 rows one rank empty), replicated hidden states: values and gradients against the reference."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    opts = dict(softcap=3.0, temperature=0.9, ignore_index=-100)
    for case_id, v in enumerate((37, 4)):
        hidden, weight, b, targets, grad_out = _case_inputs(10, 8, v, 50 + case_id, True, 2, -100)
        ref_in = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        ref = reference_linear_logprobs(ref_in[0], ref_in[1], targets, bias=ref_in[2], **opts)
        (ref.logprobs * grad_out).sum().backward()

        h_local = hidden.float().requires_grad_()
        w = nn.Parameter(distribute_tensor(weight.float(), mesh, [Shard(0)]))
        bias = nn.Parameter(distribute_tensor(b.float(), mesh, [Shard(0)]))
        out = dtensor_vocab_parallel_linear_logprobs(
            h_local, w, targets, bias=bias, outputs=("entropy",), backend="torch", **opts
        )
        (out.logprobs * grad_out.float()).sum().backward()
        where = f"rank {rank} tensor-parallel V={v}"
        assert rel_err(out.logprobs, ref.logprobs) < VALUE_RTOL[torch.float32], f"{where}: logprobs"
        assert rel_err(out.entropy, ref.entropy) < VALUE_RTOL[torch.float32], f"{where}: entropy"
        assert rel_err(h_local.grad, ref_in[0].grad) < GRAD_RTOL[torch.float32], f"{where}: dH"
        for param, want, name in ((w, ref_in[1].grad, "dW"), (bias, ref_in[2].grad, "db")):
            assert isinstance(param.grad, DTensor) and param.grad.placements == param.placements, name
            assert rel_err(param.grad.full_tensor(), want) < GRAD_RTOL[torch.float32], f"{where}: {name}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_vocab_parallel_matches_reference(world_size: int, backend: str, tmp_path: Path) -> None:
    spawn(world_size, tmp_path, _vocab_parallel_worker, backend)


def _sharded_head_worker(rank: int, world_size: int) -> None:
    """Data parallel: each rank has its own tokens, the head is a DTensor sharded over rows (uneven)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    n, h, v = 11, 16, 37
    opts = dict(softcap=4.0, temperature=0.8, ignore_index=-100)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64)

    def rank_data(r: int):
        gr = torch.Generator().manual_seed(100 + r)
        hid = torch.randn(n, h, generator=gr, dtype=torch.float64)
        y = torch.randint(0, v, (n,), generator=gr)
        y[: r + 1] = -100
        return hid, y

    # reference: the gradient FSDP2 produces, the mean over ranks of each rank's full-head gradient
    want_w, want_b = torch.zeros_like(weight), torch.zeros_like(bias)
    for r in range(world_size):
        w_ref, b_ref = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        hid, y = rank_data(r)
        h_ref = hid.clone().requires_grad_()
        ref = reference_linear_logprobs(h_ref, w_ref, y, bias=b_ref, **opts)
        ref.logprobs.sum().backward()
        want_w += w_ref.grad / world_size
        want_b += b_ref.grad / world_size
        if r == rank:
            mine, want_h = ref, h_ref.grad

    def check(head: nn.Module, label: str) -> None:
        hid, y = rank_data(rank)
        h_local = hid.float().requires_grad_()
        out = head_linear_logprobs(head, h_local, y, outputs=("entropy",), **opts)
        out.logprobs.sum().backward()
        where = f"rank {rank} {label}"
        assert rel_err(out.logprobs, mine.logprobs) < VALUE_RTOL[torch.float32], f"{where}: logprobs"
        assert rel_err(out.entropy, mine.entropy) < VALUE_RTOL[torch.float32], f"{where}: entropy"
        assert rel_err(h_local.grad, want_h) < GRAD_RTOL[torch.float32], f"{where}: dH"
        for param, want, name in ((head.weight, want_w, "dW"), (head.bias, want_b, "db")):
            assert isinstance(param.grad, DTensor), f"{where}: {name} not sharded"
            assert param.grad.placements == param.placements, f"{where}: {name} placements"
            assert param.grad.to_local().shape == param.to_local().shape, f"{where}: {name} local shape"
            assert rel_err(param.grad.full_tensor(), want) < GRAD_RTOL[torch.float32], f"{where}: {name}"

    # a Linear whose parameters are sharded DTensors but whose module has no FSDP hooks
    plain = nn.Linear(h, v)
    plain.weight = nn.Parameter(distribute_tensor(weight.float(), mesh, [Shard(0)]))
    plain.bias = nn.Parameter(distribute_tensor(bias.float(), mesh, [Shard(0)]))
    check(plain, "DTensor parameters")

    # FSDP2: the head is its own unit, gathered by its hooks inside head_linear_logprobs
    fsdp = nn.Linear(h, v)
    with torch.no_grad():
        fsdp.weight.copy_(weight.float())
        fsdp.bias.copy_(bias.float())
    fully_shard(fsdp, mesh=mesh)
    check(fsdp, "fully_shard")


def test_sharded_head_gradients_land_in_shards(tmp_path: Path) -> None:
    spawn(2, tmp_path, _sharded_head_worker)


def test_single_process_equals_fused() -> None:
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(19, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 19, (2, 5), generator=g)
    out = vocab_parallel_linear_logprobs(
        hidden,
        weight,
        targets,
        vocab_start=0,
        vocab_size=19,
        softcap=3.0,
        outputs=OUTPUT_NAMES,
        backend="torch",
    )
    want = fused_linear_logprobs(hidden, weight, targets, softcap=3.0, outputs=OUTPUT_NAMES, backend="torch")
    for name in OUTPUT_NAMES:
        assert torch.allclose(getattr(out, name), getattr(want, name), atol=1e-6), name
    assert out.logprobs.shape == (2, 5)


def test_vocab_shard_bounds() -> None:
    bounds = [vocab_shard_bounds(10, 3, r) for r in range(3)]
    assert bounds == [(0, 4), (4, 7), (7, 10)]
    assert vocab_shard_bounds(2, 3, 2) == (2, 2)
    with pytest.raises(ValueError, match="rank"):
        vocab_shard_bounds(10, 3, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(vocab_start=-1, vocab_size=8), "vocab_start must be"),
        (dict(vocab_start=9, vocab_size=8), "vocab_start must be"),
        (dict(vocab_start=0, vocab_size=0), "vocab_size must be"),
        (dict(vocab_start=5, vocab_size=8), r"vocab_start \(5\) \+ weight_shard rows \(4\)"),
        (dict(vocab_start=4, vocab_size=8), "process_group is required"),
        (dict(vocab_start=0, vocab_size=4, targets=torch.tensor([0, 4, 1])), r"targets must lie in \[0, 4\)"),
        (dict(vocab_start=0, vocab_size=4, bias_shard=torch.zeros(3)), "bias must have shape"),
    ],
)
def test_validation_names_the_argument(kwargs: dict, message: str) -> None:
    targets = kwargs.pop("targets", torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=message):
        vocab_parallel_linear_logprobs(torch.randn(3, 6), torch.randn(4, 6), targets, **kwargs)


def test_dtensor_entry_rejects_plain_weight() -> None:
    with pytest.raises(TypeError, match="weight must be a DTensor"):
        dtensor_vocab_parallel_linear_logprobs(torch.randn(3, 6), torch.randn(4, 6), torch.tensor([0, 1, 2]))
