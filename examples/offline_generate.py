"""Offline generation with vLLM and the FlexPrefill attention backend.

    python examples/offline_generate.py --model /path/to/model --attention-backend FLEX_PREFILL \
        --additional-config '{"flexprefill": {"gamma": 0.95, "tau": 0.1}}' --prompt-words 3000

Without --model, a tiny random model is written to a temporary folder (no downloads).
Writes the generated token ids and texts as JSON with --json-out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--attention-backend", default="FLEX_PREFILL", help="FLEX_PREFILL, CUSTOM or 'auto' (stock)")
    parser.add_argument("--additional-config", default=None, help="JSON, e.g. '{\"flexprefill\": {\"gamma\": 0.9}}'")
    parser.add_argument("--num-prompts", type=int, default=3)
    parser.add_argument("--prompt-words", type=int, nargs="+", default=[1500, 2500, 3000])
    parser.add_argument("--repeat", type=int, default=1, help="generate the batch again (prefix-cache hits)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--dtype", default=None, help="default: float32 on the CPU, float16 on GPUs")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--distributed-executor-backend", default=None)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--no-chunked-prefill", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile (a faster start)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    import torch
    from vllm import LLM, SamplingParams

    from vllm_flexprefill import stats

    # the tiny random model is one of the benchmarks' synthetic inputs
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    from synthetic import make_tiny_model, random_text

    if args.dtype is None:
        args.dtype = "float16" if torch.cuda.is_available() else "float32"
    model = args.model or make_tiny_model(os.path.join(tempfile.mkdtemp(), "tiny-llama"))
    kwargs = dict(model=model, dtype=args.dtype, max_model_len=args.max_model_len,
                  max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=True,
                  enable_chunked_prefill=not args.no_chunked_prefill, tensor_parallel_size=args.tensor_parallel_size,
                  load_format=args.load_format, enforce_eager=args.enforce_eager, seed=0)
    if args.attention_backend.lower() != "auto":
        kwargs["attention_backend"] = args.attention_backend
    if args.additional_config:
        kwargs["additional_config"] = json.loads(args.additional_config)
    if args.distributed_executor_backend:
        kwargs["distributed_executor_backend"] = args.distributed_executor_backend
    # on the CPU platform this is the share of RAM for the KV cache
    kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization or (0.9 if torch.cuda.is_available() else 0.2)
    llm = LLM(**kwargs)
    words = [args.prompt_words[i % len(args.prompt_words)] for i in range(args.num_prompts)]
    prompts = [random_text(n, seed=100 + i) + " remember the answer" for i, n in enumerate(words)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    rounds = []
    for round_no in range(args.repeat):
        # marks where the requests begin (start-up runs warm-up batches before)
        print(f"round {round_no}: {len(prompts)} prompts", flush=True)
        stats.append({"kind": "mark", "round": round_no})
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        rounds.append({"seconds": time.perf_counter() - start,
                       "prompt_tokens": [len(o.prompt_token_ids) for o in outputs],
                       "cached_tokens": [o.num_cached_tokens or 0 for o in outputs],
                       "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
                       "texts": [o.outputs[0].text for o in outputs]})
    for i, text in enumerate(rounds[-1]["texts"]):
        print(f"prompt {i} ({rounds[-1]['prompt_tokens'][i]} tokens) -> {text!r}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rounds, f)


if __name__ == "__main__":
    main()
