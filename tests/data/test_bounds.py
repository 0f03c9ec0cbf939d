"""Bounded inputs: each red-team finding (issue 24, item 6) is one FwllmError before any model loads.

1. `iterations: 1e12`          -> the schema's ceiling (fwllm.core.params.MAX_STEPS)
2. 10,000 one-row task files   -> at most MAX_TASKS tasks, counted before any file is read
3. `max_length: 1e9` / beyond the base's context -> schema ceiling / refused; the default is lowered
4. a micro-batch too large for RAM -> refused with the numbers; `gradient: auto` counts activations
"""

import json
import logging
import os
import re
import subprocess
import sys
import weakref

import pytest
import torch

from conftest import write_jsonl, write_recipe
from fwllm.core import memory
from fwllm.core.errors import FwllmError
from fwllm.core.footprint import ModelSizes, context_length
from fwllm.data import calibration
from fwllm.data.calibration import CAUSAL, CalibrationTask, load_calibration, micro_batch_shape, read_task


@pytest.fixture
def no_model(monkeypatch):
    import fwllm.io.models as models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", refuse)


def _job(tmp_path, pool, method="fw_merging", **params):
    from fwllm.mergekit_glue.recipe import load_recipe, merge_job

    recipe = write_recipe(
        tmp_path / "r.yml",
        method,
        pool["base"],
        [pool["experts"]["copy"]],
        {"calibration": str(pool["calib"]), **params},
    )
    return merge_job(load_recipe(str(recipe)), "", "cpu", False)


def _check(job):
    from fwllm.mergekit_glue.preflight import check_job

    return check_job(job)


# -- 1. iterations -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [10**12, 1e12, 10_001])
def test_iterations_beyond_the_ceiling_are_one_error_at_recipe_load(tmp_path, tiny_pool, no_model, value):
    with pytest.raises(FwllmError, match=r"fw_merging: iterations must be <= 10000 \(got"):
        _job(tmp_path, tiny_pool, iterations=value)


def test_the_ceilings_themselves_are_accepted(tmp_path, tiny_pool):
    job = _job(tmp_path, tiny_pool, iterations=10_000, batch_size=1024, max_rows=100_000)
    assert (job.params.iterations, job.params.batch_size, job.params.max_rows) == (10_000, 1024, 100_000)


def test_adamerging_steps_have_the_same_ceiling(tmp_path, tiny_pool):
    with pytest.raises(FwllmError, match=r"adamerging: steps must be <= 10000"):
        _job(tmp_path, tiny_pool, "adamerging", steps=50_000)


# -- 2. task count -------------------------------------------------------------------------------------------
def test_ten_thousand_one_row_files_are_refused_before_any_is_read(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(10_000):
        (folder / f"t{i:05d}.jsonl").write_text("not json\n")  # reading any of them would fail differently
    with pytest.raises(
        FwllmError, match=r"holds 10000 tasks \(one per \.jsonl file\); at most 256 are allowed"
    ):
        load_calibration(str(folder))


def test_the_task_count_is_refused_in_preflight_without_a_model(tmp_path, tiny_pool, no_model):
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(257):
        write_jsonl(folder / f"t{i}.jsonl", [{"prompt": "copy : 1 =", "response": "1"}])
    job = _job(tmp_path, {**tiny_pool, "calib": folder})
    with pytest.raises(FwllmError, match="holds 257 tasks"):
        _check(job)
    (folder / "t256.jsonl").unlink()
    assert len(_check(job)) == 256  # the ceiling itself is accepted


def test_a_task_over_the_row_ceiling_needs_max_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "MAX_TASK_ROWS", 5)
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [{"text": f"row {i}"} for i in range(6)])
    with pytest.raises(FwllmError, match=r"t.jsonl:6: the task has over 5 rows.*set max_rows \(at most 5\)"):
        read_task(str(path))
    assert len(read_task(str(path), max_rows=5).rows) == 5
    write_jsonl(path, [{"text": f"row {i}"} for i in range(5)])
    assert len(read_task(str(path)).rows) == 5


# -- 3. max_length -------------------------------------------------------------------------------------------
def test_a_huge_max_length_is_one_error_at_recipe_load(tmp_path, tiny_pool, no_model):
    with pytest.raises(FwllmError, match=r"max_length must be <= 131072 \(got 1000000000"):
        _job(tmp_path, tiny_pool, max_length=10**9)


