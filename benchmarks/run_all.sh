#!/usr/bin/env bash
# Every recorded CPU figure in benchmarks/RESULTS.md, in order, one job at a time.
# Run alone on a quiet machine: bash benchmarks/run_all.sh   (about an hour on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=benchmarks/results
mkdir -p "$OUT"
export RUNLORA_CACHE_DIR="$OUT/cache" TQDM_DISABLE=1
run() { echo "+ $*" | tee -a "$OUT/commands.log"; "$@"; }

run $PY -m runlora layer-bench -n 4096 --shapes 1024x1024 1024x2736 2736x1024 -r 8 64 \
    --dtype fp32 --device cpu --min-run-time 5 -o $OUT/layer
for r in 8 128; do for d in 0 0.1; do
  run $PY -m runlora bench -m llama_20m llama_60m llama_130m llama_250m --batch-size 4 \
      --seq-len 256 -r $r -a 16 -d $d --dtype fp32 --device cpu --min-run-time 20 \
      -o $OUT/model_r${r}_d${d}
done; done
for r in 8 128; do  # the sparse-dropout-mask re-runs recorded in RESULTS.md
  run $PY -m runlora bench -m llama_60m llama_130m --batch-size 4 --seq-len 256 -r $r -a 16 \
      -d 0.1 --dtype fp32 --device cpu --min-run-time 20 -o $OUT/model_r${r}_d0.1_sparse
done
run $PY -m runlora bench -m llama_60m llama_130m --batch-size 4 --seq-len 256 -r 8 -a 16 \
    --dtype fp32 --device cpu --quant 4bit --min-run-time 20 -o $OUT/model_qlora4_r8
run $PY benchmarks/regret.py --budget 0.25 --out $OUT/regret_cpu.json
for c in flops roofline time; do
  run $PY -m runlora plan -m llama_1.3b --batch-size 4 --seq-len 256 -r 16 --criterion $c \
      -o $OUT/plan_llama_1.3b_$c.json
done
run $PY -m runlora finetune -m llama_60m --compare --steps 200 --batch-size 4 --seq-len 256 \
    --lr 1e-3 -r 8 -a 16 --seed 0 --no-progress -o $OUT/finetune_llama_60m
HF_HUB_OFFLINE=1 run $PY -m runlora finetune -m minilm --compare --epochs 2 --batch-size 16 \
    --seq-len 128 --lr 2e-3 -r 8 -a 16 --seed 0 --no-progress -o $OUT/finetune_minilm
run $PY benchmarks/fsdp_bench.py --model llama_60m --nproc 2 --batch-size 4 --seq-len 256 \
    --steps 6 --repeats 3 --out $OUT/fsdp_llama_60m.json
run $PY benchmarks/fsdp_bench.py --model llama_60m --nproc 2 --batch-size 4 --seq-len 256 \
    --steps 6 --repeats 3 --engine zero3 --out $OUT/zero3_llama_60m.json
run $PY benchmarks/serve_bench.py --model llama_60m --adapters 4 -r 8 --batch-size 16 \
    --seq-len 128 --min-run-time 10 --out $OUT/serve_llama_60m.json
