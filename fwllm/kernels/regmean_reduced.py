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

The rows are kept while k <= in (float32 rows [k, in]: at most half the float64 Gram they make);
past that they are folded into the dense Gram sum. The solve picks Woodbury or the Gram sum by
their flops (`_woodbury_pays`): forming U^T U costs in^2 k and its Cholesky in^3 / 3, Woodbury's
U U^T k^2 in and its Cholesky k^3 / 3, and applying S^-1 to the R numerator columns 2 in^2 R
against Woodbury's (4 in k + 2 k^2) R. Rows fold into the Gram sum, too, when D is (near)
singular somewhere (alpha = 1, an input coordinate that is always 0): the dense Cholesky and its
ridge then decide, exactly as for Grams.

Only the lower triangles of U^T U and U U^T are formed (a block of rows at a time: about half the
products of a full one); the Cholesky factorisations read nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from fwllm.kernels.cholesky import cholesky_lower
from fwllm.kernels.low_rank import LowRank
from fwllm.kernels.regmean import SINGULAR_PIVOT, cholesky_or_none

TaskVector = Union[torch.Tensor, LowRank]
ROWS = 512  # Gram rows converted to float64 at a time: a few MB, reused, never a whole [in, in] copy
ROW_FRACTION = 1.0  # activation rows kept (instead of a Gram sum) while their count is <= in * this
BLOCK = 256  # rows of a lower triangle formed per product: small enough to skip most of the upper one
# Woodbury only where the dense Cholesky surely succeeds: its pivots are >= min(D) (S >= D), and it
# calls S singular below SINGULAR_PIVOT * max(diag S); the margin covers round-off.
WOODBURY_MARGIN = 100 * SINGULAR_PIVOT


