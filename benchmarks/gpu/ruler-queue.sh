#!/usr/bin/env bash
# RULER runs one after another in the background of a GPU session (run-gpu.sh ruler-qwen-bg).
#
#   bash benchmarks/gpu/ruler-queue.sh QUEUE LOG ANSWERS
#
# Each line of QUEUE holds ruler.py's arguments (the model, the answer file and the output
# folder are added); a line that starts with `package=DIR ` runs the vllm_flexprefill found in
# DIR (an older commit's package, for a before/after comparison; a relative DIR is taken from
# QUEUE's folder) in place of this checkout's.
# A run that ends without its "done:" line (an engine that failed to start beside other GPU
# work, say) is tried again, three tries in all: the answer file keeps every finished cell.
set -u
queue="$1" log="$2" answers="$3"
while IFS= read -r line; do
  case "$line" in ""|"#"*) continue ;; esac
  path="$PYTHONPATH"
  case "$line" in
    package=*) dir="${line%% *}"; line="${line#* }"; dir="$(cd "$(dirname "$queue")" && realpath -m "${dir#package=}")"
               if [ ! -f "$dir/vllm_flexprefill/__init__.py" ]; then
                 echo "== skipped (no vllm_flexprefill in $dir): $line" >> "$log"; continue
               fi
               path="$dir:$PYTHONPATH" ;;
  esac
  # -P: the path as ruler.py sees it (no working directory in front)
  PYTHONPATH="$path" python -P -c "import vllm_flexprefill; print('== package:', vllm_flexprefill.__file__)" >> "$log" 2>&1
  for try in 1 2 3; do
    echo "== $(date +%T) try $try: $line" >> "$log"
    eval "PYTHONPATH=\"$path\" python benchmarks/ruler.py --model qwen2.5-coder-1.5b --answers \"$answers\" \
      --out \"$HOME/ruler-out\" $line" 2>&1 | tee -a "$log" > "$log.try"
    grep -q "^done:" "$log.try" && break
  done
done < "$queue"
echo "== $(date +%T) queue finished" >> "$log"
