"""The expert builder trains real experts: better than the base on their own task, distinct,
reproducible, cached, and never half-finished."""

import json
import os
import time

import pytest
import torch
from click.testing import CliRunner

from conftest import load_tensors
from fwllm.core.errors import FwllmError
from fwllm.experts import ExpertPool, build_pool
from fwllm.cli.experts import experts_command
from fwllm.experts.pool import MANIFEST, build_cached, pool_folder
from fwllm.experts.report import own_task_losses
from fwllm.experts.rows import read_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAMILIES = ("llama", "roberta", "roberta-mlm")


@pytest.fixture(scope="module")
def pools(tiny_pools_root):
    root = tiny_pools_root
    built, seconds = {}, {}
    for family in FAMILIES:
        start = time.time()
        built[family] = build_pool("tiny", family, root=root, progress=False)
        seconds[family] = time.time() - start
    return root, built, seconds


def test_pool_layout_and_manifest(pools):
    from transformers import AutoConfig, AutoTokenizer

    _, built, _ = pools
    for family, pool in built.items():
        assert os.path.isabs(pool.root) and pool.family == family and pool.profile == "tiny"
        manifest = json.load(open(os.path.join(pool.root, MANIFEST)))
        assert not os.path.isabs(manifest["base"]) and manifest["build_seconds"] > 0
        for model_dir in [pool.base] + [e.path for e in pool.experts]:
            assert AutoConfig.from_pretrained(model_dir).architectures
            assert AutoTokenizer.from_pretrained(model_dir).pad_token is not None
        for task in pool.tasks.values():
            assert os.path.isfile(task.calibration) and os.path.isfile(task.dev)
        assert ExpertPool.load(pool.root) == pool


@pytest.mark.parametrize("family, factor", [("llama", 0.7), ("roberta", 0.7), ("roberta-mlm", 0.9)])
def test_each_expert_beats_the_base_on_its_own_task(pools, family, factor):
    pool = pools[1][family]
    relevant = [e for e in pool.experts if e.relevant]
    assert len(relevant) >= (3 if family == "roberta-mlm" else 4)
    for expert in relevant:
        losses = own_task_losses(pool, expert)
        assert losses["expert_loss"] < factor * losses["base_loss"], (expert.name, losses)


def test_irrelevant_experts_and_disjoint_data(pools):
    for family in ("llama", "roberta"):
        pool = pools[1][family]
        assert sum(not e.relevant and e.task is None for e in pool.experts) >= 2
    for pool in pools[1].values():
        for task in pool.tasks.values():
            calib = {json.dumps(r, sort_keys=True) for r in read_rows(task.calibration)}
            dev = {json.dumps(r, sort_keys=True) for r in read_rows(task.dev)}
            assert len(calib) == 32 and len(dev) == 64 and not calib & dev


def test_row_formats(pools):
    llama, roberta, mlm = (pools[1][f] for f in FAMILIES)
    assert set(read_rows(llama.tasks["copy"].dev)[0]) == {"prompt", "response"}
    for task in roberta.tasks.values():
        row = read_rows(task.dev)[0]
        assert set(row) == set(task.text_fields) | {"label"}
        assert isinstance(row["label"], float if task.kind == "regression" else int)
        assert task.num_labels == (1 if task.kind == "regression" else 2)
    assert set(read_rows(next(iter(mlm.tasks.values())).dev)[0]) == {"text"}


@pytest.mark.parametrize("family", ["llama", "roberta"])
def test_task_vectors_differ_pairwise(pools, family):
    pool = pools[1][family]
    base = load_tensors(pool.base)
    vectors = []
    for e in pool.experts:  # the body only: classifier heads are each expert's own
        t = load_tensors(e.path)
        vectors.append(
            torch.cat(
                [
                    (t[k] - base[k]).flatten()
                    for k in sorted(t)
                    if k in base and t[k].shape == base[k].shape and not k.startswith("classifier")
                ]
            )
        )
    for i in range(len(vectors)):
        assert vectors[i].norm() > 0
        for j in range(i):
            cos = torch.nn.functional.cosine_similarity(vectors[i], vectors[j], dim=0)
            assert cos < 0.99, (pool.experts[i].name, pool.experts[j].name, float(cos))


def test_tiny_builds_take_seconds(pools):
    # generous bound: the target is < 20 s per family on 2 idle cores; CI boxes are shared
    assert all(s < 60 for s in pools[2].values()), pools[2]


