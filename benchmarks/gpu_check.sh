#!/usr/bin/env bash
# The GPU check of issue 20, in one run of under 8 minutes on one H100:
#   1. the GPU tests (tests/test_gpu.py: bf16 on CUDA vs fp32 on CPU, the EP = 1 engine on a GPU;
#      the EP = 2 NCCL test skips itself on one GPU; tests/test_gpu_fp8.py: FP8 routed experts
#      through torch._scaled_mm against the CPU fp32 model, the engine keeping them FP8)
#   2. one real-size Maverick MoE layer (hidden 5120, width 8192, 128 experts, top-1; bf16 and FP8;
#      32, 128 and 4096 tokens) against the HBM roofline, per-expert loop beside the grouped kernels
#      (benchmarks/bench_moe_layer.py layer)
#   3. EP = 1 engine decode on a `mini` checkpoint on the GPU, bf16 and FP8, at 32 and 1 sequences, each
#      with decode steps replayed from CUDA graphs (cuda_graphs auto) and without (off), side by side
#      (bench_moe_layer.py engine)
# Every result goes to one directory: $OUT if set, else artifacts/gpu_check/<time>. A step that
# fails or runs out of its time is recorded in summary.txt and the next step still runs; the exit
# status is non-zero if any step failed.
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh          # PYTHON=... to pick the interpreter
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/artifacts/gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
FAILED=0
START=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then echo "ok      $name (${took}s)" | tee -a "$SUMMARY"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "TIMEOUT $name after ${limit}s" | tee -a "$SUMMARY"; FAILED=1
  else echo "FAILED  $name (exit $rc, ${took}s; see $name.log)" | tee -a "$SUMMARY"; FAILED=1
  fi
  tail -n 3 "$OUT/$name.log" | sed 's/^/        /'
}

{ nvidia-smi || echo "no nvidia-smi"; } > "$OUT/nvidia-smi.txt" 2>&1
"$PYTHON" - > "$OUT/environment.txt" 2>&1 <<'PY'
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", "sm", f"{p.major}{p.minor}")
print("torch._grouped_mm", hasattr(torch, "_grouped_mm"), "torch._scaled_mm", hasattr(torch, "_scaled_mm"),
      "torch._scaled_grouped_mm", hasattr(torch, "_scaled_grouped_mm"))
PY
cat "$OUT/environment.txt"

step gpu_tests 180 "$PYTHON" -m pytest tests/test_gpu.py tests/test_gpu_fp8.py -q -rs -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
step moe_layer 150 "$PYTHON" benchmarks/bench_moe_layer.py layer --out "$OUT"
CKPT=$(mktemp -d)/mini
step make_mini 40 "$PYTHON" -m maverick_ray.cli make-checkpoint "$CKPT" --preset mini
for graphs in auto off; do
  for seqs in 32 1; do
    step engine_decode_${seqs}_graphs_$graphs 60 "$PYTHON" benchmarks/bench_moe_layer.py engine --checkpoint "$CKPT" \
      --out "$OUT" --seqs $seqs --cuda-graphs $graphs --name engine_decode_${seqs}_graphs_$graphs
  done
done
step make_mini_fp8 45 "$PYTHON" -m maverick_ray.cli make-checkpoint "$CKPT-fp8" --preset mini --fp8
for graphs in auto off; do
  step engine_decode_fp8_graphs_$graphs 60 "$PYTHON" benchmarks/bench_moe_layer.py engine --checkpoint "$CKPT-fp8" \
    --out "$OUT" --cuda-graphs $graphs --name engine_decode_fp8_graphs_$graphs
done
rm -rf "$(dirname "$CKPT")"

echo "total $(( $(date +%s) - START ))s; results in $OUT" | tee -a "$SUMMARY"
[ -f "$OUT/moe_layer.md" ] && cat "$OUT/moe_layer.md"
for f in "$OUT"/engine_decode*.json; do [ -f "$f" ] && { echo "$(basename "$f"):"; "$PYTHON" -c "
import json, sys; r = json.load(open(sys.argv[1]))
print({k: r.get(k) for k in ('seqs', 'fp8_experts', 'cuda_graphs', 'cuda_graphs_off', 'decode_step_ms_median',
                             'output_tokens_per_s', 'all_outputs_full_length', 'graph_stats')})" "$f"; }; done
exit $FAILED
