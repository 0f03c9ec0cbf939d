"""The plan's `Atom` records and `FWParams`, as the atom kernels take them (`fwllm.kernels.atoms`).

The kernels know nothing of the plan's schema or the recipe's parameters: they take plain
`AtomValues` and `AtomSettings`. The conversions live here, one place for the solver and the
method's executor, so both turn atoms into tensors the same way.
"""

from __future__ import annotations

from typing import List, Sequence

from fwllm.core.params import FWParams
from fwllm.core.plan import Atom
from fwllm.kernels.atoms import AtomSettings, AtomValues, vertex_key


def atom_settings(p: FWParams) -> AtomSettings:
    return AtomSettings(scaling=p.scaling, density=p.density, drop_rate=p.drop_rate, seed=p.seed)


def kernel_atom(atom: Atom) -> AtomValues:
    return AtomValues(atom.weight, atom.method, tuple(atom.members), tuple(atom.mix), atom.scale)


def kernel_atoms(atoms: Sequence[Atom]) -> List[AtomValues]:
    return [kernel_atom(a) for a in atoms]


def compact(atoms: Sequence[Atom], s: AtomSettings) -> List[Atom]:
    """One atom per vertex, its weight the sum of theirs (zero weights dropped); order of first use."""
    merged: dict = {}
    for a in atoms:
        key = vertex_key(kernel_atom(a), s)
        if key in merged:
            merged[key].weight += a.weight
        else:
            merged[key] = a.model_copy()
    return [a for a in merged.values() if abs(a.weight) > 1e-15]
