"""Answer decoding for the examples: greedy or sampled continuations of a batch of equal-length prompts.

Decoding is not training: each step computes the next-token logits of the last position only (``[B, V]``,
never ``[B, T, V]``), from the backbone's hidden state (with its key/value cache) and the head of
:func:`~wpo_kernels.integration.hf.lm_head_of`, with the model's logit transform (softcap, logit scale)
applied as the fused kernel applies it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wpo_kernels.integration.hf import CausalLMHead, backbone_of, lm_head_of


def head_logits(head: CausalLMHead, last_hidden: Tensor) -> Tensor:
    """``[..., V]`` float32 logits of ``last_hidden`` (``[..., H]``) under ``head``, transform applied."""
    last = last_hidden.to(head.weight.dtype)
    logits = nn.functional.linear(last, head.weight, head.bias).float() * head.transform.logit_scale
    if head.transform.softcap is not None:
        logits = head.transform.softcap * torch.tanh(logits / head.transform.softcap)
    return logits / head.transform.temperature


@torch.no_grad()
def decode(
    model: nn.Module,
    prompt_ids: Tensor,
    n_new: int,
    *,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue each prompt by ``n_new`` tokens, greedily (``temperature=None``) or by sampling.

    Args:
        model: a ``transformers`` causal LM (put in eval mode by the caller).
        prompt_ids: ``[B, P]`` long, equal-length prompts on the model's device.
        n_new: tokens to generate; a row stops after its EOS and is padded with ``pad_token_id``.
        temperature: sampling temperature (``1.0``: the model's own distribution); None for greedy.
        generator: a CPU ``torch.Generator`` for reproducible sampling.

    Returns:
        ``[B, n_new]`` long completion tokens (EOS included where generated, then padding).

    Example:
        >>> decode(model, ids, 4, eos_token_id=1, pad_token_id=0, temperature=1.0, generator=g)
    """
    backbone, head = backbone_of(model), lm_head_of(model)
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    step_input, cache, tokens = prompt_ids, None, []
    for _ in range(n_new):
        out = backbone(input_ids=step_input, cache=cache, use_cache=True)
        cache, logits = out.cache, head_logits(head, out.last_hidden_state[:, -1])
        if temperature is None:
            token = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits.cpu() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(prompt_ids.device)
        token = token.masked_fill(done, pad_token_id)
        done |= token == eos_token_id
        tokens.append(token)
        step_input = token[:, None]
    return torch.stack(tokens, dim=1)
