"""An FW iterate as atoms: theta = theta_0 + sum_a beta_a * lambda * combine(members, mix).

Candidate i's vertex is theta_0 + lambda * v_i with v_i = localize(w_i tau_i): its task
vector scaled by its recipe `weight`, then trimmed (ties) or dropped-and-rescaled (dare,
one mask per candidate and tensor, seeded by (seed, tensor, candidate)). The solve and
mergekit's executor both turn atoms into tensors with these functions, so executing a
plan reproduces the solve exactly.

Plain data in, tensors out: an atom is an `AtomValues` (the plan's `Atom` record without its
tag; the solver converts) and the recipe's settings an `AtomSettings` of plain numbers.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from fwllm.kernels.local_merges import combine_local, localize

TaskVector = Callable[[int], torch.Tensor]  # candidate index -> w_i * tau_i of one tensor


@dataclass(frozen=True)
class AtomValues:
    """One atom: theta += weight * scale * combine(method, members' local deltas, mix)."""

    weight: float
    method: str  # the local merge: task_arithmetic, ties, dare_ties, dare_linear
    members: Tuple[int, ...]
    mix: Tuple[float, ...]
    scale: Optional[float] = None  # the hull's lambda when the atom was made; None: `scaling`


@dataclass(frozen=True)
class AtomSettings:
    """What the recipe says about every atom: lambda, TIES' density, DARE's drop rate and seed."""

    scaling: float
    density: float = 1.0
    drop_rate: float = 0.0
    seed: int = 0


def dare_generator(seed: int, name: str, label: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{label}".encode()))


def local_vertex(
    method: str, name: str, i: int, tau: TaskVector, labels: Sequence[str], s: AtomSettings
) -> torch.Tensor:
    """v_i for one tensor under `method` (what the LMO scores and a hard step moves toward)."""
    gen = dare_generator(s.seed, name, labels[i]) if method.startswith("dare") else None
    return localize(method, tau(i), s.density, s.drop_rate, gen)


def atom_scale(atom: AtomValues, s: AtomSettings) -> float:
    return s.scaling if atom.scale is None else atom.scale


def atom_delta(
    atom: AtomValues, name: str, tau: TaskVector, labels: Sequence[str], s: AtomSettings
) -> torch.Tensor:
    """lambda * combine(atom's members, mix) for one tensor (the atom's weight not applied)."""
    local = (
        local_vertex(atom.method, name, i, tau, labels, s) for i in atom.members
    )  # lazily: one at a time
    return atom_scale(atom, s) * combine_local(atom.method, local, atom.mix)


def vertex_key(atom: AtomValues, s: AtomSettings) -> tuple:
    """Atoms with one key are one vertex (DARE masks belong to the candidate, not the step)."""
    return atom.method, tuple(atom.members), tuple(round(m, 12) for m in atom.mix), atom_scale(atom, s)


def block_delta(
    atoms: Sequence[AtomValues],
    name: str,
    tau: TaskVector,
    labels: Sequence[str],
    like: torch.Tensor,
    s: AtomSettings,
) -> torch.Tensor:
    """sum_a beta_a * atom_a's delta for one tensor (what the executor adds to the base)."""
    out = torch.zeros_like(like, dtype=torch.float32)
    for atom in atoms:
        if atom.weight != 0.0:
            out += atom.weight * atom_delta(atom, name, tau, labels, s)
    return out


def ta_coefficients(
    atoms: Sequence[AtomValues], weights: Sequence[float], scaling: float
) -> Optional[List[float]]:
    """Per-candidate coefficients on the raw tau_i when every atom is plain task arithmetic (else None)."""
    if any(a.method != "task_arithmetic" for a in atoms):
        return None
    coef = [0.0] * len(weights)
    for atom in atoms:
        scale = scaling if atom.scale is None else atom.scale
        for i, m in zip(atom.members, atom.mix):
            coef[i] += atom.weight * scale * m * weights[i]
    return coef
