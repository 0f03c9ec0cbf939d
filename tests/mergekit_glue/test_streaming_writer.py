"""The streaming output writer against mergekit's own writer and safetensors' `save_file`: the same
files byte for byte, while holding no tensor after it is saved."""

import gc
import os
import weakref

import pytest
import torch
from mergekit.io.tensor_writer import TensorWriter
from safetensors.torch import load_file, save_file

from fwllm.core.errors import FwllmError
from fwllm.mergekit_glue.streaming_writer import StreamingTensorWriter, streaming_output


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.1.mlp.down_proj.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "model.embed_tokens.weight": torch.randn(11, 3, generator=g),
        "a.scale": torch.tensor(2.5, dtype=torch.float16),
        "b.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "c.mask": torch.tensor([True, False, True]),
        "d.empty": torch.zeros(0, 4),
        "e.transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "f.half": torch.randn(13, generator=g).half(),
        "g.i32": torch.arange(5, dtype=torch.int32),
        "h.u8": torch.arange(3, dtype=torch.uint8),
        "i.i8": torch.arange(-2, 2, dtype=torch.int8),
        "j.f64": torch.randn(3, generator=g).double(),
        "k.i16": torch.arange(4, dtype=torch.int16),
        "l.f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
    }


def _files(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def test_one_shard_is_byte_identical_to_save_file(tmp_path):
    tensors = _tensors()
    with StreamingTensorWriter(str(tmp_path / "ours")) as w:
        for name, t in tensors.items():
            w.save_tensor(name, t)
    save_file(
        {n: t.contiguous() for n, t in tensors.items()},
        str(tmp_path / "ref.safetensors"),
        metadata={"format": "pt"},
    )
    assert _files(tmp_path / "ours") == {"model.safetensors": (tmp_path / "ref.safetensors").read_bytes()}


@pytest.mark.parametrize("shard_bytes", [64, 200, 10_000])
def test_sharded_output_matches_mergekit_writer(tmp_path, shard_bytes):
    tensors = _tensors()
    for cls, sub in ((TensorWriter, "mergekit"), (StreamingTensorWriter, "ours")):
        with cls(str(tmp_path / sub), max_shard_size=shard_bytes) as w:
            for name, t in tensors.items():
                w.save_tensor(name, t)
    ours, theirs = _files(tmp_path / "ours"), _files(tmp_path / "mergekit")
    assert ours == theirs  # names, index and every shard's bytes; no spool left behind
    if shard_bytes < 1000:
        assert len(ours) > 2
    loaded = {}
    for f in ours:
        if f.endswith(".safetensors"):
            loaded.update(load_file(str(tmp_path / "ours" / f)))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)


def test_saved_tensors_are_not_held(tmp_path):
    w = StreamingTensorWriter(str(tmp_path / "out"), max_shard_size=10**9)
    t = torch.randn(256, 256)
    ref = weakref.ref(t)
    w.save_tensor("w", t)
    del t
    gc.collect()
    assert ref() is None  # mergekit's writer keeps it until the shard is full
    w.finalize()
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["w"].shape == (256, 256)


def test_unsupported_dtype_is_one_clear_error(tmp_path):
    w = StreamingTensorWriter(str(tmp_path / "out"))
    with pytest.raises(FwllmError, match="complex64"):
        w.save_tensor("z", torch.zeros(2, dtype=torch.complex64))


def test_streaming_output_swaps_mergekit_writer_only_inside():
    from mergekit.io import tasks

    before = tasks.TensorWriter
    with streaming_output():
        made = tasks.TensorWriterTask(out_path=os.devnull + "_unused", max_shard_size=1)
        assert tasks.TensorWriter is StreamingTensorWriter
    assert tasks.TensorWriter is before and made.max_shard_size == 1


def test_fwllm_merge_writes_what_plain_mergekit_writes(tmp_path, tiny_pool, monkeypatch):
    """A sharded task_arithmetic merge through `fwllm merge` (streaming) and through mergekit's
    own `run_merge` (its buffering writer) gives the same files."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from conftest import write_recipe
    from fwllm.mergekit_glue.merge import merge_recipe

    used = []
    monkeypatch.setattr(
        StreamingTensorWriter,
        "save_tensor",
        lambda self, *a, _orig=StreamingTensorWriter.save_tensor, **k: used.append(1) or _orig(self, *a, **k),
    )
    e = tiny_pool["experts"]
    recipe = write_recipe(
        tmp_path / "ta.yml",
        "task_arithmetic",
        tiny_pool["base"],
        [e["copy"], e["rev"]],
        {"lambda": 0.7},
        per_model=[{"weight": 0.6}, {"weight": 0.4}],
    )
    options = MergeOptions(quiet=True, out_shard_size=20_000)
    merge_recipe(str(recipe), str(tmp_path / "ours"), options)
    import yaml

    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text())),
        str(tmp_path / "plain"),
        options=options,
    )
    weights = lambda d: {f: b for f, b in _files(d).items() if "safetensors" in f}
    ours, plain = weights(tmp_path / "ours"), weights(tmp_path / "plain")
    assert used and len(ours) > 2 and ours == plain


def test_startup_hook_streams_only_fwllm_methods():
    """Plain `mergekit-yaml` keeps mergekit's writer for its own methods and streams fwllm's."""
    import types

    from mergekit.io import tasks

    from fwllm.mergekit_glue import hook

    seen = []
    module = types.SimpleNamespace(run_merge=lambda config, *a, **k: seen.append(tasks.TensorWriter))
    hook._plans_per_run(module)
    for method in ("fw_merging", "regmean", "task_arithmetic", "ties"):
        module.run_merge(types.SimpleNamespace(merge_method=method), "out")
    assert seen[:2] == [StreamingTensorWriter] * 2
    assert seen[2:] == [TensorWriter] * 2 and tasks.TensorWriter is TensorWriter
