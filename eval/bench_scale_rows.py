"""The rows of `eval/bench_scale.py`: which method runs with which recipe parameters, its floor, its
targets, and the markdown tables.

A row is a method plus its recipe parameters (`ROWS`); a method whose `gradient: layerwise` path is
missing from this checkout (no `gradient` key in its params schema) is skipped with a printed note.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

GIB = 1 << 30

# FW-Merging as the paper (and issue 11) ran it: pinned, so a change of FW's defaults leaves this row alone
FW_PAPER_KEYS = {
    "step_size": 0.1,
    "granularity": "tensor",
    "local_merge": "task_arithmetic",
    "init": "task_arithmetic",
    "scaling": 0.3,
    "step": "open_loop",
    "hull": "fixed",
}


@dataclass
class Row:
    key: str  # --methods name
    label: str  # in the table
    method: str  # merge_method
    params: Dict = field(default_factory=dict)  # recipe parameters beyond the shared ones
    floor: Optional[str] = None  # child kind of the floor this row is timed against
    floor_target: Optional[float] = None  # (solve or iteration) / floor
    per_iteration: bool = False  # FW: one iteration against the floor, else the whole solve
    # a part of the solve the floor does not measure (a child figure, seconds): the target is read on the
    # solve without it (RegMean: the Gram pass against a forward per candidate, its closed form apart)
    apart: Optional[str] = None
    lora_out: bool = False  # also write the merge as a peft adapter
    bounded: bool = True  # the 7B / 1.1B memory targets apply


def fw_paper_params() -> Dict:
    from fwllm.core.params import FWParams

    if "preset" in FWParams.model_fields:
        return {"preset": "paper"}
    return dict(FW_PAPER_KEYS)


ROWS = [
    Row(
        "fw-open-loop",
        "FW open loop (paper settings)",
        "fw_merging",
        floor="floor",
        floor_target=1.2,
        per_iteration=True,
        lora_out=True,
        bounded=False,
    ),
    # both merge a LoRA pool to W_0 + B A (the refine and RegMean's closed form): also written as an adapter
    Row(
        "fw-default",
        "FW, recipe defaults",
        "fw_merging",
        floor="floor",
        floor_target=1.2,
        per_iteration=True,
        lora_out=True,
    ),
    Row(
        "regmean",
        "RegMean",
        "regmean",
        floor="gram_floor",
        floor_target=1.3,
        lora_out=True,
        apart="closed_form_s",
    ),
    # the empirical Fisher: one backward per example, what the floor measures; the exact Fisher takes one
    # backward per predicted position and top-k output (x 320 at 64 tokens, top_k 5), at any size
    Row(
        "fisher",
        "Fisher (empirical)",
        "fisher",
        params={"fisher": "empirical"},
        floor="fisher_pool_floor",  # a Fisher pass forms the gradient of every adapted weight: so does this floor
        floor_target=1.3,
    ),
    Row("adamerging", "AdaMerging", "adamerging", bounded=False),
]
METHOD_KEYS = [r.key for r in ROWS] + ["mergekit-ta"]
PARAMS_CLASS = {
    "fisher": "FisherParams",
    "regmean": "RegMeanParams",
    "adamerging": "AdaMergingParams",
    "fw_merging": "FWParams",
}


def layerwise_missing(method: str) -> Optional[str]:
    """Why `method` cannot run on the bounded path in this checkout (None: it can)."""
    import fwllm.core.params as params

    schema = getattr(params, PARAMS_CLASS[method])
    if "gradient" not in schema.model_fields:
        return f"{method}: no `gradient: layerwise` in {PARAMS_CLASS[method]} yet"
    return None


def recipe_params(row: Row, shared: Dict, iterations: int) -> Dict:
    """The row's recipe parameters: the shared ones (calibration, sizes, gradient: layerwise, device),
    the row's own, and the run length (`iterations`: FW iterations, AdaMerging steps)."""
    params = dict(shared)
    if row.method != "fw_merging":
        params.pop("checkpoint_memory", None)
        if row.method != "adamerging":
            params.pop("iterations", None)
    if row.key == "fw-open-loop":
        params.update(fw_paper_params())
    if row.method == "adamerging":
        params["steps"] = params.pop("iterations")
    params.update(row.params)
    return params


