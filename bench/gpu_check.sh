#!/usr/bin/env bash
# bench/gpu_check.sh: the fused MoE kernel's whole GPU check in one command, for a machine with an NVIDIA
# GPU, nvcc and a CUDA build of torch. Builds kimi_k2_kernels from kernels.cu, runs tests/test_kernels.py
# (compile tier + the gpu tier), runs bench/bench_moe.py (gpu-small and kimi-k2, T from 1 to 16,384, every
# tile config), then compute-sanitizer on a small case. Each step has its own time limit and the script goes
# on after a failure, so one run reports on every step (the limits add up to 13 minutes at most). The steps
# run in order of importance and each writes its file as it goes, so a run stopped early keeps what came
# before.
#
#   bash bench/gpu_check.sh                       (from anywhere; results in /tmp/gpu_check)
#   OUT=/some/folder PYTHON=python3.12 bash bench/gpu_check.sh
#
# Files: env.txt, build.log, pytest.log, bench.txt, bench.json, sanitizer.log,
#        summary.txt (the last lines of each).
set -uo pipefail
cd "$(dirname "$0")/.."  # the repository root: setup.py, tests/ and bench/ are named from there
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}  # the Python whose torch is a CUDA build
# setup.py installs no module: import the project's from this checkout (also in the /tmp script below)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# torch guesses CUDA_HOME as nvcc's grandparent folder, wrong when nvcc on PATH is a symlink (e.g. /usr/local/bin)
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); export CUDA_HOME
fi
status() { echo "== $1: $2" | tee -a "$OUT/summary.txt"; }
: >"$OUT/summary.txt"

# --- 0. what machine this is
{
  date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  echo "CUDA_HOME=${CUDA_HOME:-unset}"; nvcc --version | tail -2; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git log --oneline -1
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# --- 1. build (no network there: no deps, no isolated build env); fall back to an in-place build_ext
t0=$SECONDS
if KIMI_BUILD_CUDA=1 timeout 200 "$PY" -m pip install -v --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
   || KIMI_BUILD_CUDA=1 timeout 100 "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1; then
  status build "ok in $((SECONDS - t0)) s"
else
  status build "FAILED after $((SECONDS - t0)) s (see build.log)"
fi
grep -m1 "kimi-k2: CUDA kernels" "$OUT/build.log" | tee -a "$OUT/summary.txt"
"$PY" -c "import torch, moe; print('pick_expert_impl:', moe.pick_expert_impl('auto', torch.device('cuda')))" \
  2>&1 | tail -1 | tee -a "$OUT/summary.txt"

# --- 2. tests: compile tier and gpu tier (a hung kernel must not eat the bench's time: hence the timeout)
t0=$SECONDS
timeout 180 "$PY" -m pytest tests/test_kernels.py -q -s -rA -p no:cacheprovider >"$OUT/pytest.log" 2>&1
rc=$?
status pytest "exit $rc in $((SECONDS - t0)) s: $(tail -1 "$OUT/pytest.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20 | tee -a "$OUT/summary.txt"

# --- 3. benchmark: every path side by side, fused tile configs forced too
t0=$SECONDS
timeout 180 "$PY" bench/bench_moe.py --device cuda --configs --budget 0.3 --json "$OUT/bench.json" \
  >"$OUT/bench.txt" 2>&1
rc=$?
status bench "exit $rc in $((SECONDS - t0)) s"
sed -n '/^shape /,$p' "$OUT/bench.txt" | grep -E "^shape|fused|grouped|target" | tee -a "$OUT/summary.txt"

# --- 4. compute-sanitizer: out-of-bounds accesses and shared-memory races, one small case per tile config
t0=$SECONDS
cat >/tmp/kimi_sanitize.py <<'EOF'
import torch, moe
torch.manual_seed(0)
T, E, K, D, I = 37, 8, 2, 200, 136
x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
ex = moe.Experts(E, D, I).cuda().bfloat16()
for p in ex.parameters():
    torch.nn.init.normal_(p, std=0.05)
idx = torch.rand(T, E, device="cuda").argsort(1)[:, :K]
w = torch.rand(T, K, device="cuda")
for config in (1, 2, 3):
    out = moe._ext.moe_forward(x, idx, w, ex.gate_proj, ex.up_proj, ex.down_proj, config=config)
torch.cuda.synchronize()
print("sanitizer case ran; max", out.float().abs().max().item())
EOF
for tool in memcheck racecheck; do
  timeout 60 compute-sanitizer --tool "$tool" --kernel-name regex:moe_ --print-limit 20 "$PY" /tmp/kimi_sanitize.py \
    >>"$OUT/sanitizer.log" 2>&1
  rc=$?
  status "compute-sanitizer $tool" "exit $rc: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer.log" | tail -1)"
done
status total "$SECONDS s"
