"""An FW iterate as atoms: theta = theta_0 + sum_a beta_a * lambda * combine(members, mix).

Candidate i's vertex is theta_0 + lambda * v_i with v_i = localize(w_i tau_i): its task
vector scaled by its recipe `weight`, then trimmed (ties) or dropped-and-rescaled (dare,
one mask per candidate and tensor, seeded by (seed, tensor, candidate)). The solve and
mergekit's executor both turn atoms into tensors with these functions, so executing a
plan reproduces the solve exactly.
"""

from __future__ import annotations

import zlib
from typing import Callable, List, Optional, Sequence

import torch

from fwllm.core.params import FWParams
from fwllm.core.plan import Atom
from fwllm.kernels.local_merges import combine_local, localize

TaskVector = Callable[[int], torch.Tensor]  # candidate index -> w_i * tau_i of one tensor


def dare_generator(seed: int, name: str, label: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{label}".encode()))


def local_vertex(
    method: str, name: str, i: int, tau: TaskVector, labels: Sequence[str], p: FWParams
) -> torch.Tensor:
    """v_i for one tensor under `method` (what the LMO scores and a hard step moves toward)."""
    gen = dare_generator(p.seed, name, labels[i]) if method.startswith("dare") else None
    return localize(method, tau(i), p.density, p.drop_rate, gen)


def atom_scale(atom: Atom, p: FWParams) -> float:
    return p.scaling if atom.scale is None else atom.scale


def atom_delta(atom: Atom, name: str, tau: TaskVector, labels: Sequence[str], p: FWParams) -> torch.Tensor:
    """lambda * combine(atom's members, mix) for one tensor (the atom's weight not applied)."""
    local = (
        local_vertex(atom.method, name, i, tau, labels, p) for i in atom.members
    )  # lazily: one at a time
    return atom_scale(atom, p) * combine_local(atom.method, local, atom.mix)


def vertex_key(atom: Atom, p: FWParams) -> tuple:
    """Atoms with one key are one vertex (DARE masks belong to the candidate, not the step)."""
    return atom.method, tuple(atom.members), tuple(round(m, 12) for m in atom.mix), atom_scale(atom, p)


def compact(atoms: Sequence[Atom], p: FWParams) -> List[Atom]:
    """One atom per vertex, its weight the sum of theirs (zero weights dropped); order of first use."""
    merged: dict = {}
    for a in atoms:
        key = vertex_key(a, p)
        if key in merged:
            merged[key].weight += a.weight
        else:
            merged[key] = a.model_copy()
    return [a for a in merged.values() if abs(a.weight) > 1e-15]


def block_delta(
    atoms: Sequence[Atom], name: str, tau: TaskVector, labels: Sequence[str], like: torch.Tensor, p: FWParams
) -> torch.Tensor:
    """sum_a beta_a * atom_a's delta for one tensor (what the executor adds to the base)."""
    out = torch.zeros_like(like, dtype=torch.float32)
    for atom in atoms:
        if atom.weight != 0.0:
            out += atom.weight * atom_delta(atom, name, tau, labels, p)
    return out


def ta_coefficients(atoms: Sequence[Atom], weights: Sequence[float], scaling: float) -> Optional[List[float]]:
    """Per-candidate coefficients on the raw tau_i when every atom is plain task arithmetic (else None)."""
    if any(a.method != "task_arithmetic" for a in atoms):
        return None
    coef = [0.0] * len(weights)
    for atom in atoms:
        scale = scaling if atom.scale is None else atom.scale
        for i, m in zip(atom.members, atom.mix):
            coef[i] += atom.weight * scale * m * weights[i]
    return coef
