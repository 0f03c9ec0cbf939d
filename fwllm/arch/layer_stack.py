"""The repeated layer stack of a transformer, and keeping it off the solve device.

`layer_stack` finds the stack (LLaMA ``model.layers``, RoBERTa ``roberta.encoder.layer``);
`LayerOffload` keeps it in host memory while everything else sits on the device, and
fetches one layer at a time.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from fwllm.core.errors import FwllmError


def mergekit_stack_prefix(architecture: str) -> Optional[str]:
    """The layer stack's module path from mergekit's architecture JSON ("model.layers" for
    LLaMA: its layer templates read "model.layers.${layer_index}...."), if mergekit knows it."""
    from mergekit.architecture import json_definitions

    for arch in json_definitions.NAME_TO_ARCH.get(architecture, []):
        module = arch.modules.get("default")
        definition = getattr(getattr(module, "architecture", None), "definition", None)
        templates = getattr(getattr(definition, "layer_templates", None), "weights", None) or []
        for weight in templates:
            prefix, marker, _ = weight.name.partition(".${layer_index}.")
            if marker:
                return prefix
    return None


def layer_stack(model: torch.nn.Module) -> Tuple[str, torch.nn.ModuleList]:
    """The model's repeated block: where mergekit's architecture JSON puts it, else the
    largest ModuleList of two or more same-class layers."""
    prefix = mergekit_stack_prefix(type(model).__name__)
    if prefix:
        try:
            stack = model.get_submodule(prefix)
        except AttributeError:
            stack = None
        if isinstance(stack, torch.nn.ModuleList) and len(stack) >= 1:
            return prefix, stack
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


