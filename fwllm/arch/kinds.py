"""Model kinds by transformers class name: causal LM, sequence classifier, masked LM."""

from __future__ import annotations

import functools

import torch

from fwllm.core.errors import FwllmError

CAUSAL_MODEL, CLASSIFIER_MODEL, MASKED_MODEL = "causal", "classifier", "masked"

# Causal LMs whose logits are a plain linear map (`lm_head`) of the decoder's last hidden
# state. For them the loss projects only the positions that carry a label: the vocabulary
# matmul is a fifth of a small model's compute, and prompts are often half the tokens.
# Other classes (logit soft-capping, scaled heads, wrappers) take the general path.
PLAIN_HEAD_CAUSAL_LMS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})


@functools.lru_cache(maxsize=1)
def _causal_lm_classes() -> frozenset:
    """Causal LM classes named otherwise (GPT-2's `GPT2LMHeadModel`), from transformers' own registry
    of causal LMs, not a name rule (`*LMHeadModel` is no kind: `BertLMHeadModel` is causal only as
    a decoder, and the registry says which ones are)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - a transformers without the registry
        return frozenset()
    return frozenset(v for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() if str(v).endswith("LMHeadModel"))


def architecture_kind(name: str) -> str:
    """causal / classifier / masked for a transformers class name (as in config.architectures)."""
    if name.endswith("ForCausalLM") or name in _causal_lm_classes():
        return CAUSAL_MODEL
    if name.endswith("ForSequenceClassification"):
        return CLASSIFIER_MODEL
    if name.endswith("ForMaskedLM"):
        return MASKED_MODEL
    raise FwllmError(
        f"unsupported model class {name} (need *ForCausalLM or another causal LM such as "
        "GPT2LMHeadModel, *ForSequenceClassification or *ForMaskedLM)"
    )


def model_kind(model: torch.nn.Module) -> str:
    return architecture_kind(type(model).__name__)
