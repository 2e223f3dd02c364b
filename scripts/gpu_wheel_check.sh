#!/usr/bin/env bash
# The built wheel on a GPU machine whose Python is not the lock's: a CUDA image with its own
# Python, torch and transformers and no network (the project's device machine). vlmlab and the
# few packages that image lacks come as wheels in WHEELS and are installed with --no-deps; then
# `vlmlab env`, `vlmlab chat` on nano on CUDA and on the CPU, and `vlmlab bench` of nano served
# on each. (scripts/gpu_smoke.sh, the vLLM check, needs vLLM and a hub model: not on such a box.)
#
# Usage: scripts/gpu_wheel_check.sh WHEELS [OUT_DIR]
#   WHEELS  folder with dist/vlmlab-*.whl and, for that Python, the wheels the image lacks or has
#           too old (pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d WHEELS,
#           at the lock's versions); nano needs transformers>=5.18, which brings huggingface-hub 2,
#           kernels and httpx2 with it
set -uo pipefail
WHEELS=$(realpath "${1:?folder of wheels}")
OUT=$(realpath -m "${2:-gpu-wheel-out}")
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
step() { printf '\n== %s\n' "$*"; }

python3 -m pip install -q --no-index --no-deps --force-reinstall "$WHEELS"/*.whl || exit 1
python3 -m pip check | grep -iE "^(vlmlab|transformers|huggingface)" || true
cd "$(mktemp -d)"  # nothing of a source tree on the path: the installed wheel only
step "version and environment"
vlmlab --version
vlmlab env
IMAGE=$(python3 -c 'import vlmlab.nano as n; print(n.checkpoint_path().parent / "samples" / "red_square.png")')
for device in cuda cpu; do
  step "chat, nano on $device"
  vlmlab chat --device "$device" --image "$IMAGE" --max-tokens 16 "What colour is the shape?"
done
BENCH=(--num-requests 64 --concurrency 1,16 --image-size 640x480 --max-tokens 64 --ignore-eos --no-plots)
for device in cuda cpu; do
  step "bench, nano served on $device"
  vlmlab bench --model nano "--serve-arg=--device=$device" "${BENCH[@]}" -o "$OUT/bench-nano-$device.json"
done
