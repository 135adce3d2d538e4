#!/usr/bin/env bash
# The GPU run in one call: install; the test suite on the GPU while a 4-layer model (the bench preset) trains
# through the CLI; the train-step benchmark (small preset, bf16, MFU) with the ragged and the gathered MoE
# dispatch; the routed experts alone per dispatch; the decode benchmark on the trained run (absorbed vs expanded
# MLA, plain vs speculative at batch 1 and 8); and one or two MTP drafts per step. Everything is written under
# $OUT; steps past the time budget are skipped and say so.
#
#   bash experiments/gpu_run.sh            # on the GPU machine (an H200)
#   bash experiments/gpu_run.sh --cpu      # dry run here: CPU, tiny sizes, a couple of steps, no installs
#   bash experiments/gpu_run.sh --pack     # also leave only summary.md, run.log and results.tar.gz in $OUT
#   bash experiments/gpu_run.sh --fetch-wheels   # here, with network: the wheels the GPU image lacks, into
#                                                # ./.whl (git-ignored; the device call carries it)
#
# $OUT (default ./out) receives:
#   summary.md            date, versions, device, each step's status and the headline figures
#   run.log               every step's output
#   bench_train_<impl>/   bench_train.{md,json,png} per MoE dispatch (MTP on and off; MFU against PEAK_FLOPS)
#   bench_decode/         bench_decode.{md,json,png}
#   bench_moe/            bench_moe.{md,json,png}: the routed experts alone, per dispatch
#   bench_moe_cudnn/      the same for ragged with XLA's cuDNN ragged-dot fusion flag (GPU only)
#   spec_drafts/          spec_drafts.{md,json,png}
#   train_run/            the trained run's config.json and metrics.jsonl (its checkpoints stay behind)
#
# MFU is model FLOP/s over PEAK_FLOPS, by default 989e12: the H200's dense bf16 Tensor Core peak (NVIDIA's
# datasheet lists 1979 TFLOP/s with 2:4 sparsity, half of that dense). Each step runs under `timeout`
# (TEST_TIMEOUT, RUN_TIMEOUT, TRAIN_TIMEOUT, MOE_TIMEOUT, DECODE_TIMEOUT, DRAFTS_TIMEOUT seconds), cut further so
# that every step ends by BUDGET seconds after the start (default 560 on the GPU: the whole run, summary and
# packing included, fits one 10-minute call; 1500 in the dry run); a failed step is recorded and the next one
# still runs. The tests and the training run share the GPU (no memory preallocation; neither is timed for a
# claim); the benchmarks run alone after them. Exit status 1 if the install or a benchmark failed (or, in the
# dry run, the tests); on the GPU the tests' outcome is reported, not fatal: tests that build 8-device meshes
# cannot pass on one GPU.
#
# fp32 on the GPU: XLA's default lets fp32 matmuls round through TF32 (10-bit mantissa). The tests (tolerances
# set for fp32 against torch on the CPU) and the decode benchmarks (which assert speculative == plain greedy,
# token for token) run with JAX_DEFAULT_MATMUL_PRECISION=highest; bf16 training is unaffected.
#
# Installing: with network, `pip install -e .[dev]` and the CUDA jax (`jax[$JAX_CUDA]`, cuda13 by default,
# skipped when the installed jax already sees a GPU). A machine without network (the device machines) installs
# the wheels in ./.whl if present (see --fetch-wheels), then the package alone (`--no-deps`) over what the
# image has (jax with CUDA, flax, optax, orbax, torch, transformers, pytest).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

MODE=gpu
PACK=0
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    --pack) PACK=1 ;;
    --fetch-wheels) MODE=fetch ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --cpu, --pack, --fetch-wheels)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
if [ "$MODE" = fetch ]; then
  # Runtime packages the GPU image (Python 3.12, x86-64) does not have; the rest of the package's needs it has.
  exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$REPO/.whl" \
    "grain>=0.2.18" array-record portpicker "tensorboardX>=2.6"
fi

