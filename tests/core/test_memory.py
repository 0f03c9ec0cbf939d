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


_FRAGMENT = """
import sys, torch
from fwllm.core import memory
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024
if sys.argv[1] == "mapped":
    memory.map_large_allocations(16 << 20)
torch.empty(24 << 20, dtype=torch.uint8)  # freeing a mapped 24 MB block raises glibc's own threshold to it
blocks = [torch.ones(5 << 20) for _ in range(20)]  # 20 MB each, touched
kept = blocks[1::2]
before = anon()
del blocks  # ten of them freed, between live ones: no trim
print(before - anon())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory._MALLOPT is None, reason="glibc only")
def test_large_allocations_are_handed_back_as_they_are_freed():
    """20 MB blocks, every other one kept: from the heap (glibc's adaptive threshold), the freed ones
    stay resident; past `map_large_allocations(16 MiB)` each is its own mapping, gone when freed.
    A subprocess each: the setting is process-wide and stays."""
    import subprocess

    def freed(mode: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True, check=True
        )
        return int(run.stdout.split()[-1])

    assert freed("mapped") > 180 << 20  # the ten freed blocks: 200 MB
    assert freed("heap") < 40 << 20
