#!/usr/bin/env bash
# End-to-end check of vlmlab's GPU engines on a small real model, with vlmlab's own commands:
#   1. vLLM offline chat (vLLM's progress / speed line, then vlmlab's figures line)
#   2. vLLM through `vlmlab test-model` (answers, streaming == result, usage == count, multi-image)
#   3. vLLM served by `vlmlab serve`, measured by `vlmlab bench` (TTFT, TPOT, tokens/s)
#   4. transformers on CUDA with bitsandbytes NF4 (--load-in-4bit): chat, then bench
#   5. mistral-inference (Mistral's reference code) on native Pixtral-12B-2409 (PIXTRAL=...): chat and
#      test-model, when `pip install 'vlmlab[mistral]'` is there (a gated repo: HF_TOKEN, ~25 GB bf16)
# Each chat prints: image tokens, prompt tokens, load time, TTFT, decode tok/s, peak memory.
#
# Needs an NVIDIA GPU and:  pip install -e '.[hf,server,vllm]' bitsandbytes
# The model comes from the Hugging Face hub (or HF_HOME's cache).
#
# Usage: scripts/gpu_smoke.sh [MODEL] [IMAGE] [OUT_DIR]
#   MODEL   default Qwen/Qwen2-VL-2B-Instruct (any model vLLM and transformers both serve)
#   IMAGE   default: the packaged nano sample color.png
#   OUT_DIR default: gpu-smoke-out (bench JSON)
set -euo pipefail

MODEL=${1:-Qwen/Qwen2-VL-2B-Instruct}
IMAGE=${2:-$(python -c 'import pathlib, vlmlab.nano as n; print(pathlib.Path(n.__file__).parent / "samples" / "color.png")')}
OUT=${3:-gpu-smoke-out}
QUESTION="Describe this image in one sentence."
BENCH=(--num-requests 32 --concurrency 1,8 --image-size 1024x768 --max-tokens 64 --ignore-eos --no-plots)
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c 'import vllm; print("vllm", vllm.__version__)' || { echo "vLLM is not installed: pip install 'vlmlab[vllm]'"; exit 1; }

step "vLLM, offline LLM.chat: $MODEL"
vlmlab chat --engine vllm --model "$MODEL" --image "$IMAGE" --max-tokens 64 "$QUESTION"

step "vLLM, vlmlab test-model"
vlmlab test-model "$MODEL" --engine vllm --max-tokens 16

step "vLLM, structured outputs (--json-schema) and a served request with logprobs and a schema"
printf '%s' '{"type":"object","properties":{"colour":{"type":"string","maxLength":20}},"required":["colour"],"additionalProperties":false}' > "$OUT/schema.json"
vlmlab chat --engine vllm --model "$MODEL" --image "$IMAGE" --max-tokens 64 --json-schema "$OUT/schema.json" "What is the main colour?"

step "vLLM, served and benchmarked (async engine, streaming)"
vlmlab bench --model "$MODEL" --serve-arg=--engine=vllm "${BENCH[@]}" -o "$OUT/bench-vllm.json"

if python -c 'import bitsandbytes' 2>/dev/null; then
  step "transformers on CUDA, bitsandbytes NF4 (--load-in-4bit)"
  vlmlab chat --engine hf --device cuda --load-in-4bit --model "$MODEL" --image "$IMAGE" --max-tokens 64 "$QUESTION"
  step "transformers on CUDA, bf16 (the same question, for comparison)"
  vlmlab chat --engine hf --device cuda --model "$MODEL" --image "$IMAGE" --max-tokens 64 "$QUESTION"
  step "transformers on CUDA NF4, served and benchmarked"
  vlmlab bench --model "$MODEL" --serve-arg=--device=cuda --serve-arg=--load-in-4bit "${BENCH[@]}" -o "$OUT/bench-hf-nf4.json"
else
  echo "bitsandbytes is not installed (pip install bitsandbytes): skipping the hf NF4 steps"
fi

if python -c 'import mistral_inference' 2>/dev/null; then
  PIXTRAL=${PIXTRAL:-mistralai/Pixtral-12B-2409}
  step "mistral-inference (reference code), native checkpoint: $PIXTRAL"
  vlmlab chat --engine mistral --model "$PIXTRAL" --image "$IMAGE" --max-tokens 64 "$QUESTION"
  step "mistral-inference, vlmlab test-model"
  vlmlab test-model "$PIXTRAL" --engine mistral --max-tokens 16
else
  echo "mistral-inference is not installed (pip install 'vlmlab[mistral]'): skipping the mistral steps"
fi

if [[ "${FP8:-0}" == 1 ]]; then  # Ada / Hopper GPUs
  step "vLLM with FP8 weights (--quantization fp8)"
  vlmlab chat --engine vllm --quantization fp8 --model "$MODEL" --image "$IMAGE" --max-tokens 64 "$QUESTION"
fi
printf '\nbench results: %s\n' "$OUT"
