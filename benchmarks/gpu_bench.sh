#!/usr/bin/env bash
# Issue 14 on the GPU machine, in phases that each fit one device call (figures and logs land in $OUT). From the repo
# root:
#   bash benchmarks/gpu_bench.sh stock            # baselines with the stock kernel: (a) (g) (f) (fc) (b), 349M and 1B
#   bash benchmarks/gpu_bench.sh fa4 WHEELS_DIR   # install FlashAttention-4 (../shared/gpu/fa4_wheels.sh's two halves:
#                                                 # $HOME/fa4/part.aa + WHEELS_DIR), GPU tests, kernel check and
#                                                 # timing, (b) and (bc) with fa4 on both models
#   bash benchmarks/gpu_bench.sh balance          # per-row costs, simulated 2/4/8 ranks, 2-GPU DDP token vs balanced
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=.:tests${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
SITE=$HOME/site
[ -d "$SITE/flash_attn" ] && export PYTHONPATH="$PYTHONPATH:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages"
phase=${1:?phase: stock | fa4 WHEELS_DIR | balance}
case "$phase" in
stock)
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  } 2>&1 | tee "$OUT/env.txt"
  for m in small 1b; do
    timeout 280 python3 benchmarks/bench_train.py --model "$m" --modes a,g,f,b,fc --attn torch --f-attn torch \
      --out "$OUT/stock_$m.json" 2>&1 | tail -40 | tee -a "$OUT/stock_log.txt"
  done ;;
fa4)
  wheels=${2:?wheels dir}
  whl=/tmp/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
  cat "$HOME/fa4/part.aa" "$wheels/part.ab" > "$whl"
  python3 -m pip install -q --no-index --no-deps --target "$SITE" "$whl" "$wheels"/*.whl 2>&1 | tail -3
  export PYTHONPATH="$PYTHONPATH:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages"
  python3 -c "import flash_attn.cute as c; print('flash_attn.cute OK')" 2>&1 | tail -2 | tee "$OUT/fa4_log.txt"
  python3 -m pytest -q -rs -p no:cacheprovider tests/test_trainer_gpu.py tests/test_trainer_data.py -k \
    "not stateful" 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
  python3 benchmarks/bench_attn.py --out "$OUT/attn.json" 2>&1 | tail -8 | tee -a "$OUT/fa4_log.txt"
  for m in small 1b; do
    python3 benchmarks/bench_train.py --model "$m" --modes b,bc --attn fa4 --out "$OUT/fa4_$m.json" 2>&1 | tail -12 \
      | tee -a "$OUT/fa4_log.txt"
  done ;;
balance)
  n=$(python3 -c "import torch; print(torch.cuda.device_count())")
  torchrun --standalone --nproc_per_node="$n" benchmarks/bench_balance.py --attn auto --out "$OUT/balance.json" 2>&1 \
    | tail -40 | tee "$OUT/balance_log.txt" ;;
*) echo "unknown phase $phase"; exit 2 ;;
esac
