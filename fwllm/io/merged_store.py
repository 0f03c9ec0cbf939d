"""Merged tensors kept in a plan folder, and the streamed pass that writes them.

A data-informed method can finish its merge before mergekit runs. FW-Merging ends its
solve holding the merged blocks. Fisher and RegMean merge tensor by tensor from their
statistics, and `execute_streamed` does that here, reading each candidate's tensor
through fwllm's readers. Those readers close the shard after every read, so mapped pages
do not pile up, and only one candidate tensor is alive at a time. `fwllm merge` then
hands mergekit a base-only graph, and the method's kernel returns the stored tensor. The
memory of the whole merge therefore does not grow with the number of candidates.

Layout: ``<plan>/merged/NNNNN.safetensors`` shards of about `SHARD_BYTES`, and
``<plan>/merged/index.json`` ({tensor name: shard file}). A merge that is low-rank in task-vector
space (RegMean or FW's refine over a LoRA pool: W = W_0 + B A) is stored as its two factors,
``NAME:lora_A`` [r, in] and ``NAME:lora_B`` [out, r] (float32), and formed on the base tensor when
mergekit asks for it: at 7B that is ~1/20 of the merge's bytes, and the factors are what
`--lora-out` writes. A tensor the plan stores nothing of is the base's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from typing import Callable, Dict, Iterable, Iterator, Optional, Set, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fwllm.core.errors import FwllmError
from fwllm.core.trust import inside
from fwllm.io.candidates import Candidate, LazyCandidates
from fwllm.io.tensors import TensorReader

MERGED_DIR = "merged"
INDEX = "index.json"
SHARD_BYTES = 256 << 20  # held in RAM until written: a shard is anonymous memory at the peak
FACTOR_A, FACTOR_B = ":lora_A", ":lora_B"  # ":" never occurs in a module path
Factors = Tuple[torch.Tensor, torch.Tensor]  # (A [r, in], B [out, r]): the delta B @ A


def _entries(name: str, value: Union[torch.Tensor, Factors]) -> Iterator[Tuple[str, torch.Tensor]]:
    if isinstance(value, tuple):
        yield name + FACTOR_A, value[0].float()
        yield name + FACTOR_B, value[1].float()
    else:
        yield name, value


def write_merged(plan_dir: str, tensors: Iterable[Tuple[str, Union[torch.Tensor, Factors]]]) -> str:
    """Write (name, tensor) and (name, (A, B)) pairs as shards, at most one shard's worth in memory."""
    folder = os.path.join(plan_dir, MERGED_DIR)
    os.makedirs(folder, exist_ok=True)
    index: Dict[str, str] = {}
    shard: Dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            fname = f"{len(set(index.values())):05d}.safetensors"
            save_file(shard, os.path.join(folder, fname))
            index.update({n: fname for n in shard})
        shard, size = {}, 0

    for name, value in tensors:
        for key, t in _entries(name, value):
            shard[key] = t.detach().to("cpu").contiguous()
            size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()
    flush()
    with open(os.path.join(folder, INDEX), "w", encoding="utf-8") as fp:
        json.dump(index, fp)
    return folder


def merged_index(plan_dir: str) -> Optional[Dict[str, str]]:
    """{name: shard path} of the stored merged tensors, or None when the plan stores none."""
    path = os.path.join(plan_dir, MERGED_DIR, INDEX)
    if not os.path.isfile(path):
        return None
    folder = os.path.join(plan_dir, MERGED_DIR)
    with open(path, encoding="utf-8") as fp:
        try:
            entries = json.load(fp)
        except ValueError:
            raise FwllmError(f"{path} is not valid JSON: the plan is damaged; solve again") from None
    if not isinstance(entries, dict):
        raise FwllmError(f"{path} is not a {{tensor: shard}} index: the plan is damaged; solve again")
    # a shard named by an absolute path or by `..` would merge another folder's tensors
    return {n: inside(folder, f, path) for n, f in entries.items()}


def _read(index: Dict[str, str], key: str) -> torch.Tensor:
    with safe_open(index[key], framework="pt") as fp:
        return fp.get_tensor(key).clone()


def merged_factors(index: Dict[str, str], name: str) -> Optional[Factors]:
    """The stored low-rank delta (A, B) of `name` (W = W_0 + B A), or None when it is stored densely or
    not at all."""
    if name + FACTOR_A not in index or name + FACTOR_B not in index:
        return None
    return _read(index, name + FACTOR_A), _read(index, name + FACTOR_B)


def stored_names(index: Dict[str, str]) -> Tuple[Set[str], Set[str]]:
    """(names stored densely, names stored as factors)."""
    dense, low = set(), set()
    for key in index:
        for suffix in (FACTOR_A, FACTOR_B):
            if key.endswith(suffix):
                low.add(key[: -len(suffix)])
                break
        else:
            dense.add(key)
    return dense, low


def read_merged(index: Dict[str, str], name: str) -> Optional[torch.Tensor]:
    """The merged tensor stored densely, or None (stored as factors: `merged_factors`; or not at all)."""
    return _read(index, name) if name in index else None


MergeFn = Callable[[str, torch.Tensor, Mapping], torch.Tensor]


def execute_streamed(
    plan_dir: str, base_dir: str, candidates: Dict[str, Candidate], merge: MergeFn, progress: bool = True
) -> str:
    """Run `merge(name, base_tensor, lazy_candidates)` for every tensor the base shares with the
    full-checkpoint candidates, and store the results. A base tensor that some candidate lacks
    (a masked-LM head under classifier experts) is not part of the merge: mergekit's graph
    never asks for it, and the kernel falls back to the base should it ever be asked."""
    base = TensorReader(base_dir)
    full = [c.reader for c in candidates.values() if c.adapter is None]
    names = [n for n in base.names() if all(n in r for r in full)]

    def tensors():
        for name in tqdm(names, desc="merging tensors (streamed)", disable=not progress):
            b = base.get(name, dtype=None)
            out = merge(name, b, LazyCandidates(candidates, name, b))
            yield name, out.float() if out.is_floating_point() else out  # mergekit casts to the recipe dtype

    return write_merged(plan_dir, tensors())


def drop_merged(plan_dir: str) -> bool:
    """Delete the plan's stored merged tensors (a float32 copy of the whole merge: 2x a bf16
    model). The index goes first, so an interrupted delete leaves a plan that stores no merge
    (its tensors are formed again from the candidates), never one whose index names lost shards."""
    folder = os.path.join(plan_dir, MERGED_DIR)
    if not os.path.isdir(folder):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, INDEX))
    shutil.rmtree(folder, ignore_errors=True)
    return True
