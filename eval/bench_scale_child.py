"""One measured run of `eval/bench_scale.py`, in its own process: `python bench_scale_child.py KIND JSON`.

KIND is
  fwllm         a recipe merged by fwllm (any method); the method's `solve` is timed (solve_s), and an
                FW LoRA pool's merge can also be written as a peft adapter (`lora_out`);
  mergekit      a recipe run by plain `mergekit-yaml`;
  floor         one layer-by-layer forward + backward of all calibration rows over the 16-adapter pool
                (`StreamedGradient`, no FW around it): what one FW iteration cannot beat;
  gram_floor    RegMean's own streamer (`StreamedRegMean`: capture, each layer materialised once and run
                by every candidate on its own task's rows with its LoRA hooks, then the head) with the Gram
                hooks, the reduction, the closed-form solve and the untouched tensors (phase D) taken out:
                one layer-by-layer forward per candidate, what the Gram pass cannot beat;
  fisher_floor  per candidate, one layer-by-layer forward + backward of its own task's rows with its LoRA
                terms attached (`StreamedGradient`, activation gradients only, no weight gradient formed):
                what a Fisher pass cannot beat (it needs at least this backward per candidate);
  fisher_wgrad_floor  the same with the weight gradients of the candidate's LoRA-adapted weights formed (a
                standard backward, one batched gradient per weight);
  fisher_pool_floor  the same with the weight gradients of every weight any candidate of the pool adapts
                formed, for every candidate: a Fisher pass forms exactly these (per example, the same
                matmul flops): candidate i's Fisher of a weight it leaves at the base still weighs the
                base in that weight's merge. This is the floor a Fisher pass's time is read against.
The last line printed is `RESULT {json}`: the run's figures, its peak RSS (VmHWM) and /proc/self/io.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time


def timed_solves() -> dict:
    """Wrap every fwllm method's `solve` so its seconds are recorded (the solve alone, no imports, no
    writing of the merged model)."""
    from fwllm.methods.registry import BUILTIN_METHODS

    seconds: dict = {}
    for method in BUILTIN_METHODS:
        cls = type(method)
        original = cls.solve

        def solve(self, job, original=original):
            t0 = time.time()
            try:
                return original(self, job)
            finally:
                seconds["solve_s"] = seconds.get("solve_s", 0.0) + time.time() - t0

        cls.solve = solve
    return seconds


def run_fwllm(args: dict) -> dict:
    from mergekit.options import MergeOptions
    from fwllm.mergekit_glue.merge import merge_recipe

    seconds = timed_solves()
    options = MergeOptions(quiet=True, out_shard_size=args.get("shard", 2 << 30))
    merge_recipe(args["recipe"], args["out"], options)
    extra = dict(seconds)
    plan_dir = os.path.join(args["out"], "fwllm_plan")
    plan = json.load(open(os.path.join(plan_dir, "plan.json")))
    if plan.get("method") == "fw_merging" or os.path.isfile(os.path.join(plan_dir, "trace.json")):
        trace = json.load(open(os.path.join(plan_dir, "trace.json"))).get("trace") or []
        extra["iteration_s"] = [t.get("seconds") for t in trace if isinstance(t, dict)]
    for key in ("gradient", "solve_seconds", "candidate_bytes_read"):
        if key in plan:
            extra[key] = plan[key]
    extra.update(plan.get("timings") or {})  # RegMean: its closed form's seconds, apart from the Gram pass
    if args.get("lora_out"):
        from fwllm.mergekit_glue.lora_out import write_lora_out

        t0 = time.time()
        extra["lora_out_summary"] = write_lora_out(args["recipe"], args["out"], args["lora_out"], True)
        extra["lora_out_s"] = time.time() - t0
    return extra


def run_mergekit(args: dict) -> dict:
    r = subprocess.run(
        [
            args["mergekit"],
            args["recipe"],
            args["out"],
            "--lora-merge-cache",
            args["cache"],
            "--out-shard-size",
            "2B",
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return {}


def _checkpoint_bytes(args: dict) -> int:
    return int(args.get("checkpoint_gib", 1.0) * 2**30)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_floor(args: dict) -> dict:
    from fwllm.arch.streaming import MetaModel, base_weights, skeleton
    from fwllm.data.calibration import load_calibration
    from fwllm.data.objective import encode_tasks
    from fwllm.io.adapters import AdapterReader
    from fwllm.io.models import load_tokenizer
    from fwllm.solvers.lora_terms import LoraTerms
    from fwllm.solvers.streamed_gradient import StreamedGradient

    model = skeleton(args["base"])
    lora = LoraTerms([AdapterReader(a) for a in args["adapters"]])
    lora.attach(model)
    objective = encode_tasks(
        load_calibration(args["calibration"]),
        load_tokenizer(args["base"]),
        model,
        args["max_length"],
        args["batch_size"],
    )
    meta = MetaModel(model, base_weights(args["base"]), args.get("device", "cpu"))
    grad = StreamedGradient(meta, objective, [], lambda: {}, lora, checkpoint_bytes=_checkpoint_bytes(args))
    from fwbench.heap_trim import set_heap_trim  # eval/bench_heap_trim.py: heap trim off, or how often

    set_heap_trim(args.get("trim"))
    times = []
    for _ in range(args.get("evaluations", 1)):
        t0 = time.time()
        grad(lambda n, g: None)
        _sync()
        times.append(time.time() - t0)
    return {"evaluation_s": times[0], "evaluations_s": times}


def _own_tasks(args: dict):
    """Each adapter's own calibration task (args["tasks"][i] names it), as the methods pick them."""
    from fwllm.data.calibration import load_calibration

    tasks = {t.name: t for t in load_calibration(args["calibration"])}
    return [tasks[name] for name in args["tasks"]]


