"""`gradient: layerwise`: the same gradient as one full backward, over a model that is never
whole in memory (a meta skeleton, one layer materialised at a time from the checkpoint)."""

import copy
import dataclasses
import json
import os

import pytest
import torch

from conftest import tiny_llama, load_tensors, task_rows, tiny_tokenizer, write_recipe
from fwllm.data.calibration import CAUSAL, CLASSIFICATION, CalibrationTask
from fwllm.core.errors import FwllmError
from fwllm.arch.layer_stack import layer_stack
from fwllm.arch.streaming import MetaModel, base_weights, skeleton
from fwllm.solvers.streamed_gradient import StreamedGradient
from fwllm.mergekit_glue.merge import merge_recipe
from fwllm.data.objective import encode_tasks
from mergekit.options import MergeOptions


def full_gradient(model, objective):
    model.zero_grad(set_to_none=True)
    value = objective.backward(model)
    return value, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def layerwise_gradient(model, objective, tmp_path, heads=None):
    """The streamed gradient of `model` (saved to disk and read back through a skeleton)."""
    from fwllm.data.objective import Objective

    model.save_pretrained(tmp_path / "m")
    meta_model = skeleton(str(tmp_path / "m"))
    blocks = [n for n, _ in model.named_parameters()]
    meta = MetaModel(meta_model, base_weights(str(tmp_path / "m")), "cpu", trainable=blocks)
    streamed = Objective([dataclasses.replace(t, head=(heads or {}).get(t.name)) for t in objective.tasks])
    gradient = StreamedGradient(meta, streamed, blocks, lambda: {})
    grads = {}
    value = gradient(lambda n, g: grads.__setitem__(n, g.clone()))
    return value, grads, gradient


def causal_objective(model):
    tasks = [
        CalibrationTask("copy", CAUSAL, task_rows("copy", 5, 1)),
        CalibrationTask("rev", CAUSAL, task_rows("rev", 3, 2)),
    ]
    return encode_tasks(tasks, tiny_tokenizer(), model, batch_size=2)  # several micro-batches per task


@pytest.mark.parametrize("tie", [False, True])
def test_layerwise_gradient_equals_full_backward_llama(tie, tmp_path):
    model = tiny_llama(tie=tie)
    objective = causal_objective(model)
    v_full, g_full = full_gradient(model, objective)
    v_layer, g_layer, gradient = layerwise_gradient(copy.deepcopy(model), objective, tmp_path)
    assert v_layer == pytest.approx(v_full, rel=1e-6)
    assert set(g_layer) == set(g_full)
    for name, g in g_full.items():
        assert torch.allclose(g_layer[name], g, atol=1e-6, rtol=1e-5), name
    # what was materialised at once: the trainable blocks outside the stack plus one layer, never two
    layer = 4 * sum(p.numel() for p in model.model.layers[0].parameters())
    outer = 4 * sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.layers."))
    assert gradient.meta.peak_resident_bytes == outer + layer
    assert not gradient.meta.resident  # everything is back on the meta device


