"""Layer-wise AdaMerging with a bounded memory (`gradient: layerwise`).

The coefficients are tiny ([tensors, N]); what is model-sized is the merged model and its
gradient. Here the merged model is a meta skeleton (`fwllm.arch.streaming`) whose layers are
formed one at a time as theta0 + sum_i lambda_i tau_i (each tau read from its candidate, one
tensor at a time), and the entropy's gradient comes from the layer-by-layer backward of
`fwllm.solvers.streamed_gradient`. Each layer's weight gradient is contracted with the taus
the moment it is made (dE/dlambda_{l,i} = <dE/dtheta_l, tau_{l,i}>), so no gradient and no
task vector outlives its tensor.

Cost per Adam step: the taus are read three times (forward, recompute, contraction) instead of
being held, i.e. 3 N model reads per step; RAM holds one layer, its gradient and one tau. A plain
LoRA candidate's tau is never formed (`MergedPoint`), and a pool of them ends with its merge as
factors (`MergedPoint.low_rank_deltas`): the plan stores those, so mergekit never merges an adapter
into a model copy (16 copies at 1.1B: 33 GB written).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Mapping, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from fwllm.arch.heads import using_head
from fwllm.arch.streaming import MetaModel
from fwllm.core.errors import FwllmError
from fwllm.core.params import AdaMergingParams
from fwllm.data.objective import Objective, entropy
from fwllm.data.positions import predicted_positions
from fwllm.io.adapters import LoraFactors
from fwllm.io.candidates import Candidate
from fwllm.kernels.low_rank import LowRank
from fwllm.solvers.adamerging import AdaMergingResult
from fwllm.solvers.lora_terms import low_rank_candidate
from fwllm.solvers.streamed_gradient import StreamedGradient


def entropy_sum(model: torch.nn.Module, task, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed prediction entropy of one micro-batch where its task predicts (as the in-RAM solver)."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    at, _ = predicted_positions(logits, batch, task.kind, task.model_kind)
    value = entropy(at).sum()
    if not torch.isfinite(value):
        raise FwllmError(f"adamerging: prediction entropy on task {task.name!r} is not finite")
    return value


class StreamedLoss(StreamedGradient):
    """A `StreamedGradient` whose per-micro-batch loss is `loss(model, task, batch)` (summed)
    instead of the calibration objective's."""

    def __init__(self, *args, loss=entropy_sum, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss = loss

    def _top(self, term, backward: bool) -> float:
        top = term.hidden.to(self.meta.device).requires_grad_(backward)
        last = len(self.layers) - 1
        with (
            self._layers_as(lambda i: lambda hidden, *a, **k: top if i == last else hidden),
            using_head(self.model, term.task.head),
            torch.set_grad_enabled(backward),
        ):
            loss = self.loss(self.model, term.task, term.batch) * term.scale
        if backward:
            loss.backward()
            term.grad = (top.grad if top.grad is not None else torch.zeros_like(top)).to(self.host)
        term.hidden = None
        return float(loss.item())


def _low_rank_sum(low: Sequence[Tuple[int, LoraFactors]], lam: Sequence[float]) -> LowRank:
    """sum_i lambda_i s_i B_i A_i over plain LoRA candidates (i, factors), as [lambda_i s_i B_i] [A_i]."""
    a = torch.cat([f.a.float() for _, f in low])
    return LowRank(a, torch.cat([f.b.float() * (lam[i] * f.scale) for i, f in low], dim=1))


class MergedPoint(Mapping):
    """tensor name -> theta0 + sum_i lambda_i tau_i, formed on access from the base map and the
    candidates (one dense tau alive at a time); names without coefficients are not in it.

    A plain LoRA candidate's tau = s B A is never formed: the merged tensor adds every such
    candidate's term in one product, [lambda_i s_i B_i]_i [A_i]_i, and its inner product with a
    gradient is s <B^T g, A>. A candidate whose adapter leaves a tensor unchanged (tau = 0) is
    skipped there. Forming each of 16 adapters' dense tau three times per step, for every tensor of
    the model, took ~90% of an Adam step at 1.1B."""

    def __init__(
        self, base: Mapping[str, torch.Tensor], candidates: Sequence[Candidate], names: Sequence[str]
    ):
        self.base, self.candidates = base, list(candidates)
        self.rows = {n: i for i, n in enumerate(names)}
        self.lambdas = torch.zeros(len(names), len(self.candidates))

    def theta0(self, name: str) -> torch.Tensor:
        return self.base[name].to(torch.float32, copy=True)

    def _parts(self, name: str) -> Tuple[List[int], List[Tuple[int, LoraFactors]]]:
        """The candidates whose tau is dense here, and the plain LoRA ones with their factors."""
        dense: List[int] = []
        low: List[Tuple[int, LoraFactors]] = []
        for i, c in enumerate(self.candidates):
            a = c.adapter
            if low_rank_candidate(a, name):
                low.append((i, a.factors[name]))
            elif a is None or name in a.factors or name in a.full:
                dense.append(i)
        return dense, low

    def __getitem__(self, name: str) -> torch.Tensor:
        lam = self.lambdas[self.rows[name]].tolist()
        dense, low = self._parts(name)
        theta0 = self.theta0(name)
        out = theta0.clone() if dense else theta0
        for i in dense:
            out.add_(self.candidates[i].task_vector(name, theta0).float(), alpha=lam[i])
        if low:
            term = _low_rank_sum(low, lam)
            out.addmm_(term.b, term.a)
        return out

    def low_rank_deltas(self) -> Iterator[Tuple[str, LowRank]]:
        """(name, sum_i lambda_i tau_i as one LowRank of rank sum r_i) for every tensor a candidate
        changes, when each change is a plain LoRA term (else nothing is yielded for that tensor)."""
        for name, row in self.rows.items():
            dense, low = self._parts(name)
            if low and not dense:
                yield name, _low_rank_sum(low, self.lambdas[row].tolist())

    def inner(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """<g, tau_i> for every candidate i ([N]; g: the tensor's gradient, float32)."""
        out = torch.zeros(len(self.candidates))
        dense, low = self._parts(name)
        if dense:
            theta0 = self.theta0(name)
            for i in dense:
                out[i] = self.candidates[i].task_vector(name, theta0).float().flatten() @ g.flatten()
        for i, f in low:
            out[i] = f.scale * float(((f.b.float().T @ g) * f.a.float()).sum())
        return out

    def __contains__(self, name) -> bool:
        return name in self.rows

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def streamed_adamerge(
    meta: MetaModel,
    objective: Objective,
    point: MergedPoint,
    names: Sequence[str],
    p: AdaMergingParams,
    progress: bool = True,
    checkpoint_bytes: int = 1 << 30,
) -> AdaMergingResult:
    """The in-RAM `adamerge` (same Adam, same clamp, same trace) on a streamed model."""
    gradient = StreamedLoss(meta, objective, names, lambda: point, checkpoint_bytes=checkpoint_bytes)
    lambdas = torch.full((len(names), len(point.candidates)), float(p.init_lambda), requires_grad=True)
    opt = torch.optim.Adam([lambdas], lr=p.lr)
    rows = {n: i for i, n in enumerate(names)}
    grad = torch.zeros_like(lambdas)

    def contract(name: str, g: torch.Tensor) -> None:
        # called once per checkpoint group and tensor: the groups' gradients add up
        grad[rows[name]] += point.inner(name, g.detach().to("cpu", torch.float32))

    trace: List[float] = []
    for _ in tqdm(range(p.steps), desc="adamerging (layerwise)", disable=not progress):
        point.lambdas = lambdas.detach().clone()
        grad.zero_()
        trace.append(gradient(contract))
        opt.zero_grad()
        lambdas.grad = grad.clone()
        opt.step()
        if p.clamp:
            with torch.no_grad():
                lambdas.clamp_(0.0, 1.0)
    point.lambdas = lambdas.detach().clone()
    trace.append(gradient.value())
    coefficients = {n: [float(x) for x in row] for n, row in zip(names, lambdas.detach())}
    result = AdaMergingResult(coefficients, trace)
    result.stats = {
        "layer_fetches": meta.fetches,  # type: ignore[attr-defined]
        "peak_resident_bytes": meta.peak_resident_bytes,
        "checkpoint_groups": gradient.groups_last,
    }
    return result
