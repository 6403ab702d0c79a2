"""Vocabulary-parallel combine, and helpers for heads sharded by FSDP2 or DeepSpeed ZeRO-3.

Every WPO statistic is an associative reduction over the vocabulary, so a head split by vocabulary
rows needs no gather of logits or of the weight: each rank runs the usual kernels on its slice
``weight[vocab_start : vocab_start + V_r]`` and the per-token partial stats meet in two all-reduces of
``[N]`` vectors (a max, then one packed sum). The backward needs only the global log-sum-exp: each rank
computes its own ``dW`` slice and its share of ``dH``, and the shares are summed with one all-reduce.
:func:`vocab_parallel_linear_logprobs` takes an explicit slice and group;
:func:`dtensor_vocab_parallel_linear_logprobs` reads them from a tensor-parallel DTensor head.

For heads that are *data*-parallel but stored sharded (FSDP2 DTensors, ZeRO-3 partitions),
:func:`gathered_head_weight` materialises the full weight for the call with the gradient returned in
the sharded layout, and :func:`head_linear_logprobs` runs the call inside the head module's forward so
that the framework's own gather / reshard / reduce-scatter hooks apply.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from wpo_kernels.autograd import (
    Backend,
    autocast_disabled,
    finish_forward,
    first_order_backward,
    input_grads,
    kept_token_grad,
    linear_logprobs_backward,
    vocab_stats,
)
from wpo_kernels.linear_logprobs import (
    check_outputs,
    checked_backend,
    flatten_inputs,
    fused_linear_logprobs,
    int64_targets,
    needs_autograd,
    outputs_from_stats,
    per_token_from_stats,
    validate_inputs,
)
from wpo_kernels.types import LogitTransform, LogprobOutput, VocabStats

ProcessGroup = Any  # torch.distributed.ProcessGroup (not importable when torch.distributed is unavailable)


def vocab_shard_bounds(vocab_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of ``rank``'s slice when ``vocab_size`` rows are split as evenly as possible
    (the first ``vocab_size % world_size`` ranks get one extra row).

    Example:
        >>> tp_size, tp_rank = dist.get_world_size(tp), dist.get_rank(tp)
        >>> start, stop = vocab_shard_bounds(lm_head.weight.shape[0], tp_size, tp_rank)
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    base, extra = divmod(vocab_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _group_size(process_group: ProcessGroup | None) -> int:
    if process_group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def check_vocab_partition(
    vocab_start: int, shard_rows: int, vocab_size: int, process_group: ProcessGroup | None
) -> None:
    """Collective, once per set-up: raise ``ValueError`` on every rank unless the slices
    ``[vocab_start, vocab_start + shard_rows)`` of the ranks in ``process_group`` tile ``[0, vocab_size)``
    exactly (no gap, no overlap) and all ranks agree on ``vocab_size``.

    :func:`vocab_parallel_linear_logprobs` checks per call only that the row counts add up (for free,
    inside its sum all-reduce); overlapping slices with the right total are caught only here.
    """
    if _group_size(process_group) == 1:
        slices = [(vocab_start, shard_rows, vocab_size)]
    else:
        slices = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(slices, (vocab_start, shard_rows, vocab_size), group=process_group)
    if len({s[2] for s in slices}) != 1:
        raise ValueError(f"vocab_size must be equal on all ranks, got {[s[2] for s in slices]}")
    covered = sorted((start, start + rows) for start, rows, _ in slices if rows > 0)
    edge = 0
    for start, stop in covered:
        if start != edge:
            raise ValueError(
                f"vocabulary slices (vocab_start, shard_rows) per rank {[s[:2] for s in slices]} must tile "
                f"[0, {vocab_size}) without gap or overlap; found [{start}, {stop}) after row {edge}"
            )
        edge = stop
    if edge != vocab_size:
        raise ValueError(
            f"vocabulary slices (vocab_start, shard_rows) per rank {[s[:2] for s in slices]} cover "
            f"[0, {edge}), expected [0, {vocab_size})"
        )


def _local_stats(
    backend: Literal["triton", "torch"],
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    transform: LogitTransform,
    vocab_start: int,
    need_mean: bool,
) -> VocabStats:
    """Stats over this rank's slice; a rank holding no rows contributes an all ``-inf`` slice."""
    if weight.shape[0] > 0:
        return vocab_stats(
            backend,
            hidden,
            weight,
            bias,
            targets,
            transform,
            vocab_start=vocab_start,
            need_mean_logit=need_mean,
        )
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    neg_inf = hidden.new_full((hidden.shape[0],), float("-inf"), dtype=dtype)
    zero = torch.zeros_like(neg_inf)
    return VocabStats(zero, neg_inf, neg_inf, neg_inf.clone(), zero.clone() if need_mean else None)


