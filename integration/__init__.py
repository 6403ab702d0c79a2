"""Integrations of :mod:`wpo_kernels` with training stacks (installed as ``wpo_kernels.integration``).

- :mod:`wpo_kernels.integration.hf`: Hugging Face causal LMs → backbone hidden states + the LM head as
  the fused kernel takes it (softcap, logit scale, tied embeddings, bias), e.g.
  ``hidden, head = causal_lm_hidden_and_head(model, batch)``;
- :mod:`wpo_kernels.integration.trl`: ``WPOConfig`` / ``WPOTrainer``, drop-in for TRL 1.16's
  ``DPOConfig`` / ``DPOTrainer`` (needs ``pip install 'wpo-kernels[trl]'``);
- :mod:`wpo_kernels.integration.examples`: the offline main job, ``wpo-train``.

Nothing is imported here, so ``import wpo_kernels`` never pulls in ``transformers`` or ``trl``.
"""
