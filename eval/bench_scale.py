"""fwllm at real model sizes: SmolLM2-135M, TinyLlama-1.1B and LLaMA-2-7B shapes.

Each model is random bf16 weights of the real shapes, sharded like a Hub download
(`eval/scale_models.py`; `--models tiny` is a two-layer toy for checking the script itself); the
LoRA pool is 16 adapters (8 of r=8 on q_proj, v_proj and 8 of r=16 on all seven projections) with
random factors, adapter i on calibration task i mod K (`--tasks K`, synthetic tasks cut from the
shared code prompts). Rows (`--methods`, `eval/bench_scale_rows.py`), each with `gradient: layerwise`:

  fw-open-loop  FW-Merging with the paper's settings pinned (open-loop step 0.1, tensor granularity, task
                arithmetic steps and init, scaling 0.3, fixed hull); its merge is also written as a peft
                adapter (`fwllm merge --lora-out`), whose size is reported beside the dense output;
  fw-default    FW-Merging with the recipe's defaults (only the run length, `iterations`, is given);
  regmean       RegMean, Grams streamed layer by layer and reduced as they come;
  fisher        Fisher merging, and
  adamerging    AdaMerging (`steps` = --iterations): each skipped, with a printed note, while its
                params schema has no `gradient` (its layer-by-layer path is not in this checkout);
  mergekit-ta   plain mergekit `task_arithmetic` on the pool where its LoRA merge cache fits here, else
                what it would need, computed.

Calibration: `--rows` rows of `--tokens` words over `--tasks` tasks (default 4 x 64 over 2, issue 11's
size), and with `--realistic` one more table at `--realistic-model` (1.1B) with 4 tasks x 8 rows x 256
tokens. Every run is its own child process (`eval/bench_scale_child.py`) with its own $FWLLM_CACHE; the
child reports its peak RSS (VmHWM, mapped file pages included) and /proc/self/io, the parent samples its
anonymous RSS and the disk its plan and statistics take. Each timed row stands beside its floor, the
least the same work costs with the method taken out (see the child's docstring):
  FW iteration  vs one layer-by-layer forward + backward of all rows over the pool (`StreamedGradient`);
  RegMean solve vs RegMean's own streamer with the Gram hooks, reduction and solve removed: one
                layer-by-layer forward per candidate over its own rows;
  Fisher solve  vs one layer-by-layer forward + backward per candidate over its own rows (activation
                gradients only: a lower bound of any Fisher pass).

    python eval/bench_scale.py [--models smol-135m tinyllama-1.1b llama2-7b] [--methods ...]
                               [--iterations 2] [--repeats 1] [--device cpu|cuda] [--rows 4] [--tokens 64]
                               [--tasks 2] [--realistic] [--full-pool 2 4 8 | 0] [--work DIR] [--out DIR]

Writes eval/reports/bench_scale.md and .json. Not run in CI.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_scale_rows as rows_mod  # noqa: E402
import scale_models  # noqa: E402
from bench_scale_rows import GIB, ROWS, du_bytes  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "bench_scale_child.py")
REPO = os.path.dirname(HERE)


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
    return bool(
        glob.glob(os.path.join(parent, f".{name}.partial-*", "fwllm_plan", "DONE"))
    ) or os.path.isfile(os.path.join(out, "fwllm_plan", "DONE"))


def _plan_dirs(out: str) -> list:
    """The plan folder of a merge into `out`, staged or finished."""
    parent, name = os.path.split(out)
    return glob.glob(os.path.join(parent, f".{name}.partial-*", "fwllm_plan")) + glob.glob(
        os.path.join(out, "fwllm_plan")
    )


class ChildFailed(RuntimeError):
    """A measured run ended in an error: its `Error:` line (fwllm's refusals: too little disk, ...)."""


def run_child(kind: str, args: dict, cache: str = None) -> dict:
    """The child's figures, its peak anonymous and total RSS (itself and its children), sampled, and for an
    fwllm merge the same peaks during the solve alone (until the staged plan is marked DONE), and the disk
    its plan and statistics take (sampled each second, and after the run). `cache`: the run's FWLLM_CACHE."""
    import psutil

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # this checkout's fwllm, as the benchmark's own
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
        env["FWLLM_CACHE"] = cache
    stats = os.path.join(cache, "stats") if cache else None
    proc = subprocess.Popen(
        [sys.executable, CHILD, kind, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    peak = {"anon": 0.0, "rss": 0.0, "solve_anon": 0.0, "solve_rss": 0.0, "disk": 0}
    watched, solving, next_du = psutil.Process(proc.pid), kind == "fwllm", 0.0
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
        if kind == "fwllm" and time.time() >= next_du:
            peak["disk"] = max(peak["disk"], du_bytes(*_plan_dirs(args["out"]), *([stats] if stats else [])))
            next_du = time.time() + 1.0
        time.sleep(0.05)
    out, err = proc.communicate()
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        said = [ln for ln in err.splitlines() if "FwllmError" in ln or ln.startswith("Error:")]
        if said:  # a refusal is a result of the row, not a crash of the benchmark
            raise ChildFailed(said[-1].split("FwllmError: ", 1)[-1])
        raise SystemExit(f"{kind} run failed:\n{err[-3000:]}")
    result = dict(json.loads(line[len("RESULT ") :]), peak_anon_gib=peak["anon"], sampled_rss_gib=peak["rss"])
    if kind == "fwllm":
        plan = du_bytes(*_plan_dirs(args["out"])) / GIB
        stat = du_bytes(stats) / GIB if stats else 0.0
        result.update(
            solve_anon_gib=peak["solve_anon"],
            solve_rss_gib=peak["solve_rss"],
            plan_disk_gib=plan,
            stats_disk_gib=stat,
            peak_disk_gib=max(peak["disk"] / GIB, plan + stat),
            dense_gib=model_bytes(args["out"]) / GIB,
        )
        if args.get("lora_out"):
            result["lora_gib"] = du_bytes(args["lora_out"]) / GIB
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
    return result


def repeated(kind: str, args: dict, repeats: int, out: str = None, cache: str = None) -> dict:
    """The median of each figure over `repeats` runs of the child (these machines are noisy); `out` (and a
    LoRA output) is cleared before and after each run. The per-run figures stay under "runs"."""
    runs = []
    scratch = [p for p in (out, args.get("lora_out")) if p]
    for _ in range(repeats):
        for p in scratch:
            shutil.rmtree(p, ignore_errors=True)
        run = run_child(kind, args, cache)
        its = [s for s in run.get("iteration_s") or [] if s]
        if its:
            run["per_iteration_s"] = sum(its) / len(its)
        runs.append(run)
        for p in scratch:
            shutil.rmtree(p, ignore_errors=True)
    merged = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = statistics.median(r[key] for r in runs)
    merged["repeats"], merged["runs"] = repeats, runs
    return merged


def calibration(folder: str, rows: int = 4, tokens: int = 64, tasks: int = 1) -> str:
    """`rows` causal rows of `tokens` words (prompt and response halves) from the shared calibration prompts
    (code first, then news and PubMedQA), dealt into `tasks` tasks of rows // tasks rows (one .jsonl each;
    one task: code.jsonl): the first prompts that long, else (the paper's 512-token rows are longer than
    most prompts) consecutive prompts joined. Every row is distinct, so each task is its own data."""
    from fwllm.core.paths import data_root

    if tasks < 1 or rows < tasks:
        raise SystemExit(f"--rows {rows} cannot fill --tasks {tasks} tasks")
    os.makedirs(folder, exist_ok=True)
    texts = []
    for name in ("code", "cnn", "pubmedqa"):
        src = os.path.join(data_root(), "calibration", f"{name}.jsonl")
        with open(src, encoding="utf-8") as fp:
            texts += [
                (r.get("prompt", "") + " " + r.get("response", "")).split() for r in map(json.loads, fp)
            ]
    long_enough = [w for w in texts if len(w) >= tokens]
    if len(long_enough) < rows:
        joined = [w for t in texts for w in t]
        long_enough = [joined[i : i + tokens] for i in range(0, len(joined) - tokens + 1, tokens)]
    if len(long_enough) < rows:
        raise SystemExit(f"the shared calibration prompts hold too few words for {rows} rows of {tokens}")
    out = [
        {"prompt": " ".join(w[: tokens // 2]), "response": " ".join(w[tokens // 2 : tokens])}
        for w in long_enough[:rows]
    ]
    per = rows // tasks
    for k in range(tasks):
        name = "code" if tasks == 1 else f"task{k}"
        with open(os.path.join(folder, f"{name}.jsonl"), "w", encoding="utf-8") as fp:
            fp.writelines(json.dumps(r) + "\n" for r in out[k * per : (k + 1) * per])
    return folder


def task_names(calib: str) -> list:
    return sorted(os.path.splitext(f)[0] for f in os.listdir(calib) if f.endswith(".jsonl"))


def write_recipe(path: str, method: str, base: str, models: list, params: dict, tasks: list = None) -> str:
    """A recipe over `models`; `tasks`: each model's calibration task (weight 1 each, except FW, given
    none here, and AdaMerging, which takes none)."""
    import yaml

    entries = []
    for i, m in enumerate(models):
        per = {} if method in ("fw_merging", "adamerging") else {"weight": 1.0}
        if tasks:
            per["task"] = tasks[i]
        entries.append({"model": m, "parameters": per} if per else {"model": m})
    recipe = {
        "merge_method": method,
        "base_model": base,
        "dtype": "bfloat16",
        "parameters": params,
        "models": entries,
    }
    with open(path, "w", encoding="utf-8") as fp:
        yaml.safe_dump(recipe, fp, sort_keys=False)
    return path


def model_bytes(folder: str) -> int:
    if not os.path.isdir(folder):
        return 0
    return sum(
        os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")
    )


def mergekit_ta(
    name: str, work: str, base: str, refs: list, size: int, mergekit: str, cache_gib: float
) -> dict:
    """mergekit task_arithmetic on the pool where its LoRA merge cache fits here, else what it needs."""
    cache_need = len(refs) * size  # mergekit writes a merged copy of the model per adapter
    free = shutil.disk_usage(work).free
    # mergekit's LoRA cache at 1.1B and 7B is tens to hundreds of GiB (and an hour of writing at 1.1B):
    # run only under --mergekit-cache-gib and where it fits on this disk beside the dense output, with
    # as much again to spare; else computed
    if cache_need > cache_gib * GIB or cache_need + 2 * size > free:
        return {"computed": True, "lora_cache_gib": cache_need / GIB, "free_disk_gib": free / GIB}
    ta = write_recipe(os.path.join(work, name, "ta.yml"), "task_arithmetic", base, refs, {"lambda": 0.3})
    cache, out = os.path.join(work, name, "lora_cache"), os.path.join(work, name, "out_ta")
    shutil.rmtree(out, ignore_errors=True)
    result = run_child("mergekit", {"mergekit": mergekit, "recipe": ta, "out": out, "cache": cache})
    result.update(cache_disk_gib=du_bytes(cache) / GIB, dense_gib=model_bytes(out) / GIB)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return result


def model_entry(
    name: str, work: str, calib: str, opts, tokenizer: str, mergekit: str, max_length: int, label: str = None
) -> dict:
    """One model's table: every row `opts.methods` names (skipped with a note where its layerwise path is
    missing), the floors they need, and mergekit. `label`: a second table of the same model."""
    base = scale_models.write_model(os.path.join(work, name, "base"), name, tokenizer)
    adapters = scale_models.paper_pool(os.path.join(work, name, "adapters"), scale_models.config_of(name))
    names = task_names(calib)
    tasks = [names[i % len(names)] for i in range(len(adapters))]
    refs = [f"{base}+{a}" for a in adapters]
    size = model_bytes(base)
    folder = os.path.join(work, name, label.split()[0] if label else "default")
    os.makedirs(folder, exist_ok=True)
    shared = {
        "calibration": calib,
        "iterations": opts.iterations,
        "max_length": max_length,
        "batch_size": 4,
        "gradient": "layerwise",
        "device": opts.device,
        "checkpoint_memory": opts.checkpoint_memory,
    }
    floor_args = {
        "base": base,
        "adapters": adapters,
        "calibration": calib,
        "max_length": max_length,
        "batch_size": 4,
        "device": opts.device,
        "checkpoint_gib": opts.checkpoint_memory,
        "tasks": tasks,
    }
    entry = {
        "model": name + (f" ({label})" if label else ""),
        "model_gib": size / GIB,
        "adapters_gib": sum(model_bytes(a) for a in adapters) / GIB,
        "rows": {},
        "floors": {},
        "calibration": f"{len(names)} tasks x {_rows_in(calib) // len(names)} rows x {max_length} tokens",
    }
    for row in ROWS:
        if row.key not in opts.methods:
            continue
        missing = rows_mod.layerwise_missing(row.method)
        if missing:
            print(f"   note: {missing}", flush=True)
            entry["rows"][row.key] = {"label": row.label, "skipped": missing}
            continue
        if opts.floors_only:
            _floors(row, entry, floor_args, opts)
            continue
        print(f"   {row.label}", flush=True)
        params = rows_mod.recipe_params(row, shared, opts.iterations)
        recipe = write_recipe(os.path.join(folder, f"{row.key}.yml"), row.method, base, refs, params, tasks)
        out = os.path.join(folder, f"out_{row.key}")
        args = {"recipe": recipe, "out": out}
        if row.lora_out:
            args["lora_out"] = os.path.join(folder, f"lora_{row.key}")
        try:
            r = repeated("fwllm", args, opts.repeats, out, cache=os.path.join(folder, f"cache_{row.key}"))
        except ChildFailed as refused:
            print(f"   refused: {refused}", flush=True)
            entry["rows"][row.key] = {"label": row.label, "skipped": f"refused: {refused}"}
            continue
        _floors(row, entry, floor_args, opts)
        floor = entry["floors"].get(row.floor)
        timed = r.get("per_iteration_s") if row.per_iteration else r.get("solve_s")
        r.update(
            label=row.label,
            floor=row.floor,
            per_iteration=row.per_iteration,
            vs_floor=timed / floor["evaluation_s"] if floor and timed else None,
        )
        if row.apart and floor and timed and r.get(row.apart) is not None:
            r["apart_s"] = r[row.apart]
            r["pass_vs_floor"] = (timed - r[row.apart]) / floor["evaluation_s"]
        if r.get("lora_gib") is not None and r.get("dense_gib"):
            r["lora_ratio"] = r["lora_gib"] / r["dense_gib"]
        r["targets"] = rows_mod.targets(name, row, r, size / GIB)
        entry["rows"][row.key] = r
        print(json.dumps({k: v for k, v in r.items() if k != "runs"}), flush=True)
    if "mergekit-ta" in opts.methods:
        entry["mergekit_ta"] = mergekit_ta(name, work, base, refs, size, mergekit, opts.mergekit_cache_gib)
    return entry


def _floors(row, entry: dict, floor_args: dict, opts) -> None:
    """Measures the floors `row` is read against (once per model: rows share them) into entry["floors"]."""
    also = [] if opts.own_floors_only else rows_mod.ALSO_FLOORS.get(row.floor, [])
    for kind in [row.floor, *also] if row.floor and not opts.no_floors else []:
        if kind not in entry["floors"]:
            print(f"   floor: {kind}", flush=True)
            entry["floors"][kind] = repeated(kind, floor_args, opts.repeats)


def _rows_in(calib: str) -> int:
    return sum(
        sum(1 for _ in open(os.path.join(calib, f), encoding="utf-8"))
        for f in os.listdir(calib)
        if f.endswith(".jsonl")
    )


def full_pool_runs(
    work: str, calib: str, sizes: list, tokenizer: str, mergekit: str, name: str = "tinyllama-1.1b"
) -> list:
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
                    save_file(
                        {
                            k: (v.float() + 0.01 * v.float().std() * torch.randn(v.shape, generator=gen)).to(
                                v.dtype
                            )
                            for k, v in tensors.items()
                        },
                        os.path.join(folder, f),
                        metadata={"format": "pt"},
                    )
                    del tensors
                elif os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(folder, f))
        cands.append(folder)
    rows = []
    for n in sizes:
        fw_recipe = write_recipe(
            os.path.join(work, name, f"fw{n}.yml"),
            "fw_merging",
            base,
            cands[:n],
            {
                "calibration": calib,
                "iterations": 2,
                "max_length": 64,
                "batch_size": 4,
                "gradient": "layerwise",
                **rows_mod.fw_paper_params(),
            },
        )
        ties_recipe = write_recipe(
            os.path.join(work, name, f"ties{n}.yml"), "ties", base, cands[:n], {"lambda": 1.0, "density": 0.2}
        )
        out = os.path.join(work, name, "out_full")
        shutil.rmtree(out, ignore_errors=True)
        fw = run_child("fwllm", {"recipe": fw_recipe, "out": out})
        shutil.rmtree(out, ignore_errors=True)
        ties = run_child(
            "mergekit",
            {
                "mergekit": mergekit,
                "recipe": ties_recipe,
                "out": out,
                "cache": os.path.join(work, "unused_cache"),
            },
        )
        shutil.rmtree(out, ignore_errors=True)
        rows.append({"model": name, "n": n, "fw": fw, "ties": ties})
    return rows


def render_full(full: list) -> list:
    """The full-checkpoint pool's table (FW vs mergekit ties)."""
    lines = []
    if full:
        lines += [
            "",
            f"## Full-checkpoint pool at {full[0].get('model', 'tinyllama-1.1b')} (FW vs mergekit ties)",
            "",
            "| N | FW solve RSS GiB | FW peak RSS GiB | FW RSS / N=min | ties peak RSS GiB | FW / ties RSS | FW anon GiB | ties anon GiB | "
            "FW wall s | ties wall s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        first = full[0]["fw"]["peak_rss_gib"]
        for r in full:
            fw, ties = r["fw"], r["ties"]
            lines.append(
                f"| {r['n']} | {fw['solve_rss_gib']:.2f} | {fw['peak_rss_gib']:.2f} | "
                f"{fw['peak_rss_gib'] / first:.2f} | "
                f"{ties['peak_rss_gib']:.2f} | {fw['peak_rss_gib'] / ties['peak_rss_gib']:.2f} | "
                f"{fw['peak_anon_gib']:.2f} | {ties['peak_anon_gib']:.2f} | {fw['wall_s']:.0f} | "
                f"{ties['wall_s']:.0f} |"
            )
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models",
        nargs="+",
        default=["smol-135m", "tinyllama-1.1b", "llama2-7b"],
        choices=sorted(scale_models.SHAPES),
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        default=rows_mod.METHOD_KEYS,
        choices=rows_mod.METHOD_KEYS,
        help="rows of each model's table (floors follow the rows that need them)",
    )
    ap.add_argument("--iterations", type=int, default=2, help="FW iterations, AdaMerging steps")
    ap.add_argument("--repeats", type=int, default=1, help="runs per measurement; the tables show medians")
    ap.add_argument(
        "--full-pool",
        nargs="+",
        type=int,
        default=[2, 4, 8],
        help="pool sizes N of the full-checkpoint comparison with mergekit ties (0: skip it)",
    )
    ap.add_argument("--full-pool-model", default="tinyllama-1.1b", choices=sorted(scale_models.SHAPES))
    ap.add_argument(
        "--mergekit-cache-gib",
        type=float,
        default=8.0,
        help="run mergekit on a LoRA pool only when its lora_merge_cache needs less (else: computed)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the LoRA runs' solve device")
    ap.add_argument("--rows", type=int, default=4, help="calibration rows of the LoRA runs, over all tasks")
    ap.add_argument("--tokens", type=int, default=64, help="words per calibration row (and max_length)")
    ap.add_argument("--tasks", type=int, default=2, help="calibration tasks the 16 adapters are dealt over")
    ap.add_argument(
        "--realistic",
        action="store_true",
        help="one more table at --realistic-model with 4 tasks x 8 rows x 256 tokens",
    )
    ap.add_argument("--realistic-model", default="tinyllama-1.1b", choices=sorted(scale_models.SHAPES))
    ap.add_argument("--checkpoint-memory", type=float, default=1.0, help="FW's checkpoint_memory (GiB)")
    ap.add_argument(
        "--no-floors",
        action="store_true",
        help="run no floor (a rerun whose floors an earlier run of the same command measured)",
    )
    ap.add_argument(
        "--floors-only",
        action="store_true",
        help="measure the rows' floors, not the merges (a rerun whose merges an earlier run measured)",
    )
    ap.add_argument(
        "--own-floors-only",
        action="store_true",
        help="skip the floors shown beside a row's own (Fisher's plain floor): at 7B each is many minutes",
    )
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "fwllm", "bench_scale"))
    ap.add_argument("--out", default=os.path.join(HERE, "reports"))
    args = ap.parse_args(argv)
    from fwllm.core.paths import data_root

    command = "python eval/bench_scale.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    tokenizer = scale_models.write_tokenizer(
        os.path.join(args.work, "tokenizer"), os.path.join(data_root(), "calibration", "code.jsonl")
    )
    mergekit = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    lora_calib = calibration(
        os.path.join(args.work, f"calib_{args.tasks}x{args.rows}x{args.tokens}"),
        args.rows,
        args.tokens,
        args.tasks,
    )
    entries = []
    runs = [(name, lora_calib, args.tokens, None) for name in args.models]
    if args.realistic:
        real = calibration(os.path.join(args.work, "calib_4x32x256"), 32, 256, 4)
        runs.append((args.realistic_model, real, 256, "realistic calibration"))
    for name, calib, max_length, label in runs:
        print(f"== {name}{f' ({label})' if label else ''}: 16 LoRA adapters", flush=True)
        entries.append(model_entry(name, args.work, calib, args, tokenizer, mergekit, max_length, label))
    sizes = [n for n in args.full_pool if n > 0]
    full = []
    if sizes:
        calib = calibration(os.path.join(args.work, "calib"))  # issue 11's single task of 4 x 64
        full = full_pool_runs(args.work, calib, sizes, tokenizer, mergekit, args.full_pool_model)
    table = rows_mod.render(entries, command, args.device, render_full(full))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_scale.md"), "w", encoding="utf-8") as fp:
        fp.write(table)
    with open(os.path.join(args.out, "bench_scale.json"), "w", encoding="utf-8") as fp:
        json.dump(
            {
                "models": entries,
                "full": full,
                "command": command,
                "iterations": args.iterations,
                "rows": args.rows,
                "tokens": args.tokens,
                "tasks": args.tasks,
                "device": args.device,
            },
            fp,
            indent=1,
        )
    print(table)


if __name__ == "__main__":
    main()
