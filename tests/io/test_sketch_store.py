import os

import numpy as np
import pytest
import torch

from fwllm.io.sketch_store import SketchStore


def test_rows_on_disk_come_back_equal_and_writing_a_read_leaves_the_file_alone(tmp_path):
    rows = torch.randn(3, 1000)
    store = SketchStore(str(tmp_path / "sk"))
    store["layer.w"] = rows
    first = store["layer.w"]
    assert torch.equal(first, rows) and store.width("layer.w") == 1000
    first.zero_()  # a private copy: a shared map would write the zeros through to the file
    assert torch.equal(store["layer.w"], rows)
    assert store.bytes_read == 2 * rows.numel() * 4
    assert os.path.getsize(next((tmp_path / "sk").iterdir())) == rows.numel() * 4


def test_rows_in_ram_are_kept_as_given_and_an_all_exact_block_has_width_zero():
    store = SketchStore()
    rows = torch.randn(2, 7)
    store["a"] = rows
    store["b"] = torch.zeros(2, 0)
    assert torch.equal(store["a"], rows) and store.width("b") == 0 and "a" in store and store.bytes_read == 0


def test_a_truncated_sketch_file_is_an_error_not_a_short_score(tmp_path):
    store = SketchStore(str(tmp_path / "sk"))
    store["w"] = torch.ones(2, 50)
    path = next((tmp_path / "sk").iterdir())
    np.ones(10, dtype=np.float32).tofile(path)
    with pytest.raises(OSError, match="truncated"):
        store["w"]
