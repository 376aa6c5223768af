#!/usr/bin/env bash
# Write the DeepScaleR training set and the six DisCO evaluation sets as verl parquet files.
#
#   bash recipe/disco/prepare_data.sh                      # download into ${DISCO_DATA_DIR:-$HOME/data/disco}
#   bash recipe/disco/prepare_data.sh --from-dir /copies   # no internet: read local copies of the sources
#   bash recipe/disco/prepare_data.sh --datasets aime24 aime25 math500 amc23 minerva olympiad_bench
#
# Arguments go to `python -m recipe.disco.data` (see `--help`); sources, file names and checks: docs/data.md.
set -euo pipefail

exec "${PYTHON:-python}" -m recipe.disco.data "$@"
