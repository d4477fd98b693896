#!/usr/bin/env bash
# Runs ON the GPU machine, from the project root, in every call of the transfer:
#     source .gpu-qwen/setup-qwen.sh
# Keeps the pieces each call carries in $HOME/gpu-qwen (kept while the machine stays warm);
# once every piece listed in SHA256SUMS is there and checks out, joins them into
# $HOME/gpu-qwen/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf, checks the joined file's SHA-256
# (GGUF.sha256) and exports QWEN_GGUF. benchmarks/checkpoints.py converts it on first use.
Q="$HOME/gpu-qwen"; B="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
G="$Q/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf"
mkdir -p "$Q/pieces"
# the gguf reader, which transformers needs to convert the file: carried once (any call)
if [ ! -d "$Q/site/gguf" ] && ls "$B"/gguf-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target "$Q/site" "$B"/gguf-*.whl 2>&1 | grep -v -i warning | tail -1
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$Q/site"
if [ ! -f "$G" ]; then
  cp -n "$B"/piece-* "$Q/pieces/" 2>/dev/null || true
  for f in SHA256SUMS GGUF.sha256; do [ -f "$B/$f" ] && cp "$B/$f" "$Q/pieces/"; done
  want=$(wc -l < "$Q/pieces/SHA256SUMS" 2>/dev/null || echo 18)
  have=$(cd "$Q/pieces" && awk '{print $2}' SHA256SUMS 2>/dev/null | while read -r f; do [ -f "$f" ] && echo "$f"; done | wc -l)
  if [ "$have" -lt "$want" ]; then
    missing=$(cd "$Q/pieces" && awk '{print $2}' SHA256SUMS | while read -r f; do [ -f "$f" ] || echo "$f"; done | head -1)
    echo "gpu-qwen: have $have of $want pieces; carry $missing next"; return 3 2>/dev/null || exit 3
  fi
  if ! (cd "$Q/pieces" && sha256sum --quiet -c SHA256SUMS); then
    echo "gpu-qwen: a piece is damaged (sha256sum names it above); carry it again"; return 4 2>/dev/null || exit 4
  fi
  cat "$Q"/pieces/piece-* > "$G.tmp"
  if [ "$(sha256sum < "$G.tmp" | cut -d' ' -f1)" != "$(cat "$Q/pieces/GGUF.sha256")" ]; then
    echo "gpu-qwen: the joined file's SHA-256 is wrong"; rm -f "$G.tmp"; return 4 2>/dev/null || exit 4
  fi
  mv "$G.tmp" "$G" && rm -f "$Q"/pieces/piece-*
fi
export QWEN_GGUF="$G"
[ -d "$Q/site/gguf" ] || echo "gpu-qwen: carry .gpu-qwen/gguf-*.whl once (converting needs it)"
echo "gpu-qwen: ready ($G)"
