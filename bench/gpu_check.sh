#!/usr/bin/env bash
# One-shot GPU check, made for a bare GPU image with no network: zppo_fast is not installed there,
# maybe only `python3` exists, and the first Triton launch needs a C compiler and Python's headers.
#
#   preflight        python3 (>= 3.11), a C compiler + Python.h, torch / transformers / safetensors,
#                    CUDA + Triton (pytest + hypothesis reported: only the tests step needs them)
#   build            the project imported from this checkout (PYTHONPATH, the zppo_fast/kernels link),
#                    the C++ module built with CMake when this Python has none
#   tests            the CUDA kernel tests (compiled Triton; CPU-only cases deselected) and the
#                    shared-prefix layout's CUDA test (FlexAttention block mask)
#   train            two training steps of the embedded default on the GPU (transformers engine)
#   train_shared     the same with parallel.share_prefix = true (opt-in on GPUs)
#   sglang           when sglang imports, under torchrun (bench/sglang_check.py): a student and a
#                    teacher engine on one GPU (the tiny Qwen3.5 VLM: SGLang serves Qwen3.5 only
#                    in that form, so not the text-only default), a checked weight push, a
#                    release / resume cycle
#   bench_policy_loss, bench_advantages   inputs built once per shape on the GPU
# then a summary (commit, device, driver, versions, each step's result, the policy-loss ratios;
# missing rows and files are reported, never fatal) into OUT/summary.txt. Exits non-zero when any
# step failed or ran out of time. Every step has a time limit and all of them share one deadline
# (--budget, 450 s by default, its last 20 s kept for the summary), so the check ends in under 8 minutes.
usage() {
    cat <<'EOF'
Usage: bash bench/gpu_check.sh [--out DIR] [--budget SECONDS] [--no-gpu] [--help]
  --out DIR         where logs, results and summary.txt go (default: $OUT or bench/gpu_check_out)
  --budget SECONDS  deadline of the whole check (default 450: under 8 minutes with the summary)
  --no-gpu          CPU only: preflight without CUDA, the import/build step and the summary of what
                    OUT already holds; every GPU step is reported as skipped
  --help            this text
Environment: PYTHON (the interpreter; default .venv/bin/python, python3, python), CC (the C
compiler Triton uses), ZPPO_COMMIT (the commit to record when the checkout has no .git).
EOF
}

set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUTDIR=${OUT:-bench/gpu_check_out}
BUDGET=450
NO_GPU=0
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --no-gpu) NO_GPU=1 ;;
        --out | --budget)
            [ $# -ge 2 ] || { echo "gpu_check.sh: $1 needs a value" >&2; exit 2; }
            if [ "$1" = --out ]; then OUTDIR=$2; else BUDGET=$2; fi
            shift ;;
        *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
case "$BUDGET" in '' | *[!0-9]*) echo "gpu_check.sh: --budget must be a number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac

mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
START=$(date +%s)
DEADLINE=$((START + BUDGET))
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET # compiled kernels on the GPU
NAMES=() RESULTS=() # each step's name and result, in order
FAILED=0

record() { # record NAME RESULT
    NAMES+=("$1") RESULTS+=("$2")
    case "$2" in ok* | skipped*) ;; *) FAILED=1 ;; esac
}

step() { # step NAME LIMIT_S COMMAND... : run under min(LIMIT_S, what the deadline leaves), log to OUT/NAME.log
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$((DEADLINE - $(date +%s) - 20)) # 20 s stay for the summary (and timeout's 10 s grace)
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        record "$name" "FAILED: no time left of the ${BUDGET} s budget"
        return 1
    fi
    echo "== $name (limit ${limit} s) =="
    t0=$(date +%s)
    if declare -F "$1" >/dev/null; then # a function of this script (preflight, build), in a child bash
        set -- bash -c "$(declare -f "$1"); $1"
    fi
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
    rc=${PIPESTATUS[0]}
    local took=$(($(date +%s) - t0))
    case $rc in
        0) record "$name" "ok (${took} s)" ;;
        124 | 137) record "$name" "FAILED: timed out after ${limit} s (log: $OUTDIR/$name.log)" ;;
        *) record "$name" "FAILED: exit code $rc after ${took} s (log: $OUTDIR/$name.log)" ;;
    esac
    return $rc
}

pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    [ -x .venv/bin/python ] && { echo .venv/bin/python; return; }
    command -v python3 >/dev/null 2>&1 && { echo python3; return; }
    echo python
}
PY=$(pick_python)
export PY NO_GPU # for the steps that are functions of this script (run in a child bash)

