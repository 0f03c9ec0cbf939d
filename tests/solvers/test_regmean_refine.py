"""`local_merge: regmean`: RegMean's closed form over the support FW chose, weighted by FW."""

import pytest
import torch
from safetensors.torch import save_file

from fwllm.core.errors import FwllmError
from fwllm.io.stats_store import read_stat
from fwllm.solvers.regmean_refine import refine


def fit(x, y):
    return torch.linalg.lstsq(x, y).solution.T  # [out, in], torch's Linear layout


def gram_file(tmp_path, i, name, x):
    """Candidate i's Gram of weight `name`, as the statistics cache stores it (one safetensors file)."""
    path = tmp_path / f"g{i}.safetensors"
    save_file({name: (x.T @ x).float().contiguous()}, str(path))
    return str(path)


def gram_of(files):
    """What the method hands `refine`: (candidate, weight) -> that Gram, None where there is none."""
    return lambda i, name: read_stat(files[i], name) if i in files else None


def test_two_experts_on_disjoint_data_merge_to_the_joint_least_squares_fit(tmp_path):
    g = torch.Generator().manual_seed(0)
    x1, x2 = (
        torch.randn(40, 5, generator=g, dtype=torch.float64),
        torch.randn(60, 5, generator=g, dtype=torch.float64),
    )
    y1 = x1 @ torch.randn(5, 3, generator=g, dtype=torch.float64)
    y2 = x2 @ torch.randn(5, 3, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        60, 3, generator=g, dtype=torch.float64
    )
    w1, w2 = fit(x1, y1).float(), fit(x2, y2).float()
    name = "layer.weight"
    files = {0: gram_file(tmp_path, 0, name, x1), 1: gram_file(tmp_path, 1, name, x2)}
    base = torch.zeros(3, 5)  # theta_0 = 0: the task vectors are the experts themselves
    taus = [w1, w2]
    ((out_name, merged),) = refine(
        [(name, torch.full((3, 5), 9.0))],
        {name: [0.5, 0.5]},
        gram_of(files),
        lambda n: lambda i: taus[i].clone(),
        lambda n: base.clone(),
        alpha=1.0,
    )
    joint = fit(torch.cat([x1, x2]), torch.cat([y1, y2]))
    assert out_name == name
    assert torch.allclose(merged.double(), joint, atol=1e-4)


def test_equal_grams_give_back_fws_own_task_arithmetic_merge(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=g)
    name = "w"
    files = {i: gram_file(tmp_path, i, name, x) for i in range(3)}
    taus = [torch.randn(2, 4, generator=g) for _ in range(3)]
    base = torch.randn(2, 4, generator=g)
    coef = [0.2, 0.0, 0.7]  # candidate 1 unused: it must play no part
    fw_value = base + sum(c * t for c, t in zip(coef, taus))
    ((_, merged),) = refine(
        [(name, fw_value)],
        {name: coef},
        gram_of(files),
        lambda n: lambda i: taus[i].clone(),
        lambda n: base.clone(),
        alpha=0.9,
    )
    assert torch.allclose(merged, fw_value, atol=1e-5)


def test_what_is_not_a_used_linear_weight_keeps_fws_merge(tmp_path):
    x = torch.randn(10, 3)
    files = {0: gram_file(tmp_path, 0, "lin.weight", x)}
    values = [
        ("norm.weight", torch.ones(3)),
        ("lin.weight", torch.ones(2, 3)),
        ("other.weight", torch.ones(2, 3)),
    ]
    coefficients = {
        "norm.weight": [1.0],
        "lin.weight": [0.0],
        "other.weight": [1.0],
    }  # lin unused; other: no Gram
    out = list(
        refine(
            values,
            coefficients,
            gram_of(files),
            lambda n: lambda i: torch.zeros(2, 3),
            lambda n: torch.zeros(2, 3),
            alpha=0.9,
        )
    )
    assert all(torch.equal(a[1], b[1]) for a, b in zip(out, values))
    with pytest.raises(FwllmError, match="coefficients >= 0"):
        list(
            refine(
                [("lin.weight", torch.ones(2, 3))],
                {"lin.weight": [-0.1]},
                gram_of(files),
                lambda n: lambda i: torch.zeros(2, 3),
                lambda n: torch.zeros(2, 3),
                alpha=0.9,
            )
        )


def test_uniform_weights_fit_the_supports_data_jointly_whatever_fws_coefficients(tmp_path):
    # weights: uniform keeps only FW's support: experts 0 and 2 fitted on disjoint data merge to
    # the least-squares fit of their data together, however unevenly FW weighed them, and the
    # expert FW left out (1) plays no part
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (30, 25, 50)]
    ys = [x @ torch.randn(4, 2, generator=g, dtype=torch.float64) for x in xs]
    taus = [fit(x, y).float() for x, y in zip(xs, ys)]
    name = "layer.weight"
    files = {i: gram_file(tmp_path, i, name, x) for i, x in enumerate(xs)}
    ((_, merged),) = refine(
        [(name, torch.zeros(2, 4))],
        {name: [0.1, 0.0, 0.6]},
        gram_of(files),
        lambda n: lambda i: taus[i].clone(),
        lambda n: torch.zeros(2, 4),
        alpha=1.0,
        weights="uniform",
    )
    joint = fit(torch.cat([xs[0], xs[2]]), torch.cat([ys[0], ys[2]]))
    assert torch.allclose(merged.double(), joint, atol=1e-4)