OUT=${OUT:-./out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PEAK_FLOPS=${PEAK_FLOPS:-989e12}
BUDGET=${BUDGET:-$([ "$MODE" = cpu ] && echo 1500 || echo 560)}
END=$(( $(date +%s) + BUDGET - 15 ))       # 15 s left for the summary and packing
JAX_CUDA=${JAX_CUDA:-cuda13}
LOG="$OUT/run.log"
STATUS="$OUT/.status"
: > "$LOG"
: > "$STATUS"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORK=${WORK:-$(mktemp -d)}               # the training run's checkpoints (not brought back)
RUN="$WORK/train_run"
if [ "$MODE" = cpu ]; then
  export JAX_PLATFORMS=cpu
  TEST_TIMEOUT=${TEST_TIMEOUT:-300} RUN_TIMEOUT=${RUN_TIMEOUT:-300} TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-600}
  DECODE_TIMEOUT=${DECODE_TIMEOUT:-600} DRAFTS_TIMEOUT=${DRAFTS_TIMEOUT:-600} MOE_TIMEOUT=${MOE_TIMEOUT:-300}
  TEST_ARGS=(tests/test_data.py)                      # the suite's plumbing on one quick file
  RUN_ARGS=(--preset tiny train.steps=3 train.global_batch_size=2 train.seq_len=16 train.eval_every=3
            train.checkpoint_every=3 train.max_corpus_bytes=100000 model.num_hidden_layers=2)
  TRAIN_IMPLS=(ragged gathered)
  TRAIN_ARGS=(--preset tiny --dtype bf16 --steps 2 --rounds 1 --matmul-size 128
              train.global_batch_size=2 train.seq_len=16 model.num_hidden_layers=2 model.scan_unroll=1)
  DECODE_ARGS=(--preset tiny --contexts 32,64 --steps 1 --repeats 1 --new-tokens 6 --prompts 2 --prompt-tokens 8
               --batch 1,2 --queue 1 --agree-presets "")
  DRAFTS_ARGS=(--batches 1 --drafts 1,2 --repeats 1 --new-tokens 6 --prompt-tokens 8)
  MOE_ARGS=(--tokens 256 --experts 8 --impls blocked,gathered,ragged --rounds 1 --warmup 1 --no-ep)
  MOE_FLAGS=""                                        # the cuDNN flag is a GPU flag: XLA:CPU refuses it
else
  # The tests build meshes of 8 devices: on one GPU those tests fail by design (the log lists them); the CPU
  # platform stays available beside it for the host-side parts.
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda,cpu}
  TEST_TIMEOUT=${TEST_TIMEOUT:-140} RUN_TIMEOUT=${RUN_TIMEOUT:-150} TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-150}
  DECODE_TIMEOUT=${DECODE_TIMEOUT:-160} DRAFTS_TIMEOUT=${DRAFTS_TIMEOUT:-120} MOE_TIMEOUT=${MOE_TIMEOUT:-90}
  # The numerical checks that mean something on one device (the rest of the suite builds 8-device meshes or
  # times the host allocator; 140 s covered half of it with 8 workers on 2026-12-01, experiments/results/gpu.md).
  TEST_ARGS=(tests/test_hf_parity.py tests/test_model.py tests/test_speculative_step.py tests/test_infer.py
             tests/test_moe_dispatch.py tests/test_attention.py tests/test_generate_dtype.py
             tests/test_decode_weights.py tests/test_hf_variants.py)
  # The 4-layer run of the CPU tables (experiments/results/spec_cost.md): bench model, 300 steps of 32 x 128.
  RUN_ARGS=(--preset bench train.steps=300 train.global_batch_size=32 train.seq_len=128 train.learning_rate=3e-3
            train.warmup_steps=30 train.stable_steps=120 train.decay_steps=150 train.final_lr=3e-4
            train.eval_every=50 train.checkpoint_every=100 train.bias_update_rate=1e-2
            train.bias_update_rate_final=1e-3 train.max_corpus_bytes=4000000)
  # The small preset's own batch (64 x 1024) ran out of the card's memory with ragged dispatch (gpu.md).
  # ragged: XLA's ragged_dot, 1.5% MFU on 2026-12-01; gathered: the batched-matmul form built after that run.
  TRAIN_IMPLS=(ragged gathered)
  TRAIN_ARGS=(--preset small --dtype bf16 --steps 10 --rounds 3 --matmul-size 8192 train.global_batch_size=16)
  # Each decode program compiles once per shape (some 200 on the CPU): few contexts, no constructed models, no
  # serving queue, so that compiling leaves time to measure.
  DECODE_ARGS=(--preset small --contexts 4096 --steps 5 --repeats 3 --new-tokens 128 --prompts 4 --batch 1,8
               --queue 0 --agree-presets "")
  DRAFTS_ARGS=(--batches 8 --drafts 1,2 --repeats 2)
  # The small preset's routed experts (D 512, F 256, K 6) at E = 16 and 64, for the train step's tokens.
  MOE_ARGS=(--tokens 16384 --hidden 512 --width 256 --topk 6 --experts 16,64 --impls gathered,ragged,blocked,dense
            --ragged-max-experts 64 --no-ep --rounds 5 --warmup 1)
  MOE_FLAGS="--xla_gpu_experimental_use_ragged_dot_fusion=true"
