#!/usr/bin/env bash
# DisCO on DeepSeek-R1-Distill-Qwen-1.5B, the paper's 1.5B run (DisCO, log-L score, tau=10, lr 2e-6, published
# curves stop at step 1400). Assumes one node with 8 GPUs of 80 GB (A100/H100): FSDP2 actor, vLLM rollout with
# TP=1 taking 85% of each GPU while it generates (the original runs' share; the actor's sharded fp32 parameters and
# AdamW moments stay on the GPU beside it, ~3 GB per GPU), update micro-batches of at most 36864 tokens per GPU.
# Every setting is an environment variable (see run_disco.sh); extra Hydra overrides are passed through:
#   MODEL_PATH=/models/r1-1.5b NGPUS_PER_NODE=4 bash recipe/disco/run_disco_1.5b.sh trainer.val_before_train=False
#   DRY_RUN=1 bash recipe/disco/run_disco_1.5b.sh          # validate and print the config, start nothing
set -euo pipefail

export MODEL_SIZE=1.5B
export MODEL_PATH=${MODEL_PATH:-deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B}
export LR=${LR:-2e-6}
export SCORE_FUNC=${SCORE_FUNC:-logL}
export TOTAL_STEPS=${TOTAL_STEPS:-1400}
export MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
export LOG_PROB_MICRO_BATCH_SIZE=${LOG_PROB_MICRO_BATCH_SIZE:-8}
export GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.85}

exec bash "$(dirname "${BASH_SOURCE[0]}")/run_disco.sh" "$@"
