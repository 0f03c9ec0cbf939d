"""A LoRA pool's iterate and oracle without ever forming a weight delta or a weight gradient.

For an adapted linear layer with base weight W_0 and candidates' factors (A_i [r_i, in],
B_i [out, r_i], scale s_i = alpha_i / r_i), the iterate's layer computes

    y = x W_0^T + sum_i c_i s_i (x A_i^T) B_i^T

as peft runs several weighted adapters at once, and the oracle's score of candidate i is

    <dL/dW, w_i s_i B_i A_i> = w_i s_i sum_t (B_i^T delta_t) . (A_i x_t),   delta_t = dL/dy_t,

read off the layer's input and output gradient by hooks: G = sum_t delta_t x_t^T is never
formed, and the base weight needs no gradient (the backward skips that matmul).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from fwllm.io.adapters import AdapterReader
from fwllm.kernels.low_rank import LowRank


@dataclass
class LoraBlock:
    """Every candidate's factors for one linear weight, stacked along the rank."""

    a: torch.Tensor  # [R, in], R = sum of the ranks of the candidates that adapt this weight
    b: torch.Tensor  # [out, R]
    owner: torch.Tensor  # [R]: the candidate each rank column belongs to
    scale: torch.Tensor  # [R]: s_i of that candidate
    coefficients: torch.Tensor = field(default=None)  # [N]: c_i, the iterate's weight on tau_i

    @property
    def nbytes(self) -> int:
        return (self.a.numel() + self.b.numel()) * self.a.element_size()


def low_rank_candidate(adapter: Optional[AdapterReader], name: str) -> bool:
    """Whether candidate's tau for `name` is exactly s B A (so the score needs no sketch)."""
    if adapter is None:
        return False
    f = adapter.factors.get(name)
    return f is not None and f.magnitude is None and not f.transposed and name not in adapter.full


def pool_is_low_rank(adapters: Sequence[Optional[AdapterReader]]) -> bool:
    """Every candidate is a plain LoRA adapter (no DoRA, no full tensors, no transposed factors)."""
    return all(
        a is not None
        and not a.full
        and all(f.magnitude is None and not f.transposed for f in a.factors.values())
        for a in adapters
    )


def _common_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype that holds every one of `tensors` exactly (bf16 and fp16 together: fp32)."""
    out = tensors[0].dtype
    for t in tensors[1:]:
        out = torch.promote_types(out, t.dtype)
    return out


def _share(blk: LoraBlock, factors: Sequence) -> None:
    """Point each reader's factors at their rows of the stack (same dtype: the same values), so a
    pool's factors are held once, not twice (at 7B x 16 adapters: 1.3 GB less)."""
    start = 0
    for f in factors:
        r = f.a.shape[0]
        if f.a.dtype == blk.a.dtype and f.b.dtype == blk.b.dtype:
            f.a, f.b = blk.a[start : start + r], blk.b[:, start : start + r]
        start += r


class LoraTerms:
    """The low-rank terms of a LoRA pool, attached to the linear modules of a model."""

    def __init__(self, adapters: Sequence[AdapterReader], dtype: Optional[torch.dtype] = None):
        # stored in the adapters' own dtype (`dtype=None`) and cast where used: bf16 -> fp32 is exact, and an
        # fp32 stack of a bf16 pool would double what a 7B pool's factors hold in RAM (1.3 -> 2.6 GB)
        self.n = len(adapters)
        names = sorted({name for a in adapters for name in a.factors})
        self.blocks: Dict[str, LoraBlock] = {}
        for name in names:
            parts = [(i, a.factors[name]) for i, a in enumerate(adapters) if name in a.factors]
            common = dtype or _common_dtype([t for _, f in parts for t in (f.a, f.b)])
            blk = self.blocks[name] = LoraBlock(
                a=torch.cat([f.a.to(common) for _, f in parts]),
                b=torch.cat([f.b.to(common) for _, f in parts], dim=1),
                owner=torch.cat([torch.full((f.a.shape[0],), i, dtype=torch.long) for i, f in parts]),
                scale=torch.cat([torch.full((f.a.shape[0],), f.scale) for _, f in parts]),
                coefficients=torch.zeros(self.n),
            )
            _share(blk, [f for _, f in parts])
        self.scores: Dict[str, torch.Tensor] = {}
        self.weights = torch.ones(self.n)
        self.scoring = False
        self._handles: List = []

    def names(self) -> List[str]:
        return list(self.blocks)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values())

    def set_coefficients(self, name: str, coefficients: Sequence[float]) -> None:
        self.blocks[name].coefficients = torch.as_tensor(coefficients, dtype=torch.float32)

    def delta(self, name: str) -> torch.Tensor:
        """sum_i c_i s_i B_i A_i for one weight (only to write the merged model)."""
        blk = self.blocks[name]
        per_rank = blk.coefficients[blk.owner] * blk.scale
        return (blk.b.float() * per_rank) @ blk.a.float()

    def factors(self, name: str) -> Optional[LowRank]:
        """sum_i c_i s_i B_i A_i as its factors (the ranks of candidates with c_i != 0), or None when
        every c_i is 0 (the merge leaves the weight at the base)."""
        blk = self.blocks[name]
        per_rank = blk.coefficients[blk.owner] * blk.scale
        keep = per_rank != 0
        if not bool(keep.any()):
            return None
        return LowRank(blk.a[keep].float(), blk.b[:, keep].float() * per_rank[keep])

    def attach(self, model: torch.nn.Module) -> None:
        for name in self.blocks:
            module = model.get_submodule(name.rsplit(".", 1)[0])
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def start_scoring(self) -> None:
        self.scores = {name: torch.zeros(self.n) for name in self.blocks}
        self.scoring = True

    def stop_scoring(self) -> Dict[str, torch.Tensor]:
        self.scoring = False
        return self.scores

    def _hook(self, name: str):
        blk = self.blocks[name]

        def hook(module, args, out):
            x = args[0]
            a, b = blk.a.to(x.device, x.dtype), blk.b.to(x.device, x.dtype)
            u = x @ a.T  # [..., R]
            per_rank = (blk.coefficients[blk.owner] * blk.scale).to(x.device, x.dtype)
            out = out + (u * per_rank) @ b.T
            if self.scoring and torch.is_grad_enabled():
                if not out.requires_grad:  # nothing below needs a gradient, but the score needs delta here
                    out.requires_grad_(True)
                u_saved = u.detach()

                def score(grad: torch.Tensor) -> None:
                    v = grad @ b  # [..., R]: B^T delta per token
                    per_col = (u_saved * v).reshape(-1, v.shape[-1]).sum(0).to("cpu", torch.float32)
                    contrib = torch.zeros(self.n).index_add_(0, blk.owner, per_col * blk.scale)
                    self.scores[name] += contrib * self.weights

                out.register_hook(score)
            return out

        return hook
