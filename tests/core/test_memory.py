import sys

import pytest
import torch

from fwllm.core import memory


def _anon_bytes() -> int:
    with open("/proc/self/status") as fp:
        for line in fp:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory._TRIM is None, reason="glibc only")
def test_freed_heap_blocks_between_live_ones_go_back_to_the_system():
    """The fragmentation a layer-by-layer solve makes: 4 MB blocks (below glibc's mmap threshold,
    so on the heap), every other one kept. Freeing the rest leaves their pages resident until the
    trim returns them."""
    torch.empty(
        24 << 20, dtype=torch.uint8
    )  # freeing a mapped 24 MB block raises the mmap threshold to 24 MB
    blocks = [torch.ones(1 << 20) for _ in range(96)]  # 4 MB each, touched
    kept = blocks[1::2]
    del blocks
    before = _anon_bytes()
    memory.return_free_memory()
    after = _anon_bytes()
    assert before - after > 96 << 20, (before, after)  # most of the 192 MB freed between the kept blocks
    assert all(float(k[0]) == 1.0 for k in kept)
