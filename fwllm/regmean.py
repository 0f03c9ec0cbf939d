"""`merge_method: regmean` — RegMean (Jin et al., arXiv 2212.09849).

Each linear layer of the merge should map every candidate's inputs to what that
candidate's own layer produced. For layer weights W_i ([out, in], torch's layout) and the
Gram matrix G_i = X_i^T X_i of the layer's inputs on candidate i's calibration data,
the least-squares answer is  W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T,  with
G~ = alpha G + (1 - alpha) diag(G): alpha < 1 shrinks the off-diagonals, which the paper
found to help (alpha = 1 is the exact least-squares merge). Per-model `weight`s scale
each G~_i (all 1 = the paper).

solve:  one candidate at a time: load it, run it on its own calibration task (per-model
        `task`) with forward hooks on every nn.Linear, accumulating G over the non-padding
        tokens, write the Grams, free the model. Plan folder:
          plan.json               settings; per candidate: label, task, Gram file, token count
          gram/<i>.safetensors    candidate i's Gram per linear weight name ([in, in], float32)
          fwllm_heads/            per-task classification heads (classifier candidates)
merge:  linear weights in closed form, reading that layer's Grams one at a time.

G is the plain sum over tokens, as in the paper (tasks with more calibration tokens
count more; rebalance with `weight`). Everything else — embeddings, norms, biases,
linear layers whose weight is tied to another (tied LM heads), non-nn.Linear layers —
is the weighted average of the candidates; head tensors are kept per task and the
loadable checkpoint gets the first classifier candidate's; non-float tensors come from
the base. A singular sum of Grams (an input feature never seen, or alpha = 1 with fewer
tokens than features) gets a ridge `ridge * mean(diag) * I` that pulls towards the
weighted average, so unseen input directions keep the average instead of zero; each
such layer is logged.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from fwllm.calibration import CalibrationTask
from fwllm.data_methods import DataMethod, MergeJob, MethodParams, register_data_method
from fwllm.errors import FwllmError
from fwllm.heads import is_head_tensor
from fwllm.objectives import encode_task
from fwllm.stats_io import (
    check_finite, finish_stats_plan, has_stat, head_or_base, load_stats_plan, read_stat, solve_per_candidate,
    stored_or_none, weighted_average, weights_of,
)

LOG = logging.getLogger(__name__)
# A Cholesky pivot below this fraction of the largest diagonal entry counts as singular.
SINGULAR_PIVOT = 1e-10


class RegMeanParams(MethodParams):
    alpha: float = 0.9  # off-diagonal scale of the Grams (paper: 0.9; 1 = exact least squares)
    ridge: float = 1e-5  # singular Gram sums only: + ridge * mean(diag) * I, towards the average


# -- pure math ----------------------------------------------------------------------------
def reduce_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G): the diagonal is kept, the off-diagonals shrink."""
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def _cholesky(a: torch.Tensor) -> Optional[torch.Tensor]:
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        return None
    scale = float(a.diagonal().max())
    if float(chol.diagonal().square().min()) <= SINGULAR_PIVOT * scale:
        return None  # positive only through round-off: the solve would amplify noise
    return chol


def regmean_merge(layers: Iterable[Tuple[torch.Tensor, torch.Tensor, float]], alpha: float, ridge: float
                  ) -> Tuple[torch.Tensor, float]:
    """Merge (W_i [out, in], G_i [in, in], weight c_i) triples, streamed one at a time.

    Returns (W, lambda): W^T = (sum c_i G~_i + lambda I)^-1 (sum c_i G~_i W_i^T + lambda W_avg^T),
    lambda = 0 unless the sum is singular, then ridge * mean(diag).
    """
    a = b = avg = None
    total = 0.0
    for w, gram, c in layers:
        g = reduce_gram(gram.double(), alpha) * c
        wt = w.double().T
        a = g if a is None else a + g
        b = g @ wt if b is None else b + g @ wt
        avg = wt * c if avg is None else avg + wt * c
        total += c
        del w, gram, g, wt  # before the next one is read: inputs may stream from disk
    avg /= total
    chol = _cholesky(a)
    if chol is not None:
        return torch.cholesky_solve(b, chol).T.float(), 0.0
    lam = ridge * float(a.diagonal().mean())
    if lam <= 0:
        return avg.T.float(), float("inf")  # no input ever reached the layer: the average is all we know
    a.diagonal().add_(lam)
    b += lam * avg
    return torch.linalg.solve(a, b).T.float(), lam