def combine_vocab_stats(
    local: VocabStats, shard_rows: int, vocab_size: int, process_group: ProcessGroup | None
) -> VocabStats:
    """Combine per-slice :class:`VocabStats` ``[N]`` into stats over the whole vocabulary.

    Two all-reduces over ``process_group``: MAX of ``max_logit``, then one SUM of a packed
    ``[k, N] + 1`` buffer holding ``exp(lse_r - M)``, ``exp(lse2_r - 2M)``, the target logit (only the
    owning rank's is nonzero), ``exp(lse_r - M) * mean_r`` if the mean logit is wanted, and the row count
    (checked against ``vocab_size``). Safe for slices whose logits are all ``-inf``. Returns stats with
    the dtype of ``local``; identity without a group.
    """
    if _group_size(process_group) == 1 or local.lse.numel() == 0:
        return local
    m = local.max_logit.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=process_group)
    # every slice is measured from the global max; a token whose logits are all -inf everywhere uses 0
    shift = torch.where(m == float("-inf"), 0.0, m)
    e1 = torch.exp(local.lse - shift)
    rows = [e1, torch.exp(local.lse2 - 2 * shift), local.target_logit]
    if local.mean_logit is not None:
        # an empty or all -inf slice has weight 0 and an undefined (NaN) mean: take 0, not 0 * NaN
        rows.append(torch.where(e1 > 0, e1 * local.mean_logit, 0.0))
    count = e1.new_full((1,), float(shard_rows))
    packed = torch.cat([torch.stack(rows).reshape(-1), count])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)
    total_rows = int(packed[-1].item())
    if total_rows != vocab_size:
        raise ValueError(
            f"the weight shards of the ranks in process_group hold {total_rows} rows in all, expected "
            f"vocab_size={vocab_size}"
        )
    sums = packed[:-1].reshape(len(rows), -1)
    s1 = sums[0]
    return VocabStats(
        target_logit=sums[2],
        max_logit=m,
        lse=shift + torch.log(s1),
        lse2=2 * shift + torch.log(sums[1]),
        mean_logit=sums[3] / s1 if local.mean_logit is not None else None,
    )


def _local_backward(
    backend: Literal["triton", "torch"],
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    grad: Tensor,
    transform: LogitTransform,
    vocab_start: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    if weight.shape[0] > 0:
        # dH in fp32: the ranks' shares are summed before the cast
        return linear_logprobs_backward(
            backend, hidden, weight, bias, targets, lse, grad, transform, vocab_start=vocab_start,
            grad_hidden_fp32=True,
        )
    dh = torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=lse.dtype, device=hidden.device)
    return dh, dw, (torch.zeros(0, dtype=lse.dtype, device=hidden.device) if bias is not None else None)


