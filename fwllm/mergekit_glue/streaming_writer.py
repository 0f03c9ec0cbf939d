"""Output shards written without holding a shard in memory.

mergekit's `TensorWriter` keeps every tensor of the shard being filled in RAM until the
shard reaches `--out-shard-size` (5 GB by default), so a merge's peak memory grows with that
option whatever the method needs. `StreamingTensorWriter` writes each tensor's bytes to a
spool file beside the shard as soon as it arrives and keeps only its name, dtype and shape.
Closing a shard writes the safetensors header and then copies the spooled bytes into place
in the kernel (`os.copy_file_range`), so memory holds one tensor at a time and the files are
byte for byte what `safetensors.torch.save_file` writes (same tensor order, same padding).

`streaming_output()` swaps it in for the duration of one `run_merge`; mergekit's naming,
renaming and index logic (`finalize`) are kept as they are.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List

import torch
from mergekit.io import tasks as mergekit_tasks
from mergekit.io.tensor_writer import TensorWriter

from fwllm.core.errors import FwllmError

# safetensors' dtype tags, in the order of its `Dtype` enum: it lays a file's tensors out by
# that order, descending (so by alignment), then by name
ST_DTYPES: Dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint64: "U64",
}
_RANK = {dtype: rank for rank, dtype in enumerate(ST_DTYPES)}
COPY_CHUNK = 64 << 20


@dataclass
class _Spooled:
    name: str
    dtype: torch.dtype
    shape: List[int]
    offset: int  # in the spool file
    nbytes: int


def _layout_key(entry: _Spooled):
    return (-_RANK[entry.dtype], entry.name)


def _copy_range(src, dst, offset: int, nbytes: int) -> None:
    """Append src[offset:offset+nbytes] to dst, in the kernel where it can."""
    done = 0
    while done < nbytes:
        want = min(COPY_CHUNK, nbytes - done)
        try:
            got = os.copy_file_range(src.fileno(), dst.fileno(), want, offset + done)
        except (AttributeError, OSError):
            got = 0
        if got <= 0:  # no kernel copy here (other platform or filesystem): read and write
            src.seek(offset + done)
            chunk = src.read(want)
            dst.write(chunk)
            dst.flush()
            got = len(chunk)
            if got == 0:
                raise FwllmError(f"output spool {src.name} ended early; the disk may be full")
        done += got


class StreamingTensorWriter(TensorWriter):
    """mergekit's `TensorWriter` with each tensor written out as it arrives."""

    def __init__(self, out_path: str, *args, **kwargs) -> None:
        kwargs["use_async"] = False  # bytes leave memory at once: nothing left to overlap
        super().__init__(out_path, *args, **kwargs)
        self._spooled: List[_Spooled] = []
        self._spool = None

    def _spool_file(self):
        if self._spool is None:
            self._spool = open(os.path.join(self.out_path, f".spool-{self.shards_written + 1}"), "w+b")
        return self._spool

    def save_tensor(self, name: str, tensor: torch.Tensor, clone: bool = False):
        if not self.safe_serialization:
            return super().save_tensor(name, tensor, clone=clone)
        if tensor.dtype not in ST_DTYPES:
            raise FwllmError(f"cannot write tensor {name!r} of dtype {tensor.dtype} as safetensors")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        with self._lock:
            if (
                self._spooled
                and self.max_shard_size > 0
                and self.current_shard_size + nbytes > self.max_shard_size
            ):
                self._flush_current_shard()
            spool = self._spool_file()
            offset = spool.seek(0, os.SEEK_END)
            if nbytes:
                spool.write(memoryview(flat.view(torch.uint8).numpy()))
            self._spooled.append(_Spooled(name, tensor.dtype, list(tensor.shape), offset, nbytes))
            self.current_shard_size += nbytes

    def _flush_current_shard(self):
        if not self.safe_serialization:
            return super()._flush_current_shard()
        if not self._spooled:
            return
        arrived, spool = self._spooled, self._spool
        entries = sorted(arrived, key=_layout_key)
        self._spooled, self._spool = [], None
        prefix, extension = self._get_name_components()
        shard_name = f"{prefix}-{self.shards_written + 1}.{extension}"
        header, start = {"__metadata__": {"format": "pt"}}, 0
        for e in entries:
            header[e.name] = {
                "dtype": ST_DTYPES[e.dtype],
                "shape": e.shape,
                "data_offsets": [start, start + e.nbytes],
            }
            start += e.nbytes
        head = json.dumps(header, separators=(",", ":")).encode("utf-8")
        head += b" " * (-len(head) % 8)
        spool.flush()
        with open(os.path.join(self.out_path, shard_name), "wb") as out:
            out.write(struct.pack("<Q", len(head)) + head)
            out.flush()
            for e in entries:
                _copy_range(spool, out, e.offset, e.nbytes)
        spool.close()
        os.remove(spool.name)
        for e in arrived:  # the index lists tensors as they came, as mergekit's does
            self.weight_map[e.name] = shard_name
        self.total_size += self.current_shard_size
        self.current_shard_size = 0
        self.shards_written += 1


@contextlib.contextmanager
def streaming_output() -> Iterator[None]:
    """mergekit's executor writes through `StreamingTensorWriter` inside this block."""
    original = mergekit_tasks.TensorWriter
    mergekit_tasks.TensorWriter = StreamingTensorWriter
    try:
        yield
    finally:
        mergekit_tasks.TensorWriter = original
