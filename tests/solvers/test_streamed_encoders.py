"""Encoders (RoBERTa) on the bounded path: for every data-informed method, the merge with
`gradient: layerwise` (a meta skeleton, one encoder layer at a time) equals the in-RAM merge
(`gradient: full`, the whole model loaded), tensor by tensor.

Pools: classifier experts over a masked-LM base (each task keeps its own head: adapters carry no
head fwllm reads, so this pool is full checkpoints only), and masked-LM candidates over the same
base, full checkpoints and LoRA adapters.
"""

import json
import random

import pytest
import torch

from conftest import ENC_WORDS, load_tensors, merge, roberta_tokenizer, write_jsonl
from fwllm.arch.heads import load_heads

pytestmark = pytest.mark.usefixtures("one_thread")
CLS_TASKS = (("two", 2), ("three", 3))


def sentences(n, seed):
    r = random.Random(seed)
    return [" ".join(f"w{r.randint(0, 19)}" for _ in range(r.randint(4, 7))) for _ in range(n)]


def perturbed(cls, source, path, scale, seed, **kw):
    """`source` loaded as `cls` (+ scale * std * N(0, 1) on every parameter), saved at `path`."""
    model = cls.from_pretrained(source, **kw)
    torch.manual_seed(seed)
    with torch.no_grad():
        for prm in model.roberta.parameters() if scale else ():
            prm.add_(scale * prm.std() * torch.randn_like(prm))
        for prm in model.parameters():  # LayerNorms and biases start at 1 and 0: move them too
            if prm.dim() == 1:
                prm.add_(0.05 * torch.randn_like(prm))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pools(tmp_path_factory, one_thread):
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification

    root = tmp_path_factory.mktemp("streamed_encoders")
    cfg = RobertaConfig(
        vocab_size=len(ENC_WORDS),
        hidden_size=16,
        num_hidden_layers=2,  # two: the second layer takes the first one's output
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=20,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    RobertaForMaskedLM(cfg).save_pretrained(root / "base")
    roberta_tokenizer().save_pretrained(root / "base")
    rng = random.Random(0)
    (root / "calib_cls").mkdir()
    (root / "calib_mlm").mkdir()
    cls_experts = []
    for i, (task, labels) in enumerate(CLS_TASKS):
        rows = [{"sentence": s, "label": rng.randrange(labels)} for s in sentences(6, seed=i)]
        write_jsonl(root / "calib_cls" / f"{task}.jsonl", rows)
        torch.manual_seed(labels)  # the head's initialisation
        path = root / task
        cls_experts.append(
            perturbed(RobertaForSequenceClassification, root / "base", path, 0.3, 10 + i, num_labels=labels)
        )
    mlm_full = []
    for i, task in enumerate(("a", "b")):
        write_jsonl(root / "calib_mlm" / f"{task}.jsonl", [{"text": s} for s in sentences(5, seed=20 + i)])
        mlm_full.append(perturbed(RobertaForMaskedLM, root / "base", root / f"mlm{i}", 0.3, 30 + i))
    adapters = []
    for i, rank in enumerate((4, 2)):
        torch.manual_seed(40 + i)
        model = get_peft_model(
            RobertaForMaskedLM.from_pretrained(root / "base"),
            # "dense": the attention output, the MLP's two maps and the masked-LM head's transform
            LoraConfig(r=rank, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value", "dense"]),
        )
        with torch.no_grad():
            for n, prm in model.named_parameters():
                if "lora_B" in n:
                    prm.normal_(0, 0.3)  # peft starts B at zero: make every adapter change its layers
        model.save_pretrained(root / f"a{i}")
        adapters.append(f"{root / 'base'}+{root / f'a{i}'}")
    return {
        "base": root / "base",
        "cls": {"models": cls_experts, "calib": root / "calib_cls", "tasks": [t for t, _ in CLS_TASKS]},
        "mlm": {"models": mlm_full, "calib": root / "calib_mlm", "tasks": ["a", "b"]},
        "mlm_lora": {"models": adapters, "calib": root / "calib_mlm", "tasks": ["a", "b"]},
    }


METHODS = {
    "regmean": ("regmean", {"batch_size": 3}),
    "fisher": ("fisher", {"top_k": 2}),
    "fisher_empirical": ("fisher", {"fisher": "empirical", "normalize_fisher": True}),
    "adamerging": ("adamerging", {"steps": 2, "lr": 0.05, "batch_size": 4}),
    # the default preset: FW, then RegMean over FW's support (`refine: regmean`)
    "fw": ("fw_merging", {"iterations": 2, "batch_size": 4}),
    "fw_init_base": ("fw_merging", {"iterations": 2, "batch_size": 4, "init": "base"}),
}


CASES = [
    (case, pool)
    for case in METHODS
    for pool in ("cls", "mlm", "mlm_lora")
    # the empirical Fisher needs observed labels: unlabeled masked-LM text has none, in RAM too
    if not (case == "fisher_empirical" and pool != "cls")
]


@pytest.mark.parametrize("case, pool_kind", CASES)
def test_layerwise_merge_equals_the_in_ram_merge(tmp_path, monkeypatch, pools, pool_kind, case):
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    method, params = METHODS[case]
    pool = pools[pool_kind]
    per_model = [{"task": t, "weight": w} for t, w in zip(pool["tasks"], (1.0, 0.5))]
    if method == "adamerging":
        per_model = [{"task": t} for t in pool["tasks"]]  # (no weights: AdaMerging learns them)
    outs = {}
    for gradient in ("full", "layerwise"):
        outs[gradient] = merge(
            tmp_path,
            gradient,
            method,
            {"base": pools["base"]},
            pool["models"],
            {"calibration": str(pool["calib"]), "gradient": gradient, **params},
            per_model=per_model,
        )
    full, layer = load_tensors(outs["full"]), load_tensors(outs["layerwise"])
    assert set(full) == set(layer)
    for name in full:
        torch.testing.assert_close(layer[name], full[name], rtol=1e-5, atol=1e-6, msg=name)
    # the comparison is of a merge: the body moved off the base in every layer
    base = load_tensors(pools["base"])
    moved = {n for n in full if n in base and not torch.equal(full[n], base[n])}
    assert {f"roberta.encoder.layer.{i}.attention.self.query.weight" for i in (0, 1)} <= moved
    if pool_kind == "cls":  # each task keeps its own expert's head, the checkpoint the first one's
        for out in outs.values():
            heads = load_heads(str(out))
            assert set(heads) == {"two", "three"}
            for task, expert in zip(pool["tasks"], pool["models"]):
                own = load_tensors(expert)
                assert all(torch.equal(t, own[n]) for n, t in heads[task].tensors.items()), task
        first = load_tensors(pool["models"][0])
        assert torch.equal(layer["classifier.out_proj.weight"], first["classifier.out_proj.weight"])
    # the bounded path did run (not a fallback to the in-RAM one)
    plan = json.loads((outs["layerwise"] / "fwllm_plan" / "plan.json").read_text())
    if method == "fw_merging":
        assert plan["gradient"]["mode"] == "layerwise" and plan["gradient"]["refine"] == "streamed grams"
    elif method == "regmean":
        assert [c["meta"]["gram"] for c in plan["candidates"]] == ["streamed", "streamed"]
    elif method == "fisher":  # the layer-major order is causal-only: encoders take the disk sums
        assert [c["meta"]["order"] for c in plan["candidates"]] == ["disk sums", "disk sums"]
    else:
        trace = json.loads((outs["layerwise"] / "fwllm_plan" / "trace.json").read_text())
        assert trace["gradient"]["mode"] == "layerwise" and trace["gradient"]["layer_fetches"] > 0
