"""What a model's context and one micro-batch's memory are, from its config.json alone.

Nothing here loads a model: the preflight checks and `gradient: auto` ask before any weight
is read. All sizes are float32 bytes (every solve computes in float32).

One micro-batch of B rows padded to T tokens, through a decoder (or encoder) layer of hidden
size h, MLP width i and n attention heads, keeps for its backward (measured with
`torch.autograd.graph.saved_tensors_hooks` on transformers' LlamaDecoderLayer, sdpa attention):

  * 4 tensors of width i: gate and up projections, act(gate), and act(gate) * up;
  * 14 of width h: the two RMSNorms' inputs, outputs and normalised values (6), the q/k/v/o
    projections' inputs and outputs, the rotary q and k (GQA's k and v repeated to n heads),
    and the attention output;
  * n floats per token: the attention's log-sum-exp.

hence `ACT_PER_LAYER = 14 h + 4 i + n` floats per token and layer. Once per model come the
embedding output and the final norm (4 h per token) and the 4-D attention mask (T floats per
token). The logits of the loss are counted four times: the logits and their log-softmax kept
for the backward, and the two gradients the backward makes of them. On tiny Llamas the
estimate plus the weight gradients bounds the measured peak allocation of a forward+backward
from above, within 1.5x (tests/data/test_bounds.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

FLOAT = 4
# Config keys that hold the number of positions a model can attend over, most specific first.
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
    "max_seq_length",
)
# Learned absolute positions offset by the padding index (RoBERTa's family): pad_token_id + 1
# positions are never used by a real token.
PADDING_OFFSET_MODELS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text")
LOGITS_COPIES = 4
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _text_config(cfg: dict) -> dict:
    """A multimodal config keeps its language model's sizes under text_config."""
    inner = cfg.get("text_config")
    return {**cfg, **inner} if isinstance(inner, dict) else cfg


def context_length(cfg: dict) -> Optional[int]:
    """Tokens one row may hold in this model (None: the config does not say)."""
    cfg = _text_config(cfg)
    for key in CONTEXT_KEYS:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if cfg.get("model_type") in PADDING_OFFSET_MODELS and isinstance(cfg.get("pad_token_id"), int):
                value -= cfg["pad_token_id"] + 1
            return value
    return None


@dataclass(frozen=True)
class ModelSizes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelSizes":
        cfg = _text_config(cfg)
        hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 0)
        inter = int(cfg.get("intermediate_size") or cfg.get("n_inner") or cfg.get("ffn_dim") or 4 * hidden)
        layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers") or 0)
        heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
        return cls(hidden, inter, layers, heads, int(cfg.get("vocab_size") or 0))

    def activation_bytes(self, batch: int, tokens: int, layers: Optional[int] = None) -> int:
        """One micro-batch's activations kept for a backward through `layers` layers (all by default)."""
        layers = self.layers if layers is None else layers
        per_layer = 14 * self.hidden + 4 * self.intermediate + self.heads
        return FLOAT * batch * tokens * (layers * per_layer + 4 * self.hidden + tokens)

    def logits_bytes(self, batch: int, tokens: int, copies: int = LOGITS_COPIES) -> int:
        """One micro-batch's logits over the vocabulary (a classifier's handful of labels is dwarfed
        by the activations; counting the vocabulary keeps this an upper bound)."""
        return FLOAT * batch * tokens * self.vocab * copies

    def checkpoint_bytes(self, batch: int, tokens: int) -> int:
        """The layerwise gradient's host checkpoints of one micro-batch: every layer's input."""
        return FLOAT * batch * tokens * self.hidden * (self.layers + 1)


def split_by_layer(shapes: Dict[str, Tuple[int, ...]]) -> Tuple[int, int]:
    """(largest layer's, outside the layer stack's) parameter count, from tensor names and shapes."""
    per_layer: Dict[str, int] = {}
    outer = 0
    for name, shape in shapes.items():
        numel = 1
        for d in shape:
            numel *= int(d)
        match = _LAYER_INDEX.search(name)
        if match:
            key = name[: match.end()]
            per_layer[key] = per_layer.get(key, 0) + numel
        else:
            outer += numel
    return max(per_layer.values(), default=0), outer


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 / 10 else f"{nbytes / 2**20:.0f} MiB"
