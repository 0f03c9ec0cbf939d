"""What identifying a model folder costs: every byte hashed cold, then served by the memo.

    python eval/bench_identity.py MODEL_DIR
    python eval/bench_identity.py --write-gib 13        # random bf16 shards, the 7B case

Cold means the shards' pages are dropped from the page cache first (posix_fadvise
DONTNEED; pages another process has mapped may stay), and the in-process and persistent
memos are empty (a fresh `$FWLLM_CACHE`). Warm-memo is a new process's view: the
in-process memo is emptied, so every file is looked up in `identity.sqlite` by its stat.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def write_shards(folder: str, gib: float, shard_gib: float = 4.0) -> None:
    """Random bf16 shards (random bits: nothing for a page cache or disk to compress)."""
    import torch
    from safetensors.torch import save_file

    total, shard_bytes, i = int(gib * (1 << 30)), int(shard_gib * (1 << 30)), 0
    rng = np.random.default_rng(0)
    while total > 0:
        n = min(total, shard_bytes) // 2
        bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
        save_file(
            {f"w{i}": torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)},
            os.path.join(folder, f"model-{i:05d}.safetensors"),
        )
        total -= 2 * n
        i += 1
    with open(os.path.join(folder, "config.json"), "w") as fp:
        fp.write("{}")


def drop_pages(folder: str) -> None:
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)  # dirty pages (just written) cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", nargs="?", help="a model folder (default: write shards with --write-gib)")
    parser.add_argument("--write-gib", type=float, default=0.2, help="GiB of random bf16 shards to write")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-identity-") as tmp:
        os.environ["FWLLM_CACHE"] = os.path.join(tmp, "cache")  # an empty memo
        folder = args.folder
        if folder is None:
            folder = os.path.join(tmp, "model")
            os.makedirs(folder)
            t = time.perf_counter()
            write_shards(folder, args.write_gib)
            print(f"wrote {args.write_gib:g} GiB of shards in {time.perf_counter() - t:.1f} s")
            time.sleep(2.5)  # past the racy-clean window, so the memo keeps the digests
        from fwllm.io import identity

        files = identity.model_files(folder)
        gib = sum(os.path.getsize(os.path.join(folder, f)) for f in files) / (1 << 30)
        drop_pages(folder)
        t = time.perf_counter()
        cold = identity.folder_identity(folder)
        cold_s = time.perf_counter() - t
        identity._MEMO.clear()  # a new process: only identity.sqlite remembers
        t = time.perf_counter()
        warm = identity.folder_identity(folder)
        warm_s = time.perf_counter() - t
        assert warm == cold
        print(
            f"files {len(files)}  GiB {gib:.3f}  cold hash {cold_s:.2f} s  {gib / cold_s:.2f} GiB/s  "
            f"(threads {identity.HASH_THREADS}, cpus {os.cpu_count()})"
        )
        print(f"memo hit (new process view) {warm_s * 1000:.1f} ms for {len(files)} files")


if __name__ == "__main__":
    main()
