#!/usr/bin/env bash
# One device call for issue 4: environment facts, the GPU tests (+ the CPU trainer tests there), a CUDA `packprep train`
# smoke, and the training benchmark. Logs and JSON land in $OUT (default ./gpu_out). Run from the repo root:
#   bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=.:tests PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, numba, pyarrow; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'numba', numba.__version__, 'pyarrow', pyarrow.__version__)"
  python3 -c "import inspect, torch.nn.attention.varlen as v; print('varlen_attn', inspect.signature(v.varlen_attn))"
  python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.txt"
python3 -m pytest -v -rs -p no:cacheprovider tests/test_trainer_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
[ -n "${CPU_TESTS:-}" ] && python3 -m pytest -q -p no:cacheprovider tests/test_trainer_model.py tests/test_trainer_data.py \
  -k "not stateful" 2>&1 | tail -3 | tee "$OUT/cpu_tests_on_device.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/train_smoke.txt"
import numpy as np
from trainer_fixtures import random_lengths, write_packed
write_packed("/tmp/smoke_shards", random_lengths(2000, 2048, seed=0), 2048, vocab=32000)
PY
python3 -m packprep.cli train /tmp/smoke_shards --model small --steps 30 --batch-tokens 16384 --device cuda \
  --attn auto --log-every 5 --ckpt /tmp/smoke_ckpt 2>&1 | tee -a "$OUT/train_smoke.txt"
python3 benchmarks/bench_train.py --out "$OUT/bench_train.json" 2>&1 | tee "$OUT/bench_train.txt"
