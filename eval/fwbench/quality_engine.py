"""The quality benchmark's engine: fwllm's pool-quality engine (`fwllm.demo.pool_quality`, what
`fwllm demo` runs) with what only the benchmark measures added on top:

* tuned TIES and DARE next to tuned task arithmetic (lambda and density chosen on the calibration
  loss, `fwllm.demo.tuning` over the grids of `BenchSettings`);
* the best single expert of each pool, chosen on the same calibration loss;
* held-out tasks no expert trained on (the benchmark's GLUE tasks, `fwbench.held_out`), scored for
  every model;
* the long report (`fwbench.quality_report`): paired differences, per-task tables, the plot.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from fwllm.demo.dev_rows import DevTask
from fwllm.demo.pool_quality import Cell, PoolRun, QualityBench, load_for_scoring
from fwllm.demo.recipes import write_pool_calibration
from fwllm.demo.scores import digest, files_hash, model_stamp
from fwllm.demo.settings import QualitySettings
from fwllm.demo.tuning import TUNED_METHODS, calibration_objective
from fwllm.io.models import load_model
from fwbench.quality_report import summarize, write_report


@dataclass
class BenchSettings(QualitySettings):
    # TIES averages the agreeing deltas (normalize), so its lambda lives near 1; DARE sums them as TA does
    ties_scales: Sequence[float] = (0.5, 1.0, 1.5)
    ties_densities: Sequence[float] = (0.2, 0.5)
    dare_scales: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 1.0)
    dare_densities: Sequence[float] = (0.1, 0.5)
    best_single: bool = True  # score the pool's best single expert (chosen on the calibration loss)


class QualityBenchmark(QualityBench):
    tuned_methods = TUNED_METHODS  # task arithmetic, TIES, DARE

    def __init__(
        self,
        pool,
        out_dir: str,
        s: BenchSettings,
        log: Callable[[str], None] = print,
        work_dir: Optional[str] = None,
        held_out: Sequence[DevTask] = (),
    ):
        """`held_out`: tasks no expert trained on, scored for every model (the benchmark's GLUE tasks)."""
        self.held_out = list(held_out)  # before the engine checks every scored task against calibration
        super().__init__(pool, out_dir, s, log, work_dir)
        self.member_losses: Dict[str, Dict[str, float]] = {}

    def scored_tasks(self) -> List[DevTask]:
        return super().scored_tasks() + self.held_out

    def tasks_for(self, held_in: Sequence[str]) -> List[DevTask]:
        return super().tasks_for(held_in) + self.held_out

    def grid(self, method: str):
        if method == "ties":
            return self.s.ties_scales, self.s.ties_densities
        if method == "dare_ties":
            return self.s.dare_scales, self.s.dare_densities
        return super().grid(method)

    def measure_references(self, phases: Dict[str, float]):
        refs = super().measure_references(phases)
        if self.s.best_single:
            t0 = time.time()
            self.measure_members()
            phases["member calibration losses"] = time.time() - t0
        return refs

    def measure_members(self) -> None:
        """Calibration loss per task of every pool member (for the best-single-expert baseline)."""
        path = os.path.join(self.work_dir, "member_calibration_losses.json")
        s = self.s.merge
        calib = write_pool_calibration(
            self.pool, list(self.dev), os.path.join(self.work_dir, "calibration_all"), False
        )
        key = digest(
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

    def baseline_cells(self, run: PoolRun) -> List[Cell]:
        cells = super().baseline_cells(run)
        if self.s.best_single:
            cells.append(best_expert(self, run))
        return cells

    def finish(self, refs, cells: Sequence[Cell], seconds: float, phases: Dict[str, float]) -> dict:
        return write_report(self, cells, summarize(self, refs, cells), seconds, phases)


def best_expert(bench: QualityBenchmark, run: PoolRun) -> Cell:
    """The pool member with the lowest calibration loss over the pool's tasks, unmerged."""
    losses = {
        m.path: float(np.mean([bench.member_losses[m.path][t] for t in run.tasks])) for m in run.members
    }
    best = min(losses, key=losses.get)
    key = model_stamp(best)
    cell = run.cell("best_expert", key)
    cell.info = {
        "expert": os.path.basename(best),
        "calibration_loss": losses[best],
        "calibration_losses": {os.path.basename(p): v for p, v in losses.items()},
    }
    cell.scores = bench.scorer.scores(key, bench.tasks_for(run.tasks), load_for_scoring(best, bench.s.device))
    return cell


def run_quality(
    pool,
    out_dir: str,
    s: BenchSettings,
    log: Callable[[str], None] = print,
    work_dir: Optional[str] = None,
    held_out: Sequence[DevTask] = (),
) -> dict:
    return QualityBenchmark(pool, out_dir, s, log, work_dir, held_out).run()
