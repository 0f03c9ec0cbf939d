import pytest
import torch
from mergekit.merge_methods import registry as mk_registry
from mergekit.merge_methods.base import TensorGroup
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

from fwllm.kernels.local_merges import combine_local, dare, disjoint_merge, localize, trim


def combine(method, deltas, weights, density=1.0, drop_rate=0.0, generators=None):
    """What fwllm.kernels.atoms does with an atom's members: each task vector is localized (with its
    own DARE generator), then
    task_arithmetic: sum_j w_j tau_j;  ties: disjoint_merge(trim(tau_j), w);
    dare_linear: sum_j w_j dare(tau_j);  dare_ties: disjoint_merge(dare(tau_j), w)."""
    gens = iter(generators) if generators is not None else None
    local = (
        localize(method, d, density, drop_rate, next(gens) if gens is not None else None) for d in deltas
    )
    return combine_local(method, local, weights)


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


# -- against mergekit's own TIES / DARE (imported and called, not copied) ----------------------
# Design differences, by choice (fwllm's kernels only build FW-Merging's vertices; `fwllm merge`
# with merge_method ties / dare_* runs mergekit itself):
# * trim keeps k = round(density * n) entries, and every entry tied with the k-th magnitude;
#   mergekit keeps exactly max(1, floor(density * n)), ties broken by argsort order.
# * dare rescales survivors by 1 / (1 - p), the DARE paper's unbiased factor; mergekit's
#   `rescale` matches the l1 norm of the whole tensor instead (equal in expectation).
# * the TIES combine is always the normalised (weighted-mean) disjoint merge; mergekit divides
#   only with `normalize: true` (the default for ties, not for dare_ties).
SHAPE = (8, 16)  # 128 entries: density 0.25 keeps 32 under either rounding


def tie_free(seed, shape=SHAPE):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    assert t.abs().unique().numel() == t.numel()
    return t


def mergekit_merge(method, base, taus, weights, density, normalize, rescale=False, lam=1.0):
    """mergekit's `method` over theta_i = base + tau_i (one density for all), minus the base."""
    group = TensorGroup.from_tensors([base, *(base + t for t in taus)], base_index=0)
    ids = [e.id for e in group.non_base]
    merged = mk_registry.get(method).merge_group(
        group,
        weight=dict(zip(ids, weights)),
        density={i: density for i in ids},
        normalize=normalize,
        rescale=rescale,
        int8_mask=False,
        **{"lambda": lam},
    )
    return merged - base


def fixed_masks(monkeypatch, masks):
    """Make mergekit's random sparsification draw these keep masks, in order."""
    it = iter(masks)
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: next(it).to(p.dtype))


def fwllm_dare_masks(shape, drop_rate, seeds):
    # fwllm's DARE keeps an entry where its generator's uniform draw is >= p (dare's docstring);
    # drawing the same uniforms here gives the masks its seeded generators will use
    return [torch.rand(shape, generator=torch.Generator().manual_seed(s)) >= drop_rate for s in seeds]


@pytest.mark.parametrize("shape, density", [((8, 16), 0.25), ((8, 16), 0.125), ((37,), 0.2), ((5, 7), 0.6)])
def test_trim_is_mergekit_magnitude_sparsification(shape, density):
    tau = tie_free(1, shape)
    n = tau.numel()
    assert round(density * n) == int(density * n) >= 1  # cases where the two roundings agree
    expected = sparsify(tau, density=density, method=SparsificationMethod.magnitude)
    assert torch.equal(trim(tau, density), expected)
    assert torch.equal(localize("ties", tau, density=density), expected)


def test_trim_differs_from_mergekit_only_at_its_documented_edges():
    # ties at the cut-off: fwllm keeps every entry >= the k-th magnitude, mergekit exactly k
    tied = torch.tensor([3.0, -3.0, 1.0, 2.0])
    assert torch.equal(trim(tied, 0.25), torch.tensor([3.0, -3.0, 0.0, 0.0]))
    assert (sparsify(tied, density=0.25, method=SparsificationMethod.magnitude) != 0).sum() == 1
    # rounding: 0.36 * 10 = 3.6 keeps 4 here, 3 in mergekit; 0.01 * 10 keeps none here, 1 there
    tau = tie_free(2, (10,))
    assert (trim(tau, 0.36) != 0).sum() == 4
    assert (sparsify(tau, density=0.36, method=SparsificationMethod.magnitude) != 0).sum() == 3
    assert (trim(tau, 0.01) != 0).sum() == 0
    assert (sparsify(tau, density=0.01, method=SparsificationMethod.magnitude) != 0).sum() == 1


