"""Sketched inner products <g, tau_i> for the LMO, and their exact re-check.

The LMO needs every tau_i at every iteration; reading all N candidates T times is what
makes naive FW slow, so each tau_i is read once and kept as a sketch of m = numel/ratio
signed bucket sums. <S g, S tau> is an unbiased estimate of <g, tau>; small tensors
(<= min_buckets entries) are kept exactly. `rescored` replaces the scores of statistically
tied contenders by exact inner products.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, List, Tuple

import torch


class CountSketch:
    """Deterministic per-tensor sign sketch with fixed buckets: S(x)_j = sum_{i = j mod m} s_i x_i.

    Signs s_i = r[i mod L] come from a random +-1 vector r of prime length L drawn from
    (seed, name). Two coordinates in one bucket differ by a multiple of m, and get
    independent signs unless they also differ by a multiple of L, i.e. by m*L (more than
    any tensor here has), so <S x, S y> is an unbiased estimate of <x, y>. Fixed buckets
    make it a reshape-and-sum: no per-coordinate random draws, no scatter.
    """

    SIGN_PERIOD = 65521  # prime

    def __init__(self, ratio: float = 32.0, min_buckets: int = 4096, seed: int = 0):
        if ratio < 1:
            raise ValueError("sketch ratio must be >= 1")
        self.ratio, self.min_buckets, self.seed = ratio, min_buckets, seed

    def buckets(self, numel: int) -> int:
        m = min(numel, max(self.min_buckets, int(numel / self.ratio)))
        if m < numel and m % self.SIGN_PERIOD == 0:
            m += 1  # keep m coprime to the sign period
        return m

    def _signs(self, name: str, numel: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        period = torch.randint(2, (self.SIGN_PERIOD,), generator=g).float().mul_(2).sub_(1)
        reps = -(-numel // self.SIGN_PERIOD)
        return period.repeat(reps)[:numel]

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1).float()
        numel = flat.numel()
        m = self.buckets(numel)
        if m == numel:
            return flat.clone()
        signed = flat * self._signs(name, numel)
        rows = -(-numel // m)
        padded = torch.nn.functional.pad(signed, (0, rows * m - numel))
        return padded.view(rows, m).sum(0)


def alignment(grad_sketch: torch.Tensor, tau_sketches: torch.Tensor) -> torch.Tensor:
    """<g, tau_i> for every candidate i (rows of tau_sketches)."""
    return tau_sketches @ grad_sketch


def sketch_error(g_norm: float, tau_norms: torch.Tensor, buckets: int) -> torch.Tensor:
    """Standard deviation of each sketched <g, tau_i>: ~ ||g|| ||tau_i|| / sqrt(m) for m random-sign buckets."""
    return g_norm * tau_norms / math.sqrt(buckets)


def contenders(scores: torch.Tensor, sigma: torch.Tensor, z: float) -> List[int]:
    """Candidates that may be the exact LMO's vertex given scores +- z sigma.

    The winner's exact value is at most U = min(0, min_i upper_i) (0 is the base vertex), so
    only candidates whose lower bound is below U can win. An empty list means the base wins
    for sure; one candidate whose upper bound is below 0 wins for sure (nothing to check).
    """
    lower, upper = scores - z * sigma, scores + z * sigma
    bound = min(0.0, float(upper.min())) if scores.numel() else 0.0
    found = [i for i in range(scores.numel()) if float(lower[i]) < bound]
    if len(found) == 1 and float(upper[found[0]]) < 0:
        return []
    return found


def rescored(
    scores: torch.Tensor, sigma: torch.Tensor, z: float, exact: Callable[[int], float]
) -> Tuple[torch.Tensor, List[int]]:
    """Scores with the statistically tied contenders replaced by exact inner products."""
    check = contenders(scores, sigma, z)
    if not check:
        return scores, []
    out = scores.clone()
    for i in check:
        out[i] = exact(i)
    return out, check