def du_bytes(*folders: str) -> int:
    """Bytes the folders take on disk (allocated blocks, as `du`)."""
    total = 0
    for folder in folders:
        for root, _, files in os.walk(folder):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_blocks * 512
                except OSError:
                    pass
    return total


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        names = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")]
        return names[0] if names else "?"
    except OSError:
        return "?"


# -- targets --------------------------------------------------------------------------------------
MEMORY_TARGETS = {"llama2-7b": (6.0, 8.0), "tinyllama-1.1b": (2.5, 4.0)}  # (anon, RSS) GiB
LORA_TARGET = ("llama2-7b", 1 / 20)


def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def targets(model: str, row: Row, r: dict, model_gib: float) -> List[str]:
    out = []
    mem = MEMORY_TARGETS.get(model.split(" ")[0])
    if mem and row.bounded:
        out.append(f"anon <= {mem[0]:g}: {_mark(r['peak_anon_gib'] <= mem[0])}")
        out.append(f"RSS <= {mem[1]:g}: {_mark(r['peak_rss_gib'] <= mem[1])}")
    out.append(f"stats <= model: {_mark(r['stats_disk_gib'] <= model_gib)}")
    if row.floor_target and r.get("pass_vs_floor") is not None:
        out.append(
            f"Gram pass x floor <= {row.floor_target:g}: {_mark(r['pass_vs_floor'] <= row.floor_target)}"
        )
    elif row.floor_target and r.get("vs_floor") is not None:
        out.append(f"x floor <= {row.floor_target:g}: {_mark(r['vs_floor'] <= row.floor_target)}")
    if row.lora_out and model.split(" ")[0] == LORA_TARGET[0] and r.get("lora_ratio") is not None:
        out.append(f"LoRA <= 1/20 dense: {_mark(r['lora_ratio'] <= LORA_TARGET[1])}")
    return out


# -- the report -----------------------------------------------------------------------------------
COLUMNS = [
    "row",
    "wall s",
    "solve s",
    "time vs floor (floor s)",
    "peak RSS GiB",
    "peak anon GiB",
    "read / written / rchar GiB",
    "plan / stats on disk GiB (peak during run)",
    "output GiB (LoRA / dense)",
    "targets",
]


