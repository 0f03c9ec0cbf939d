"""How the calibration objective's gradient reaches the oracle: whole model, or layer by layer.

Both strategies are called the same way, ``value = gradient(consume)``: they evaluate the
objective (or the one passed, e.g. a stochastic iteration's minibatch objective) at the
current weights and hand every block's gradient to ``consume(name, g)`` once; the caller
reduces it (FW sketches it into N alignment scores) and drops it.

* `FullGradient`: one backward through the model on its device; the whole gradient exists
  for a moment, as in any training step.
* `LayerwiseGradient` (`gradient: layerwise`): for models larger than the solve device.
  The repeated layer stack (LLaMA ``model.layers``, RoBERTa ``encoder.layer``) stays in
  host memory; only the modules around it (embeddings, final norm, head) and one layer at
  a time sit on the device (`fwllm.arch.layer_stack.LayerOffload`). One evaluation is

    forward   micro-batch by micro-batch; each layer is fetched, run without autograd and
              released; its input is kept on the host (a checkpoint at every layer)
    backward  the loss is differentiated down to the top layer's output; then, from the top
              layer down, the layer is fetched once, every micro-batch is recomputed from
              its checkpoint and backpropagated, the layer's gradients go to `consume`, and
              the layer is released

  so the full gradient never exists, on the device or the host. The price is one extra
  forward per layer, as with gradient checkpointing; the forward fetches each layer once
  per micro-batch, the backward once per evaluation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from fwllm.arch.layer_stack import LayerOffload
from fwllm.core.errors import FwllmError
from fwllm.data.objective import Objective, batch_loss_sum

Consume = Callable[[str, torch.Tensor], None]


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


class FullGradient:
    """The objective differentiated through the whole model in one backward."""

    def __init__(self, model: torch.nn.Module, objective: Objective, blocks: Sequence[str]):
        self.model, self.objective = model, objective
        params = dict(model.named_parameters())
        self.params = [(n, params[n]) for n in blocks]

    def __call__(self, consume: Consume, objective: Optional[Objective] = None) -> float:
        self.model.zero_grad(set_to_none=True)
        value = (objective or self.objective).backward(self.model)
        for name, p in self.params:
            consume(name, _grad_or_zeros(p))
        self.model.zero_grad(set_to_none=True)
        return value

    def value(self, objective: Optional[Objective] = None) -> float:
        return (objective or self.objective).value(self.model)


# -- the layer-by-layer gradient ------------------------------------------------------------
@dataclass
class _MicroBatch:
    """What the backward needs of one micro-batch's forward."""

    inputs: List[Optional[torch.Tensor]] = field(default_factory=list)  # layer inputs, on the host
    calls: List[Tuple[tuple, Dict[str, Any]]] = field(default_factory=list)  # the other layer arguments
    first: Optional[torch.Tensor] = None  # the stack's input, still attached to the embeddings' graph
    last: Optional[torch.Tensor] = None  # the latest layer output (a leaf)
    grad: Optional[torch.Tensor] = None  # d objective / d (output of the layer being processed)


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)


class LayerwiseGradient:
    """The objective's gradient computed one layer at a time over a `LayerOffload`d model."""

    def __init__(self, model: torch.nn.Module, offload: LayerOffload, objective: Objective, blocks: Sequence[str]):
        self.model, self.offload, self.objective = model, offload, objective
        self.blocks = set(blocks)
        in_stack = {id(p) for i in range(len(offload.layers)) for _, p in offload.layer_parameters(i)}
        self.outer = [(n, p) for n, p in model.named_parameters() if id(p) not in in_stack and n in self.blocks]
        self._forwards = [layer.forward for layer in offload.layers]
        model.eval()  # the recompute must see the same function as the forward: no dropout
        if getattr(model.config, "use_cache", False):
            model.config.use_cache = False  # a KV cache would be written twice (forward and recompute)

    # forward ----------------------------------------------------------------------------
    def _streamed(self, i: int, current: List[Optional[_MicroBatch]]):
        forward = self._forwards[i]

        def run(hidden: torch.Tensor, *args, **kwargs):
            rec = current[0]
            if any(t.requires_grad for t in _tensors_in((args, kwargs))):
                raise FwllmError(
                    f"gradient: layerwise cannot differentiate {type(self.model).__name__}: layer {i} takes a "
                    "trainable input besides its hidden states; use gradient: full"
                )
            if rec is not None:
                if i > 0 and hidden is not rec.last:
                    raise FwllmError(
                        f"gradient: layerwise needs layer {i} to take layer {i - 1}'s output directly; "
                        f"{type(self.model).__name__} transforms it in between; use gradient: full"
                    )
                if i == 0:
                    rec.first = hidden
                rec.inputs.append(hidden.detach().to(self.offload.host))
                rec.calls.append((args, kwargs))
            self.offload.fetch(i)
            try:
                with torch.no_grad():
                    out = forward(hidden.detach(), *args, **kwargs)
            finally:
                self.offload.release(i)
            if not isinstance(out, torch.Tensor):
                raise FwllmError(f"gradient: layerwise expects layers that return one tensor, got {type(out).__name__}")
            if rec is not None:
                out = out.detach().requires_grad_(True)
                rec.last = out
            return out

        return run

    @contextlib.contextmanager
    def _streaming(self, current: List[Optional[_MicroBatch]]):
        for i, layer in enumerate(self.offload.layers):
            layer.forward = self._streamed(i, current)
        try:
            yield
        finally:
            for layer in self.offload.layers:
                del layer.forward  # back to the class's forward

    def value(self, objective: Optional[Objective] = None) -> float:
        with self._streaming([None]):
            return (objective or self.objective).value(self.model, self.offload.device)

    # backward ---------------------------------------------------------------------------
    def __call__(self, consume: Consume, objective: Optional[Objective] = None) -> float:
        objective = objective or self.objective
        self.model.zero_grad(set_to_none=True)
        current: List[Optional[_MicroBatch]] = [None]
        records, total = [], 0.0
        with self._streaming(current):
            for task, scale, batch in objective.terms(self.model, self.offload.device):
                rec = current[0] = _MicroBatch()
                loss = batch_loss_sum(self.model, task.kind, batch) * scale
                objective.check_finite(task, loss)
                loss.backward()  # the head's and final norm's gradients, and d loss / d top output
                top = rec.last
                rec.grad = (top.grad if top.grad is not None else torch.zeros_like(top)).to(self.offload.host)
                rec.last = None
                records.append(rec)
                total += loss.item()
        for i in reversed(range(len(self.offload.layers))):
            self._backward_layer(i, records, consume)
        for rec in records:
            if rec.first is not None and rec.first.requires_grad:
                torch.autograd.backward(rec.first, rec.grad.to(self.offload.device))
        for name, p in self.outer:
            consume(name, _grad_or_zeros(p))
        self.model.zero_grad(set_to_none=True)
        return total

    def _backward_layer(self, i: int, records: Sequence[_MicroBatch], consume: Consume) -> None:
        device = self.offload.device
        self.offload.fetch(i)
        try:
            for rec in records:
                x = rec.inputs[i].to(device).requires_grad_(True)
                args, kwargs = rec.calls[i]
                with torch.enable_grad():
                    out = self._forwards[i](x, *args, **kwargs)
                torch.autograd.backward(out, rec.grad.to(device))
                rec.grad, rec.inputs[i] = x.grad.to(self.offload.host), None
            for name, p in self.offload.layer_parameters(i):
                if name in self.blocks:
                    consume(name, _grad_or_zeros(p))
        finally:
            self.offload.release(i)
