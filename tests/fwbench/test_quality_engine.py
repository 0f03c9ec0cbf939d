"""The quality benchmark's engine and report (eval/fwbench/quality_engine.py, quality_report.py) on
the tiny LLaMA pool: what it adds to the demo's engine, checked against independent truth: the best
single expert against calibration losses computed by hand, tuned TIES against its own grid, held-out
rows against the calibration rows, and paired differences by hand."""

import json

import numpy as np
import pytest
import torch

from fwbench.quality_engine import BenchSettings, QualityBenchmark, run_quality
from fwbench.quality_report import differences
from fwllm.core.errors import FwllmError
from fwllm.demo.dev_rows import DevBudget, DevTask
from fwllm.demo.recipes import PoolSettings
from fwllm.evaluation import figures as q
from fwllm.experts import build_pool

TINY = PoolSettings(step_size=0.5, max_rows=8, max_length=64, batch_size=8, dtype="float32")


@pytest.fixture(scope="module")
def pool(tiny_pools_root):
    return build_pool("tiny", "llama", root=tiny_pools_root, progress=False)


def settings(**kw):
    return BenchSettings(
        budget=DevBudget(rows={"copy": 16, "rev": 16, "sort": 16, "inc": 16}),
        merge=TINY,
        fw={"preset": "paper", "iterations": 3},
        ties_scales=(0.5, 1.0),
        ties_densities=(0.2, 0.5),
        resamples=200,
        **kw,
    )


def calibration_prompts(pool):
    prompts = set()
    for t in pool.tasks.values():
        with open(t.calibration) as fp:
            prompts |= {json.loads(line)["prompt"] for line in fp if line.strip()}
    return prompts


def held_out_task(pool):
    """Multiple-choice rows in the pool's vocabulary that no calibration row shares."""
    rows = [
        {
            "prompt": f"sort : {a} {b} =",
            "choices": [f" {min(a, b)} {max(a, b)}", f" {max(a, b)} {min(a, b)}"],
            "gold": 0,
        }
        for a in range(1, 9)
        for b in range(a + 1, 10, 3)
    ]
    seen = calibration_prompts(pool)
    rows = [r for r in rows if r["prompt"] not in seen]
    assert len(rows) >= 10
    return DevTask("sort_pairs", q.ACCURACY, rows, False, "hand-made", len(rows))


def hand_loss(model, tok, path, max_rows):
    """Token-mean CE of response + eos over a calibration file's first rows, one plain forward per row."""
    with open(path) as fp:
        rows = [json.loads(line) for line in fp if line.strip()][:max_rows]
    total, count = 0.0, 0
    for r in rows:
        prompt = tok(r["prompt"])["input_ids"]
        resp = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + resp])).logits[0].double(), -1)
        total -= float(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(resp)))
        count += len(resp)
    return total / count


def test_benchmark_adds_best_expert_ties_and_held_out_to_the_demo_engine(pool, tmp_path):
    from fwllm.io.models import load_model, load_tokenizer

    held = held_out_task(pool)
    report = run_quality(
        pool,
        str(tmp_path / "out"),
        settings(sizes=(4, 7), methods=("ties", "fw_hard")),
        lambda *_: None,
        str(tmp_path / "work"),
        [held],
    )
    labels = [r["label"] for r in report["summary"]]
    assert labels == [f"{m}@{n}" for n in (4, 7) for m in ("base", "best_expert", "ties", "fw_hard")]
    cells = {c["label"]: c for c in report["cells"]}

    # the best single expert of the 4 relevant ones: the lowest mean calibration loss, computed by hand
    tok = load_tokenizer(pool.base)
    relevant = [e for e in pool.experts if e.relevant]
    hand = {
        e.name: np.mean(
            [
                hand_loss(load_model(e.path).eval(), tok, pool.tasks[t].calibration, 8)
                for t in ("copy", "rev", "sort", "inc")
            ]
        )
        for e in relevant
    }
    info = cells["best_expert@4"]["info"]
    assert info["calibration_losses"] == pytest.approx(hand, rel=1e-4)
    assert info["expert"] == min(hand, key=hand.get)

    # tuned TIES searched the benchmark's grid and kept its lowest point
    ties = cells["ties@7"]["info"]
    grid = {(float(d), float(lam)): v for d, g in ties["grid"].items() for lam, v in g.items()}
    assert set(grid) == {(d, lam) for d in (0.2, 0.5) for lam in (0.5, 1.0)}
    assert (ties["density"], ties["lambda"]) == min(grid, key=grid.get)

    # held-out rows are scored for every model; the base's paired difference to itself is exactly zero
    base_row = report["summary"][0]
    assert set(base_row["held_out_task"]) == {"sort_pairs"}
    assert base_row["held_out_vs_base"] == {"point": 0.0, "lo": 0.0, "hi": 0.0}
    assert "sort_pairs" in {t["name"] for t in report["tasks"]}

    # the long report: held-out columns, paired differences (with drift from N = 4 to 7), the plot
    assert "| held-out acc. % | held-out vs base |" in report["table"]
    kinds = {(d["kind"], d["a"], d["b"]) for d in report["differences"]}
    assert ("vs", "fw_hard@7", "ties@7") in kinds and ("drift", "ties@7", "ties@4") in kinds
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Paired differences" in md and "best single expert" in md
    assert (tmp_path / "out" / "vs_candidates.png").is_file()


def test_held_out_rows_that_are_calibration_rows_are_refused(pool, tmp_path):
    """The demo engine's calibration check covers the benchmark's held-out tasks too."""
    with open(pool.tasks["copy"].calibration) as fp:
        leaked = json.loads(fp.readline())
    row = {"prompt": leaked["prompt"], "choices": [" 1", " 2"], "gold": 0}
    bad = DevTask("leak", q.ACCURACY, [row], False)
    with pytest.raises(FwllmError, match="also calibration rows"):
        QualityBenchmark(pool, str(tmp_path), settings(sizes=(4,)), held_out=[bad])


def fig(samples):
    samples = np.asarray(samples, dtype=float)
    return q.Figure(float(samples[0]), float(samples.min()), float(samples.max()), samples)


def test_paired_differences_by_hand():
    """FW against every other method of the same pool, and each method's drift from the largest
    all-relevant pool (4) to the largest pool (8); a method missing at one size has no drift."""

    def row(method, n, samples):
        return {
            "label": f"{method}@{n}",
            "method": method,
            "n": n,
            "n_irrelevant": max(0, n - 4),
            "held_in": ["a", "b"],
            "held_in_normalized": fig(samples),
        }

    rows = [
        row("ties", 2, [1, 2, 3]),
        row("fw_hard", 2, [5, 5, 5]),
        row("ties", 4, [10, 20, 30]),
        row("fw_hard", 4, [40, 40, 41]),
        row("ties", 8, [7, 8, 9]),
        row("fw_hard", 8, [50, 60, 70]),
        row("regmean", 8, [0, 0, 0]),
    ]
    got = {(d["kind"], d["a"], d["b"]): d["figure"].samples.tolist() for d in differences(rows)}
    assert got == {
        ("vs", "fw_hard@2", "ties@2"): [4, 3, 2],
        ("vs", "fw_hard@4", "ties@4"): [30, 20, 11],
        ("vs", "fw_hard@8", "ties@8"): [43, 52, 61],
        ("vs", "fw_hard@8", "regmean@8"): [50, 60, 70],
        ("drift", "fw_hard@8", "fw_hard@4"): [10, 20, 29],
        ("drift", "ties@8", "ties@4"): [-3, -12, -21],
    }
