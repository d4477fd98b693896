"""Block-sparse attention through FlashAttention-3, an experiment: each (query head, query
tile) is one paged varlen "sequence" whose page table lists the pages of the tile's chosen
key blocks in order, and whose key count is (count - 1) x block + the diagonal block's keys;
FA3's causal mask, aligned to the bottom right, is then the diagonal block's mask. One FA3
call per KV head runs the query heads of its group (their queries packed head-major, the
cache's K/V views of that one head).

Against our Triton kernel on the same lists and the same paged cache (shuffled 16-token
pages), and FA3 dense on that cache; one prompt of N tokens, random lists at 100 / 50 / 10 %
(sink and diagonal always in), and at 10 % with the probe's rows keeping every causal block
(as the method's lists do; our kernel runs them in segments). FA3's calls run one after the
other and on one stream per KV head. The page tables' construction is timed apart. Prints a
line per case and writes fa3_lists.json.

    python benchmarks/fa3_lists.py --shape 32 8 128 --lengths 16384 32768 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch

DENSITIES = (1.0, 0.5, 0.1)


def tile_sequences(block_idx: torch.Tensor, block_cnt: torch.Tensor, tile_row: torch.Tensor, seq_pages: torch.Tensor,
                   k_len: int, block_size: int, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The FA3 sequences of one prompt's lists.

    Args:
        block_idx: [HQ, NT, W] int32 sorted key-block ids (-1 padded); block_cnt: [HQ, NT].
        tile_row: [NT] block row of each tile; seq_pages: [ceil(k_len / page)] page ids of
            the prompt's key positions in order; page divides block_size.
    Returns:
        table [HQ, NT, W * block_size / page] int32: the pages of each tile's blocks in list
        order (past its count: clamped repeats, never read); seqused [HQ, NT] int32: its keys.
    """
    ppb = block_size // page
    pages = seq_pages.long()
    pidx = block_idx.clamp_min(0).long()[..., None] * ppb + torch.arange(ppb, device=block_idx.device)
    table = pages[pidx.clamp_max(pages.numel() - 1)].flatten(2).to(torch.int32)
    diag_keys = (k_len - block_size * tile_row.long()).clamp(max=block_size)
    seqused = ((block_cnt.long() - 1) * block_size + diag_keys[None, :]).to(torch.int32)
    return table, seqused


