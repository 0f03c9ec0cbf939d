"""Layer-wise AdaMerging: learn one coefficient per tensor and candidate by minimising the
entropy of the merged model's predictions on unlabeled rows.

Adam for `steps` full passes over the calibration data, lambda starting at `init_lambda`
and kept in [0, 1] after each step (`clamp`, as in the paper). Labels are never read:
the entropy is taken where each task predicts (`fwllm.data.positions`); the response of
a causal-LM row is context only, never a target.

This baseline's memory grows with N by design: every task vector is held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from tqdm.auto import tqdm

from fwllm.arch.heads import using_head
from fwllm.core.errors import FwllmError
from fwllm.core.params import AdaMergingParams
from fwllm.data.encoding import EncodedTask
from fwllm.data.objective import entropy
from fwllm.data.positions import predicted_positions
from fwllm.io.candidates import Candidate
from fwllm.kernels.adamerging import coefficient_gradient, merged_tensor


def entropy_backward(model: torch.nn.Module, tasks: Sequence[EncodedTask], grad: bool = True) -> float:
    """Mean over tasks of the mean prediction entropy; accumulates its gradient into `.grad` when `grad`."""
    device = next(model.parameters()).device
    total = 0.0
    for task in tasks:
        scale = 1.0 / (task.units * len(tasks))
        with using_head(model, task.head), torch.set_grad_enabled(grad):
            for batch in task.batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                at, _ = predicted_positions(logits, batch, task.kind, task.model_kind)
                value = entropy(at).sum() * scale
                if not torch.isfinite(value):
                    raise FwllmError(f"adamerging: prediction entropy on task {task.name!r} is not finite")
                if grad:
                    value.backward()
                total += value.item()
    return total


@dataclass
class AdaMergingResult:
    coefficients: Dict[str, List[float]]  # per tensor, one lambda per candidate
    entropy: List[float]  # before each step, and after the last


def adamerge(
    model: torch.nn.Module,
    tasks: Sequence[EncodedTask],
    candidates: Sequence[Candidate],
    names: Sequence[str],
    p: AdaMergingParams,
    progress: bool = True,
) -> AdaMergingResult:
    """Learn the coefficients of the tensors `names` (the model's weights start as theta_0)."""
    params = dict(model.named_parameters())
    for n, prm in params.items():
        prm.requires_grad_(n in names)
    theta0 = [params[n].detach().clone() for n in names]
    # every task vector at once, [N, *shape] per tensor: the linear-in-N memory, by design
    taus = [
        torch.stack([c.task_vector(n, t0.cpu()).to(t0.device) for c in candidates])
        for n, t0 in zip(names, theta0)
    ]
    lambdas = torch.full((len(names), len(candidates)), float(p.init_lambda), requires_grad=True)
    opt = torch.optim.Adam([lambdas], lr=p.lr)

    def load_theta():
        with torch.no_grad():
            for n, t0, tau, lam in zip(names, theta0, taus, lambdas):
                params[n].copy_(merged_tensor(t0, tau, lam.detach().to(t0.device)))

    trace = []
    for _ in tqdm(range(p.steps), desc="adamerging", disable=not progress):
        load_theta()
        model.zero_grad(set_to_none=True)
        trace.append(entropy_backward(model, tasks))
        opt.zero_grad()
        lambdas.grad = coefficient_gradient([params[n].grad for n in names], taus)
        opt.step()
        if p.clamp:
            with torch.no_grad():
                lambdas.clamp_(0.0, 1.0)
    load_theta()
    trace.append(entropy_backward(model, tasks, grad=False))
    coefficients = {n: [float(x) for x in row] for n, row in zip(names, lambdas.detach())}
    return AdaMergingResult(coefficients, trace)
