"""trace.png: the shares of blocks per vertex, by hand, and the file FW writes."""

import json

import pytest

from fwllm.io.trace_plot import plot_trace, short_label, vertex_shares

TRACE = [
    {"iteration": 0, "objective": 2.0, "chosen": {"a": [0], "b": [1], "c": [], "d": [0]}},
    {"iteration": 1, "objective": 1.5, "chosen": {"a": [0, 1], "b": [1], "c": [1], "d": []}},
]


def test_vertex_shares_by_hand():
    shares = vertex_shares(TRACE, ["x", "y"])
    assert shares["base"] == [0.25, 0.25]
    assert shares["x"] == [0.5, 0.125]  # soft step over two vertices: half a block each
    assert shares["y"] == [0.25, 0.625]
    for t in range(2):
        assert sum(s[t] for s in shares.values()) == pytest.approx(1.0)


def test_short_labels():
    assert short_label("/pools/experts/code/") == "code"
    assert short_label("meta-llama/Llama-2-7b-hf+arnavgrg/codealpaca-qlora") == "codealpaca-qlora"


def test_plot_is_a_png(tmp_path):
    path = plot_trace(TRACE, ["x", "y"], str(tmp_path / "t.png"), selected=2, final_objective=1.2)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_fw_merge_writes_its_trace_plot(tmp_path, tiny_pool):
    from conftest import fw_params, merge

    e = tiny_pool["experts"]
    out = merge(
        tmp_path, "plot", "fw_merging", tiny_pool, [e["copy"], e["rev"]], fw_params(tiny_pool, iterations=2)
    )
    plan = out / "fwllm_plan"
    assert (plan / "trace.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((plan / "trace.json").read_text())["trace"]) == 2