class VocabParallelLogprobsFunction(torch.autograd.Function):
    """:class:`wpo_kernels.autograd.LinearLogprobsFunction` for one vocabulary slice per rank: the
    forward combines the slices' stats across ``process_group``; the backward gives this rank's ``dW``,
    ``db`` slices and ``dH`` summed over the group (the full gradient, on every rank)."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        ignore_index: int,
        transform: LogitTransform,
        backend: Literal["triton", "torch"],
        need_mean_logit: bool,
        vocab_start: int,
        vocab_size: int,
        process_group: ProcessGroup | None,
        reduce_grad_hidden: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        local = _local_stats(backend, hidden, weight, bias, targets, transform, vocab_start, need_mean_logit)
        stats = combine_vocab_stats(local, weight.shape[0], vocab_size, process_group)
        ctx.transform, ctx.backend = transform, backend
        # a weak reference: a graph kept alive past destroy_process_group() must not keep the group alive
        # (gloo then aborts the process at exit, now and then)
        ctx.vocab_start = vocab_start
        ctx.group_ref = weakref.ref(process_group) if process_group is not None else None
        ctx.reduce_grad_hidden = reduce_grad_hidden
        return finish_forward(ctx, hidden, weight, bias, targets, stats, ignore_index, need_mean_logit)

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_logprobs: Tensor, *unused: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grad = kept_token_grad(grad_logprobs, targets, ctx.ignore_index, lse.dtype)
        dh, dw, db = _local_backward(
            ctx.backend, hidden, weight, bias, targets, lse, grad, ctx.transform, ctx.vocab_start
        )
        if ctx.needs_input_grad[0] and ctx.reduce_grad_hidden and ctx.group_ref is not None:
            group = ctx.group_ref()
            if group is None:
                raise RuntimeError(
                    "the process_group of vocab_parallel_linear_logprobs was destroyed before the backward"
                )
            if _group_size(group) > 1:
                # each slice contributes dL_r @ W_r; the full dH is their sum (fp32, before the cast)
                dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)
        return (*input_grads(ctx, hidden, weight, bias, dh, dw, db), *([None] * 9))


def _validate_parallel(
    hidden: Tensor,
    weight_shard: Tensor,
    targets: Tensor,
    bias_shard: Tensor | None,
    *,
    vocab_start: int,
    vocab_size: int,
    process_group: ProcessGroup | None,
    ignore_index: int,
    transform: LogitTransform,
) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an int >= 1 (the global vocabulary size), got {vocab_size!r}")
    if (
        isinstance(vocab_start, bool)
        or not isinstance(vocab_start, int)
        or not 0 <= vocab_start <= vocab_size
    ):
        raise ValueError(f"vocab_start must be an int in [0, vocab_size={vocab_size}], got {vocab_start!r}")
    if isinstance(weight_shard, Tensor) and weight_shard.dim() == 2:
        rows = weight_shard.shape[0]
        if vocab_start + rows > vocab_size:
            raise ValueError(
                f"weight_shard must fit in the vocabulary: vocab_start ({vocab_start}) + weight_shard rows "
                f"({rows}) must be <= vocab_size ({vocab_size})"
            )
        if _group_size(process_group) == 1 and (vocab_start != 0 or rows != vocab_size):
            raise ValueError(
                f"process_group is required: weight_shard covers rows [{vocab_start}, {vocab_start + rows}) "
                f"of vocab_size={vocab_size}, but process_group is "
                f"{'None' if process_group is None else 'a group of one rank'}"
            )
        if rows == 0:
            # validate_inputs wants V >= 1: check everything else against a one-row stand-in
            weight_shard = weight_shard.new_empty((1, weight_shard.shape[1]))
            if isinstance(bias_shard, Tensor) and bias_shard.shape == (0,):
                bias_shard = bias_shard.new_empty(1)
    validate_inputs(
        hidden,
        weight_shard,
        targets,
        bias_shard,
        ignore_index=ignore_index,
        transform=transform,
        vocab_start=vocab_start,
        global_vocab=vocab_size,
    )


def vocab_parallel_linear_logprobs(
    hidden: Tensor,
    weight_shard: Tensor,
    targets: Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    process_group: ProcessGroup | None = None,
    bias_shard: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    outputs: Sequence[str] = ("logprobs",),
    backend: Backend = "auto",
    reduce_grad_hidden: bool = True,
) -> LogprobOutput:
    """:func:`wpo_kernels.fused_linear_logprobs` for an LM head split by vocabulary rows across the ranks
    of ``process_group`` (tensor / vocabulary parallelism), without gathering logits or the weight.

    Collective: every rank of ``process_group`` must call it with the same ``hidden``, ``targets`` and
    options, and (when a gradient is needed) run the backward too.

    Args:
        hidden: ``[..., H]`` float16 / bfloat16 / float32 / float64, **replicated**: equal on every rank.
        weight_shard: ``[V_r, H]``, rows ``[vocab_start, vocab_start + V_r)`` of the global ``[V, H]``
            head; ``V_r`` may differ between ranks and may be 0. Same dtype and device as ``hidden``.
        targets: ``[...]`` integer, replicated, global ids in ``[0, vocab_size)`` or ``ignore_index``.
        vocab_start: first global vocabulary row held by this rank.
        vocab_size: global vocabulary size ``V``; the ranks' slices must tile ``[0, V)`` (the total row
            count is checked on every call, overlaps only by :func:`check_vocab_partition`).
        process_group: the vocabulary-parallel group; required unless the shard is the whole vocabulary.
        bias_shard: optional ``[V_r]`` slice of the bias.
        reduce_grad_hidden: sum the ranks' ``dH`` contributions in the backward (default). Pass False when
            the caller reduces the gradient of ``hidden`` itself, e.g. a Megatron-style
            ``copy_to_tensor_model_parallel_region`` before the head.
        ignore_index, temperature, softcap, logit_scale, outputs, backend: as in
            :func:`wpo_kernels.fused_linear_logprobs`.

    Returns:
        :class:`LogprobOutput` of ``[...]`` float32 tensors (float64 for float64 inputs), equal on every rank
        and equal to the single-process result over the full head. ``logprobs`` is differentiable: the
        gradient of ``hidden`` is the full ``dH`` on every rank (already summed over the group), those of
        ``weight_shard``/``bias_shard`` are this rank's slice.

    Communication per call (``N`` tokens, fp32 stats): forward ``4N·(4 + [entropy]) + 4`` bytes in two
    all-reduces (``N`` max + packed ``(3 + [entropy])N + 1`` sum); backward one all-reduce of ``4·N·H``
    bytes (fp32 ``dH``). fp64 inputs double it.

    Example:
        >>> start, stop = vocab_shard_bounds(V, dist.get_world_size(tp), dist.get_rank(tp))
        >>> out = vocab_parallel_linear_logprobs(h, w_full[start:stop], y, vocab_start=start, vocab_size=V,
        ...                                      process_group=tp, outputs=("entropy",))
        >>> out.logprobs.sum().backward()
    """
    transform = LogitTransform(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    outputs = check_outputs(outputs)
    targets = int64_targets(targets)
    _validate_parallel(
        hidden,
        weight_shard,
        targets,
        bias_shard,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        process_group=process_group,
        ignore_index=ignore_index,
        transform=transform,
    )
    h, y, b = flatten_inputs(hidden, targets, bias_shard)
    chosen = checked_backend(backend, h)
    need_mean = "entropy" in outputs
    with autocast_disabled(h.device):
        if needs_autograd(hidden, weight_shard, bias_shard):
            per_token = VocabParallelLogprobsFunction.apply(
                h,
                weight_shard,
                b,
                y,
                ignore_index,
                transform,
                chosen,
                need_mean,
                vocab_start,
                vocab_size,
                process_group,
                reduce_grad_hidden,
            )
        else:
            local = _local_stats(chosen, h, weight_shard, b, y, transform, vocab_start, need_mean)
            stats = combine_vocab_stats(local, weight_shard.shape[0], vocab_size, process_group)
            per_token = per_token_from_stats(stats, y, ignore_index)
    return outputs_from_stats(per_token, outputs, tuple(targets.shape), y == ignore_index)


def dtensor_vocab_parallel_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    **options: Any,
) -> LogprobOutput:
    """:func:`vocab_parallel_linear_logprobs` for a tensor-parallel head stored as a DTensor: the
    ``transformers`` tensor-parallel plan (``"colwise_gather_output"`` / ``"colwise_rep"`` on ``lm_head``)
    or ``torch.distributed.tensor.parallel.ColwiseParallel``, without the logits all-gather those
    styles do. The vocabulary slice and the group are read from the DTensor.

    Args:
        hidden: ``[..., H]`` plain tensor, replicated over the tensor-parallel group (as it is at the
            input of a colwise head).
        weight: DTensor ``[V, H]`` placed ``Shard(0)`` on exactly one mesh dimension (the tensor-parallel
            one; DTensor's even split, the last ranks shorter or empty) and ``Replicate()`` on any other.
        targets: ``[...]`` integer, replicated. bias: optional DTensor ``[V]`` with the same placements.
        options: keyword arguments of :func:`vocab_parallel_linear_logprobs` except the slice, size and
            group (``ignore_index``, ``temperature``, ``softcap``, ``logit_scale``, ``outputs``, ...).

    Returns:
        :class:`LogprobOutput` as from :func:`vocab_parallel_linear_logprobs`; the weight's gradient is a
        DTensor in the weight's own layout (each rank's slice), the gradient of ``hidden`` is the full one.

    Example:
        >>> out = dtensor_vocab_parallel_linear_logprobs(h, model.lm_head.weight, y, outputs=("entropy",))
    """
    from torch.distributed.tensor import Replicate, Shard

    if not is_dtensor(weight):
        raise TypeError(f"weight must be a DTensor, got {type(weight).__name__}")
    placements = tuple(weight.placements)
    vocab_dims = [d for d, p in enumerate(placements) if isinstance(p, Shard) and p.dim in (0, -2)]
    others_replicated = all(isinstance(p, Replicate) for d, p in enumerate(placements) if d not in vocab_dims)
    if len(vocab_dims) != 1 or not others_replicated:
        raise ValueError(
            f"weight must be placed Shard(0) on one mesh dimension and Replicate() on the others, got "
            f"{placements}; for FSDP-sharded heads use head_linear_logprobs or gathered_head_weight"
        )
    if bias is not None and (not is_dtensor(bias) or tuple(bias.placements) != placements):
        raise ValueError(f"bias must be a DTensor with the weight's placements {placements}")
    mesh, dim = weight.device_mesh, vocab_dims[0]
    vocab_size, parts = weight.shape[0], mesh.size(dim)
    local = weight.to_local()
    # DTensor's Shard split: chunks of ceil(V / parts) rows, the last ranks shorter or empty
    start = min(mesh.get_local_rank(dim) * -(-vocab_size // parts), vocab_size)
    if local.shape[0] != min(-(-vocab_size // parts), vocab_size - start):
        raise ValueError(
            f"weight's local shard has {local.shape[0]} rows, not DTensor's even split of {vocab_size} rows "
            f"over {parts} ranks; pass the slice explicitly to vocab_parallel_linear_logprobs"
        )
    return vocab_parallel_linear_logprobs(
        hidden,
        local,
        targets,
        vocab_start=start,
        vocab_size=vocab_size,
        process_group=mesh.get_group(dim),
        bias_shard=bias.to_local() if bias is not None else None,
        **options,
    )


# ---------------------------------------------------------------------------------------------------
# Sharded (data-parallel) heads: FSDP2 / DTensor and DeepSpeed ZeRO-3
# ---------------------------------------------------------------------------------------------------


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 or tensor-parallel parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _full_dtensor(t: Tensor, grad_reduce: Literal["avg", "sum"]) -> Tensor:
    """All-gather a DTensor into a plain tensor whose gradient is reduced back to ``t``'s layout.

    The gradient is declared ``Partial`` (one summand per rank: each rank saw its own data), so the
    backward reduce-scatters it onto ``Shard`` dims and all-reduces it onto ``Replicate`` dims. Plain
    ``full_tensor()`` would declare it ``Replicate`` and keep only the local rank's contribution.
    """
    from torch.distributed.tensor import Partial, Replicate

    mesh = t.device_mesh
    full = t.redistribute(mesh, [Replicate()] * mesh.ndim)
    return full.to_local(grad_placements=[Partial(grad_reduce)] * mesh.ndim)


def is_zero3_partitioned(t: object) -> bool:
    """True for a DeepSpeed ZeRO-3 partitioned parameter (recognised without importing deepspeed)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_status")


