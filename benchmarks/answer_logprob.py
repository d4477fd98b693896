"""How far sparse prefill moves a real model's answer, and from which layers (transformers).

Runs a prompt chunk by chunk as chunked prefill does (each chunk's queries against every key
before its end), FlexPrefill in the layers a setting names and dense attention in the others,
then reads dense's own greedy answer through the cache it built, teacher-forced and with
dense attention as decode runs: the log-probability of each answer token and whether it is
still the most likely one. RULER counts an answer found or lost; the log-probability moves
with every block left out, so a few prompts say which layers make the loss a setting makes.
Each setting also answers greedily, scored as RULER scores.

    python benchmarks/answer_logprob.py --model qwen2.5-coder-1.5b --length 16384 --chunk 8192 \\
        --task niah_multiquery --first-sample 2 --config all='{"gamma": 0.95}' \\
        --config early='{"gamma": 0.95, "layers": "0-13"}' --config late='{"gamma": 0.95, "layers": "14-27"}'

A setting's JSON holds FlexPrefillConfig fields (every chunk sparse: ``min_sparse_tokens`` 0
unless given) and optionally "layers", the layers that run FlexPrefill ("0-13", "3,5-7";
default: every layer).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch


def parse_layers(text: str) -> frozenset[int]:
    """ "0-13" or "3,5-7" -> the layer indices; a clear error for anything else. Each range
    is read as ``layer_gamma`` reads its keys (``config.layer_ranges``)."""
    from vllm_flexprefill.config import layer_ranges

    layers = set()
    for part in text.split(","):
        try:
            ((first, last, _),) = layer_ranges({part: 1.0})
            if isinstance(first, float):  # a share of the depth ("0%-50%")
                raise ValueError(part)
        except ValueError:
            raise ValueError(f"layers {text!r}: give ranges such as '0-13' or '3,5-7'") from None
        layers.update(range(first, last + 1))
    return frozenset(layers)


def parse_setting(item: str):
    """ "NAME=JSON" -> (name, FlexPrefillConfig, layers or None for every layer)."""
    from vllm_flexprefill.config import FlexPrefillConfig

    name, _, text = item.partition("=")
    values = json.loads(text or "{}")
    layers = values.pop("layers", None)
    cfg = FlexPrefillConfig.from_dict({"min_sparse_tokens": 0, **values})
    return name, cfg, None if layers is None else parse_layers(str(layers))


class SparseLayers:
    """transformers attention that runs FlexPrefill in the chosen layers (``use``) and SDPA
    elsewhere and whenever no setting is in use."""

    name = "flex_prefill_layers"

    def __init__(self):
        self.cfg = None
        self.layers: frozenset[int] | None = None

    def use(self, cfg, layers) -> None:
        """cfg None: dense everywhere; layers None: every layer."""
        self.cfg, self.layers = cfg, layers

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        from vllm_flexprefill.attention import flex_prefill_attention_varlen

        layer = module.layer_idx
        if self.cfg is None or (self.layers is not None and layer not in self.layers):
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        # [1, H, N, D] -> [N, H, D]: one sequence, its queries the last of its keys
        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
        cu_q = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, k.shape[0]], dtype=torch.int32, device=q.device)
        out = flex_prefill_attention_varlen(q, k, v, cu_q, cu_k, config=self.cfg.for_layer(layer),
                                            softmax_scale=scaling)
        return out[None], None


def load(model, attention: SparseLayers):
    """Registers ``attention`` with transformers and switches ``model`` to it."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(attention.name, attention)
    AttentionMaskInterface.register(attention.name, sdpa_mask)
    model.set_attn_implementation(attention.name)
    return model


@torch.no_grad()
def prefill(model, ids: torch.Tensor, chunk: int):
    """The cache of ``ids`` [1, N] built in chunks of ``chunk`` tokens, and the last position's logits [V]."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for start in range(0, ids.shape[1], chunk):
        logits = model(ids[:, start:start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return cache, logits[0, -1]


@torch.no_grad()
def greedy(model, cache, logits: torch.Tensor, max_new_tokens: int, eos: set[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens after a prefill (its cache and last logits), up to an end token, and
    the log-probability of each."""
    out, logp = [], []
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        if token in eos:
            break
        out.append(token)
        logp.append(float(torch.log_softmax(logits.float(), dim=-1)[token]))
        logits = model(torch.tensor([[token]], device=logits.device), past_key_values=cache,
                       use_cache=True).logits[0, -1]
    return out, logp