def run_gram_floor(args: dict) -> dict:
    from fwllm.data.encoding import encode_task
    from fwllm.io.candidates import open_candidate
    from fwllm.io.models import load_tokenizer
    from fwllm.solvers.streamed_grams import StreamedRegMean

    class ForwardOnly(StreamedRegMean):
        """The same passes, no Gram: no hooks, nothing reduced or solved, no untouched tensor written."""

        def _grams(self, names, grams, leader, state, *more, **kw):
            return contextlib.nullcontext()

        def _add(self, run, grams, leader, sums):
            pass

        def _solve(self, sums):
            return iter(())

        def _rest(self):
            return iter(())

    tokenizer = load_tokenizer(args["base"])
    candidates = [open_candidate(args["base"], a) for a in args["adapters"]]
    batches = [
        encode_task(t, tokenizer, args["max_length"], args["batch_size"]).batches for t in _own_tasks(args)
    ]
    floor = ForwardOnly.for_candidates(
        args["base"], candidates, [1.0] * len(candidates), batches, 0.9, 1e-5, args.get("device", "cpu")
    )
    t0 = time.time()
    for _ in floor.merged():
        pass
    _sync()
    return {"evaluation_s": time.time() - t0}


def run_fisher_floor(args: dict, weight_gradients: str = "none") -> dict:
    """`weight_gradients`: none, own (the candidate's adapted weights) or pool (any candidate's)."""
    from fwllm.arch.streaming import MetaModel, base_weights, skeleton
    from fwllm.data.objective import encode_tasks
    from fwllm.io.adapters import AdapterReader
    from fwllm.io.models import load_tokenizer
    from fwllm.solvers.lora_terms import LoraTerms
    from fwllm.solvers.streamed_gradient import StreamedGradient

    model = skeleton(args["base"])
    tokenizer = load_tokenizer(args["base"])
    weights = base_weights(args["base"])
    pool = LoraTerms([AdapterReader(a) for a in args["adapters"]]).names()  # every weight an adapter changes
    total = 0.0
    for adapter, task in zip(args["adapters"], _own_tasks(args)):
        lora = LoraTerms([AdapterReader(adapter)])
        for name in lora.names():
            lora.set_coefficients(name, [1.0])  # the candidate itself: base + s B A
        lora.attach(model)
        try:
            objective = encode_tasks([task], tokenizer, model, args["max_length"], args["batch_size"])
            # their gradients formed, as a Fisher pass does
            adapted = {"none": [], "own": lora.names(), "pool": pool}[weight_gradients]
            meta = MetaModel(model, weights, args.get("device", "cpu"), trainable=adapted)
            grad = StreamedGradient(
                meta, objective, adapted, lambda: {}, lora, checkpoint_bytes=_checkpoint_bytes(args)
            )
            t0 = time.time()
            grad(lambda n, g: None)
            _sync()
            total += time.time() - t0
        finally:
            lora.detach()
    return {"evaluation_s": total}


RUNS = {
    "fwllm": run_fwllm,
    "mergekit": run_mergekit,
    "floor": run_floor,
    "gram_floor": run_gram_floor,
    "fisher_floor": run_fisher_floor,
    "fisher_wgrad_floor": lambda args: run_fisher_floor(args, weight_gradients="own"),
    "fisher_pool_floor": lambda args: run_fisher_floor(args, weight_gradients="pool"),
}


def main() -> None:
    kind, args = sys.argv[1], json.loads(sys.argv[2])
    start = time.time()
    extra = RUNS[kind](args)
    io = {}
    with open("/proc/self/io") as fp:
        for line in fp:
            key, value = line.split(":")
            io[key] = int(value)
    # VmHWM, not ru_maxrss: exec carries the spawning process's peak over into a child's ru_maxrss
    # (subprocess spawns with vfork), so ru_maxrss would never be below what the benchmark held at the spawn
    own = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # ours: at most `own` at their spawn
    figures = dict(
        extra,
        wall_s=time.time() - start,
        peak_rss_gib=max(own, children) / 2**20,
        read_gib=io["read_bytes"] / 2**30,
        written_gib=io["write_bytes"] / 2**30,
        rchar_gib=io["rchar"] / 2**30,
    )
    print("RESULT " + json.dumps(figures))


if __name__ == "__main__":
    main()
