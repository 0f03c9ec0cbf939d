"""Random checkpoints with real shapes, for the scale benchmark (`eval/bench_scale.py`).

Speed and memory do not depend on the values, so each model is random bf16 weights of its
real shapes, written as sharded safetensors with an index, as on the Hub, together with
a byte-level BPE tokenizer trained here on the calibration text (only token ids matter,
and they stay below every vocabulary size). LoRA adapters are peft folders with
random factors of realistic scale (B is not zero, so every adapter changes its layers).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

import torch
from safetensors.torch import save_file

SHAPES = {
    # a two-layer toy: checks the benchmark script end to end in seconds (no figure of it means anything)
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8192,
        tie_word_embeddings=False,
    ),
    "smol-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
}
SHARD_BYTES = 2 << 30
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config_of(name: str) -> dict:
    return dict(
        SHAPES[name],
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        torch_dtype="bfloat16",
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=False,
        mlp_bias=False,
    )


def tensor_shapes(cfg: dict) -> Dict[str, tuple]:
    h, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update(
            {
                f"{p}.input_layernorm.weight": (h,),
                f"{p}.post_attention_layernorm.weight": (h,),
                f"{p}.self_attn.q_proj.weight": (h, h),
                f"{p}.self_attn.k_proj.weight": (kv, h),
                f"{p}.self_attn.v_proj.weight": (kv, h),
                f"{p}.self_attn.o_proj.weight": (h, h),
                f"{p}.mlp.gate_proj.weight": (m, h),
                f"{p}.mlp.up_proj.weight": (m, h),
                f"{p}.mlp.down_proj.weight": (h, m),
            }
        )
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def random_tensor(shape: tuple, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)  # norms
    std = shape[-1] ** -0.5
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def write_tokenizer(folder: str, corpus: str, vocab_size: int = 8000) -> str:
    """A byte-level BPE tokenizer trained on `corpus` (a .jsonl of rows), saved as a transformers tokenizer."""
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    with open(corpus, encoding="utf-8") as fp:
        for line in fp:
            row = json.loads(line)
            texts.append(" ".join(str(v) for v in row.values()))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.save_pretrained(folder)
    return folder


def write_model(folder: str, name: str, tokenizer_dir: str, seed: int = 0) -> str:
    """A random bf16 checkpoint of `name`'s shapes, sharded like a Hub download (skipped if present)."""
    done = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(done):
        return folder
    os.makedirs(folder, exist_ok=True)
    cfg = config_of(name)
    gen = torch.Generator().manual_seed(seed)
    shard, size, weight_map, shards = {}, 0, {}, []

    def flush():
        nonlocal shard, size
        if shard:
            file = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
            shards.append(file)
            weight_map.update({n: file for n in shard})
        shard, size = {}, 0

    for tname, shape in tensor_shapes(cfg).items():
        t = random_tensor(shape, gen)
        if size + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[tname] = t
        size += t.numel() * 2
    flush()
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fp:
        json.dump(cfg, fp, indent=1)
    for f in os.listdir(tokenizer_dir):
        if f.startswith(("tokenizer", "special_tokens")) or f in ("vocab.json", "merges.txt"):
            with (
                open(os.path.join(tokenizer_dir, f), "rb") as src,
                open(os.path.join(folder, f), "wb") as dst,
            ):
                dst.write(src.read())
    with open(done + ".tmp", "w", encoding="utf-8") as fp:
        json.dump({"metadata": {}, "weight_map": weight_map}, fp)
    os.replace(done + ".tmp", done)
    return folder


def write_adapter(
    folder: str, base_cfg: dict, rank: int, targets: List[str], seed: int, alpha: float = None
) -> str:
    """A peft LoRA adapter with random factors (A ~ kaiming scale, B ~ small, both non-zero)."""
    if os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
        return folder
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(base_cfg)
    tensors = {}
    for name, shape in shapes.items():
        module = name.rsplit(".", 1)[0]
        if module.rsplit(".", 1)[-1] in targets and len(shape) == 2:
            out, inp = shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = (
                torch.randn(rank, inp, generator=gen) * inp**-0.5
            ).to(torch.bfloat16)
            tensors[f"base_model.model.{module}.lora_B.weight"] = (
                torch.randn(out, rank, generator=gen) * 0.01
            ).to(torch.bfloat16)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as fp:
        json.dump(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": alpha or 2 * rank,
                "target_modules": targets,
                "base_model_name_or_path": "base",
                "fan_in_fan_out": False,
                "use_rslora": False,
                "use_dora": False,
                "lora_dropout": 0.0,
                "bias": "none",
                "task_type": "CAUSAL_LM",
            },
            fp,
        )
    return folder


def paper_pool(root: str, base_cfg: dict) -> List[str]:
    """16 adapters: 8 of r=8 on q_proj, v_proj and 8 of r=16 on all seven projections."""
    out = []
    for i in range(16):
        small = i < 8
        out.append(
            write_adapter(
                os.path.join(root, f"lora{i:02d}"),
                base_cfg,
                8 if small else 16,
                ["q_proj", "v_proj"] if small else list(PROJECTIONS),
                seed=100 + i,
            )
        )
    return out
