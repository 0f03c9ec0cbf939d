"""The merge matrix (eval/compare.py): merge methods x pool sizes of the tiny LLaMA pool,
each cell checked against a hand-computed merge."""

import json

import pytest
import torch

from conftest import load_tensors

from fwbench.matrix import MatrixSettings, run_matrix, summarize
from fwllm.core.errors import FwllmError
from fwllm.demo.recipes import FALLBACK_TASK, PoolSettings
from fwllm.experts import build_pool

TINY = PoolSettings(iterations=3, step_size=0.5, max_rows=8, max_length=64, batch_size=8, dtype="float32")


@pytest.fixture(scope="module")
def pool(tiny_pools_root):
    return build_pool("tiny", "llama", root=tiny_pools_root, progress=False)


def test_matrix_cells_are_the_merges_they_claim(pool, tmp_path):
    """TA@n = base + lambda * sum of the first n task vectors and average@n = the mean of the
    first n experts, computed here by hand; FW-Merging beats TA on the held-in dev loss once
    irrelevant experts join (the pool is built so that they conflict)."""
    s = MatrixSettings(
        methods=("average", "task_arithmetic", "fw_hard"), sizes=(2, 7), suites="", dev_rows=8, merge=TINY
    )
    report = run_matrix(pool, str(tmp_path / "m"), s, progress=False)
    cells = {c["label"]: c for c in report["cells"]}
    assert set(cells) == {f"{m}@{n}" for m in s.methods for n in s.sizes}
    relevant_first = [e for e in pool.experts if e.relevant] + [e for e in pool.experts if not e.relevant]
    base = load_tensors(pool.base)
    experts = [load_tensors(e.path) for e in relevant_first[:2]]
    ta = load_tensors(cells["task_arithmetic@2"]["path"])
    avg = load_tensors(cells["average@2"]["path"])
    for name, b in base.items():
        want = b + TINY.scaling * sum(e[name] - b for e in experts)
        torch.testing.assert_close(ta[name], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(avg[name], sum(e[name] for e in experts) / 2, rtol=1e-5, atol=1e-6)
    assert cells["fw_hard@7"]["n_irrelevant"] == 3 and cells["fw_hard@2"]["held_in"] == ["copy", "rev"]
    summary = {r["label"]: r for r in report["summary"]}
    assert summary["fw_hard@7"]["mean_dev_loss"] < summary["task_arithmetic@7"]["mean_dev_loss"]
    out = tmp_path / "m"
    saved = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in saved["summary"]] == [r["label"] for r in report["summary"]]
    assert (out / "vs_candidates.png").stat().st_size > 0 and "| 7 (3 irrelevant) | fw_hard |" in (
        out / "report.md"
    ).read_text()
    mix = (out / "pool7" / "calibration_per_model" / f"{FALLBACK_TASK}.jsonl").read_text().splitlines()
    assert len(mix) == 4 * len((out / "pool7" / "calibration" / "copy.jsonl").read_text().splitlines())


def test_matrix_rejects_bad_sizes_and_methods(pool, tmp_path):
    with pytest.raises(FwllmError, match="pool sizes"):
        run_matrix(
            pool, str(tmp_path), MatrixSettings(methods=("ties",), sizes=(99,), suites=""), progress=False
        )
    with pytest.raises(FwllmError, match="unknown method"):
        run_matrix(
            pool, str(tmp_path), MatrixSettings(methods=("magic",), sizes=(2,), suites=""), progress=False
        )


def test_summary_normalizes_held_in_by_each_tasks_expert():
    cells = [
        {
            "label": "ta@2",
            "method": "ta",
            "n_candidates": 2,
            "n_irrelevant": 0,
            "held_in": ["pubmedqa", "sst2"],
            "dev_loss": {"pubmedqa": 1.0, "sst2": 3.0},
        }
    ]
    scores = {
        "ta@2": {
            "fwllm_pubmedqa": 30.0,
            "fwllm_glue_sst2": 80.0,
            "fwllm_glue_rte": 50.0,
            "fwllm_glue_cola": 10.0,
        },
        "expert:pubmedqa": {"fwllm_pubmedqa": 60.0},
        "expert:sst2": {"fwllm_glue_sst2": 100.0},
    }
    experts = {"pubmedqa": "expert:pubmedqa", "sst2": "expert:sst2"}
    row = summarize(cells, scores, experts, ["fwllm_glue_rte", "fwllm_glue_cola"])[0]
    assert row["mean_dev_loss"] == 2.0
    assert row["held_in_normalized"] == pytest.approx((50.0 + 80.0) / 2)
    assert row["held_out_mean"] == 30.0
