"""`merge_method: fisher` — Fisher merging (Matena & Raffel, arXiv 2111.09832).

solve:  one candidate at a time: load it, compute its diagonal Fisher on its *own*
        calibration task (per-model `task`), write it, free the model. Plan folder:
          plan.json                 settings; per candidate: label, task, Fisher file, mean Fisher
          fisher/<i>.safetensors    candidate i's diagonal Fisher, by parameter name
          fwllm_heads/              per-task classification heads (classifier candidates)
merge:  per tensor, theta = sum_i w_i F_i theta_i / sum_i w_i F_i with F_i floored at
        `epsilon`, reading only that tensor's Fishers from disk.

The Fisher, per example x, averaged over the task's examples:

* ``fisher: exact`` (default): the expectation under the model's own predictive
  distribution, sum_y p(y|x) (grad log p(y|x))^2.
    - classification: over the classes (all of them whenever there are <= top_k);
    - causal LM: per response position t, teacher-forced on the row's response:
      sum over the top_k most likely tokens v of p~_t(v) (grad log p_t(v))^2, p~ the
      probabilities renormalised over those k, summed over positions. Cross-position
      terms vanish in expectation when the tokens come from the model itself, so the
      per-position sum is the Fisher of the response given the data's prefix. Cost:
      positions x top_k backward passes per example (top_k: 0 = the whole vocabulary);
    - regression: a unit-variance Gaussian likelihood, so the expectation is (grad f)^2;
    - unlabeled text: every predicted position (causal: next token; masked LM: each token).
* ``fisher: empirical``: the squared gradient of each example's log-likelihood of its
  observed label / response tokens (one backward pass per example; needs labels, or
  text rows on a causal LM).

Squares are always of one example's gradients, never of a summed batch gradient, so rows
run one at a time (the shared `batch_size` parameter is not used).

The merge is over the non-base models; the recipe's base_model is only the model
mergekit compares against. Tensors outside the Fisher: head tensors (task specific) are
kept per task in `fwllm_heads/` and the loadable checkpoint gets the first classifier
candidate's; non-float tensors come from the base; float tensors the Fisher does not
cover (buffers, tied duplicates) are the plain weighted average. Coordinates where every
Fisher is ~0 get the epsilon floor for all models, i.e. the plain weighted average too.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fwllm.calibration import CAUSAL, REGRESSION, CalibrationTask
from fwllm.data_methods import DataMethod, MergeJob, MethodParams, register_data_method
from fwllm.errors import FwllmError
from fwllm.heads import is_head_tensor
from fwllm.objectives import CAUSAL_MODEL, encode_task, model_kind
from fwllm.stats_io import (
    check_finite, finish_stats_plan, has_stat, head_or_base, load_stats_plan, read_stat, solve_per_candidate,
    stored_or_none, weighted_average, weights_of,
)

LOG = logging.getLogger(__name__)

# A term of an example's Fisher: (a scalar log-likelihood, its probability weight).
Term = Tuple[torch.Tensor, float]


class FisherParams(MethodParams):
    fisher: Literal["exact", "empirical"] = "exact"
    top_k: int = 5  # exact Fisher: most likely outputs per position (renormalised); 0 = all
    epsilon: float = 1e-8  # floor on every Fisher entry (keeps the merge defined)
    normalize_fisher: bool = False  # divide each model's Fisher by its mean first


# -- pure math ----------------------------------------------------------------------------
def prediction_terms(logits: torch.Tensor, targets: Optional[torch.Tensor], fisher: str, top_k: int) -> List[Term]:
    """Terms of one example whose predicted positions have `logits` [P, C].

    exact: (log p_t(v), p~_t(v)) for the top_k outputs v of each position t;
    empirical: a single (sum_t log p_t(target_t), 1).
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    if fisher == "empirical":
        if targets is None:
            raise FwllmError("the empirical Fisher needs observed labels; these rows have none (use fisher: exact)")
        return [(logp.gather(-1, targets.view(-1, 1)).sum(), 1.0)]
    k = logp.shape[-1] if top_k <= 0 else min(top_k, logp.shape[-1])
    terms = []
    for t in range(logp.shape[0]):
        top = logp[t].detach().exp().topk(k)
        weights = top.values / top.values.sum()
        terms.extend((logp[t, v], float(w)) for v, w in zip(top.indices.tolist(), weights.tolist()))
    return terms


def gaussian_terms(prediction: torch.Tensor, target: Optional[torch.Tensor], fisher: str) -> List[Term]:
    """Regression under y ~ N(f, 1): E_y[(grad log p)^2] = (grad f)^2; empirical: ((y - f) grad f)^2."""
    if fisher == "empirical":
        if target is None:
            raise FwllmError("the empirical Fisher needs observed labels; these rows have none (use fisher: exact)")
        return [(-0.5 * (target.float() - prediction.float()).square().sum(), 1.0)]
    return [(prediction.float().sum(), 1.0)]


def add_example_fisher(params: Sequence[torch.Tensor], terms: Sequence[Term], acc: Sequence[torch.Tensor]) -> None:
    """acc += sum_terms w (grad term)^2: one backward pass per term, each squared on its own."""
    for i, (value, weight) in enumerate(terms):
        grads = torch.autograd.grad(value, params, retain_graph=i < len(terms) - 1, allow_unused=True)
        for a, g in zip(acc, grads):
            if g is not None:
                a.add_(g.square(), alpha=weight)


