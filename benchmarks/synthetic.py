"""Synthetic inputs for tests, benchmarks and examples: packed batches with planted
attention structure, random block lists, a shuffled paged cache, random text and tiny
random models (no downloads)."""

from __future__ import annotations

import math

import torch

from vllm_flexprefill.layout.batch import BatchLayout
from vllm_flexprefill.layout.lists import selection_from_mask
from vllm_flexprefill.layout.paged import paged_rows

# peak logit of the planted local window (``planted_inputs``)
LOCAL_PEAK = 8.0


def random_block_lists(
    layout, num_heads: int, density: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sorted key-block lists that always hold the sink and the diagonal.

    Returns block_idx [HQ, L] int32 (laid out as ``layout.tile_list`` says) and block_cnt
    [HQ, NQB] int32.
    """

    nb = layout.max_key_blocks
    rows = layout.tile_row.long().cpu()
    cols = torch.arange(nb)
    causal = cols[None, :] <= rows[:, None]
    pick = torch.rand(num_heads, len(rows), nb, generator=generator) < density
    forced = (cols[None, :] == 0) | (cols[None, :] == rows[:, None])
    mask = causal & (pick | forced)
    cpu = BatchLayout.build(layout.q_lens, layout.k_lens, layout.block_size, "cpu", layout.sparse)
    sel = selection_from_mask(mask, cpu)
    return sel.block_idx.to(layout.tile_row.device), sel.block_cnt.to(layout.tile_row.device)


def planted_inputs(
    q_lens, k_lens, num_heads: int, num_kv_heads: int, head_dim: int, dtype=torch.bfloat16,
    device="cpu", seed: int = 0, needles: int = 6, strength: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed q [Tq, HQ, D], k/v [Tk, H, D] whose attention has planted structure.

    Every head attends to a sink (the first 4 keys) and to a local window (positional
    features with a peak at distance 0). Even kv heads add vertical lines: ``needles``
    keys scattered over different blocks that every query seeks. Odd kv heads add a
    query-specific spike: queries in the last third of each sequence seek one key region
    that earlier queries ignore.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    d = head_dim
    group = num_heads // num_kv_heads
    # logits are scaled by 1 / sqrt(d); write the planted terms in logit units
    unit = math.sqrt(math.sqrt(d))
    n_freq = (d - 8) // 2
    freqs = torch.logspace(math.log10(1 / 16), math.log10(1.5), n_freq, device=device)
    qs, ks, vs = [], [], []
    for ql, kl in zip(q_lens, k_lens):
        # the diffuse background grows with the length; planted logits grow by log(length)
        # so that the structure keeps its share of the attention mass
        boost = 1.0 + max(0.0, math.log(kl / 2048)) / 10.0
        pos = torch.arange(kl, dtype=torch.float32, device=device)
        k = 0.3 * torch.randn(kl, num_kv_heads, d, generator=g, device=device)
        q = 0.3 * torch.randn(kl, num_heads, d, generator=g, device=device)
        v = torch.randn(kl, num_kv_heads, d, generator=g, device=device)
        # local window: the logit gains (LOCAL_PEAK / n_freq) * sum_f cos(w_f (i - j)), LOCAL_PEAK at i == j
        ang = pos[:, None] * freqs[None, :]
        amplitude = unit * math.sqrt(LOCAL_PEAK * boost * strength / n_freq)
        feats = torch.cat([torch.cos(ang), torch.sin(ang)], dim=1) * amplitude
        k[:, :, 8:8 + 2 * n_freq] += feats[:, None, :]
        q[:, :, 8:8 + 2 * n_freq] += feats[:, None, :]
        # sink: the first 4 keys, logit 10 for every query
        k[:4] = 0.0
        k[:4, :, 0] = unit * 2.0
        q[:, :, 0] += unit * 5.0 * boost * strength
        for h in range(num_kv_heads):
            heads = slice(h * group, (h + 1) * group)
            if h % 2 == 0:
                # vertical lines: needles in different blocks, logit 11 for every query
                where = torch.randperm(kl - 8, generator=g, device=device)[:needles] + 4
                # content alone makes a needle: every query sees each with the same logit
                k[where, h] = 0.0
                k[where, h, 1] = unit * 2.0
                q[:, heads, 1] += unit * 5.5 * boost * strength
            else:
                # query-specific spike: 16 keys that only the last third of the queries seek
                lo = int(torch.randint(4, max(5, kl // 2), (1,), generator=g, device=device))
                k[lo:lo + 16, h, 2] += unit * 2.0
                q[2 * kl // 3:, heads, 2] += unit * 5.5 * boost * strength
        qs.append(q[kl - ql:])
        ks.append(k)
        vs.append(v)
    return torch.cat(qs).to(dtype), torch.cat(ks).to(dtype), torch.cat(vs).to(dtype)


# --- tiny random models for end-to-end runs (no downloads) ---------------------------------

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue black white river mountain valley city harbor garden "
         "needle haystack answer question number secret key value remember find the a of to and is in").split()

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")

ARCHITECTURES = {
    # model_type, HF architecture, q/k/v projection bias, extra per-layer norms
    "llama": ("llama", "LlamaForCausalLM", False, ()),
    "yi": ("llama", "LlamaForCausalLM", False, ()),  # Yi checkpoints are Llama-architecture
    "qwen2": ("qwen2", "Qwen2ForCausalLM", True, ()),
    "glm4": ("glm4", "Glm4ForCausalLM", True, ("post_self_attn_layernorm", "post_mlp_layernorm")),
}


def random_text(num_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (num_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx)


def make_tiny_model(path, arch: str = "llama", hidden: int = 256, heads: int = 4, kv_heads: int = 2,
                    layers: int = 2, intermediate: int = 512, max_len: int = 16384, seed: int = 0,
                    local_attention: bool = False) -> str:
    """Writes a random decoder (config.json, safetensors weights, a trained BPE tokenizer).

    head_dim = hidden // heads (64 by default). Weights are scaled so that attention and
    logits are peaked, which keeps greedy decoding stable against rounding. With
    ``local_attention`` every embedding carries a constant component that the query and key
    projections map to one shared vector, so under RoPE each head attends mostly to nearby
    tokens: attention with structure, as trained models have, instead of diffuse attention.
    """
    import json
    import pathlib

    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    model_type, hf_arch, qkv_bias, extra_norms = ARCHITECTURES[arch]
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False)
    tok.train_from_iterator([random_text(2000, s) for s in range(20)], trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": max_len, "chat_template": CHAT_TEMPLATE}))

    head_dim = hidden // heads
    config = {
        "architectures": [hf_arch], "model_type": model_type, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": max_len,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32", "head_dim": head_dim,
        "attention_bias": qkv_bias,
    }
    if arch == "glm4":
        config["partial_rotary_factor"] = 0.5
    if arch == "yi":
        # Yi-9B-200K: Llama architecture with a very large RoPE base for its long context
        config["rope_theta"] = 10000000.0
    (path / "config.json").write_text(json.dumps(config, indent=1))

    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale / math.sqrt(shape[-1])).contiguous()

    embed = torch.randn(vocab, hidden, generator=g)
    if local_attention:
        embed[:, 0] = 8.0
        embed[:, 1] = 0.0
        embed[1, 1] = 12.0  # "<s>": the attention sink
    tensors = {"model.embed_tokens.weight": embed,
               "model.norm.weight": torch.ones(hidden), "lm_head.weight": w(vocab, hidden, scale=4.0)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden, scale=3.0),
            p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden, scale=3.0),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": w(intermediate, hidden),
            p + "mlp.up_proj.weight": w(intermediate, hidden),
            p + "mlp.down_proj.weight": w(hidden, intermediate),
        })
        if local_attention:
            # q = k = the same vector for every token (from the constant component): under
            # RoPE the logit is sum_f |u_f|^2 cos(theta_f (i - j)), peaked at i == j
            for proj, n_heads in (("q_proj", heads), ("k_proj", kv_heads)):
                weight = tensors[p + f"self_attn.{proj}.weight"] * 0.3
                weight[:, 0] = 1.2 / 7.0
                weight[:, 1] = 0.0
                if proj == "k_proj":
                    # the sink's key lines up with every query in the slowest RoPE pair
                    slow = [h * head_dim + d for h in range(n_heads) for d in (head_dim // 2 - 1, head_dim - 1)]
                    weight[slow, 1] = 4.0
                tensors[p + f"self_attn.{proj}.weight"] = weight
        for norm in extra_norms:
            tensors[p + norm + ".weight"] = torch.ones(hidden)
        if qkv_bias:
            tensors[p + "self_attn.q_proj.bias"] = 0.1 * torch.randn(heads * head_dim, generator=g)
            tensors[p + "self_attn.k_proj.bias"] = 0.1 * torch.randn(kv_heads * head_dim, generator=g)
            tensors[p + "self_attn.v_proj.bias"] = 0.1 * torch.randn(kv_heads * head_dim, generator=g)
    save_file(tensors, str(path / "model.safetensors"))
    return str(path)


def paged_cache(keys: torch.Tensor, values: torch.Tensor, k_lens: list[int], page: int = 16, seed: int = 0):
    """keys, values [Tk, H, D] (sequences of ``k_lens`` packed) written to shuffled pages of a
    cache laid out as vLLM's FlashAttention cache ([pages, H, page, 2 * D], read through
    transpose and split), unused slots NaN. Returns the K and V views [pages, page, H, D] and
    each key position's row in them (the kernels' ``k_rows``)."""
    h, d = keys.shape[1], keys.shape[2]
    counts = [-(-n // page) for n in k_lens]
    perm = torch.randperm(sum(counts) + 3, generator=torch.Generator().manual_seed(seed))
    physical = torch.full((sum(counts) + 3, h, page, 2 * d), float("nan"), dtype=keys.dtype, device=keys.device)
    key_cache, value_cache = physical.transpose(1, 2).split(d, dim=-1)
    pages, offsets, used = [], [], 0
    for n, c in zip(k_lens, counts):
        t = torch.arange(n)
        pages.append(perm[used + t // page])
        offsets.append(t % page)
        used += c
    pages, offsets = torch.cat(pages).to(keys.device), torch.cat(offsets).to(keys.device)
    key_cache[pages, offsets] = keys
    value_cache[pages, offsets] = values
    return key_cache, value_cache, paged_rows(key_cache, pages, offsets)
