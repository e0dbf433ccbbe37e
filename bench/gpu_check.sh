#!/usr/bin/env bash
# One-shot GPU check for the kernels (target: under 8 minutes on one H100/H200).
#   1. the kernel tests on CUDA (compiled Triton; the CPU-interpreter cases skip themselves)
#   2. bench_policy_loss.py on the issue's shapes (bf16, V = 248,320)
#   3. bench_advantages.py
#   4. bench_weight_sync.py (SGLang pushes when sglang is installed, else gather-and-bucket on the GPU)
# then prints a short summary. Output files go to ${OUT:-bench/gpu_check_out}. Step time limits
# (150 + 225 + 45 + 45 s) keep the whole run under 8 minutes; a cut-off bench keeps the rows it wrote.
# Usage: bash bench/gpu_check.sh            (PYTHON=... to pick the interpreter)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUTDIR=${OUT:-bench/gpu_check_out}
mkdir -p "$OUTDIR"
rm -f "$OUTDIR/policy_loss.jsonl"  # --json appends
unset TRITON_INTERPRET  # compiled kernels on the GPU
start=$(date +%s)
status=()

"$PY" - <<'PY' || { echo "no CUDA device visible: nothing to check"; exit 1; }
import torch, sys
assert torch.cuda.is_available()
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; torch {torch.__version__}")
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton import failed:", e); sys.exit(1)
try:
    import liger_kernel  # noqa: F401
    print("liger-kernel present")
except ImportError:
    print("liger-kernel not installed: the Liger baseline will be skipped")
PY

echo "== 1/4 tests (CUDA) =="
timeout 150 "$PY" -m pytest -q -p no:cacheprovider --maxfail=25 tests/test_kernels_policy_loss.py tests/test_kernels_advantages.py \
    tests/test_kernels_linear.py -k "cuda or bad_inputs" 2>&1 | tee "$OUTDIR/tests.txt" | tail -15
status+=("tests: rc=${PIPESTATUS[0]}")

echo "== 2/4 bench_policy_loss (bf16, V=248320) =="
timeout 225 "$PY" bench/bench_policy_loss.py --device cuda --reps 3 --warmup 1 --compile-max-n 4096 \
    --json "$OUTDIR/policy_loss.jsonl" 2>&1 | tee "$OUTDIR/bench_policy_loss.md"
status+=("bench_policy_loss: rc=${PIPESTATUS[0]}")

echo "== 3/4 bench_advantages =="
timeout 45 "$PY" bench/bench_advantages.py --device cuda 2>&1 | tee "$OUTDIR/bench_advantages.md"
status+=("bench_advantages: rc=${PIPESTATUS[0]}")

echo "== 4/4 bench_weight_sync =="
timeout 45 "$PY" bench/bench_weight_sync.py 2>&1 | tee "$OUTDIR/bench_weight_sync.md"
status+=("bench_weight_sync: rc=${PIPESTATUS[0]}")

echo "== summary ($(( $(date +%s) - start )) s) =="
printf '%s\n' "${status[@]}"
grep -E "passed|failed|error" "$OUTDIR/tests.txt" | tail -1
echo "ours vs floor / Liger / eager (targets: <= 1.25x floor, >= 2x faster than Liger):"
"$PY" - "$OUTDIR/policy_loss.jsonl" <<'PY'
import json, sys, collections
rows = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[(r["N"], r["H"], r["V"])][r["variant"]] = r
print(f"{'N':>6} {'H':>5} {'ours ms':>9} {'x floor':>8} {'liger/ours':>10} {'eager/ours':>10} {'ours MB':>8} {'eager MB':>9}")
for (n, h, v), d in sorted(rows.items()):
    o = d.get("ours", {})
    if "ms" not in o:
        print(f"{n:>6} {h:>5}  ours failed: {o.get('error')}"); continue
    f = d.get("floor", {}).get("ms"); l = d.get("liger", {}).get("ms"); e = d.get("eager", {})
    fmt = lambda x: f"{x:.2f}" if x else "-"
    print(f"{n:>6} {h:>5} {o['ms']:>9.1f} {fmt(o['ms'] / f if f else None):>8} {fmt(l / o['ms'] if l else None):>10} "
          f"{fmt(e['ms'] / o['ms'] if 'ms' in e else None):>10} {o['peak_mb']:>8.0f} {e.get('peak_mb', e.get('error', '-'))!s:>9}")
PY
