"""RegMean on the bounded path (`gradient: layerwise`) against the in-RAM RegMean.

Truth: the Grams `collect_grams` takes on the whole candidate model (loaded whole, its LoRA
merged into the weights), and the in-RAM `regmean` merge through `fwllm merge`.
"""

import json
import re

import pytest
import torch
from mergekit.options import MergeOptions

from conftest import (
    load_tensors,
    perturbed_copies,
    save_tiny_llama_base,
    task_rows,
    tiny_tokenizer,
    write_jsonl,
    write_recipe,
)
from fwllm.arch.streaming import MetaModel
from fwllm.core.errors import FwllmError
from fwllm.core.job import CandidateSpec
from fwllm.data.calibration import load_calibration
from fwllm.data.encoding import encode_task
from fwllm.io.candidates import open_candidate
from fwllm.io.spill import FileSpill
from fwllm.kernels import regmean_reduced
from fwllm.mergekit_glue.merge import merge_recipe
from fwllm.solvers.grams import collect_grams
from fwllm.solvers.per_candidate import load_candidate_model
from fwllm.solvers.streamed_grams import StreamedRegMean

pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = ("copy", "rev")


@pytest.fixture(scope="module")
def pools(tmp_path_factory, one_thread):
    """A 2-layer tiny LLaMA base, two full candidates perturbed from it, two LoRA adapters on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("streamed_regmean")
    base = save_tiny_llama_base(root, intermediate_size=48, num_hidden_layers=2)
    for i, task in enumerate(TASKS):
        write_jsonl(root / "calib" / f"{task}.jsonl", task_rows(task, 10, seed=i))
    full = perturbed_copies(base, root, 2, 0.05, seed=10)
    adapters = []
    for i, rank in enumerate((4, 2)):
        torch.manual_seed(30 + i)
        model = get_peft_model(
            LlamaForCausalLM.from_pretrained(base),
            LoraConfig(
                r=rank, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]
            ),
        )
        with torch.no_grad():
            for n, prm in model.named_parameters():
                if "lora_B" in n:
                    prm.normal_(0, 0.3)  # peft starts B at zero: make every adapter change its layers
        model.save_pretrained(root / f"a{i}")
        adapters.append(root / f"a{i}")
    return {"root": root, "base": base, "calib": root / "calib", "full": full, "lora": adapters}


def streamed_grams(pools, models, weights=(1.0, 1.0)):
    """Run the streamed solve; return {(label, weight name): Gram} as it saw them, and the merge."""
    cands = [open_candidate(str(m)) for m in models]
    tok = tiny_tokenizer()
    batches = [
        encode_task(load_calibration(str(pools["calib"] / f"{t}.jsonl"))[0], tok, batch_size=3).batches
        for t in TASKS
    ]
    seen = {}
    solver = StreamedRegMean.for_candidates(
        str(pools["base"]),
        cands,
        weights,
        batches,
        0.9,
        1e-5,
        on_gram=lambda lab, n, g: seen.__setitem__((lab, n), g.clone()),
    )
    merged = dict(solver.merged())
    return seen, merged, cands


# row fractions: None, the default (these tiny layers take Grams); 100, activation rows throughout
# (the Grams shown to `on_gram` are formed from them, the solve is Woodbury's); 5, both: the two
# candidates' 240 tokens outgrow the 160 rows kept for a 32-wide input (Gram sums from the first
# candidate on) and fit the 240 kept for the 48-wide MLP down input (rows throughout)
ROW_FRACTIONS = [None, 100.0, 5.0]


@pytest.mark.parametrize("row_fraction", ROW_FRACTIONS)
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_streamed_grams_equal_the_whole_model_grams(pools, kind, row_fraction, monkeypatch):
    if row_fraction is not None:
        monkeypatch.setattr(regmean_reduced, "ROW_FRACTION", row_fraction)
    seen, merged, cands = streamed_grams(pools, pools[kind])
    tok = tiny_tokenizer()
    for cand, model_dir, task in zip(cands, pools[kind], TASKS):
        spec = CandidateSpec(cand.label, str(model_dir), None, {})
        model = load_candidate_model(spec, str(pools["base"]), "cpu")
        rows = load_calibration(str(pools["calib"] / f"{task}.jsonl"))[0]
        batches = encode_task(rows, tok, batch_size=3).batches
        truth, _ = collect_grams(model, batches)
        mine = {n: g for (lab, n), g in seen.items() if lab == cand.label}
        # one Gram per layer input: q/k/v share theirs, gate/up theirs
        for layer in range(2):
            pre = f"model.layers.{layer}."
            assert f"{pre}self_attn.q_proj.weight" in mine and f"{pre}self_attn.k_proj.weight" not in mine
            assert f"{pre}mlp.gate_proj.weight" in mine and f"{pre}mlp.up_proj.weight" not in mine
            assert f"{pre}self_attn.o_proj.weight" in mine and f"{pre}mlp.down_proj.weight" in mine
        assert len(mine) == 2 * 4 + 1  # + the LM head's
        shared = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
        for name, gram in truth.items():
            leader = re.sub(r"(k_proj|v_proj|up_proj)", lambda m: shared[m.group(1)], name)
            assert torch.allclose(mine[leader], gram, rtol=1e-4, atol=1e-4), name
    assert set(merged) == set(load_tensors(pools["base"]))  # every tensor of the model, once


def recipe_models(pools, kind):
    return [f"{pools['base']}+{m}" if kind == "lora" else str(m) for m in pools[kind]]


def merge_both(tmp_path, pools, kind, **params):
    models = recipe_models(pools, kind)
    out = {}
    for gradient in ("full", "layerwise"):
        recipe = write_recipe(
            tmp_path / f"{gradient}.yml",
            "regmean",
            pools["base"],
            models,
            {"calibration": str(pools["calib"]), "batch_size": 3, "gradient": gradient, **params},
            per_model=[{"task": "copy", "weight": 1.0}, {"task": "rev", "weight": 2.0}],
        )
        out[gradient] = tmp_path / gradient
        merge_recipe(str(recipe), str(out[gradient]), MergeOptions(quiet=True))
    return out


@pytest.mark.parametrize("row_fraction", ROW_FRACTIONS)
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_streamed_merge_equals_the_in_ram_merge(tmp_path, pools, kind, monkeypatch, row_fraction):
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    if row_fraction is not None:
        monkeypatch.setattr(regmean_reduced, "ROW_FRACTION", row_fraction)
    out = merge_both(tmp_path, pools, kind)
    full, layerwise = load_tensors(out["full"]), load_tensors(out["layerwise"])
    base = load_tensors(pools["base"])
    assert set(full) == set(layerwise)
    changed = 0
    for name, value in full.items():
        assert torch.allclose(layerwise[name], value, rtol=1e-5, atol=1e-6), name
        changed += not torch.allclose(value, base[name])
    assert changed >= (16 if kind == "full" else 6)  # the merge is not the base (LoRA: q, v, down x 2)
    plan = json.loads((out["layerwise"] / "fwllm_plan" / "plan.json").read_text())
    assert [c["file"] for c in plan["candidates"]] == ["merged", "merged"]
    assert all(c["meta"]["tokens"] > 0 for c in plan["candidates"])
    assert not (out["layerwise"] / "fwllm_plan" / "gram").exists()


def test_one_layer_at_a_time_and_no_gram_on_disk(tmp_path, pools, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FWLLM_CACHE", str(cache))
    resident_layers, fetches = [], []
    original = MetaModel.fetch

    def counting_fetch(self, names, source=None):
        original(self, names, source)
        found = (re.match(r"model\.layers\.(\d+)\.", n) for n in self.resident)
        layers = {int(m.group(1)) for m in found if m}
        outer = [n for n in self.resident if not n.startswith("model.layers.")]
        resident_layers.append(len(layers) + (1 if outer else 0))
        fetches.append(sorted(layers))

    monkeypatch.setattr(MetaModel, "fetch", counting_fetch)
    spilled = []
    spill = FileSpill.__call__
    monkeypatch.setattr(FileSpill, "__call__", lambda self, x: spilled.append(x.shape) or spill(self, x))
    models = [str(m) for m in pools["full"]]
    recipe = write_recipe(
        tmp_path / "r.yml",
        "regmean",
        pools["base"],
        models,
        {"calibration": str(pools["calib"]), "batch_size": 3, "gradient": "layerwise"},
        per_model=[{"task": "copy"}, {"task": "rev"}],
    )
    merge_recipe(str(recipe), str(tmp_path / "out"), MergeOptions(quiet=True))
    assert fetches and max(resident_layers) == 1  # one decoder layer (or one outer module) at a time
    # layer-major: each layer is materialised once per candidate, in order
    layer_fetches = [f[0] for f in fetches if f]
    assert layer_fetches == [0, 0, 1, 1]
    assert not (cache / "stats").exists() or not any((cache / "stats").rglob("*.safetensors"))
    assert (tmp_path / "out" / "fwllm_plan" / "DONE").exists()
    # the hidden states between layers went to file-backed pages: the stack input per candidate and
    # micro-batch (4 micro-batches of 3 rows), each layer's output written over them; their scratch
    # folder is gone
    assert len(spilled) == 2 * 4 and all(shape[-1] == 32 for shape in spilled)
    assert not (tmp_path / "out" / "fwllm_plan" / ".regmean_scratch").exists()


def test_auto_goes_layerwise_when_ram_is_short(tmp_path, pools, monkeypatch):
    import fwllm.methods.fw_merging as fw

    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fw, "available_memory", lambda: 1 << 20)  # 1 MiB free: the in-RAM path cannot fit
    recipe = write_recipe(
        tmp_path / "r.yml",
        "regmean",
        pools["base"],
        recipe_models(pools, "lora"),
        {"calibration": str(pools["calib"]), "batch_size": 3},
        per_model=[{"task": "copy"}, {"task": "rev"}],
    )
    merge_recipe(str(recipe), str(tmp_path / "out"), MergeOptions(quiet=True))
    plan = json.loads((tmp_path / "out" / "fwllm_plan" / "plan.json").read_text())
    assert [c["meta"].get("gram") for c in plan["candidates"]] == ["streamed", "streamed"]


def test_layerwise_refuses_a_dora_adapter_before_reading_weights(tmp_path, pools, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    dora = get_peft_model(
        LlamaForCausalLM.from_pretrained(pools["base"]),
        LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, use_dora=True, target_modules=["q_proj"]),
    )
    dora.save_pretrained(tmp_path / "dora")
    models = [recipe_models(pools, "lora")[0], f"{pools['base']}+{tmp_path / 'dora'}"]
    recipe = write_recipe(
        tmp_path / "r.yml",
        "regmean",
        pools["base"],
        models,
        {"calibration": str(pools["calib"]), "gradient": "layerwise"},
        per_model=[{"task": "copy"}, {"task": "rev"}],
    )
    with pytest.raises(FwllmError, match="layerwise runs plain LoRA adapters only"):
        merge_recipe(str(recipe), str(tmp_path / "out"), MergeOptions(quiet=True))


def test_too_little_disk_for_the_merge_and_its_hidden_states_is_one_error_before_any_layer(
    tmp_path, pools, monkeypatch
):
    import shutil

    import fwllm.io.iterate_store as store

    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    fetched = []
    monkeypatch.setattr(MetaModel, "fetch", lambda self, names, source=None: fetched.append(names))
    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1024))
    recipe = write_recipe(
        tmp_path / "r.yml",
        "regmean",
        pools["base"],
        recipe_models(pools, "lora"),
        {"calibration": str(pools["calib"]), "batch_size": 3, "gradient": "layerwise"},
        per_model=[{"task": "copy"}, {"task": "rev"}],
    )
    # 1 KiB free: less than the merge's factors and both candidates' hidden states need
    with pytest.raises(FwllmError, match=r"the merge's factors and the hidden states needs .* of free disk"):
        merge_recipe(str(recipe), str(tmp_path / "out"), MergeOptions(quiet=True))
    assert fetched == []  # no layer was read
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("DONE"))


@pytest.mark.parametrize("kind,expected", [("lora", 2), ("full", 4)])
def test_outer_weights_are_read_once_per_phase_and_source(pools, monkeypatch, kind, expected):
    """The embedding (outside the stack) is read at its first forward and kept through the phase:
    once per phase for a LoRA pool (every candidate runs on the base's), once per candidate and
    phase for full candidates (each its own); not once per micro-batch (4 per candidate here)."""
    read = []
    original = MetaModel.fetch

    def counting_fetch(self, names, source=None):
        read.extend(n for n in names if n not in self.resident)
        original(self, names, source)

    monkeypatch.setattr(MetaModel, "fetch", counting_fetch)
    _, merged, _ = streamed_grams(pools, pools[kind])
    assert read.count("model.embed_tokens.weight") == expected  # capture + top
    assert "model.embed_tokens.weight" in merged