@contextmanager
def gathered_head_weight(
    *params: Tensor | None, grad_reduce: Literal["avg", "sum"] = "avg"
) -> Iterator[tuple[Tensor | None, ...]]:
    """Context manager yielding full (unsharded) versions of ``params`` (e.g. ``lm_head.weight``,
    ``lm_head.bias``) for a fused call that reads them directly; ``None`` passes through.

    - FSDP2 / DTensor parameters (any mesh, ``Shard``/``Replicate`` placements): all-gathered into a plain
      tensor that stays in the autograd graph; the backward reduce-scatters the gradient into the
      sharded parameter's ``.grad`` (a DTensor in its own layout), averaged over the mesh (``grad_reduce
      ="avg"``, FSDP2's and DDP's convention) or summed (``"sum"``). Memory: one full ``[V, H]`` copy in
      the parameter dtype while the graph holds it (until the backward), plus the backward's full-size
      gradient before the reduce-scatter.
    - DeepSpeed ZeRO-3 parameters: gathered with ``deepspeed.zero.GatheredParameters`` for the duration of
      the ``with`` block (nothing if already gathered, e.g. inside the head's forward). The kernels
      recompute logits from the saved weight in the backward, which ZeRO-3 re-gathers only through its
      module hooks: run the call inside the head module's forward with :func:`head_linear_logprobs`.
    - Plain tensors (DDP, a single GPU, FSDP2 parameters while their module is unsharded) are yielded as is.

    Example:
        >>> with gathered_head_weight(lm_head.weight, lm_head.bias) as (w, b):
        ...     out = fused_linear_logprobs(h, w, y, bias=b)
    """
    if grad_reduce not in ("avg", "sum"):
        raise ValueError(f"grad_reduce must be 'avg' or 'sum', got {grad_reduce!r}")
    zero3 = [p for p in params if p is not None and is_zero3_partitioned(p)]
    with ExitStack() as stack:
        if zero3:
            try:
                import deepspeed
                from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
            except ImportError as err:  # a ZeRO-3 parameter without deepspeed importable: cannot gather
                raise ImportError("gathered_head_weight needs deepspeed for ZeRO-3 parameters") from err
            # deduplicate (tied embeddings pass the same parameter twice); skip already gathered ones
            pending = {id(p): p for p in zero3 if p.ds_status != ZeroParamStatus.AVAILABLE}
            if pending:
                stack.enter_context(deepspeed.zero.GatheredParameters(list(pending.values())))
        yield tuple(_full_dtensor(p, grad_reduce) if p is not None and is_dtensor(p) else p for p in params)


