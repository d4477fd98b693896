#!/usr/bin/env bash
# The GPU checks and measurements, in one command per stage, for a machine with vLLM
# 0.26 from ../shared/gpu (source .gpu-bundle/setup.sh first). Output goes to $OUT.
#
#   bash benchmarks/run-gpu.sh model      # converts SmolLM2-135M-Instruct (needs $SMOLLM2_GGUF: setup-model.sh)
#   bash benchmarks/run-gpu.sh qwen-model # converts Qwen2.5-Coder-1.5B-Instruct, native and YaRN to 128k (needs
#                                         # $QWEN_GGUF: benchmarks/gpu/setup-qwen.sh, 20 calls; gguf wheel from
#                                         # ../shared/gpu/make-model-parts.sh)
#   bash benchmarks/run-gpu.sh qwen-model-bg  # the same in the background (a new session, which outlives the
#                                         # call): the call goes on to other work (the GPU tier, say), and
#                                         # whatever needs the model later waits for it (log: ~/qwen-convert.log);
#                                         # on a machine with neither $QWEN_GGUF nor the converted model (a fresh
#                                         # one) every stage that needs Qwen says so and is skipped
#   bash benchmarks/run-gpu.sh ttft-qwen  # TTFT on Qwen 32k-128k: FLASH_ATTN, FLEX_PREFILL default, every chunk
#                                         # sparse (ENGINES, LENGTHS, ROUNDS, RATES as for ttft-real, SETTINGS:
#                                         # NAME={"gamma":0.9} a FLEX_PREFILL engine with those settings;
#                                         # NAME:triton / NAME:fa4 pick the kernel; PACKAGES: NAME=DIR an
#                                         # engine running the package in DIR, e.g. a patched copy;
#                                         # FIRST_ROUND: number the rounds from here, for rounds in
#                                         # several calls: ttft.py --table merges their JSON)
#   bash benchmarks/run-gpu.sh ruler-qwen # RULER-style accuracy on Qwen (RULER_ARGS: lengths, tasks, samples, engines);
#                                         # answers kept in .gpu-ruler/$RULER_FILE.jsonl (default qwen), which
#                                         # comes back in $OUT: carry .gpu-ruler and copy the file back after each
#                                         # call, and the same command goes on where the last one stopped
#   bash benchmarks/run-gpu.sh ruler-qwen-bg  # the RULER runs of benchmarks/gpu/qwen-ruler.queue (RULER_QUEUE), one
#                                         # line of ruler.py arguments each (benchmarks/gpu/ruler-queue.sh), in
#                                         # the background: non-timed work (the GPU tier) can run beside them.
#                                         # It works in ~/gpu-ruler, with a copy of the carried .gpu-ruler (older
#                                         # packages, an answer file $RULER_FILE.jsonl; without one, it goes on
#                                         # from docs/results/ruler-qwen.jsonl): a later call that does not
#                                         # carry .gpu-ruler finds it gone from the checkout (log: ~/ruler-bg.log)
#   bash benchmarks/run-gpu.sh ruler-wait # waits for that queue up to WAIT seconds (560), hands back the answers
#   bash benchmarks/run-gpu.sh ruler-stop # stops the queue (before timed work), hands back the answers
#   bash benchmarks/run-gpu.sh recall-qwen  # recall per layer and head of one 128k prompt (LENGTH, TASK, FIRST:
#                                         # the prompt's index; CHUNK=16384: chunk by chunk as vLLM's prefill
#                                         # runs it), default settings and gamma 0.99 everywhere; not timed,
#                                         # so it may run beside the RULER queue
#   bash benchmarks/run-gpu.sh answer-qwen  # answer_logprob.py: SAMPLES (4) prompts of LENGTH (65536) from FIRST,
#                                         # chunks of CHUNK (16384), gamma 0.95 in every layer, in layers 0-13
#                                         # only, in 14-27 only, and the default (0.99 in 0-13); not timed
#   bash benchmarks/run-gpu.sh ruler-positions  # ruler.py --by-position on docs/results/ruler-qwen.jsonl, the prompts
#                                         # made with the GPU machine's Python, as they were answered (no GPU)
#   bash benchmarks/run-gpu.sh long-document  # examples/long_document.py: ~100k tokens, FLASH_ATTN vs FLEX_PREFILL
#   bash benchmarks/run-gpu.sh tests      # GPU tier (kernels, estimator, long planted inputs); TESTS: which
#                                         # files (default tests/gpu), DIR: the checkout to test (default .)
#   bash benchmarks/run-gpu.sh seg-package  # /tmp/seg: this checkout with the carried .gpu-seg/seg.patch applied
#                                         # (a branch's package beside main's: DIR=/tmp/seg, DIRS, PACKAGES)
#   bash benchmarks/run-gpu.sh kernels    # kernel benchmarks + cost-model rates -> $OUT/kernels.{json,png};
#                                         # launch settings of the block-sparse kernel (paged, as in vLLM)
#                                         # at head_dim 64 and 128
#   bash benchmarks/run-gpu.sh tune-est   # launch settings of the probe and head-selection kernels (SmolLM2 at
#                                         # 32k, Llama at 32k and 128k), best first
#   bash benchmarks/run-gpu.sh ruler      # real-model accuracy, dense vs FLEX_PREFILL -> $OUT/ruler.{json,png}
#                                         # (RULER_ARGS overrides the arguments)
#   bash benchmarks/run-gpu.sh sweep      # forced-sparse accuracy at gamma 0.9 / 0.95 / 0.99, 16k and 32k
#   bash benchmarks/run-gpu.sh ttft-real  # TTFT on the real model 4k-32k: FLASH_ATTN, FLEX_PREFILL default, every
#                                         # chunk sparse; a profile of one 32k prompt per engine (and the
#                                         # host time of FlexPrefill's sparse calls under cProfile); vLLM's
#                                         # default compilation (COMPILATION=eager: without torch.compile);
#                                         # ROUNDS engine processes each, alternating (ENGINES, LENGTHS to choose;
#                                         # RATES='NAME={"estimate_fixed":0.5} ...': engines with other cost rates)
#   bash benchmarks/run-gpu.sh serve      # 64 concurrent mixed-length requests up to 32k through the server,
#                                         # FLEX_PREFILL (default settings) then FLASH_ATTN, compared
#   bash benchmarks/run-gpu.sh profile    # one sparse layer call step by step (SmolLM2 at 32k, Llama at 128k;
#                                         # PROFILE_RUNS: profile_layer.py argument lists split by ';'), with
#                                         # the package of each folder of DIRS (default .) in turn
#   bash benchmarks/run-gpu.sh e2e        # LLM.generate exact mode vs FLASH_ATTN, default settings, the server
#   bash benchmarks/run-gpu.sh tp2        # tensor parallel 2, multiprocessing and Ray executors (2 GPUs;
#                                         # Ray from benchmarks/gpu/ray-parts.sh)
#   bash benchmarks/run-gpu.sh ttft       # TTFT and decode, FLASH_ATTN vs FLEX_10 -> $OUT/ttft.json (LENGTHS)
#   bash benchmarks/run-gpu.sh ttft-default  # the same, FLASH_ATTN vs FLEX_PREFILL default settings (LENGTHS, RATES;
#                                            # SHAPE=qwen2-7b etc. for another shape)
#   bash benchmarks/run-gpu.sh shapes     # the same at 32k for Qwen2-7B, GLM-4-9B, Yi-9B-200K shapes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=".:benchmarks:${PYTHONPATH:-}"
python -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | grep -v "Running pip as" || true
# a stage that needs Qwen on a machine without it would try pip, which has no network here
qwen_absent() {
  [ -f "${QWEN_GGUF:-}" ] || [ -f "${VLLM_FLEXPREFILL_CACHE:-$HOME/.cache/vllm-flexprefill}/Qwen2.5-Coder-1.5B-Instruct/config.json" ] \
    && return 1
  echo "$1: skipped, Qwen is not on this machine (a fresh one?): carry its pieces (setup-qwen.sh) first"
}
for stage in "$@"; do
  case "$stage" in
  qwen-model*|ttft-qwen|ruler-qwen*|recall-qwen|ruler-positions|long-document) qwen_absent "$stage" && continue ;;
  esac
  case "$stage" in
    model) python benchmarks/checkpoints.py smollm2 --yarn 2>&1 | tail -1 ;;
    qwen-model) python benchmarks/checkpoints.py qwen2.5-coder-1.5b --yarn 2>&1 | tail -1 ;;
    qwen-model-bg) setsid nohup python benchmarks/checkpoints.py qwen2.5-coder-1.5b --yarn \
                     > "$HOME/qwen-convert.log" 2>&1 < /dev/null &
                   echo "qwen-model: converting in the background (log: $HOME/qwen-convert.log)" ;;
    # eager by default, every engine alike (COMPILATION=vllm for vLLM's default): with
    # torch.compile a Qwen engine took about 130 s to start on an H200, eager about 65 s; each
    # FlexPrefill engine's "FlexPrefill active" line shows its settings as its process resolved
    # them (layer_gamma as layer ranges)
    ttft-qwen) timeout 570 python benchmarks/ttft.py --shape qwen2.5-coder-1.5b --lengths ${LENGTHS:-32768 65536 131072} \
                 --engines ${ENGINES:-FLASH_ATTN FLEX_PREFILL FLEX_SPARSE} ${RATES:+--rates $RATES} ${SETTINGS:+--settings $SETTINGS} \
                 ${PACKAGES:+--packages $PACKAGES} \
                 --reps 3 --rounds ${ROUNDS:-1} ${FIRST_ROUND:+--first-round $FIRST_ROUND} --compilation ${COMPILATION:-eager} --out "$OUT" 2>&1 \
                 | grep -E "^ +on|failed|Error|GPU busy|what ran|by layer|host:|package:|FlexPrefill active" | tail -36 ;;
    ruler-qwen) answers=".gpu-ruler/${RULER_FILE:-qwen}.jsonl"; mkdir -p .gpu-ruler
                timeout 560 python benchmarks/ruler.py --model qwen2.5-coder-1.5b --out "$OUT" --answers "$answers" \
                  ${RULER_ARGS:---lengths 16384 32768 --samples 100} 2>&1 | tee "$OUT/ruler.log" \
                  | grep -v -E "INFO|WARNING|it/s" | tail -60
                cp "$answers" "$OUT/" 2>/dev/null ;;
    ruler-qwen-bg) g="$HOME/gpu-ruler" answers="$HOME/gpu-ruler/${RULER_FILE:-qwen}.jsonl"
                   mkdir -p "$g" && cp -rn .gpu-ruler/. "$g/" 2>/dev/null
                   [ -f "$answers" ] || cp docs/results/ruler-qwen.jsonl "$answers"
                   cp "${RULER_QUEUE:-benchmarks/gpu/qwen-ruler.queue}" "$g/queue"
                   setsid nohup bash benchmarks/gpu/ruler-queue.sh "$g/queue" "$HOME/ruler-bg.log" "$answers" \
                     > /dev/null 2>&1 < /dev/null &
                   echo $! > "$HOME/ruler-bg.pid"
                   echo "ruler: the queue runs in the background (log: $HOME/ruler-bg.log)" ;;
    ruler-wait|ruler-stop)
                end=$((SECONDS + ${WAIT:-560}))
                while [ "$stage" = ruler-wait ] && kill -0 "$(cat "$HOME/ruler-bg.pid")" 2>/dev/null \
                      && [ $SECONDS -lt $end ]; do sleep 5; done
                # the queue's whole process group: the script, ruler.py and its engine's process
                [ "$stage" = ruler-stop ] && kill -- -"$(cat "$HOME/ruler-bg.pid")" 2>/dev/null && sleep 3
                grep -E "^==|^\[|^ *[0-9]+ (MEAN|density)|cells answered|^done|Error|rror:" "$HOME/ruler-bg.log" | tail -40
                cp "$HOME"/gpu-ruler/*.jsonl "$OUT/" 2>/dev/null ;;
    # the default settings beside gamma 0.99 in every layer, the prompt whole or (CHUNK) chunk by
    # chunk; the mass of every query is computed once per layer and piece, each setting only
    # chooses blocks
    recall-qwen) timeout 590 python benchmarks/recall.py --model qwen2.5-coder-1.5b --length ${LENGTH:-131072} \
                   --samples 1 --first-sample ${FIRST:-0} --task ${TASK:-niah_multikey} \
                   --config default='{}' --config g99='{"gamma": 0.99, "layer_gamma": {}}' ${CHUNK:+--chunk $CHUNK} \
                   --out "$OUT/recall-qwen.json" 2>&1 | grep -v -E "Loading|Warning" | tail -40 ;;
    # which layers move dense's answer: gamma 0.95 sparse everywhere, in layers 0-13 only, in
    # 14-27 only, and the default, gamma 0.99 in 0-13 (every chunk sparse; transformers, bf16)
    answer-qwen) timeout 590 python benchmarks/answer_logprob.py --model qwen2.5-coder-1.5b --length ${LENGTH:-65536} \
                   --chunk ${CHUNK:-16384} --task ${TASK:-niah_multiquery} --first-sample ${FIRST:-0} --samples ${SAMPLES:-4} \
                   --config all='{"gamma": 0.95, "layer_gamma": {}}' \
                   --config early='{"gamma": 0.95, "layer_gamma": {}, "layers": "0-13"}' \
                   --config late='{"gamma": 0.95, "layer_gamma": {}, "layers": "14-27"}' \
                   --config early99='{"gamma": 0.95, "layer_gamma": {"0-13": 0.99}}' \
                   --out "$OUT/answer-qwen.json" 2>&1 | grep -v -E "Loading|Warning|crop" | tail -40 ;;
    # where the answers one engine alone found stand, with the prompts made on this machine's
    # Python (the one that answered them on the GPU): exact for records without answer_starts
    ruler-positions) timeout 300 python benchmarks/ruler.py --table docs/results/ruler-qwen.jsonl \
                       --table-engines ${TABLE_ENGINES:-dense flex g90} --by-position ${CHUNK:-16384} \
                       2>&1 | sed -n '/answers found/,$p' ;;
    long-document) timeout 590 python examples/long_document.py 2>&1 | grep -v -E "INFO|WARNING" | tail -12 ;;
    # each test's name and result in the log as it ends, the slowest ones last: a stage cut
    # by its timeout still says where it was
    tests) (cd "${DIR:-.}" && timeout 560 python -m pytest -v -p no:cacheprovider --durations=12 ${TESTS:-tests/gpu}) 2>&1 \
             | tee "$OUT/gpu-tests.log" | grep -E "passed|failed|FAILED|ERROR|^[0-9.]+s " | tail -20 ;;
    seg-package) rm -rf /tmp/seg && mkdir -p /tmp/seg && tar -c --exclude='./.gpu-*' . | tar -x -C /tmp/seg \
                   && (cd /tmp/seg && patch -p1 -s < "$OLDPWD/.gpu-seg/seg.patch") && echo "seg-package: /tmp/seg" ;;
    kernels) timeout 400 python benchmarks/kernel_bench.py --out "$OUT" 2>&1 | tee "$OUT/kernels.log" | tail -16
             for shape in "9 3 64" "32 8 128"; do
               timeout 120 python benchmarks/tune.py --paged --shape $shape --lengths 32768 2>&1 | tee -a "$OUT/tune.log" \
                 | grep -A4 "^N=" | head -12
             done ;;
    tune-est) for args in "9 3 64 --lengths 32768" "32 8 128 --lengths 32768 131072"; do
                timeout 280 python benchmarks/tune.py --estimation --shape $args 2>&1 | tee -a "$OUT/tune-est.log" \
                  | grep -A4 -E "^(probe|head)"
              done ;;
    ruler) timeout 590 python benchmarks/ruler.py --out "$OUT" ${RULER_ARGS:-} 2>&1 | tee "$OUT/ruler.log" \
             | grep -v -E "INFO|WARNING|it/s" | tail -60 ;;
    e2e) timeout 500 python -m pytest -q tests/e2e -k "tp1 or default_settings or serve" 2>&1 \
           | tee "$OUT/e2e.log" | grep -E "passed|failed|Error" | tail -5 ;;
    tp2) timeout 500 python -m pytest -q -rs tests/e2e/test_generate.py -k "tp2" 2>&1 \
           | tee "$OUT/tp2.log" | grep -E "passed|failed|SKIP|Error" | tail -5 ;;
    ttft) timeout 560 python benchmarks/ttft.py --lengths ${LENGTHS:-8192 32768 65536 131072} --engines FLASH_ATTN FLEX_10 \
            --reps 1 --out "$OUT" 2>&1 | grep -E "^\{|^chunked|^ +on|failed" | tail -14 ;;
    shapes) for shape in qwen2-7b glm-4-9b yi-9b-200k; do
              echo "$shape"
              timeout 190 python benchmarks/ttft.py --shape "$shape" --lengths 32768 --engines FLASH_ATTN FLEX_10 \
                --reps 1 --out "$OUT/$shape" 2>&1 | grep -E "^ +on|failed|Error" | tail -4
            done ;;
    sweep) sparse='"layer_gamma": {}, "min_sparse_tokens": 0, "min_sparse_query_tokens": 0'
           timeout 590 python benchmarks/ruler.py --out "$OUT" --name sweep --lengths 16384 32768 --engines \
             --engine "g90={\"gamma\": 0.9, $sparse}" --engine "g95={$sparse}" --engine "g99={\"gamma\": 0.99, $sparse}" \
             ${SWEEP_ARGS:---samples 50} 2>&1 | tee "$OUT/sweep.log" | grep -v -E "INFO|WARNING|it/s" | tail -40 ;;
    ttft-real) timeout 560 python benchmarks/ttft.py --shape smollm2 --lengths ${LENGTHS:-4096 8192 16384 32768} \
                 --engines ${ENGINES:-FLASH_ATTN FLEX_PREFILL FLEX_SPARSE} ${RATES:+--rates $RATES} ${SETTINGS:+--settings $SETTINGS} \
                 --reps 3 --rounds ${ROUNDS:-2} --profile \
                 --compilation ${COMPILATION:-vllm} \
                 --out "$OUT" 2>&1 \
                 | grep -E "^ +on|failed|Error|GPU busy|what ran|host:|cProfile" | tail -40 ;;
    ttft-default) timeout 560 python benchmarks/ttft.py --shape ${SHAPE:-llama-3.1-8b} --lengths ${LENGTHS:-8192 32768 131072} \
                    --engines FLASH_ATTN FLEX_PREFILL ${RATES:+--rates $RATES} --reps 1 --out "$OUT/default" 2>&1 | grep -E "^ +on|failed|Error|what ran|host:" | tail -14 ;;
    serve) timeout 590 python benchmarks/serve_load.py --requests 64 --lengths 1024 4096 16384 32768 \
             --backends FLEX_PREFILL FLASH_ATTN --out "$OUT/serve.json" ${SERVE_ARGS:-} 2>&1 \
             | grep -v -E "INFO|WARNING" | tail -24 ;;
    profile) IFS=';' read -ra runs <<< "${PROFILE_RUNS:-9 3 64 --new 16384 --keys 32768;32 8 128 --new 8192 --keys 131072}"
             for dir in ${DIRS:-.}; do
               for args in "${runs[@]}"; do
                 echo "package: $dir, profile_layer.py --shape $args" | tee -a "$OUT/profile.log"
                 (cd "$dir" && timeout 200 python benchmarks/profile_layer.py --shape $args) 2>&1 \
                   | tee -a "$OUT/profile.log" | grep -B1 -A${PROFILE_LINES:-22} "^step"
               done
             done ;;
    *) echo "unknown stage $stage (model, qwen-model, qwen-model-bg, tests, seg-package, kernels, tune-est, ruler, ruler-qwen,"
       echo "ruler-qwen-bg, ruler-wait, ruler-stop, sweep, ttft-real,"
       echo "ttft-qwen, recall-qwen, ruler-positions, long-document, serve, profile, e2e, tp2, ttft, ttft-default, shapes)"
       exit 2 ;;
  esac
done
