#!/usr/bin/env bash
# Shared launcher behind run_disco_1.5b.sh and run_disco_7b.sh: DisCO (arXiv 2505.12366) on verl 0.9.1
# through `python -m recipe.disco.main_disco`. Those two scripts only set the model-size defaults; call them,
# not this file. Defaults are the paper's: DeepScaleR prompts, 128 prompts x n=8 answers per step, 32 prompts
# per mini-batch (4 optimizer steps per step), temperature 0.6, 1024 prompt / 8192 response tokens,
# delta=1e-4, beta=1e3, tau=10 (logL) or 1 (Lratio), no reference model, no entropy bonus, token-budget
# micro-batches of 36864 tokens per GPU, validation every 20 steps with 16 samples at T=0.6 / top_p=0.95,
# checkpoints every 20 steps with automatic resume.
#
# Every setting below can be overridden from the environment; any further Hydra override can be appended:
#   NGPUS_PER_NODE=4 bash recipe/disco/run_disco_1.5b.sh trainer.val_before_train=False
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
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:?}

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
# The engine's scheduling limits of the original runs (up to 1024 sequences and 10240 tokens per engine step; verl's
# defaults are 256 and 8192): they only decide how much vLLM batches at once, not what it samples. The original runs
# also disabled CUDA graphs (enforce_eager=True); here they stay on, verl's default, since eager mode only slows
# decoding: ENFORCE_EAGER=True reproduces the original engine exactly.
MAX_NUM_SEQS=${MAX_NUM_SEQS:-1024}
MAX_NUM_BATCHED_TOKENS=${MAX_NUM_BATCHED_TOKENS:-10240}
ENFORCE_EAGER=${ENFORCE_EAGER:-False}

# --- update layout: how the actor cuts a mini-batch into micro-batches (DisCO is exact under any layout).
# The paper's runs used token-budget micro-batches (use_dynamic_bsz) of at most 36864 = 4 x (1024 + 8192)
# tokens per GPU, i.e. room for 4 full-length answers, and no sequence parallelism. The tokens per GPU bound
# the update's activation memory; Ulysses sequence parallelism (SP_SIZE GPUs share each micro-batch) bounds the
# longest answer instead: verl needs MAX_TOKEN_LEN_PER_GPU x SP_SIZE >= MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH
# (utils/seqlen_balancing.py asserts it at the first update). The old-log-prob pass takes both settings from
# the actor through verl's own defaults (rollout.log_prob_use_dynamic_bsz and log_prob_max_token_len_per_gpu
# select the actor's keys), which keeps the two use_dynamic_bsz equal, as verl asserts (workers/engine_workers.py).
# USE_DYNAMIC_BSZ=False cuts fixed micro-batches of MICRO_BATCH_SIZE (update) and LOG_PROB_MICRO_BATCH_SIZE
# (log-prob pass) answers per GPU instead.
USE_DYNAMIC_BSZ=${USE_DYNAMIC_BSZ:-True}
MAX_TOKEN_LEN_PER_GPU=${MAX_TOKEN_LEN_PER_GPU:-36864}
SP_SIZE=${SP_SIZE:-1}

