"""The objective's gradient through a whole model in RAM, in one backward.

`value = gradient(consume)` evaluates the objective (or the one passed, e.g. a stochastic
iteration's minibatch objective) at the current weights and hands every block's gradient
to ``consume(name, g)`` once; the caller reduces it (FW: to N scores) and drops it. The
same interface, one layer at a time over a model that is never whole in memory, is
`fwllm.solvers.streamed_gradient.StreamedGradient`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from fwllm.data.objective import Objective

Consume = Callable[[str, torch.Tensor], None]


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


class FullGradient:
    """The objective differentiated through the whole model in one backward."""

    def __init__(self, model: torch.nn.Module, objective: Objective, blocks: Sequence[str]):
        self.model, self.objective = model, objective
        params = dict(model.named_parameters())
        self.params = [(n, params[n]) for n in blocks]

    def __call__(self, consume: Consume, objective: Optional[Objective] = None, accept=None) -> float:
        """`accept` (a point the caller may discard) changes nothing here: the backward runs
        batch by batch with the forward, so the value is known only when it is done."""
        self.model.zero_grad(set_to_none=True)
        value = (objective or self.objective).backward(self.model)
        for name, p in self.params:
            consume(name, _grad_or_zeros(p))
        self.model.zero_grad(set_to_none=True)
        return value

    def value(self, objective: Optional[Objective] = None) -> float:
        return (objective or self.objective).value(self.model)