def fisher_merge(thetas: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], weights: Sequence[float],
                 epsilon: float) -> torch.Tensor:
    """sum_i w_i F_i theta_i / sum_i w_i F_i with F_i floored at epsilon (> 0)."""
    num = den = None
    thetas, fishers = iter(thetas), iter(fishers)
    for w in weights:  # not zip(): zip keeps its last items alive while it fetches the next ones
        theta, fisher = next(thetas), next(fishers)
        f = fisher.float().clamp_min(epsilon) * w
        num = f * theta.float() if num is None else num + f * theta.float()
        den = f if den is None else den + f
        del theta, fisher, f  # before the next one is read: inputs may stream from disk
    return num / den


# -- the Fisher of one candidate ------------------------------------------------------------
def _predicted_positions(kind: str, task_kind: str, logits: torch.Tensor, batch: Dict[str, torch.Tensor]):
    """(logits [P, C] of one example's predicted positions, observed targets [P] or None)."""
    if logits.dim() == 2:  # sequence classifier: one prediction per row
        return logits, batch.get("labels")
    if task_kind == CAUSAL:
        labels = batch["labels"][0, 1:]
        keep = labels != -100
        return logits[0, :-1][keep], labels[keep]
    mask = batch["attention_mask"][0].bool()
    if kind == CAUSAL_MODEL:  # unlabeled text on a causal LM: every next token
        keep = mask[1:]
        return logits[0, :-1][keep], batch["input_ids"][0, 1:][keep]
    return logits[0][mask], None  # masked LM: each token position, no observed target


def candidate_fisher(model: torch.nn.Module, task: CalibrationTask, tokenizer, p: FisherParams
                     ) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Diagonal Fisher of every non-head float parameter, averaged over the task's rows."""
    model.eval()  # dropout off: the Fisher of the predictor that gets merged
    named = [(n, prm) for n, prm in model.named_parameters() if prm.is_floating_point() and not is_head_tensor(n)]
    for prm in model.parameters():
        prm.requires_grad_(False)
    for _, prm in named:
        prm.requires_grad_(True)
    params = [prm for _, prm in named]
    acc = [torch.zeros_like(prm) for prm in params]
    enc = encode_task(task, tokenizer, p.max_length, batch_size=1)  # per-example gradients
    device = params[0].device
    kind, terms_total = model_kind(model), 0
    for batch in enc.batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        if task.kind == REGRESSION:
            terms = gaussian_terms(logits.view(-1), batch.get("labels"), p.fisher)
        else:
            pos, targets = _predicted_positions(kind, task.kind, logits, batch)
            if pos.shape[0] == 0:
                continue  # e.g. a response truncated away: nothing predicted
            terms = prediction_terms(pos, targets, p.fisher, p.top_k)
        add_example_fisher(params, terms, acc)
        terms_total += len(terms)
        del logits
    n = len(enc.batches)
    fisher = {name: (a / n).cpu() for (name, _), a in zip(named, acc)}
    numel = sum(t.numel() for t in fisher.values())
    mean = float(sum(t.double().sum() for t in fisher.values()) / max(numel, 1))
    return fisher, {"examples": n, "terms": terms_total, "mean": mean}


# -- the method -----------------------------------------------------------------------------
def _check(p: FisherParams) -> None:
    if not p.epsilon > 0:
        raise FwllmError("fisher: epsilon must be > 0 (it keeps sum_i w_i F_i away from zero)")
    if p.top_k < 0:
        raise FwllmError("fisher: top_k must be >= 0 (0 = every output)")


class FisherMerging(DataMethod):
    name = "fisher"
    pretty_name = "Fisher merging"
    reference_url = "https://arxiv.org/abs/2111.09832"
    Params = FisherParams

    def solve(self, job: MergeJob) -> None:
        p: FisherParams = job.params  # type: ignore[assignment]
        _check(p)
        # only what changes the Fishers keys the cache; merge-time settings (epsilon, weights) do not
        settings = {k: v for k, v in p.model_dump().items() if k in ("fisher", "top_k", "max_length", "seed")}
        records, heads = solve_per_candidate(
            job, "fisher", settings, lambda model, task, tok: candidate_fisher(model, task, tok, p), what="Fisher")
        plan = {
            "method": self.name,
            "base": job.base,
            "settings": p.model_dump(),
            "candidates": [vars(r) for r in records],
            "primary_head": next((r.label for r in records if r.task in heads), None),
        }
        finish_stats_plan(self, job, plan, heads)

    def load_plan(self, plan_dir: str) -> Any:
        return load_stats_plan(self.name, plan_dir, FisherParams)

    def merge_tensor(self, plan, name, base, candidates, per_model) -> torch.Tensor:
        stored = stored_or_none(plan, name, base)
        if stored is not None:
            return stored
        if not base.is_floating_point():
            return base
        if is_head_tensor(name):
            return head_or_base(plan, name, base, candidates)
        labels = plan["labels"]
        if set(candidates) != set(labels):
            raise FwllmError(f"fisher: the plan was solved for {labels}; the recipe gives {sorted(candidates)}")
        weights = weights_of(self.name, labels, per_model)
        # generators: with lazily read candidates, one theta and one Fisher are alive at a time
        thetas = (candidates[lab] for lab in labels)
        if not has_stat(plan["_files"][0], name):
            return weighted_average(thetas, weights)  # not a parameter the Fisher covers
        p: FisherParams = plan["_params"]
        means = [(c["meta"]["mean"] or 1.0) if p.normalize_fisher else 1.0 for c in plan["candidates"]]

        def fishers():
            for lab, path, mean in zip(labels, plan["_files"], means):
                f = read_stat(path, name)  # this tensor's entry only
                if f is None:
                    raise FwllmError(f"fisher: candidate {lab} has no Fisher for {name} (plan from another model?)")
                check_finite(f"Fisher of candidate {lab}", name, f)
                yield f.to(base.device) / mean

        return fisher_merge(thetas, fishers(), weights, p.epsilon)


register_data_method(FisherMerging())
