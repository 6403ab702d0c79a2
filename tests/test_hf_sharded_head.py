"""The HF adapter's head on weights stored across ranks, on 2 CPU processes (gloo, loopback only).

A tiny untied ``LlamaForCausalLM`` whose ``lm_head`` is (a) tensor parallel (``transformers``' own plan,
``colwise_gather_output``: a ``Shard(0)`` DTensor), (b) sharded by FSDP2 ``fully_shard(lm_head)``, or
(c) inside a ``fully_shard`` root, or (d) partitioned by DeepSpeed ZeRO-3 (the real package, an optional
extra); the log-probabilities and gradients of
:func:`~wpo_kernels.integration.hf.causal_lm_hidden_and_head` + ``head.logprobs`` (and of
``add_wpo_lm_head``'s forward) must equal the fp64 unsharded single-process model's materialised
log-softmax. Tolerances (fp32 against fp64, relative norm): values ``1e-5``, gradients ``1e-4``.
"""

from __future__ import annotations

import copy
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (by wpo_kernels)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from tests.helpers import GRAD_RTOL, VALUE_RTOL, rel_err, tiny_decoder_config  # noqa: E402
from tests.test_distributed import spawn  # noqa: E402

transformers = pytest.importorskip("transformers")

from wpo_kernels import fused_linear_logprobs  # noqa: E402
from wpo_kernels.distributed import gathered_head_weight  # noqa: E402
from wpo_kernels.integration.hf import (  # noqa: E402
    add_wpo_lm_head,
    backbone_of,
    causal_lm_hidden_and_head,
)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

V, H, B, T = 37, 16, 2, 7
VALUE_TOL, GRAD_TOL = VALUE_RTOL[torch.float32], GRAD_RTOL[torch.float32]


def _tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**tiny_decoder_config(V, H, tie_word_embeddings=False))
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # logits of a few units, not a near-uniform softmax
    return model


def _batch(seed: int) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Model inputs ``[B, T]`` (row 1 right-padded), next-token targets ``[B, T - 1]`` (-100 on the prompt
    and padding) and an upstream gradient for the log-probabilities."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, -2:] = 0
    targets = ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    targets[:, :2] = -100  # the prompt
    grad_out = torch.randn(B, T - 1, generator=g)
    return {"input_ids": ids, "attention_mask": attention_mask}, targets, grad_out


def _reference(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """fp64 copy of the unsharded model: log-softmax of its materialised logits at the targets, entropy,
    and the gradients of hidden, the head weight and the final norm (the backbone)."""
    ref = copy.deepcopy(model).double()
    batch, targets, grad_out = _batch(seed)
    hidden = backbone_of(ref)(**batch, use_cache=False).last_hidden_state
    hidden.retain_grad()
    log_softmax = ref.lm_head(hidden[:, :-1]).log_softmax(-1)
    mask = targets != -100
    logprobs = log_softmax.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1).masked_fill(~mask, 0)
    (logprobs * grad_out.double()).sum().backward()
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    return dict(
        logprobs=logprobs.detach(),
        entropy=entropy.detach()[mask],
        d_hidden=hidden.grad,
        d_weight=ref.lm_head.weight.grad,
        d_norm=ref.model.norm.weight.grad,
    )


def _fused(model: nn.Module, seed: int, layout: str, backward=Tensor.backward) -> tuple[object, Tensor]:
    """``causal_lm_hidden_and_head`` + ``head.logprobs`` with entropy, ``backward`` (an engine's, or plain
    autograd) of the log-probabilities weighted by the batch's gradient."""
    batch, targets, grad_out = _batch(seed)
    hidden, head = causal_lm_hidden_and_head(model, batch)
    assert head.layout == layout and head.module is model.lm_head, (head.layout, layout)
    hidden.retain_grad()
    out = head.logprobs(hidden[:, :-1], targets, outputs=("entropy",), backend="torch")
    backward((out.logprobs * grad_out).sum())
    return out, hidden.grad


