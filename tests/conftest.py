"""Shared fixtures: a tiny LLaMA pool built in seconds, offline, deterministic.

Two tasks share one prompt format ("copy" and "rev" map the same digits to different
outputs), so their task vectors conflict; a third expert trains on shuffled targets
(irrelevant). Bigger, purpose-built pools come from `fwllm.experts` (tests/test_experts.py).
"""

import json
import os
import random
import sys
import tempfile
import threading
import weakref

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# fwllm's caches (plans, statistics, the identity memo) never land in the real ~/.cache
os.environ["FWLLM_CACHE"] = tempfile.mkdtemp(prefix="fwllm-tests-cache-")
# the benchmark harness (eval/fwbench) is not part of the package; tests/fwbench import it as eval/
# scripts do.
# Appended, so eval's scripts never shadow an installed module.
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval"))

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [str(d) for d in range(10)] + ["copy", "rev", "=", ":"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def task_rows(task, n, seed, shuffled=False):
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        digits = [str(r.randint(0, 9)) for _ in range(4)]
        out = digits if task == "copy" else digits[::-1]
        if shuffled:
            out = [str(r.randint(0, 9)) for _ in range(4)]
        rows.append({"prompt": f"{task} : {' '.join(digits)} =", "response": " ".join(out)})
    return rows


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fp:
        for row in rows:
            fp.write(json.dumps(row) + "\n")


def finetune(model, tokenizer, rows, steps=40, lr=3e-3):
    from fwllm.data.calibration import CAUSAL, CalibrationTask
    from fwllm.data.objective import encode_tasks

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrappers
    objective = encode_tasks([CalibrationTask("t", CAUSAL, rows)], tokenizer, inner)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        objective.backward(model)
        opt.step()
    return model


def save_tiny_llama_base(root, intermediate_size=64, num_hidden_layers=2):
    """A random tiny LlamaForCausalLM (seed 0) with the digit tokenizer in root/base, and an
    empty root/calib for the test's calibration rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    (root / "calib").mkdir()
    return root / "base"


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory):
    """{'root', 'base', 'experts': {name: dir}, 'calib': dir, 'dev': dir} for a tiny LLaMA pool."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_pool")
    tok = tiny_tokenizer()
    base_dir = save_tiny_llama_base(root)
    calib, dev = root / "calib", root / "dev"
    dev.mkdir()
    for task in ("copy", "rev"):
        write_jsonl(calib / f"{task}.jsonl", task_rows(task, 16, seed=1))
        write_jsonl(dev / f"{task}.jsonl", task_rows(task, 32, seed=2))
    experts = {}
    for name, (task, shuffled) in {
        "copy": ("copy", False),
        "rev": ("rev", False),
        "noise": ("copy", True),
    }.items():
        torch.manual_seed(1)
        model = LlamaForCausalLM.from_pretrained(base_dir)
        finetune(model, tok, task_rows(task, 48, seed=3, shuffled=shuffled))
        experts[name] = root / name
        model.save_pretrained(experts[name])
        tok.save_pretrained(experts[name])
    return {"root": root, "base": base_dir, "experts": experts, "calib": calib, "dev": dev}


