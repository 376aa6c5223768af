#!/usr/bin/env bash
# Shared launcher behind run_disco_1.5b.sh and run_disco_7b.sh: DisCO (arXiv 2505.12366) on verl 0.9.1
# through `python -m recipe.disco.main_disco`. Those two scripts only set the model-size defaults; call them,
# not this file. Defaults are the paper's: DeepScaleR prompts, 128 prompts x n=8 answers per step, 32 prompts
# per mini-batch (4 optimizer steps per step), temperature 0.6, 1024 prompt / 8192 response tokens,
# delta=1e-4, beta=1e3, tau=10 (logL) or 1 (Lratio), no reference model, no entropy bonus, validation every
# 20 steps with 16 samples at T=0.6 / top_p=0.95, checkpoints every 20 steps with automatic resume.
#
# Every setting below can be overridden from the environment; any further Hydra override can be appended:
#   NGPUS_PER_NODE=4 bash recipe/disco/run_disco_1.5b.sh trainer.logger='[console]'
# DRY_RUN=1 composes and validates the config (verl's checks + DisCO's), prints it and exits without Ray.
# RAY_ADDRESS=<head>:6379 joins an existing (multi-node) Ray cluster instead of starting a local one.
set -euo pipefail

# --- set by the size-specific script
: "${MODEL_SIZE:?run recipe/disco/run_disco_1.5b.sh or run_disco_7b.sh}"
MODEL_PATH=${MODEL_PATH:?}
LR=${LR:?}
SCORE_FUNC=${SCORE_FUNC:?}
TOTAL_STEPS=${TOTAL_STEPS:?}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:?}
LOG_PROB_MICRO_BATCH_SIZE=${LOG_PROB_MICRO_BATCH_SIZE:?}

# --- data (written by recipe/disco/prepare_data.sh)
DISCO_DATA_DIR=${DISCO_DATA_DIR:-$HOME/data/disco}
TRAIN_FILE=${TRAIN_FILE:-$DISCO_DATA_DIR/deepscaler_train.parquet}
default_val=""
for name in aime24 aime25 math500 amc23 minerva olympiad_bench; do
    default_val+="${default_val:+,}'$DISCO_DATA_DIR/$name.parquet'"
done
VAL_FILES=${VAL_FILES:-[$default_val]}

# --- DisCO objective
OBJECTIVE=${OBJECTIVE:-disco}
case "$SCORE_FUNC" in
    logL) default_tau=10 ;;
    Lratio) default_tau=1 ;;
    *) echo "SCORE_FUNC=$SCORE_FUNC: use logL or Lratio" >&2; exit 2 ;;
esac
TAU=${TAU:-$default_tau}
DELTA=${DELTA:-1e-4}
BETA=${BETA:-1e3}

# --- batch, lengths, sampling
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-128}
ROLLOUT_N=${ROLLOUT_N:-8}
MINI_BATCH_SIZE=${MINI_BATCH_SIZE:-32}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-1024}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-8192}
TEMPERATURE=${TEMPERATURE:-0.6}
ROLLOUT_NAME=${ROLLOUT_NAME:-vllm}
ROLLOUT_TP=${ROLLOUT_TP:-1}
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.85}

# --- cluster, schedule, logging, output
NNODES=${NNODES:-1}
NGPUS_PER_NODE=${NGPUS_PER_NODE:-8}
TOTAL_EPOCHS=${TOTAL_EPOCHS:-30}
TEST_FREQ=${TEST_FREQ:-20}
SAVE_FREQ=${SAVE_FREQ:-20}
VAL_N=${VAL_N:-16}
VAL_TOP_P=${VAL_TOP_P:-0.95}
PROJECT_NAME=${PROJECT_NAME:-DisCO}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-$MODEL_SIZE-$OBJECTIVE-$SCORE_FUNC}
OUTPUT_DIR=${OUTPUT_DIR:-$HOME/disco_runs/$EXPERIMENT_NAME}
LOGGER=${LOGGER:-"['console','wandb']"}
PYTHON=${PYTHON:-python3}

data=(
    data.train_files="$TRAIN_FILE"
    data.val_files="$VAL_FILES"
    data.train_batch_size="$TRAIN_BATCH_SIZE"
    data.max_prompt_length="$MAX_PROMPT_LENGTH"
    data.max_response_length="$MAX_RESPONSE_LENGTH"
    data.filter_overlong_prompts=True
    data.truncation=error
)
model=(
    actor_rollout_ref.model.path="$MODEL_PATH"
    actor_rollout_ref.model.use_remove_padding=True
    actor_rollout_ref.model.enable_gradient_checkpointing=True
)
actor=(
    actor_rollout_ref.actor.optim.lr="$LR"
    actor_rollout_ref.actor.ppo_mini_batch_size="$MINI_BATCH_SIZE"
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu="$MICRO_BATCH_SIZE"
    actor_rollout_ref.actor.policy_loss.objective="$OBJECTIVE"
    actor_rollout_ref.actor.policy_loss.score_func="$SCORE_FUNC"
    actor_rollout_ref.actor.policy_loss.tau="$TAU"
    actor_rollout_ref.actor.policy_loss.delta="$DELTA"
    actor_rollout_ref.actor.policy_loss.beta="$BETA"
)
rollout=(
    actor_rollout_ref.rollout.name="$ROLLOUT_NAME"
    actor_rollout_ref.rollout.n="$ROLLOUT_N"
    actor_rollout_ref.rollout.temperature="$TEMPERATURE"
    actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP"
    actor_rollout_ref.rollout.gpu_memory_utilization="$GPU_MEMORY_UTILIZATION"
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu="$LOG_PROB_MICRO_BATCH_SIZE"
    actor_rollout_ref.rollout.val_kwargs.n="$VAL_N"
    actor_rollout_ref.rollout.val_kwargs.do_sample=True
    actor_rollout_ref.rollout.val_kwargs.temperature="$TEMPERATURE"
    actor_rollout_ref.rollout.val_kwargs.top_p="$VAL_TOP_P"
)
trainer=(
    trainer.nnodes="$NNODES"
    trainer.n_gpus_per_node="$NGPUS_PER_NODE"
    trainer.project_name="$PROJECT_NAME"
    trainer.experiment_name="$EXPERIMENT_NAME"
    trainer.logger="$LOGGER"
    trainer.total_epochs="$TOTAL_EPOCHS"
    trainer.total_training_steps="$TOTAL_STEPS"
    trainer.test_freq="$TEST_FREQ"
    trainer.save_freq="$SAVE_FREQ"
    trainer.val_before_train=True
    trainer.resume_mode=auto
    trainer.default_local_dir="$OUTPUT_DIR/checkpoints"
)
cluster=()
if [[ -n "${RAY_ADDRESS:-}" ]]; then
    cluster+=(+ray_kwargs.ray_init.address="$RAY_ADDRESS")
fi

exec "$PYTHON" -m recipe.disco.main_disco \
    "${data[@]}" "${model[@]}" "${actor[@]}" "${rollout[@]}" "${trainer[@]}" "${cluster[@]}" "$@"
