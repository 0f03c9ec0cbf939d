import torch

from fwllm.kernels.local_merges import combine, dare, disjoint_merge, trim


def test_trim_keeps_largest_magnitudes():
    d = torch.tensor([0.1, -3.0, 0.5, 2.0, -0.2])
    assert torch.equal(trim(d, 0.4), torch.tensor([0.0, -3.0, 0.0, 2.0, 0.0]))
    assert torch.equal(trim(d, 1.0), d)


def test_disjoint_merge_hand_computed():
    # column 0: signs +,+,- ; mass = 1+2-4 = -1 -> elected '-', only the third agrees -> -4
    # column 1: +3, -1, 0 -> elected '+', mean of agreeing {3} -> 3
    deltas = torch.tensor([[1.0, 3.0], [2.0, -1.0], [-4.0, 0.0]])
    out = disjoint_merge(deltas, torch.ones(3))
    assert torch.allclose(out, torch.tensor([-4.0, 3.0]))


def test_dare_is_unbiased_and_reproducible():
    d = torch.ones(200_000)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = dare(d, 0.7, g1), dare(d, 0.7, g2)
    assert torch.equal(a, b)
    assert abs(a.mean().item() - 1.0) < 0.02
    assert torch.allclose(torch.unique(a), torch.tensor([0.0, 1 / 0.3]))


def test_single_vector_reductions():
    tau = torch.randn(50)
    assert torch.allclose(combine("task_arithmetic", [tau], [1.0]), tau)
    assert torch.allclose(combine("ties", [tau], [1.0], density=0.2), trim(tau, 0.2))


def test_task_arithmetic_weights():
    a, b = torch.randn(10), torch.randn(10)
    assert torch.allclose(combine("task_arithmetic", [a, b], [0.25, 0.75]), 0.25 * a + 0.75 * b)
