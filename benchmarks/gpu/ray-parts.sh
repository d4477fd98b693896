#!/usr/bin/env bash
# Ray for the GPU test machine, in parts that travel one per call (the wheel is ~79 MB,
# over one call's limit). Run here, from the project root:
#
#     bash benchmarks/gpu/ray-parts.sh                # -> .gpu-bundle/ray-part-aa, ray-part-ab
#
# then, after the two vLLM bundle calls, carry one Ray part per call (each call may carry
# 64 MiB in all), and on the GPU machine:
#
#     mkdir -p $HOME/gpu-env/ray && cp .gpu-bundle/ray-part-* $HOME/gpu-env/ray/
#     cat $HOME/gpu-env/ray/ray-part-* > /tmp/ray.whl && python -m pip install -q --no-deps \
#         --target $HOME/gpu-env/site /tmp/ray.whl      # once both parts are there
set -euo pipefail
OUT=.gpu-bundle
VERSION="${RAY_VERSION:-2.60.0}"
mkdir -p "$OUT"
tmp="$(mktemp -d)"
python3 -m pip download -q "ray==$VERSION" --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d "$tmp"
rm -f "$OUT"/ray-part-*
split -b 45M "$tmp"/ray-*.whl "$OUT/ray-part-"
rm -rf "$tmp"
ls -la "$OUT"/ray-part-*
