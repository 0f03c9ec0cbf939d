"""The weight files of every model and adapter a recipe names, checked before anything is merged.

Every method reads through mergekit's loaders, fwllm's and mergekit's own (`ties`, ...) alike,
and those follow whatever a folder holds. So before a merge starts, for each folder:

* safetensors only: a folder whose weights are pickles alone (`pytorch_model.bin`, `.pt`,
  `.pth`; `adapter_model.bin`) is refused unless `--allow-pickle` is given, since
  unpickling runs code from the file;
* a shard index (`model.safetensors.index.json`) may name only files inside its folder;
* every safetensors shard has a sound header whose data offsets fit the file (a truncated or
  damaged shard is one error line here, not a traceback from deep inside the merge).

Hub ids are checked in their local snapshot when one is cached; one not downloaded yet is
fetched by mergekit, which takes safetensors whenever the repository has them.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, List, Optional

from fwllm.core.errors import FwllmError
from fwllm.io.models import SHARD_INDEX
from fwllm.core.trust import inside

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def check_shard(path: str) -> None:
    """One clear error unless `path` is a whole safetensors file: header, offsets and size agree."""
    size = os.path.getsize(path)

    def bad(why: str) -> FwllmError:
        return FwllmError(f"{path} is damaged or truncated ({why}); download or copy it again")

    with open(path, "rb") as fp:
        head = fp.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, no header")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise bad(f"the header claims {n} bytes, the file has {size}")
        try:
            header = json.loads(fp.read(n))
        except ValueError:
            raise bad("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = (int(x) for x in entry["data_offsets"])
            count = 1
            for d in entry["shape"]:
                count *= int(d)
            width = _DTYPE_BYTES.get(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name} has no valid dtype, shape and offsets") from None
        if not 0 <= lo <= hi or (width is not None and hi - lo != count * width):
            raise bad(f"tensor {name} has offsets {lo}..{hi} that do not fit its shape")
        end = max(end, hi)
    if 8 + n + end != size:
        raise bad(f"its tensors need {8 + n + end} bytes, the file has {size}")


def check_shard_index(folder: str) -> List[str]:
    """The shards a folder's index names, each refused unless it is a file inside the folder."""
    index = os.path.join(folder, SHARD_INDEX)
    if not os.path.isfile(index):
        return []
    try:
        with open(index, encoding="utf-8") as fp:
            weight_map = json.load(fp).get("weight_map", {})
    except (ValueError, AttributeError) as err:
        raise FwllmError(f"{index} is not a valid shard index ({err})") from None
    if not isinstance(weight_map, dict):
        raise FwllmError(f"{index}: weight_map is not a {{tensor: shard}} mapping")
    # a shard of another model's folder would merge that model's tensors under this one's name
    return sorted({inside(folder, f, f"{index} (weight_map)") for f in weight_map.values()})


def pickle_only(folder: str) -> Optional[str]:
    """The pickle file a loader would read from `folder`, when it holds no safetensors weights."""
    names = os.listdir(folder)
    if any(n.endswith(".safetensors") for n in names):
        return None
    pickles = sorted(
        n for n in names if n.endswith(PICKLE_SUFFIXES) and os.path.isfile(os.path.join(folder, n))
    )
    return pickles[0] if pickles else None


def check_weight_folder(folder: str, allow_pickle: bool = False) -> None:
    if not allow_pickle:
        pickle = pickle_only(folder)
        if pickle:
            raise FwllmError(
                f"{folder} holds pickle weights only ({pickle}); fwllm merge reads safetensors "
                f"only, since loading a pickle can run code: convert it to safetensors, or "
                f"pass --allow-pickle if you trust its source"
            )
    for shard in check_shard_index(folder) or sorted(
        os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors")
    ):
        if not os.path.isfile(shard):
            raise FwllmError(
                f"{folder}: the shard index names {os.path.basename(shard)}, which is missing; "
                f"download the model again"
            )
        check_shard(shard)


def _local_folder(path: str, revision: Optional[str]) -> Optional[str]:
    """A local folder for a model reference: itself, or a cached Hub snapshot (None: not here yet)."""
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, "config.json", revision=revision)
        if not isinstance(found, str):
            found = try_to_load_from_cache(path, "adapter_config.json", revision=revision)
    except Exception:  # not a Hub id at all: mergekit reports it
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def check_recipe_weights(references: Iterable, allow_pickle: bool = False) -> None:
    """Check every model and adapter folder of mergekit ModelReferences (config.referenced_models())."""
    seen = set()
    for ref in references:
        for mp in (ref.model, ref.lora):
            if mp is None or (mp.path, mp.revision) in seen:
                continue
            seen.add((mp.path, mp.revision))
            folder = _local_folder(mp.path, mp.revision)
            if folder is not None:
                check_weight_folder(folder, allow_pickle)
