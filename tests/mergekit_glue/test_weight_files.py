"""`fwllm merge` reads only whole safetensors files inside the folders a recipe names.

Each case is a tiny pool with one folder spoiled as the red team did: pickle weights only
(read by mergekit's `ties` before), a shard index naming another model's file, a truncated
shard. Each must end in one `Error:` line, before any output exists; the unspoiled pool merges.
"""

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from conftest import fwllm_merge, one_error_line, write_recipe

TIES = {"density": 0.5, "weight": 0.5}


fwllm = fwllm_merge


def pool(tiny_pool, tmp_path):
    for name, src in (
        ("base", tiny_pool["base"]),
        ("a", tiny_pool["experts"]["copy"]),
        ("b", tiny_pool["experts"]["rev"]),
    ):
        shutil.copytree(src, tmp_path / name)
    return tmp_path


def ties_recipe(root):
    return write_recipe(
        root / "ties.yml",
        "ties",
        root / "base",
        [root / "a", root / "b"],
        {"normalize": True},
        per_model=[TIES, TIES],
    )


def test_pickle_only_weights_are_refused_unless_allowed(tiny_pool, tmp_path):
    root = pool(tiny_pool, tmp_path)
    tensors = load_file(str(root / "b" / "model.safetensors"))
    torch.save(tensors, root / "b" / "pytorch_model.bin")
    os.remove(root / "b" / "model.safetensors")
    line = one_error_line(fwllm(ties_recipe(root), root / "out"))
    assert "pytorch_model.bin" in line and "--allow-pickle" in line
    assert not (root / "out").exists()
    result = fwllm(ties_recipe(root), root / "out", "--allow-pickle")
    assert result.exit_code == 0, result.output[-3000:]
    assert (root / "out" / "model.safetensors").is_file()


def test_a_shard_index_naming_another_models_file_is_refused(tiny_pool, tmp_path):
    root = pool(tiny_pool, tmp_path)
    names = list(load_file(str(root / "a" / "model.safetensors")))
    (root / "a" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: "../b/model.safetensors" for n in names}})
    )
    line = one_error_line(fwllm(ties_recipe(root), root / "out"))
    assert "../b/model.safetensors" in line and "outside" in line


def test_a_truncated_shard_is_one_error_line(tiny_pool, tmp_path):
    root = pool(tiny_pool, tmp_path)
    shard = root / "b" / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 4096])
    line = one_error_line(fwllm(ties_recipe(root), root / "out"))
    assert str(shard) in line and "truncated" in line


def test_the_header_check_accepts_whole_files_and_refuses_a_lying_header(tmp_path):
    from fwllm.core.errors import FwllmError
    from fwllm.mergekit_glue.weight_files import check_shard

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.bfloat16)}, str(path))
    check_shard(str(path))  # safetensors' own writer: whole
    data = path.read_bytes()
    assert data.count(b"[3,5]") == 1
    path.write_bytes(data.replace(b"[3,5]", b"[3,6]"))  # more elements than its bytes, same size
    try:
        check_shard(str(path))
        raise AssertionError("a header that does not fit its data was accepted")
    except FwllmError as err:
        assert "do not fit" in str(err)
