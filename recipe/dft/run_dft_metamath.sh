#!/usr/bin/env bash
# DFT on Mistral-7B-v0.1 with MetaMathQA (the paper's maths run: GSM8K 79.15, MATH 28.34), then its evaluation on
# GSM8K and MATH500. Training is run_dft_7b.sh's (official settings, 8 GPUs of 80 GB, FSDP2; see its header for the
# layout and memory) on the MetaMathQA pool: 12 negatives per prompt, B = 2 per example per step.
#
# Evaluation, on this node's GPUs once training ends (NODE_RANK 0 only):
# 1. the last checkpoint, $SAVE_DIR/global_step_N (N from verl's latest_checkpointed_iteration.txt), holds FSDP
#    shards (model_world_size_W_rank_R.pt), fsdp_config.json, DFT's dft_u.pt and huggingface/ with the model config
#    and tokenizer but no weights (verl's checkpoint.save_contents has no hf_model), so verl's model merger writes a
#    Hugging Face folder first: python -m verl.model_merger merge --backend fsdp --local_dir $SAVE_DIR/global_step_N
#    --target_dir $EVAL_DIR/merged_model (bf16 weights);
# 2. DisCO's evaluation (recipe/disco/run_eval.sh, docs/evaluation.md): verl's validation path with vLLM, scored by
#    recipe.disco.reward, table in $EVAL_DIR/results.md. It always evaluates DisCO's six sets (MATH500 among them,
#    written by prepare_data.sh into $DATA_DIR/eval); GSM8K is added beside them (a further column). Greedy
#    decoding, one sample per problem (as MetaMath's evaluation), EVAL_RESPONSE_LENGTH tokens, no reasoning block
#    required (require_think=False).
# The reward grades the last \boxed{...} of an answer: prepare_data.sh writes MetaMathQA's closing
# "The answer is: X" as "The answer is: \boxed{X}", so the trained model boxes its answers.
#
# Every setting is an environment variable (see run_dft.sh and run_dft_7b.sh); extra Hydra overrides go to training:
#   bash recipe/dft/run_dft_metamath.sh
#   SCORE=dft2 bash recipe/dft/run_dft_metamath.sh            # DFT2: tau 0.3, gamma 0.9 unless TAU/GAMMA are set
#   DRY_RUN=1 bash recipe/dft/run_dft_metamath.sh             # compose and check training and evaluation, start nothing
set -euo pipefail

here=$(dirname "${BASH_SOURCE[0]}")
DATA_DIR=${DATA_DIR:-$HOME/data/dft}
export TRAIN_FILES=${TRAIN_FILES:-$DATA_DIR/metamathqa_pool.parquet}
export EXPERIMENT_NAME=${EXPERIMENT_NAME:-mistral-7b-metamath-${SCORE:-dft}}
# set here (not as a Hydra override) so that the evaluation finds the checkpoint
export SAVE_DIR=${SAVE_DIR:-$HOME/dft_runs/$EXPERIMENT_NAME}
EVAL_DIR=${EVAL_DIR:-$SAVE_DIR/eval}
EVAL_RESPONSE_LENGTH=${EVAL_RESPONSE_LENGTH:-1024}
PYTHON=${PYTHON:-python3}

bash "$here/run_dft_7b.sh" "$@"
if (( ${NODE_RANK:-0} != 0 )); then
    exit 0
fi

merged=$EVAL_DIR/merged_model
if [[ "${DRY_RUN:-0}" =~ ^0?$ ]]; then
    checkpoint=$SAVE_DIR/global_step_$(cat "$SAVE_DIR/latest_checkpointed_iteration.txt")
    rm -rf "$merged"
    "$PYTHON" -m verl.model_merger merge --backend fsdp --local_dir "$checkpoint" --target_dir "$merged"
else
    echo "DRY_RUN: not merging the last checkpoint of $SAVE_DIR into $merged"
fi

val_files=""
for name in aime24 aime25 math500 amc23 minerva olympiad_bench gsm8k; do
    val_files+="${val_files:+,}'$DATA_DIR/eval/$name.parquet'"
done
CHECKPOINT="" MODEL_PATH="$merged" DISCO_DATA_DIR="$DATA_DIR/eval" OUTPUT_DIR="$EVAL_DIR" LABEL="$EXPERIMENT_NAME" \
    N_SAMPLES=1 TEMPERATURE=0 TOP_P=1.0 RESPONSE_LENGTH="$EVAL_RESPONSE_LENGTH" NNODES=1 \
    bash "$here/../disco/run_eval.sh" "data.val_files=[$val_files]" \
    ++reward.custom_reward_function.reward_kwargs.require_think=False
