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

Rows instead of Grams: with few calibration tokens a candidate's Gram G_i = X_i^T X_i has rank
T_i < in, and forming it costs as much as the layer's forward. `add_rows` takes X_i [T_i, in]
itself: the numerators need only X_i (c_i G~_i A^T = c_i [alpha X_i^T (X_i A^T) + (1 - alpha)
diag(G_i) A^T], O(T in r)), and S = D + U^T U with D = (1 - alpha) sum_i c_i diag(G_i) and U the
stacked sqrt(alpha c_i) X_i [k, in] is solved by Woodbury,

    S^-1 = D^-1 - D^-1 U^T (I + U D^-1 U^T)^-1 U D^-1     (a k x k Cholesky: O(in k^2 + k^3)).

The rows are kept while k <= in / 2 (beyond, Woodbury is no cheaper than the in^3 Cholesky, and
the rows would outgrow the Gram); past that they are folded into the dense Gram sum, and so are
they when D is (near) singular somewhere (alpha = 1, an input coordinate that is always 0): the
dense Cholesky and its ridge then decide, exactly as for Grams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from fwllm.kernels.low_rank import LowRank
from fwllm.kernels.regmean import SINGULAR_PIVOT, cholesky_or_none

TaskVector = Union[torch.Tensor, LowRank]
ROWS = 512  # Gram rows converted to float64 at a time: a few MB, reused, never a whole [in, in] copy
ROW_FRACTION = 0.5  # activation rows kept (instead of a Gram sum) while their count is <= in * this
# Woodbury only where the dense Cholesky surely succeeds: its pivots are >= min(D) (S >= D), and it
# calls S singular below SINGULAR_PIVOT * max(diag S); the margin covers round-off.
WOODBURY_MARGIN = 100 * SINGULAR_PIVOT


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

    `add` takes the candidate's Gram of that input, `add_rows` its activation rows X [T, in]
    (real tokens only: G = X^T X), and its task vector per weight (a dense tensor [out, in], a
    LowRank, or nothing where the candidate leaves a weight at W_0); `solve` gives each weight's
    merged Delta W: a LowRank (scale 1) when every candidate's term for it is low-rank, else a
    dense tensor [out, in] (float32). Rows are kept while `rows_room` allows (see the module's
    docstring), then the sums go on as a dense Gram sum."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.gram_sum: Optional[torch.Tensor] = None  # float64 [in, in], once in Gram mode
        self.rows: List[Tuple[torch.Tensor, float]] = []  # (X_i [T_i, in] as given, c_i), in rows mode
        self.row_count = 0
        self.row_diag: Optional[torch.Tensor] = None  # sum_i c_i diag(G_i) over the kept rows, float64
        self.weight_sum = 0.0
        self.numerators: Dict[str, _Numerator] = {}

    @staticmethod
    def row_limit(features: int) -> int:
        """The most rows kept for an input of `features` coordinates before the sums turn dense."""
        return int(features * ROW_FRACTION)

    def rows_room(self, features: int) -> int:
        """How many more rows `add_rows` keeps as rows (0: the sums are a dense Gram sum now)."""
        if self.gram_sum is not None:
            return 0
        return max(self.row_limit(features) - self.row_count, 0)

    def add(self, gram: torch.Tensor, taus: Mapping[str, Optional[TaskVector]], weight: float = 1.0) -> None:
        # No float64 copy of the Gram: at 1.1B, copying, scaling and allocating one per candidate and
        # layer input took a quarter of the Gram pass. The sum is float64 (the solve's), the Gram is
        # added into it in place; G~ A^T = alpha G A^T + (1 - alpha) diag(G) A^T is formed in float64
        # with the Gram's rows converted a block at a time.
        diagonal = gram.diagonal().double()
        self._dense(gram.shape[0], gram.device)
        self.gram_sum.add_(gram, alpha=self.alpha * weight)
        self.gram_sum.diagonal().add_(diagonal, alpha=(1.0 - self.alpha) * weight)

        def gram_times(x64: torch.Tensor) -> torch.Tensor:
            """G x in float64 (a float32 product lost ~1e-6 of the merge to the solve's conditioning)."""
            out = torch.empty(x64.shape, dtype=torch.float64, device=x64.device)
            for i in range(0, gram.shape[0], ROWS):
                torch.mm(gram[i : i + ROWS].double(), x64, out=out[i : i + ROWS])
            return out

        self._add_numerators(taus, weight, gram_times, diagonal)

    def add_rows(
        self, rows: torch.Tensor, taus: Mapping[str, Optional[TaskVector]], weight: float = 1.0
    ) -> None:
        """`add` for the Gram rows^T rows, without forming it while the rows fit (`rows_room`).
        The rows are kept by reference: the caller must not change them afterwards."""
        x64 = rows.double()
        diagonal = x64.square().sum(0)
        if self.gram_sum is None and rows.shape[0] <= self.rows_room(rows.shape[1]):
            self.rows.append((rows, weight))
            self.row_count += rows.shape[0]
            if self.row_diag is None:
                self.row_diag = torch.zeros_like(diagonal)
            self.row_diag.add_(diagonal, alpha=weight)
        else:
            self._dense(rows.shape[1], rows.device)
            self.gram_sum.addmm_(x64.T, x64, alpha=self.alpha * weight)
            self.gram_sum.diagonal().add_(diagonal, alpha=(1.0 - self.alpha) * weight)
        self._add_numerators(taus, weight, lambda v: x64.T @ (x64 @ v), diagonal)

    def _dense(self, features: int, device: torch.device) -> None:
        """Gram mode from now on: the kept rows folded into the float64 Gram sum."""
        if self.gram_sum is not None:
            return
        self.gram_sum = torch.zeros(features, features, dtype=torch.float64, device=device)
        for x, weight in self.rows:
            x64 = x.double()
            self.gram_sum.addmm_(x64.T, x64, alpha=self.alpha * weight)
        if self.row_diag is not None:
            self.gram_sum.diagonal().add_(self.row_diag, alpha=1.0 - self.alpha)
        self.rows, self.row_count, self.row_diag = [], 0, None

    def _add_numerators(
        self,
        taus: Mapping[str, Optional[TaskVector]],
        weight: float,
        gram_times: Callable[[torch.Tensor], torch.Tensor],
        diagonal: torch.Tensor,
    ) -> None:
        self.weight_sum += weight

        def tilde_times(x: torch.Tensor) -> torch.Tensor:
            """weight * G~ x in float64 ([in, k] for x [in, k])."""
            x64 = x.double()
            out = gram_times(x64).mul_(self.alpha * weight)
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

    def _woodbury(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """S^-1 (rhs) from the kept rows, or None where D is (near) singular: the dense path decides.

        With E = D^-1/2 and V = U E [k, in]: S^-1 = E (I - V^T (I + V V^T)^-1 V) E."""
        if not self.rows:
            return None
        d = self.row_diag * (1.0 - self.alpha)
        if float(d.min()) <= WOODBURY_MARGIN * float(self.row_diag.max()):
            return None
        e = d.rsqrt()
        v = torch.empty(self.row_count, d.shape[0], dtype=torch.float64, device=d.device)
        at = 0
        for x, weight in self.rows:
            torch.mul(x.double(), e * (self.alpha * weight) ** 0.5, out=v[at : at + x.shape[0]])
            at += x.shape[0]
        # I + V V^T: its lower triangle a block of rows at a time (half the products), then mirrored
        k = torch.empty(self.row_count, self.row_count, dtype=torch.float64, device=d.device)
        for i in range(0, self.row_count, ROWS):
            torch.mm(v[i : i + ROWS], v[: i + ROWS].T, out=k[i : i + ROWS, : i + ROWS])
        k = k.tril()
        k = k + k.tril(-1).T
        k.diagonal().add_(1.0)
        chol, info = torch.linalg.cholesky_ex(k)  # eigenvalues >= 1: fails only on NaN
        if int(info) != 0:
            return None

        def solve_for(rhs: torch.Tensor) -> torch.Tensor:
            m = rhs * e[:, None]
            return m.sub_(v.T @ torch.cholesky_solve(v @ m, chol)).mul_(e[:, None])

        return solve_for

    def solve(self, ridge: float = 1e-5) -> Tuple[Dict[str, TaskVector], float]:
        """({weight: Delta W}, lambda): lambda = 0 unless S is singular, then ridge * mean(diag S)
        (inf when S is zero: no input reached the layer, and the weighted average is returned)."""
        solve_for = self._woodbury() if self.gram_sum is None else None
        lam = 0.0
        if solve_for is None:
            if self.gram_sum is None and not self.rows:
                return {}, 0.0
            if self.gram_sum is None:
                self._dense(self.row_diag.shape[0], self.row_diag.device)
            s = self.gram_sum
            chol = cholesky_or_none(s)
            if chol is None:
                lam = ridge * float(s.diagonal().mean())
                if lam <= 0:
                    return {n: self._average(num) for n, num in self.numerators.items()}, float("inf")
                s = s.clone()
                s.diagonal().add_(lam)

            def solve_for(rhs: torch.Tensor) -> torch.Tensor:
                return torch.cholesky_solve(rhs, chol) if chol is not None else torch.linalg.solve(s, rhs)

        shift = lam / self.weight_sum if lam else 0.0
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
