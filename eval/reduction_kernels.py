"""Three reductions of the bounded path against the plain torch calls they replace, timed in one run:

  Gram      `add_lower_product` + `symmetrize_` (RegMean's per-candidate Gram as its lower triangle, then
            mirrored) against `gram.addmm_(x.T, x)`, at a 1.1B layer's input widths (2048, 5632);
  sums      a candidate's Gram (its lower triangle) into RegMean's float64 sum, `add_lower` (a block row
            of the triangle at a time) against mirroring the Gram and adding it whole, at the same
            widths (a candidate with no task vector on that input: its Gram needs no mirror);
  Fisher    `kernels.fisher.total` (float32 row sums added in float64) against torch's float64 sum of a
            float32 tensor, at a 7B MLP weight's shape (11008 x 4096).

`python eval/reduction_kernels.py [--repeats 5]` (this checkout's fwllm: installed, or PYTHONPATH=.):
medians and ratios (new / old), on this machine's CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fwllm.kernels.fisher import total
from fwllm.kernels.regmean_reduced import add_lower, add_lower_product, symmetrize_


def median_s(fn, repeats: int) -> float:
    fn()  # warm: allocations, thread pool
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    print(f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    g = torch.Generator().manual_seed(0)
    for width in (2048, 5632):
        xs = [torch.randn(1024, width, generator=g) for _ in range(2)]  # two micro-batches of 4 x 256 tokens
        gram = torch.zeros(width, width)

        def full():
            gram.zero_()
            for x in xs:
                gram.addmm_(x.T, x)

        def lower():
            gram.zero_()
            for x in xs:
                add_lower_product(gram, x)
            symmetrize_(gram)

        old, new = median_s(full, args.repeats), median_s(lower, args.repeats)
        print(
            f"Gram, width {width}, 2 x 1024 rows: addmm_ {old * 1e3:.0f} ms, lower + mirror {new * 1e3:.0f} ms,"
            f" ratio {new / old:.2f}"
        )
    for width in (2048, 5632):
        gram = torch.zeros(width, width)
        add_lower_product(gram, torch.randn(2048, width, generator=g))
        sums = torch.zeros(width, width, dtype=torch.float64)

        def whole():
            symmetrize_(gram)
            sums.add_(gram, alpha=0.9)

        old, new = median_s(whole, args.repeats), median_s(lambda: add_lower(sums, gram, 0.9), args.repeats)
        print(
            f"Gram into the float64 sum, width {width}: mirror + whole add {old * 1e3:.1f} ms,"
            f" lower triangle {new * 1e3:.1f} ms, ratio {new / old:.2f}"
        )
    f = torch.rand(11008, 4096, generator=g)
    old = median_s(lambda: f.sum(dtype=torch.float64), args.repeats)
    new = median_s(lambda: total(f), args.repeats)
    print(
        f"Fisher sum, 11008 x 4096: float64 sum {old * 1e3:.1f} ms, total() {new * 1e3:.1f} ms, ratio {new / old:.3f}"
        f" (relative difference {abs(total(f) - float(f.double().sum())) / float(f.double().sum()):.1e})"
    )


if __name__ == "__main__":
    main()
