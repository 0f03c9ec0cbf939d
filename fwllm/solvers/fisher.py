"""The diagonal Fisher of one candidate on its own calibration task.

Per example x, averaged over the task's examples that predict anything:

* ``fisher: exact``: the expectation under the model's own predictive distribution,
  sum_y p(y|x) (grad log p(y|x))^2.
    - classification: over every class;
    - causal LM: per response position t, teacher-forced on the row's response, over the
      top_k most likely tokens v with p~_t(v) renormalised over those k, summed over
      positions (cross-position terms vanish in expectation when the tokens come from the
      model itself). Cost: positions x top_k backward passes per example (0 = the vocabulary);
    - regression: a unit-variance Gaussian likelihood, so the expectation is (grad f)^2;
    - unlabeled text: every predicted position (`fwllm.data.positions`).
* ``fisher: empirical``: the squared gradient of each example's log-likelihood of its
  observed label / response tokens (one backward pass per example).

Squares are always of one example's gradients, never of a summed batch gradient, so rows
run one at a time.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

from fwllm.arch.heads import is_head_tensor
from fwllm.arch.kinds import model_kind
from fwllm.core.params import FisherParams
from fwllm.data.calibration import REGRESSION, CalibrationTask
from fwllm.data.encoding import encode_task
from fwllm.data.positions import predicted_positions
from fwllm.kernels.fisher import Term, gaussian_terms, prediction_terms


def add_example_fisher(
    params: Sequence[torch.Tensor], terms: Sequence[Term], acc: Sequence[torch.Tensor]
) -> None:
    """acc += sum_terms w (grad term)^2: one backward pass per term, each squared on its own."""
    for i, (value, weight) in enumerate(terms):
        grads = torch.autograd.grad(value, params, retain_graph=i < len(terms) - 1, allow_unused=True)
        for a, g in zip(acc, grads):
            if g is not None:
                a.add_(g.square(), alpha=weight)


def candidate_fisher(
    model: torch.nn.Module, task: CalibrationTask, tokenizer, p: FisherParams
) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Diagonal Fisher of every non-head float parameter, averaged over the task's rows."""
    model.eval()  # dropout off: the Fisher of the predictor that gets merged
    named = [
        (n, prm) for n, prm in model.named_parameters() if prm.is_floating_point() and not is_head_tensor(n)
    ]
    for prm in model.parameters():
        prm.requires_grad_(False)
    for _, prm in named:
        prm.requires_grad_(True)
    params = [prm for _, prm in named]
    acc = [torch.zeros_like(prm) for prm in params]
    kind = model_kind(model)
    enc = encode_task(task, tokenizer, p.max_length, batch_size=1, model_kind=kind)  # per-example gradients
    device = params[0].device
    terms_total = examples = 0
    for batch in enc.batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        if task.kind == REGRESSION:
            terms = gaussian_terms(logits.view(-1), batch.get("labels"), p.fisher)
        else:
            pos, targets = predicted_positions(logits, batch, task.kind, kind)
            if pos.shape[0] == 0:
                continue  # e.g. a response truncated away: nothing predicted, not an example
            # a classifier's expectation runs over every class; top_k bounds a vocabulary
            top_k = 0 if logits.dim() == 2 else p.top_k
            terms = prediction_terms(pos, targets, p.fisher, top_k)
        add_example_fisher(params, terms, acc)
        terms_total += len(terms)
        examples += 1
        del logits
    n = max(examples, 1)
    fisher = {name: (a / n).cpu() for (name, _), a in zip(named, acc)}
    numel = sum(t.numel() for t in fisher.values())
    mean = float(sum(t.double().sum() for t in fisher.values()) / max(numel, 1))
    return fisher, {"examples": examples, "terms": terms_total, "mean": mean}