fi

# step NAME TIMEOUT COMMAND...: run one step (a program or a function of this script) under `timeout`, its
# output appended to run.log when it ends (steps run side by side keep their own files until then); its
# status, time and last output line (or the line `summary_line NAME` picks) go to .status.
step() {
  local name=$1 limit=$2 rc=0 t0 took verdict=ok out="$OUT/.step.$1"
  shift 2
  t0=$(date +%s)
  if [ $(( END - t0 )) -lt "$limit" ]; then limit=$(( END - t0 )); fi
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: skipped (the ${BUDGET}s budget is spent)" | tee -a "$LOG"
    printf '%s\tskipped (budget spent)\t0\t\n' "$name" >> "$STATUS"
    return
  fi
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" bash -c '"$@"' _ "$@" > "$out" 2>&1 || rc=$?
  took=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 124 ]; then verdict="timed out after ${limit}s"; elif [ "$rc" -ne 0 ]; then verdict="failed (exit $rc)"; fi
  { echo "=== $name output:"; tr '\r' '\n' < "$out"; echo "=== $name: $verdict in ${took}s"; } >> "$LOG"
  echo "=== $name: $verdict in ${took}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$verdict" "$took" "$(summary_line "$name" "$out" | cut -c1-200 | tr '|\t' '/ ')" \
    >> "$STATUS"
  rm -f "$out"
}

# The line of a step's output that the summary table shows: pytest's counts (from its -v lines when it was
# cut off), or the last line.
summary_line() {
  local name=$1 out=$2
  case "$name" in
    tests)
      if grep -qE '^=+ .*(passed|failed|error).* in [0-9.]+s' "$out"; then
        grep -E '^=+ .*(passed|failed|error).* in [0-9.]+s' "$out" | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//'
      else
        for v in PASSED FAILED ERROR SKIPPED; do printf '%s %s, ' "$(grep -cE " $v( |$)" "$out")" "$v"; done
        echo "(cut off; counted from the -v lines)"
      fi ;;
    *) grep -v '^\s*$' "$out" | tail -1 ;;
  esac
}