def test_a_written_max_length_beyond_the_context_is_refused(tmp_path, tiny_pool, no_model):
    job = _job(tmp_path, tiny_pool, max_length=65)  # the tiny LLaMA has max_position_embeddings = 64
    with pytest.raises(
        FwllmError, match=r"max_length 65 exceeds the base's context of 64 tokens .*max_length <= 64"
    ):
        _check(job)
    job = _job(tmp_path, tiny_pool, max_length=64)
    _check(job)
    assert job.params.max_length == 64


def test_the_default_max_length_is_lowered_to_the_context_with_a_warning(
    tmp_path, tiny_pool, no_model, caplog
):
    job = _job(tmp_path, tiny_pool)
    assert job.params.max_length == 256
    with caplog.at_level(logging.WARNING):
        _check(job)
    assert job.params.max_length == 64
    assert [r.getMessage() for r in caplog.records if "max_length" in r.getMessage()] == [
        "fwllm: max_length 256 lowered to the base's context of 64 tokens"
    ]


@pytest.mark.parametrize(
    "cfg, context",
    [
        ({"model_type": "llama", "max_position_embeddings": 2048}, 2048),
        ({"model_type": "gpt2", "n_positions": 1024, "n_ctx": 1024}, 1024),
        ({"model_type": "mpt", "max_seq_len": 4096}, 4096),
        (
            {"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1},
            512,
        ),  # roberta-base: 512
        ({"model_type": "llava", "text_config": {"max_position_embeddings": 4096}}, 4096),
        ({"model_type": "t5"}, None),  # relative positions: no table to run past
    ],
)
def test_context_length_from_the_config(cfg, context):
    assert context_length(cfg) == context


def test_plain_mergekit_yaml_refuses_a_max_length_beyond_the_context(tmp_path, tiny_pool):
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    if not os.path.exists(exe):
        pytest.skip("mergekit-yaml is not installed beside this Python")
    recipe = write_recipe(
        tmp_path / "r.yml",
        "fw_merging",
        tiny_pool["base"],
        [tiny_pool["experts"]["copy"]],
        {"calibration": str(tiny_pool["calib"]), "max_length": 100},
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", FWLLM_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([exe, str(recipe), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert "max_length 100 exceeds the base's context of 64 tokens" in r.stdout + r.stderr
    assert not os.path.exists(tmp_path / "cache" / "plans") or not os.listdir(tmp_path / "cache" / "plans")


# -- 4. memory -----------------------------------------------------------------------------------------------
class _PeakAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of tensor storage created under this mode and alive at once (weights made before it are not
    counted): the peak of a forward+backward's activations, logits and gradients."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.alive = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.alive:
                    self.alive.add(storage.data_ptr())
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, storage.data_ptr(), storage.nbytes())
        return out

    def _free(self, key, nbytes):
        self.alive.discard(key)
        self.live -= nbytes


@pytest.mark.parametrize(
    "batch, tokens, hidden, inter, layers, heads, kv, vocab",
    [
        (4, 64, 64, 160, 2, 4, 2, 100),
        (2, 128, 128, 344, 3, 8, 8, 50),
        (4, 64, 64, 160, 2, 4, 2, 5000),  # logits dominate
    ],
)
def test_the_estimate_bounds_a_measured_llama_forward_backward_within_1_5x(
    batch, tokens, hidden, inter, layers, heads, kv, vocab
):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=tokens,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, vocab, (batch, tokens))
    mask = torch.ones_like(ids)
    mask[0, tokens // 2 :] = 0  # padding: the 4-D attention mask is built
    with _PeakAllocation() as peak:
        logits = model(input_ids=ids, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), ids.flatten(), reduction="sum"
        ).backward()
    sizes = ModelSizes.from_config(cfg.to_dict())
    grads = 4 * sum(p.numel() for p in model.parameters())  # counted by fw_merging.in_ram_bytes
    estimate = sizes.activation_bytes(batch, tokens) + sizes.logits_bytes(batch, tokens) + grads
    assert peak.peak <= estimate <= 1.5 * peak.peak, (peak.peak, estimate)


def test_micro_batch_shape_from_the_rows():
    rows = [{"prompt": "a" * 10, "response": "b" * 5}, {"prompt": "c", "response": "d"}]
    task = CalibrationTask("t", CAUSAL, rows)
    assert micro_batch_shape([task], batch_size=8, max_length=256) == (2, 2 * 15 + 8)  # 2 rows; 15 bytes
    assert micro_batch_shape([task], batch_size=1, max_length=20) == (1, 20)