def group_queries(q: torch.Tensor, g: int, group: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [G * N, 1, D] of KV head g's query heads, head-major, and their cu_seqlens
    [G * NT + 1] int32: one sequence per (head, tile) in the order of ``tile_sequences``."""
    n, _, d = q.shape
    packed = q[:, g * group:(g + 1) * group].transpose(0, 1).reshape(group * n, 1, d)
    starts = torch.arange(0, n, block_size, device=q.device)
    cu = torch.cat([(j * n + starts) for j in range(group)] + [torch.tensor([group * n], device=q.device)])
    return packed, cu.to(torch.int32)


def lists_through(attend, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, table: torch.Tensor,
                  seqused: torch.Tensor, block_size: int, scale: float, out: torch.Tensor,
                  streams: list | None = None) -> torch.Tensor:
    """Block-sparse attention of one prompt as one ``attend`` call per KV head (FA3's paged
    varlen function, or a reference with its arguments); out [N, HQ, D] written. streams: one
    CUDA stream per KV head, so that one head's tail overlaps the others' work."""
    n, hq, d = q.shape
    h = key_cache.shape[2]
    group = hq // h
    nt = table.shape[1]
    main = torch.cuda.current_stream() if streams else None
    for g in range(h):
        if streams:
            streams[g].wait_stream(main)
            torch.cuda.set_stream(streams[g])
        packed, cu = group_queries(q, g, group, block_size)
        res = attend(packed, key_cache[:, :, g:g + 1], value_cache[:, :, g:g + 1], block_size, cu,
                     table.shape[2] * key_cache.shape[1], seqused_k=seqused[g * group:(g + 1) * group].reshape(-1),
                     block_table=table[g * group:(g + 1) * group].reshape(group * nt, -1), softmax_scale=scale,
                     causal=True, fa_version=3)
        out[:, g * group:(g + 1) * group] = res.view(group, n, d).transpose(0, 1)
    if streams:
        torch.cuda.set_stream(main)
        for stream in streams:
            main.wait_stream(stream)
    return out


def reference_paged_varlen(q, k_cache, v_cache, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k, block_table,
                           softmax_scale, causal, fa_version):
    """FA3's paged varlen causal call in plain PyTorch, one sequence at a time (bottom-right
    causal mask, one KV head), for checking ``lists_through`` on the CPU."""
    out = torch.empty_like(q)
    page, d = k_cache.shape[1], k_cache.shape[-1]
    for i in range(cu_seqlens_q.numel() - 1):
        a, b = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        n_k = int(seqused_k[i])
        pages = block_table[i, :-(-n_k // page)].long()
        kk = k_cache[pages].reshape(-1, d)[:n_k].float()
        vv = v_cache[pages].reshape(-1, d)[:n_k].float()
        s = softmax_scale * q[a:b, 0].float() @ kk.T
        rows, cols = torch.arange(b - a)[:, None], torch.arange(n_k)[None, :]
        s = s.masked_fill(cols > n_k - (b - a) + rows, float("-inf"))
        out[a:b, 0] = (torch.softmax(s, -1) @ vv).to(q.dtype)
    return out


def run(hq: int, h: int, d: int, n: int, reps_ms: int, dev: str = "cuda") -> list[dict]:
    import triton.testing

    from vllm.vllm_flash_attn import flash_attn_varlen_func

    from vllm_flexprefill.kernels.block_sparse_attn import block_sparse_attention
    from vllm_flexprefill.kernels.configs import SEGMENT_BLOCKS
    from vllm_flexprefill.patterns.layout import BatchLayout
    from vllm_flexprefill.testing import paged_cache, random_block_lists

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=reps_ms, return_mode="median")

    bs, page, scale = 128, 16, d ** -0.5
    torch.manual_seed(n)
    q = torch.randn(n, hq, d, dtype=torch.bfloat16, device=dev)
    k = torch.randn(n, h, d, dtype=torch.bfloat16, device=dev)
    v = torch.randn(n, h, d, dtype=torch.bfloat16, device=dev)
    key_cache, value_cache, rows = paged_cache(k, v, [n], page=page)
    seq_pages = rows[::page] // key_cache.stride(0)
    layout = BatchLayout.build([n], [n], bs, dev)
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    full_table = seq_pages.to(torch.int32)[None]
    seqused_dense = torch.tensor([n], dtype=torch.int32, device=dev)
    fa3_dense = bench(lambda: flash_attn_varlen_func(q, key_cache, value_cache, n, cu, n, seqused_k=seqused_dense,
                                                     block_table=full_table, softmax_scale=scale, causal=True,
                                                     fa_version=3))
    out, ref = torch.empty_like(q), torch.empty_like(q)
    streams = [torch.cuda.Stream() for _ in range(h)]
    probe_row = (n - min(bs, n)) // bs
    results = []
    # (density, whether the probe's rows keep every causal block, as the method's lists do:
    # their long tiles are what our kernel cuts into segments)
    for density, probe_rows in ((1.0, False), (0.5, False), (0.1, False), (0.1, True)):
        idx, cnt = random_block_lists(layout, hq, density, torch.Generator().manual_seed(1))
        split = None
        if probe_rows:
            for t in range(layout.num_tiles):
                r = int(layout.tile_row[t])
                if r >= probe_row:
                    idx[:, t, :r + 1] = torch.arange(r + 1, dtype=torch.int32, device=dev)
                    cnt[:, t] = r + 1
            split = layout.tail_split([probe_row], SEGMENT_BLOCKS)
        actual = cnt.sum().item() / (layout.causal_blocks() * hq)

        def tables():
            return tile_sequences(idx, cnt, layout.tile_row, seq_pages, n, bs, page)

        table, seqused = tables()

        def ours():
            return block_sparse_attention(q, key_cache, value_cache, layout.cu_seqlens_q, layout.cu_seqlens_k,
                                          layout.tile_seq, layout.tile_row, idx, cnt, bs, scale, out=ref, k_rows=rows,
                                          split=split)

        def fa3_lists():
            return lists_through(flash_attn_varlen_func, q, key_cache, value_cache, table, seqused, bs, scale, out)

        def fa3_lists_streams():
            return lists_through(flash_attn_varlen_func, q, key_cache, value_cache, table, seqused, bs, scale, out,
                                 streams)

        ours()
        fa3_lists_streams()
        torch.cuda.synchronize()
        row = {"HQ": hq, "H": h, "D": d, "N": n, "density": actual, "probe_rows": probe_rows,
               "fa3_dense_ms": fa3_dense, "ours_ms": bench(ours), "fa3_lists_ms": bench(fa3_lists),
               "fa3_lists_streams_ms": bench(fa3_lists_streams), "tables_ms": bench(tables),
               "max_abs_diff": (out.float() - ref.float()).abs().max().item()}
        row["fa3_lists_vs_ours"] = row["ours_ms"] / min(row["fa3_lists_ms"], row["fa3_lists_streams_ms"])
        print(f"N={n} density {actual:.2f}{' (probe rows dense)' if probe_rows else ''}: FA3 dense {fa3_dense:.3f} "
              f"ms, ours {row['ours_ms']:.3f}, FA3 lists {row['fa3_lists_ms']:.3f} / on {h} streams "
              f"{row['fa3_lists_streams_ms']:.3f} (+ tables {row['tables_ms']:.3f}), ours / FA3 lists "
              f"{row['fa3_lists_vs_ours']:.2f}x, max |diff| {row['max_abs_diff']:.4f}", flush=True)
        results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 8, 128], metavar=("HQ", "H", "D"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--reps-ms", type=int, default=200)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    rows = [r for n in args.lengths for r in run(*args.shape, n, args.reps_ms)]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fa3_lists.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
