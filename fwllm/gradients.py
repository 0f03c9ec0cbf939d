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
  a time sit on the device (`LayerOffload`). One evaluation is

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

from fwllm.errors import FwllmError
from fwllm.objectives import Objective, batch_loss_sum

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


# -- placement ------------------------------------------------------------------------------
def layer_stack(model: torch.nn.Module) -> Tuple[str, torch.nn.ModuleList]:
    """The model's repeated block: the largest ModuleList of two or more same-class layers."""
    best: Optional[Tuple[str, torch.nn.ModuleList, int]] = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[2]:
                best = (name, module, size)
    if best is None:
        raise FwllmError(f"gradient: layerwise needs a stack of repeated layers; {type(model).__name__} has none")
    return best[0], best[1]


class LayerOffload:
    """Keeps a model's layer stack on the host and everything else on `device`.

    `fetch(i)` puts layer i's weights on the device, `release(i)` points them back at the
    host copies (dropping any gradient). The host copies are the weights: writing into a
    released layer's parameters (as the FW update does) changes what the next fetch sends.
    `peak_resident` counts the most layers that were on the device at once.
    """

    def __init__(self, model: torch.nn.Module, device: str = "cpu", host: str = "cpu"):
        self.device, self.host = torch.device(device), torch.device(host)
        self.stack_name, self.layers = layer_stack(model)
        parent_name, _, attr = self.stack_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # everything but the stack goes to the device; the stack to the host
        setattr(parent, attr, torch.nn.ModuleList())
        try:
            model.to(self.device)
        finally:
            setattr(parent, attr, self.layers)
        self.layers.to(self.host)
        self.tensors: List[List[Tuple[torch.nn.Module, str, bool, torch.Tensor]]] = []
        for layer in self.layers:
            entries = []
            for module in layer.modules():
                for key, p in module._parameters.items():
                    if p is not None:
                        entries.append((module, key, True, p.data))
                for key, b in module._buffers.items():
                    if b is not None:
                        entries.append((module, key, False, b))
            self.tensors.append(entries)
        self.resident, self.peak_resident, self.fetches = 0, 0, 0
        layer_bytes = [sum(host.numel() * host.element_size() for *_, host in entries) for entries in self.tensors]
        stack = {id(t) for t in list(self.layers.parameters()) + list(self.layers.buffers())}
        outer = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in stack}
        outer_bytes = sum(t.numel() * t.element_size() for t in outer.values())
        # weights on the device at the peak: everything outside the stack plus the largest layer
        self.device_weight_bytes = outer_bytes + max(layer_bytes)
        self.model_weight_bytes = outer_bytes + sum(layer_bytes)

    def layer_parameters(self, i: int) -> List[Tuple[str, torch.nn.Parameter]]:
        return list(self.layers[i].named_parameters(prefix=f"{self.stack_name}.{i}"))

    def fetch(self, i: int) -> None:
        for module, key, is_param, host in self.tensors[i]:
            on_device = host.to(self.device, non_blocking=True)
            if is_param:
                module._parameters[key].data = on_device
            else:
                module._buffers[key] = on_device
        self.resident += 1
        self.fetches += 1
        self.peak_resident = max(self.peak_resident, self.resident)

    def release(self, i: int) -> None:
        for module, key, is_param, host in self.tensors[i]:
            if is_param:
                p = module._parameters[key]
                p.data, p.grad = host, None
            else:
                module._buffers[key] = host
        self.resident -= 1


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
