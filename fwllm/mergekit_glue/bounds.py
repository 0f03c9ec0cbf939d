"""Preflight bounds that need the base's config but no model: the context and the memory.

* `max_length` beyond the base's context: the schema default (256) is lowered to the context
  with a one-line warning, since a recipe that never named max_length should run on a model
  of 64 positions; a value the recipe wrote is refused, since the user asked for rows the
  model cannot read (position embeddings past the table fail deep in the forward).
* memory: one micro-batch's activations and logits (`fwllm.core.footprint`) plus the weights
  the solve holds, against the memory available now. A merge that cannot fit even in its
  smallest mode (`gradient: layerwise`, where the method and the model have it) is one error with the numbers and what to lower.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

from fwllm.arch.kinds import CLASSIFIER_MODEL, architecture_kind
from fwllm.core import memory
from fwllm.core.errors import FwllmError
from fwllm.core.footprint import FLOAT, ModelSizes, context_length, gib, split_by_layer
from fwllm.core.job import MergeJob
from fwllm.core.params import FisherParams, FWParams, RegMeanParams
from fwllm.data.calibration import CalibrationTask, micro_batch_shape
from fwllm.io.models import is_adapter_dir, read_config, resolve_model_path

LOG = logging.getLogger(__name__)


def cap_max_length(job: MergeJob, cfg: dict) -> None:
    """The default max_length lowered to the base's context (a warning); a written one beyond it refused."""
    context = context_length(cfg)
    p = job.params
    if context is None or p.max_length <= context:
        return
    if p.max_length != type(p).model_fields["max_length"].default:
        raise FwllmError(
            f"{job.method}: max_length {p.max_length} exceeds the base's context of {context} tokens "
            f"({job.base}); set max_length <= {context}"
        )
    LOG.warning("fwllm: max_length %d lowered to the base's context of %d tokens", p.max_length, context)
    job.params = p.model_copy(update={"max_length": context})


def _streams(job: MergeJob, cfg: dict) -> bool:
    """Whether the solve can run one layer at a time: FW always; RegMean, Fisher and AdaMerging
    (`gradient: layerwise`) for causal LMs and encoders, unless the recipe pins `gradient: full`."""
    p = job.params
    if getattr(p, "gradient", "full") == "full":
        return False
    if isinstance(p, FWParams):
        return True
    archs = cfg.get("architectures") or []
    try:
        return bool(archs) and bool(architecture_kind(archs[0]))  # causal LMs and encoders alike
    except FwllmError:
        return False


def _classifier_labels(job: MergeJob, base_dir: str) -> Optional[int]:
    """The most labels of a pool whose candidates are all classifiers (None otherwise): a classifier's
    exact Fisher has one term per label of its one prediction, not top_k per token over a vocabulary."""
    labels = []
    for spec in job.candidates:
        path = resolve_model_path(spec.model)
        cfg = read_config(base_dir if is_adapter_dir(path) else path)  # an adapter runs as its model
        if architecture_kind((cfg.get("architectures") or ["?"])[0]) != CLASSIFIER_MODEL:
            return None
        labels.append(len(cfg["id2label"]) if cfg.get("id2label") else int(cfg.get("num_labels", 2)))
    return max(labels, default=None)


def _fisher_terms(p: FisherParams, tokens: int, vocab: int, labels: Optional[int] = None) -> int:
    """Terms of one example's Fisher: one (empirical), every label of a classifier's one prediction,
    or top_k per predicted position (exact)."""
    if p.fisher == "empirical":
        return 1
    if labels:
        return labels
    return tokens * (vocab if p.top_k <= 0 else min(p.top_k, vocab))


