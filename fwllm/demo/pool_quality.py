"""Pool quality, what `fwllm demo` runs: merges of an expert pool scored with task metrics on
held-out dev rows, with 95% bootstrap intervals.

For every pool size N (the first N experts, relevant ones first) and method:
* task arithmetic: lambda tuned on the calibration loss (`fwllm.demo.tuning`), merged in memory
  with mergekit's own per-tensor merge;
* RegMean, Fisher, FW-hard, FW-soft: `fwllm merge` on the recipes of `fwllm.demo.recipes`
  (FW parameters overridable, `QualitySettings.fw`);
* the base, as the reference every merge is normalized against with each task's own expert.
Every data-informed method and the tuning read the same calibration rows (`PoolSettings.max_rows`
per task); no dev row is a calibration row (checked).

The full quality benchmark (`python eval/quality.py`, eval/fwbench) builds on these classes: it adds
tuned TIES and DARE, the best single expert, held-out GLUE tasks and the long report.

Scores are cached per (model, task rows, scoring code) under WORK/scores, merges are reused when
their recipe and fwllm's source are unchanged, so a rerun only recomputes what changed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from mergekit.options import MergeOptions

from fwllm.core.errors import FwllmError
from fwllm.core.paths import data_root as shared_data_root
from fwllm.demo.dev_rows import DevTask, check_disjoint, pool_dev_tasks
from fwllm.demo.recipes import FALLBACK_TASK, Member, ordered_members, recipe_for, write_pool_calibration
from fwllm.demo.report import summarize, write_report
from fwllm.demo.scores import PACKAGE, Scorer, ScoreStore, digest, files_hash, model_stamp, source_hash
from fwllm.demo.settings import QualitySettings, with_fw_overrides
from fwllm.demo.tuning import Tuned, base_state, calibration_objective, merged_delta, set_scaled, tune
from fwllm.evaluation import figures as q
from fwllm.evaluation.likelihood import scoring_dtype
from fwllm.io.models import load_model, load_tokenizer
from fwllm.mergekit_glue.merge import merge_recipe

TUNED = ("task_arithmetic",)  # lambda chosen on the calibration loss, merged in memory
RECIPE_ONLY = ("regmean", "fisher", "fw_hard", "fw_soft")  # merged by `fwllm merge` on their recipe


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


def load_for_scoring(path: str, device: str) -> Callable[[], torch.nn.Module]:
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
        self.calib_key = digest(
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
        scales, densities = b.grid(method)
        key = digest(
            "tuned",
            method,
            paths,
            list(scales),
            list(densities),
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
                scales,
                densities,
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
        key = digest("recipe", recipe, self.calib_key, b.code_hash)
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

    def base_cell(self) -> Cell:
        b = self.bench
        cell = self.cell("base", b.base_key)
        cell.scores = b.scorer.scores(
            b.base_key, b.tasks_for(self.tasks), load_for_scoring(b.pool.base, b.s.device)
        )
        return cell


class QualityBench:
    """Every pool size x method of `s`, scored on the pool's dev rows; `run()` writes the report.

    The benchmark harness (eval/fwbench) subclasses it: more tuned methods (`tuned_methods`, `grid`),
    more baselines per pool (`baseline_cells`), more scored tasks (`tasks_for`, `scored_tasks`),
    and its own summary and report (`finish`)."""

    tuned_methods: Tuple[str, ...] = TUNED

    def __init__(
        self, pool, out_dir: str, s: QualitySettings, log: Callable[[str], None] = print, work_dir=None
    ):
        """`out_dir` gets the report; `work_dir` (default: the same) the merges, recipes and caches."""
        self.pool, self.out_dir, self.s, self.log = pool, out_dir, s, log
        self.work_dir = work_dir or out_dir
        known = tuple(self.tuned_methods) + RECIPE_ONLY
        unknown = [m for m in s.methods if m not in known]
        if unknown:
            raise FwllmError(f"unknown method(s) {unknown}; choose from {', '.join(known)}")
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
        calibration_files = [t.calibration for t in pool.tasks.values()]
        self.calibration_rows_checked = check_disjoint(self.scored_tasks(), calibration_files)
        self.expert_of = {e.task: e for e in pool.experts if e.relevant and e.task}

    def scored_tasks(self) -> List[DevTask]:
        """Every task some model is scored on."""
        return list(self.dev.values())

    def tasks_for(self, held_in: Sequence[str]) -> List[DevTask]:
        """The tasks a merge of a pool whose relevant experts trained on `held_in` is scored on."""
        return [self.dev[t] for t in held_in]

    def grid(self, method: str) -> Tuple[Sequence[float], Sequence[float]]:
        """(lambdas, densities) a tuned method searches."""
        if method != "task_arithmetic":
            raise FwllmError(f"{method} is not tuned here")
        return self.s.ta_scales, (1.0,)

    def references(self) -> Dict[str, Dict[str, q.RowScores]]:
        """Base on every task, each relevant expert on its own task (the normalizers)."""
        out = {
            "base": self.scorer.scores(
                self.base_key, self.tasks_for(list(self.dev)), load_for_scoring(self.pool.base, self.s.device)
            )
        }
        for task, e in self.expert_of.items():
            self.log(f"== reference: expert {e.name}")
            out[f"expert:{e.name}"] = self.scorer.scores(
                model_stamp(e.path), [self.dev[task]], load_for_scoring(e.path, self.s.device)
            )
        return out

    def measure_references(self, phases: Dict[str, float]) -> Dict[str, Dict[str, q.RowScores]]:
        t0 = time.time()
        refs = self.references()
        phases["references"] = time.time() - t0
        return refs

    def baseline_cells(self, run: PoolRun) -> List[Cell]:
        """The unmerged models a pool's merges are compared with (beyond the normalizers)."""
        return [run.base_cell()]

    def pool_cells(self, run: PoolRun, phases: Dict[str, float]) -> List[Cell]:
        cells = self.baseline_cells(run)
        for method in self.s.methods:
            t0 = time.time()
            tuned = method in self.tuned_methods
            if not tuned:
                run.release()  # the tuned methods' base copy is not needed while fwllm merges
            cells.append(run.tuned(method) if tuned else run.merged(method))
            phases[method] = phases.get(method, 0.0) + time.time() - t0
            self.log(f"   {cells[-1].label} done ({time.time() - t0:.0f} s)")
        run.release()
        return cells

    def run(self) -> dict:
        start = time.time()
        phases: Dict[str, float] = {}
        refs = self.measure_references(phases)
        cells: List[Cell] = []
        for n in self.s.sizes:
            cells += self.pool_cells(PoolRun(self, n), phases)
        return self.finish(refs, cells, time.time() - start, phases)

    def finish(self, refs, cells: Sequence[Cell], seconds: float, phases: Dict[str, float]) -> dict:
        """Summarize the cells and write the report (the demo's short one)."""
        return write_report(self, cells, summarize(self, refs, cells), seconds, phases)


def run_quality(
    pool, out_dir: str, s: QualitySettings, log: Callable[[str], None] = print, work_dir: Optional[str] = None
) -> dict:
    return QualityBench(pool, out_dir, s, log, work_dir).run()
