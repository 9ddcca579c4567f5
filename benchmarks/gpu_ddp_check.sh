#!/usr/bin/env bash
# Data parallel on >= 2 GPUs (nccl): `packprep train` under torchrun, 2 ranks x 1 micro-batch == 1 rank x grad_accum 2
# (fp32, same global batches), then a 2-rank checkpoint/resume. Logs in $OUT (default ./gpu_out). From the repo root:
#   bash benchmarks/gpu_ddp_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=.:tests PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
nvidia-smi -L | tee "$OUT/ddp.txt"
python3 -c "from trainer_fixtures import random_lengths, write_packed
write_packed('/tmp/ddp_shards', random_lengths(3000, 1024, seed=0), 1024, vocab=4000)"
train="-m packprep.cli train /tmp/ddp_shards --model tiny --batch-tokens 4096 --lr 1e-3 --warmup-steps 2 --device cuda --no-bf16"
echo "== 2 ranks" | tee -a "$OUT/ddp.txt"
torchrun --standalone --nproc_per_node=2 $train --steps 12 2>&1 | tee -a "$OUT/ddp.txt"
echo "== 1 rank, grad_accum 2" | tee -a "$OUT/ddp.txt"
python3 $train --steps 12 --grad-accum 2 2>&1 | tee -a "$OUT/ddp.txt"
echo "== 2 ranks, stop at 6 then resume to 12" | tee -a "$OUT/ddp.txt"
torchrun --standalone --nproc_per_node=2 $train --steps 12 --stop-at 6 --ckpt /tmp/ddp_ckpt 2>&1 | tee -a "$OUT/ddp.txt"
torchrun --standalone --nproc_per_node=2 $train --steps 12 --ckpt /tmp/ddp_ckpt --resume 2>&1 | tee -a "$OUT/ddp.txt"
echo "== 2 ranks bf16 auto attention" | tee -a "$OUT/ddp.txt"
torchrun --standalone --nproc_per_node=2 ${train/--no-bf16/--bf16} --steps 12 --log-every 4 2>&1 | tee -a "$OUT/ddp.txt"
