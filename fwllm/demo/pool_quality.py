"""Pool quality: merges of an expert pool scored with task metrics on held-out dev rows, with
95% bootstrap intervals. `fwllm demo` runs it on tuned TA, RegMean and FW-hard; the full
quality benchmark (eval/fwbench/quality_bench.py, `python eval/quality.py`) runs it on every
method below and adds held-out GLUE tasks.

For every pool size N (the first N experts, relevant ones first) and method:
* task arithmetic, TIES, DARE: lambda (and density) tuned on the calibration loss
  (`fwllm.demo.tuning`), merged in memory with mergekit's own per-tensor merge;
* RegMean, Fisher, FW-hard, FW-soft: `fwllm merge` on the recipes of
  `fwllm.demo.recipes` (FW parameters overridable, `QualitySettings.fw`);
* the base, and the best single expert of the pool (chosen on the same calibration loss).
Every data-informed method and every tuning step reads the same calibration rows
(`PoolSettings.max_rows` per task); no dev row is a calibration row (checked).

Scores are cached per (model, task rows, scoring code) under WORK/scores, merges are
reused when their recipe and fwllm's source are unchanged, so a rerun only recomputes
what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml

from mergekit.options import MergeOptions

from fwllm.core.errors import FwllmError
from fwllm.core.params import FW_PRESETS
from fwllm.core.paths import data_root as shared_data_root
from fwllm.evaluation import figures as q
from fwllm.demo.dev_rows import DevBudget, DevTask, check_disjoint, pool_dev_tasks
from fwllm.demo.recipes import (
    FALLBACK_TASK,
    Member,
    PoolSettings,
    ordered_members,
    recipe_for,
    write_pool_calibration,
)
from fwllm.evaluation.likelihood import choice_logprobs, response_nll, scoring_dtype
from fwllm.demo.tuning import (
    TUNED_METHODS,
    Tuned,
    base_state,
    calibration_objective,
    merged_delta,
    set_scaled,
    tune,
)
from fwllm.io.models import load_model, load_tokenizer
from fwllm.mergekit_glue.merge import merge_recipe

# the defaults `fwllm demo` merges with (the benchmark's methods: fwbench.quality_bench.QUALITY_METHODS)
DEMO_METHODS = ("task_arithmetic", "regmean", "fw_hard")
RECIPE_ONLY = ("regmean", "fisher", "fw_hard", "fw_soft")
NAMES = {
    "task_arithmetic": "TA (tuned)",
    "ties": "TIES (tuned)",
    "dare_ties": "DARE (tuned)",
    "regmean": "RegMean",
    "fisher": "Fisher",
    "fw_hard": "FW-hard",
    "fw_soft": "FW-soft",
    "base": "base",
    "best_expert": "best single expert",
}
PACKAGE = Path(__file__).resolve().parent.parent
# FW settings of the smol benchmark and demo (`--fw` overrides them): fw_merging's defaults, every
# preset key written out so PoolSettings' own FW values (iterations, step_size, ...) do not apply.
# On the demo's 8-expert pool line search with a growing hull lifted FW-hard from 68 to 82
# held-in points, RegMean's closed form over FW's per-layer support to 91; choosing the support for
# the whole model (12 steps) and merging it with RegMean's equal weights reached 97.0 at N = 4 and
# N = 8 alike (eval/reports/quality/report.md), which made these settings the recipe default.
SMOL_FW = dict(FW_PRESETS["default"])


@dataclass
class QualitySettings:
    sizes: Sequence[int] = (2, 4, 8)
    methods: Sequence[str] = DEMO_METHODS
    budget: DevBudget = field(default_factory=DevBudget)
    merge: PoolSettings = field(default_factory=PoolSettings)
    fw: Dict[str, object] = field(
        default_factory=dict
    )  # fw_merging recipe overrides; "hard."/"soft." for one
    ta_scales: Sequence[float] = q.grid(0.1, 1.0, 0.1)
    # TIES averages the agreeing deltas (normalize), so its lambda lives near 1; DARE sums them as TA does
    ties_scales: Sequence[float] = (0.5, 1.0, 1.5)
    ties_densities: Sequence[float] = (0.2, 0.5)
    dare_scales: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 1.0)
    dare_densities: Sequence[float] = (0.1, 0.5)
    best_single: bool = True
    resamples: int = 2000
    device: str = "cpu"
    cache: bool = True
    max_batch_tokens: int = 1024
    score_dtype: str = "auto"  # fwllm.evaluation.likelihood.scoring_dtype


# -- settings -------------------------------------------------------------------------------
def parse_overrides(pairs: Sequence[str]) -> Dict[str, object]:
    """`key=value` strings -> {key: YAML-parsed value} (so 12 is an int and true a bool)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FwllmError(f"override {pair!r} is not key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def with_fw_overrides(merge: PoolSettings, fw: Dict[str, object]) -> PoolSettings:
    """Recipe parameter overrides for fw_hard and fw_soft; a `hard.` / `soft.` prefix targets one."""
    extra = {k: dict(v) for k, v in merge.extra.items()}
    for key, value in fw.items():
        variant, dot, name = key.partition(".")
        targets = [f"fw_{variant}"] if dot and variant in ("hard", "soft") else ["fw_hard", "fw_soft"]
        for t in targets:
            extra.setdefault(t, {})[name if dot and variant in ("hard", "soft") else key] = value
    return replace(merge, extra=extra)


def scales_of(s: QualitySettings, method: str) -> Sequence[float]:
    return {"task_arithmetic": s.ta_scales, "ties": s.ties_scales, "dare_ties": s.dare_scales}[method]


def densities_of(s: QualitySettings, method: str) -> Sequence[float]:
    return {"task_arithmetic": (1.0,), "ties": s.ties_densities, "dare_ties": s.dare_densities}[method]


def _sha(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_hash(files: Optional[Sequence[Path]] = None, root: Path = PACKAGE) -> str:
    """Hash of fwllm's Python sources (or of `files` under `root`): a merge or score made by
    other code is never reused."""
    h = hashlib.sha1()
    for path in sorted(files if files is not None else root.rglob("*.py")):
        h.update(str(Path(path).relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def files_hash(paths: Sequence[str]) -> str:
    h = hashlib.sha1()
    for p in sorted(paths):
        h.update(os.path.basename(p).encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def model_stamp(folder: str) -> str:
    """A reference model's identity: its path and its weight files' sizes and times."""
    stats = [
        (f, os.path.getsize(os.path.join(folder, f)), int(os.path.getmtime(os.path.join(folder, f))))
        for f in sorted(os.listdir(folder))
        if f.endswith(".safetensors")
    ]
    return _sha(os.path.realpath(folder), stats)


# -- scores and their cache ---------------------------------------------------------------
class ScoreStore:
    """Per-row scores on disk: OUT/scores/<model key>/<task>-<rows+scoring fingerprint>.json."""

    def __init__(
        self, folder: str, budget: DevBudget, enabled: bool = True, dtype: torch.dtype = torch.float32
    ):
        self.folder, self.enabled = folder, enabled
        scoring = [PACKAGE / "evaluation" / "likelihood.py", PACKAGE / "demo" / "dev_rows.py"]
        self.salt = _sha(budget.max_prompt_tokens, budget.max_length, source_hash(scoring), str(dtype))

    def _path(self, key: str, task: DevTask) -> str:
        return os.path.join(self.folder, key, f"{task.name}-{_sha(task.fingerprint(), self.salt)}.json")

    def get(self, key: str, task: DevTask) -> Optional[q.RowScores]:
        path = self._path(key, task)
        if not self.enabled or not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as fp:
            data = json.load(fp)
        return q.RowScores(
            np.array(data["values"]), None if data["weights"] is None else np.array(data["weights"])
        )

    def put(self, key: str, task: DevTask, scores: q.RowScores, extra: Optional[dict] = None) -> None:
        path = self._path(key, task)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = {
            "task": task.name,
            "values": scores.values.tolist(),
            "weights": None if scores.weights is None else scores.weights.tolist(),
            **(extra or {}),
        }
        with open(path + ".tmp", "w", encoding="utf-8") as fp:
            json.dump(data, fp)
        os.replace(path + ".tmp", path)


def score_task(
    model, tokenizer, task: DevTask, budget: DevBudget, max_batch_tokens: int
) -> Tuple[q.RowScores, dict]:
    if task.metric == q.ACCURACY:
        logprobs = choice_logprobs(model, tokenizer, task.rows, budget.max_prompt_tokens, max_batch_tokens)
        return q.RowScores(q.accuracy_rows(logprobs, [r["gold"] for r in task.rows])), {"logprobs": logprobs}
    nll, count = response_nll(model, tokenizer, task.rows, budget.max_length, max_batch_tokens)
    return q.RowScores(nll, count), {}


class Scorer:
    """Scores models on tasks through the store; a model is loaded only when a score is missing."""

    def __init__(
        self,
        store: ScoreStore,
        tokenizer,
        s: QualitySettings,
        log: Callable[[str], None],
        dtype: torch.dtype = torch.float32,
    ):
        self.store, self.tokenizer, self.s, self.log, self.dtype = store, tokenizer, s, log, dtype
        self.tokens = 0
        self.seconds = 0.0

    def missing(self, key: str, tasks: Sequence[DevTask]) -> List[DevTask]:
        return [t for t in tasks if self.store.get(key, t) is None]

    def scores(
        self, key: str, tasks: Sequence[DevTask], model_fn: Callable[[], torch.nn.Module]
    ) -> Dict[str, q.RowScores]:
        todo = self.missing(key, tasks)
        if todo:
            model = model_fn().to(self.dtype)
            model.eval()
            for task in todo:
                t0 = time.time()
                scores, extra = score_task(
                    model, self.tokenizer, task, self.s.budget, self.s.max_batch_tokens
                )
                self.seconds += time.time() - t0
                self.store.put(key, task, scores, extra)
                self.log(f"   scored {task.name} ({len(task.rows)} rows, {time.time() - t0:.0f} s)")
        return {t.name: self.store.get(key, t) for t in tasks}


# -- cells ----------------------------------------------------------------------------------
@dataclass
class Cell:
    label: str
    method: str
    n: int
    n_irrelevant: int
    held_in: List[str]
    key: str
    scores: Dict[str, q.RowScores] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)


def _load(path: str, device: str) -> Callable[[], torch.nn.Module]:
    return lambda: load_model(path, torch.float32, device)


class PoolRun:
    """One pool size: its members, calibration folders, and the model the tuned methods reuse."""

    def __init__(self, bench: "QualityBench", n: int):
        self.bench, self.n = bench, n
        self.members: List[Member] = bench.members[:n]
        self.tasks = [m.task for m in self.members if m.task]
        if not self.tasks:
            raise FwllmError(f"a pool of {n} has no relevant expert: nothing is held in")
        folder = os.path.join(bench.work_dir, f"pool{n}")
        self.folder = folder
        self.calib = write_pool_calibration(
            bench.pool, self.tasks, os.path.join(folder, "calibration"), False
        )
        self.calib_mix = write_pool_calibration(
            bench.pool, self.tasks, os.path.join(folder, "calibration_per_model"), True
        )
        s = bench.s.merge
        self.calib_key = _sha(
            files_hash([os.path.join(self.calib, f) for f in os.listdir(self.calib)]),
            s.max_rows,
            s.max_length,
            s.batch_size,
        )
        self._model = None
        self._base = None

    @property
    def irrelevant(self) -> int:
        return sum(1 for m in self.members if not m.task)

    def cell(self, method: str, key: str) -> Cell:
        return Cell(f"{method}@{self.n}", method, self.n, self.irrelevant, list(self.tasks), key)

    def base_model(self):
        """The base in float32 with its calibration objective, loaded once for all tuned methods."""
        if self._model is None:
            b = self.bench
            self._model = load_model(b.pool.base, torch.float32, b.s.device).eval()
            self._base = base_state(self._model)
            s = b.s.merge
            self._objective = calibration_objective(
                self.calib, b.tokenizer, self._model, s.max_rows, s.max_length, s.batch_size
            )
        return self._model

    def release(self) -> None:
        self._model = self._base = None

    # tuned task-arithmetic family -----------------------------------------------------------
    def tuned(self, method: str) -> Cell:
        b, s = self.bench, self.bench.s
        paths = [m.path for m in self.members]
        key = _sha(
            "tuned",
            method,
            paths,
            list(scales_of(s, method)),
            list(densities_of(s, method)),
            self.calib_key,
            s.merge.seed,
            source_hash([PACKAGE / "demo" / "tuning.py"]),
        )
        cell = self.cell(method, key)
        record_path = os.path.join(self.folder, "tuning", f"{method}.json")
        tuned = self._read_tuned(record_path, key) if s.cache else None
        tasks = b.tasks_for(self.tasks)
        need_scores = bool(b.scorer.missing(key, tasks))
        delta = None
        if tuned is None:
            t0 = time.time()
            model = self.base_model()
            tuned, delta = tune(
                method,
                model,
                self._base,
                self._objective,
                b.pool.base,
                paths,
                scales_of(s, method),
                densities_of(s, method),
                s.merge.seed,
                progress=b.log,
            )
            cell.seconds["tune"] = round(time.time() - t0, 1)
            self._write_tuned(record_path, key, tuned)
        cell.info = tuned.as_dict()
        self._write_recipe(method, tuned)

        def model_fn():
            model = self.base_model()
            d = (
                delta
                if delta is not None
                else merged_delta(method, b.pool.base, paths, tuned.density, s.merge.seed)
            )
            set_scaled(model, self._base, d, tuned.scale)
            return model

        t0 = time.time()
        if need_scores:
            b.log(f"== {cell.label}: lambda {tuned.scale}, density {tuned.density}")
        cell.scores = b.scorer.scores(key, tasks, model_fn)
        cell.seconds["score"] = round(time.time() - t0, 1)
        return cell

    def _read_tuned(self, path: str, key: str) -> Optional[Tuned]:
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as fp:
            data = json.load(fp)
        if data.get("key") != key:
            return None
        grid = {d: {float(k): v for k, v in g.items()} for d, g in data["grid"].items()}
        return Tuned(data["method"], data["lambda"], data["density"], data["calibration_loss"], grid)

    def _write_tuned(self, path: str, key: str, tuned: Tuned) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fp:
            json.dump(dict(tuned.as_dict(), key=key), fp, indent=2)

    def _write_recipe(self, method: str, tuned: Tuned) -> None:
        """The mergekit recipe of the tuned merge, for reproduction with `fwllm merge`."""
        merge = replace(
            self.bench.s.merge, scaling=tuned.scale, density=tuned.density, dare_density=tuned.density
        )
        self._dump_recipe(method, recipe_for(method, self.bench.pool.base, self.members, self.calib, merge))

    def _dump_recipe(self, method: str, recipe: dict) -> str:
        path = os.path.join(self.folder, "recipes", f"{method}.yml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fp:
            yaml.safe_dump(recipe, fp, sort_keys=False)
        return path

    # fwllm recipes ----------------------------------------------------------------------------
    def merged(self, method: str) -> Cell:
        b, s = self.bench, self.bench.s
        merge = with_fw_overrides(s.merge, s.fw)
        folder = self.calib_mix if method in ("fisher", "regmean") else self.calib
        recipe = recipe_for(method, b.pool.base, self.members, folder, merge, fallback_task=FALLBACK_TASK)
        recipe_path = self._dump_recipe(method, recipe)
        key = _sha("recipe", recipe, self.calib_key, b.code_hash)
        cell = self.cell(method, key)
        cell.info = {"recipe": recipe_path, "parameters": recipe["parameters"]}
        tasks = b.tasks_for(self.tasks)
        target = os.path.join(self.folder, "merged", method)

        stamp = target + ".quality_key"  # beside the output: --force replaces only what fwllm wrote

        def model_fn():
            if not (s.cache and os.path.isfile(stamp) and Path(stamp).read_text() == key):
                t0 = time.time()
                b.log(f"== {cell.label}: merging {self.n} experts")
                merge_recipe(recipe_path, target, MergeOptions(device=s.device, quiet=True), force=True)
                Path(stamp).write_text(key)
                cell.seconds["merge"] = round(time.time() - t0, 1)
            return load_model(target, torch.float32, s.device)

        t0 = time.time()
        cell.scores = b.scorer.scores(key, tasks, model_fn)
        cell.seconds["score"] = round(time.time() - t0 - cell.seconds.get("merge", 0.0), 1)
        return cell

    # references -------------------------------------------------------------------------------
    def base_cell(self) -> Cell:
        b = self.bench
        cell = self.cell("base", b.base_key)
        cell.scores = b.scorer.scores(b.base_key, b.tasks_for(self.tasks), _load(b.pool.base, b.s.device))
        return cell

    def best_expert(self) -> Cell:
        """The pool member with the lowest calibration loss over the pool's tasks, unmerged."""
        b = self.bench
        losses = {
            m.path: float(np.mean([b.member_losses[m.path][t] for t in self.tasks])) for m in self.members
        }
        best = min(losses, key=losses.get)
        key = model_stamp(best)
        cell = self.cell("best_expert", key)
        cell.info = {
            "expert": os.path.basename(best),
            "calibration_loss": losses[best],
            "calibration_losses": {os.path.basename(p): v for p, v in losses.items()},
        }
        cell.scores = b.scorer.scores(key, b.tasks_for(self.tasks), _load(best, b.s.device))
        return cell


class QualityBench:
    def __init__(
        self,
        pool,
        out_dir: str,
        s: QualitySettings,
        log: Callable[[str], None] = print,
        work_dir: Optional[str] = None,
        held_out: Sequence[DevTask] = (),
    ):
        """`out_dir` gets the report; `work_dir` (default: the same) the merges, recipes and caches;
        `held_out`: tasks no expert trained on, scored for every model (the benchmark's GLUE tasks)."""
        self.pool, self.out_dir, self.s, self.log = pool, out_dir, s, log
        self.work_dir = work_dir or out_dir
        unknown = [m for m in s.methods if m not in TUNED_METHODS + RECIPE_ONLY]
        if unknown:
            raise FwllmError(
                f"unknown method(s) {unknown}; choose from {', '.join(TUNED_METHODS + RECIPE_ONLY)}"
            )
        self.members = ordered_members(pool)
        if not s.sizes or any(n < 1 or n > len(self.members) for n in s.sizes):
            raise FwllmError(
                f"pool sizes must be in 1..{len(self.members)} (the pool has {len(self.members)} experts)"
            )
        try:
            dtype = scoring_dtype(s.score_dtype, s.device)
        except ValueError as err:
            raise FwllmError(str(err)) from None
        os.makedirs(out_dir, exist_ok=True)
        os.makedirs(self.work_dir, exist_ok=True)
        self.tokenizer = load_tokenizer(pool.base)
        self.code_hash = source_hash()
        self.base_key = model_stamp(pool.base)
        self.scorer = Scorer(
            ScoreStore(os.path.join(self.work_dir, "scores"), s.budget, s.cache, dtype),
            self.tokenizer,
            s,
            log,
            dtype,
        )
        relevant = [m.task for m in self.members if m.task]
        root = shared_data_root(required=pool.profile == "smol")
        self.dev = {t.name: t for t in pool_dev_tasks(pool, relevant, s.budget, root)}
        self.held_out = list(held_out)
        calibration_files = [t.calibration for t in pool.tasks.values()]
        self.calibration_rows_checked = check_disjoint(
            list(self.dev.values()) + self.held_out, calibration_files
        )
        self.expert_of = {e.task: e for e in pool.experts if e.relevant and e.task}
        self.member_losses: Dict[str, Dict[str, float]] = {}

    def tasks_for(self, held_in: Sequence[str]) -> List[DevTask]:
        return [self.dev[t] for t in held_in] + list(self.held_out)

    def references(self) -> Dict[str, Dict[str, q.RowScores]]:
        """Base on every task, each relevant expert on its own task (the normalizers)."""
        out = {
            "base": self.scorer.scores(
                self.base_key, self.tasks_for(list(self.dev)), _load(self.pool.base, self.s.device)
            )
        }
        for task, e in self.expert_of.items():
            self.log(f"== reference: expert {e.name}")
            out[f"expert:{e.name}"] = self.scorer.scores(
                model_stamp(e.path), [self.dev[task]], _load(e.path, self.s.device)
            )
        return out

    def measure_members(self) -> None:
        """Calibration loss per task of every pool member (for the best-single-expert baseline)."""
        path = os.path.join(self.work_dir, "member_calibration_losses.json")
        s = self.s.merge
        calib = write_pool_calibration(
            self.pool, list(self.dev), os.path.join(self.work_dir, "calibration_all"), False
        )
        key = _sha(
            [m.path for m in self.members],
            files_hash([os.path.join(calib, f) for f in os.listdir(calib)]),
            s.max_rows,
            s.max_length,
            s.batch_size,
            [model_stamp(m.path) for m in self.members],
        )
        if self.s.cache and os.path.isfile(path):
            with open(path, encoding="utf-8") as fp:
                data = json.load(fp)
            if data.get("key") == key:
                self.member_losses = data["losses"]
                return
        for m in self.members:
            model = load_model(m.path, torch.float32, self.s.device).eval()
            objective = calibration_objective(
                calib, self.tokenizer, model, s.max_rows, s.max_length, s.batch_size
            )
            self.member_losses[m.path] = objective.per_task(model)
            del model
        with open(path, "w", encoding="utf-8") as fp:
            json.dump({"key": key, "losses": self.member_losses}, fp, indent=2)

    def run(self) -> dict:
        start = time.time()
        phases: Dict[str, float] = {}
        t0 = time.time()
        refs = self.references()
        phases["references"] = time.time() - t0
        if self.s.best_single:
            t0 = time.time()
            self.measure_members()
            phases["member calibration losses"] = time.time() - t0
        cells: List[Cell] = []
        for n in self.s.sizes:
            run = PoolRun(self, n)
            cells.append(run.base_cell())
            if self.s.best_single:
                cells.append(run.best_expert())
            for method in self.s.methods:
                t0 = time.time()
                if method not in TUNED_METHODS:
                    run.release()  # the tuned methods' base copy is not needed while fwllm merges
                cells.append(run.tuned(method) if method in TUNED_METHODS else run.merged(method))
                phases[method] = phases.get(method, 0.0) + time.time() - t0
                self.log(f"   {cells[-1].label} done ({time.time() - t0:.0f} s)")
            run.release()
        seconds = time.time() - start
        summary = summarize(self, refs, cells)
        return write_report(self, refs, cells, summary, seconds, phases)


# -- figures ----------------------------------------------------------------------------------
def summarize(bench: QualityBench, refs: Dict[str, Dict[str, q.RowScores]], cells: Sequence[Cell]) -> dict:
    rs = q.Resampler(bench.s.resamples, bench.s.merge.seed)
    idx = {t.name: rs.indices(t.name, len(t.rows)) for t in list(bench.dev.values()) + bench.held_out}
    base = refs["base"]
    expert = {t: refs[f"expert:{e.name}"][t] for t, e in bench.expert_of.items()}
    scale = {
        t.name: (100.0 if t.metric == q.ACCURACY else 1.0) for t in list(bench.dev.values()) + bench.held_out
    }
    base_out = (
        q.mean_figure([q.task_figure(base[t.name], idx[t.name], 100.0) for t in bench.held_out])
        if bench.held_out
        else None
    )
    rows = []
    for cell in cells:
        per_task = {t: q.task_figure(cell.scores[t], idx[t], scale[t]) for t in cell.held_in}
        norm = {
            t: q.normalized_figure(bench.dev[t].metric, cell.scores[t], expert[t], base[t], idx[t])
            for t in cell.held_in
        }
        row = {
            "label": cell.label,
            "method": cell.method,
            "n": cell.n,
            "n_irrelevant": cell.n_irrelevant,
            "held_in": cell.held_in,
            "task": per_task,
            "normalized": norm,
            "held_in_normalized": q.mean_figure(list(norm.values())),
        }
        if bench.held_out:
            out = {t.name: q.task_figure(cell.scores[t.name], idx[t.name], 100.0) for t in bench.held_out}
            row["held_out_task"] = out
            row["held_out"] = q.mean_figure(list(out.values()))
            row["held_out_vs_base"] = q.difference(row["held_out"], base_out)
        rows.append(row)
    references = {
        label: {t: q.task_figure(s, idx[t], scale[t]) for t, s in scores.items()}
        for label, scores in refs.items()
    }
    return {"rows": rows, "references": references, "differences": differences(rows)}


def differences(rows: Sequence[dict]) -> List[dict]:
    """Paired differences of held-in normalized scores: each FW variant against every other
    method in the same pool, and each method's drift from the all-relevant pool to the largest."""
    out = []
    by = {(r["method"], r["n"]): r for r in rows}
    sizes = sorted({r["n"] for r in rows})
    for fw in ("fw_hard", "fw_soft"):
        for n in sizes:
            if (fw, n) not in by:
                continue
            for (method, m), other in by.items():
                if m == n and method != fw:
                    out.append(
                        {
                            "kind": "vs",
                            "a": f"{fw}@{n}",
                            "b": other["label"],
                            "figure": q.difference(
                                by[(fw, n)]["held_in_normalized"], other["held_in_normalized"]
                            ),
                        }
                    )
    clean = [r for r in rows if r["n_irrelevant"] == 0]
    n_clean = max((r["n"] for r in clean), default=None)
    if n_clean is not None and sizes[-1] != n_clean:
        for method in sorted({r["method"] for r in rows}):
            a, b = by.get((method, sizes[-1])), by.get((method, n_clean))
            if a and b and a["held_in"] == b["held_in"]:
                out.append(
                    {
                        "kind": "drift",
                        "a": a["label"],
                        "b": b["label"],
                        "figure": q.difference(a["held_in_normalized"], b["held_in_normalized"]),
                    }
                )
    return out


def fmt(f: Optional[q.Figure], digits: int = 1) -> str:
    if f is None or not np.isfinite(f.point):
        return "-"
    return f"{f.point:.{digits}f} [{f.lo:.{digits}f}, {f.hi:.{digits}f}]"


def main_table(summary: dict, with_held_out: bool) -> str:
    head = "| pool | method | held-in normalized |"
    rule = "|---|---|---|"
    if with_held_out:
        head += " held-out acc. % | held-out vs base |"
        rule += "---|---|"
    lines = [head, rule]
    for r in summary["rows"]:
        cells = [
            f"{r['n']} ({r['n_irrelevant']} irrelevant)",
            NAMES.get(r["method"], r["method"]),
            fmt(r["held_in_normalized"]),
        ]
        if with_held_out:
            cells += [fmt(r.get("held_out")), fmt(r.get("held_out_vs_base"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: str, n_relevant: int) -> str:
    from fwllm.io.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    methods = []
    for r in summary["rows"]:
        if r["method"] not in methods:
            methods.append(r["method"])
    for method in methods:
        pts = sorted((r["n"], r["held_in_normalized"]) for r in summary["rows"] if r["method"] == method)
        xs = [p[0] for p in pts]
        ys = [p[1].point for p in pts]
        err = [[p[1].point - p[1].lo for p in pts], [p[1].hi - p[1].point for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=NAMES.get(method, method))
    ax.axvline(n_relevant + 0.5, color="grey", ls="--", lw=0.8)
    ax.set_xlabel(f"number of candidates (beyond {n_relevant}: irrelevant experts)")
    ax.set_ylabel("held-in normalized score (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fig_json(obj):
    if isinstance(obj, q.Figure):
        return obj.as_dict()
    if isinstance(obj, dict):
        return {k: _fig_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_fig_json(v) for v in obj]
    return obj


def write_report(
    bench: QualityBench, refs, cells: Sequence[Cell], summary: dict, seconds: float, phases: Dict[str, float]
) -> dict:
    s, pool, out = bench.s, bench.pool, bench.out_dir
    n_rel = sum(1 for e in pool.experts if e.relevant)
    plot_path = plot(summary, os.path.join(out, "vs_candidates.png"), n_rel) if len(s.sizes) > 1 else None
    tasks = list(bench.dev.values()) + bench.held_out
    task_info = [
        {
            "name": t.name,
            "metric": t.metric,
            "rows": len(t.rows),
            "available": t.available,
            "held_in": t.held_in,
            "source": t.source,
        }
        for t in tasks
    ]
    table = main_table(summary, bool(bench.held_out))
    settings = {k: v for k, v in asdict(s).items() if k not in ("merge", "budget")}
    result = {
        "profile": pool.profile,
        "pool": pool.root,
        "seconds": round(seconds, 1),
        "cores": os.cpu_count(),
        "phases": {k: round(v, 1) for k, v in phases.items()},
        "settings": settings,
        "merge_settings": asdict(with_fw_overrides(s.merge, s.fw)),
        "budget": asdict(s.budget),
        "tasks": task_info,
        "calibration_rows_checked": bench.calibration_rows_checked,
        "scoring": {"seconds": round(bench.scorer.seconds, 1), "dtype": str(bench.scorer.dtype)},
        "cells": [{"label": c.label, "key": c.key, "info": c.info, "seconds": c.seconds} for c in cells],
        "summary": _fig_json(summary["rows"]),
        "references": _fig_json(summary["references"]),
        "differences": _fig_json(summary["differences"]),
        "plot": plot_path,
    }
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as fp:
        json.dump(result, fp, indent=2, default=str)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as fp:
        fp.write(report_markdown(bench, cells, summary, result, table))
    result["table"] = table
    return result


def _task_table(bench: QualityBench, summary: dict) -> List[str]:
    tasks = list(bench.dev.values()) + bench.held_out
    unit = {q.ACCURACY: "acc. %", q.LOSS: "NLL"}
    head = "| model | " + " | ".join(f"{t.name} ({unit[t.metric]})" for t in tasks) + " |"
    lines = [head, "|---|" + "---|" * len(tasks)]
    for label, figs in summary["references"].items():
        lines.append(
            f"| {label} | "
            + " | ".join(fmt(figs.get(t.name), 3 if t.metric == q.LOSS else 1) for t in tasks)
            + " |"
        )
    for r in summary["rows"]:
        if r["method"] == "base":
            continue
        figs = {**r["task"], **r.get("held_out_task", {})}
        lines.append(
            f"| {r['label']} | "
            + " | ".join(fmt(figs.get(t.name), 3 if t.metric == q.LOSS else 1) for t in tasks)
            + " |"
        )
    return lines


def _norm_table(summary: dict, held_in: Sequence[str]) -> List[str]:
    lines = ["| cell | " + " | ".join(held_in) + " | mean |", "|---|" + "---|" * (len(held_in) + 1)]
    for r in summary["rows"]:
        lines.append(
            f"| {r['label']} | "
            + " | ".join(fmt(r["normalized"].get(t)) for t in held_in)
            + f" | {fmt(r['held_in_normalized'])} |"
        )
    return lines


def report_markdown(
    bench: QualityBench, cells: Sequence[Cell], summary: dict, result: dict, table: str
) -> str:
    s, pool = bench.s, bench.pool
    rel = [e.name for e in pool.experts if e.relevant]
    irr = [e.name for e in pool.experts if not e.relevant]
    how = {
        q.ACCURACY: "multiple-choice accuracy by continuation log-likelihood",
        q.LOSS: "token-mean NLL of the reference response",
    }
    task_lines = [
        f"- **{t['name']}** ({'held-in' if t['held_in'] else 'held-out'}, {how[t['metric']]}): "
        f"{t['rows']} of {t['available']} rows, `{t['source']}`"
        for t in result["tasks"]
    ]
    tuned_lines = ["| cell | lambda | density | calibration loss |", "|---|---|---|---|"]
    for c in cells:
        if c.method in TUNED_METHODS:
            tuned_lines.append(
                f"| {c.label} | {c.info['lambda']} | {c.info['density']} | {c.info['calibration_loss']:.4f} |"
            )
        if c.method == "best_expert":
            tuned_lines.append(
                f"| {c.label} | expert `{c.info['expert']}` | - | {c.info['calibration_loss']:.4f} |"
            )
    diff_lines = ["| comparison | difference in held-in normalized score |", "|---|---|"]
    for d in summary["differences"]:
        word = "minus" if d["kind"] == "vs" else "drift: minus"
        diff_lines.append(f"| {d['a']} {word} {d['b']} | {fmt(d['figure'])} |")
    phases = ", ".join(f"{k} {v / 60:.1f} min" for k, v in result["phases"].items())
    merge = result["merge_settings"]
    md = [
        f"# Quality benchmark ({pool.profile} pool, {time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Pool: `{pool.root}`: {len(pool.experts)} experts, relevant first ({', '.join(rel)}), then irrelevant "
        f"({', '.join(irr) or 'none'}). Pools: the first N = {', '.join(map(str, s.sizes))}.",
        "",
        f"Wall time: **{result['seconds'] / 60:.1f} min** on {result['cores']} CPU cores ({phases}; "
        f"scoring {result['scoring']['seconds'] / 60:.1f} min). Cached steps cost nothing and are not counted in "
        f"their phase's time.",
        "",
        "## Held-in normalized score (95% bootstrap intervals over dev rows)",
        "",
        "Per held-in task: accuracy tasks merged / expert x 100; loss tasks the share of the expert's NLL gain over "
        "the base that the merge keeps, (base - merged) / (base - expert) x 100. The figure is the mean over the "
        "pool's held-in tasks; the base and each expert are resampled with the merge (paired). Held-out: mean "
        "accuracy (x100) on tasks no expert trained on, and its paired difference to the base.",
        "",
        table,
        "",
    ]
    if result.get("plot"):
        md += ["![normalized score vs number of candidates](vs_candidates.png)", ""]
    md += [
        "## Paired differences",
        "",
        *diff_lines,
        "",
        "## Per-task figures",
        "",
        *_task_table(bench, summary),
        "",
        "## Normalized score per held-in task",
        "",
        *_norm_table(summary, list(bench.dev)),
        "",
        "## Tuned baselines (chosen on the calibration loss only)",
        "",
        *tuned_lines,
        "",
        f"Grids: TA lambda {list(s.ta_scales)}; TIES lambda {list(s.ties_scales)} x density "
        f"{list(s.ties_densities)}; DARE lambda {list(s.dare_scales)} x density {list(s.dare_densities)}. "
        "TA, TIES and DARE are mergekit's own "
        "per-tensor merges (weights 1, the methods' normalize/rescale defaults), computed in memory in float32; "
        f"`{os.path.join(bench.work_dir, 'pool<N>', 'recipes')}` holds the equivalent recipes.",
        "",
        "## Rows and settings",
        "",
        *task_lines,
        "",
        f"Calibration: the first {merge['max_rows']} rows of each held-in task's calibration file (up to "
        f"{merge['max_length']} tokens), the same rows for every data-informed method and for every tuning step. "
        f"{result['calibration_rows_checked']} calibration prompts checked: none is a dev prompt.",
        "",
        f"Models are scored in {result['scoring']['dtype'].replace('torch.', '')} (`--score-dtype`; "
        "eval/reports/score_dtype.md compares it with float32). "
        f"Multiple-choice prompts keep their last {s.budget.max_prompt_tokens} tokens; response rows at most "
        f"{s.budget.max_length} tokens. GSM8K and code are scored by the NLL of the reference answer only: greedy "
        "generation of ~200-token solutions for every row and model (exact match) is not affordable on 2 CPU cores.",
        "",
        f"Merge settings: `{json.dumps(merge)}`",
        "",
        f"FW overrides: `{json.dumps(s.fw)}`",
        "",
        "Seconds per cell: " + ", ".join(f"{c.label} {c.seconds}" for c in cells if c.seconds),
        "",
    ]
    return "\n".join(md)


def run_quality(
    pool,
    out_dir: str,
    s: QualitySettings,
    log: Callable[[str], None] = print,
    work_dir: Optional[str] = None,
    held_out: Sequence[DevTask] = (),
) -> dict:
    return QualityBench(pool, out_dir, s, log, work_dir, held_out).run()
