"""Which positions of a batch a model predicts: the one definition the objective, the
Fisher and AdaMerging's entropy share.

* sequence classifier: one prediction per row (logits are [rows, classes]);
* causal-LM rows {"prompt", "response"}: the response tokens (position t predicts t + 1);
* unlabeled text on a causal LM: every next token inside the attention mask;
* unlabeled text on a masked LM: every token position (no observed target).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from fwllm.arch.kinds import CAUSAL_MODEL, MASKED_MODEL
from fwllm.data.calibration import CAUSAL


def _keep(
    batch: Dict[str, torch.Tensor], row_kind: str, model_kind: str
) -> Tuple[Optional[torch.Tensor], bool]:
    """(mask over positions, shifted): shifted masks index positions [:, :-1]."""
    if row_kind == CAUSAL:
        return batch["labels"][:, 1:] != -100, True
    mask = batch["attention_mask"].bool()
    if model_kind == CAUSAL_MODEL:
        return mask[:, 1:] & mask[:, :-1], True
    return mask, False


def predicted_positions(
    x: torch.Tensor, batch: Dict[str, torch.Tensor], row_kind: str, model_kind: str
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x ([rows, positions, ...]: logits or hidden states) at the predicted positions,
    flattened to [P, ...], and the observed targets [P] (None where nothing is observed).
    A sequence classifier's [rows, classes] logits pass through with the row labels."""
    if x.dim() == 2:
        return x, batch.get("labels")
    keep, shifted = _keep(batch, row_kind, model_kind)
    if not shifted:
        return x[keep], None
    targets = batch["labels"][:, 1:] if row_kind == CAUSAL else batch["input_ids"][:, 1:]
    return x[:, :-1][keep], targets[keep]


def position_count(batch: Dict[str, torch.Tensor], row_kind: str, model_kind: str) -> int:
    """How many predictions `predicted_positions` yields for this batch."""
    if model_kind not in (CAUSAL_MODEL, MASKED_MODEL):
        return int(batch["input_ids"].shape[0])  # a classifier predicts once per row
    keep, _ = _keep(batch, row_kind, model_kind)
    return int(keep.sum())
