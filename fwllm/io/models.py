"""Finding and loading model folders: local paths, Hub ids, transformers classes."""

from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional

import torch

from fwllm.core.errors import FwllmError
from fwllm.core.paths import is_hub_id
from fwllm.core.trust import inside

ADAPTER_CONFIG = "adapter_config.json"


def resolve_model_path(path: str, revision: Optional[str] = None) -> str:
    """A local folder for `path`: itself, or its Hugging Face snapshot (cache first when offline)."""
    if os.path.isdir(path):
        return os.path.abspath(path)
    if not is_hub_id(path):
        raise FwllmError(f"model folder not found: {path}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return snapshot_download(
            path,
            revision=revision,
            local_files_only=offline,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"],
        )
    except (HfHubHTTPError, OSError, ValueError) as err:
        how = (
            "HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache"
            if offline
            else str(err).splitlines()[0]
        )
        raise FwllmError(f"cannot get model {path!r} from the Hugging Face Hub: {how}") from None


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


SHARD_INDEX = "model.safetensors.index.json"


def safetensors_files(model_dir: str) -> List[str]:
    """The checkpoint's shards; a sharded checkpoint's index must not name a shard that is missing."""
    index = os.path.join(model_dir, SHARD_INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fp:
                named = set(json.load(fp).get("weight_map", {}).values())
        except ValueError as err:
            raise FwllmError(f"{index} is not valid JSON ({err})") from None
        # a shard of another folder would be read as this model's (the index may not leave its folder)
        named = {f: inside(model_dir, f, f"{index} (weight_map)") for f in named}
        missing = sorted(f for f, path in named.items() if not os.path.isfile(path))
        if missing:
            raise FwllmError(
                f"{model_dir}: the shard index names {missing[0]}, which is missing "
                f"({len(missing)} shard(s) missing); download the model again"
            )
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FwllmError(f"{model_dir} holds no .safetensors weights (fwllm reads safetensors only)")
    return [os.path.join(model_dir, f) for f in files]


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FwllmError(f"{model_dir} has no config.json; not a transformers model folder")
    with open(path, encoding="utf-8") as fp:
        try:
            return json.load(fp)
        except ValueError as err:
            raise FwllmError(f"{path} is not valid JSON ({err})") from None


def architecture_of(model_dir: str) -> str:
    return (read_config(model_dir).get("architectures") or ["?"])[0]


def check_same_architecture(base_dir: str, others: Iterable[str]) -> None:
    base_cfg = read_config(base_dir)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    for other in others:
        cfg = read_config(other)
        diff = [k for k in keys if k in base_cfg and cfg.get(k) != base_cfg.get(k)]
        if diff:
            k = diff[0]
            raise FwllmError(
                f"{other} does not match the base {base_dir}: {k} is {cfg.get(k)!r} vs {base_cfg.get(k)!r}"
            )


def load_model(
    model_dir: str,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    architecture: Optional[str] = None,
):
    """Instantiate the transformers class named in config.json, or `architecture` (e.g. an
    encoder pool's classifier class over a masked-LM base body). No remote code, ever."""
    import transformers

    cfg = read_config(model_dir)
    archs = [architecture] if architecture else (cfg.get("architectures") or [])
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        raise FwllmError(f"{model_dir}: unknown architecture {archs}; fwllm loads transformers classes only")
    model = cls.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    return model.to(device)


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
