"""The repeated layer stack of a transformer (LLaMA ``model.layers``, RoBERTa
``roberta.encoder.layer``): what a layer-by-layer solve materialises one layer at a time."""

from __future__ import annotations

from typing import Optional, Tuple

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
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module) >= 2
            and len({type(m) for m in module}) == 1
        ):
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[2]:
                best = (name, module, size)
    if best is None:
        raise FwllmError(
            f"gradient: layerwise needs a stack of repeated layers; {type(model).__name__} has none"
        )
    return best[0], best[1]
