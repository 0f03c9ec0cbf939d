"""The squared-gradient sums of a linear weight and an embedding, from their module's inputs and output
gradients (the layer-major Fisher's untouched head / embeddings). Truth: the dense gradient, formed by
autograd through torch.nn.Linear / torch.nn.Embedding, squared and summed."""

import pytest
import torch

from fwllm.kernels.fisher import embedding_square_sum, linear_square_sum


def test_linear_square_sum_is_the_dense_gradients_squared_norm():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 9, bias=False)
    x = torch.randn(2, 5, 6)
    dy = torch.randn(2, 5, 9)
    layer(x).backward(dy)
    want = float(layer.weight.grad.double().square().sum())
    assert abs(float(linear_square_sum(x, dy)) - want) <= 1e-6 * want  # the dense gradient is float32


def test_embedding_square_sum_adds_a_repeated_tokens_rows_before_squaring():
    torch.manual_seed(1)
    emb = torch.nn.Embedding(7, 4)
    ids = torch.tensor([[3, 1, 3, 0, 3, 6]])  # token 3 three times: its row is the sum of three gradients
    de = torch.randn(1, 6, 4)
    emb(ids).backward(de)
    want = float(emb.weight.grad.double().square().sum())
    got = float(embedding_square_sum(ids, de))
    assert abs(got - want) <= 1e-6 * want
    # squaring each position's gradient on its own would be another (smaller here) number
    assert abs(float(de.double().square().sum()) - want) > 1e-3 * want


def test_embedding_square_sum_leaves_out_the_padding_row_as_torch_does():
    torch.manual_seed(2)
    emb = torch.nn.Embedding(7, 4, padding_idx=3)
    ids = torch.tensor([[3, 1, 3, 0, 5, 1]])  # the padding id twice: torch gives its row no gradient
    de = torch.randn(1, 6, 4)
    emb(ids).backward(de)
    want = float(emb.weight.grad.double().square().sum())
    assert abs(float(embedding_square_sum(ids, de, padding_idx=3)) - want) <= 1e-6 * want
    assert abs(float(embedding_square_sum(ids, de)) - want) > 1e-3 * want


@pytest.mark.parametrize("shape", [(7,), (300, 2000), (3, 5, 700)])
def test_total_is_the_float64_sum(shape):
    """`total` (float32 row sums added in float64) against torch's float64 sum; NaN and inf propagate."""
    from fwllm.kernels.fisher import total

    g = torch.Generator().manual_seed(len(shape))
    x = torch.rand(shape, generator=g) * 1e3
    assert total(x) == pytest.approx(float(x.double().sum()), rel=1e-6)
    x.view(-1)[3] = float("inf")
    assert total(x) == float("inf")
    x.view(-1)[4] = float("nan")
    assert total(x) != total(x)
