"""Peak RSS vs pool size N for the data-informed family: Fisher, RegMean, AdaMerging,
beside FW-Merging and mergekit's `ties` in the same run.

Fisher and RegMean hold one candidate model at a time while solving and stream their
per-model statistics while merging, so their peak should stay flat in N; layer-wise
AdaMerging keeps every task vector in memory, so its peak grows linearly, by design.

Candidates are a small LlamaForCausalLM base plus distinct random perturbations. Each
(method, N) is one `python -m fwllm.cli merge RECIPE OUT` child process; its own peak
RSS is its VmHWM, written at exit (not ru_maxrss, which exec inherits from the spawning process), its peak
anonymous RSS from polling /proc (what the process allocated, without mapped files: mergekit
keeps every input model's shard mapped, so file pages grow with N for any method).

    python eval/bench_memory_family.py [--n 2 4 8 16] [--methods fisher regmean adamerging]
                                       [--workdir DIR] [--json FILE]

A few minutes on 2 cores. Ratios RSS(N)/RSS(N_min) matter, not absolute megabytes.
To add a column, add the method's recipe parameters to METHODS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

# method -> (shared recipe parameters, per-model parameters); CALIB is replaced by the data path
METHODS: Dict[str, tuple] = {
    "fisher": ({"calibration": "CALIB", "max_rows": 4}, {"task": "calib", "weight": 1.0}),
    "regmean": ({"calibration": "CALIB", "max_rows": 4}, {"task": "calib", "weight": 1.0}),
    "adamerging": ({"calibration": "CALIB", "max_rows": 4, "steps": 4}, {}),
    # the references the issue asks for, in the same run: fwllm's FW and mergekit's own ties
    "fw_merging": ({"calibration": "CALIB", "preset": "paper", "max_rows": 4, "iterations": 4}, {}),
    "ties": ({"lambda": 1.0}, {"weight": 1.0, "density": 0.2}),
}
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "="] + [f"w{i}" for i in range(1019)]
# ~14M parameters (56 MB in float32): large enough that N copies dominate the baseline RSS
MODEL = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def prepare(workdir: str, n_max: int) -> dict:
    """Base, n_max perturbed candidates and one calibration task under `workdir` (reused if present)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = os.path.join(workdir, "pool")
    ready = os.path.join(root, "READY")  # holds how many candidates exist
    paths = {
        "base": os.path.join(root, "base"),
        "calib": os.path.join(root, "calib"),
        "candidates": [os.path.join(root, f"c{i}") for i in range(n_max)],
    }
    if os.path.exists(ready) and int(open(ready).read()) >= n_max:
        return paths
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), **MODEL))
    base.save_pretrained(paths["base"])
    _tokenizer().save_pretrained(paths["base"])
    for i, path in enumerate(paths["candidates"]):
        model = LlamaForCausalLM.from_pretrained(paths["base"])
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(0.02 * prm.std() * torch.randn_like(prm))
        model.save_pretrained(path)
    os.makedirs(paths["calib"], exist_ok=True)
    rng = random.Random(0)
    with open(os.path.join(paths["calib"], "calib.jsonl"), "w", encoding="utf-8") as fp:
        for _ in range(8):
            words = [f"w{rng.randrange(1019)}" for _ in range(8)]
            fp.write(json.dumps({"prompt": " ".join(words) + " =", "response": " ".join(words[:4])}) + "\n")
    with open(ready, "w") as fp:
        fp.write(str(n_max))
    return paths


def write_recipe(method: str, n: int, paths: dict, path: str) -> str:
    import yaml

    shared, per_model = METHODS[method]
    params = {k: (paths["calib"] if v == "CALIB" else v) for k, v in shared.items()}
    recipe = {
        "merge_method": method,
        "base_model": paths["base"],
        "models": [
            {"model": c, **({"parameters": dict(per_model)} if per_model else {})}
            for c in paths["candidates"][:n]
        ],
        "parameters": params,
        "dtype": "float32",
    }
    with open(path, "w", encoding="utf-8") as fp:
        yaml.safe_dump(recipe, fp, sort_keys=False)
    return path


# `python -m fwllm.cli ...` that writes its own peak RSS (VmHWM, KiB) to $BENCH_PEAK_FILE at exit. Not the
# child's ru_maxrss: exec carries the spawning process's peak over into it (subprocess spawns with vfork).
OWN_PEAK_WRAPPER = """
import atexit, os, runpy, sys
def _write_peak():
    with open("/proc/self/status") as fp:
        kib = next(ln.split()[1] for ln in fp if ln.startswith("VmHWM:"))
    with open(os.environ["BENCH_PEAK_FILE"], "w") as out:
        out.write(kib)
atexit.register(_write_peak)
sys.argv = ["fwllm"] + sys.argv[1:]
runpy.run_module("fwllm.cli", run_name="__main__")
"""