def test_layerwise_gradient_equals_full_backward_roberta_classifier_with_task_heads(tmp_path):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from conftest import encoder_rows as rows, roberta_tokenizer

    cfg = RobertaConfig(
        vocab_size=25,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=20,
        pad_token_id=1,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(cfg).eval()
    other_head = copy.deepcopy(model.classifier)
    torch.nn.init.normal_(other_head.out_proj.weight)
    other_head.requires_grad_(False)
    tasks = [
        CalibrationTask("sum_mod3", CLASSIFICATION, rows("sum_mod3", 5, 1), ["sentence"]),
        CalibrationTask("other", CLASSIFICATION, rows("sum_mod3", 4, 2), ["sentence"]),
    ]
    objective = encode_tasks(tasks, roberta_tokenizer(), model, batch_size=2, heads={"other": other_head})
    v_full, g_full = full_gradient(model, objective)
    v_layer, g_layer, gradient = layerwise_gradient(
        copy.deepcopy(model), objective, tmp_path, heads={"other": other_head}
    )
    assert gradient.stack_name == "roberta.encoder.layer"
    assert v_layer == pytest.approx(v_full, rel=1e-6)
    for name, g in g_full.items():
        assert torch.allclose(g_layer[name], g, atol=1e-6, rtol=1e-5), name


def test_layer_stack_is_the_largest_repeated_block_list():
    name, layers = layer_stack(tiny_llama(layers=3))
    assert name == "model.layers" and len(layers) == 3
    with pytest.raises(FwllmError, match="repeated layers"):
        layer_stack(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_a_layer_fed_something_other_than_the_previous_output_is_refused(tmp_path):
    class Odd(torch.nn.Module):  # a residual around the stack: layer 1 input != layer 0 output
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
            self.config = type("Cfg", (), {"hidden_size": 4})()

        def forward(self, input_ids=None, attention_mask=None, **kw):
            x = torch.ones(1, 4)
            return self.layers[1](self.layers[0](x) + x)

    from fwllm.data.calibration import UNLABELED
    from fwllm.solvers.streamed_gradient import _Term

    model = Odd()
    meta = MetaModel(model, {n: p.detach() for n, p in model.named_parameters()}, "cpu")
    gradient = StreamedGradient.__new__(StreamedGradient)  # only the capture pass
    gradient.meta, gradient.model, gradient.layers = meta, model, model.layers
    term = _Term(
        CalibrationTask("t", UNLABELED, [{"text": "x"}]),
        1.0,
        {"input_ids": torch.ones(1, 1, dtype=torch.long), "attention_mask": torch.ones(1, 1)},
    )
    with pytest.raises(FwllmError, match="output directly"):
        gradient._capture(term)


def fw_merge(tmp_path, pool, models, label, **params):
    """An fw_merging run over `models` on the tiny pool's calibration rows; its output folder."""
    params = {
        "calibration": str(pool["calib"]),
        "preset": "paper",
        "step_size": 0.5,
        "scaling": 1.0,
        **params,
    }
    recipe = write_recipe(tmp_path / f"{label}.yml", "fw_merging", pool["base"], models, params)
    merge_recipe(str(recipe), str(tmp_path / label), MergeOptions(quiet=True))
    return tmp_path / label


@pytest.mark.parametrize("variant", ["hard", "soft"])
def test_fw_merge_with_layerwise_gradient_matches_full(tmp_path, tiny_pool, variant):
    models = [tiny_pool["experts"]["copy"], tiny_pool["experts"]["rev"], tiny_pool["experts"]["noise"]]
    outs = {
        mode: fw_merge(tmp_path, tiny_pool, models, mode, iterations=4, gradient=mode, variant=variant)
        for mode in ("full", "layerwise")
    }
    full, layer = load_tensors(outs["full"]), load_tensors(outs["layerwise"])
    assert set(full) == set(layer)
    for name in full:
        assert torch.allclose(full[name], layer[name], atol=1e-5), name
    plan = json.load(open(outs["layerwise"] / "fwllm_plan" / "plan.json"))
    assert plan["gradient"]["mode"] == "layerwise" and plan["gradient"]["iterate"] == "on-disk store"
    trace_full = json.load(open(outs["full"] / "fwllm_plan" / "trace.json"))["trace"]
    trace_layer = json.load(open(outs["layerwise"] / "fwllm_plan" / "trace.json"))["trace"]
    assert [t["chosen"] for t in trace_full] == [t["chosen"] for t in trace_layer]


def test_checkpoint_memory_groups_micro_batches_and_changes_nothing_else(tmp_path, tiny_pool):
    # Below one micro-batch's checkpoints, each micro-batch is its own group and re-reads every layer;
    # the merge stays that of one group (gradients of the groups add up)
    import math

    models = [tiny_pool["experts"]["copy"], tiny_pool["experts"]["rev"]]
    outs = {
        label: fw_merge(
            tmp_path,
            tiny_pool,
            models,
            label,
            iterations=3,
            gradient="layerwise",
            batch_size=2,
            checkpoint_memory=memory,
        )
        for label, memory in (("one", 1.0), ("each", 1e-9))
    }
    rows = [sum(1 for _ in open(f)) for f in sorted(pool_files(tiny_pool["calib"]))]
    micro_batches = sum(math.ceil(n / 2) for n in rows)
    plans = {k: json.load(open(v / "fwllm_plan" / "plan.json"))["gradient"] for k, v in outs.items()}
    assert micro_batches > 1
    assert plans["one"]["checkpoint_groups"] == 1 and plans["each"]["checkpoint_groups"] == micro_batches
    assert plans["each"]["layer_fetches"] > plans["one"]["layer_fetches"]
    one, each = load_tensors(outs["one"]), load_tensors(outs["each"])
    for name in one:
        assert torch.allclose(one[name], each[name], atol=1e-6), name


def pool_files(folder):
    import glob

    return glob.glob(os.path.join(str(folder), "*.jsonl"))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on a device machine)")


@needs_cuda
def test_layerwise_on_cuda_matches_the_cpu_backward(tmp_path):
    model = tiny_llama()
    objective = causal_objective(model)
    v_full, g_full = full_gradient(model, objective)
    model.save_pretrained(tmp_path / "m")
    blocks = [n for n, _ in model.named_parameters()]
    meta = MetaModel(
        skeleton(str(tmp_path / "m")), base_weights(str(tmp_path / "m")), "cuda", trainable=blocks
    )
    grads = {}
    value = StreamedGradient(meta, objective, blocks, lambda: {})(lambda n, g: grads.__setitem__(n, g.cpu()))
    assert value == pytest.approx(v_full, rel=1e-5)
    for name, g in g_full.items():
        assert torch.allclose(grads[name], g, atol=1e-5, rtol=1e-4), name
    assert not meta.resident  # nothing left on the GPU


@needs_cuda
@pytest.mark.parametrize("gradient", ["full", "layerwise"])
def test_fw_merge_on_cuda_matches_cpu(tmp_path, tiny_pool, gradient):
    models = [tiny_pool["experts"]["copy"], tiny_pool["experts"]["rev"]]
    outs = {
        device: fw_merge(tmp_path, tiny_pool, models, device, iterations=3, gradient=gradient, device=device)
        for device in ("cpu", "cuda")
    }
    cpu, gpu = load_tensors(outs["cpu"]), load_tensors(outs["cuda"])
    for name in cpu:
        assert torch.allclose(cpu[name], gpu[name], atol=1e-4), name


def test_layerwise_gradient_equals_full_backward_roberta_masked_lm_on_unlabeled_text(tmp_path):
    from transformers import RobertaConfig, RobertaForMaskedLM

    from fwllm.data.calibration import UNLABELED
    from conftest import encoder_rows as rows, roberta_tokenizer

    cfg = RobertaConfig(
        vocab_size=25,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=20,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    model = RobertaForMaskedLM(cfg).eval()
    texts = [{"text": r["sentence"]} for r in rows("sum_mod3", 5, 3)]
    objective = encode_tasks(
        [CalibrationTask("mlm", UNLABELED, texts)], roberta_tokenizer(), model, batch_size=2
    )
    v_full, g_full = full_gradient(model, objective)
    v_layer, g_layer, _ = layerwise_gradient(copy.deepcopy(model), objective, tmp_path)
    assert v_layer == pytest.approx(v_full, rel=1e-6)
    assert set(g_layer) == set(g_full)
    for name, g in g_full.items():
        assert torch.allclose(g_layer[name], g, atol=1e-6, rtol=1e-5), name


def test_stochastic_fw_merge_with_layerwise_gradient_matches_full(tmp_path, tiny_pool):
    models = [tiny_pool["experts"]["copy"], tiny_pool["experts"]["rev"]]
    outs = {
        mode: fw_merge(
            tmp_path, tiny_pool, models, mode, iterations=3, gradient=mode, batches_per_iteration=1
        )
        for mode in ("full", "layerwise")
    }
    full, layer = load_tensors(outs["full"]), load_tensors(outs["layerwise"])
    for name in full:
        assert torch.allclose(full[name], layer[name], atol=1e-5), name
    traces = [json.load(open(outs[m] / "fwllm_plan" / "trace.json"))["trace"] for m in ("full", "layerwise")]
    assert [t["objective"] for t in traces[0]] == pytest.approx([t["objective"] for t in traces[1]], rel=1e-5)
    assert [t["chosen"] for t in traces[0]] == [t["chosen"] for t in traces[1]]


def test_each_fetch_reads_one_tensor_from_a_mapping_without_contains(tmp_path):
    """accelerate's weights loader is a plain Mapping: `name in loader` would read the tensor. A
    layer-by-layer pass must read every tensor it materialises once, and nothing to test membership."""
    from collections.abc import Mapping

    class Counting(Mapping):
        def __init__(self, inner):
            self.inner, self.reads = inner, 0

        def __getitem__(self, key):
            self.reads += 1
            return self.inner[key]

        def __iter__(self):
            return iter(self.inner)

        def __len__(self):
            return len(self.inner)

    model = tiny_llama(tie=True)
    objective = causal_objective(model)
    model.save_pretrained(tmp_path / "m")
    weights = Counting(base_weights(str(tmp_path / "m")))
    blocks = [n for n, _ in model.named_parameters()]
    meta = MetaModel(skeleton(str(tmp_path / "m")), weights, "cpu", trainable=blocks)
    assert weights.reads == 0  # checking that every parameter is stored reads nothing
    StreamedGradient(meta, objective, blocks, lambda: {})(lambda n, g: None)
    assert meta.fetches > len(blocks)  # layers come back for the backward
    assert weights.reads == meta.fetches


def test_a_point_the_caller_rejects_gets_its_value_and_no_backward(tmp_path):
    """`accept(value)` False (FW's adaptive step retried): the value is the full objective's, the
    layer-by-layer backward is skipped (no gradient handed on, no layer fetched for it); a point
    accepted gets the usual gradient."""
    model = tiny_llama()
    tasks = [CalibrationTask("copy", CAUSAL, task_rows("copy", 4, 1))]
    objective = encode_tasks(tasks, tiny_tokenizer(), model, batch_size=4)  # one micro-batch group
    v_full, g_full = full_gradient(model, objective)
    _, _, gradient = layerwise_gradient(copy.deepcopy(model), objective, tmp_path)
    fetched = []
    fetch = gradient._fetch_layer
    gradient._fetch_layer = lambda i: (fetched.append(i), fetch(i))[1]
    seen, values = {}, []
    value = gradient(seen.__setitem__, accept=lambda v: values.append(v) or False)
    assert value == pytest.approx(v_full, rel=1e-6) and values == [value]
    assert not seen and fetched == list(range(len(model.model.layers)))  # the forward's fetches only
    value = gradient(seen.__setitem__, accept=lambda v: True)
    assert value == pytest.approx(v_full, rel=1e-6) and set(seen) == set(g_full)
    for name, g in g_full.items():
        assert torch.allclose(seen[name], g, atol=1e-6, rtol=1e-5), name
