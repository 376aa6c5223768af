#!/usr/bin/env bash
# DFT (discriminative fine-tuning, arXiv 2502.18679, Algorithm 36) on verl 0.9.1's SFT trainer: torchrun over
# `python -m recipe.dft.main_dft`. The generic launcher: run_dft_7b.sh (UltraFeedback) and run_dft_metamath.sh
# (MetaMathQA) set the model, data and GPU layout and call it. Defaults are the official settings: score dft with
# tau 1 and gamma 0.85 (dft2: tau 0.3, gamma 0.9, unless TAU/GAMMA are set), B = 2 negatives per example per step,
# log pi_ref on the plain prompt, AdamW at lr 2e-6 with a cosine schedule, 2 epochs, 128 examples per step (each
# with its B negatives: 384 sequences), sequences of at most 1024 tokens, FSDP2.
# Assumes NNODES nodes of NGPUS_PER_NODE GPUs (default one node of 8); token-budget micro-batches of
# MAX_TOKEN_LEN_PER_GPU tokens (default 8192, verl's: two full-length examples of 3 x 1024 tokens).
#
# Every setting is an environment variable; further Hydra overrides are passed through:
#   MODEL_PATH=/models/m TRAIN_FILES=$HOME/data/dft/ultrafeedback_pool.parquet bash recipe/dft/run_dft.sh \
#       trainer.total_training_steps=10
#   SCORE=dft2 MODEL_PATH=... TRAIN_FILES=... bash recipe/dft/run_dft.sh        # tau 0.3, gamma 0.9
#   DRY_RUN=1 MODEL_PATH=... TRAIN_FILES=... bash recipe/dft/run_dft.sh         # compose and check, start nothing
# Several nodes: run it on each with NNODES, NODE_RANK and MASTER_ADDR (MASTER_PORT, default 29500) set.
# DRY_RUN=1 composes the config and runs DFT's checks (recipe/dft/checks.py: layout, pool files) in one process.
set -euo pipefail

# --- model and data (the pools of python -m recipe.dft.negatives; see prepare_data.sh)
MODEL_PATH=${MODEL_PATH:?set MODEL_PATH (a Hugging Face model id or folder)}
TRAIN_FILES=${TRAIN_FILES:?set TRAIN_FILES (the negatives pool: a parquet file or a Hydra list of them)}
VAL_FILES=${VAL_FILES:-}  # a pool too; empty: no validation

# --- DFT
SCORE=${SCORE:-dft}
case "$SCORE" in
    dft) default_tau=1 default_gamma=0.85 ;;
    dft2) default_tau=0.3 default_gamma=0.9 ;;
    *) echo "SCORE=$SCORE: use dft or dft2" >&2; exit 2 ;;
esac
TAU=${TAU:-$default_tau}
GAMMA=${GAMMA:-$default_gamma}
NUM_NEGATIVES=${NUM_NEGATIVES:-2}
REF_PROMPT=${REF_PROMPT:-plain}  # the prompt the pool's log pi_ref was computed on: plain or augmented

# --- optimization and layout. BATCH_SIZE and MICRO_BATCH_SIZE count examples (1 + NUM_NEGATIVES sequences each,
# kept in one micro-batch). USE_DYNAMIC_BSZ=True cuts micro-batches of up to MAX_TOKEN_LEN_PER_GPU tokens, which
# must hold one whole example, (1 + NUM_NEGATIVES) x MAX_LENGTH; False cuts MICRO_BATCH_SIZE examples per GPU.
LR=${LR:-2e-6}
EPOCHS=${EPOCHS:-2}
BATCH_SIZE=${BATCH_SIZE:-128}
MAX_LENGTH=${MAX_LENGTH:-1024}
USE_DYNAMIC_BSZ=${USE_DYNAMIC_BSZ:-True}
MAX_TOKEN_LEN_PER_GPU=${MAX_TOKEN_LEN_PER_GPU:-8192}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-2}

# --- cluster and output
NNODES=${NNODES:-1}
NGPUS_PER_NODE=${NGPUS_PER_NODE:-8}
PROJECT_NAME=${PROJECT_NAME:-dft}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-$(basename "$MODEL_PATH")-$SCORE}
SAVE_DIR=${SAVE_DIR:-$HOME/dft_runs/$EXPERIMENT_NAME}
# checkpoints (with DFT's u, for resuming) at the end of each epoch; verl also saves after the last step
SAVE_FREQ=${SAVE_FREQ:-after_each_epoch}
LOGGER=${LOGGER:-"['console']"}  # e.g. "['console','wandb']"
PYTHON=${PYTHON:-python3}

overrides=(
    model.path="$MODEL_PATH"
    data.train_files="$TRAIN_FILES"
    data.val_files="${VAL_FILES:-null}"
    data.train_batch_size="$BATCH_SIZE"
    data.max_length="$MAX_LENGTH"
    data.use_dynamic_bsz="$USE_DYNAMIC_BSZ"
    data.max_token_len_per_gpu="$MAX_TOKEN_LEN_PER_GPU"
    data.micro_batch_size_per_gpu="$MICRO_BATCH_SIZE"
    dft.score="$SCORE"
    dft.tau="$TAU"
    dft.gamma="$GAMMA"
    dft.num_negatives="$NUM_NEGATIVES"
    dft.ref_prompt="$REF_PROMPT"
    optim.lr="$LR"
    optim.lr_scheduler_type=cosine
    engine.strategy=fsdp2
    trainer.nnodes="$NNODES"
    trainer.n_gpus_per_node="$NGPUS_PER_NODE"
    trainer.total_epochs="$EPOCHS"
    trainer.project_name="$PROJECT_NAME"
    trainer.experiment_name="$EXPERIMENT_NAME"
    trainer.default_local_dir="$SAVE_DIR"
    trainer.save_freq="$SAVE_FREQ"
    trainer.logger="$LOGGER"
)

if [[ ! "${DRY_RUN:-0}" =~ ^0?$ ]]; then
    # main_dft composes, checks, prints the config and exits before any process group: one process is enough
    exec "$PYTHON" -m recipe.dft.main_dft "${overrides[@]}" "$@"
fi
if (( NNODES == 1 )); then
    cluster=(--standalone)
else
    cluster=(
        --node_rank="${NODE_RANK:?set NODE_RANK (0 .. NNODES-1) on each node}"
        --master_addr="${MASTER_ADDR:?set MASTER_ADDR (the address of node 0)}"
        --master_port="${MASTER_PORT:-29500}"
    )
fi
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NGPUS_PER_NODE" "${cluster[@]}" \
    -m recipe.dft.main_dft "${overrides[@]}" "$@"
