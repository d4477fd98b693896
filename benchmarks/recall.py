"""Attention recall of FlexPrefill's block choice on the real model, layer by layer and head by head.

Runs a real model (``--model``: SmolLM2-135M-Instruct or Qwen2.5-Coder-1.5B-Instruct;
transformers, the prompt in one piece) densely on RULER-style
prompts and captures every layer's queries and keys. For each FlexPrefill setting it then
chooses blocks exactly as the backend would on that prompt and reports, per layer and
head: the share of the dense attention mass of all queries inside the chosen blocks
(recall), the same for the final query tile (the question, whose attention produces the
first answer token), and, for needle tasks, whether the final tile keeps the needle's
blocks and how much dense attention it gives them.

    python benchmarks/recall.py --length 14336 --samples 4 --config default='{}' --config g90='{"gamma": 0.9}'
    python benchmarks/recall.py --length 8192 --task niah_multikey --out bench-results/recall.json

With ``--chunk N`` the prompt is analysed as chunked prefill runs it: each chunk of N tokens
chooses its blocks from its own last tile, for its queries against every key before its end,
and each chunk gets its own line (the needle tiles: those among the chunk's queries).

A (layer, head) "reads the needle" when its final tile puts at least --needle-mass of its
dense attention on the needle's blocks; the report counts those whose choice drops them.

Recall is measured in plain PyTorch in float32, in slices of queries (``block_mass``): a
diagnostic, not a kernel.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import torch


def capture_model(name: str, length: int, device: str):
    """The model with an attention function that records (q, k, scale) per layer, and its tokenizer."""
    import checkpoints
    from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    path = checkpoints.checkpoint(name, yarn=length > checkpoints.MODELS[name].native_context)
    captured: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
        # [B, H, N, D] -> [N, H, D], first sequence
        captured.append((query[0].transpose(0, 1).contiguous(), key[0].transpose(0, 1).contiguous(), scaling))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register("capture_qk", capture)
    AttentionMaskInterface.register("capture_qk", sdpa_mask)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="capture_qk").to(device)
    return model, AutoTokenizer.from_pretrained(path), captured


def block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, rows: int = 512) -> torch.Tensor:
    """Dense causal attention mass per (query head, query tile, key block) of one sequence.

    Args:
        q: [q_len, HQ, D] the last q_len queries of the k_len positions; k: [k_len, H, D].
        rows: queries per slice (bounds the [HQ, rows, k_len] float32 score buffer).
    Returns:
        [HQ, R, NB] float32; R query tiles on the block grid (``layout/batch.py``), each
        entry the summed attention probability of the tile's queries in that key block
        (a tile's row sums to its number of queries).
    """
    q_len, hq, _ = q.shape
    k_len, group = k.shape[0], hq // k.shape[1]
    nb = -(-k_len // block_size)
    first_row = (k_len - q_len) // block_size
    out = torch.zeros(hq, nb - first_row, nb, dtype=torch.float32, device=q.device)
    keys = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [HQ, K, D]
    key_pos = torch.arange(k_len, device=q.device)
    key_block = key_pos // block_size
    for start in range(0, q_len, rows):
        pos = torch.arange(k_len - q_len + start, k_len - q_len + min(q_len, start + rows), device=q.device)
        scores = scale * torch.einsum("qhd,hkd->hqk", q[start:start + len(pos)].float(), keys)
        scores = scores.masked_fill(key_pos[None, None, :] > pos[None, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [HQ, rows, K]
        per_block = torch.zeros(hq, len(pos), nb, device=q.device).index_add_(2, key_block, probs)
        tile = pos // block_size - first_row
        out.index_add_(1, tile, per_block)
    return out


def kept_mask(selection: BlockSelection, layout: BatchLayout, seq: int) -> torch.Tensor:
    """[HQ, R, NB] bool: the blocks each (head, tile) of sequence ``seq`` computes."""
    lo, hi = layout.first_tile[seq], layout.first_tile[seq + 1]
    nb = layout.num_key_blocks(seq)
    idx = selection.padded(layout)[:, lo:hi].long()
    listed = torch.arange(idx.shape[-1], device=idx.device) < selection.block_cnt[:, lo:hi, None]
    mask = torch.zeros(idx.shape[0], hi - lo, nb + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(listed & (idx >= 0), idx, nb), True)
    return mask[..., :nb]


def recall(mass: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[HQ] share of the dense attention mass inside the kept blocks (``mass``, ``kept`` [HQ, R, NB])."""
    return (mass * kept).sum((1, 2)) / mass.sum((1, 2)).clamp_min(1e-30)


def needle_blocks(sample, block_size: int, n: int | None = None) -> list[list[int]]:
    """The key blocks of each needle (of those inside the first ``n`` tokens, if given)."""
    return [list(range(a // block_size, (b - 1) // block_size + 1)) for a, b in sample.needle_spans
            if n is None or b <= n]


def analyse(q, k, scale, configs, sample, needle_mass: float) -> dict:
    """Per config (name -> FlexPrefillConfig): recall [HQ], final-tile recall [HQ], the recall
    of the query tiles that hold needle tokens [HQ] (how much of its context the needle itself
    still reads; None without needles among the queries), needle reads and drops of one layer.

    q: [q_len, HQ, D] the last q_len queries of k's positions (a prefill chunk, or the whole
    prompt); k: [k_len, H, D]. The final tile is the queries' last: the question for a whole
    prompt, the chunk's last tile (its probe) for a chunk.
    """
    from vllm_flexprefill.attention import select_blocks
    from vllm_flexprefill.layout.batch import BatchLayout

    q_len, n = q.shape[0], k.shape[0]
    out = {}
    masses = {}
    for name, cfg in configs.items():
        bs = cfg.sparse_block_size
        if bs not in masses:
            masses[bs] = block_mass(q, k, bs, scale)
        mass = masses[bs]
        layout = BatchLayout.build([q_len], [n], bs, q.device)
        selection = select_blocks(q, k, layout, cfg, scale)
        kept = kept_mask(selection, layout, 0)
        final = slice(mass.shape[1] - 1, mass.shape[1])
        needles = needle_blocks(sample, bs, n)
        # tile r holds the queries of key block first + r (the whole prompt: r itself)
        first = (n - q_len) // bs
        tiles = sorted({b - first for blocks in needles for b in blocks if b >= first})
        row = {"recall": recall(mass, kept).tolist(), "final_recall": recall(mass[:, final], kept[:, final]).tolist(),
               "needle_recall": recall(mass[:, tiles], kept[:, tiles]).tolist() if tiles else None,
               "density": selection.density(layout)[0].tolist(), "query_aware": selection.query_aware[0].tolist(),
               "reads": 0, "drops": 0}
        last = mass[:, -1]  # [HQ, NB] the final tile's dense mass per key block
        for blocks in needles:
            share = last[:, blocks].sum(-1) / last.sum(-1)
            reads = share >= needle_mass
            row["reads"] += int(reads.sum())
            row["drops"] += int((reads & ~kept[:, -1, blocks].all(-1)).sum())
        out[name] = row
    return out


def summary(layers: list[dict], name: str) -> str:
    """One setting's numbers over every layer and head of one piece, as one line."""
    rec = [x for layer in layers for x in layer[name]["recall"]]
    fin = [x for layer in layers for x in layer[name]["final_recall"]]
    dens = [x for layer in layers for x in layer[name]["density"]]
    reads = sum(layer[name]["reads"] for layer in layers)
    drops = sum(layer[name]["drops"] for layer in layers)
    worst = min(range(len(fin)), key=fin.__getitem__)
    heads = len(layers[0][name]["recall"])
    held = [x for layer in layers for x in layer[name]["needle_recall"] or []]
    needle = f"  needle-tile recall mean {statistics.mean(held):.3f} min {min(held):.3f}" if held else ""
    return (f"density {statistics.mean(dens):.3f}  recall mean {statistics.mean(rec):.3f} min {min(rec):.3f}  "
            f"final-tile recall mean {statistics.mean(fin):.3f} min {fin[worst]:.3f} "
            f"(layer {worst // heads} head {worst % heads})  needle reads {reads}, dropped {drops}{needle}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "qwen2.5-coder-1.5b"],
                        help="the real model (benchmarks/checkpoints.py; past its native context, its YaRN variant)")
    parser.add_argument("--length", type=int, default=14336)
    parser.add_argument("--task", default="niah_single_number")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--first-sample", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", action="append", default=[], metavar="NAME=JSON",
                        help="FlexPrefill settings to analyse (default: the defaults)")
    parser.add_argument("--needle-mass", type=float, default=0.01)
    parser.add_argument("--prefix", type=int, default=None, metavar="N",
                        help="analyse the first N tokens only, as chunked prefill computes its first chunk "
                             "(the final tile is then the chunk's last, not the question)")
    parser.add_argument("--chunk", type=int, default=None, metavar="N",
                        help="analyse the prompt in prefill chunks of N tokens as vLLM runs them (each "
                             "chunk's queries against every key before its end, its own last tile the probe), "
                             "one line per chunk and setting; default: the prompt in one piece")
    parser.add_argument("--out", default=None, help="JSON file for every number")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, captured = capture_model(args.model, args.length, device)
    from vllm_flexprefill.config import FlexPrefillConfig

    # each prompt sparse, what the settings leave out filled in as the backend fills it for this model
    configs = {}
    for item in args.config or ["default={}"]:
        name, _, settings = item.partition("=")
        configs[name] = FlexPrefillConfig.from_dict({**json.loads(settings), "min_sparse_tokens": 0}).for_depth(
            model.config.num_hidden_layers)
    from ruler_tasks import Generator

    gen = Generator(tokenizer)
    results = []
    for index in range(args.first_sample, args.first_sample + args.samples):
        sample = gen.sample(args.task, args.length, index, args.seed)
        captured.clear()
        with torch.no_grad():
            ids = torch.tensor([sample.token_ids[:args.prefix]], device=device)
            # the last position's logits only: all of them at 32k are 20 GB in float32
            logits = model(ids, logits_to_keep=1).logits[0, -1]
        answer_token = tokenizer.decode([int(logits.argmax())])
        n = int(ids.shape[1])
        # (start, end) of each piece analysed: the prompt, or its prefill chunks
        pieces = [(s, min(n, s + args.chunk)) for s in range(0, n, args.chunk)] if args.chunk else [(0, n)]
        chunks = [{"start": s, "end": e,
                   "layers": [analyse(q[s:e], k[:e], scale, {m: c.for_layer(i) for m, c in configs.items()}, sample,
                                      args.needle_mass) for i, (q, k, scale) in enumerate(captured)]}
                  for s, e in pieces]
        record = {"index": index, "tokens": n, "needles": sample.needle_spans,
                  "first_answer_token": answer_token, "answers": sample.answers}
        results.append({**record, "chunks": chunks} if args.chunk else {**record, "layers": chunks[0]["layers"]})
        print(f"sample {index}: {n} tokens, needles at {sample.needle_spans}, "
              f"dense first token {answer_token!r} (answer {sample.answers[0]!r})", flush=True)
        for chunk in chunks:
            if args.chunk:
                print(f"  chunk {chunk['start']}-{chunk['end']} (its last tile the probe):", flush=True)
            for name in configs:
                print(f"  {name:>10}: {summary(chunk['layers'], name)}", flush=True)
    if args.out:
        resolved = {n: c.to_dict() for n, c in configs.items()}
        pathlib.Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "configs": resolved, "samples": results}))


if __name__ == "__main__":
    main()