preflight() {
    local ok=0 cc
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "python: '$PY' does not run or is older than 3.11 (tomllib; set PYTHON=/path/to/python3)"
        return 1
    fi
    echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
    # Triton builds its launcher with $CC, else gcc, else clang, against Python.h
    cc=${CC:-$(command -v gcc || command -v clang || true)}
    if [ -z "$cc" ] || ! "$cc" --version >/dev/null 2>&1; then
        echo "C compiler: ${cc:-none found} does not run (Triton compiles its launcher at first launch; install gcc or set CC)"
        ok=1
    else
        echo "C compiler: $cc ($("$cc" --version | head -1))"
    fi
    "$PY" - <<'PY' || ok=1
import importlib.util, os, sysconfig
h = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print(f"Python.h: {h}" if os.path.exists(h) else f"Python.h: missing at {h} (install python3-dev: Triton compiles against it)")
missing = [m for m in ("torch", "transformers", "safetensors") if importlib.util.find_spec(m) is None]
print("modules: " + (f"missing {', '.join(missing)}" if missing else "torch, transformers, safetensors"))
for m in ("pytest", "hypothesis"):  # only the tests step needs them: reported here, not fatal
    if importlib.util.find_spec(m) is None:
        print(f"modules: {m} missing: the tests step will fail")
raise SystemExit(1 if missing or not os.path.exists(h) else 0)
PY
    [ "$NO_GPU" = 1 ] && return $ok
    "$PY" - <<'PY' || ok=1
import sys, torch
if not torch.cuda.is_available():
    sys.exit("CUDA: no device visible (bash bench/gpu_check.sh --no-gpu runs the CPU part)")
p = torch.cuda.get_device_properties(0)
print(f"CUDA: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, torch {torch.__version__}")
import triton
print("triton", triton.__version__)
PY
    return $ok
}

build() { # the project from this checkout, no install: the kernels link and this Python's C++ module
    if [ ! -e zppo_fast/kernels ] && [ ! -L zppo_fast/kernels ]; then
        ln -s ../kernels zppo_fast/kernels && echo "linked zppo_fast/kernels -> ../kernels (what setup.py's package_dir maps)"
    fi
    local suffix
    suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))') || return 1
    if [ -e "zppo_fast/_replay$suffix" ]; then
        echo "C++ module: zppo_fast/_replay$suffix present"
    else
        command -v cmake >/dev/null || { echo "C++ module: zppo_fast/_replay$suffix missing and cmake not found"; return 1; }
        echo "C++ module: building zppo_fast/_replay$suffix with CMake"
        cmake -S . -B build/gpu_check -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
            -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DZPPO_BUILD_TESTS=OFF >/dev/null &&
            cmake --build build/gpu_check --target _replay -j "$(nproc 2>/dev/null || echo 4)" >/dev/null &&
            cp "build/gpu_check/_replay$suffix" zppo_fast/ || return 1
    fi
    "$PY" -c 'import zppo_fast.kernels, zppo_fast.train, zppo_fast._replay; print("import zppo_fast: ok")'
}

versions() { # commit, device, driver, versions: one line each
    local commit=${ZPPO_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "unknown (no .git here; set ZPPO_COMMIT)")}
    echo "commit: $commit$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo ' (with uncommitted changes)')"
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1) (name, memory, driver)"
    else
        echo "device: nvidia-smi not found"
    fi
    "$PY" - <<'PY' 2>&1
import platform
from importlib.metadata import PackageNotFoundError, version
print(f"python {platform.python_version()}", end="")
for dist in ("torch", "triton", "transformers", "safetensors", "sglang", "liger-kernel"):
    try:
        print(f"; {dist} {version(dist)}", end="")
    except PackageNotFoundError:
        print(f"; {dist} not installed", end="")
import torch
print(f"; torch's CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")
if torch.cuda.is_available():  # what the kernels' one-time probes chose on this GPU
    try:
        from zppo_fast.kernels.advantages import advantages_launch
        from zppo_fast.kernels.linear_logprobs import gemm_modes

        m = gemm_modes("cuda")
        print(f"kernels: lm_head GEMMs logits {m.logits}, dW {m.dw} ({m.reason}); "
              f"advantages {advantages_launch(torch.device('cuda'))} launch")
    except Exception as e:  # noqa: BLE001 - reported in the summary, the steps say what failed
        print(f"kernels: probes failed: {type(e).__name__}: {e}")
PY
    [ "${PIPESTATUS[0]}" = 0 ] || echo "versions: '$PY' does not run"
}