def test_same_seed_same_tensors(pools, tmp_path):
    # roberta-mlm is the quickest family to rebuild; all families share the same seeding path
    first = pools[1]["roberta-mlm"]
    again = build_pool("tiny", "roberta-mlm", root=str(tmp_path), progress=False)
    for a, b in zip(
        [first.base] + [e.path for e in first.experts], [again.base] + [e.path for e in again.experts]
    ):
        ta, tb = load_tensors(a), load_tensors(b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    for name, task in first.tasks.items():
        assert read_rows(task.dev) == read_rows(again.tasks[name].dev)


def test_second_call_reuses_the_cache(pools):
    root, built, _ = pools
    manifest = os.path.join(built["llama"].root, MANIFEST)
    stamp = os.path.getmtime(manifest)
    start = time.time()
    reused = build_pool("tiny", "llama", root=root, progress=False)
    assert time.time() - start < 2
    assert os.path.getmtime(manifest) == stamp and reused == built["llama"]


def test_half_built_folder_is_not_finished(tmp_path):
    folder = pool_folder("tiny", "llama", str(tmp_path))
    os.makedirs(os.path.join(folder, "base"))
    with pytest.raises(FwllmError, match="not a finished expert pool"):
        ExpertPool.load(folder)
    built = []

    def fake_build(staging):
        built.append(staging)
        return ExpertPool(staging, "tiny", "llama", os.path.join(staging, "base"), [], {})

    pool = build_cached(folder, 0, False, fake_build)
    assert built and pool.root == folder and os.path.isfile(os.path.join(folder, MANIFEST))


def test_interrupted_build_leaves_nothing_that_looks_finished(tmp_path):
    folder = pool_folder("tiny", "llama", str(tmp_path))

    def failing_build(staging):
        os.makedirs(os.path.join(staging, "base"))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cached(folder, 0, False, failing_build)
    assert not os.path.exists(folder) and os.listdir(os.path.dirname(folder)) == []


def test_bad_profile_or_family_is_one_line_error(tmp_path):
    with pytest.raises(FwllmError):
        build_pool("smol", "roberta", root=str(tmp_path))
    result = CliRunner().invoke(
        experts_command, ["--profile", "tiny", "--family", "bert", "--root", str(tmp_path)]
    )
    assert result.exit_code != 0 and "Error:" in result.output and "Traceback" not in result.output


def test_cli_prints_pool_and_table(pools):
    root = pools[0]
    result = CliRunner().invoke(
        experts_command, ["--profile", "tiny", "--family", "roberta-mlm", "--root", root]
    )
    assert result.exit_code == 0, result.output
    assert pools[1]["roberta-mlm"].root in result.output and "| low | low | yes |" in result.output


@pytest.mark.slow
def test_smol_pool_experts_are_real(tmp_path_factory):
    pool = build_pool("smol", "llama")
    assert sum(e.relevant for e in pool.experts) >= 4 and sum(not e.relevant for e in pool.experts) >= 4
    for expert in pool.experts:
        assert expert.adapter and os.path.isfile(os.path.join(expert.adapter, "adapter_config.json"))
        config = json.load(open(os.path.join(expert.adapter, "adapter_config.json")))
        assert config["base_model_name_or_path"] == pool.base
    for expert in [e for e in pool.experts if e.relevant]:
        losses = own_task_losses(pool, expert, max_rows=16)
        assert losses["expert_loss"] < losses["base_loss"], (expert.name, losses)
    # task vectors really differ: pairwise cosine of the relevant experts' weight deltas, per tensor
    base = load_tensors(pool.base)
    relevant = [e for e in pool.experts if e.relevant]
    taus = {}
    for e in relevant:
        theta = load_tensors(e.path)
        taus[e.name] = torch.cat(
            [
                (theta[n].float() - base[n].float()).flatten()
                for n in sorted(base)
                if n.endswith(("q_proj.weight", "v_proj.weight"))
            ]
        )
        del theta
    for i, a in enumerate(relevant):
        assert taus[a.name].norm() > 0, a.name
        for b in relevant[i + 1 :]:
            cos = torch.nn.functional.cosine_similarity(taus[a.name], taus[b.name], dim=0)
            assert cos < 0.9, (a.name, b.name, float(cos))
