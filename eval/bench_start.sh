#!/usr/bin/env bash
# How long `fwllm` takes to print its help, or its one `Error:` line about a bad recipe or calibration file
# (issue 26: within 2 s). From the repository root:
#
#   bash eval/bench_start.sh [OUT.md]
#
# Runs hyperfine (--warmup 2 --runs 10) on `python -m fwllm.cli ...` with this checkout first on
# PYTHONPATH and HF_HUB_OFFLINE=1; the inputs are small files written to $WORK (default /tmp/faststart).
# Every error case exits 1, so hyperfine runs with -i. PYTHON picks the interpreter (default: python3).
# The table (medians of the 10 runs) goes to OUT.md (default: $WORK/bench_start.md), hyperfine's JSON
# beside it (OUT.md.json), and the table to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PYTHON="${PYTHON:-python3}"
WORK="${WORK:-/tmp/faststart}"
OUT="${1:-$WORK/bench_start.md}"
mkdir -p "$WORK"

# a recipe whose YAML is broken (an unclosed list)
printf 'merge_method: fw_merging\nbase_model: [unclosed\n' >"$WORK/broken.yml"
# a recipe whose calibration file has a broken JSON row (line 2); its models are Hub ids, never looked up:
# the calibration is checked before the Hub is asked
printf '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n' >"$WORK/calib.jsonl"
cat >"$WORK/badcalib.yml" <<EOF
merge_method: fw_merging
base_model: base
models: [{model: a}, {model: b}]
parameters: {calibration: calib.jsonl}
EOF
# a valid recipe and calibration file, but its model folders do not exist
printf '{"prompt": "a", "response": "b"}\n' >"$WORK/good.jsonl"
cat >"$WORK/recipe.yml" <<EOF
merge_method: fw_merging
base_model: $WORK/nowhere/base
models: [{model: $WORK/nowhere/a}, {model: $WORK/nowhere/b}]
parameters: {calibration: good.jsonl}
EOF
# a misspelt parameter (fw_merging has no max_iter); its model folders exist (empty: never read)
mkdir -p "$WORK/models/base" "$WORK/models/a"
cat >"$WORK/typo.yml" <<EOF
merge_method: fw_merging
base_model: models/base
models: [{model: models/a}]
parameters: {calibration: good.jsonl, max_iter: 10}
EOF
rm -f "$WORK/missing.yml"

FWLLM="env PYTHONPATH=$ROOT HF_HUB_OFFLINE=1 $PYTHON -m fwllm.cli"
cd "$WORK"
# what each error case prints (its one `Error:` line), so the timings are of the intended failure
for args in missing.yml broken.yml badcalib.yml recipe.yml typo.yml; do
    args="$args $WORK/out"
    echo "fwllm merge $args: $($FWLLM merge $args 2>&1 | tail -n 1)"
done
hyperfine --warmup 2 --runs 10 -i --export-json "$OUT.json" \
    -n "fwllm --help" "$FWLLM --help" \
    -n "fwllm merge --help" "$FWLLM merge --help" \
    -n "merge: recipe not found" "$FWLLM merge missing.yml $WORK/o1" \
    -n "merge: YAML syntax error" "$FWLLM merge broken.yml $WORK/o2" \
    -n "merge: broken calibration row" "$FWLLM merge badcalib.yml $WORK/o4" \
    -n "merge: model folder not found" "$FWLLM merge recipe.yml $WORK/o3" \
    -n "merge: unknown parameter" "$FWLLM merge typo.yml $WORK/o5" \
    -n "fwllm eval --help" "$FWLLM eval --help" \
    -n "fwllm demo --help" "$FWLLM demo --help"
# hyperfine's markdown has no median: the table is written from its JSON
"$PYTHON" - "$OUT.json" "$OUT" <<'PY'
import json, sys

runs = json.load(open(sys.argv[1]))["results"]
rows = ["| command | median [s] | mean ± σ [s] | min [s] | max [s] |", "|---|---:|---:|---:|---:|"]
for r in runs:
    cells = [r["command"], f"{r['median']:.3f}", f"{r['mean']:.3f} ± {r['stddev']:.3f}"]
    rows.append("| " + " | ".join(cells + [f"{r['min']:.3f}", f"{r['max']:.3f}"]) + " |")
open(sys.argv[2], "w").write("\n".join(rows) + "\n")
PY
cat "$OUT"
