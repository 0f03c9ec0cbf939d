import torch

from fwllm.oracle import CountSketch, alignment, choose_top_k, choose_vertex, project_simplex


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
