"""The calibration objective and its gradient, one layer at a time over a `MetaModel`.

Only one layer of the repeated stack is materialised at a time; the modules around it
(embeddings, final norm, head) are materialised for their own forward unless they are
trainable blocks, which stay on the device for the evaluation. One evaluation:

  A. capture  each micro-batch runs the model up to the stack, through pass-through layers
              that record every layer's other arguments (masks, rotary embeddings);
  B. forward  layer-major: each layer is fetched once, runs every micro-batch without
              autograd, and its input is kept on the host (a checkpoint per layer);
  C. top      each micro-batch replays the model with the stack's output as a leaf, so the
              head, norm and loss run as the model defines them; d loss / d top output;
  D. backward from the top layer down: fetch once, recompute every micro-batch from its
              checkpoint, backpropagate, hand the layer's weight gradients to `consume`
              (LoRA pools: the hooks of `LoraTerms` score the candidates, no weight gradient);
  E. below    trainable embeddings get their gradient from the stack input's.

Micro-batches are processed in groups whose checkpoints fit `checkpoint_bytes`; gradients of
the groups add up (consume is then called once per group and block).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from fwllm.arch.heads import using_head
from fwllm.arch.layer_stack import layer_stack
from fwllm.arch.streaming import MetaModel, fetched_around_forward, forwards_replaced
from fwllm.core.errors import FwllmError
from fwllm.core.memory import return_free_memory
from fwllm.data.objective import Objective, batch_loss_sum
from fwllm.solvers.lora_terms import LoraTerms

Consume = Callable[[str, torch.Tensor], None]
GIB = 1 << 30


class _Captured(Exception):
    """Raised by the last pass-through layer: the rest of the forward is not needed."""


@dataclass
class _Term:
    task: Any
    scale: float
    batch: Dict[str, torch.Tensor]
    calls: List[Tuple[tuple, dict]] = field(default_factory=list)  # each layer's other arguments
    hidden: Optional[torch.Tensor] = None  # the current layer input, on the host
    inputs: List[Optional[torch.Tensor]] = field(default_factory=list)  # checkpoints, on the host
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


class StreamedGradient:
    """`value = gradient(consume, objective)`; `value(objective)` for the objective alone."""

    def __init__(
        self,
        meta: MetaModel,
        objective: Objective,
        blocks: Sequence[str],
        weights: Callable[[], Mapping[str, torch.Tensor]],
        lora: Optional[LoraTerms] = None,
        host: str = "cpu",
        checkpoint_bytes: int = GIB,
    ):
        self.meta, self.model, self.objective = meta, meta.model, objective
        self.weights = weights  # the trainable blocks' current values (the iterate, or a point)
        self.lora, self.host, self.checkpoint_bytes = lora, torch.device(host), checkpoint_bytes
        # where kept layer inputs go (`fwllm.io.spill.FileSpill`: file-backed pages); None: the host's RAM
        self.spill: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.stack_name, self.layers = layer_stack(self.model)
        self.layer_params = [
            meta.module_parameters(f"{self.stack_name}.{i}") for i in range(len(self.layers))
        ]
        in_stack = {n for names in self.layer_params for n in names}
        self.blocks: Set[str] = set(blocks)
        self.outer_trainable = [n for n in meta.parameter_names() if n not in in_stack and n in self.blocks]
        self._forwards = [layer.forward for layer in self.layers]
        self._frozen_outer = self._outer_modules(in_stack)
        self.groups_last = 1

    # -- materialising -------------------------------------------------------------------
    def _outer_modules(self, in_stack: Set[str]) -> List[Tuple[torch.nn.Module, List[str]]]:
        """Modules outside the stack that own frozen parameters: streamed around their forward."""
        out = []
        for prefix, module in self.model.named_modules():
            names = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
            frozen = [
                n
                for n in names
                if n not in in_stack and not any(t in self.blocks for t in self.meta.group(n))
            ]
            if frozen:
                out.append((module, frozen))
        return out

    def _fetch_layer(self, i: int) -> None:
        self.meta.fetch(self.layer_params[i], self.weights())

    @contextlib.contextmanager
    def _streamed_outer(self):
        self.meta.fetch(self.outer_trainable, self.weights())
        try:
            with fetched_around_forward(self.meta, self._frozen_outer):
                yield
        finally:
            self.meta.release(self.outer_trainable)

    def _layers_as(self, make: Callable[[int], Callable]):
        return forwards_replaced(self.layers, make)

    # -- phases --------------------------------------------------------------------------
    def _capture(self, term: _Term, keep_graph: bool = False) -> Optional[torch.Tensor]:
        """Phase A for one micro-batch: record every layer's arguments; return the stack input."""
        last = len(self.layers) - 1
        seen: Dict[str, Any] = {}

        def passthrough(i):
            def run(hidden, *args, **kwargs):
                if i == 0:
                    seen["input"] = hidden
                elif hidden is not seen["out"]:
                    raise FwllmError(
                        f"gradient: layerwise needs layer {i} to take layer {i - 1}'s output directly; "
                        f"{type(self.model).__name__} transforms it in between; use gradient: full"
                    )
                if any(t.requires_grad for t in _tensors_in((args, kwargs))):
                    raise FwllmError(
                        f"gradient: layerwise cannot differentiate {type(self.model).__name__}: layer {i} takes "
                        "a trainable input besides its hidden states; use gradient: full"
                    )
                if not keep_graph:
                    term.calls.append((args, kwargs))
                seen["out"] = hidden
                if i == last:
                    raise _Captured
                return hidden

            return run

        with self._layers_as(passthrough), torch.set_grad_enabled(keep_graph):
            try:
                batch_loss_sum(self.model, term.task.kind, term.batch)
            except _Captured:
                pass
        if "input" not in seen:
            raise FwllmError(f"{type(self.model).__name__}'s forward never reached its layer stack")
        hidden = seen["input"]
        if not keep_graph:
            term.hidden = hidden.detach().to(self.host)
        return hidden

    def _forward_stack(self, terms: Sequence[_Term], keep: bool) -> None:
        """Phase B: every micro-batch through the stack, one layer at a time."""
        for i in range(len(self._forwards)):
            self._forward_layer(i, terms, keep)

    def _forward_layer(self, i: int, terms: Sequence[_Term], keep: bool) -> None:
        """Layer i of phase B (fetched, run on every micro-batch, released)."""
        device, forward = self.meta.device, self._forwards[i]
        self._fetch_layer(i)
        try:
            with torch.no_grad():
                for term in terms:
                    if keep:
                        term.inputs.append(term.hidden if self.spill is None else self.spill(term.hidden))
                    args, kwargs = term.calls[i]
                    out = forward(term.hidden.to(device), *args, **kwargs)
                    if not isinstance(out, torch.Tensor):
                        raise FwllmError(
                            "gradient: layerwise expects layers that return one tensor, got "
                            f"{type(out).__name__}; use gradient: full"
                        )
                    term.hidden = out.to(self.host)
        finally:
            self.meta.release(self.layer_params[i])

    def _top(self, term: _Term, backward: bool) -> float:
        """Phase C for one micro-batch: head, norm and loss on the stack's output."""
        top = term.hidden.to(self.meta.device).requires_grad_(backward)
        last = len(self.layers) - 1
        with (
            self._layers_as(lambda i: lambda hidden, *a, **k: top if i == last else hidden),
            using_head(self.model, term.task.head),
            torch.set_grad_enabled(backward),
        ):
            loss = batch_loss_sum(self.model, term.task.kind, term.batch) * term.scale
        Objective.check_finite(term.task, loss)
        if backward:
            loss.backward()
            term.grad = (top.grad if top.grad is not None else torch.zeros_like(top)).to(self.host)
        term.hidden = None
        return float(loss.item())

    def _backward_stack(self, terms: Sequence[_Term], consume: Optional[Consume]) -> None:
        """Phase D: from the top layer down, recompute from the checkpoints and backpropagate."""
        device = self.meta.device
        for i in reversed(range(len(self.layers))):
            self._fetch_layer(i)
            try:
                for term in terms:
                    x = term.inputs[i].to(device).requires_grad_(True)
                    args, kwargs = term.calls[i]
                    with torch.enable_grad():
                        out = self._forwards[i](x, *args, **kwargs)
                    torch.autograd.backward(out, term.grad.to(device))
                    term.grad, term.inputs[i] = x.grad.to(self.host), None
                if consume is not None:
                    for name in self.layer_params[i]:
                        if name in self.blocks:
                            p = self.model.get_parameter(name)
                            consume(name, p.grad if p.grad is not None else torch.zeros_like(p))
            finally:
                self.meta.release(self.layer_params[i])

    def _groups(self, objective: Objective) -> List[List[_Term]]:
        """Micro-batches in groups whose per-layer checkpoints fit the checkpoint budget."""
        groups, current, size = [], [], 0
        hidden = int(getattr(self.model.config, "hidden_size", 0) or 0)
        for task, scale, batch in objective.terms(self.model, self.meta.device):
            need = int(batch["input_ids"].numel()) * hidden * 4 * (len(self.layers) + 1)
            if current and size + need > self.checkpoint_bytes:
                groups.append(current)
                current, size = [], 0
            current.append(_Term(task, scale, batch))
            size += need
        if current:
            groups.append(current)
        return groups

    def _run(self, objective: Objective, consume: Optional[Consume], backward: bool, accept=None) -> float:
        try:
            return self._evaluate(objective, consume, backward, accept)
        finally:
            return_free_memory()  # a whole evaluation ended (eval/fwbench/heap_trim.py can trim only here)

    def _evaluate(
        self,
        objective: Objective,
        consume: Optional[Consume],
        backward: bool,
        accept: Optional[Callable[[float], bool]] = None,
    ) -> float:
        total = 0.0
        groups = self._groups(objective)
        self.groups_last = len(groups)
        with self._streamed_outer():
            for terms in groups:
                for term in terms:
                    self._capture(term)
                self._forward_stack(terms, keep=backward)
                for term in terms:
                    total += self._top(term, backward)
                if backward and accept is not None and len(groups) == 1 and not accept(total):
                    backward = False  # the caller discards this point: its backward is not needed
                    for term in terms:
                        term.inputs = []
                if backward:
                    self._backward_stack(terms, consume)
                    if self.outer_trainable:
                        for term in terms:  # phase E: into the embeddings through the stack input
                            start = self._capture(term, keep_graph=True)
                            if start.requires_grad:
                                torch.autograd.backward(start, term.grad.to(start.device))
                for term in terms:
                    term.calls = []
            if backward and consume is not None:
                for name in self.outer_trainable:
                    p = self.model.get_parameter(name)
                    consume(name, p.grad if p.grad is not None else torch.zeros_like(p))
        return total

    def __call__(
        self,
        consume: Consume,
        objective: Optional[Objective] = None,
        accept: Optional[Callable[[float], bool]] = None,
    ) -> float:
        """The value, and the gradient handed to `consume`. `accept(value)` False: the point is
        rejected, and where the whole objective is one group of micro-batches the backward is
        skipped (consume is then not called); with several groups the value is known only at
        the end, after every group's backward."""
        objective = objective or self.objective
        if self.lora is not None:
            self.lora.start_scoring()
        try:
            return self._run(objective, consume, backward=True, accept=accept)
        finally:
            if self.lora is not None:
                self.lora.stop_scoring()

    def value(self, objective: Optional[Objective] = None) -> float:
        return self._run(objective or self.objective, None, backward=False)