def measure(method_name: str, n: int, workdir: str, threads: int = 1) -> dict:
    """One `fwllm merge` of the first n candidates in a child process: its peak RSS and wall time."""
    paths = prepare(workdir, n)
    run_dir = os.path.join(workdir, "runs", f"{method_name}-{n}")
    os.makedirs(run_dir, exist_ok=True)
    recipe = write_recipe(method_name, n, paths, os.path.join(run_dir, "recipe.yml"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(threads),
        "FWLLM_CACHE": os.path.join(run_dir, "cache"),
    }  # no statistics reused across runs
    peak_file = os.path.join(run_dir, "peak_kib")
    env["BENCH_PEAK_FILE"] = peak_file
    cmd = [sys.executable, "-c", OWN_PEAK_WRAPPER, "merge", recipe, os.path.join(run_dir, "out"), "--force"]
    anon = 0.0
    with open(os.path.join(run_dir, "log.txt"), "w", encoding="utf-8") as log:
        start = time.time()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, _ = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            anon = max(anon, _rss_anon_mb(child.pid))
            time.sleep(0.05)
        wall = time.time() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{method_name} N={n} failed (exit {child.returncode}); see {run_dir}/log.txt")
    with open(peak_file, encoding="utf-8") as fp:
        peak_kib = int(fp.read())
    return {"peak_rss_mb": peak_kib / 1024, "peak_anon_mb": anon, "wall_s": wall}


def _rss_anon_mb(pid: int) -> float:
    """Anonymous resident memory now (Linux). Unlike ru_maxrss it leaves out mapped file pages:
    mergekit keeps each input model's current shard mmapped, and the pages it touched count
    in RSS (reclaimable, but they grow with N whatever the method)."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fp:
            for line in fp:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def table(results: Dict[str, Dict[int, dict]], ns: List[int]) -> str:
    """Peak RSS and peak anonymous RSS in MB with the ratio to the smallest N, and wall seconds."""
    methods = list(results)
    head = "| N | " + " | ".join(f"{m} RSS (x) | {m} anon (x) | {m} s" for m in methods) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(methods))]
    for n in ns:
        cells = []
        for m in methods:
            r, r0 = results[m][n], results[m][ns[0]]
            for key in ("peak_rss_mb", "peak_anon_mb"):
                cells.append(f"{r[key]:.0f} ({r[key] / max(r0[key], 1e-9):.2f})")
            cells.append(f"{r['wall_s']:.1f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument(
        "--workdir", default=None, help="keeps the synthetic pool between runs (default: a temp dir)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="OMP threads per child (1: stable on a shared box)"
    )
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument(
        "--out",
        default=os.path.join("eval", "reports", "bench_memory_family.md"),
        help="markdown report ('' = none)",
    )
    args = ap.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="fwllm-bench-family-")
    ns = sorted(args.n)
    prepare(workdir, ns[-1])
    results: Dict[str, Dict[int, dict]] = {}
    for method in args.methods:
        for n in ns:
            results.setdefault(method, {})[n] = r = measure(method, n, workdir, args.threads)
            print(
                f"{method:>11} N={n:<3} peak RSS {r['peak_rss_mb']:7.0f} MB  anon {r['peak_anon_mb']:7.0f} MB  "
                f"wall {r['wall_s']:6.1f} s",
                flush=True,
            )
    print()
    print(table(results, ns))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fp:
            fp.write(
                f"# Peak memory vs N: data-informed family beside FW and mergekit ties "
                f"({time.strftime('%Y-%m-%d %H:%M')})\n\n"
                f"`python eval/bench_memory_family.py --n {' '.join(map(str, ns))}`; model `{json.dumps(MODEL)}` "
                f"(~14M parameters, float32), {args.threads} thread(s) per child, {os.cpu_count()} cores.\n\n"
                "RSS = the child's own peak resident set, VmHWM (mapped file pages included); anon = peak RssAnon (what the "
                "process allocated). (x) = ratio to the smallest N.\n\n" + table(results, ns) + "\n"
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fp:
            json.dump({"model": MODEL, "results": results}, fp, indent=2)


if __name__ == "__main__":
    main()