def test_a_micro_batch_too_large_for_memory_is_refused_with_the_numbers(
    tmp_path, tiny_pool, no_model, monkeypatch
):
    monkeypatch.setattr(memory, "available_memory", lambda: 1 << 20)  # 1 MiB
    job = _job(tmp_path, tiny_pool, batch_size=8)
    with pytest.raises(FwllmError) as err:
        _check(job)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("fw_merging: a micro-batch of 8 rows x 54 tokens needs about ")  # 23-byte rows
    assert "(gradient: layerwise: weights" in message and "1 MiB of memory is available" in message
    assert "lower batch_size (now 8) or max_length (now 64)" in message
    monkeypatch.setattr(memory, "available_memory", lambda: 64 << 20)
    _check(_job(tmp_path, tiny_pool, batch_size=8))  # fits in 64 MiB
    _check(_job(tmp_path, tiny_pool, batch_size=1, max_length=8))  # a smaller micro-batch fits in 1 MiB
    monkeypatch.setattr(memory, "available_memory", lambda: 1 << 20)
    _check(_job(tmp_path, tiny_pool, batch_size=1, max_length=8))


def test_gradient_full_is_refused_where_layerwise_would_fit(tmp_path, tiny_pool, no_model, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 3 << 20)
    _check(_job(tmp_path, tiny_pool))
    with pytest.raises(FwllmError, match=r"needs about .* \(gradient: full: weights"):
        _check(_job(tmp_path, tiny_pool, gradient="full"))


def test_gradient_auto_counts_the_micro_batch(tmp_path, tiny_pool, monkeypatch):
    """3 MiB available: the weights alone (under 0.3 MiB in RAM) would pick `full` (they need under half the
    free memory); with one micro-batch's activations (8 x 54 tokens, about 3 MiB) `auto` goes layerwise."""
    from fwllm.methods import fw_merging
    from conftest import merge

    monkeypatch.setattr(fw_merging, "available_memory", lambda: 3 << 20)
    monkeypatch.setattr(memory, "available_memory", lambda: 3 << 20)
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    out = merge(
        tmp_path,
        "out",
        "fw_merging",
        tiny_pool,
        [tiny_pool["experts"]["copy"], tiny_pool["experts"]["rev"]],
        {"calibration": str(tiny_pool["calib"]), "iterations": 1},
    )
    plan = (
        json.loads((out / "fwllm_plan" / "plan.json").read_text()) if (out / "fwllm_plan").is_dir() else None
    )
    text = json.dumps(plan)
    assert '"mode": "layerwise"' in text, text[:2000]


# -- every method's bounded path is priced as what it holds -------------------------------------------------
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32000,
}


