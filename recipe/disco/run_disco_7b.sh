#!/usr/bin/env bash
# DisCO on DeepSeek-R1-Distill-Qwen-7B, the paper's 7B run (DisCO, L-ratio score, tau=1, lr 1e-6, published
# curves stop at step 1000). Assumes one node with 8 GPUs of 80 GB (A100/H100): FSDP actor with gradient
# checkpointing, vLLM rollout with TP=1, 4 answers per GPU per micro-batch. For more memory headroom or speed,
# use several nodes: start a Ray cluster and set RAY_ADDRESS and NNODES (see "Run on several nodes" in README.md).
# Every setting is an environment variable (see run_disco.sh); extra Hydra overrides are passed through:
#   SCORE_FUNC=logL bash recipe/disco/run_disco_7b.sh       # tau follows SCORE_FUNC (10) unless TAU is set
#   DRY_RUN=1 bash recipe/disco/run_disco_7b.sh             # validate and print the config, start nothing
set -euo pipefail

export MODEL_SIZE=7B
export MODEL_PATH=${MODEL_PATH:-deepseek-ai/DeepSeek-R1-Distill-Qwen-7B}
export LR=${LR:-1e-6}
export SCORE_FUNC=${SCORE_FUNC:-Lratio}
export TOTAL_STEPS=${TOTAL_STEPS:-1000}
export MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
export LOG_PROB_MICRO_BATCH_SIZE=${LOG_PROB_MICRO_BATCH_SIZE:-4}

exec bash "$(dirname "${BASH_SOURCE[0]}")/run_disco.sh" "$@"
