"""FileSpill: the copy is exact, its pages are mapped from a file (not anonymous memory), and no file
is left in the folder."""

import os

import torch

from fwllm.io.spill import FileSpill


def _mapped_from(folder: str) -> list:
    with open("/proc/self/maps") as fp:
        return [line for line in fp if str(folder) in line]


def test_spilled_tensor_is_an_exact_file_backed_copy_and_leaves_no_file(tmp_path):
    spill = FileSpill(str(tmp_path / "scratch"))
    x = torch.randn(64, 1024, dtype=torch.float32)
    y = spill(x)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()
    maps = _mapped_from(tmp_path / "scratch")
    assert maps and all("(deleted)" in line for line in maps)  # mapped, its name already unlinked
    assert os.listdir(tmp_path / "scratch") == []
    x.zero_()
    assert y.abs().sum() > 0  # a copy, not a view of x
    del y
    assert not _mapped_from(tmp_path / "scratch")  # freed with the tensor: the disk is given back


def test_empty_and_bfloat16_tensors(tmp_path):
    spill = FileSpill(str(tmp_path / "s"))
    empty = torch.zeros(0, 8)
    assert spill(empty) is empty
    b = torch.randn(3, 5).bfloat16()
    assert torch.equal(spill(b), b) and spill(b).dtype == torch.bfloat16
