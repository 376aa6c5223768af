#!/usr/bin/env bash
# Write DFT's training sets and the evaluation sets of run_dft_metamath.sh, then print the commands that build the
# negatives pools (the training files of run_dft_7b.sh and run_dft_metamath.sh).
#
#   bash recipe/dft/prepare_data.sh                          # everything, into ${DATA_DIR:-$HOME/data/dft}
#   DATA_DIR=/data/dft bash recipe/dft/prepare_data.sh --datasets metamathqa gsm8k
#
# Downloads through the Hugging Face `datasets` library (python -m recipe.dft.prepare_data; arguments are passed to
# it, see --help): $DATA_DIR/ultrafeedback_sft.parquet (UltraFeedback's chosen answers, split train_sft),
# $DATA_DIR/metamathqa.parquet (MetaMathQA) and $DATA_DIR/eval/gsm8k.parquet (GSM8K test). Then DisCO's converter
# (python -m recipe.disco.data, docs/data.md) writes its six evaluation sets, MATH500 among them, into
# $DATA_DIR/eval: DisCO's evaluation (recipe/disco/run_eval.sh), which run_dft_metamath.sh runs, reads all six.
# Without internet access the DisCO sets can be read from local copies: DISCO_DATA_SOURCE_DIR=DIR (docs/data.md).
set -euo pipefail

DATA_DIR=${DATA_DIR:-$HOME/data/dft}
# the base model that samples the negatives and scores log pi_ref (the model the training scripts start from)
MODEL_PATH=${MODEL_PATH:-mistralai/Mistral-7B-v0.1}
PYTHON=${PYTHON:-python3}

"$PYTHON" -m recipe.dft.prepare_data --output-dir "$DATA_DIR" "$@"
"$PYTHON" -m recipe.disco.data --output-dir "$DATA_DIR/eval" \
    --datasets aime24 aime25 math500 amc23 minerva olympiad_bench

# The official negatives: vLLM at T 0.7, top-k 50 (the negatives command's defaults); 16 per UltraFeedback prompt
# sampled with the system prompt below, 12 per MetaMathQA prompt; log pi_ref on the plain training prompt
# (dft.ref_prompt=plain). Which prompt the official MetaMathQA negatives were sampled on is not recorded here: the
# command below uses the negatives command's default system prompt (the UltraFeedback one); the official pool's name
# (.._metamath_question_..) suggests the plain question, which --system-prompt '' gives.
cat <<EOF

Next, build the negatives pools (on GPUs), then train. A base model without a chat template (Mistral-7B-v0.1)
needs one: give the negatives command --chat-template T and training model.custom_chat_template=T (the same T).
  $PYTHON -m recipe.dft.negatives --data $DATA_DIR/ultrafeedback_sft.parquet \\
      --out $DATA_DIR/ultrafeedback_pool.parquet --model $MODEL_PATH --num-samples 16 \\
      --system-prompt "You are an unhelpful assistant." --ref-prompt plain --backend vllm
  $PYTHON -m recipe.dft.negatives --data $DATA_DIR/metamathqa.parquet --out $DATA_DIR/metamathqa_pool.parquet \\
      --model $MODEL_PATH --num-samples 12 --ref-prompt plain --backend vllm
  bash recipe/dft/run_dft_7b.sh           # UltraFeedback
  bash recipe/dft/run_dft_metamath.sh     # MetaMathQA, then GSM8K and MATH500
EOF
