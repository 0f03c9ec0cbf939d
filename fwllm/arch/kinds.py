"""Model kinds by transformers class name: causal LM, sequence classifier, masked LM."""

from __future__ import annotations

import torch

from fwllm.core.errors import FwllmError

CAUSAL_MODEL, CLASSIFIER_MODEL, MASKED_MODEL = "causal", "classifier", "masked"

# Causal LMs whose logits are a plain linear map (`lm_head`) of the decoder's last hidden
# state. For them the loss projects only the positions that carry a label: the vocabulary
# matmul is a fifth of a small model's compute, and prompts are often half the tokens.
# Other classes (logit soft-capping, scaled heads, wrappers) take the general path.
PLAIN_HEAD_CAUSAL_LMS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})


def architecture_kind(name: str) -> str:
    """causal / classifier / masked for a transformers class name (as in config.architectures)."""
    if name.endswith("ForCausalLM"):
        return CAUSAL_MODEL
    if name.endswith("ForSequenceClassification"):
        return CLASSIFIER_MODEL
    if name.endswith("ForMaskedLM"):
        return MASKED_MODEL
    raise FwllmError(f"unsupported model class {name} (need *ForCausalLM, *ForSequenceClassification or *ForMaskedLM)")


def model_kind(model: torch.nn.Module) -> str:
    return architecture_kind(type(model).__name__)
