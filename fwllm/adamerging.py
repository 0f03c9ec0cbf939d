"""`merge_method: adamerging` — layer-wise AdaMerging (Yang et al., arXiv 2310.02575).

theta_l = theta0_l + sum_i lambda_{l,i} tau_{l,i}, one coefficient per parameter tensor l
(the paper's "layer-wise": one per tensor, not per transformer block) and candidate i,
learnt by minimising the entropy of the merged model's predictions on unlabeled rows:
Adam for `steps` full passes over the calibration data, lambda starting at
`init_lambda` and kept in [0, 1] after each step (`clamp`, as in the paper).

Entropy is taken where each task predicts, and labels are never read:
  classification rows   the class distribution (task head from the candidate whose
                        per-model `task` names it, in encoder pools)
  causal-LM rows        next-token distributions at the response positions (the
                        response is context only, never a target)
  text rows             every position (as fwllm.objectives does for unlabeled rows)
  regression rows       no predictive distribution: the task is skipped, with a warning
The objective is the mean over tasks of each task's mean entropy.

This is the baseline whose memory grows linearly with N, by design: every task vector is
held in memory. dEntropy/dlambda_{l,i} = <dEntropy/dtheta_l, tau_{l,i}> (chain rule), so
each step runs the model once with theta(lambda) written into it and contracts the
weight gradients with the task vectors; no graph through the merge is kept.

Plan folder:
  plan.json          settings, candidates, primary head
  coefficients.json  {"candidates": [...], "coefficients": {tensor: [lambda per candidate]}}
  trace.json         entropy before each step and after the last one
  reproduce.yml      a plain mergekit `task_arithmetic` recipe giving the same tensors
  fwllm_heads/       per-task classification heads (encoder pools)
Tensors without a coefficient (heads, non-float tensors) come from the base, except that
head tensors come from the first candidate with a head, as for the other methods.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, List, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fwllm.calibration import CAUSAL, REGRESSION, load_calibration
from fwllm.data_methods import DataMethod, MergeJob, MethodParams, mark_plan_complete, register_data_method
from fwllm.encoder_pool import classifier_arch
from fwllm.errors import FwllmError
from fwllm.fw_method import _head_module, _reproduce_recipe, _task_heads
from fwllm.heads import is_head_tensor, save_heads
from fwllm.model_io import (
    TensorReader, check_same_architecture, load_model, load_tokenizer, open_candidate, read_config, resolve_model_path,
)
from fwllm.objectives import (
    CLASSIFIER_MODEL, EncodedTask, architecture_kind, check_rows_fit, encode_task, model_kind, using_head,
)
from fwllm.stats_io import head_or_base

LOG = logging.getLogger(__name__)


class AdaMergingParams(MethodParams):
    steps: int = 16  # Adam steps, one full pass over the calibration rows each
    lr: float = 0.01  # the paper uses 1e-3 over 500 steps; a short run needs a larger rate
    init_lambda: float = 0.3  # every coefficient's starting value (the paper's)
    clamp: bool = True  # keep coefficients in [0, 1] after every step


# -- pure math ----------------------------------------------------------------------------
def merged_tensor(theta0: torch.Tensor, taus: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """theta0 + sum_i lambda_i tau_i for taus stacked as [N, *shape]."""
    return theta0 + torch.tensordot(lambdas.to(taus.dtype), taus, dims=1)


def coefficient_gradient(grads: Sequence[torch.Tensor], taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """[L, N] matrix of <dE/dtheta_l, tau_{l,i}>, i.e. dE/dlambda_{l,i}."""
    return torch.stack([
        torch.zeros(t.shape[0]) if g is None else (t.flatten(1) @ g.flatten().to(t.dtype)).cpu()
        for g, t in zip(grads, taus)
    ])


def entropy_sum(logits: torch.Tensor, kind: str, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed prediction entropy of one micro-batch at the positions its rows predict."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    if ent.dim() == 1:  # sequence classifier: one prediction per row
        return ent.sum()
    if kind == CAUSAL:  # response positions only; the response tokens are context, not targets
        return ent[:, :-1][batch["labels"][:, 1:] != -100].sum()
    return (ent * batch["attention_mask"]).sum()


# -- the solve ------------------------------------------------------------------------------
def entropy_backward(model: torch.nn.Module, tasks: Sequence[EncodedTask], grad: bool = True) -> float:
    """Mean over tasks of the mean entropy; accumulates its gradient into `.grad` when `grad`."""
    device = next(model.parameters()).device
    total = 0.0
    for task in tasks:
        scale = 1.0 / (task.units * len(tasks))
        with using_head(model, task.head), torch.set_grad_enabled(grad):
            for batch in task.batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                value = entropy_sum(logits, task.kind, batch) * scale
                if not torch.isfinite(value):
                    raise FwllmError(f"adamerging: prediction entropy on task {task.name!r} is not finite")
                if grad:
                    value.backward()
                total += value.item()
    return total


def _usable_tasks(tasks, kind: str):
    kept = []
    for task in tasks:
        if task.kind == REGRESSION:
            LOG.warning("adamerging: skipping regression task %r (no predictive distribution to take the entropy of)",
                        task.name)
            continue
        check_rows_fit(task, kind)
        kept.append(task)
    if not kept:
        raise FwllmError("adamerging: no calibration task with a predictive distribution (all are regression)")
    return kept


def _reproducible(coefficients: Dict[str, List[float]], tensor_names: Sequence[str]) -> bool:
    """mergekit's `filter` is a first-hit substring match; check every tensor resolves to its own entry."""
    order = sorted(coefficients, key=len, reverse=True)
    for name in tensor_names:
        hit = next((f for f in order if f in name), None)
        if hit is not None and hit != name:
            LOG.warning("adamerging: %s would take %s's coefficient in mergekit; no reproduce.yml", name, hit)
            return False
    return True


