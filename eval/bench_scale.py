"""FW-Merging at real model sizes: SmolLM2-135M, TinyLlama-1.1B and LLaMA-2-7B shapes.

Each model is random bf16 weights of the real shapes, sharded like a Hub download
(`eval/scale_models.py`); the LoRA pool is 16 adapters (8 of r=8 on q_proj, v_proj and 8 of
r=16 on all seven projections) with random factors. FW hard runs with `gradient: layerwise`
(the bounded path: one layer materialised at a time, the LoRA iterate implicit) on 4
calibration rows of 64 tokens (`--rows`, `--tokens`; the paper's size is `--rows 96 --tokens
512`, 32 rows of 3 tasks), on the CPU or, with `--device cuda`, on a GPU. Every run is its own
child process; the parent samples the child's anonymous RSS, the child reports its own peak RSS (VmHWM, mapped file pages included) and
/proc/self/io. Beside FW: mergekit `task_arithmetic` on the same pool where it can run here,
else what it would need, computed; and "floor": one layer-by-layer forward+backward of the
same rows, with no FW around it.

    python eval/bench_scale.py [--models smol-135m tinyllama-1.1b llama2-7b] [--iterations 2] [--repeats 1]
                               [--device cpu|cuda] [--rows 4] [--tokens 64]
                               [--full-pool 2 4 8 | 0] [--full-pool-model tinyllama-1.1b]
                               [--work DIR] [--out eval/reports]

Writes eval/reports/bench_scale.md and .json. Not run in CI.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale_models  # noqa: E402

GIB = 1 << 30

CHILD = r"""
import json, os, resource, sys, time
kind, args = sys.argv[1], json.loads(sys.argv[2])
start = time.time()
extra = {}
if kind == "fwllm":
    from mergekit.options import MergeOptions
    from fwllm.mergekit_glue.merge import merge_recipe
    merge_recipe(args["recipe"], args["out"], MergeOptions(quiet=True, out_shard_size=args.get("shard", 2 * 2**30)))
    plan = json.load(open(os.path.join(args["out"], "fwllm_plan", "plan.json")))
    trace = json.load(open(os.path.join(args["out"], "fwllm_plan", "trace.json")))["trace"]
    extra = {"gradient": plan["gradient"], "solve_s": plan["solve_seconds"],
             "iteration_s": [t.get("seconds") for t in trace], "candidate_bytes_read": plan["candidate_bytes_read"]}
elif kind == "mergekit":
    import subprocess
    r = subprocess.run([args["mergekit"], args["recipe"], args["out"], "--lora-merge-cache", args["cache"],
                        "--out-shard-size", "2B"], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
elif kind == "floor":
    import torch
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
    objective = encode_tasks(load_calibration(args["calibration"]), load_tokenizer(args["base"]), model,
                             args["max_length"], args["batch_size"])
    grad = StreamedGradient(MetaModel(model, base_weights(args["base"]), args.get("device", "cpu")), objective, [],
                            lambda: {}, lora, checkpoint_bytes=int(args.get("checkpoint_gib", 1.0) * 2**30))
    from fwbench.heap_trim import set_heap_trim  # eval/bench_heap_trim.py: heap trim off, or how often
    set_heap_trim(args.get("trim"))
    times = []
    for _ in range(args.get("evaluations", 1)):
        t0 = time.time()
        grad(lambda n, g: None)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.time() - t0)
    extra = {"evaluation_s": times[0], "evaluations_s": times}
io = {}
with open("/proc/self/io") as fp:
    for line in fp:
        key, value = line.split(":")
        io[key] = int(value)
# VmHWM, not ru_maxrss: exec carries the spawning process's peak over into a child's ru_maxrss (subprocess
# spawns with vfork), so ru_maxrss would never be below what the benchmark itself held when it spawned us
own = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # ours: at most `own` at their spawn
print("RESULT " + json.dumps(dict(extra, wall_s=time.time() - start,
      peak_rss_gib=max(own, children) / 2**20,
      read_gib=io["read_bytes"] / 2**30, written_gib=io["write_bytes"] / 2**30,
      rchar_gib=io["rchar"] / 2**30)))
