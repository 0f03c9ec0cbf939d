"""RegMean from reduced statistics: one Gram sum per layer input, no Gram kept per candidate.

RegMean's closed form (fwllm.kernels.regmean) per linear weight W [out, in], in task-vector
space (tau_i = W_i - W_0), with per-candidate weights c_i scaling the Grams:

    Delta W^T = S^-1 N,   S = sum_i c_i G~_i [in, in],   N = sum_i c_i G~_i tau_i^T [in, out],
    G~ = alpha G + (1 - alpha) diag(G).

S depends only on the layer input, so the weights that read one input (q/k/v; gate/up) share
it. For a LoRA candidate tau_i = s_i B_i A_i, so c_i G~_i tau_i^T = (c_i G~_i A_i^T)(s_i B_i^T):
keeping the [in, r_i] and [r_i, out] factors, the merge is exactly a LoRA of rank <= sum r_i,

    Delta W = B_m A_m,   A_m = (S^-1 [c_i G~_i A_i^T]_i)^T  [(sum r) x in],   B_m = [s_i B_i]_i.

The ridge fallback is the one of fwllm.kernels.regmean (towards the weighted average of the
tau_i when S is singular); it is linear in the same factors, so it stays low-rank too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch

from fwllm.kernels.low_rank import LowRank
from fwllm.kernels.regmean import cholesky_or_none

TaskVector = Union[torch.Tensor, LowRank]
ROWS = 512  # Gram rows converted to float64 at a time: a few MB, reused, never a whole [in, in] copy


@dataclass
class _Numerator:
    """N for one weight: a dense part (full candidates) and the LoRA candidates' factor columns."""

    dense: Optional[torch.Tensor] = None  # sum_i c_i G~_i tau_i^T over dense candidates [in, out]
    dense_avg: Optional[torch.Tensor] = None  # sum_i c_i tau_i^T over dense candidates (for the ridge)
    gram_a: List[torch.Tensor] = field(default_factory=list)  # c_i G~_i A_i^T [in, r_i]
    plain_a: List[torch.Tensor] = field(default_factory=list)  # c_i A_i^T [in, r_i] (for the ridge)
    scaled_b: List[torch.Tensor] = field(default_factory=list)  # s_i B_i^T [r_i, out]


class RegMeanSums:
    """RegMean's sums for the weights that read one layer input, one candidate added at a time.

    `add` takes the candidate's Gram of that input and its task vector per weight (a dense
    tensor [out, in], a LowRank, or nothing where the candidate leaves a weight at W_0);
    `solve` gives each weight's merged Delta W: a LowRank (scale 1) when every candidate's term
    for it is low-rank, else a dense tensor [out, in] (float32)."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.gram_sum: Optional[torch.Tensor] = None
        self.weight_sum = 0.0
        self.numerators: Dict[str, _Numerator] = {}

    def add(self, gram: torch.Tensor, taus: Mapping[str, Optional[TaskVector]], weight: float = 1.0) -> None:
        # No float64 copy of the Gram: at 1.1B, copying, scaling and allocating one per candidate and
        # layer input took a quarter of the Gram pass. The sum is float64 (the solve's), the Gram is
        # added into it in place; G~ A^T = alpha G A^T + (1 - alpha) diag(G) A^T is formed in float64
        # with the Gram's rows converted a block at a time.
        diagonal = gram.diagonal().double()
        if self.gram_sum is None:
            self.gram_sum = torch.zeros(gram.shape, dtype=torch.float64, device=gram.device)
        self.gram_sum.add_(gram, alpha=self.alpha * weight)
        self.gram_sum.diagonal().add_(diagonal, alpha=(1.0 - self.alpha) * weight)
        self.weight_sum += weight

        def tilde_times(x: torch.Tensor) -> torch.Tensor:
            """weight * G~ x in float64 ([in, k] for x [in, k]), the Gram converted a block of rows at a
            time (a float32 product lost ~1e-6 of the merge to the solve's conditioning)."""
            x64 = x.double()
            out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
            for i in range(0, gram.shape[0], ROWS):
                torch.mm(gram[i : i + ROWS].double(), x64, out=out[i : i + ROWS])
            out.mul_(self.alpha * weight)
            return out.add_(x64 * (diagonal * ((1.0 - self.alpha) * weight))[:, None])

        for name, tau in taus.items():
            if tau is None:
                continue
            num = self.numerators.setdefault(name, _Numerator())
            if isinstance(tau, LowRank):
                num.gram_a.append(tilde_times(tau.a.T))
                num.plain_a.append(tau.a.double().T * weight)
                num.scaled_b.append(tau.b.double().T * tau.scale)
            else:
                t = tau.T
                num.dense = tilde_times(t) if num.dense is None else num.dense.add_(tilde_times(t))
                td = t.double() * weight
                num.dense_avg = td if num.dense_avg is None else num.dense_avg.add_(td)

    def solve(self, ridge: float = 1e-5) -> Tuple[Dict[str, TaskVector], float]:
        """({weight: Delta W}, lambda): lambda = 0 unless S is singular, then ridge * mean(diag S)
        (inf when S is zero: no input reached the layer, and the weighted average is returned)."""
        if self.gram_sum is None:
            return {}, 0.0
        s = self.gram_sum
        chol = cholesky_or_none(s)
        lam = 0.0
        if chol is None:
            lam = ridge * float(s.diagonal().mean())
            if lam <= 0:
                return {n: self._average(num) for n, num in self.numerators.items()}, float("inf")
            s = s.clone()
            s.diagonal().add_(lam)
        shift = lam / self.weight_sum if lam else 0.0

        def solve_for(rhs: torch.Tensor) -> torch.Tensor:
            return torch.cholesky_solve(rhs, chol) if chol is not None else torch.linalg.solve(s, rhs)

        out: Dict[str, TaskVector] = {}
        for name, num in self.numerators.items():
            low = None
            if num.gram_a:
                cols = torch.cat(num.gram_a, dim=1)
                if shift:
                    cols = cols + shift * torch.cat(num.plain_a, dim=1)
                low = (solve_for(cols), torch.cat(num.scaled_b, dim=0))  # ([in, R], [R, out])
            if num.dense is None:
                out[name] = LowRank(low[0].T.float(), low[1].T.float())
                continue
            rhs = num.dense + shift * num.dense_avg if shift else num.dense
            delta_t = solve_for(rhs)
            if low is not None:
                delta_t = delta_t + low[0] @ low[1]
            out[name] = delta_t.T.float()
        return out, lam

    def _average(self, num: _Numerator) -> TaskVector:
        """sum_i c_i tau_i / sum_i c_i, in the candidates' own form."""
        inv = 1.0 / self.weight_sum
        low = None
        if num.plain_a:
            a_t = torch.cat(num.plain_a, dim=1) * inv
            low = LowRank(a_t.T.float(), torch.cat(num.scaled_b, dim=0).T.float())
        if num.dense_avg is None:
            return low
        dense = (num.dense_avg * inv).T.float()
        return dense + low.dense() if low is not None else dense
