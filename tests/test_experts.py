"""The expert builder trains real experts: better than the base on their own task, and distinct."""

import os

import pytest
import torch
from safetensors.torch import load_file

from fwllm.calibration import read_task
from fwllm.experts import ExpertPool, build_pool
from fwllm.experts.pool import MANIFEST, pool_folder
from fwllm.experts.train import dev_loss
from fwllm.heads import apply_head, head_from_model
from fwllm.model_io import load_model, load_tokenizer


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return root, {f: build_pool("tiny", f, root=str(root), progress=False) for f in ("llama", "roberta", "roberta-mlm")}


def _own_task_losses(pool, expert):
    data = pool.tasks[expert.task]
    rows = read_task(data.dev)
    tuned = load_model(expert.path)
    base = load_model(pool.base, architecture=type(tuned).__name__)
    if hasattr(tuned, "classifier"):  # same head, so only the body differs
        base = apply_head(base, head_from_model(tuned))
    tok = load_tokenizer(pool.base)
    mlm = data.kind == "mlm"
    return dev_loss(base, tok, rows, mlm=mlm), dev_loss(tuned, tok, rows, mlm=mlm)


@pytest.mark.parametrize("family, factor", [("llama", 0.7), ("roberta", 0.7), ("roberta-mlm", 0.85)])
def test_each_expert_beats_the_base_on_its_own_task(pools, family, factor):
    pool = pools[1][family]
    relevant = [e for e in pool.experts if e.relevant]
    assert len(relevant) >= 3
    for expert in relevant:
        base_loss, expert_loss = _own_task_losses(pool, expert)
        assert expert_loss < factor * base_loss, (expert.name, base_loss, expert_loss)


def test_pools_have_irrelevant_experts_and_disjoint_data(pools):
    for family in ("llama", "roberta"):
        pool = pools[1][family]
        assert sum(not e.relevant for e in pool.experts) >= 2
        for task in pool.tasks.values():
            calib = {str(r) for r in read_task(task.calibration).rows}
            dev = {str(r) for r in read_task(task.dev).rows}
            assert len(calib & dev) <= 1  # random draws may coincide once; no systematic overlap


@pytest.mark.parametrize("family", ["llama", "roberta"])
def test_task_vectors_differ_pairwise(pools, family):
    pool = pools[1][family]
    base = load_file(os.path.join(pool.base, "model.safetensors"))
    vectors = []
    for e in pool.experts:
        t = load_file(os.path.join(e.path, "model.safetensors"))
        vectors.append(torch.cat([(t[k] - base[k]).flatten() for k in t if k in base and t[k].shape == base[k].shape]))
    for i in range(len(vectors)):
        assert vectors[i].norm() > 0
        for j in range(i):
            cos = torch.nn.functional.cosine_similarity(vectors[i], vectors[j], dim=0)
            assert cos < 0.99, (pool.experts[i].name, pool.experts[j].name, float(cos))


def test_same_seed_same_tensors_and_cache_reuse(pools, tmp_path):
    root, built = pools
    again = build_pool("tiny", "llama", root=str(tmp_path), progress=False)
    for a, b in zip(built["llama"].experts, again.experts):
        ta, tb = load_file(os.path.join(a.path, "model.safetensors")), load_file(os.path.join(b.path, "model.safetensors"))
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    manifest = os.path.join(built["llama"].root, MANIFEST)
    stamp = os.path.getmtime(manifest)
    reused = build_pool("tiny", "llama", root=str(root), progress=False)
    assert os.path.getmtime(manifest) == stamp and reused.root == built["llama"].root


def test_half_built_folder_is_not_finished(tmp_path):
    folder = pool_folder("tiny", "llama", str(tmp_path))
    os.makedirs(os.path.join(folder, "base"))
    with pytest.raises(Exception, match="not a finished expert pool"):
        ExpertPool.load(folder)


@pytest.mark.slow
def test_smol_pool_experts_are_real(tmp_path_factory):
    pool = build_pool("smol", "llama")
    assert sum(e.relevant for e in pool.experts) >= 4 and sum(not e.relevant for e in pool.experts) >= 4
    for expert in [e for e in pool.experts if e.relevant]:
        assert expert.adapter and os.path.isfile(os.path.join(expert.adapter, "adapter_config.json"))
        base_loss, expert_loss = _own_task_losses(pool, expert)
        assert expert_loss < base_loss, (expert.name, base_loss, expert_loss)
