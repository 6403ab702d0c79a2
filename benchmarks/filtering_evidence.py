"""Evidence for removing gradient filtering: kept-tile fraction and gradient error on peaked logits.

``python -m benchmarks.filtering_evidence [--gap 8 12 16]`` (CPU, ~1 min). Toy of trained-model outputs
(the one of ../shared/HOPPER_STATIC.md): each token has 16 significant vocabulary entries, drawn
Zipf(1.1) over the vocabulary (frequent tokens recur across tokens), logits ``gap + 2·N(0,1)`` there and
``N(0,1)`` elsewhere; the target is sampled from the softmax. A 128×128 (tokens × vocabulary) tile is
kept if any probability in it is ≥ eps or it holds a target. Unsorted: vocabulary ids in random order;
sorted: by mean logit over the batch. Errors: relative norm of the dropped part of ``dZ = onehot − p``
and of its effect on ``dW = dZᵀH`` and ``dH = dZ·W`` (random H, W), in fp64.
"""

from __future__ import annotations

import argparse
import math

import torch

N, V, H, K, TILE = 2048, 32768, 64, 16, 128


def run(gap: float) -> None:
    torch.manual_seed(0)
    zipf = torch.arange(1, V + 1, dtype=torch.float64) ** -1.1
    ids = torch.randperm(V)[torch.multinomial(zipf / zipf.sum(), N * K, replacement=True).view(N, K)]
    z = torch.randn(N, V)
    z.scatter_(1, ids, gap + 2 * torch.randn(N, K))
    p = torch.softmax(z.double(), 1)
    y = torch.multinomial(p.float(), 1).squeeze(1)
    onehot = torch.zeros(N, V, dtype=torch.float64)
    onehot[torch.arange(N), y] = 1
    dz = onehot - p
    hidden, weight = torch.randn(N, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(1).mean()
    print(f"gap {gap}: mean max p {p.max(1).values.mean():.3f}, mean entropy {entropy:.2f} nats")
    orders = {"unsorted": torch.arange(V), "sorted": torch.argsort(z.mean(0), descending=True)}
    for label, order in orders.items():
        ps, dzs, ws = p[:, order], dz[:, order], weight[order]
        tile_p = ps.view(N // TILE, TILE, V // TILE, TILE).amax(dim=(1, 3))
        tile_y = onehot[:, order].view(N // TILE, TILE, V // TILE, TILE).amax(dim=(1, 3))
        for eps in (2.0**-12, 2.0**-15):
            keep = (tile_p >= eps) | (tile_y > 0)
            dropped = torch.where(keep.repeat_interleave(TILE, 0).repeat_interleave(TILE, 1), 0.0, dzs)
            err_dw = (dropped.T @ hidden).norm() / (dzs.T @ hidden).norm()
            err_dh = (dropped @ ws).norm() / (dzs @ ws).norm()
            print(
                f"  {label:8s} eps=2^{int(math.log2(eps))}: kept tiles {keep.double().mean():.3f}, rel err "
                f"dZ {dropped.norm() / dzs.norm():.1e}, dW {err_dw:.1e}, dH {err_dh:.1e}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gap", type=float, nargs="+", default=[8.0, 12.0, 16.0])
    for g in parser.parse_args().gap:
        run(g)