def _llama2_7b_shapes():
    h, i, v = 4096, 11008, 32000
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(32):
        p = f"model.layers.{n}."
        shapes.update({p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"})
        shapes.update(
            {
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    return shapes


@pytest.mark.parametrize("method", ["regmean", "fisher", "adamerging"])
def test_the_data_methods_are_priced_layer_by_layer_at_7b(method):
    """LLaMA-2-7B, 16 candidates, 4 rows x 64 tokens: the streamed solve holds one layer (by hand: 202,383,360
    parameters, 3 copies) and the outer tensors (262,148,096 parameters, 2 copies), not the 6.74 B-parameter
    model; `gradient: full` is priced as the whole model."""
    from fwllm.core.job import CandidateSpec, MergeJob
    from fwllm.mergekit_glue.bounds import _parts
    from fwllm.methods.registry import METHODS

    params = METHODS.get(method).Params
    rows = [{"prompt": "a" * 20, "response": "b" * 20}] * 4
    tasks = [CalibrationTask("t", CAUSAL, rows)]
    candidates = [CandidateSpec(f"c{i}", "base", f"a{i}") for i in range(16)]
    shapes = _llama2_7b_shapes()
    auto = MergeJob(method, "base", candidates, params(calibration="c.jsonl"), plan_dir="")
    mode, parts = _parts(auto, LLAMA2_7B, shapes, tasks, 4, 64)
    assert mode == "gradient: layerwise"
    assert parts["weights"] == 4 * (3 * 202_383_360 + 2 * 262_148_096)
    assert sum(parts.values()) < 8 << 30
    full = MergeJob(method, "base", candidates, params(calibration="c.jsonl", gradient="full"), plan_dir="")
    mode, parts = _parts(full, LLAMA2_7B, shapes, tasks, 4, 64)
    assert mode != "gradient: layerwise" and parts["weights"] >= 4 * 6_738_415_616


# -- encoder pools on the layerwise path are priced one layer at a time --------------------------------------
@pytest.fixture(scope="module")
def deep_encoder_pool(tmp_path_factory):
    """A RoBERTa MLM base of 8 layers (1.6 M parameters) and two classifier experts (2 and 3 labels)."""
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification

    from conftest import ENC_WORDS, roberta_tokenizer

    root = tmp_path_factory.mktemp("deep_encoder")
    cfg = RobertaConfig(
        vocab_size=len(ENC_WORDS),
        hidden_size=128,
        num_hidden_layers=8,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=20,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    RobertaForMaskedLM(cfg).save_pretrained(root / "base")
    roberta_tokenizer().save_pretrained(root / "base")
    (root / "calib").mkdir()
    experts = []
    for task, labels in (("two", 2), ("three", 3)):
        write_jsonl(root / "calib" / f"{task}.jsonl", [{"sentence": "w1 w2 w3 w4", "label": 1}] * 4)
        RobertaForSequenceClassification.from_pretrained(root / "base", num_labels=labels).save_pretrained(
            root / task
        )
        experts.append(root / task)
    return {"base": root / "base", "experts": experts, "calib": root / "calib"}


def _float32_bytes(folder, layer=None):
    """float32 bytes of the checkpoint's tensors (those of encoder layer `layer` only, if given)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fp:
        for name in fp.keys():
            if layer is None or f".layer.{layer}." in name:
                total += 4 * torch.Size(fp.get_slice(name).get_shape()).numel()
    return total


@pytest.mark.parametrize("method", ["fisher", "adamerging"])
def test_an_encoder_pool_on_the_layerwise_path_is_priced_one_layer_at_a_time(
    tmp_path, deep_encoder_pool, no_model, monkeypatch, method
):
    """The in-RAM solve holds the model and its gradients (2 x 6.3 MB); the layerwise one holds one
    layer three times (3 x 0.8 MB) and the outer tensors twice (2 x 0.03 MB), plus one micro-batch
    of 4 rows x 6 tokens (kilobytes). With the model's own float32 size free, layerwise fits; with one
    layer's size free, nothing fits and the refusal names the layerwise need."""
    from fwllm.mergekit_glue.recipe import load_recipe, merge_job

    pool = deep_encoder_pool
    model, layer = _float32_bytes(pool["base"]), _float32_bytes(pool["base"], layer=0)
    assert 3 * layer < model / 2  # one layer of eight: the layerwise weights fit where the model does

    def job():
        recipe = write_recipe(
            tmp_path / "r.yml",
            method,
            pool["base"],
            pool["experts"],
            {"calibration": str(pool["calib"]), "gradient": "layerwise"},
            per_model=[{"task": "two"}, {"task": "three"}],
        )
        return merge_job(load_recipe(str(recipe)), "", "cpu", False)

    monkeypatch.setattr(memory, "available_memory", lambda: model)  # under 2 x model: the in-RAM need
    _check(job())
    monkeypatch.setattr(memory, "available_memory", lambda: layer)  # under even one layer's 3 copies
    with pytest.raises(FwllmError) as err:
        _check(job())
    message = str(err.value)
    assert "\n" not in message
    need = re.search(r"needs about (\d+) MiB \(gradient: layerwise: weights", message)
    assert need and 3 * layer / 2**20 <= int(need.group(1)) + 0.5 < model / 2**20, message
    assert f"{round(layer / 2**20)} MiB of memory is available" in message


def test_a_classifier_pools_fisher_terms_are_its_labels_not_the_vocabulary(tmp_path, deep_encoder_pool):
    """The exact Fisher of a classifier has one term per label of its one prediction: the widest expert
    (3 labels) x one [18 tokens, 128] stack-output gradient, not 5 (top_k) x 18 positions of them."""
    from fwllm.io.models import read_config
    from fwllm.mergekit_glue.bounds import _classifier_labels, _parts
    from fwllm.mergekit_glue.preflight import tensor_shapes
    from fwllm.mergekit_glue.recipe import load_recipe, merge_job

    pool = deep_encoder_pool
    recipe = write_recipe(
        tmp_path / "r.yml", "fisher", pool["base"], pool["experts"], {"calibration": str(pool["calib"])}
    )
    job = merge_job(load_recipe(str(recipe)), "", "cpu", False)
    base = str(pool["base"])
    labels = _classifier_labels(job, base)
    assert labels == 3
    cfg, shapes, tasks = read_config(base), tensor_shapes(base), load_calibration(str(pool["calib"]))
    assert _parts(job, cfg, shapes, tasks, 1, 18, labels)[1]["term gradients"] == 4 * 3 * 18 * 128
    assert _parts(job, cfg, shapes, tasks, 1, 18)[1]["term gradients"] == 4 * (5 * 18) * 18 * 128
