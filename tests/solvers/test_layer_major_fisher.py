"""Fisher merging's layer-major order (`gradient: layerwise`): every candidate through the model together,
each layer's merge finished before the next, no model-sized statistic on disk.

Truth: the in-RAM Fisher merge (`gradient: full`, whole models, `fwllm.solvers.fisher`) and the
candidate-major order with its disk sums (what `layerwise` did before, still used where layer-major
cannot go). Also: which order is chosen, what the layer-major order keeps resident, and what it writes.
"""

import json
import os

import pytest
import torch

from conftest import load_tensors, merge, save_random_loras, tiny_tokenizer
from fwllm.arch.streaming import MetaModel
from fwllm.core.footprint import split_by_layer
from fwllm.core.params import FisherParams
from fwllm.data.calibration import load_calibration
from fwllm.io.candidates import open_candidate
from fwllm.io.spill import FileSpill
import fwllm.methods.fisher as fisher_method
import fwllm.solvers.layer_major_fisher as layer_major
from fwllm.solvers.streamed_fisher import CandidateRun

pytestmark = pytest.mark.usefixtures("one_thread")
ROOMY, NONE = 1 << 45, 0  # free RAM as the order's choice sees it


@pytest.fixture(scope="module")
def lora_refs(tiny_pool, tmp_path_factory):
    return save_random_loras(tiny_pool["base"], tmp_path_factory.mktemp("lm_fisher_lora"), (4, 2), seed=40)


def pool_of(tiny_pool, lora_refs, kind):
    """(models, per_model) with unequal weights and each candidate's own task."""
    if kind == "full":
        e = tiny_pool["experts"]
        per_model = [
            {"task": "copy", "weight": 2.0},
            {"task": "rev", "weight": 0.5},
            {"task": "copy", "weight": 1.0},
        ]
        return [e["copy"], e["rev"], e["noise"]], per_model
    return lora_refs, [{"task": "copy", "weight": 1.0}, {"task": "rev", "weight": 0.25}]


class Spy:
    """What a layerwise solve keeps on disk: DiskSums made, and the plan folder's size outside merged/
    each time a merged tensor is handed to the store."""

    def __init__(self, monkeypatch):
        self.disk_sums, self.outside_merged = 0, []
        spy = self

        class CountedDiskSum(fisher_method.DiskSum):
            def __init__(self, *a, **k):
                spy.disk_sums += 1
                super().__init__(*a, **k)

        write = fisher_method.write_merged

        def watched_write(plan_dir, tensors):
            def watched():
                for item in tensors:
                    spy.outside_merged.append(folder_bytes(plan_dir, skip="merged"))
                    yield item

            return write(plan_dir, watched())

        monkeypatch.setattr(fisher_method, "DiskSum", CountedDiskSum)
        monkeypatch.setattr(fisher_method, "write_merged", watched_write)


