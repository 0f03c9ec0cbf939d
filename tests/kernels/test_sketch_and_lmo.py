import pytest
import torch

from fwllm.kernels.sketch import CountSketch, alignment
from fwllm.kernels.lmo import choose_top_k, choose_vertex, project_simplex


def test_base_vertex_when_no_candidate_aligns():
    assert choose_vertex(torch.tensor([0.3, 0.0, 2.0])) == -1
    assert choose_vertex(torch.zeros(4)) == -1  # zero gradient: base, no NaN
    assert choose_vertex(torch.tensor([0.3, -0.1, -2.0])) == 2
    assert choose_top_k(torch.tensor([0.3, -0.1, -2.0]), 2) == [2, 1]
    assert choose_top_k(torch.tensor([0.3, 0.1]), 2) == []


def test_small_tensors_are_exact():
    sk = CountSketch(ratio=32, min_buckets=4096)
    x = torch.randn(30, 40)
    assert torch.equal(sk("w", x), x.flatten())


def test_sketch_is_unbiased_and_deterministic():
    torch.manual_seed(0)
    g, t = torch.randn(200_000), torch.randn(200_000)
    t = t + 0.3 * g  # true inner product ~ 0.3 * |g|^2
    truth = torch.dot(g, t).item()
    estimates = []
    for seed in range(20):
        sk = CountSketch(ratio=16, min_buckets=16, seed=seed)
        estimates.append(torch.dot(sk("w", g), sk("w", t)).item())
        assert torch.equal(sk("w", g), CountSketch(ratio=16, min_buckets=16, seed=seed)("w", g))
    mean = sum(estimates) / len(estimates)
    assert abs(mean - truth) / abs(truth) < 0.05


def test_sketch_keeps_the_lmo_choice_when_alignments_differ():
    torch.manual_seed(1)
    g = torch.randn(100_000)
    taus = torch.stack([torch.randn(100_000) - c * g for c in (0.0, 0.05, 0.2)])
    sk = CountSketch(ratio=32, min_buckets=16)
    sketched = torch.stack([sk("w", t) for t in taus])
    assert choose_vertex(alignment(sk("w", g), sketched)) == choose_vertex(taus @ g) == 2


def test_simplex_projection():
    w = project_simplex(torch.tensor([0.2, 0.9, -0.5]))
    assert torch.allclose(w.sum(), torch.tensor(1.0)) and (w >= 0).all()
    assert torch.allclose(w, torch.tensor([0.15, 0.85, 0.0]))
    assert torch.allclose(project_simplex(torch.tensor([0.3, 0.7])), torch.tensor([0.3, 0.7]))


@pytest.mark.parametrize(
    "scores, z, expected",
    [
        ([-10.0, -1.0, 5.0], 2.0, []),  # one candidate certainly below everything: nothing to re-check
        ([-2.0, -1.5, 5.0], 1.0, [0, 1]),  # two overlapping intervals: both re-checked, the third can't win
        ([-0.5, 3.0], 1.0, [0]),  # the best interval crosses 0: it may lose to the base
        ([2.0, 3.0], 1.0, []),  # every candidate certainly worse than the base
    ],
)
def test_contenders_by_hand(scores, z, expected):
    from fwllm.kernels.sketch import contenders

    assert contenders(torch.tensor(scores), torch.ones(len(scores)), z) == expected


def test_rescoring_recovers_the_exact_vertex_where_the_sketch_errs():
    from fwllm.kernels.sketch import rescored, sketch_error

    torch.manual_seed(0)
    sk, n, numel = CountSketch(32), 6, 2 * 65536
    plain_wrong = checked_wrong = reads = 0
    for trial in range(12):
        g = torch.randn(numel)
        # near-tied alignments: the gaps (~2.6) are far below the sketch's error (~2000)
        taus = torch.randn(n, numel) - 0.002 * g * (1 + 0.01 * torch.randperm(n).float())[:, None]
        exact = taus @ g
        name = f"w{trial}"
        approx = torch.stack([torch.dot(sk(name, g), sk(name, t)) for t in taus])
        sigma = sketch_error(float(g.norm()), taus.norm(dim=1), sk.buckets(numel))
        fixed, checked = rescored(approx, sigma, 3.0, lambda i: float(exact[i]))
        reads += len(checked)
        plain_wrong += int(choose_vertex(approx) != choose_vertex(exact))
        checked_wrong += int(choose_vertex(fixed) != choose_vertex(exact))
    assert plain_wrong > 0 and checked_wrong == 0 and reads > 0
    # a clear winner costs no exact read
    g = torch.randn(numel)
    taus = torch.stack([-g, torch.randn(numel)])
    approx = torch.stack([torch.dot(sk("c", g), sk("c", t)) for t in taus])
    _, checked = rescored(
        approx,
        sketch_error(float(g.norm()), taus.norm(dim=1), sk.buckets(numel)),
        3.0,
        lambda i: float(taus[i] @ g),
    )
    assert checked == []
