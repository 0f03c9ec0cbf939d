"""Expert pools on disk: a base, experts fine-tuned from it, and each task's data.

Layout (paths in manifest.json are relative to the pool folder)::

    <root>/experts/<profile>/<family>/
        manifest.json             written last: its presence marks a finished pool
        base/                     save_pretrained folder (+ tokenizer)
        experts/<name>/           full checkpoint (+ tokenizer); smol also adapters/<name>/
        data/<task>/{calibration,dev}.jsonl

A build happens in a temporary sibling folder renamed into place at the end, so an
interrupted build never looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

from fwllm.core.errors import FwllmError
from fwllm.core.paths import cache_root

MANIFEST = "manifest.json"


@dataclass
class TaskData:
    name: str
    kind: str  # causal_lm | classification | regression | mlm
    calibration: str
    dev: str
    text_fields: List[str] = field(default_factory=list)
    num_labels: Optional[int] = None


@dataclass
class Expert:
    name: str
    path: str
    task: Optional[str]  # None for irrelevant experts
    relevant: bool
    adapter: Optional[str] = None


@dataclass
class ExpertPool:
    root: str
    profile: str
    family: str
    base: str
    experts: List[Expert]
    tasks: Dict[str, TaskData]
    seed: int = 0
    build_seconds: float = 0.0

    def save(self) -> None:
        rel = lambda p: os.path.relpath(p, self.root) if p else p  # noqa: E731
        data = {
            "profile": self.profile,
            "family": self.family,
            "seed": self.seed,
            "build_seconds": self.build_seconds,
            "base": rel(self.base),
            "experts": [dict(asdict(e), path=rel(e.path), adapter=rel(e.adapter)) for e in self.experts],
            "tasks": {
                n: dict(asdict(t), calibration=rel(t.calibration), dev=rel(t.dev))
                for n, t in self.tasks.items()
            },
        }
        tmp = os.path.join(self.root, MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fp:
            json.dump(data, fp, indent=2)
        os.replace(tmp, os.path.join(self.root, MANIFEST))

    def calibration_dir(self) -> str:
        """<root>/calibration/<task>.jsonl for every relevant task: the folder layout recipes take
        (one file per task). Made on first use, so pools built before it existed get one too."""
        folder = os.path.join(self.root, "calibration")
        if not os.path.isdir(folder):
            staging = tempfile.mkdtemp(prefix=".calibration-", dir=self.root)
            for e in self.experts:
                if e.relevant and e.task:
                    shutil.copyfile(self.tasks[e.task].calibration, os.path.join(staging, f"{e.task}.jsonl"))
            try:
                os.rename(staging, folder)
            except OSError:  # made meanwhile by another process
                shutil.rmtree(staging, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, root: str) -> "ExpertPool":
        root = os.path.abspath(root)
        path = os.path.join(root, MANIFEST)
        if not os.path.isfile(path):
            raise FwllmError(f"{root} is not a finished expert pool (no {MANIFEST})")
        with open(path, encoding="utf-8") as fp:
            data = json.load(fp)
        ab = lambda p: os.path.join(root, p) if p else p  # noqa: E731
        return cls(
            root=root,
            profile=data["profile"],
            family=data["family"],
            base=ab(data["base"]),
            experts=[
                Expert(**dict(e, path=ab(e["path"]), adapter=ab(e.get("adapter")))) for e in data["experts"]
            ],
            tasks={
                n: TaskData(**dict(t, calibration=ab(t["calibration"]), dev=ab(t["dev"])))
                for n, t in data["tasks"].items()
            },
            seed=data.get("seed", 0),
            build_seconds=data.get("build_seconds", 0.0),
        )


def pool_folder(profile: str, family: str, root: Optional[str] = None) -> str:
    return os.path.join(os.path.abspath(root or cache_root()), "experts", profile, family)


def build_cached(folder: str, seed: int, force: bool, build: Callable[[str], ExpertPool]) -> ExpertPool:
    """Reuse a finished pool with the same seed, else build into a staging folder and rename."""
    if not force and os.path.isfile(os.path.join(folder, MANIFEST)):
        pool = ExpertPool.load(folder)
        if pool.seed == seed:
            return pool
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.partial-", dir=parent)
    try:
        pool = build(staging)
        pool.save()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.exists(folder):
        shutil.rmtree(folder)  # a pool for another seed, or --force
    try:
        os.rename(staging, folder)
    except OSError:  # a concurrent build of the same pool finished first: keep that one
        shutil.rmtree(staging, ignore_errors=True)
    return ExpertPool.load(folder)
