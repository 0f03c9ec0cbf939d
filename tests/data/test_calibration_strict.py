"""Broken calibration files, one case at a time: each names its file and line (the reader's
contract), whatever the breakage: bytes, size, JSON, types, empty strings, labels."""

import json

import pytest

from fwllm.core.errors import FwllmError
from fwllm.data.calibration import (
    CLASSIFICATION,
    MAX_ROW_BYTES,
    REGRESSION,
    calibration_files,
    check_labels,
    load_calibration,
    read_task,
)

GOOD = json.dumps({"prompt": "copy : 1 =", "response": "1"})


def write(path, *lines, raw=b""):
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines) + raw)
    return path


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"prompt": "a", "response": "\x80b"}', r"c.jsonl:2: not UTF-8 text \(byte 0x80 at column 30\)"),
        (b"\x89PNG\r\n\x1a\n", r"c.jsonl:2: not UTF-8 text \(byte 0x89 at column 1\)"),
        (
            '{"prompt": "a", "response": "b", "prompt": "c"}',
            r"c.jsonl:2: key 'prompt' appears twice in one row",
        ),
        ('{"prompt": "a", "response": ""}', r"c.jsonl:2: 'response' is empty"),
        ('{"prompt": "a", "response": "  "}', r"c.jsonl:2: 'response' is empty"),
        ('{"prompt": "a"}', r"c.jsonl:2: causal-LM rows need string 'prompt' and 'response'"),
        ('{"prompt": "a", "response": 3}', r"c.jsonl:2: causal-LM rows need"),
        ('{"prompt": "a", "resp', r"c.jsonl:2: not valid JSON"),
        ("[" * 100000 + "]" * 100000, r"c.jsonl:2: not valid JSON \(nested too deeply\)"),
        ('{"prompt": "a", "response": "b", "n": ' + "9" * 5000 + "}", r"c.jsonl:2: not valid JSON \(Exceeds"),
    ],
)
def test_broken_causal_rows(tmp_path, line, message):
    path = write(tmp_path / "c.jsonl", GOOD, line)
    with pytest.raises(FwllmError, match=message):
        read_task(str(path))


def test_a_huge_row_is_refused_without_reading_it_whole(tmp_path):
    path = write(
        tmp_path / "c.jsonl", GOOD, json.dumps({"prompt": "a", "response": "b" * (MAX_ROW_BYTES + 10)})
    )
    with pytest.raises(FwllmError, match=r"c.jsonl:2: the row is longer than 1 MiB"):
        read_task(str(path))
    binary = write(tmp_path / "b.jsonl", raw=bytes(range(256)) * 10000)  # no newline, not text
    with pytest.raises(FwllmError, match=r"b.jsonl:1: "):
        read_task(str(binary))


def test_a_byte_order_mark_is_not_a_broken_row(tmp_path):
    path = write(tmp_path / "c.jsonl", b"\xef\xbb\xbf" + GOOD.encode(), GOOD)
    assert len(read_task(str(path)).rows) == 2


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"sentence": "a", "label": 0}, {"sentence": "", "label": 1}],
            r"l.jsonl:2: 'sentence' must be a non-empty",
        ),
        (
            [{"sentence": "a", "label": 0}, {"question": "b", "label": 1}],
            r"l.jsonl:2: 'sentence' must be a non-empty",
        ),
        (
            [
                {"sentence1": "a", "sentence2": "b", "label": 0},
                {"sentence1": "c", "sentence2": 4, "label": 1},
            ],
            r"l.jsonl:2: 'sentence2' must be a non-empty string",
        ),
        ([{"text": ""}], r"l.jsonl:1: 'text' is empty"),
        (
            [{"sentence": "a", "label": 0}, {"sentence": "b", "label": -1}],
            r"l.jsonl:2: classification labels must be >= 0",
        ),
        ([{"sentence": "a", "label": True}], r"l.jsonl:1: 'label' must be a number"),
    ],
)
def test_broken_labelled_rows(tmp_path, rows, message):
    path = write(tmp_path / "l.jsonl", *map(json.dumps, rows))
    with pytest.raises(FwllmError, match=message):
        read_task(str(path))


def test_labels_against_the_head_that_scores_them(tmp_path):
    ints = read_task(
        str(write(tmp_path / "i.jsonl", *(json.dumps({"sentence": "s", "label": k}) for k in (0, 2, 1))))
    )
    assert ints.kind == CLASSIFICATION and ints.lines == [1, 2, 3]
    check_labels(ints, 3, "expert")  # 0..2 fit a 3-class head
    with pytest.raises(
        FwllmError, match=r"i.jsonl:2: label 2 is out of range: expert is a 2-class classifier"
    ):
        check_labels(ints, 2, "expert")
    with pytest.raises(
        FwllmError, match=r"i.jsonl: task 'i' has integer labels, but expert has a one-output"
    ):
        check_labels(ints, 1, "expert")

    rows = (json.dumps({"sentence": "s", "label": k}) for k in (0, 1, 1.5))
    mixed = read_task(str(write(tmp_path / "f.jsonl", *rows)))
    assert mixed.kind == REGRESSION  # what the file alone says
    with pytest.raises(FwllmError, match=r"f.jsonl:3: label 1.5 is not an integer, but expert is a 3-class"):
        check_labels(mixed, 3, "expert")
    check_labels(mixed, 1, "sts-b expert")  # a regression head takes any number


def test_calibration_files_are_what_the_loader_reads(tmp_path):
    write(tmp_path / "a.jsonl", GOOD)
    write(tmp_path / "b.jsonl", GOOD)
    (tmp_path / "notes.txt").write_text("not a task")
    assert calibration_files(str(tmp_path)) == [
        ("a", str(tmp_path / "a.jsonl")),
        ("b", str(tmp_path / "b.jsonl")),
    ]
    assert [(t.name, t.source) for t in load_calibration(str(tmp_path))] == calibration_files(str(tmp_path))
