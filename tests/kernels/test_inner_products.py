"""`inner_products`: the Gram of a weight's terms, LoRA terms never formed densely, against the
Gram of the dense tensors formed explicitly."""

import torch

from fwllm.kernels.low_rank import LowRank, inner_products


def test_gram_of_mixed_low_rank_dense_and_absent_terms_equals_the_dense_gram():
    g = torch.Generator().manual_seed(0)
    out, inp = 7, 5
    terms = [
        LowRank(torch.randn(2, inp, generator=g), torch.randn(out, 2, generator=g), 0.5),
        torch.randn(out, inp, generator=g),
        None,
        LowRank(torch.randn(3, inp, generator=g), torch.randn(out, 3, generator=g), -2.0),
        torch.randn(out * inp, generator=g),  # a flat row (an exact sketch) of the same weight
    ]
    dense = [
        (t.dense().double() if isinstance(t, LowRank) else t.double()).reshape(-1)
        if t is not None
        else torch.zeros(out * inp, dtype=torch.float64)
        for t in terms
    ]
    expected = torch.stack(dense) @ torch.stack(dense).T
    assert torch.allclose(inner_products(terms), expected, rtol=1e-6, atol=1e-9)