def _f(x, fmt=".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _g(x) -> str:
    """GiB: two decimals, or three significant digits below 0.1 (the toy model's figures)."""
    return "-" if x is None else format(x, ".2f" if x >= 0.1 or x == 0 else ".3g")


def _io(r: dict) -> str:
    return f"{_g(r['read_gib'])} / {_g(r['written_gib'])} / {_g(r['rchar_gib'])}"


def model_table(entry: dict) -> List[str]:
    """One model's table: a line per row, its floors, and mergekit."""
    lines = [
        f"## {entry['model']} + 16 LoRA adapters ({_g(entry['model_gib'])} GiB model; calibration "
        f"{entry['calibration']})",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for key, r in entry["rows"].items():
        if r.get("skipped"):
            lines.append(f"| {r['label']} | skipped ({r['skipped']}) |" + " |" * (len(COLUMNS) - 2))
            continue
        floor = entry["floors"].get(r.get("floor"))
        vs = "-"
        if r.get("vs_floor") is not None:
            per = "per iteration" if r.get("per_iteration") else "solve"
            vs = f"{r['vs_floor']:.2f} {per} ({floor['evaluation_s']:.1f})"
            if r.get("pass_vs_floor") is not None:
                vs += f"; Gram pass {r['pass_vs_floor']:.2f}, closed form {r['apart_s']:.1f} s apart"
        out = f"{_g(r.get('lora_gib'))} / {_g(r.get('dense_gib'))}"
        if r.get("lora_ratio") is not None:
            out += f" (1/{1 / r['lora_ratio']:.1f})"
        disk = f"{_g(r['plan_disk_gib'])} / {_g(r['stats_disk_gib'])} ({_g(r['peak_disk_gib'])})"
        lines.append(
            f"| {r['label']} | {r['wall_s']:.1f} | {_f(r.get('solve_s'), '.1f')} | {vs} | "
            f"{_g(r['peak_rss_gib'])} | {_g(r['peak_anon_gib'])} | {_io(r)} | {disk} | {out} | "
            f"{'; '.join(r['targets'])} |"
        )
    for kind, f in entry["floors"].items():
        lines.append(
            f"| floor: {FLOOR_LABELS[kind]} | {f['wall_s']:.1f} | {f['evaluation_s']:.1f} | 1.00 | "
            f"{_g(f['peak_rss_gib'])} | {_g(f['peak_anon_gib'])} | {_io(f)} | - | - | - |"
        )
    mk = entry.get("mergekit_ta")
    if mk and mk.get("computed"):
        lines.append(
            f"| mergekit task_arithmetic | cannot run here: needs {mk['lora_cache_gib']:.1f} GiB of "
            f"LoRA merge cache (one merged model per adapter; free: {mk['free_disk_gib']:.0f} GiB) |"
            + " |"
            * (len(COLUMNS) - 2)
        )
    elif mk:
        lines.append(
            f"| mergekit task_arithmetic | {mk['wall_s']:.1f} | - | - | {_g(mk['peak_rss_gib'])} | "
            f"{_g(mk['peak_anon_gib'])} | {_io(mk)} | LoRA cache {_g(mk.get('cache_disk_gib'))} | "
            f"- / {_g(mk.get('dense_gib'))} | - |"
        )
    return lines + [""]


INTRO = " ".join(
    [
        "Models are random bf16 weights of the real shapes; the pool is 16 LoRA adapters (8 x r8 on q,v;",
        "8 x r16 on all projections), adapter i on calibration task i mod K. Every fwllm row runs",
        "`gradient: layerwise`. RSS = peak resident set of the run (VmHWM, mapped file pages included);",
        "anon = peak anonymous RSS (sampled); I/O from /proc/self/io (read / written = storage, rchar = all",
        "reads, page cache included). Plan = the plan folder after the run, stats = $FWLLM_CACHE/stats after",
        "the run (a fresh cache per run); in brackets the peak of both during the run (sampled each second;",
        "the staged plan holds float32 merged tensors until the output is written). Solve s = the method's",
        "solve alone (its model loading and tokenizing included); time vs floor = one FW iteration (mean) or",
        "the whole solve over its floor (see eval/bench_scale_child.py). Targets: 7B: anon <= 6, RSS <= 8",
        "GiB; 1.1B: anon <= 2.5, RSS <= 4 GiB (RegMean, Fisher, FW defaults); statistics on disk <= one",
        "model; Gram pass and Fisher <= 1.3 x floor; FW iteration <= 1.2 x floor; LoRA output <= 1/20 of",
        "the dense output at 7B.",
    ]
)

FLOOR_LABELS = {
    "floor": "one layer-by-layer forward + backward, all rows (FW iteration)",
    "gram_floor": "one layer-by-layer forward per candidate, own rows (Gram pass)",
    "fisher_floor": "one layer-by-layer forward + backward per candidate, own rows, no weight gradient",
    "fisher_wgrad_floor": "one layer-by-layer forward + backward per candidate, own rows, its own adapted"
    " weights' gradients formed",
    "fisher_pool_floor": "one layer-by-layer forward + backward per candidate, own rows, the gradients of every"
    " weight the pool adapts formed (Fisher: its 1.3 x is read here)",
}
# floors measured beside a row's own, shown as their own table rows: a Fisher pass forms, per candidate, the
# gradient of every weight any candidate adapts (per example; the same matmul flops as one batched gradient);
# the lower floors form only the candidate's own adapted weights' gradients, or none
ALSO_FLOORS = {"fisher_pool_floor": ["fisher_wgrad_floor", "fisher_floor"]}


def render(entries: List[dict], command: str, device: str, full_lines: List[str]) -> str:
    where = f"{cpu_model()}, {os.cpu_count()} CPU cores" + (f", solve on {device}" if device != "cpu" else "")
    lines = [
        f"# fwllm at scale ({time.strftime('%Y-%m-%d %H:%M')}, {where})",
        "",
        f"Command: `{command}`",
        "",
        INTRO,
        "",
    ]
    for entry in entries:
        lines += model_table(entry)
    return "\n".join(lines + full_lines) + "\n"
