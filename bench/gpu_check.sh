#!/usr/bin/env bash
# The GPU check: engines on a CUDA device with dummy weights, bf16-vs-fp32 agreement, a
# throughput table next to the memory-bandwidth floor, and the flow end to end when Prefect & co.
# are importable. Needs only PyTorch + transformers + sentence-transformers there, and no network.
# Where vllm (a CUDA build) is importable it also times the vLLM engine on the 1B/8B shapes and
# checks it against HF fp32 on the CPU; where it is not, the report says so.
#
#   here (with the venv):   bash bench/gpu_check.sh --prepare      # writes .gpucheck/tokenizers
#   on the GPU machine:     bash bench/gpu_check.sh [--shapes llama-135m llama-1b] [--out FILE]
#   CPU dry run:            bash bench/gpu_check.sh --device cpu --quick
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    exec "${PYTHON:-.venv/bin/python}" bench/gpu_check.py --export-tokenizers .gpucheck/tokenizers
fi

export SHARDWISE_DUMMY_TOKENIZERS="${SHARDWISE_DUMMY_TOKENIZERS:-$PWD/.gpucheck/tokenizers}"
export SHARDWISE_MODEL_CACHE="${SHARDWISE_MODEL_CACHE:-${TMPDIR:-/tmp}/shardwise-gpu-check-models}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Under 8 minutes by construction; the timeout makes sure of it.
exec timeout 470 "${PYTHON:-python3}" bench/gpu_check.py "$@"