summary() {
    echo "== summary ($(($(date +%s) - START)) s of ${BUDGET} s) =="
    versions
    local i
    for i in "${!NAMES[@]}"; do printf '%-18s %s\n' "${NAMES[$i]}:" "${RESULTS[$i]}"; done
    [ -f "$OUTDIR/tests.log" ] && echo "tests: $(grep -E '[0-9]+ (passed|failed|error)' "$OUTDIR/tests.log" | tail -1)"
    "$PY" - "$OUTDIR/policy_loss.jsonl" <<'PY'
import collections, json, os, sys
path = sys.argv[1]
if not os.path.exists(path):
    print(f"policy loss: no results ({path} missing)"); raise SystemExit
rows, bad = collections.defaultdict(dict), 0
for line in open(path):
    try:
        r = json.loads(line)
        rows[(r["N"], r["H"], r["V"])][r["variant"]] = r
    except (ValueError, KeyError, TypeError):
        bad += 1
print("policy loss, ours vs floor / Liger / eager (targets: <= 1.25x floor, >= 2x faster than Liger):")
print(f"{'N':>6} {'H':>5} {'ours ms':>9} {'x floor':>8} {'liger/ours':>10} {'eager/ours':>10} {'ours MB':>8} {'eager MB':>9}")
fmt = lambda x: "-" if x is None else f"{x:.2f}"
for (n, h, v), d in sorted(rows.items()):
    ours = d.get("ours", {}).get("ms")
    if not ours:
        why = d["ours"].get("error", "no ms") if "ours" in d else "row missing"
        print(f"{n:>6} {h:>5}  ours: {why}"); continue
    ratio = lambda k: (d[k]["ms"] / ours) if d.get(k, {}).get("ms") else None
    floor = d.get("floor", {}).get("ms")
    eager = d.get("eager", {})
    print(f"{n:>6} {h:>5} {ours:>9.1f} {fmt(ours / floor if floor else None):>8} {fmt(ratio('liger')):>10} "
          f"{fmt(ratio('eager')):>10} {d['ours'].get('peak_mb', float('nan')):>8.0f} "
          f"{str(eager.get('peak_mb', eager.get('error', 'missing')))[:9]:>9}")
if not rows:
    print("  (no rows)")
if bad:
    print(f"  ({bad} unreadable line(s) skipped)")
PY
    [ $? = 0 ] || echo "policy loss: the summary needs a working '$PY'"
    if [ "$FAILED" = 0 ]; then echo "RESULT: all steps passed"; else echo "RESULT: FAILED (see the steps above)"; fi
}

finish() {
    summary 2>&1 | tee "$OUTDIR/summary.txt"
    exit $FAILED
}

# ---------------------------------------------------------------------------------------- steps
step preflight 20 preflight || finish
step build 60 build || finish
if [ "$NO_GPU" = 1 ]; then
    for s in tests train train_shared sglang bench_policy_loss bench_advantages; do record "$s" "skipped (--no-gpu)"; done
    finish
fi

step tests 120 "$PY" -m pytest -q -p no:cacheprovider --maxfail=25 tests/test_kernels_policy_loss.py \
    tests/test_kernels_advantages.py tests/test_kernels_linear.py tests/test_kernels_distill.py \
    tests/test_shared_prefix.py tests/test_qwen35_decode.py -k "cuda or bad_inputs"

TRAIN_ARGS=(--run.steps 2 --run.eval_every 0 --run.tensorboard false --run.overwrite true --run.device cuda
    --sft.cache_dir "$OUTDIR/sft_cache")
step train 80 "$PY" -m zppo_fast.train "${TRAIN_ARGS[@]}" --run.out_dir "$OUTDIR/train_run"
# the shared-prefix layout's CUDA path (FlexAttention block mask), opt-in on GPUs
step train_shared 60 "$PY" -m zppo_fast.train "${TRAIN_ARGS[@]}" --parallel.share_prefix true \
    --run.out_dir "$OUTDIR/train_shared_run"

if "$PY" -c 'import sglang' >/dev/null 2>&1; then
    # torchrun, as users run it: its agent-store variables must not reach the engines' processes
    step sglang 130 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 bench/sglang_check.py \
        "$OUTDIR/sglang"
else
    record sglang "skipped (sglang does not import)"
fi

rm -f "$OUTDIR/policy_loss.jsonl" # --json appends
step bench_policy_loss 100 "$PY" bench/bench_policy_loss.py --device cuda --reps 3 --warmup 1 \
    --variants eager chunked liger ours floor \
    --shapes 4096x1024x248320 16384x4096x248320 65536x4096x248320 --json "$OUTDIR/policy_loss.jsonl"
step bench_advantages 20 "$PY" bench/bench_advantages.py --device cuda --reps 10
finish