"""


def _rss_gib(pids) -> tuple:
    """(anonymous RSS, total RSS) of `pids` in GiB, from /proc."""
    anon = total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fp:
                for line in fp:
                    if line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
                    elif line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return anon / GIB, total / GIB


def _solved(out: str) -> bool:
    """Whether the merge into `out` has finished its solve (its staged plan is marked DONE)."""
    parent, name = os.path.split(out)
    return bool(glob.glob(os.path.join(parent, f".{name}.partial-*", "fwllm_plan", "DONE"))) or \
        os.path.isfile(os.path.join(out, "fwllm_plan", "DONE"))


def run_child(kind: str, args: dict) -> dict:
    """The child's figures, its peak anonymous and total RSS (itself and its children), sampled, and for an
    fwllm merge the same peaks during the solve alone (until the staged plan is marked DONE)."""
    import psutil

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, kind, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak = {"anon": 0.0, "rss": 0.0, "solve_anon": 0.0, "solve_rss": 0.0}
    watched, solving = psutil.Process(proc.pid), kind == "fwllm"
    while proc.poll() is None:
        try:
            pids = [proc.pid] + [c.pid for c in watched.children(recursive=True)]
        except psutil.Error:
            pids = [proc.pid]
        anon, rss = _rss_gib(pids)
        peak["anon"], peak["rss"] = max(peak["anon"], anon), max(peak["rss"], rss)
        if solving:
            solving = not _solved(args["out"])
            peak["solve_anon"], peak["solve_rss"] = max(peak["solve_anon"], anon), max(peak["solve_rss"], rss)
        time.sleep(0.05)
    out, err = proc.communicate()
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{kind} run failed:\n{err[-3000:]}")
    result = dict(json.loads(line[len("RESULT "):]), peak_anon_gib=peak["anon"], sampled_rss_gib=peak["rss"])
    if kind == "fwllm":
        result.update(solve_anon_gib=peak["solve_anon"], solve_rss_gib=peak["solve_rss"])
    return result


def repeated(kind: str, args: dict, repeats: int, out: str = None) -> dict:
    """The median of each figure over `repeats` runs of the child (these machines are noisy); `out` is
    cleared before and after each run. The per-run figures stay under "runs"."""
    import statistics

    runs = []
    for _ in range(repeats):
        if out:
            shutil.rmtree(out, ignore_errors=True)
        run = run_child(kind, args)
        its = [s for s in run.get("iteration_s") or [] if s]
        if its:
            run["per_iteration_s"] = sum(its) / len(its)
        runs.append(run)
        if out:
            shutil.rmtree(out, ignore_errors=True)
    merged = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = statistics.median(r[key] for r in runs)
    merged["repeats"], merged["runs"] = repeats, runs
    return merged


def calibration(folder: str, rows: int = 4, tokens: int = 64) -> str:
    """`rows` causal rows of `tokens` words (prompt and response halves) from the shared code prompts: the first
    prompts that long, else (the paper's 512-token rows are longer than most prompts) consecutive prompts joined."""
    from fwllm.core.paths import data_root

    os.makedirs(folder, exist_ok=True)
    src = os.path.join(data_root(), "calibration", "code.jsonl")
    with open(src, encoding="utf-8") as fp:
        texts = [(r.get("prompt", "") + " " + r.get("response", "")).split() for r in map(json.loads, fp)]
    long_enough = [w for w in texts if len(w) >= tokens]
    if len(long_enough) < rows:
        joined = [w for t in texts for w in t]
        long_enough = [joined[i: i + tokens] for i in range(0, len(joined) - tokens + 1, tokens)]
    if len(long_enough) < rows:
        raise SystemExit(f"{src} holds too few words for {rows} rows of {tokens}")
    out = [{"prompt": " ".join(w[: tokens // 2]), "response": " ".join(w[tokens // 2: tokens])}
           for w in long_enough[:rows]]
    path = os.path.join(folder, "code.jsonl")
    with open(path, "w", encoding="utf-8") as fp:
        fp.writelines(json.dumps(r) + "\n" for r in out)
    return folder


def write_recipe(path: str, method: str, base: str, models: list, params: dict) -> str:
    import yaml

    recipe = {"merge_method": method, "base_model": base, "dtype": "bfloat16", "parameters": params,
              "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}
    if method == "fw_merging":
        for m in recipe["models"]:
            del m["parameters"]
    with open(path, "w", encoding="utf-8") as fp:
        yaml.safe_dump(recipe, fp, sort_keys=False)
    return path


def model_bytes(base: str) -> int:
    return sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base) if f.endswith(".safetensors"))


def lora_runs(name: str, work: str, calib: str, iterations: int, tokenizer: str, mergekit: str,
              mergekit_cache_gib: float, repeats: int = 1, device: str = "cpu", max_length: int = 64,
              checkpoint_memory: float = 1.0) -> dict:
    base = scale_models.write_model(os.path.join(work, name, "base"), name, tokenizer)
    adapters = scale_models.paper_pool(os.path.join(work, name, "adapters"), scale_models.config_of(name))
    refs = [f"{base}+{a}" for a in adapters]
    params = {"calibration": calib, "iterations": iterations, "max_length": max_length, "batch_size": 4,
              "gradient": "layerwise", "scaling": 0.3, "device": device, "checkpoint_memory": checkpoint_memory}
    recipe = write_recipe(os.path.join(work, name, "fw.yml"), "fw_merging", base, refs, params)
    out = os.path.join(work, name, "out_fw")
    fw = repeated("fwllm", {"recipe": recipe, "out": out}, repeats, out)
    floor = repeated("floor", {"base": base, "adapters": adapters, "calibration": calib, "max_length": max_length,
                               "batch_size": 4, "device": device, "checkpoint_gib": checkpoint_memory}, repeats)
    size = model_bytes(base)
    adapters_size = sum(model_bytes(a) for a in adapters)
    row = {"model": name, "model_gib": size / GIB, "adapters_gib": adapters_size / GIB, "fw": fw, "floor": floor}
    cache_need = len(adapters) * size  # mergekit writes a merged copy of the model per adapter
    free = shutil.disk_usage(work).free
    # mergekit's LoRA cache at 1.1B and 7B is tens to hundreds of GiB and hours of writing here: computed instead
    if cache_need < min(0.5 * free, mergekit_cache_gib * GIB):
        ta = write_recipe(os.path.join(work, name, "ta.yml"), "task_arithmetic", base, refs, {"lambda": 0.3})
        cache = os.path.join(work, name, "lora_cache")
        mk_out = os.path.join(work, name, "out_ta")
        shutil.rmtree(mk_out, ignore_errors=True)
        row["mergekit_ta"] = run_child("mergekit", {"mergekit": mergekit, "recipe": ta, "out": mk_out, "cache": cache})
        shutil.rmtree(mk_out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    else:
        row["mergekit_ta"] = {"computed": True, "lora_cache_gib": cache_need / GIB, "free_disk_gib": free / GIB}
    return row


def full_pool_runs(work: str, calib: str, sizes: list, tokenizer: str, mergekit: str,
                   name: str = "tinyllama-1.1b") -> list:
    """Full-checkpoint candidates (base + a dense random delta): FW vs mergekit ties."""
    import torch
    from safetensors.torch import load_file, save_file

    base = scale_models.write_model(os.path.join(work, name, "base"), name, tokenizer)
    cands = []
    for i in range(max(sizes)):
        folder = os.path.join(work, name, "full", f"c{i}")
        if not os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
            os.makedirs(folder, exist_ok=True)
            gen = torch.Generator().manual_seed(1000 + i)
            for f in os.listdir(base):
                src = os.path.join(base, f)
                if f.endswith(".safetensors"):
                    tensors = load_file(src)
                    save_file({k: (v.float() + 0.01 * v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype)
                               for k, v in tensors.items()}, os.path.join(folder, f), metadata={"format": "pt"})
                    del tensors
                elif os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(folder, f))
        cands.append(folder)
    rows = []
    for n in sizes:
        fw_recipe = write_recipe(os.path.join(work, name, f"fw{n}.yml"), "fw_merging", base, cands[:n],
                                 {"calibration": calib, "iterations": 2, "max_length": 64, "batch_size": 4,
                                  "gradient": "layerwise"})
        ties_recipe = write_recipe(os.path.join(work, name, f"ties{n}.yml"), "ties", base, cands[:n],
                                   {"lambda": 1.0, "density": 0.2})
        out = os.path.join(work, name, "out_full")
        shutil.rmtree(out, ignore_errors=True)
        fw = run_child("fwllm", {"recipe": fw_recipe, "out": out})
        shutil.rmtree(out, ignore_errors=True)
        ties = run_child("mergekit", {"mergekit": mergekit, "recipe": ties_recipe, "out": out,
                                      "cache": os.path.join(work, "unused_cache")})
        shutil.rmtree(out, ignore_errors=True)
        rows.append({"model": name, "n": n, "fw": fw, "ties": ties})
    return rows


def render(lora: list, full: list, iterations: int, repeats: int = 1, rows: int = 4, tokens: int = 64,
           device: str = "cpu") -> str:
    where = f"{os.cpu_count()} CPU cores" + (f", solve on {_gpu_name()}" if device.startswith("cuda") else "")
    lines = [f"# FW-Merging at scale ({time.strftime('%Y-%m-%d %H:%M')}, {where})", "",
             f"FW hard, `gradient: layerwise`, T = {iterations}, {rows} calibration rows of {tokens} words; "
             "models are random bf16 "
             "weights of the real shapes. RSS = peak resident set (mapped file pages included); anon = peak "
             "anonymous RSS; *solve* = during the solve alone (until the plan is written), *run* = the whole merge "
             "including mergekit writing the output. I/O from /proc (read = from storage, page-cache hits excluded). "
             f"LoRA rows: median of {repeats} run(s) of FW and of the floor.", "",
             "## 16 LoRA adapters (8 x r8 on q,v; 8 x r16 on all projections)", "",
             "| model | model GiB | FW wall s | FW solve RSS / anon GiB | FW run RSS / anon GiB | FW GiB read / written | "
             "one FW iteration / floor | floor s | mergekit TA peak RSS GiB | mergekit TA wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in lora:
        fw, floor, mk = r["fw"], r["floor"], r["mergekit_ta"]
        per_it = fw.get("per_iteration_s", float("nan"))
        mk_rss = f"needs {mk['lora_cache_gib']:.0f} GiB of LoRA cache (free: {mk['free_disk_gib']:.0f})" \
            if mk.get("computed") else f"{mk['peak_rss_gib']:.2f}"
        mk_wall = "-" if mk.get("computed") else f"{mk['wall_s']:.0f}"
        lines.append(f"| {r['model']} | {r['model_gib']:.2f} | {fw['wall_s']:.0f} | "
                     f"{fw['solve_rss_gib']:.2f} / {fw['solve_anon_gib']:.2f} | "
                     f"{fw['peak_rss_gib']:.2f} / {fw['peak_anon_gib']:.2f} | {fw['read_gib']:.1f} / {fw['written_gib']:.1f} | "
                     f"{per_it / floor['evaluation_s']:.2f} | {floor['evaluation_s']:.0f} | {mk_rss} | {mk_wall} |")
    if len(lora) > 1:
        small, big = lora[0]["fw"], lora[-1]["fw"]
        lines += ["", f"RSS({lora[-1]['model']}) / RSS({lora[0]['model']}): solve "
                      f"{big['solve_rss_gib'] / small['solve_rss_gib']:.2f} (anon "
                      f"{big['solve_anon_gib'] / small['solve_anon_gib']:.2f}), whole run "
                      f"{big['peak_rss_gib'] / small['peak_rss_gib']:.2f} (anon "
                      f"{big['peak_anon_gib'] / small['peak_anon_gib']:.2f})"]
    if full:
        lines += ["", f"## Full-checkpoint pool at {full[0].get('model', 'tinyllama-1.1b')} (FW vs mergekit ties)", "",
                  "| N | FW solve RSS GiB | FW peak RSS GiB | FW RSS / N=min | ties peak RSS GiB | FW / ties RSS | FW anon GiB | ties anon GiB | "
                  "FW wall s | ties wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
        first = full[0]["fw"]["peak_rss_gib"]
        for r in full:
            fw, ties = r["fw"], r["ties"]
            lines.append(f"| {r['n']} | {fw['solve_rss_gib']:.2f} | {fw['peak_rss_gib']:.2f} | "
                         f"{fw['peak_rss_gib'] / first:.2f} | "
                         f"{ties['peak_rss_gib']:.2f} | {fw['peak_rss_gib'] / ties['peak_rss_gib']:.2f} | "
                         f"{fw['peak_anon_gib']:.2f} | {ties['peak_anon_gib']:.2f} | {fw['wall_s']:.0f} | "
                         f"{ties['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda (not available)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smol-135m", "tinyllama-1.1b", "llama2-7b"],
                    choices=sorted(scale_models.SHAPES))
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs per LoRA measurement; the table shows medians")
    ap.add_argument("--full-pool", nargs="+", type=int, default=[2, 4, 8],
                    help="pool sizes N of the full-checkpoint comparison with mergekit ties (0: skip it)")
    ap.add_argument("--full-pool-model", default="tinyllama-1.1b", choices=sorted(scale_models.SHAPES))
    ap.add_argument("--mergekit-cache-gib", type=float, default=8.0,
                    help="run mergekit on a LoRA pool only when its lora_merge_cache needs less (else: computed)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the LoRA runs' solve device")
    ap.add_argument("--rows", type=int, default=4, help="calibration rows of the LoRA runs")
    ap.add_argument("--tokens", type=int, default=64, help="words per calibration row (and max_length)")
    ap.add_argument("--checkpoint-memory", type=float, default=1.0, help="FW's checkpoint_memory (GiB)")
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "fwllm", "bench_scale"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "reports"))
    args = ap.parse_args(argv)
    from fwllm.core.paths import data_root

    tokenizer = scale_models.write_tokenizer(os.path.join(args.work, "tokenizer"),
                                             os.path.join(data_root(), "calibration", "code.jsonl"))
    mergekit = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    calib = calibration(os.path.join(args.work, "calib"))  # the full-pool runs keep the small rows
    lora_calib = calib if (args.rows, args.tokens) == (4, 64) else \
        calibration(os.path.join(args.work, f"calib_{args.rows}x{args.tokens}"), args.rows, args.tokens)
    lora = []
    for name in args.models:
        print(f"== {name}: 16 LoRA adapters", flush=True)
        lora.append(lora_runs(name, args.work, lora_calib, args.iterations, tokenizer, mergekit,
                              args.mergekit_cache_gib, args.repeats, args.device, args.tokens,
                              args.checkpoint_memory))
        print(json.dumps(lora[-1]), flush=True)  # a later failure keeps what is measured
    sizes = [n for n in args.full_pool if n > 0]
    full = full_pool_runs(args.work, calib, sizes, tokenizer, mergekit, args.full_pool_model) if sizes else []
    table = render(lora, full, args.iterations, args.repeats, args.rows, args.tokens, args.device)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_scale.md"), "w", encoding="utf-8") as fp:
        fp.write(table)
    with open(os.path.join(args.out, "bench_scale.json"), "w", encoding="utf-8") as fp:
        json.dump({"lora": lora, "full": full, "iterations": args.iterations, "rows": args.rows,
                   "tokens": args.tokens, "device": args.device}, fp, indent=1)
    print(table)


if __name__ == "__main__":
    main()
