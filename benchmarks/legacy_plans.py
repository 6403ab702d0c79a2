"""The kernels of commit eafe6c5 (before issue 10) as launch plans, so the cost model can describe them.

``../shared/HOPPER_STATIC.md`` made its predictions for those kernels; the cost model is calibrated by
reproducing them (``tests/test_cost_model.py``). The forward is today's plan code with one vocabulary split
(a 1-D grid of ``cdiv(N, BLOCK_N)`` programs, each sweeping the whole vocabulary); the backward was one
fused kernel on ``(cdiv(N, BLOCK_N), cdiv(V, BLOCK_V))`` that recomputed each logits tile and added its
dH and dW contributions into fp32 ``[N, H]`` / ``[V, H]`` buffers with ``tl.atomic_add`` (``acq_rel`` by
default, which compiled to fenced ``atom.global.gpu.acq_rel.add.v4.f32``).
"""

from __future__ import annotations

import torch

from wpo_kernels.kernels.launch_plan import Buffer, KernelLaunch, PassPlan, TileConfig, cdiv, forward_plan

#: eafe6c5's shipped autotune configs (BLOCK_N, BLOCK_V, BLOCK_D, warps, stages).
FORWARD_CONFIGS = tuple(
    TileConfig(bn, bv, bd, num_warps=w, num_stages=s)
    for bn, bv, bd, w, s in [
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4),
        (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (256, 128, 64, 8, 3),
    ]
)
BACKWARD_CONFIGS = tuple(
    TileConfig(bn, bv, bd, num_warps=w, num_stages=s)
    for bn, bv, bd, w, s in [
        (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4),
    ]
)


def legacy_forward_plan(
    n: int, v: int, h: int, config: TileConfig, *, has_softcap: bool, sm_count: int = 132
) -> PassPlan:
    """eafe6c5's forward with ``config``: no vocabulary split, all five statistics, bf16."""
    return forward_plan(
        n, v, h, torch.bfloat16, has_bias=False, has_softcap=has_softcap, need_mean=True,
        sm_count=sm_count, config=config, vocab_splits=1,
    )


def legacy_backward_plan(
    n: int, v: int, h: int, config: TileConfig, *, has_softcap: bool, atomic_sem: str, sm_count: int = 132
) -> PassPlan:
    """eafe6c5's fused atomic backward with ``config``, bf16, unfiltered; ``atomic_sem`` ``"acq_rel"``
    (as compiled) or ``"relaxed"``. Buffers: the fp32 atomic targets for dH and dW."""
    switches = {"HAS_SOFTCAP": has_softcap, "ATOMIC_SEM": atomic_sem, "ATOMIC_VECTOR": 4}
    grid = (cdiv(n, config.block_n), cdiv(v, config.block_v))
    launch = KernelLaunch("fused_backward", grid, config, (config,), switches)
    buffers = (
        Buffer("atomic_grad_hidden", (n, h), torch.float32),
        Buffer("atomic_grad_weight", (v, h), torch.float32),
    )
    return PassPlan("backward", n, v, h, torch.bfloat16, sm_count, (launch,), (), buffers)