def _check_sharded_grad(grad: Tensor, param: Tensor, want: Tensor, where: str) -> None:
    """The gradient is a DTensor laid out like the parameter; each rank's rows equal the reference rows."""
    from torch.distributed.tensor import DTensor

    assert isinstance(grad, DTensor) and grad.placements == param.placements, f"{where}: dW not sharded"
    local = grad.to_local()
    assert local.shape == param.to_local().shape, f"{where}: dW local shape {tuple(local.shape)}"
    start = dist.get_rank() * -(-V // dist.get_world_size())  # DTensor / FSDP2 split: ceil(V / ranks) rows
    assert rel_err(local, want[start : start + local.shape[0]]) < GRAD_TOL, f"{where}: dW rows"
    assert rel_err(grad.full_tensor(), want) < GRAD_TOL, f"{where}: dW"


def _check_tensor_parallel(rank: int, mesh) -> None:
    """(a) transformers' tensor-parallel plan on lm_head: every rank has the same batch and scores its
    vocabulary slice; dW is the slice of the full gradient, dH and the backbone's gradients are full."""
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    model = _tiny_llama()
    ref = _reference(model, seed=1)
    # as from_pretrained(tp_plan=...) does: the module rule expanded to its parameters, then applied
    apply_tensor_parallelism(model, mesh, model._expand_parallel_plan({"lm_head": model._tp_plan["lm_head"]}))
    where = f"rank {rank} tensor parallel"
    out, d_hidden = _fused(model, 1, "vocab_parallel")
    mask = out.logprobs != 0
    assert rel_err(out.logprobs, ref["logprobs"]) < VALUE_TOL, f"{where}: logprobs"
    assert rel_err(out.entropy[mask], ref["entropy"]) < VALUE_TOL, f"{where}: entropy"
    assert rel_err(d_hidden, ref["d_hidden"]) < GRAD_TOL, f"{where}: dH"
    assert rel_err(model.model.norm.weight.grad, ref["d_norm"]) < GRAD_TOL, f"{where}: backbone grad"
    _check_sharded_grad(model.lm_head.weight.grad, model.lm_head.weight, ref["d_weight"], where)

    # the patched forward WPOTrainer calls goes the same way
    add_wpo_lm_head(model, backend="torch")
    batch, targets, _ = _batch(1)
    labels = torch.cat([batch["input_ids"][:, :1], targets], dim=1)
    with torch.no_grad():
        patched = model(**batch, labels=labels, wpo_head=True)
    assert rel_err(patched.logprobs, ref["logprobs"]) < VALUE_TOL, f"{where}: add_wpo_lm_head logprobs"


def _check_fully_shard(rank: int, world_size: int, mesh) -> None:
    """(b) FSDP2 on lm_head alone, (c) FSDP2 on the whole model through ``add_wpo_lm_head``: data
    parallel, each rank its own batch (a vocabulary-parallel misreading would mix them up); FSDP2 averages
    dW over ranks, so the reference is the mean of the ranks' single-process gradients."""
    from torch.distributed.fsdp import fully_shard

    base = _tiny_llama()
    refs = [_reference(base, seed=10 + r) for r in range(world_size)]
    want_w = sum(r["d_weight"] for r in refs) / world_size
    mine = refs[rank]

    model = copy.deepcopy(base)
    fully_shard(model.lm_head, mesh=mesh)
    where = f"rank {rank} fully_shard(lm_head)"
    out, d_hidden = _fused(model, 10 + rank, "sharded")
    mask = out.logprobs != 0
    assert rel_err(out.logprobs, mine["logprobs"]) < VALUE_TOL, f"{where}: logprobs"
    assert rel_err(out.entropy[mask], mine["entropy"]) < VALUE_TOL, f"{where}: entropy"
    assert rel_err(d_hidden, mine["d_hidden"]) < GRAD_TOL, f"{where}: dH"
    assert rel_err(model.model.norm.weight.grad, mine["d_norm"]) < GRAD_TOL, f"{where}: backbone grad"
    _check_sharded_grad(model.lm_head.weight.grad, model.lm_head.weight, want_w, where)

    # the whole model sharded (accelerate's FSDP2 layout): the root's forward unshards the head, so the
    # patched forward sees a plain weight; FSDP2 reduce-scatters its gradient afterwards
    model = copy.deepcopy(base)
    fully_shard(model.model.layers[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    add_wpo_lm_head(model, backend="torch")
    batch, targets, grad_out = _batch(10 + rank)
    labels = torch.cat([batch["input_ids"][:, :1], targets], dim=1)
    entered = []
    model.lm_head.register_forward_pre_hook(lambda module, args: entered.append(module))
    out = model(**batch, labels=labels, wpo_head=True)
    (out.logprobs * grad_out).sum().backward()
    where = f"rank {rank} fully_shard(model)"
    assert not entered, f"{where}: the unsharded head should be read directly, not run as a module"
    assert rel_err(out.logprobs, mine["logprobs"]) < VALUE_TOL, f"{where}: logprobs"
    _check_sharded_grad(model.lm_head.weight.grad, model.lm_head.weight, want_w, where)


def _worker(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    _check_tensor_parallel(rank, mesh)
    _check_fully_shard(rank, world_size, mesh)


def test_sharded_heads_match_unsharded_model(tmp_path: Path) -> None:
    spawn(2, tmp_path, _worker)


def _check_zero3(rank: int, world_size: int) -> None:
    """(d) DeepSpeed ZeRO-3 on the whole model (every parameter partitioned, none persistent): each rank
    its own batch; ``head.logprobs`` runs inside ``lm_head``'s forward, whose ZeRO-3 hooks gather the
    weight for the forward and again for the backward. ZeRO-3 averages gradients over ranks, so the
    reference is the mean of the ranks' single-process gradients, and this rank's partition of it is the
    rank's slice of the flattened gradient."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    base = _tiny_llama()
    refs = [_reference(base, seed=20 + r) for r in range(world_size)]
    want_w = sum(r["d_weight"] for r in refs) / world_size
    want_norm = sum(r["d_norm"] for r in refs) / world_size
    mine = refs[rank]
    model = copy.deepcopy(base).train()
    config = {
        "train_micro_batch_size_per_gpu": B,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=config
    )
    weight = engine.module.lm_head.weight
    assert weight.numel() == 0 and tuple(weight.ds_shape) == (V, H), "lm_head.weight is not partitioned"
    where = f"rank {rank} ZeRO-3"

    # forward-only through gathered_head_weight: gathered inside the block, partitioned again after it
    batch, targets, _ = _batch(20 + rank)
    with torch.no_grad():
        hidden = backbone_of(engine.module)(**batch, use_cache=False).last_hidden_state
        with gathered_head_weight(weight) as (full,):
            assert tuple(full.shape) == (V, H)
            out = fused_linear_logprobs(hidden[:, :-1], full, targets, backend="torch")
    assert weight.ds_status == ZeroParamStatus.NOT_AVAILABLE, f"{where}: weight left gathered"
    assert rel_err(out.logprobs, mine["logprobs"]) < VALUE_TOL, f"{where}: gathered_head_weight logprobs"

    # forward and backward through the head module; the engine's backward reduce-scatters the gradients
    out, d_hidden = _fused(engine.module, 20 + rank, "sharded", engine.backward)
    mask = out.logprobs != 0
    assert rel_err(out.logprobs, mine["logprobs"]) < VALUE_TOL, f"{where}: logprobs"
    assert rel_err(out.entropy[mask], mine["entropy"]) < VALUE_TOL, f"{where}: entropy"
    assert rel_err(d_hidden, mine["d_hidden"]) < GRAD_TOL, f"{where}: dH"
    local = safe_get_local_grad(weight)
    size = -(-V * H // world_size)
    assert local.shape == (size,), f"{where}: dW partition shape {tuple(local.shape)}"
    want_local = want_w.flatten()[rank * size : (rank + 1) * size].float()
    assert rel_err(local[: want_local.numel()], want_local) < GRAD_TOL, f"{where}: dW partition"
    assert rel_err(safe_get_full_grad(weight), want_w) < GRAD_TOL, f"{where}: dW"
    norm_grad = safe_get_full_grad(engine.module.model.norm.weight)
    assert rel_err(norm_grad, want_norm) < GRAD_TOL, f"{where}: backbone grad"


def _zero3_worker(rank: int, world_size: int) -> None:
    os.environ["LOCAL_RANK"] = str(rank)  # deepspeed.initialize requires it (a launcher would set it)
    _check_zero3(rank, world_size)


def test_zero3_head_matches_unsharded_model(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    spawn(2, tmp_path, _zero3_worker)
