"""Content identities (fwllm.io.identity) and the caches keyed by them (stats, evaluation).

The truth is the construction: two folders whose files hold the same bytes must share an
identity wherever they live and whatever their mtimes; a changed byte that the rule covers
must change it, even when name, size and mtime are kept (`cp -p`, `rsync -a`, an edit
followed by `touch -r`).
"""

import hashlib
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


def sign_flip(path, offset, length):
    """Flip the sign bit of every bf16 element in [offset, offset + length); size and mtime kept."""
    st = os.stat(path)
    with open(path, "r+b") as fp:
        fp.seek(offset)
        data = bytearray(fp.read(length))
        for i in range(1, len(data), 2):  # little-endian bf16: the sign is the high byte's top bit
            data[i] ^= 0x80
        fp.seek(offset)
        fp.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_sign_flip_inside_a_large_shard_changes_its_identity(tmp_path, monkeypatch):
    # the red-team case: 128 KiB sign-flipped in the middle of a 72 MB shard, same size and mtime
    monkeypatch.setattr(identity, "_MEMO", {})
    folder = tmp_path / "m"
    folder.mkdir()
    shard = folder / "model.safetensors"
    save_file(
        {"w": torch.randn(36 << 20, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)},
        str(shard),
    )
    size = os.path.getsize(shard)
    assert size > 64 << 20
    before = identity.model_identity(str(folder))
    sign_flip(shard, size // 2 - (64 << 10), 128 << 10)
    assert os.path.getsize(shard) == size
    assert identity.model_identity(str(folder)) != before


def settled(path, monkeypatch):
    """Let the racy-clean rule memoise files just written (their ctime is now)."""
    monkeypatch.setattr(identity, "RACY_SECONDS", -1.0)


def count_opens(monkeypatch, path):
    opened = []
    real = open

    def spy(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            opened.append(file)
        return real(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    return opened


def test_the_persistent_memo_serves_a_later_process_without_reading(tmp_path, monkeypatch):
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    settled(tmp_path, monkeypatch)
    monkeypatch.setattr(identity, "_MEMO", {})
    f = tmp_path / "calib.jsonl"
    f.write_bytes(b"x" * 5000)
    truth = "sha256:" + hashlib.sha256(b"x" * 5000).hexdigest()[:32]
    assert identity.file_identity(str(f)) == truth
    assert (tmp_path / "cache" / identity.MEMO_FILE).is_file()
    monkeypatch.setattr(identity, "_MEMO", {})  # a new process: only the memo file remembers
    monkeypatch.setattr(identity, "_DB", {})
    opened = count_opens(monkeypatch, f)
    assert identity.file_identity(str(f)) == truth
    assert opened == []


def test_a_changed_ctime_invalidates_the_memo(tmp_path, monkeypatch):
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    settled(tmp_path, monkeypatch)
    monkeypatch.setattr(identity, "_MEMO", {})
    f = tmp_path / "shard.bin"
    f.write_bytes(b"a" * 4096)
    first = identity.file_identity(str(f))
    # same bytes count, mtime put back: only ctime tells (the kernel sets it; no user can)
    st = os.stat(f)
    with open(f, "r+b") as fp:
        fp.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_ctime_ns != st.st_ctime_ns or pytest.skip("ctime did not move (coarse clock)")
    opened = count_opens(monkeypatch, f)
    assert identity.file_identity(str(f)) == "sha256:" + hashlib.sha256(b"b" + b"a" * 4095).hexdigest()[:32]
    assert identity.file_identity(str(f)) != first and len(opened) == 1


def test_a_racily_clean_file_is_not_memoised(tmp_path, monkeypatch):
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(identity, "_MEMO", {})
    f = tmp_path / "fresh.json"
    f.write_text("{}")  # written just now: within RACY_SECONDS
    identity.file_identity(str(f))
    opened = count_opens(monkeypatch, f)
    identity.file_identity(str(f))
    assert len(opened) == 1


def test_an_untrusted_memo_file_is_not_used(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("FWLLM_CACHE", str(cache))
    settled(tmp_path, monkeypatch)
    monkeypatch.setattr(identity, "_MEMO", {})
    monkeypatch.setattr(identity, "_DB", {})
    f = tmp_path / "a.txt"
    f.write_bytes(b"abc")
    os.chmod(cache, 0o777)  # anyone could plant digests here
    assert identity.file_identity(str(f)) == "sha256:" + hashlib.sha256(b"abc").hexdigest()[:32]
    assert not (cache / identity.MEMO_FILE).exists()


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
    assert store.key({"top_k": 5}, str(base), CandidateSpec("r", str(retrained)), "t", rows) == store.key(
        {"top_k": 5}, str(base), spec, "t", rows
    )


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
        prefix + n for n in ("config.json", "model.safetensors", "tokenizer.model")
    )