def perturbed_copies(source, root, n, scale, seed, prefix="m"):
    """n LLaMA checkpoints = `source` + scale * std * N(0, 1) noise on every parameter (seeds seed, seed+1, ...)."""
    from transformers import LlamaForCausalLM

    paths = []
    for i in range(n):
        model = LlamaForCausalLM.from_pretrained(source)
        torch.manual_seed(seed + i)
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(scale * prm.std() * torch.randn_like(prm))
        model.save_pretrained(root / f"{prefix}{i}")
        paths.append(root / f"{prefix}{i}")
    return paths


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core box: extra threads only add contention (and ordering noise)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_tensors(folder):
    """Every tensor of a model folder, over all its safetensors shards."""
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def two_head_encoder_pool(root, body_noise: float = 0.0):
    """A RoBERTa MLM base and two classifier experts ("two": 2 labels, "three": 3 labels) with
    their calibration rows in root/calib; `body_noise` perturbs each expert's body (x std)."""
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification

    cfg = RobertaConfig(
        vocab_size=len(ENC_WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=20,
        pad_token_id=1,
    )
    tok = roberta_tokenizer()
    torch.manual_seed(0)
    RobertaForMaskedLM(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    (root / "calib").mkdir()
    rng = random.Random(0)
    experts = []
    for task, labels in (("two", 2), ("three", 3)):
        rows = [
            {"sentence": " ".join(f"w{rng.randint(0, 19)}" for _ in range(5)), "label": rng.randrange(labels)}
            for _ in range(6)
        ]
        write_jsonl(root / "calib" / f"{task}.jsonl", rows)
        torch.manual_seed(labels)
        model = RobertaForSequenceClassification.from_pretrained(root / "base", num_labels=labels)
        if body_noise:
            with torch.no_grad():
                for prm in model.roberta.parameters():
                    prm.add_(body_noise * prm.std() * torch.randn_like(prm))
        model.save_pretrained(root / task)
        experts.append(root / task)
    return experts


@pytest.fixture(scope="session")
def tiny_pools_root(tmp_path_factory):
    """One cache root for `fwllm.experts` tiny pools, so each family is trained once per run."""
    return str(tmp_path_factory.mktemp("expert_pools"))


def write_recipe(path, method, base, models, parameters=None, dtype="float32", per_model=None):
    import yaml

    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(m), **({"parameters": per_model[i]} if per_model else {})}
            for i, m in enumerate(models)
        ],
        "dtype": dtype,
    }
    if parameters:
        recipe["parameters"] = parameters
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def tiny_llama(layers=3, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=18,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


ENC_WORDS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + [f"w{i}" for i in range(20)]


def roberta_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(ENC_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


def encoder_rows(task, n, seed):
    r = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [r.randint(0, 19) for _ in range(6)]
        label = int(ids[0] >= 10) if task == "first_high" else sum(ids) % 3
        out.append({"sentence": " ".join(f"w{i}" for i in ids), "label": label})
    return out


def merge(tmp_path, name, method, pool, models, parameters=None, per_model=None):
    """Write a recipe over `pool["base"]` and merge it with `fwllm merge`; returns the output folder."""
    recipe = write_recipe(
        tmp_path / f"{name}.yml", method, pool["base"], models, parameters, per_model=per_model
    )
    out = tmp_path / name
    from mergekit.options import MergeOptions

    from fwllm.mergekit_glue.merge import merge_recipe

    merge_recipe(str(recipe), str(out), MergeOptions(quiet=True))
    return out


def fwllm_merge(*args):
    """`fwllm merge ARGS...` in this process (click's runner): the result with exit_code and output."""
    from click.testing import CliRunner

    from fwllm.cli import main

    return CliRunner().invoke(main, ["merge", *map(str, args)])


def one_error_line(result):
    """The one `Error:` line a failed command printed (and no traceback)."""
    assert result.exit_code != 0, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output[-3000:]
    return errors[0]


def save_random_loras(base, root, ranks, seed, targets=("q_proj", "down_proj")):
    """peft LoRA adapters of `ranks` on `base`, with random B (peft starts B at zero: these change their
    layers), saved as root/a0, root/a1, ...; returns their `BASE+ADAPTER` references."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    refs = []
    for i, rank in enumerate(ranks):
        torch.manual_seed(seed + i)
        model = get_peft_model(
            LlamaForCausalLM.from_pretrained(base),
            LoraConfig(r=rank, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0),
        )
        with torch.no_grad():
            for n, prm in model.named_parameters():
                if "lora_B" in n:
                    prm.normal_(0, 0.3)
        model.save_pretrained(root / f"a{i}")
        refs.append(f"{base}+{root / f'a{i}'}")
    return refs


def fw_params(pool, **kw):
    # the paper's open-loop FW (the defaults before the benchmark's won): what these tests were written for
    return {
        "calibration": str(pool["calib"]),
        "preset": "paper",
        "iterations": 5,
        "step_size": 0.5,
        "scaling": 1.0,
        **kw,
    }


class Residency:
    """How many tensors read from disk are alive now, and at most (a finalizer per tracked tensor)."""

    def __init__(self):
        self.now = self.peak = 0
        self._lock = threading.Lock()

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        weakref.finalize(tensor, self._release)
        return tensor

    def _release(self) -> None:
        with self._lock:
            self.now -= 1

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.now


@pytest.fixture
def resident(monkeypatch):
    """Counts the candidate tensors fwllm reads from disk (`TensorReader.get`, `AdapterReader.delta`)
    that are alive now and at most, by wrapping the two readers: product reads carry no counter."""
    from fwllm.io.adapters import AdapterReader
    from fwllm.io.tensors import TensorReader

    counter = Residency()
    for cls, name in ((TensorReader, "get"), (AdapterReader, "delta")):

        def tracked(self, *args, _read=getattr(cls, name), **kwargs):
            out = _read(self, *args, **kwargs)
            return out if out is None else counter.track(out)

        monkeypatch.setattr(cls, name, tracked)
    return counter