# --- cluster, schedule, output
NNODES=${NNODES:-1}
NGPUS_PER_NODE=${NGPUS_PER_NODE:-8}
# verl's v1 trainer (docs/training.md#async-trainers): sync (the paper's), colocate_async (generation overlaps
# training on the same GPUs, answers up to MAX_OFF_POLICY steps old) or separate_async (a standalone rollout pool of
# ROLLOUT_NNODES x ROLLOUT_GPUS_PER_NODE GPUs beside the NNODES x NGPUS_PER_NODE training GPUs, one mini-batch per
# update, the weights sent by NCCL every PARAMETER_SYNC_STEP updates: TRAIN_BATCH_SIZE / MINI_BATCH_SIZE keeps the
# paper's 4 optimizer steps per set of answers). On one node of 8 GPUs: NGPUS_PER_NODE=4 ROLLOUT_GPUS_PER_NODE=4.
TRAINER_MODE=${TRAINER_MODE:-sync}
MAX_OFF_POLICY=${MAX_OFF_POLICY:-8}
ROLLOUT_NNODES=${ROLLOUT_NNODES:-1}
ROLLOUT_GPUS_PER_NODE=${ROLLOUT_GPUS_PER_NODE:-4}
PARAMETER_SYNC_STEP=${PARAMETER_SYNC_STEP:-$((TRAIN_BATCH_SIZE / MINI_BATCH_SIZE))}
TOTAL_EPOCHS=${TOTAL_EPOCHS:-30}
TEST_FREQ=${TEST_FREQ:-20}
SAVE_FREQ=${SAVE_FREQ:-20}
# A checkpoint holds fp32 parameters and both AdamW moments: ~21 GB for 1.5B, ~91 GB for 7B, so verl's default
# (keep all) fills 1.5 TB (1.5B, 70 saves) or 4.6 TB (7B, 50 saves). Resuming needs only the newest, and verl
# deletes an old one only after the new one is written (utils/checkpoint/checkpoint_manager.py), so 1 is
# crash-safe; 2 also keeps the previous one in case the newest is unusable (a run that went bad, a damaged disk).
# verl counts only the saves of the current launch: a resumed run leaves the earlier launch's last ones.
MAX_CKPT_TO_KEEP=${MAX_CKPT_TO_KEEP:-2}
VAL_N=${VAL_N:-16}
# the step-0 validation (the base model's accuracy, the curve's first point): ~25,000 answers over the six sets,
# then minutes of verl's metric bootstrap on the driver (docs/metrics.md#validation); VAL_BEFORE_TRAIN=False skips it
VAL_BEFORE_TRAIN=${VAL_BEFORE_TRAIN:-True}
VAL_TOP_P=${VAL_TOP_P:-0.95}
PROJECT_NAME=${PROJECT_NAME:-DisCO}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-$MODEL_SIZE-$OBJECTIVE-$SCORE_FUNC}
OUTPUT_DIR=${OUTPUT_DIR:-$HOME/disco_runs/$EXPERIMENT_NAME}
# absolute: the trainer and its workers are Ray processes, which need not run in this directory
[[ "$OUTPUT_DIR" == /* ]] || OUTPUT_DIR=$PWD/$OUTPUT_DIR
PYTHON=${PYTHON:-python3}

# --- logging. verl's file logger writes one JSON line per step into the run's folder, so that
# `python -m recipe.disco.plot $OUTPUT_DIR` works; it is passed to Ray so that it also reaches a trainer on another
# node. wandb is added only where it can log in (an API key, a `wandb login` entry in ~/.netrc, or offline mode):
# without credentials wandb.init fails only when training starts, after the models and vLLM are up.
export VERL_FILE_LOGGER_PATH=${VERL_FILE_LOGGER_PATH:-$OUTPUT_DIR/metrics.jsonl}
wandb_can_log() {
    [[ -n "${WANDB_API_KEY:-}" || "${WANDB_MODE:-}" == offline ]] ||
        grep -Eqs 'machine[[:space:]]+api\.wandb\.ai' "${NETRC:-$HOME/.netrc}"
}
if [[ -z "${LOGGER:-}" ]]; then
    LOGGER="['console','file']"
    if wandb_can_log; then
        LOGGER="['console','file','wandb']"
    else
        echo "run_disco.sh: no wandb credentials (WANDB_API_KEY, ~/.netrc, WANDB_MODE=offline): logging to" \
            "the console and $VERL_FILE_LOGGER_PATH; LOGGER=... chooses the loggers" >&2
    fi
fi

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
    # FSDP2, the strategy every test runs; verl's default is FSDP1 (strategy=fsdp). run_eval.sh uses the same,
    # so that it loads the checkpoints this run writes.
    actor_rollout_ref.actor.strategy=fsdp2
    actor_rollout_ref.actor.optim.lr="$LR"
    actor_rollout_ref.actor.ppo_mini_batch_size="$MINI_BATCH_SIZE"
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu="$MICRO_BATCH_SIZE"
    actor_rollout_ref.actor.use_dynamic_bsz="$USE_DYNAMIC_BSZ"
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu="$MAX_TOKEN_LEN_PER_GPU"
    # the key the FSDP engine reads (actor.ulysses_sequence_parallel_size is verl's deprecated alias)
    actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size="$SP_SIZE"
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
    actor_rollout_ref.rollout.max_num_seqs="$MAX_NUM_SEQS"
    actor_rollout_ref.rollout.max_num_batched_tokens="$MAX_NUM_BATCHED_TOKENS"
    actor_rollout_ref.rollout.enforce_eager="$ENFORCE_EAGER"
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
    trainer.max_actor_ckpt_to_keep="$MAX_CKPT_TO_KEEP"
    trainer.val_before_train="$VAL_BEFORE_TRAIN"
    trainer.resume_mode=auto
    trainer.default_local_dir="$OUTPUT_DIR/checkpoints"
)
trainer+=(trainer.v1.trainer_mode="$TRAINER_MODE" trainer.v1.sampler.max_off_policy_threshold="$MAX_OFF_POLICY")
if [[ "$TRAINER_MODE" == separate_async ]]; then
    trainer+=(
        trainer.v1.separate_async.parameter_sync_step="$PARAMETER_SYNC_STEP"
        actor_rollout_ref.rollout.nnodes="$ROLLOUT_NNODES"
        actor_rollout_ref.rollout.n_gpus_per_node="$ROLLOUT_GPUS_PER_NODE"
        actor_rollout_ref.rollout.checkpoint_engine.backend=nccl
    )
fi
cluster=(++ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH="$VERL_FILE_LOGGER_PATH")
if [[ -n "${RAY_ADDRESS:-}" ]]; then
    cluster+=(+ray_kwargs.ray_init.address="$RAY_ADDRESS")
fi

if [[ "${DRY_RUN:-0}" =~ ^0?$ ]]; then
    # verl's FileLogger opens its file with "wb", which empties it, and makes no folder for it (utils/tracking.py):
    # keep the log of an earlier launch of this run (a resume) as <file>.<UTC time>, and make the folder
    if [[ -s "$VERL_FILE_LOGGER_PATH" ]]; then
        mv "$VERL_FILE_LOGGER_PATH" "$VERL_FILE_LOGGER_PATH.$(date -u +%Y%m%dT%H%M%SZ)"
    fi
    mkdir -p "$(dirname "$VERL_FILE_LOGGER_PATH")"
fi

exec "$PYTHON" -m recipe.disco.main_disco \
    "${data[@]}" "${model[@]}" "${actor[@]}" "${rollout[@]}" "${trainer[@]}" "${cluster[@]}" "$@"
