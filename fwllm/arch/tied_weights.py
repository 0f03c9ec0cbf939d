"""Tied weights that a LoRA adapter's `modules_to_save` unties, as peft does.

A base with tied embeddings (`tie_word_embeddings`) stores the input embedding once; the LM
head is the same tensor. An adapter that saves the embedding in full (`modules_to_save=
["embed_tokens"]`) replaces only the embedding module with its trained copy: peft's
`merge_and_unload` leaves the LM head on the original, base embedding and sets
`tie_word_embeddings: false`. (LoRA factors on the embedding are merged in place into the
shared weight, so the tie stays.) A merge over such adapters therefore changes the
embedding only, and the merged checkpoint must carry the base's LM head as its own tensor;
mergekit's graph over a base that stores no head never writes one, so `untie_saved_heads`
adds it to the output afterwards.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import torch
from accelerate.utils import find_tied_parameters
from safetensors import safe_open
from safetensors.torch import save_file

from fwllm.arch.streaming import skeleton
from fwllm.core.errors import FwllmError
from fwllm.io.adapters import AdapterReader
from fwllm.io.models import read_config
from fwllm.io.tensors import TensorReader

LOG = logging.getLogger(__name__)
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def tied_groups(model_dir: str) -> List[List[str]]:
    """The model's groups of tied parameter names (empty when it ties nothing)."""
    if not read_config(model_dir).get("tie_word_embeddings", False):
        return []
    return [sorted(group) for group in find_tied_parameters(skeleton(model_dir))]


def saved_copies(adapter: AdapterReader) -> List[str]:
    """The weights the adapter replaces with a trained copy of their module (`modules_to_save`).
    A saved base layer (`...base_layer.weight`, e.g. an embedding that carries LoRA factors) or an
    embedding peft saved because its vocabulary may have changed loads into the module itself,
    so a tie to it stays."""
    modules = adapter.config.get("modules_to_save") or []
    return [
        n
        for n in adapter.full
        if any(n.rsplit(".", 1)[0] == m or n.rsplit(".", 1)[0].endswith("." + m) for m in modules)
    ]


def heads_to_untie(base_dir: str, adapters: Sequence[Optional[AdapterReader]]) -> Dict[str, str]:
    """{tied name the base does not store: the stored name it must copy} for the tied weights
    that the adapters save in full (modules_to_save), when every candidate is such an adapter
    pool; {} when the merge keeps every tie."""
    copies = [set(saved_copies(a)) if a is not None else set() for a in adapters]
    if not any(copies):
        return {}
    stored = set(TensorReader(base_dir).names())
    out = {}
    for group in tied_groups(base_dir):
        kept = [n for n in group if n in stored]
        if len(kept) != 1 or not any(kept[0] in c for c in copies):
            continue
        if any(a is None for a in adapters):
            LOG.warning(
                "a candidate adapter saves %s in full but a full-checkpoint candidate ties it to %s: "
                "the merge keeps the tie",
                kept[0],
                [n for n in group if n != kept[0]],
            )
            continue
        heads = [n for n in group if n != kept[0]]
        # another adapter changing the shared weight in place (or the head itself) would need the
        # head merged on its own: no pool fwllm can form from the base alone
        if any(
            set(heads) & set(a.targets()) or (kept[0] in a.targets() and kept[0] not in c)
            for a, c in zip(adapters, copies)
        ):
            raise FwllmError(
                f"an adapter saves {kept[0]} as its own copy (modules_to_save), untying it from "
                f"{heads}, and another adapter changes the tied weights: fwllm cannot merge "
                f"that pool as peft would"
            )
        out.update({name: kept[0] for name in heads})
    return out


def _shards(out_dir: str) -> List[str]:
    index = os.path.join(out_dir, INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fp:
            return sorted(set(json.load(fp)["weight_map"].values()))
    if os.path.isfile(os.path.join(out_dir, SINGLE)):
        return [SINGLE]
    raise FwllmError(f"{out_dir}: no safetensors output to untie the embeddings in")


def _weight_names(out_dir: str) -> List[str]:
    names = []
    for shard in _shards(out_dir):
        with safe_open(os.path.join(out_dir, shard), framework="pt") as fp:
            names += list(fp.keys())
    return names


def add_output_tensors(out_dir: str, tensors: Dict[str, torch.Tensor]) -> None:
    """Add `tensors` to a safetensors checkpoint as one more shard. Existing shards are only
    renamed (model-0000i-of-0000n): none is read or rewritten."""
    shards = _shards(out_dir)
    total = len(shards) + 1
    weight_map, size = {}, 0
    for i, shard in enumerate(shards + [None], start=1):
        new = f"model-{i:05d}-of-{total:05d}.safetensors"
        if shard is None:
            save_file(
                {n: t.contiguous() for n, t in tensors.items()},
                os.path.join(out_dir, new),
                metadata={"format": "pt"},
            )
        elif shard != new:
            os.rename(os.path.join(out_dir, shard), os.path.join(out_dir, new))
        with safe_open(os.path.join(out_dir, new), framework="pt") as fp:
            for name in fp.keys():
                weight_map[name] = new
                sl = fp.get_slice(name)
                size += int(torch.Size(sl.get_shape()).numel()) * _itemsize(sl.get_dtype())
    with open(os.path.join(out_dir, INDEX), "w", encoding="utf-8") as fp:
        json.dump({"metadata": {"total_size": size}, "weight_map": weight_map}, fp, indent=2)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _itemsize(tag: str) -> int:
    return (
        _DTYPES[tag].itemsize
        if tag in _DTYPES
        else {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2}.get(tag, 1)
    )


def output_dtype(out_dir: str, name: str) -> torch.dtype:
    """The dtype `name` has in the checkpoint (read from the header: the tensor is not loaded)."""
    for shard in _shards(out_dir):
        with safe_open(os.path.join(out_dir, shard), framework="pt") as fp:
            if name in fp.keys():
                return _DTYPES[fp.get_slice(name).get_dtype()]
    raise FwllmError(f"{out_dir}: the merged checkpoint has no {name}")


def untie_saved_heads(out_dir: str, base_dir: str, adapters: Sequence[Optional[AdapterReader]]) -> List[str]:
    """Write the base's tensor under each tied name that the adapters untie (see the module
    doc) and mark the output's config untied; returns the names added."""
    untie = heads_to_untie(base_dir, adapters)
    if not untie:
        return []
    base = TensorReader(base_dir)
    written = set(_weight_names(out_dir))  # mergekit writes the head itself when a candidate input has one
    missing = {
        name: base.get(src, dtype=None).to(output_dtype(out_dir, src))
        for name, src in untie.items()
        if name not in written
    }
    if missing:
        add_output_tensors(out_dir, missing)
    path = os.path.join(out_dir, "config.json")
    with open(path, encoding="utf-8") as fp:
        config = json.load(fp)
    config["tie_word_embeddings"] = False
    with open(path, "w", encoding="utf-8") as fp:
        json.dump(config, fp, indent=2)
    LOG.info(
        "untied %s from %s: the adapters save the embedding in full (as peft merges them)",
        sorted(untie),
        sorted(set(untie.values())),
    )
    return sorted(untie)