def add_lower_product(out: torch.Tensor, x: torch.Tensor, alpha: float = 1.0, start: int = 0) -> None:
    """The lower triangle of `out` [n, n] += alpha x^T x for x [k, n] (what lies above it: some of it),
    from column `start` on. Halved recursively: the square below the diagonal is one large product,
    the two triangles beside it recurse, down to BLOCK-wide diagonal blocks formed whole. Large
    products run nearer the machine's peak than a block row at a time (at in = 5632: 0.53 of a full
    x^T x's time, against 0.58 block row by block row)."""
    end = x.shape[1]
    while end - start > BLOCK:
        mid = start + -(-(end - start) // 2 // BLOCK) * BLOCK  # a multiple of BLOCK in (start, end)
        out[mid:end, start:mid].addmm_(x[:, mid:end].T, x[:, start:mid], alpha=alpha)
        add_lower_product(out, x, alpha, mid)
        x, end = x[:, :mid], mid
    out[start:end, start:end].addmm_(x[:, start:end].T, x[:, start:end], alpha=alpha)


def symmetrize_(lower: torch.Tensor) -> torch.Tensor:
    """`lower` made the symmetric matrix of its lower triangle, in place: each block below the diagonal
    copied, transposed, over its mirror (no [n, n] temporary: at a 7B MLP's 11008 inputs one is 0.5 GB
    in float32)."""
    n = lower.shape[0]
    for i in range(0, n, BLOCK):
        diag = lower[i : i + BLOCK, i : i + BLOCK]
        diag.copy_(diag.tril() + diag.tril(-1).T)
        for j in range(0, i, BLOCK):
            lower[j : j + BLOCK, i : i + BLOCK].copy_(lower[i : i + BLOCK, j : j + BLOCK].T)
    return lower


def add_lower(out: torch.Tensor, lower: torch.Tensor, alpha: float) -> None:
    """The lower triangle of `out` += alpha * that of `lower` (and some of what lies above it), a
    block row at a time (a float32 `lower` into a float64 `out` with no whole-matrix temporary)."""
    for i in range(0, lower.shape[0], ROWS):
        out[i : i + ROWS, : i + ROWS].add_(lower[i : i + ROWS, : i + ROWS], alpha=alpha)


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
        # float64 [in, in], once in Gram mode; only its lower triangle is kept up to date
        self.gram_sum: Optional[torch.Tensor] = None
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
        """One candidate's Gram of the input, with its task vectors. The sum reads only its lower
        triangle; where the candidate has a task vector here, `gram` is mirrored in place first (what
        lies above the diagonal may be anything, as `add_lower_product` leaves it)."""
        # No float64 copy of the Gram: the sum keeps its lower triangle only, added a block row at a
        # time (at in = 5632 18 ms, against 81 ms for the whole float32 [in, in] added into float64),
        # and a Gram no numerator needs is never mirrored. G~ A^T = alpha G A^T + (1 - alpha) diag(G) A^T
        # is formed in float64 with the Gram's rows converted a block at a time.
        diagonal = gram.diagonal().double()
        self._dense(gram.shape[0], gram.device)
        add_lower(self.gram_sum, gram, self.alpha * weight)
        self.gram_sum.diagonal().add_(diagonal, alpha=(1.0 - self.alpha) * weight)
        if any(tau is not None for tau in taus.values()):
            symmetrize_(gram)

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
            # a full product: a lower triangle's blocks over a candidate's few rows took twice as long
            self.gram_sum.addmm_(x64.T, x64, alpha=self.alpha * weight)
            self.gram_sum.diagonal().add_(diagonal, alpha=(1.0 - self.alpha) * weight)
        self._add_numerators(taus, weight, lambda v: x64.T @ (x64 @ v), diagonal)

    def _dense(self, features: int, device: torch.device) -> None:
        """Gram mode from now on: the kept rows folded into the float64 Gram sum."""
        if self.gram_sum is not None:
            return
        self.gram_sum = torch.zeros(features, features, dtype=torch.float64, device=device)
        if self.rows and all(weight >= 0 for _, weight in self.rows):
            # the rows in float64 half a Gram at a time (with the float32 rows and the sum: two Grams, what
            # the memory bound prices); a candidate's few rows at a time took ~5x as long
            fold = max(features // 2, 1)
            start, taken = 0, 0
            for end in range(1, len(self.rows) + 1):
                taken += self.rows[end - 1][0].shape[0]
                if taken >= fold or end == len(self.rows):
                    add_lower_product(self.gram_sum, self._stacked(rows=self.rows[start:end]))
                    start, taken = end, 0
        else:
            for x, weight in self.rows:
                x64 = x.double()
                self.gram_sum.addmm_(x64.T, x64, alpha=self.alpha * weight)
        if self.row_diag is not None:
            self.gram_sum.diagonal().add_(self.row_diag, alpha=1.0 - self.alpha)
        self.rows, self.row_count, self.row_diag = [], 0, None

    def _stacked(
        self, scale: Optional[torch.Tensor] = None, rows: Optional[List[Tuple[torch.Tensor, float]]] = None
    ) -> torch.Tensor:
        """U [k, in] in float64: the kept rows (or `rows` of them), each candidate's times
        sqrt(alpha c_i) (and `scale` per column)."""
        rows = self.rows if rows is None else rows
        first = rows[0][0]
        count = sum(x.shape[0] for x, _ in rows)
        u = torch.empty(count, first.shape[1], dtype=torch.float64, device=first.device)
        at = 0
        for x, weight in rows:
            factor = (self.alpha * weight) ** 0.5
            torch.mul(x.double(), factor if scale is None else scale * factor, out=u[at : at + x.shape[0]])
            at += x.shape[0]
        return u

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
            return out.addcmul_(x64, (diagonal * ((1.0 - self.alpha) * weight))[:, None])

        given = {name: tau for name, tau in taus.items() if tau is not None}
        low = {name: tau for name, tau in given.items() if isinstance(tau, LowRank)}
        products: Dict[str, torch.Tensor] = {}
        if low:
            # the LoRA factors' few columns in one product: a Gram's rows are converted to float64 once
            cols = [tau.a.T for tau in low.values()]
            products = dict(
                zip(low, tilde_times(torch.cat(cols, dim=1)).split([c.shape[1] for c in cols], dim=1))
            )
        for name, tau in given.items():
            # a dense task vector's product is [in, out] float64: one at a time, not all of an input's at once
            product = products.pop(name) if name in low else tilde_times(tau.T)

            num = self.numerators.setdefault(name, _Numerator())
            if isinstance(tau, LowRank):
                num.gram_a.append(product)
                num.plain_a.append(tau.a.double().T * weight)
                num.scaled_b.append(tau.b.double().T * tau.scale)
            else:
                num.dense = product if num.dense is None else num.dense.add_(product)
                td = tau.T.double() * weight
                num.dense_avg = td if num.dense_avg is None else num.dense_avg.add_(td)

    def _woodbury(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """S^-1 (rhs) from the kept rows, or None where D is (near) singular: the dense path decides.

        With E = D^-1/2 and V = U E [k, in]: S^-1 = E (I - V^T (I + V V^T)^-1 V) E."""
        if not self.rows or any(weight < 0 for _, weight in self.rows):
            return None
        d = self.row_diag * (1.0 - self.alpha)
        if float(d.min()) <= WOODBURY_MARGIN * float(self.row_diag.max()):
            return None
        e = d.rsqrt()
        v = self._stacked(e)
        # I + V V^T: its lower triangle only, a block of rows at a time (about half the products)
        k = torch.zeros(self.row_count, self.row_count, dtype=torch.float64, device=d.device)
        for i in range(0, self.row_count, BLOCK):
            torch.mm(v[i : i + BLOCK], v[: i + BLOCK].T, out=k[i : i + BLOCK, : i + BLOCK])
        k.diagonal().add_(1.0)
        chol, info = cholesky_lower(k)  # eigenvalues >= 1: fails only on NaN
        if info != 0:
            return None

        def solve_for(rhs: torch.Tensor) -> torch.Tensor:
            m = rhs * e[:, None]
            return m.sub_(v.T @ torch.cholesky_solve(v @ m, chol)).mul_(e[:, None])

        return solve_for

    def _width(self) -> int:
        """R: the numerator columns S^-1 is applied to, over every weight."""
        return sum(
            sum(a.shape[1] for a in num.gram_a) + (num.dense.shape[1] if num.dense is not None else 0)
            for num in self.numerators.values()
        )

    def _woodbury_pays(self) -> bool:
        """Whether Woodbury on the kept rows takes fewer flops than their Gram sum and its Cholesky."""
        k, d, r = self.row_count, self.row_diag.shape[0], self._width()
        woodbury = k * k * d + k**3 / 3 + (4 * k * d + 2 * k * k) * r
        return woodbury <= d * d * k + d**3 / 3 + 2 * d * d * r

    def solve(self, ridge: float = 1e-5) -> Tuple[Dict[str, TaskVector], float]:
        """({weight: Delta W}, lambda): lambda = 0 unless S is singular, then ridge * mean(diag S)
        (inf when S is zero: no input reached the layer, and the weighted average is returned).
        Once only: the Gram sum is factored in place."""
        if not self.numerators:
            return {}, 0.0  # no weight of this input to merge: S is not needed
        solve_for = self._woodbury() if self.gram_sum is None and self._woodbury_pays() else None
        lam = 0.0
        if solve_for is None:
            if self.gram_sum is None and not self.rows:
                return {}, 0.0
            if self.gram_sum is None:
                self._dense(self.row_diag.shape[0], self.row_diag.device)
            # factored in place (a second [in, in] float64 buffer set the merge's peak): S's lower
            # triangle is mirrored above it first, so a failed factorisation can be undone
            s = symmetrize_(self.gram_sum)
            diagonal = s.diagonal().clone()
            chol = cholesky_or_none(s, in_place=True)
            if chol is None:
                symmetrize_(s.T)  # the lower triangle back from its mirror
                s.diagonal().copy_(diagonal)
                lam = ridge * float(diagonal.mean())
                if lam <= 0:
                    return {n: self._average(num) for n, num in self.numerators.items()}, float("inf")
                s.diagonal().add_(lam)

            def solve_for(rhs: torch.Tensor) -> torch.Tensor:
                return torch.cholesky_solve(rhs, chol) if chol is not None else torch.linalg.solve(s, rhs)

        shift = lam / self.weight_sum if lam else 0.0
        # every weight's columns in one solve (one pass over the factor for all of them)
        rhs: List[torch.Tensor] = []
        for num in self.numerators.values():
            if num.gram_a:
                cols = torch.cat(num.gram_a, dim=1)
                rhs.append(cols + shift * torch.cat(num.plain_a, dim=1) if shift else cols)
            if num.dense is not None:
                rhs.append(num.dense + shift * num.dense_avg if shift else num.dense)
        solved = iter(solve_for(torch.cat(rhs, dim=1)).split([c.shape[1] for c in rhs], dim=1))
        out: Dict[str, TaskVector] = {}
        for name, num in self.numerators.items():
            low = None
            if num.gram_a:
                low = (next(solved), torch.cat(num.scaled_b, dim=0))  # ([in, R], [R, out])
            if num.dense is None:
                out[name] = LowRank(low[0].T.float(), low[1].T.float())
                continue
            delta_t = next(solved)
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
