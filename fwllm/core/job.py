"""A merge job: what a method's solve needs to know about one recipe."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from fwllm.core.params import MethodParams


@dataclass(frozen=True)
class CandidateSpec:
    """One non-base model of the recipe, as mergekit names it."""

    label: str  # str(ModelReference), e.g. "path" or "base+adapter"
    model: str
    lora: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)  # per-model recipe parameters


@dataclass
class MergeJob:
    method: str
    base: str  # the base model as written in the recipe
    candidates: List[CandidateSpec]
    params: MethodParams
    plan_dir: str
    device: str = "cpu"
    progress: bool = True
    no_cache: bool = False  # solve afresh: reuse no plan and no cached statistic

    def fingerprint(self, content: Optional[str] = None) -> str:
        """Stable id of what the recipe says and, given `content` (the identity of the files it
        names, `fwllm.mergekit_glue.inputs`), of what those files hold: the plain-mergekit plan cache key."""
        payload = {
            "method": self.method,
            "base": self.base,
            "candidates": [(c.label, sorted(c.params.items())) for c in self.candidates],
            "params": self.params.model_dump(
                exclude={"plan", "device", "no_cache", "keep_merged", "lora_out", "lora_rank"}
            ),
            "content": content,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
