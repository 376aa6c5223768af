#!/usr/bin/env bash
# DisCO on DeepSeek-R1-Distill-Qwen-7B, the paper's 7B run (DisCO, L-ratio score, tau=1, lr 1e-6, published
# curves stop at step 1000). Assumes one node with 8 GPUs of 80 GB (A100/H100): FSDP2 actor with gradient
# checkpointing, vLLM rollout with TP=1. For more memory headroom or speed, use several nodes: start a Ray
# cluster and set RAY_ADDRESS and NNODES (see "Run on several nodes" in docs/training.md).
#
# Memory per GPU (80 GB):
# * Rollout. The actor's sharded fp32 parameters and AdamW moments stay on the GPU while vLLM generates:
#   7.6e9 x 12 bytes / 8 GPUs = 11.4 GB (+3.8 GB of gradients until they are freed), plus ~2-3 GB of CUDA
#   context. The paper's 0.85 would give vLLM 68 GB: ~84 GB in all. 0.6 is what verl's own 7B FSDP examples use
#   without offload (examples/grpo_trainer/run_qwen2-7b_math.sh, run_qwen2-7b_seq_balance.sh): 48 GB for vLLM
#   (15 GB of weights, ~30 GB of KV cache), ~65 GB in all. Higher values need
#   actor_rollout_ref.actor.fsdp_config.param_offload=True and optimizer_offload=True.
#   The preflight (python -m recipe.disco.preflight, also run by DRY_RUN=1) estimates 62.4 GiB per GPU during
#   generation at 0.6, 70.4 at 0.70, 82.3 at 0.85 (does not fit), before Ray starts.
# * Update. Activation memory follows the tokens per GPU, not the answer length. 8k answers: the paper's 7B
#   layout, token budgets of 36864 tokens per GPU without sequence parallelism (run_disco.sh's defaults).
#
# Answers longer than 8k (MAX_RESPONSE_LENGTH > 8192; the layout below holds up to 35840 response tokens):
# SP_SIZE=2 and MAX_TOKEN_LEN_PER_GPU=18432. A micro-batch then spans 2 GPUs and holds 2 x 18432 = 36864 tokens,
# as in the paper, so one full-length 32k answer (1024 + 32768 = 33792 tokens) fits (verl needs budget x SP >=
# prompt + response), while each GPU holds half the paper's tokens: half its activation memory, as headroom for
# a layout nobody has run at 32k yet, and Ulysses splits the attention of a long answer over the 2 GPUs (the
# model's 28 query and 4 key-value heads divide by 2). Longer answers: SP_SIZE=4 (up to 72704 response tokens).
# With USE_DYNAMIC_BSZ=False a micro-batch holds MICRO_BATCH_SIZE whole answers per GPU: use 1 for 32k answers.
#
# Every setting is an environment variable (see run_disco.sh); extra Hydra overrides are passed through:
#   SCORE_FUNC=logL bash recipe/disco/run_disco_7b.sh       # tau follows SCORE_FUNC (10) unless TAU is set
#   MAX_RESPONSE_LENGTH=32768 bash recipe/disco/run_disco_7b.sh   # 32k answers: SP 2, 18432 tokens per GPU
#   DRY_RUN=1 bash recipe/disco/run_disco_7b.sh             # validate and print the config, start nothing
set -euo pipefail

export MODEL_SIZE=7B
export MODEL_PATH=${MODEL_PATH:-deepseek-ai/DeepSeek-R1-Distill-Qwen-7B}
export LR=${LR:-1e-6}
export SCORE_FUNC=${SCORE_FUNC:-Lratio}
export TOTAL_STEPS=${TOTAL_STEPS:-1000}
export MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
export LOG_PROB_MICRO_BATCH_SIZE=${LOG_PROB_MICRO_BATCH_SIZE:-4}
export GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.6}
if (( ${MAX_RESPONSE_LENGTH:-8192} > 8192 )); then
    export SP_SIZE=${SP_SIZE:-2}
    export MAX_TOKEN_LEN_PER_GPU=${MAX_TOKEN_LEN_PER_GPU:-18432}
fi

exec bash "$(dirname "${BASH_SOURCE[0]}")/run_disco.sh" "$@"
