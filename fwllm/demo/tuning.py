"""Tuned baselines: task arithmetic, TIES and DARE with lambda (and density) chosen on the
calibration loss, on the very rows the data-informed methods get.

mergekit's task-arithmetic family is linear in lambda: merged = base + lambda * D, where D
is the method's merged delta at lambda = 1 (for TIES/DARE, D depends on the density). So
each density costs one pass of mergekit's own per-tensor merge (`merge_group`, in memory,
float32), and each lambda one forward pass of the calibration objective on base + lambda*D.
DARE's random masks are drawn from a generator seeded before the tensors are merged in
name order, so every lambda of one density sees the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from fwllm.core.errors import FwllmError
from fwllm.data.calibration import load_calibration
from fwllm.data.objective import Objective, encode_tasks
from fwllm.evaluation.figures import pick_grid_point
from fwllm.io.tensors import TensorReader

TUNED_METHODS = ("task_arithmetic", "ties", "dare_ties")  # mergekit method names

Delta = Dict[str, torch.Tensor]


def calibration_objective(
    calibration: str, tokenizer, model, max_rows: int, max_length: int, batch_size: int
) -> Objective:
    """The objective FW-Merging minimises for the same recipe parameters (`fw_merging` reads
    `load_calibration(calibration, max_rows)` and encodes it exactly so)."""
    return encode_tasks(load_calibration(calibration, max_rows), tokenizer, model, max_length, batch_size)


def merged_delta(
    method: str, base_dir: str, expert_dirs: Sequence[str], density: float = 1.0, seed: int = 0
) -> Delta:
    """mergekit's `method` at lambda = 1 (weights 1, the method's own normalize/rescale
    defaults) minus the base, tensor by tensor, in float32."""
    from mergekit.merge_methods import get
    from mergekit.merge_methods.base import ParameterScope, TensorGroup

    merger = get(method)
    shared = {p.name: p.default for p in merger.spec.parameters if p.scope == ParameterScope.SHARED}
    base = TensorReader(base_dir)
    experts = [TensorReader(d) for d in expert_dirs]
    delta: Delta = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in sorted(base.names()):
            b = base.get(name)
            if not b.is_floating_point():
                continue
            others = [e.get(name) for e in experts]
            if all(torch.equal(o, b) for o in others):
                # no expert moved it (LoRA experts leave embeddings and norms alone): every method of the
                # family returns the base, and skipping mergekit's per-tensor sort here saves much of a pass
                delta[name] = torch.zeros_like(b)
                continue
            group = TensorGroup.from_tensors([b] + others, base_index=0)
            ids = [entry.id for entry in group.non_base]
            params = dict(
                shared, **{"lambda": 1.0}, weight={i: 1.0 for i in ids}, density={i: density for i in ids}
            )
            delta[name] = merger.merge_group(group, **params).float() - b
    return delta


def trainable(model) -> Dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())  # tied weights appear once, under the checkpoint's name


def check_names(model, delta: Delta) -> None:
    params = trainable(model)
    missing, extra = sorted(set(params) - set(delta)), sorted(set(delta) - set(params))
    if missing or extra:
        raise FwllmError(
            f"merged tensors and model parameters differ: missing {missing[:3]}, extra {extra[:3]}"
        )


@torch.no_grad()
def set_scaled(model, base: Delta, delta: Delta, scale: float) -> None:
    """Model parameters := base + scale * delta."""
    for name, p in trainable(model).items():
        p.copy_(base[name] + scale * delta[name])


def base_state(model) -> Delta:
    return {n: p.detach().clone() for n, p in trainable(model).items()}


def scan_scale(
    model, base: Delta, delta: Delta, objective: Objective, scales: Sequence[float]
) -> Dict[float, float]:
    """Calibration loss at each scale (the model is left at the last one)."""
    losses = {}
    for s in scales:
        set_scaled(model, base, delta, s)
        losses[float(s)] = objective.value(model)
    return losses


@dataclass
class Tuned:
    method: str
    scale: float
    density: float
    loss: float
    losses: Dict[str, Dict[float, float]] = field(default_factory=dict)  # density -> {lambda: loss}

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "lambda": self.scale,
            "density": self.density,
            "calibration_loss": self.loss,
            "grid": {d: {str(k): v for k, v in g.items()} for d, g in self.losses.items()},
        }


def tune(
    method: str,
    model,
    base: Delta,
    objective: Objective,
    base_dir: str,
    expert_dirs: Sequence[str],
    scales: Sequence[float],
    densities: Sequence[float] = (1.0,),
    seed: int = 0,
    progress=None,
) -> tuple:
    """(Tuned, its delta): the (density, lambda) grid point with the lowest calibration loss."""
    best: Optional[tuple] = None
    losses: Dict[str, Dict[float, float]] = {}
    for density in densities:
        delta = merged_delta(method, base_dir, expert_dirs, density, seed)
        check_names(model, delta)
        losses[str(density)] = scan_scale(model, base, delta, objective, scales)
        lam = pick_grid_point(losses[str(density)])
        if progress:
            progress(
                f"{method} density {density}: best lambda {lam} "
                f"(calibration loss {losses[str(density)][lam]:.4f})"
            )
        if best is None or losses[str(density)][lam] < best[2]:
            best = (density, lam, losses[str(density)][lam], delta)
        del delta
    density, lam, loss, delta = best
    set_scaled(model, base, delta, lam)
    return Tuned(method, lam, density, loss, losses), delta


__all__: List[str] = [
    "TUNED_METHODS",
    "Tuned",
    "calibration_objective",
    "merged_delta",
    "scan_scale",
    "set_scaled",
    "tune",
    "base_state",
]
