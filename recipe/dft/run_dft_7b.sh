#!/usr/bin/env bash
# DFT on Mistral-7B-v0.1 with UltraFeedback's chosen answers, the paper's run with the official settings (score
# dft, tau 1, gamma 0.85, B = 2 negatives per example per step from the pool's 16, log pi_ref on the plain prompt,
# lr 2e-6 with a cosine schedule, 2 epochs, 128 examples per step, at most 1024 tokens per sequence): run_dft.sh's
# defaults, with the model, the pool and the layout below.
#
# Assumes one node with 8 GPUs of 80 GB (A100/H100), FSDP2 without offload, verl's gradient checkpointing:
# * state: fp32 weights, gradients and two AdamW moments, 16 bytes x 7.2e9 parameters / 8 GPUs = 14.5 GB per GPU;
# * micro-batches: token budgets of 24576 tokens per GPU (MAX_TOKEN_LEN_PER_GPU), room for 8 full-length examples
#   (3 x 1024 tokens each); a rank's share of a step is 16 examples (128 / 8), so one to two micro-batches per
#   step. By a rough estimate (not measured) the activations, recomputed layer and fp32 logits of 24576 tokens take
#   about 20 GB, so about 40 GB per GPU in all. Smaller cards: lower MAX_TOKEN_LEN_PER_GPU (at least 3072, one
#   example), or fixed micro-batches (USE_DYNAMIC_BSZ=False, MICRO_BATCH_SIZE examples per GPU, a divisor of 16).
# A checkpoint (fp32 weights and AdamW moments, with DFT's u) takes about 87 GB; one is saved per epoch.
#
# Data: recipe/dft/prepare_data.sh, then the negatives command it prints (the pool below). The base model's
# tokenizer has no chat template, which DFT's data and the negatives command apply to every prompt: give both the
# same one, T: the negatives command's --chat-template T and, here, the Hydra override model.custom_chat_template=T
# (verl saves it with the checkpoint's tokenizer, so an evaluation of the checkpoint uses it too).
#
# Every setting is an environment variable (see run_dft.sh); extra Hydra overrides are passed through:
#   bash recipe/dft/run_dft_7b.sh
#   SCORE=dft2 bash recipe/dft/run_dft_7b.sh                 # DFT2: tau 0.3, gamma 0.9 unless TAU/GAMMA are set
#   NGPUS_PER_NODE=4 bash recipe/dft/run_dft_7b.sh trainer.total_training_steps=100
#   DRY_RUN=1 bash recipe/dft/run_dft_7b.sh                  # compose and check, start nothing
set -euo pipefail

DATA_DIR=${DATA_DIR:-$HOME/data/dft}
export MODEL_PATH=${MODEL_PATH:-mistralai/Mistral-7B-v0.1}
export TRAIN_FILES=${TRAIN_FILES:-$DATA_DIR/ultrafeedback_pool.parquet}
export NGPUS_PER_NODE=${NGPUS_PER_NODE:-8}
export MAX_TOKEN_LEN_PER_GPU=${MAX_TOKEN_LEN_PER_GPU:-24576}
export EXPERIMENT_NAME=${EXPERIMENT_NAME:-mistral-7b-ultrafeedback-${SCORE:-dft}}

exec bash "$(dirname "${BASH_SOURCE[0]}")/run_dft.sh" "$@"
