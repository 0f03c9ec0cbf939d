"""A model that is never whole in memory: a meta-device skeleton whose tensors are
materialised from a weights map only while they are needed.

The skeleton is built with accelerate's `init_empty_weights`; `fetch` and `release` move a
module's tensors between the meta device and the solve device with accelerate's
`set_module_tensor_to_device`. The weights map is an accelerate `OffloadedWeightsLoader`:
over the base's safetensors shards (each read opens the shard, copies the tensor and
closes it) and, for blocks that change, over an iterate store (`fwllm.io.iterate_store`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from accelerate import init_empty_weights
from accelerate.utils import OffloadedWeightsLoader, find_tied_parameters, set_module_tensor_to_device
from safetensors import safe_open

from fwllm.core.errors import FwllmError
from fwllm.core.memory import return_free_memory
from fwllm.io.models import read_config, safetensors_files


def shard_index(model_dir: str, dtype: str = "float32") -> Dict[str, dict]:
    """accelerate offload-index entries pointing every tensor at its safetensors shard
    (found by opening each shard once, header only)."""
    entries = {}
    for shard in safetensors_files(model_dir):
        with safe_open(shard, framework="pt") as fp:
            for name in fp.keys():
                entries[name] = {"safetensors_file": shard, "weight_name": name, "dtype": dtype}
    return entries


def skeleton(model_dir: str, architecture: Optional[str] = None) -> torch.nn.Module:
    """The transformers model of `model_dir` (or class `architecture`) with every parameter
    on the meta device; buffers (rotary frequencies, position ids) are real and small."""
    import transformers

    cfg = read_config(model_dir)
    name = architecture or (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise FwllmError(f"{model_dir}: unknown architecture {name}; fwllm loads transformers classes only")
    config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    if architecture and architecture.endswith("ForSequenceClassification"):
        config.num_labels = max(int(getattr(config, "num_labels", 2)), 1)
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    model.tie_weights()  # (outside the context, where accelerate re-registers parameters) as a load does
    model.eval()  # the recompute of a layer must see the same function as its forward: no dropout
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False
    return model


class MetaModel:
    """A skeleton plus the weights map it is materialised from.

    `fetch(names)` puts tensors on the device (as parameters that require grad when their
    name is in `trainable`); `release(names)` sends them back to meta. Tied parameters
    (an LM head tied to the embeddings) are fetched once and shared, as in the model."""

    def __init__(
        self,
        model: torch.nn.Module,
        weights: Mapping[str, torch.Tensor],
        device: str = "cpu",
        trainable: Iterable[str] = (),
        optional: Callable[[str], bool] = lambda name: False,
    ):
        self.model, self.weights, self.device = model, weights, torch.device(device)
        # a Mapping's `in` reads the tensor (accelerate's loader has no __contains__): test names against a set
        self.stored: Set[str] = set(weights)
        self.trainable: Set[str] = set(trainable)
        self.ties: Dict[str, List[str]] = {}
        for group in find_tied_parameters(model):
            for name in group:
                self.ties[name] = list(group)
        self.resident: Set[str] = set()  # parameter names on the device now
        self.peak_resident_bytes = 0
        self.fetches = 0
        # `optional` tensors (task heads of an encoder pool) are supplied by the caller, never fetched
        missing = [n for n in self.parameter_names() if self.source_name(n) is None and not optional(n)]
        if missing:
            raise FwllmError(
                f"the checkpoint has no tensor {missing[0]} ({len(missing)} missing); "
                f"is it a {type(model).__name__}?"
            )

    def group(self, name: str) -> List[str]:
        """`name` and the names tied to it."""
        return self.ties.get(name, [name])

    def is_trainable(self, name: str) -> bool:
        return any(n in self.trainable for n in self.group(name))

    def parameter_names(self) -> List[str]:
        return [n for n, _ in self.model.named_parameters()]  # tied duplicates once

    def source_name(self, name: str) -> Optional[str]:
        """The weights-map key holding `name` (a tied head is stored under the embeddings)."""
        for candidate in [name] + self.ties.get(name, []):
            if candidate in self.stored:
                return candidate
        return None

    def module_parameters(self, prefix: str) -> List[str]:
        module = self.model.get_submodule(prefix) if prefix else self.model
        return [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]

    def fetch(
        self, names: Iterable[str], source: Optional[Mapping[str, torch.Tensor]] = None, copy: bool = True
    ) -> None:
        """Materialise `names` on the device from `source` (default: the weights map). `copy=False`:
        a float32 `source` tensor on the device is used as it is (the caller's private, read-only copy,
        shared by several skeletons)."""
        source = source if source is not None else self.weights
        for name in names:
            if name in self.resident:
                continue
            present = name in self.stored if source is self.weights else name in source
            value = source[name] if present else self.weights[self.source_name(name)]
            # a private float32 copy: a view would pin the mapped shard (and must never be written)
            set_module_tensor_to_device(
                self.model, name, self.device, value=value.to(torch.float32, copy=copy)
            )
            param = self.model.get_parameter(name)
            param.requires_grad_(self.is_trainable(name))
            for alias in self.ties.get(name, []):
                if alias != name:
                    self._set(alias, param)
                    self.resident.add(alias)
            self.resident.add(name)
            self.fetches += 1
        unique = {id(p): p.numel() for p in map(self.model.get_parameter, self.resident)}  # a tie counts once
        size = 4 * sum(unique.values())
        self.peak_resident_bytes = max(self.peak_resident_bytes, size)

    def release(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.resident:
                continue
            set_module_tensor_to_device(self.model, name, "meta")
            meta = self.model.get_parameter(name)
            for alias in self.ties.get(name, []):
                if alias != name:
                    self._set(alias, meta)
                    self.resident.discard(alias)
            self.resident.discard(name)
        return_free_memory()  # else the freed layer stays resident, fragmented in the heap

    def _set(self, name: str, param: torch.nn.Parameter) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name) if module_name else self.model
        module._parameters[attr] = param


def base_weights(model_dir: str) -> OffloadedWeightsLoader:
    """The base checkpoint as an accelerate weights map, read tensor by tensor in float32."""
    return OffloadedWeightsLoader(index=shard_index(model_dir))


@contextlib.contextmanager
def fetched_around_forward(
    meta: "MetaModel",
    modules: Sequence[Tuple[torch.nn.Module, List[str]]],
    source: Optional[Mapping[str, torch.Tensor]] = None,
    hold: bool = False,
) -> Iterator[None]:
    """Within the block, each (module, names) fetches its weights `names` (from `source`, default the
    meta model's weights) only around its own forward: modules outside the layer stack (embeddings,
    norms, a head) then hold no memory between their calls. With `hold`, a module's weights stay
    from its first forward to the end of the block: one fetch (a float32 copy of a 32000-token
    embedding: 0.1 s at 1.1B) serves every micro-batch and candidate run inside it."""

    def wrap(module, names):
        original = type(module).forward

        def forward(*args, **kwargs):
            meta.fetch(names, source)
            try:
                return original(module, *args, **kwargs)
            finally:
                if not hold:
                    meta.release(names)

        return forward

    for module, names in modules:
        module.forward = wrap(module, names)
    try:
        yield
    finally:
        for module, names in modules:
            del module.forward
            if hold:
                meta.release(names)


@contextlib.contextmanager
def forwards_replaced(layers: Sequence[torch.nn.Module], make: Callable[[int], Callable]) -> Iterator[None]:
    """Within the block, layer i runs `make(i)` as its forward (a streamer's fetch-run-release); after it,
    the class's own forward again."""
    for i, layer in enumerate(layers):
        layer.forward = make(i)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