def folder_bytes(folder, skip):
    total = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not (root == str(folder) and d == skip)]
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def run_merge(tmp_path, pool, models, per_model, label, gradient, free, monkeypatch, **params):
    monkeypatch.setattr(fisher_method, "available_memory", lambda: free)
    p = {"calibration": str(pool["calib"]), "max_rows": 3, "top_k": 2, "gradient": gradient, **params}
    out = merge(tmp_path, label, "fisher", pool, models, p, per_model=per_model)
    plan = json.loads((out / "fwllm_plan" / "plan.json").read_text())
    return load_tensors(out), plan


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_layer_major_merge_equals_the_in_ram_and_the_disk_sums_merge(
    tmp_path, tiny_pool, lora_refs, monkeypatch, kind, fisher
):
    models, per_model = pool_of(tiny_pool, lora_refs, kind)
    args = (tmp_path, tiny_pool, models, per_model)
    full, _ = run_merge(*args, "full", "full", ROOMY, monkeypatch, fisher=fisher)
    disk_spy = Spy(monkeypatch)
    disk, disk_plan = run_merge(*args, "disk", "layerwise", NONE, monkeypatch, fisher=fisher)
    major_spy = Spy(monkeypatch)
    spilled = []
    spill = FileSpill.__call__
    monkeypatch.setattr(FileSpill, "__call__", lambda self, x: spilled.append(x.shape) or spill(self, x))
    major, major_plan = run_merge(*args, "major", "layerwise", ROOMY, monkeypatch, fisher=fisher)
    assert spilled  # the checkpoints went to file-backed pages

    assert {c["meta"]["order"] for c in disk_plan["candidates"]} == {"disk sums"}
    assert {c["meta"]["order"] for c in major_plan["candidates"]} == {"layer-major"}
    assert set(major) == set(full) == set(disk)
    changed = 0
    base = load_tensors(tiny_pool["base"])
    for name, want in full.items():
        assert torch.allclose(major[name], want, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(major[name], disk[name], rtol=1e-5, atol=1e-6), name
        changed += not torch.equal(want, base[name])
    assert changed > 0  # the merge is not the base: the comparison is not of untouched tensors
    # same statistics reported: examples, terms, mean Fisher
    for a, b in zip(major_plan["candidates"], disk_plan["candidates"]):
        assert (a["meta"]["examples"], a["meta"]["terms"]) == (b["meta"]["examples"], b["meta"]["terms"])
        assert a["meta"]["mean"] == pytest.approx(b["meta"]["mean"], rel=1e-5)

    # disk: the candidate-major order makes its model-sized sums, the layer-major one none at all
    assert disk_spy.disk_sums == 2 + len(models)  # num, den, a scratch per candidate
    assert major_spy.disk_sums == 0
    # outside merged/, the plan folder holds only what it held before the solve (its settings, ~1 KiB)
    assert major_spy.outside_merged and len(set(major_spy.outside_merged)) == 1
    assert major_spy.outside_merged[0] < 4096
    plan_dir = tmp_path / "major" / "fwllm_plan"
    assert not any(n.startswith(".fisher") for n in os.listdir(plan_dir))


def runs_of(tiny_pool, lora_refs, kind):
    models, per_model = pool_of(tiny_pool, lora_refs, kind)
    tasks = {t.name: t for t in load_calibration(str(tiny_pool["calib"]), 3)}
    runs = []
    for m, pm in zip(models, per_model):
        base, _, adapter = str(m).partition("+")
        cand = open_candidate(base, adapter or None)
        model_dir = str(tiny_pool["base"]) if adapter else str(m)
        runs.append(CandidateRun(cand, tasks[pm["task"]], model_dir, pm["weight"]))
    return runs


def test_the_order_is_chosen_by_normalize_fisher_and_the_held_state(tiny_pool, lora_refs, monkeypatch):
    base = str(tiny_pool["base"])
    runs, tok = runs_of(tiny_pool, lora_refs, "full"), tiny_tokenizer()
    exact = FisherParams(calibration="x", fisher="exact", top_k=5, max_length=32)
    empirical = FisherParams(calibration="x", fisher="empirical", max_length=32)
    need_exact = layer_major.held_bytes(base, runs, tok, exact)
    need_empirical = layer_major.held_bytes(base, runs, tok, empirical)
    assert need_exact > need_empirical > 0

    # a free RAM whose quarter holds the empirical Fisher's state but not the exact one's
    free = 4 * need_empirical
    monkeypatch.setattr(fisher_method, "available_memory", lambda: free)
    assert fisher_method.layerwise_order(empirical, base, runs, tok)[0] == "layer-major"
    order, why = fisher_method.layerwise_order(exact, base, runs, tok)
    assert order == "disk sums" and "GiB free" in why
    # normalize_fisher needs each candidate's whole Fisher first: disk sums, however much RAM is free
    monkeypatch.setattr(fisher_method, "available_memory", lambda: ROOMY)
    normalized = FisherParams(calibration="x", fisher="empirical", normalize_fisher=True)
    order, why = fisher_method.layerwise_order(normalized, base, runs, tok)
    assert order == "disk sums" and "normalize_fisher" in why


def test_normalize_fisher_merges_through_the_disk_sums(tmp_path, tiny_pool, lora_refs, monkeypatch):
    models, per_model = pool_of(tiny_pool, lora_refs, "full")
    spy = Spy(monkeypatch)
    _, plan = run_merge(
        tmp_path,
        tiny_pool,
        models[:2],
        per_model[:2],
        "norm",
        "layerwise",
        ROOMY,
        monkeypatch,
        normalize_fisher=True,
    )
    assert {c["meta"]["order"] for c in plan["candidates"]} == {"disk sums"}
    assert spy.disk_sums > 0


class Resident:
    """Parameters materialised across every MetaModel (all candidates' skeletons): peak bytes of decoder
    layers, of the rest, and of both together."""

    def __init__(self, monkeypatch):
        self.metas, self.layers, self.outer, self.both = [], 0, 0, 0
        fetch = MetaModel.fetch

        def counted(meta, names, source=None, **kw):
            if not any(m is meta for m in self.metas):
                self.metas.append(meta)
            fetch(meta, names, source, **kw)
            layer = outer = 0
            for m in self.metas:
                for n in m.resident:
                    size = 4 * m.model.get_parameter(n).numel()
                    if ".layers." in n:
                        layer += size
                    elif n not in m.ties or n == m.ties[n][0]:  # a tied pair once
                        outer += size
            self.layers, self.outer = max(self.layers, layer), max(self.outer, outer)
            self.both = max(self.both, layer + outer)

        monkeypatch.setattr(MetaModel, "fetch", counted)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_one_layer_of_one_candidate_is_materialised_at_a_time(tiny_pool, lora_refs, monkeypatch, kind):
    runs = runs_of(tiny_pool, lora_refs, kind)
    base = str(tiny_pool["base"])
    p = FisherParams(calibration="x", fisher="exact", top_k=2, max_length=32)
    resident = Resident(monkeypatch)
    reads = {}
    base_weights = layer_major.base_weights

    class CountedBase(dict):  # the base's weights map, counting the reads of each tensor
        def __getitem__(self, name):
            reads[name] = reads.get(name, 0) + 1
            return super().__getitem__(name)

    def counted_base(model_dir):
        loader = base_weights(model_dir)
        return CountedBase({n: loader[n] for n in loader}) if model_dir == base else loader

    monkeypatch.setattr(layer_major, "base_weights", counted_base)
    covered = fisher_method.covered_parameters(base)
    solver = layer_major.LayerMajorFisher(base, runs, covered, tiny_tokenizer(), p)
    reads.clear()  # (the counting map's own construction read every tensor once)
    merged = dict(solver.merged())
    assert set(merged) == set(covered)
    assert all(m["examples"] == 3 for m in solver.metas)

    shapes = {n: tuple(s) for n, s in covered.items()}
    largest_layer, outer = split_by_layer(shapes)
    assert 0 < resident.layers <= 4 * largest_layer  # one candidate's one layer, never two
    assert 0 < resident.outer <= 4 * outer  # one candidate's embeddings and head, never two
    assert resident.both <= 4 * max(largest_layer, outer)  # never a layer and the outer tensors together
    if kind == "lora":
        # the base layer is read once per pass (forward, backward) for all the candidates together
        layer_reads = {n: c for n, c in reads.items() if ".layers." in n}
        assert layer_reads and set(layer_reads.values()) == {2}


def test_the_priced_state_bounds_what_is_held(tiny_pool, lora_refs, monkeypatch):
    """`held_bytes` is an upper bound on the checkpoints and per-term gradients the pass holds at its
    fullest (after the top), and not a wild one."""
    runs = runs_of(tiny_pool, lora_refs, "full")
    base = str(tiny_pool["base"])
    p = FisherParams(calibration="x", fisher="exact", top_k=2, max_length=32)
    priced = layer_major.held_bytes(base, runs, tiny_tokenizer(), p)
    seen = []
    top = layer_major.LayerMajorFisher._top

    def measured_top(self, ps):
        top(self, ps)
        if ps is self.passes[-1]:
            tensors = {}
            for q in self.passes:
                for t in q.live:
                    for x in list(t.inputs) + list(t.grads) + [r for rows in t.rows.values() for r in rows]:
                        if x is not None:
                            tensors[id(x)] = x
                for x in q.held.values():
                    tensors[id(x)] = x
            seen.append(sum(x.numel() * x.element_size() for x in tensors.values()))

    monkeypatch.setattr(layer_major.LayerMajorFisher, "_top", measured_top)
    solver = layer_major.LayerMajorFisher(
        base, runs, fisher_method.covered_parameters(base), tiny_tokenizer(), p
    )
    for _ in solver.merged():
        pass
    assert len(seen) == 1 and 0 < seen[0] <= priced < 8 * seen[0]


@pytest.fixture(scope="module")
def tied_pool(tmp_path_factory):
    """A tied-embedding tiny LLaMA base and two perturbed copies of it, with copy/rev calibration rows."""
    from conftest import perturbed_copies, task_rows, tiny_llama, write_jsonl

    root = tmp_path_factory.mktemp("tied_pool")
    tiny_llama(layers=3, tie=True).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    (root / "calib").mkdir()
    for task in ("copy", "rev"):
        write_jsonl(root / "calib" / f"{task}.jsonl", task_rows(task, 4, seed=5))
    experts = perturbed_copies(root / "base", root, 2, 0.2, seed=7)
    for e in experts:
        tiny_tokenizer().save_pretrained(e)
    return {"base": root / "base", "calib": root / "calib", "experts": experts}


def test_a_tied_embedding_merges_as_in_ram(tmp_path, tied_pool, monkeypatch):
    """The tied LM head / embedding gets both paths' gradient summed before squaring: the top path's part
    is kept per candidate from the top to the bottom of the pass."""
    per_model = [{"task": "copy", "weight": 1.0}, {"task": "rev", "weight": 3.0}]
    args = (tmp_path, tied_pool, tied_pool["experts"], per_model)
    full, _ = run_merge(*args, "full", "full", ROOMY, monkeypatch)
    major, plan = run_merge(*args, "major", "layerwise", ROOMY, monkeypatch)
    assert {c["meta"]["order"] for c in plan["candidates"]} == {"layer-major"}
    name = "model.embed_tokens.weight"
    average = (tied_pool_tensor(tied_pool, 0, name) + 3 * tied_pool_tensor(tied_pool, 1, name)) / 4
    assert not torch.allclose(full[name], average, rtol=1e-3)  # the Fisher weighs it: not the plain average
    assert set(major) == set(full)
    for n, want in full.items():
        assert torch.allclose(major[n], want, rtol=1e-5, atol=1e-6), n


def tied_pool_tensor(pool, i, name):
    return load_tensors(pool["experts"][i])[name]


def test_no_candidates_embedding_copy_outlives_its_phase(tiny_pool, lora_refs, monkeypatch):
    """Every candidate keeps its own StreamedFisher through the pass: a materialised embedding one of them
    still referenced after its phase would be held once per candidate (at 1.1B x 16 LoRA adapters that was
    16 x 262 MB of float32 copies, 7.7 GiB anon in all)."""
    import gc

    runs = runs_of(tiny_pool, lora_refs, "full")
    base = str(tiny_pool["base"])
    p = FisherParams(calibration="x", fisher="empirical", max_length=32)
    shape = None
    counts = []
    top = layer_major.LayerMajorFisher._top

    def measured_top(self, ps):
        top(self, ps)
        if ps is self.passes[-1]:
            gc.collect()
            pending = {id(t) for t in [*self.fold.num.values(), *self.fold.den.values()]}
            counts.append(
                sum(
                    1
                    for o in gc.get_objects()
                    if torch.is_tensor(o)
                    and tuple(o.shape) == shape
                    and o.dtype == torch.float32
                    and o.device.type == "cpu"
                    and id(o) not in pending
                )
            )

    monkeypatch.setattr(layer_major.LayerMajorFisher, "_top", measured_top)
    covered = fisher_method.covered_parameters(base)
    shape = tuple(next(s for n, s in covered.items() if "embed_tokens" in n))
    solver = layer_major.LayerMajorFisher(base, runs, covered, tiny_tokenizer(), p)
    for _ in solver.merged():
        pass
    assert len(runs) > 1 and counts == [0]


def test_the_pass_times_its_phases_apart_from_what_consumes_it(tiny_pool, lora_refs):
    """The seconds the consumer of `merged()` spends with each tensor (storing it) are "stored_s", not
    a phase's; the fold is timed inside the phases that call it."""
    import time

    runs = runs_of(tiny_pool, lora_refs, "lora")
    base = str(tiny_pool["base"])
    p = FisherParams(calibration="x", fisher="empirical", max_length=32)
    solver = layer_major.LayerMajorFisher(
        base, runs, fisher_method.covered_parameters(base), tiny_tokenizer(), p
    )
    t0, handed = time.perf_counter(), 0
    for _ in solver.merged():
        time.sleep(0.01)
        handed += 1
    wall = time.perf_counter() - t0
    t = solver.timings
    phases = sum(t[k] for k in ("capture_s", "forward_s", "top_s", "backward_s", "bottom_s"))
    assert handed > 0 and t["stored_s"] >= 0.01 * handed
    assert phases + t["stored_s"] <= wall
    assert 0 < t["fold_s"] <= t["top_s"] + t["backward_s"] + t["bottom_s"]