@pytest.mark.parametrize("density", [1.0, 0.25])
def test_ties_combine_is_mergekit_ties_with_normalize(density):
    base, taus = tie_free(10), [tie_free(11 + i) for i in range(3)]
    weights = [0.5, 1.0, 0.3]
    if density == 1.0:
        # a column where the weighted sum is exactly zero: both elect '+' (zeros count as positive)
        taus[0][0, 0], taus[1][0, 0], taus[2][0, 0] = 1.0, -0.5, 0.0
    ours = combine("ties", taus, weights, density=density)
    theirs = mergekit_merge("ties", base, taus, weights, density, normalize=True)
    assert torch.allclose(ours, theirs, atol=1e-6)
    # not vacuous: the election drops entries, so this is neither a plain nor a masked mean
    trimmed = torch.stack([trim(t, density) for t in taus])
    elected = torch.sign((trimmed * torch.tensor(weights).view(-1, 1, 1)).sum(0))
    assert ((trimmed != 0) & (torch.sign(trimmed) != elected)).any()


def test_ties_with_lambda_is_mergekit_ties_lambda():
    base, taus = tie_free(20), [tie_free(21), tie_free(22)]
    ours = 0.7 * combine("ties", taus, [1.0, 2.0], density=0.25)
    theirs = mergekit_merge("ties", base, taus, [1.0, 2.0], 0.25, normalize=True, lam=0.7)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_dare_is_mergekit_random_sparsification_with_the_same_mask(monkeypatch):
    tau, p = tie_free(30), 0.6
    (keep,) = fwllm_dare_masks(tau.shape, p, [7])
    ours = dare(tau, p, torch.Generator().manual_seed(7))
    fixed_masks(monkeypatch, [keep])
    masked = sparsify(tau, density=1 - p, method=SparsificationMethod.random)  # mergekit, no rescale
    assert torch.equal(masked != 0, keep) and keep.any() and not keep.all()
    assert torch.allclose(ours, masked / (1 - p))
    # mergekit's `rescale` matches the l1 norm instead of dividing by 1 - p
    fixed_masks(monkeypatch, [keep])
    l1 = sparsify(tau, density=1 - p, method=SparsificationMethod.random, rescale_norm=RescaleNorm.l1)
    assert torch.allclose(l1, masked * tau.abs().sum() / masked.abs().sum())


def test_dare_rescale_agrees_with_mergekit_l1_rescale_in_expectation():
    tau, p = torch.randn(400, 500, generator=torch.Generator().manual_seed(31)), 0.7
    ours = dare(tau, p, torch.Generator().manual_seed(1))
    kept = tau * (ours != 0)
    l1_factor = tau.abs().sum() / kept.abs().sum()  # what mergekit's rescale would multiply by
    assert abs(float(l1_factor) * (1 - p) - 1.0) < 0.02


@pytest.mark.parametrize("method, normalize", [("dare_ties", True), ("dare_linear", False)])
def test_dare_combines_are_mergekit_dare_with_the_same_masks(monkeypatch, method, normalize):
    base, taus, p = tie_free(40), [tie_free(41), tie_free(42), tie_free(43)], 0.5
    weights, seeds = [0.4, 1.0, 0.7], [5, 6, 8]
    ours = combine(
        method, taus, weights, drop_rate=p, generators=[torch.Generator().manual_seed(s) for s in seeds]
    )
    fixed_masks(monkeypatch, fwllm_dare_masks(base.shape, p, seeds))
    theirs = mergekit_merge(method, base, taus, weights, 1 - p, normalize=normalize)
    # both are linear in the survivors, so fwllm's 1 / (1 - p) factors out of the merge
    assert torch.allclose(ours, theirs / (1 - p), atol=1e-5)
