"""Content identities (fwllm.io.identity) and the caches keyed by them (stats, evaluation).

The truth is the construction: two folders whose files hold the same bytes must share an
identity wherever they live and whatever their mtimes; a changed byte that the rule covers
must change it, even when name, size and mtime are kept (`cp -p`, `rsync -a`, an edit
followed by `touch -r`).
"""

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from fwllm.core.job import CandidateSpec
from fwllm.evaluation.cache import ResultCache
from fwllm.io import identity
from fwllm.io.stats_store import StatsCache


def model_folder(path, seed=0, dtype=torch.float32, shapes=((8, 8), (8,))):
    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer{i}.weight": torch.randn(*s).to(dtype) for i, s in enumerate(shapes)}
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 8}')
    (path / "README.md").write_text("docs do not count")
    return path


def replace_keeping_stat(dst, src):
    """Overwrite dst with src's bytes in place, then give it dst's old mtime back (same size here)."""
    st = os.stat(dst)
    data = open(src, "rb").read()
    assert len(data) == st.st_size
    with open(dst, "r+b") as fp:
        fp.write(data)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(dst).st_mtime_ns == st.st_mtime_ns and os.stat(dst).st_size == st.st_size


def flip_byte(path, offset):
    st = os.stat(path)
    with open(path, "r+b") as fp:
        fp.seek(offset)
        b = fp.read(1)
        fp.seek(offset)
        fp.write(bytes([b[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_copies_share_an_identity_and_edits_in_place_do_not(tmp_path):
    a = model_folder(tmp_path / "a", seed=0)
    copy = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, copy)  # copy2: mtimes kept, like cp -p
    assert identity.model_identity(str(a)) == identity.model_identity(str(copy))
    (copy / "README.md").write_text("other docs")  # not a model file
    assert identity.model_identity(str(a)) == identity.model_identity(str(copy))

    before = identity.model_identity(str(a))
    other = model_folder(tmp_path / "other", seed=1)  # a "retrained" checkpoint: same names and sizes
    replace_keeping_stat(a / "model.safetensors", other / "model.safetensors")
    assert identity.model_identity(str(a)) != before
    assert identity.model_identity(str(a)) == identity.model_identity(str(other))

    cfg_before = identity.model_identity(str(a))
    (a / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 9}')
    assert identity.model_identity(str(a)) != cfg_before


def test_sampled_rule_for_large_shards(tmp_path, monkeypatch):
    # every file counts as "large" here: the header-and-samples rule is what is checked
    monkeypatch.setattr(identity, "FULL_HASH_BYTES", 0)
    monkeypatch.setattr(identity, "WINDOWS", 4)
    monkeypatch.setattr(identity, "WINDOW_BYTES", 1024)
    monkeypatch.setattr(identity, "_MEMO", {})
    shapes = ((64, 512), (512,))  # 128 KiB and 2 KiB of float32
    a = model_folder(tmp_path / "a", shapes=shapes)
    shard = a / "model.safetensors"
    base = identity.file_identity(str(shard))
    header = 8 + int.from_bytes(open(shard, "rb").read(8), "little")
    size = os.path.getsize(shard)

    # a byte inside the first and inside the last sampled range of a tensor; the header itself
    for offset in (header, size - 1, header + 4096 - 1, 10):
        flip_byte(shard, offset)
        assert identity.file_identity(str(shard)) != base, offset
        flip_byte(shard, offset)
        assert identity.file_identity(str(shard)) == base, offset

    # another dtype (the header changes) and a retrain (every element moves)
    assert identity.file_identity(str(model_folder(tmp_path / "h", shapes=shapes, dtype=torch.float64)
                                      / "model.safetensors")) != base
    assert identity.file_identity(str(model_folder(tmp_path / "r", seed=3, shapes=shapes)
                                      / "model.safetensors")) != base
    # a byte of the data the samples do not cover is the documented blind spot (--no-cache covers it)
    reads = []
    original = identity._read_at
    monkeypatch.setattr(identity, "_read_at", lambda fp, o, n: reads.append(n) or original(fp, o, n))
    monkeypatch.setattr(identity, "_MEMO", {})
    identity.file_identity(str(shard))
    assert sum(reads) < size  # sampled, not hashed whole


def test_hub_id_is_its_snapshot_commit(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--tiny"
    commits = ["a" * 40, "b" * 40]
    for i, commit in enumerate(commits):
        model_folder(repo / "snapshots" / commit, seed=i)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commits[0])
    assert identity.model_identity("org/tiny") == f"hub:org/tiny@{commits[0]}"
    (repo / "refs" / "main").write_text(commits[1])  # the Hub's main moved on
    assert identity.model_identity("org/tiny") == f"hub:org/tiny@{commits[1]}"


def test_heads_folder_name_matches_the_heads_module():
    from fwllm.arch.heads import HEADS_DIR

    assert identity.HEADS_DIR == HEADS_DIR  # io/ cannot import arch/, so the name is repeated


def test_stats_cache_key_follows_content_not_name_size_mtime(tmp_path):
    base = model_folder(tmp_path / "base", seed=0)
    expert = model_folder(tmp_path / "expert", seed=1)
    store = StatsCache("fisher", root=str(tmp_path / "stats"))
    spec = CandidateSpec("expert", str(expert))
    rows = [{"prompt": "p", "response": "r"}]
    key = store.key({"top_k": 5}, str(base), spec, "t", rows)

    moved = tmp_path / "moved" / "expert"
    shutil.copytree(expert, moved)  # rsync -a: same bytes, same mtimes, another place
    assert store.key({"top_k": 5}, str(base), CandidateSpec("moved", str(moved)), "t", rows) == key

    retrained = model_folder(tmp_path / "retrained", seed=2)
    replace_keeping_stat(expert / "model.safetensors", retrained / "model.safetensors")
    assert store.key({"top_k": 5}, str(base), spec, "t", rows) != key
    assert store.key({"top_k": 5}, str(base), CandidateSpec("r", str(retrained)), "t", rows) == \
        store.key({"top_k": 5}, str(base), spec, "t", rows)


def test_eval_cache_fingerprint_sees_an_edit_that_keeps_size_and_mtime(tmp_path):
    cache = ResultCache(str(tmp_path / "eval"))
    model = model_folder(tmp_path / "merged", seed=0)
    first = cache.model_fingerprint(str(model))
    assert ResultCache(str(tmp_path / "eval")).model_fingerprint(str(model)) == first
    remerged = model_folder(tmp_path / "remerged", seed=5)
    replace_keeping_stat(model / "model.safetensors", remerged / "model.safetensors")
    # a second cache object, as a later `fwllm eval` run would make
    assert ResultCache(str(tmp_path / "eval")).model_fingerprint(str(model)) != first
    assert cache.model_fingerprint(str(model)) == cache.model_fingerprint(str(remerged))


@pytest.mark.parametrize("sub", ["", "fwllm_heads"])
def test_model_files_are_weights_configs_tokenizers_and_heads(tmp_path, sub):
    folder = tmp_path / "m"
    (folder / sub).mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json", "tokenizer.model", "notes.md", "train.log"):
        (folder / sub / name).write_bytes(b"x")
    (folder / "checkpoint-1").mkdir()
    (folder / "checkpoint-1" / "model.safetensors").write_bytes(b"y")
    prefix = f"{sub}/" if sub else ""
    assert identity.model_files(str(folder)) == sorted(
        prefix + n for n in ("config.json", "model.safetensors", "tokenizer.model"))
