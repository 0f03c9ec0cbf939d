import json

import pytest

from fwllm.data.calibration import CAUSAL, CLASSIFICATION, REGRESSION, UNLABELED, load_calibration
from fwllm.core.errors import FwllmError


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_kinds_and_folder(tmp_path):
    _write(tmp_path / "a.jsonl", [json.dumps({"prompt": "p", "response": "r"})])
    _write(
        tmp_path / "b.jsonl",
        [json.dumps({"sentence": "s", "label": 1}), json.dumps({"sentence": "t", "label": 0})],
    )
    _write(
        tmp_path / "c.jsonl",
        [
            json.dumps({"sentence1": "s", "sentence2": "u", "label": 2.5}),
            json.dumps({"sentence1": "x", "sentence2": "y", "label": 3}),
        ],
    )
    _write(tmp_path / "d.jsonl", [json.dumps({"text": "hello"})])
    tasks = {t.name: t for t in load_calibration(str(tmp_path))}
    assert [tasks[n].kind for n in "abcd"] == [CAUSAL, CLASSIFICATION, REGRESSION, UNLABELED]
    assert tasks["b"].num_labels == 2 and tasks["b"].text_fields == ["sentence"]
    assert tasks["c"].text_fields == ["sentence1", "sentence2"] and tasks["c"].rows[1]["label"] == 3.0


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "b.jsonl:2: not valid JSON"),
        ('{"prompt": "p"}', "b.jsonl:2: causal-LM rows need"),
        ('{"sentence": "s", "label": "x"}', "b.jsonl:2: 'label' must be a number"),
        ("[1, 2]", "b.jsonl:2: expected a JSON object"),
        ('{"foo": 1}', "b.jsonl:2: row has none of"),
        ('{"text": "t"}', "b.jsonl:2: row kind unlabeled differs"),
    ],
)
def test_broken_rows_name_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "b.jsonl", [json.dumps({"prompt": "p", "response": "r"}), bad])
    with pytest.raises(FwllmError, match=message.replace("(", r"\(")):
        load_calibration(str(path))


def test_missing_and_empty(tmp_path):
    with pytest.raises(FwllmError, match="not found"):
        load_calibration(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FwllmError, match="no .jsonl files"):
        load_calibration(str(tmp_path))
    _write(tmp_path / "e.jsonl", [""])
    with pytest.raises(FwllmError, match="no calibration rows"):
        load_calibration(str(tmp_path / "e.jsonl"))


def test_shared_glue_layout_names_tasks_by_folder(tmp_path):
    for task in ("rte", "sst2"):
        (tmp_path / task).mkdir()
        _write(tmp_path / task / "calibration.jsonl", [json.dumps({"sentence": "s", "label": 0})])
        _write(tmp_path / task / "dev.jsonl", [json.dumps({"sentence": "s", "label": 0})])
    assert [t.name for t in load_calibration(str(tmp_path))] == ["rte", "sst2"]