@torch.no_grad()
def teacher_forced(model, cache, logits: torch.Tensor, answer: list[int]) -> tuple[list[float], list[bool]]:
    """Per answer token: its log-probability and whether it is the most likely token, reading
    the tokens before it (the prompt through ``cache``, whose last logits are ``logits``)."""
    steps = logits[None]
    if len(answer) > 1:
        ids = torch.tensor([answer[:-1]], device=logits.device)
        steps = torch.cat([steps, model(ids, past_key_values=cache, use_cache=True).logits[0]])
    logp = torch.log_softmax(steps.float(), dim=-1)
    target = torch.tensor(answer, device=logits.device)
    return logp[torch.arange(len(answer)), target].tolist(), (steps.argmax(-1) == target).tolist()


def dense_answer(model, attention: SparseLayers, ids: torch.Tensor, chunk: int, max_new_tokens: int,
                 eos: set[int]) -> tuple[list[int], list[float]]:
    """Dense attention's greedy answer to ``ids`` [1, N], prefilled in chunks, and the
    log-probability of each of its tokens."""
    attention.use(None, None)
    return greedy(model, *prefill(model, ids, chunk), max_new_tokens, eos)


def score_setting(model, attention: SparseLayers, ids: torch.Tensor, chunk: int, cfg, layers,
                  answer: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[float], list[bool], list[int]]:
    """The setting's prefill of ``ids`` [1, N]; then, reading its cache densely as decode does,
    ``answer``'s per-token log-probabilities and whether each is the most likely token, and
    the setting's own greedy answer."""
    attention.use(cfg, layers)
    cache, logits = prefill(model, ids, chunk)
    attention.use(None, None)
    logp, top = teacher_forced(model, cache, logits, answer)
    if len(answer) > 1:
        cache.crop(1 - len(answer))  # back to the prompt for the setting's own answer
    return logp, top, greedy(model, cache, logits, max_new_tokens, eos)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "qwen2.5-coder-1.5b"],
                        help="the real model (benchmarks/checkpoints.py; past its native context, its YaRN variant)")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--task", default="niah_multiquery")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--first-sample", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=8192, help="prefill chunk in tokens (vLLM's step)")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=JSON",
                        help="a setting (default: the defaults, every layer)")
    parser.add_argument("--out", default=None, help="JSON file for every number")
    args = parser.parse_args()

    import checkpoints
    from ruler_tasks import Generator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = [parse_setting(item) for item in args.config or ["default={}"]]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = checkpoints.checkpoint(args.model, yarn=args.length > checkpoints.MODELS[args.model].native_context)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    attention = SparseLayers()
    model = load(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device), attention)
    # layer_gamma's shares of the depth as this model's layers, once
    settings = [(name, cfg.for_depth(model.config.num_hidden_layers), layers) for name, cfg, layers in settings]
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = {t for t in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)) if t is not None}
    eos = {x for t in eos for x in (t if isinstance(t, list) else [t])}
    gen = Generator(tokenizer)
    resolved = {name: {**cfg.to_dict(), "layers": sorted(layers) if layers else "all"}
                for name, cfg, layers in settings}
    results = []
    for index in range(args.first_sample, args.first_sample + args.samples):
        sample = gen.sample(args.task, args.length, index, args.seed)
        ids = torch.tensor([sample.token_ids], device=device)
        answer, dense_logp = dense_answer(model, attention, ids, args.chunk, sample.max_new_tokens, eos)
        text = tokenizer.decode(answer)
        row = {"index": index, "tokens": ids.shape[1], "needles": sample.needle_spans, "answers": sample.answers,
               "dense": {"answer": text, "score": sample.score(text), "logprob": sum(dense_logp),
                         "token_logprobs": dense_logp}, "settings": {}}
        print(f"sample {index}: {ids.shape[1]} tokens, needles at {sample.needle_spans}; dense answers "
              f"{text!r} (score {row['dense']['score']:.2f}, {len(answer)} tokens, log-prob "
              f"{sum(dense_logp):.3f}, lowest token {min(dense_logp, default=0.0):.3f})", flush=True)
        for name, cfg, layers in settings:
            logp, top, tokens = score_setting(model, attention, ids, args.chunk, cfg, layers, answer,
                                              sample.max_new_tokens, eos)
            own = tokenizer.decode(tokens)
            row["settings"][name] = {"logprob": sum(logp), "token_logprobs": logp, "top": sum(top),
                                     "answer": own, "score": sample.score(own)}
            print(f"  {name:>8}: dense's answer log-prob {sum(logp):8.3f} (lowest token {min(logp, default=0.0):7.3f}), "
                  f"{sum(top)}/{len(top)} tokens still the most likely; own answer score "
                  f"{sample.score(own):.2f} {own!r}", flush=True)
        results.append(row)
        if args.out:  # after each prompt: a run cut short keeps what it measured
            pathlib.Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "settings": resolved,
                                                          "samples": results}))


if __name__ == "__main__":
    main()
