"""RegMean's statistic: the Gram matrix of every linear layer's inputs on a candidate's own data.

G = sum over non-padding tokens of x x^T, the plain sum as in the paper (tasks with more
calibration tokens count more; rebalance with per-model `weight`). Linear layers whose
weight is tied to another (tied LM heads) and head layers are not merged in closed form.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch

from fwllm.arch.heads import is_head_tensor
from fwllm.arch.weight_layout import input_features, linear_modules
from fwllm.core.params import RegMeanParams
from fwllm.data.calibration import CalibrationTask
from fwllm.data.encoding import encode_task


# Which layers get a Gram: part of the statistic's cache key (Grams cached before GPT-2's Conv1D
# layers were measured lack them).
GRAM_LAYERS = "linear+conv1d"


def linear_layers(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """Linear maps (nn.Linear, GPT-2's Conv1D) merged in closed form, by weight name: not heads, not
    tied weights."""
    uses: Dict[int, int] = {}
    for _, prm in model.named_parameters(remove_duplicate=False):
        uses[id(prm)] = uses.get(id(prm), 0) + 1
    return {
        name: mod
        for name, mod in linear_modules(model).items()
        if not is_head_tensor(name) and uses[id(mod.weight)] == 1
    }


@torch.no_grad()
def collect_grams(
    model: torch.nn.Module, batches: Iterable[Dict[str, torch.Tensor]]
) -> Tuple[Dict[str, torch.Tensor], int]:
    """sum over non-padding tokens of x x^T for each linear layer's input x; and the token count."""
    layers = linear_layers(model)
    device = next(model.parameters()).device
    grams = {n: torch.zeros(input_features(m), input_features(m), device=device) for n, m in layers.items()}
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


def candidate_grams(
    model, task: CalibrationTask, tokenizer, p: RegMeanParams
) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The Grams of every merged linear layer on `task`, and the token count."""
    enc = encode_task(task, tokenizer, p.max_length, p.batch_size)
    grams, tokens = collect_grams(model, enc.batches)
    return grams, {"tokens": tokens, "layers": len(grams)}