def _parts(
    job: MergeJob,
    cfg: dict,
    shapes: Dict[str, tuple],
    tasks: List[CalibrationTask],
    rows: int,
    tokens: int,
    labels: Optional[int] = None,
) -> Tuple[str, Dict[str, int]]:
    """(mode, {part: bytes}) of the smallest way the job's solve can run; `labels`: a classifier pool's."""
    p, sizes = job.params, ModelSizes.from_config(cfg)
    weights = sum(_numel(s) for s in shapes.values())
    if _streams(job, cfg):
        largest, outer = split_by_layer(shapes)
        # one layer fetched, its gradient and the iterate's (or a candidate's) view of it; embeddings and head
        parts = {
            "weights": FLOAT * (3 * largest + 2 * outer),
            "activations": sizes.activation_bytes(rows, tokens, layers=1),
            "checkpoints": sizes.checkpoint_bytes(rows, tokens),
            "logits": sizes.logits_bytes(rows, tokens),
        }
        if isinstance(p, RegMeanParams):
            # every candidate's hidden states on its calibration rows are carried from layer to layer,
            # and the Gram sums are float64 [in, in] (the widest input; the sum and one candidate's Gram)
            widest = max((int(s[-1]) for s in shapes.values() if len(s) == 2), default=0)
            all_rows = sum(len(t.rows) for t in tasks)
            parts["hidden states"] = FLOAT * len(job.candidates) * all_rows * tokens * sizes.hidden
            parts["grams"] = 2 * 8 * widest * widest
            del parts["checkpoints"]
        if isinstance(p, FisherParams):  # each term's gradient at the stack output, per example
            terms = _fisher_terms(p, tokens, sizes.vocab, labels)
            parts["term gradients"] = FLOAT * terms * tokens * sizes.hidden
        return "gradient: layerwise", parts
    if isinstance(p, FWParams):  # fw_merging.in_ram_bytes with every tensor a block, and the backward
        held = FLOAT * weights * (3 + len(job.candidates) / p.sketch_ratio)
        return "gradient: full", {
            "weights": int(held),
            "activations": sizes.activation_bytes(rows, tokens),
            "logits": sizes.logits_bytes(rows, tokens),
        }
    if isinstance(p, RegMeanParams):  # forward only, without autograd: one layer's activations at a time
        return "regmean", {
            "weights": FLOAT * weights,
            "activations": sizes.activation_bytes(rows, tokens, layers=1),
            "logits": sizes.logits_bytes(rows, tokens, copies=1),
        }
    # Fisher and AdaMerging: the model in RAM with its gradients, a backward through every layer
    return job.method, {
        "weights": 2 * FLOAT * weights,
        "activations": sizes.activation_bytes(rows, tokens),
        "logits": sizes.logits_bytes(rows, tokens),
    }


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def check_memory(
    job: MergeJob,
    tasks: List[CalibrationTask],
    cfg: dict,
    shapes: Dict[str, tuple],
    labels: Optional[int] = None,
) -> None:
    """Refuse a solve whose smallest mode needs more memory than is available now (CPU solves:
    on an accelerator the activations live in its memory, which this does not see)."""
    if not str(job.device or "cpu").startswith("cpu"):
        return
    p = job.params
    rows, tokens = micro_batch_shape(tasks, 1 if isinstance(p, FisherParams) else p.batch_size, p.max_length)
    mode, parts = _parts(job, cfg, shapes, tasks, rows, tokens, labels)
    need, available = sum(parts.values()), memory.available_memory()
    if need > available:
        detail = ", ".join(f"{k} {gib(v)}" for k, v in parts.items())
        raise FwllmError(
            f"{job.method}: a micro-batch of {rows} rows x {tokens} tokens needs about {gib(need)} "
            f"({mode}: {detail}); {gib(available)} of memory is available: lower batch_size "
            f"(now {p.batch_size}) or max_length (now {p.max_length})"
        )


def check_bounds(
    job: MergeJob, tasks: List[CalibrationTask], base_dir: str, shapes: Dict[str, tuple]
) -> None:
    """The context and memory checks, from the base's config.json and safetensors headers."""
    cfg = read_config(base_dir)
    cap_max_length(job, cfg)
    check_memory(job, tasks, cfg, shapes, _classifier_labels(job, base_dir))
