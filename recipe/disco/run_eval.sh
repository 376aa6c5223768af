#!/usr/bin/env bash
# Evaluate a model (or a verl checkpoint of it) on AIME24, AIME25, MATH500, AMC23, Minerva and OlympiadBench as in
# the DisCO paper: 16 samples per problem at temperature 0.6, top_p 0.95, 8192 response tokens, scored by
# recipe.disco.reward; writes $OUTPUT_DIR/results.md and results.csv (pass@1 per benchmark, Avg, pass@1..16).
# Runs verl's validation path (recipe.disco.main_disco with trainer.val_only=True); no training.
#
#   MODEL_PATH=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B NGPUS_PER_NODE=4 bash recipe/disco/run_eval.sh
#   CHECKPOINT=$HOME/disco_runs/1.5B-disco-logL/checkpoints/global_step_1400 bash recipe/disco/run_eval.sh
#   DRY_RUN=1 bash recipe/disco/run_eval.sh        # compose and validate the config, print it, generate nothing
#
# CHECKPOINT (a training checkpoint, instead of MODEL_PATH) is merged first by verl's model merger into a Hugging
# Face folder, $OUTPUT_DIR/merged_model, which is evaluated: any GPU count works, not only the training run's.
#
# Every setting can be overridden from the environment; further Hydra overrides can be appended, e.g.
#   bash recipe/disco/run_eval.sh actor_rollout_ref.rollout.gpu_memory_utilization=0.8
# Data: recipe/disco/prepare_data.sh writes the six parquet files into $DISCO_DATA_DIR.
set -euo pipefail

CHECKPOINT=${CHECKPOINT:-}
if [[ -z "$CHECKPOINT" ]]; then
    MODEL_PATH=${MODEL_PATH:-deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B}
    default_name=$(basename "$MODEL_PATH")
else
    MODEL_PATH=${MODEL_PATH:-}  # set together with CHECKPOINT: refused by evaluate.py
    # .../<experiment>/checkpoints/global_step_N -> <experiment>/global_step_N: runs of the same step stay apart
    default_name=$(basename "$(dirname "$(dirname "$CHECKPOINT")")")/$(basename "$CHECKPOINT")
fi
DISCO_DATA_DIR=${DISCO_DATA_DIR:-$HOME/data/disco}
N_SAMPLES=${N_SAMPLES:-16}
TEMPERATURE=${TEMPERATURE:-0.6}
TOP_P=${TOP_P:-0.95}
RESPONSE_LENGTH=${RESPONSE_LENGTH:-8192}
PROMPT_LENGTH=${PROMPT_LENGTH:-2048}
OUTPUT_DIR=${OUTPUT_DIR:-$HOME/disco_eval/$default_name}
LABEL=${LABEL:-}
NNODES=${NNODES:-1}
NGPUS_PER_NODE=${NGPUS_PER_NODE:-8}
ROLLOUT_NAME=${ROLLOUT_NAME:-vllm}
PYTHON=${PYTHON:-python3}

args=(
    --data-dir "$DISCO_DATA_DIR"
    --output-dir "$OUTPUT_DIR"
    --n-samples "$N_SAMPLES"
    --temperature "$TEMPERATURE"
    --top-p "$TOP_P"
    --response-length "$RESPONSE_LENGTH"
    --prompt-length "$PROMPT_LENGTH"
    --nnodes "$NNODES"
    --n-gpus-per-node "$NGPUS_PER_NODE"
)
if [[ -n "$MODEL_PATH" ]]; then
    args+=(--model-path "$MODEL_PATH")
fi
if [[ -n "$CHECKPOINT" ]]; then
    args+=(--checkpoint "$CHECKPOINT")
fi
if [[ -n "$LABEL" ]]; then
    args+=(--label "$LABEL")
fi
# As in run_disco.sh: FSDP2, the strategy every test runs (verl's default is FSDP1), and the rollout engine (verl has
# no default: rollout.name is ???). Placed before the caller's overrides, which win.
set -- actor_rollout_ref.actor.strategy=fsdp2 actor_rollout_ref.rollout.name="$ROLLOUT_NAME" "$@"
if [[ -n "${RAY_ADDRESS:-}" ]]; then
    set -- +ray_kwargs.ray_init.address="$RAY_ADDRESS" "$@"
fi

exec "$PYTHON" -m recipe.disco.evaluate "${args[@]}" -- "$@"