install() {
  local pip=("$PY" -m pip install -q)
  if [ -d "$REPO/.whl" ]; then
    local rc=0
    "${pip[@]}" --no-index --no-deps "$REPO"/.whl/*.whl || rc=$?
    "${pip[@]}" --no-index --no-deps --no-build-isolation -e "$REPO" && return "$rc"
  elif "${pip[@]}" --timeout 20 --retries 1 -e "$REPO[dev]"; then
    if ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
      "${pip[@]}" -U "jax[$JAX_CUDA]"
    fi
  else
    echo "no network: installing the package alone over the image's packages"
    "${pip[@]}" --no-index --no-deps --no-build-isolation -e "$REPO"
  fi
}
export -f install
export PY REPO JAX_CUDA

versions() {
  date -u '+date: %Y-%m-%d %H:%M UTC'
  echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$PY" - <<'EOF'
import importlib.metadata as md, platform
print("python:", platform.python_version())
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "grain",
             "numpy", "torch", "transformers"):
    try:
        print(f"{name}: {md.version(name)}")
    except md.PackageNotFoundError:
        pass
try:
    import jax
    d = jax.devices()[0]
    print(f"device: {d.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s))")
except Exception as e:          # a broken CUDA install is reported, not fatal here
    print(f"device: jax could not start ({type(e).__name__}: {e})")
EOF
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/nvidia-smi: /'
  fi
}

if [ "$MODE" = gpu ]; then
  step install 600 install
else
  echo "=== install: skipped (--cpu dry run)" | tee -a "$LOG"
fi
# Without an install (the dry run, or an install that failed) the repository itself is the package.
if ! (cd / && "$PY" -c "import dsv3_jax" 2>/dev/null); then
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
versions > "$OUT/.versions" 2>&1
cat "$OUT/.versions" >> "$LOG"

# fp32 matmuls at full precision where results are compared token for token or against torch (see the top)
FP32=(env JAX_DEFAULT_MATMUL_PRECISION=highest)
SHARED=(env XLA_PYTHON_CLIENT_PREALLOCATE=false)       # two processes on one GPU: allocate as needed
# Each failure's report lands in test_failures.txt as it happens (tests/conftest.py): a run cut off by its time
# limit never prints pytest's closing report.
TEST_CMD=("${SHARED[@]}" "${FP32[@]}" env DSV3_FAILURES_FILE="$OUT/test_failures.txt" "$PY" -m pytest -v
          -p no:cacheprovider -rfE)
if [ "$MODE" = gpu ]; then
  TEST_CMD+=(--tb=short)
  if "$PY" -c "import xdist" 2>/dev/null; then TEST_CMD+=(-n "${TEST_WORKERS:-8}"); fi
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then TEST_CMD+=(--timeout 100); fi
fi
rm -rf "$RUN"
step tests "$TEST_TIMEOUT" "${TEST_CMD[@]}" "${TEST_ARGS[@]}" &
step train_run "$RUN_TIMEOUT" "${SHARED[@]}" "$PY" -m dsv3_jax train --no-progress --run-dir "$RUN" "${RUN_ARGS[@]}"
wait
mkdir -p "$OUT/train_run"
cp "$RUN/config.json" "$RUN/metrics.jsonl" "$OUT/train_run/" 2>/dev/null

step bench_moe "$MOE_TIMEOUT" "$PY" experiments/bench_moe.py "${MOE_ARGS[@]}" --out "$OUT/bench_moe"
for impl in "${TRAIN_IMPLS[@]}"; do
  step "bench_train_$impl" "$TRAIN_TIMEOUT" "$PY" experiments/bench_train.py "${TRAIN_ARGS[@]}" --moe-impl "$impl" \
    --peak-flops "$PEAK_FLOPS" --out "$OUT/bench_train_$impl"
done
if [ -n "$MOE_FLAGS" ]; then
  step bench_moe_cudnn "$MOE_TIMEOUT" env XLA_FLAGS="$MOE_FLAGS" "$PY" experiments/bench_moe.py "${MOE_ARGS[@]}" \
    --impls ragged --out "$OUT/bench_moe_cudnn"
fi
step bench_decode "$DECODE_TIMEOUT" "${FP32[@]}" "$PY" experiments/bench_decode.py "${DECODE_ARGS[@]}" \
  --run-dir "$RUN" --out "$OUT/bench_decode"
step spec_drafts "$DRAFTS_TIMEOUT" "${FP32[@]}" "$PY" experiments/spec_drafts.py --runs "$RUN" "${DRAFTS_ARGS[@]}" \
  --out "$OUT/spec_drafts"
rm -rf "$WORK"

MODE=$MODE PEAK_FLOPS=$PEAK_FLOPS "$PY" - "$OUT" <<'EOF' > "$OUT/summary.md"
import json, os, statistics, sys
out = sys.argv[1]
mode, peak = os.environ["MODE"], float(os.environ["PEAK_FLOPS"])
print("# GPU run (experiments/gpu_run.sh)" if mode == "gpu" else "# Dry run on the CPU (experiments/gpu_run.sh --cpu)")
print()
print("```")
print(open(os.path.join(out, ".versions")).read().rstrip())
print("```")
print()
print("| step | status | seconds | last line of its output |\n|---|---|---|---|")
for line in open(os.path.join(out, ".status")):
    name, verdict, took, last = line.rstrip("\n").split("\t")
    print(f"| {name} | {verdict} | {took} | {last} |")
print()
if mode == "gpu":
    print("The test suite builds meshes of 8 devices in places; on one GPU those tests fail by construction "
          "(run.log names them). The benchmarks' status decides this script's exit status. Tests and decode "
          "benchmarks ran with JAX_DEFAULT_MATMUL_PRECISION=highest (fp32 matmuls without TF32).")
    print()


def read(*parts):
    path = os.path.join(out, *parts)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.loads(f.read().split("```")[1]) if path.endswith(".md") else json.load(f)


metrics = os.path.join(out, "train_run", "metrics.jsonl")
if os.path.exists(metrics):
    rows = [json.loads(line) for line in open(metrics) if line.strip()]
    steps = [r for r in rows if "tokens_per_s" in r]
    val = [r for r in rows if "val_loss" in r]
    if steps:
        rate = statistics.median(r["tokens_per_s"] for r in steps[len(steps) // 2:])
        print(f"Training run (CLI, beside the tests): {steps[-1]['step']} steps, loss {steps[0]['loss']:.3f} -> "
              f"{steps[-1]['loss']:.3f}" + (f", validation loss {val[-1]['val_loss']:.3f}" if val else "")
              + f"; {rate:.0f} tokens/s (median over the second half, the GPU shared with the tests).")
        print()
for s in filter(None, (read(name, "bench_train.md") for name in sorted(os.listdir(out))
                       if name.startswith("bench_train"))):
    print(f"Train step ({s['preset']} preset, {s['dtype']}, moe_impl={s['moe_impl']}, batch {s['batch']} x "
          f"{s['seq_len']}): MTP on {s['tokens_per_s']:.0f} tok/s, MFU {s['mfu']:.3g}; MTP off "
          f"{s['tokens_per_s_no_mtp']:.0f} tok/s, MFU {s['mfu_no_mtp']:.3g} (peak {peak / 1e12:.0f} TFLOP/s; "
          f"the same run's {s['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s matmul reference).")
    print()
for folder, what in (("bench_moe", "routed experts alone"), ("bench_moe_cudnn", "ragged with the cuDNN fusion flag")):
    d = read(folder, "bench_moe.json")
    if d:
        cells = "; ".join(f"E={r['experts']} {r['impl']}: {r['ms']:.1f} ms ({r['flops_fraction']:.2f} of the matmul)"
                          for r in d["rows"])
        print(f"MoE, {what}, forward + backward ({d['matmul_gflops'] / 1e3:.0f} TFLOP/s matmul reference): {cells}.")
        print()
d = read("bench_decode", "bench_decode.json")
if d:
    s = d["summary"]
    ctx = ", ".join(f"{c}: {a} / {s['expanded_tokens_per_s'][c]}" for c, a in s["absorbed_tokens_per_s"].items())
    print(f"Decode, absorbed / expanded MLA tok/s by cached tokens ({s['preset']} preset, batch 1): {ctx}.")
    print()
    name = lambda model: os.path.basename(model.rstrip("/"))        # the run's folder, not its temporary path
    spec = [f"{name(s['speculative_model'])}: {s['speculative_speedup']:.2f}x"]
    spec += [f"{k}: {v['speculative_speedup']:.2f}x" for k, v in s.get("constructed", {}).items()]
    print(f"Decode, speculative / plain decode tokens/s (the paper's serving figure: 1.8x), batch 1, each prompt "
          f"alone: {'; '.join(spec)}; acceptance {s['acceptance_rate']:.2f}.")
    print()
    for label, table in (("one request per batch", "batches"), ("serving queue, prefills included", "queue")):
        for model, by_batch in s.get(table, {}).items():
            cells = "; ".join(f"batch {b}: {r['plain_tokens_per_s']:.0f} -> {r['spec_tokens_per_s']:.0f} tok/s, "
                              f"**{r['speedup']:.2f}x**, acceptance {r['acceptance_rate']:.2f}"
                              for b, r in by_batch.items())
            print(f"Decode by batch, {label} ({name(model)}): {cells}.")
            print()
d = read("spec_drafts", "spec_drafts.json")
if d:
    for r in d["rows"]:
        cells = "; ".join(f"K={k}: {v['speedup']:.2f}x (step {v['step_over_plain']:.2f} plain steps, "
                          f"{v['tokens_per_forward']:.2f} tokens per forward)" for k, v in r["drafts"].items())
        print(f"Drafts per step, batch {r['batch']} (plain {r['plain_tokens_per_s']:.0f} tok/s): {cells}.")
    print()
EOF
rm -f "$OUT/.status" "$OUT/.versions"
cat "$OUT/summary.md"

if [ "$PACK" = 1 ]; then
  (cd "$OUT" && dirs=$(ls -d bench_* spec_drafts train_run 2>/dev/null || true) && tar czf results.tar.gz $dirs \
    && rm -rf $dirs)
fi
if grep -q '^| \(install\|bench_[a-z0-9_]*\) | \(failed\|timed out\)' "$OUT/summary.md"; then exit 1; fi
if [ "$MODE" = cpu ] && grep -q '^| tests | \(failed\|timed out\)' "$OUT/summary.md"; then exit 1; fi
exit 0