class AdaMerging(DataMethod):
    name = "adamerging"
    pretty_name = "AdaMerging (layer-wise)"
    reference_url = "https://arxiv.org/abs/2310.02575"
    Params = AdaMergingParams
    per_model = {"task": (str, "")}  # names the candidate's head (encoder pools); no weights to give

    def solve(self, job: MergeJob) -> None:
        p: AdaMergingParams = job.params  # type: ignore[assignment]
        if p.steps < 0 or p.lr <= 0:
            raise FwllmError("adamerging: steps must be >= 0 and lr > 0")
        if not p.calibration:
            raise FwllmError("adamerging needs `parameters: {calibration: PATH}` (a .jsonl file or a folder of them)")
        if not job.candidates:
            raise FwllmError("adamerging: the candidate pool is empty")
        torch.manual_seed(p.seed)
        start = time.time()
        base_dir = resolve_model_path(job.base)
        candidates = [open_candidate(c.model, c.lora) for c in job.candidates]
        check_same_architecture(base_dir, [c.model_dir for c in candidates if c.model_dir])
        arch = classifier_arch([c.model_dir for c in candidates if c.model_dir])
        kind = architecture_kind(arch or (read_config(base_dir).get("architectures") or ["?"])[0])
        tasks = _usable_tasks(load_calibration(p.calibration, p.max_rows), kind)  # before any weights load
        model = load_model(base_dir, torch.float32, job.device, architecture=arch)
        tokenizer = load_tokenizer(base_dir)
        heads = _task_heads(model, candidates, job.candidates, tasks) if model_kind(model) == CLASSIFIER_MODEL else {}
        encoded = []
        for task in tasks:
            enc = encode_task(task, tokenizer, p.max_length, p.batch_size)
            enc.head = _head_module(model, heads[task.name]) if task.name in heads else None
            encoded.append(enc)

        params = {n: prm for n, prm in model.named_parameters() if prm.is_floating_point() and not is_head_tensor(n)}
        for n, prm in model.named_parameters():
            prm.requires_grad_(n in params)
        names = list(params)
        theta0 = [params[n].detach().clone() for n in names]
        # all task vectors at once: [N, *shape] per tensor (the linear-in-N memory, by design)
        taus = [torch.stack([c.task_vector(n, t0.cpu()).to(t0.device) for c in candidates])
                for n, t0 in zip(names, theta0)]
        lambdas = torch.full((len(names), len(candidates)), float(p.init_lambda), requires_grad=True)
        opt = torch.optim.Adam([lambdas], lr=p.lr)

        def load_theta():
            with torch.no_grad():
                for n, t0, tau, lam in zip(names, theta0, taus, lambdas):
                    params[n].copy_(merged_tensor(t0, tau, lam.detach().to(t0.device)))

        trace = []
        for _ in tqdm(range(p.steps), desc="adamerging", disable=not job.progress):
            load_theta()
            model.zero_grad(set_to_none=True)
            trace.append(entropy_backward(model, encoded))
            opt.zero_grad()
            lambdas.grad = coefficient_gradient([params[n].grad for n in names], taus)
            opt.step()
            if p.clamp:
                with torch.no_grad():
                    lambdas.clamp_(0.0, 1.0)
        load_theta()
        trace.append(entropy_backward(model, encoded, grad=False))

        os.makedirs(job.plan_dir, exist_ok=True)
        labels = [c.label for c in job.candidates]
        coefficients = {n: [float(x) for x in row] for n, row in zip(names, lambdas.detach())}
        plan = {
            "method": self.name,
            "base": job.base,
            "candidates": labels,
            "settings": p.model_dump(),
            "primary_head": next((c.label for c in job.candidates if c.params.get("task") in heads), None),
            "entropy": {"initial": trace[0], "final": trace[-1]},
            "solve_seconds": time.time() - start,
        }
        self._write(job.plan_dir, "plan.json", plan)
        self._write(job.plan_dir, "coefficients.json", {"candidates": labels, "coefficients": coefficients})
        self._write(job.plan_dir, "trace.json", {"entropy": trace, "lr": p.lr, "steps": p.steps})
        if _reproducible(coefficients, TensorReader(base_dir).names()):
            with open(os.path.join(job.plan_dir, "reproduce.yml"), "w", encoding="utf-8") as fp:
                fp.write(_reproduce_recipe(job.base, labels, coefficients, "float32"))
        if heads:
            save_heads(job.plan_dir, heads)
        mark_plan_complete(job.plan_dir)

    @staticmethod
    def _write(plan_dir: str, file: str, data: dict) -> None:
        with open(os.path.join(plan_dir, file), "w", encoding="utf-8") as fp:
            json.dump(data, fp, indent=2)

    def load_plan(self, plan_dir: str) -> Any:
        paths = [os.path.join(plan_dir, f) for f in ("plan.json", "coefficients.json")]
        if not all(os.path.isfile(f) for f in paths):
            raise FwllmError(f"{plan_dir} is not an adamerging plan (no plan.json / coefficients.json)")
        with open(paths[0], encoding="utf-8") as fp:
            plan = json.load(fp)
        if plan.get("method") != self.name:
            raise FwllmError(f"{plan_dir} holds a {plan.get('method')} plan, not an adamerging plan")
        with open(paths[1], encoding="utf-8") as fp:
            plan["coefficients"] = json.load(fp)["coefficients"]
        return plan

    def merge_tensor(self, plan, name, base, candidates, per_model) -> torch.Tensor:
        coefficients = plan["coefficients"].get(name)
        if coefficients is None:
            return head_or_base(plan, name, base, candidates)
        labels = plan["candidates"]
        if set(candidates) != set(labels):
            raise FwllmError(f"adamerging: the plan was solved for {labels}; the recipe gives {sorted(candidates)}")
        base32 = base.float()
        return base32 + sum(c * (candidates[lab].float() - base32) for lab, c in zip(labels, coefficients))


register_data_method(AdaMerging())
