"""Scoring a causal LM on dev rows: choice log-likelihoods and response NLL, per row.

Both reduce to one primitive, `run_requests`: a token sequence and groups of (position,
token) targets, each target scored as log p(token | sequence[:position]). A
multiple-choice row whose choices are single tokens is one sequence (the prompt) with one
target per choice, so scoring it costs one forward pass whatever the number of choices;
a longer choice gets a sequence of its own.

Tokenization follows the calibration objective and the expert training
(`fwllm.data.encoding`): prompt with the tokenizer's special tokens, continuation without,
long prompts keep their end. Choices carry their own leading space (" yes"), as lm-eval's
target delimiter gives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

from fwllm.arch.kinds import PLAIN_HEAD_CAUSAL_LMS

SCORE_DTYPES = ("auto", "float32", "bfloat16")

Target = Tuple[int, int]  # (position p, token id): log p(token | ids[:p]); p may equal len(ids)


@dataclass
class Request:
    ids: List[int]
    groups: List[List[Target]]


def scoring_dtype(name: str, device: str) -> torch.dtype:
    """The dtype models are scored in. "auto" is bfloat16 where the hardware has bfloat16
    matmuls (CUDA, or a CPU with AVX512-BF16 / AMX: 2.5x faster than float32 on this
    benchmark, eval/score_dtype.py measures what it changes) and float32 elsewhere, where
    bfloat16 would be emulated and slower."""
    if name not in SCORE_DTYPES:
        raise ValueError(f"score dtype {name!r}: choose from {', '.join(SCORE_DTYPES)}")
    if name != "auto":
        return getattr(torch, name)
    native = str(device).startswith("cuda") or cpu_has_native_bf16()
    return torch.bfloat16 if native else torch.float32


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def prompt_ids(tokenizer, prompt: str, max_tokens: int) -> List[int]:
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return ids[-max_tokens:] if max_tokens > 0 else ids


def choice_requests(
    tokenizer, prompt: str, choices: Sequence[str], max_prompt_tokens: int
) -> Tuple[List[Request], List[Tuple[int, int]]]:
    """Requests for one multiple-choice row, and where each choice's score lands: (request
    index, group index). Single-token choices share the prompt's request."""
    context = prompt_ids(tokenizer, prompt, max_prompt_tokens)
    shared = Request(list(context), [])
    requests, where = [shared], []
    for choice in choices:
        cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
        if not cont:
            raise ValueError(f"choice {choice!r} tokenizes to nothing")
        targets = [(len(context) + j, tok) for j, tok in enumerate(cont)]
        if len(cont) == 1:
            shared.groups.append(targets)
            where.append((0, len(shared.groups) - 1))
        else:
            requests.append(Request(list(context) + cont[:-1], [targets]))
            where.append((len(requests) - 1, 0))
    return requests, where


def response_request(tokenizer, prompt: str, response: str, max_length: int) -> Request:
    """Prompt + response + eos, the loss on the response tokens and eos (the calibration
    objective's encoding)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    resp = (tokenizer(response, add_special_tokens=False)["input_ids"] + eos)[: max_length - 1]
    head = tokenizer(prompt, add_special_tokens=True)["input_ids"][-(max_length - len(resp)) :]
    ids = head + resp
    return Request(ids, [[(p, ids[p]) for p in range(len(head), len(ids))]])


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _batches(lengths: Sequence[int], max_batch_tokens: int) -> List[List[int]]:
    """Longest first; a batch grows while rows x its longest row stays within the budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: List[List[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= max_batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@torch.no_grad()
def run_requests(
    model, requests: Sequence[Request], pad_id: int, max_batch_tokens: int = 2048
) -> List[List[Tuple[float, int]]]:
    """(summed log-probability, target count) for every group of every request."""
    device = next(model.parameters()).device
    plain = type(model).__name__ in PLAIN_HEAD_CAUSAL_LMS
    out: List[List[Tuple[float, int]]] = [[] for _ in requests]
    for batch in _batches([max(len(r.ids), 1) for r in requests], max_batch_tokens):
        width = max(len(requests[i].ids) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(requests[i].ids)] = torch.tensor(requests[i].ids)
            mask[row, : len(requests[i].ids)] = 1
        rows, cols, toks = [], [], []
        for row, i in enumerate(batch):
            for group in requests[i].groups:
                for p, tok in group:
                    if not 0 < p <= len(requests[i].ids):
                        raise ValueError(f"target position {p} outside a sequence of {len(requests[i].ids)}")
                    rows.append(row), cols.append(p - 1), toks.append(tok)
        ids, mask = ids.to(device), mask.to(device)
        if plain:  # project only the positions that predict a target (the vocabulary matmul is large)
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            logits = model.lm_head(hidden[rows, cols])
        else:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, cols]
        logp = torch.log_softmax(logits.float(), dim=-1)[
            torch.arange(len(toks)), torch.tensor(toks, device=device)
        ]
        logp = logp.cpu().tolist()
        at = 0
        for i in batch:
            for group in requests[i].groups:
                out[i].append((float(sum(logp[at : at + len(group)])), len(group)))
                at += len(group)
    return out


def choice_logprobs(
    model, tokenizer, rows: Sequence[dict], max_prompt_tokens: int, max_batch_tokens: int = 2048
) -> List[List[float]]:
    """Per row, the summed log-likelihood of each choice given the prompt."""
    requests, where = [], []
    for row in rows:
        reqs, places = choice_requests(tokenizer, row["prompt"], row["choices"], max_prompt_tokens)
        where.append([(len(requests) + r, g) for r, g in places])
        requests.extend(reqs)
    results = run_requests(model, requests, _pad_id(tokenizer), max_batch_tokens)
    return [[results[r][g][0] for r, g in places] for places in where]


def response_nll(
    model, tokenizer, rows: Sequence[dict], max_length: int, max_batch_tokens: int = 2048
) -> Tuple[np.ndarray, np.ndarray]:
    """Per row, the summed NLL of the response tokens (+ eos) and their count."""
    requests = [response_request(tokenizer, r["prompt"], r["response"], max_length) for r in rows]
    results = run_requests(model, requests, _pad_id(tokenizer), max_batch_tokens)
    nll = np.array([-res[0][0] for res in results])
    count = np.array([res[0][1] for res in results], dtype=float)
    return nll, count
