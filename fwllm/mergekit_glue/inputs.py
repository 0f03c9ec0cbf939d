"""What a plan was made from: the content identities of its base, candidates and calibration.

`job_inputs` names every model, adapter and calibration file a solve reads, each by its
content identity (`fwllm.io.identity`). A plan folder keeps them in `inputs.json`, beside
`plan.json`; reusing a plan compares the recorded identities with the current ones, and
the plain-mergekit plan cache is keyed by them (`content_key`), so an edited calibration
file or an expert retrained in the same folder gets a fresh solve, never the old plan.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional

from fwllm.core.errors import FwllmError
from fwllm.core.job import MergeJob
from fwllm.core.method import DataMethod
from fwllm.data.calibration import calibration_files
from fwllm.io.identity import digest, file_identity, model_identity
from fwllm.core.trust import check_trusted

INPUTS_FILE = "inputs.json"


def _model(ref: Optional[str]) -> Optional[dict]:
    return None if not ref else {"ref": ref, "id": model_identity(ref)}


def calibration_inputs(path: str) -> dict:
    """The calibration files a solve reads, by name relative to the source, and their identities."""
    root = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    files = {os.path.relpath(file, root): file_identity(file) for _, file in calibration_files(path)}
    return {"path": os.path.abspath(path), "files": files}


def job_inputs(job: MergeJob) -> dict:
    return {
        "base": _model(job.base),
        "candidates": [
            {"label": c.label, "model": _model(c.model), "lora": _model(c.lora)} for c in job.candidates
        ],
        "calibration": calibration_inputs(job.params.calibration),
    }


def content_key(inputs: dict) -> str:
    """One identity over the contents alone (paths do not count: a copied pool keeps its key)."""
    flat = {"base": inputs["base"]["id"]}
    for i, c in enumerate(inputs["candidates"]):
        flat[f"candidate{i}"] = c["model"]["id"]
        flat[f"lora{i}"] = c["lora"]["id"] if c["lora"] else ""
    flat.update({f"calibration/{name}": ident for name, ident in inputs["calibration"]["files"].items()})
    return digest(flat)


def write_inputs(plan_dir: str, inputs: dict) -> None:
    os.makedirs(plan_dir, exist_ok=True)
    with open(os.path.join(plan_dir, INPUTS_FILE), "w", encoding="utf-8") as fp:
        json.dump(inputs, fp, indent=1)


def read_inputs(plan_dir: str) -> Optional[dict]:
    """The recorded inputs (None when unreadable); a plan folder that is not trusted is an error,
    whatever it claims: its record is only as good as whoever could write it."""
    check_trusted("plan folder", plan_dir)
    try:
        with open(os.path.join(plan_dir, INPUTS_FILE), encoding="utf-8") as fp:
            return json.load(fp)
    except (OSError, ValueError):
        return None


def changes(recorded: dict, current: dict) -> List[str]:
    """What differs between two `job_inputs`, in words (empty when the contents are the same)."""
    out = []
    if recorded["base"]["id"] != current["base"]["id"]:
        out.append(f"the base {current['base']['ref']} changed")
    was = {c["label"]: c for c in recorded["candidates"]}
    now = {c["label"]: c for c in current["candidates"]}
    if list(was) != list(now):
        out.append(f"the candidates were {list(was)}, the recipe now gives {list(now)}")
    for label in set(was) & set(now):
        if was[label]["model"]["id"] != now[label]["model"]["id"]:
            out.append(f"candidate {label} changed")
        if (was[label]["lora"] or {}).get("id") != (now[label]["lora"] or {}).get("id"):
            out.append(f"the adapter of candidate {label} changed")
    old, new = recorded["calibration"]["files"], current["calibration"]["files"]
    for name in sorted(set(old) | set(new)):
        if name not in new:
            out.append(f"calibration file {name} is gone")
        elif name not in old:
            out.append(f"calibration file {name} is new")
        elif old[name] != new[name]:
            out.append(f"calibration file {name} changed")
    return out


def check_plan_inputs(plan_dir: str, current: dict) -> None:
    """One clear error when the plan in `plan_dir` was made from other inputs than `current`."""
    recorded = read_inputs(plan_dir)
    fix = "pass --no-cache (plain mergekit: `no_cache: true`) to solve again, or point `plan:` at another folder"
    if recorded is None:
        raise FwllmError(
            f"plan {plan_dir} does not record its inputs ({INPUTS_FILE}; made by an older fwllm?): {fix}"
        )
    diff = changes(recorded, current)
    if diff:
        raise FwllmError(f"plan {plan_dir} was made from other inputs ({'; '.join(diff)}): {fix}")


def solve_recorded(method: DataMethod, job: MergeJob, inputs: dict) -> None:
    """Solve into `job.plan_dir` and record the inputs; refuse a plan whose inputs moved under it."""
    write_inputs(job.plan_dir, inputs)
    method.solve(job)
    diff = changes(inputs, job_inputs(job))
    if diff:
        raise FwllmError(f"the inputs changed during the solve ({'; '.join(diff)}); run the merge again")