# -- Grams of one candidate ------------------------------------------------------------------
def linear_layers(model: torch.nn.Module) -> Dict[str, torch.nn.Linear]:
    """nn.Linear modules merged in closed form, by weight name: not heads, not tied weights."""
    uses: Dict[int, int] = {}
    for _, prm in model.named_parameters(remove_duplicate=False):
        uses[id(prm)] = uses.get(id(prm), 0) + 1
    return {
        f"{name}.weight": mod for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and not is_head_tensor(f"{name}.weight") and uses[id(mod.weight)] == 1
    }


@torch.no_grad()
def collect_grams(model: torch.nn.Module, batches: Iterable[Dict[str, torch.Tensor]]
                  ) -> Tuple[Dict[str, torch.Tensor], int]:
    """sum over non-padding tokens of x x^T for each linear layer's input x; and the token count."""
    layers = linear_layers(model)
    device = next(model.parameters()).device
    grams = {n: torch.zeros(m.in_features, m.in_features, device=device) for n, m in layers.items()}
    state: Dict[str, Optional[torch.Tensor]] = {"mask": None}

    def hook_for(name):
        def hook(module, args):
            x = args[0]
            mask = state["mask"]
            if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask]  # padding is not data the layer has to fit
            x = x.reshape(-1, x.shape[-1]).float()
            grams[name].addmm_(x.T, x)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    tokens = 0
    try:
        model.eval()
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            mask = batch.get("attention_mask")
            state["mask"] = mask.bool() if mask is not None else None
            tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return {n: g.cpu() for n, g in grams.items()}, tokens


def candidate_grams(model, task: CalibrationTask, tokenizer, p: RegMeanParams) -> Tuple[Dict[str, torch.Tensor], dict]:
    enc = encode_task(task, tokenizer, p.max_length, p.batch_size)
    grams, tokens = collect_grams(model, enc.batches)
    return grams, {"tokens": tokens, "layers": len(grams)}


# -- the method -----------------------------------------------------------------------------
class RegMean(DataMethod):
    name = "regmean"
    pretty_name = "RegMean"
    reference_url = "https://arxiv.org/abs/2212.09849"
    Params = RegMeanParams

    def solve(self, job: MergeJob) -> None:
        p: RegMeanParams = job.params  # type: ignore[assignment]
        if not 0 <= p.alpha <= 1:
            raise FwllmError("regmean: alpha must be in [0, 1]")
        if p.ridge < 0:
            raise FwllmError("regmean: ridge must be >= 0")
        settings = {k: v for k, v in p.model_dump().items() if k in ("max_length", "batch_size")}
        records, heads = solve_per_candidate(
            job, "gram", settings, lambda model, task, tok: candidate_grams(model, task, tok, p), what="Gram")
        plan = {
            "method": self.name,
            "base": job.base,
            "settings": p.model_dump(),
            "candidates": [vars(r) for r in records],
            "primary_head": next((r.label for r in records if r.task in heads), None),
        }
        finish_stats_plan(self, job, plan, heads)

    def load_plan(self, plan_dir: str) -> Any:
        return load_stats_plan(self.name, plan_dir, RegMeanParams)

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
            raise FwllmError(f"regmean: the plan was solved for {labels}; the recipe gives {sorted(candidates)}")
        weights = weights_of(self.name, labels, per_model)
        files = dict(zip(labels, plan["_files"]))
        if base.dim() != 2 or not has_stat(files[labels[0]], name):
            return weighted_average((candidates[lab] for lab in labels), weights)

        def layers():  # one Gram in memory at a time
            for lab, c in zip(labels, weights):
                gram = read_stat(files[lab], name)
                if gram is None:
                    raise FwllmError(f"regmean: candidate {lab} has no Gram for {name} (plan from another model?)")
                check_finite(f"Gram of candidate {lab}", name, gram)
                theta = candidates[lab]  # read once: candidates may be read from disk on each access
                yield theta, gram.to(theta.device), c
                del theta, gram  # before the next one is read

        p: RegMeanParams = plan["_params"]
        merged, lam = regmean_merge(layers(), p.alpha, p.ridge)
        if lam == float("inf"):
            LOG.warning("regmean: %s saw no input on any candidate; using the weighted average", name)
        elif lam:
            LOG.warning("regmean: the Gram sum of %s is singular; added ridge %.3g*I (unseen input "
                        "directions keep the weighted average)", name, lam)
        return merged


register_data_method(RegMean())
