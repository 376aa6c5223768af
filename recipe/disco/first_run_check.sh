#!/usr/bin/env bash
# The first run on a GPU node, before a real one: two DisCO steps at learning rate 0 with a small validation (64
# MATH500 questions x 4 answers), then PASS or FAIL for each item of recipe/disco/first_run.py (dummy weights, rollout
# vs actor log-probs, the trust region at rest, mixed questions, answers found, peak memory). Everything else is the
# launch script's, with its environment variables and Hydra overrides:
#   bash recipe/disco/first_run_check.sh
#   SCRIPT=run_disco_7b.sh NGPUS_PER_NODE=4 bash recipe/disco/first_run_check.sh actor_rollout_ref.rollout.name=sglang
set -euo pipefail

here=$(dirname "${BASH_SOURCE[0]}")
SCRIPT=${SCRIPT:-run_disco_1.5b.sh}
PYTHON=${PYTHON:-python3}
DISCO_DATA_DIR=${DISCO_DATA_DIR:-$HOME/data/disco}
export VAL_FILES=${VAL_FILES:-[$DISCO_DATA_DIR/math500.parquet]}
export EXPERIMENT_NAME=${EXPERIMENT_NAME:-first-run-check}
export OUTPUT_DIR=${OUTPUT_DIR:-$HOME/disco_runs/$EXPERIMENT_NAME}
export VERL_FILE_LOGGER_PATH=$OUTPUT_DIR/metrics.jsonl
export DELTA=${DELTA:-1e-4}

mapfile -t check < <("$PYTHON" -m recipe.disco.first_run --overrides)
bash "$here/$SCRIPT" "${check[@]}" "$@"
if [[ "${DRY_RUN:-0}" =~ ^0?$ ]]; then
    "$PYTHON" -m recipe.disco.first_run "$VERL_FILE_LOGGER_PATH" --delta "$DELTA"
fi
