"""Where the FW iterate theta_t lives, per block.

* `ModelIterate`: in the parameters of a model held in RAM (`gradient: full`).
* `StoreIterate`: in an on-disk iterate store (full-checkpoint pools, `gradient: layerwise`);
  the streamed gradient fetches the trainable blocks from it. The method makes the store
  (`fwllm.io.iterate_store`) and hands it in.
* `LoraIterate`: nowhere as tensors. A LoRA pool's iterate is theta_0 + sum_i c_i s_i B_i A_i
  per block, and only the coefficients c (from the atoms) are kept; the layers run it as
  base weight plus low-rank terms (`fwllm.solvers.lora_terms`).

The protocol `FrankWolfe` calls (it never asks which kind it holds). Points are given per block
as atoms; `realize(name, atoms)` turns atoms into a dense block (FW reads the candidates for it),
and only a dense iterate calls it:

  start(names, atoms, read)   put the start in place. A dense iterate holds `read(name)` for each
                              of `names` (FW reads and sketches the block's candidates there and
                              returns its start); the LoRA iterate takes its coefficients from
                              `atoms` and reads nothing: its hooks score every candidate exactly.
  set(name, atoms, realize)   move one block to the point its atoms give.
  hold_base(name, base)       a block that never left theta_0 (or that no candidate changes) holds
                              `base(name)` exactly, not the rounded (1 - gamma) x + gamma x of the
                              loop; the LoRA iterate's coefficients are exact already.
  at(points, realize)         evaluate at another point for a while (soft FW's mixed vertex, the
                              line search's trial steps).
  merged(names)               the blocks at the end, one at a time.

Also: `read(name)` (dense iterates: the current block, for FW's step realisation), `view()`
(what the streamed gradient fetches trainable blocks from) and `implicit` (the merge is the
coefficients, not dense blocks: what the method writes into the plan).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Sequence, Tuple

import torch

from fwllm.core.memory import return_free_memory
from fwllm.core.plan import Atom
from fwllm.kernels.atoms import ta_coefficients
from fwllm.solvers.lora_terms import LoraTerms
from fwllm.solvers.plan_atoms import kernel_atoms

Realize = Callable[[str, Sequence[Atom]], torch.Tensor]


class DenseIterate:
    """The protocol for an iterate held as dense blocks: subclasses give `read` and `write`."""

    implicit = False

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def write(self, name: str, value: torch.Tensor) -> None:
        raise NotImplementedError

    def start(
        self, names: Iterable[str], atoms: Dict[str, Sequence[Atom]], read: Callable[[str], torch.Tensor]
    ) -> None:
        for name in names:
            # every start is written: an on-disk store holds nothing until its first write
            self.write(name, read(name))
            return_free_memory()  # the block's reads, freed between the long-lived sketches

    def set(self, name: str, atoms: Sequence[Atom], realize: Realize) -> None:
        self.write(name, realize(name, atoms))
        return_free_memory()

    def hold_base(self, name: str, base: Callable[[str], torch.Tensor]) -> None:
        self.write(name, base(name))

    def merged(self, names: Sequence[str]) -> Iterator[Tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self.read(name)


class ModelIterate(DenseIterate):
    def __init__(self, params: Dict[str, torch.nn.Parameter]):
        self.params = params

    def read(self, name: str) -> torch.Tensor:
        return self.params[name].detach().to("cpu", torch.float32)

    def write(self, name: str, value: torch.Tensor) -> None:
        p = self.params[name]
        p.data.copy_(value.to(p.device, p.dtype))

    @contextlib.contextmanager
    def at(self, points: Dict[str, Sequence[Atom]], realize: Realize):
        saved = {n: self.read(n).clone() for n in points}
        for name, atoms in points.items():
            self.write(name, realize(name, atoms))
        try:
            yield
        finally:
            for name, value in saved.items():
                self.write(name, value)


class _LazyPoint(Mapping):
    """block name -> its value at a point, computed on access (one block at a time)."""

    def __init__(self, points: Dict[str, Sequence[Atom]], realize: Realize, fallback: Mapping):
        self.points, self.realize, self.fallback = points, realize, fallback

    def __getitem__(self, name):
        if name in self.points:
            return self.realize(name, self.points[name])
        return self.fallback[name]

    def __contains__(self, name):
        return name in self.points or name in self.fallback

    def __iter__(self):
        return iter(set(self.points) | set(self.fallback))

    def __len__(self):
        return len(set(self.points) | set(self.fallback))


class StoreIterate(DenseIterate):
    def __init__(self, store):  # an `fwllm.io.iterate_store.IterateStore` the method made
        self.store = store
        self._view: Mapping = store.loader()

    def read(self, name: str) -> torch.Tensor:
        return self.store.read(name)

    def write(self, name: str, value: torch.Tensor) -> None:
        self.store.write(name, value)
        self._view = self.store.loader()

    def view(self) -> Mapping:
        """What the streamed gradient fetches trainable blocks from."""
        return self._view

    @contextlib.contextmanager
    def at(self, points: Dict[str, Sequence[Atom]], realize: Realize):
        saved, self._view = self._view, _LazyPoint(points, realize, self._view)
        try:
            yield
        finally:
            self._view = saved


class LoraIterate:
    implicit = True

    def __init__(
        self, lora: LoraTerms, weights: Sequence[float], scaling: float, base: Callable[[str], torch.Tensor]
    ):
        self.lora, self.candidate_weights, self.scaling, self.base = lora, list(weights), scaling, base

    def set_atoms(self, name: str, atoms: Sequence[Atom]) -> None:
        self.lora.set_coefficients(
            name, ta_coefficients(kernel_atoms(atoms), self.candidate_weights, self.scaling)
        )

    def start(self, names: Iterable[str], atoms: Dict[str, Sequence[Atom]], read=None) -> None:
        for name in atoms:  # `names` is not walked: no candidate is read, no progress to show
            self.set_atoms(name, atoms[name])

    def set(self, name: str, atoms: Sequence[Atom], realize: Realize = None) -> None:
        self.set_atoms(name, atoms)

    def hold_base(self, name: str, base: Callable[[str], torch.Tensor] = None) -> None:
        pass  # the coefficients are the atoms': a block that never moved has c = 0 exactly

    def coefficients(self) -> Dict[str, List[float]]:
        return {n: b.coefficients.tolist() for n, b in self.lora.blocks.items()}

    def view(self) -> Mapping:
        return {}  # no dense block: every layer runs on the base's weights plus the low-rank terms

    @contextlib.contextmanager
    def at(self, points: Dict[str, Sequence[Atom]], realize: Realize = None):
        saved = {n: self.lora.blocks[n].coefficients for n in points}
        for name, atoms in points.items():
            self.set_atoms(name, atoms)
        try:
            yield
        finally:
            for name, c in saved.items():
                self.lora.blocks[name].coefficients = c

    def merged(self, names: Sequence[str], factors: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
        """W_0 + sum_i c_i s_i B_i A_i per weight; with `factors`, the delta as a LowRank, and nothing for a
        weight the merge leaves at the base."""
        for name in names:
            if not factors:
                yield name, self.base(name) + self.lora.delta(name)
            elif (delta := self.lora.factors(name)) is not None:
                yield name, delta
