#!/usr/bin/env bash
# DisCO on DeepSeek-R1-Distill-Qwen-1.5B, the paper's 1.5B run (DisCO, log-L score, tau=10, lr 2e-6, published
# curves stop at step 1400). Assumes one node with 8 GPUs of 80 GB (A100/H100): FSDP actor, vLLM rollout with
# TP=1, 4 answers per GPU per micro-batch (global micro-batch 32 answers = 4 whole questions).
# Every setting is an environment variable (see run_disco.sh); extra Hydra overrides are passed through:
#   MODEL_PATH=/models/r1-1.5b NGPUS_PER_NODE=4 bash recipe/disco/run_disco_1.5b.sh trainer.logger='[console]'
#   DRY_RUN=1 bash recipe/disco/run_disco_1.5b.sh          # validate and print the config, start nothing
set -euo pipefail

export MODEL_SIZE=1.5B
export MODEL_PATH=${MODEL_PATH:-deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B}
export LR=${LR:-2e-6}
export SCORE_FUNC=${SCORE_FUNC:-logL}
export TOTAL_STEPS=${TOTAL_STEPS:-1400}
export MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
export LOG_PROB_MICRO_BATCH_SIZE=${LOG_PROB_MICRO_BATCH_SIZE:-8}

exec bash "$(dirname "${BASH_SOURCE[0]}")/run_disco.sh" "$@"
