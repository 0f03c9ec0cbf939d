"""Executing a plan closes mergekit's input shards after every tensor: a mapped shard keeps each page
read from it resident until it is closed, which at 7B is a whole base shard of RSS."""

from mergekit.io.tasks import LoaderCache

from conftest import fw_params, merge
from fwllm.mergekit_glue import adapter


def test_no_input_shard_stays_open_between_merged_tensors(tmp_path, tiny_pool, monkeypatch):
    cls = adapter.MergekitAdapter
    original = cls.merge_group
    open_after = []

    def spy(self, group, /, **parameters):
        out = original(self, group, **parameters)
        open_after.append(sum(loader.current_shard is not None for loader in LoaderCache().loaders.values()))
        return out

    monkeypatch.setattr(cls, "merge_group", spy)
    e = tiny_pool["experts"]
    merge(tmp_path, "out", "fw_merging", tiny_pool, [e["copy"], e["rev"]], fw_params(tiny_pool, iterations=2))
    assert open_after and set(open_after) == {0}
