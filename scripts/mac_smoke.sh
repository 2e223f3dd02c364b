#!/usr/bin/env bash
# End-to-end check of vlmlab's MLX engine on Apple Silicon, with vlmlab's own commands:
#   1. `vlmlab chat --engine mlx` (answer, then image tokens, prompt tokens, load time, TTFT,
#      decode tok/s and peak memory as mlx-vlm measured them)
#   2. `vlmlab test-model --engine mlx` (answers, streaming == result, usage == count, multi-image)
#   3. `vlmlab bench` against `vlmlab serve --engine mlx` (TTFT, TPOT, tokens/s)
#   4. the same question on the transformers engine (mps), for comparison
#
# Needs an M-series Mac and:  pip install -e '.[hf,server,mlx]'
# The INT4 checkpoint comes from the Hugging Face hub (or HF_HOME's cache).
#
# Usage: scripts/mac_smoke.sh [MODEL] [IMAGE] [OUT_DIR]
#   MODEL   default mlx-community/Qwen2-VL-2B-Instruct-4bit (a hub id such as
#           Qwen/Qwen2-VL-2B-Instruct loads its INT4 conversion too)
set -euo pipefail

MODEL=${1:-mlx-community/Qwen2-VL-2B-Instruct-4bit}
IMAGE=${2:-$(python -c 'import pathlib, vlmlab.nano as n; print(pathlib.Path(n.__file__).parent / "samples" / "color.png")')}
OUT=${3:-mac-smoke-out}
QUESTION="Describe this image in one sentence."
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

[[ "$(uname -s)/$(uname -m)" == "Darwin/arm64" ]] || { echo "MLX needs Apple Silicon (this is $(uname -s) $(uname -m))"; exit 1; }
python -c 'import mlx_vlm; print("mlx-vlm", mlx_vlm.__version__)' || { echo "mlx-vlm is not installed: pip install 'vlmlab[mlx]'"; exit 1; }
sysctl -n machdep.cpu.brand_string hw.memsize

step "MLX chat: $MODEL"
vlmlab chat --engine mlx --model "$MODEL" --image "$IMAGE" --max-tokens 64 "$QUESTION"

step "MLX, vlmlab test-model"
vlmlab test-model "$MODEL" --engine mlx --max-tokens 16

step "MLX, served and benchmarked (one generation at a time)"
vlmlab bench --model "$MODEL" --serve-arg=--engine=mlx --num-requests 8 --concurrency 1 --image-size 1024x768 \
  --max-tokens 64 --ignore-eos --no-plots -o "$OUT/bench-mlx.json"

if [[ "${HF_COMPARE:-1}" == 1 ]]; then
  step "transformers on mps (bf16), the same question"
  vlmlab chat --engine hf --device mps --dtype bf16 --model Qwen/Qwen2-VL-2B-Instruct --image "$IMAGE" --max-tokens 64 "$QUESTION"
fi
printf '\nbench results: %s\n' "$OUT"