def head_linear_logprobs(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    *,
    grad_reduce: Literal["avg", "sum"] = "avg",
    **options: Any,
) -> LogprobOutput:
    """:func:`wpo_kernels.fused_linear_logprobs` with ``head.weight`` / ``head.bias``, run *inside*
    ``head``'s forward so that FSDP2 (``fully_shard(head)``) and DeepSpeed ZeRO-3 module hooks gather
    the parameters before the call, free them after it, re-gather them for the backward and
    reduce(-scatter) their gradients, exactly as for ``head(hidden)``. Parameters that are still sharded
    DTensors inside the forward (the head is not its own FSDP2 unit) go through
    :func:`gathered_head_weight`.

    Args:
        head: a module with ``weight [V, H]`` and optional ``bias [V]`` (e.g. ``model.lm_head``).
        hidden: ``[..., H]``; targets ``[...]``; ``options``: keyword arguments of
            :func:`wpo_kernels.fused_linear_logprobs` except ``bias``.
        grad_reduce: the DTensor gradient reduction, see :func:`gathered_head_weight`.

    Returns:
        :class:`LogprobOutput` as from :func:`wpo_kernels.fused_linear_logprobs`.

    Example:
        >>> out = head_linear_logprobs(model.lm_head, h, y, softcap=30.0, outputs=("entropy",))
    """
    if "bias" in options:
        raise TypeError("head_linear_logprobs takes the bias from head.bias, not a bias argument")
    names = check_outputs(options.pop("outputs", ("logprobs",)))
    wanted = ("logprobs", *(n for n in names if n != "logprobs"))

    def fused_forward(module: nn.Module, h: Tensor, y: Tensor) -> tuple[Tensor | None, ...]:
        # a tuple of tensors, so that hooks registered on the outputs (pre-backward gathers) see them
        params = (module.weight, getattr(module, "bias", None))
        with gathered_head_weight(*params, grad_reduce=grad_reduce) as (w, b):
            out = fused_linear_logprobs(h, w, y, bias=b, outputs=wanted, **options)
        # fresh tensors, not views: FSDP2 warns that in-place ops on a view would bypass its hooks
        return tuple(getattr(out, n).clone() for n in wanted)

    patched = "forward" in head.__dict__
    original = head.__dict__.get("forward")
    head.forward = types.MethodType(fused_forward, head)
    try:
        values = head(hidden, targets)
    finally:
        if patched:
            head.forward = original
        else:
            del head.forward
    return LogprobOutput(**dict(zip(wanted, values, strict=True)))
