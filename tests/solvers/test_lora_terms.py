"""A LoRA pool's implicit iterate and hook-scored oracle against dense weights and autograd."""

import pytest
import torch

from fwllm.io.adapters import LoraFactors
from fwllm.solvers.lora_terms import LoraTerms


class _Adapter:
    """The slice of an AdapterReader that LoraTerms reads: plain factors, nothing else."""

    def __init__(self, factors):
        self.factors, self.full = factors, {}


def _factors(out, inp, rank, alpha, rslora, seed):
    g = torch.Generator().manual_seed(seed)
    scale = alpha / (rank**0.5 if rslora else rank)
    return LoraFactors(torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g), scale)


@pytest.mark.parametrize("rslora", [False, True])
def test_hook_scores_equal_the_dense_inner_product_with_the_weight_gradient(rslora):
    torch.manual_seed(0)
    out, inp = 6, 5
    model = torch.nn.Sequential(
        torch.nn.Linear(inp, out, bias=False), torch.nn.Tanh(), torch.nn.Linear(out, 3)
    )
    name = "0.weight"
    adapters = [
        _Adapter({name: _factors(out, inp, r, a, rslora, seed)}) for r, a, seed in ((2, 4.0, 1), (3, 6.0, 2))
    ]
    adapters.append(_Adapter({}))  # a candidate that leaves this layer alone
    weights = torch.tensor([1.0, 0.5, 2.0])
    coefficients = [0.3, -0.2, 0.0]
    terms = LoraTerms(adapters)
    terms.weights = weights
    terms.set_coefficients(name, coefficients)
    terms.attach(model)
    x = torch.randn(4, 7, inp)

    # independent truth: the dense iterate W = W0 + sum_i c_i s_i B_i A_i, and dL/dW by autograd
    dense = torch.nn.Sequential(
        torch.nn.Linear(inp, out, bias=False), torch.nn.Tanh(), torch.nn.Linear(out, 3)
    )
    dense.load_state_dict(model.state_dict())
    w = model[0].weight.detach().clone()
    for c, a in zip(coefficients, adapters[:2]):
        f = a.factors[name]
        w += c * f.scale * f.b @ f.a
    dense[0].weight.data.copy_(w)
    dense(x).square().sum().backward()
    grad = dense[0].weight.grad

    model[0].weight.requires_grad_(False)  # as in a streamed solve: the base weight gets no gradient
    terms.start_scoring()
    y = model(x)
    assert torch.allclose(y, dense(x), atol=1e-5)  # the implicit layer computes the dense one
    y.square().sum().backward()
    scores = terms.stop_scoring()[name]
    expected = torch.tensor(
        [
            float(weights[i])
            * a.factors[name].scale
            * float((grad * (a.factors[name].b @ a.factors[name].a)).sum())
            for i, a in enumerate(adapters[:2])
        ]
        + [0.0]
    )
    assert torch.allclose(scores, expected, rtol=1e-4, atol=1e-6)
    assert model[0].weight.grad is None  # the scores came without the weight-gradient matmul


def test_the_merged_delta_is_the_coefficient_weighted_sum_of_the_adapters():
    name = "w"
    adapters = [_Adapter({name: _factors(4, 3, 2, 4.0, False, seed)}) for seed in (5, 6)]
    terms = LoraTerms(adapters)
    terms.set_coefficients(name, [0.7, 0.1])
    expected = sum(
        c * a.factors[name].scale * a.factors[name].b @ a.factors[name].a
        for c, a in zip([0.7, 0.1], adapters)
    )
    assert torch.allclose(terms.delta(name), expected, atol=1e-6)


def test_a_bf16_pool_is_held_in_bf16_and_computes_what_fp32_factors_compute():
    """Held as stored (half the RAM of an fp32 stack) and cast where used: bf16 -> fp32 is exact, so the
    layer's output is the one that the same factors, upcast beforehand, give."""
    name = "0.weight"
    half = [
        _Adapter({name: LoraFactors(f.a.bfloat16(), f.b.bfloat16(), f.scale)})
        for f in (_factors(6, 5, 2, 4.0, False, 7), _factors(6, 5, 3, 6.0, False, 8))
    ]
    upcast = [
        _Adapter(
            {name: LoraFactors(a.factors[name].a.float(), a.factors[name].b.float(), a.factors[name].scale)}
        )
        for a in half
    ]
    mixed = [
        half[0],
        _Adapter({name: LoraFactors(half[1].factors[name].a.half(), half[1].factors[name].b.half(), 1.0)}),
    ]
    terms, reference = LoraTerms(half), LoraTerms(upcast)
    assert terms.blocks[name].a.dtype == torch.bfloat16 and reference.blocks[name].a.dtype == torch.float32
    assert terms.nbytes * 2 == reference.nbytes
    assert (
        LoraTerms(mixed).blocks[name].a.dtype == torch.float32
    )  # bf16 with fp16: nothing narrower holds both
    x = torch.randn(3, 5)
    outs = []
    for t in (terms, reference):
        layer = torch.nn.Linear(5, 6, bias=False)
        torch.nn.init.zeros_(layer.weight)
        t.set_coefficients(name, [0.4, -0.3])
        t.attach(torch.nn.Sequential(layer))
        outs.append(layer(x))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(terms.delta(name), reference.delta(name))


def test_the_readers_factors_become_rows_of_the_stack_with_their_values_unchanged():
    """A pool's factors are held once: each reader's A and B are views of LoraTerms' stack afterwards."""
    name = "0.weight"
    adapters = [_Adapter({name: _factors(6, 5, r, 2.0, False, seed)}) for r, seed in ((2, 1), (3, 2))]
    before = [(a.factors[name].a.clone(), a.factors[name].b.clone()) for a in adapters]
    terms = LoraTerms(adapters)
    blk = terms.blocks[name]
    for (a0, b0), ad in zip(before, adapters):
        f = ad.factors[name]
        assert torch.equal(f.a, a0) and torch.equal(f.b, b0)
        assert f.a.untyped_storage().data_ptr() == blk.a.untyped_storage().data_ptr()
        assert f.b.untyped_storage().data_ptr() == blk.b.untyped_storage().data_ptr()
    # the dense delta read from the readers is still the one the stack gives
    c = [0.5, 0.25]
    terms.set_coefficients(name, c)
    dense = sum(ci * ad.factors[name].low_rank_delta() for ci, ad in zip(c, adapters))
    assert torch.allclose(terms.delta(name), dense, atol=1e-6)
