"""Design check for a FlashAttention-3 block-sparse path (not built yet): block-sparse
attention equals FA3's paged varlen causal attention with one "sequence" per (query head,
tile), whose page table lists the pages of the tile's chosen key blocks in order and whose
key count is (count - 1) x block + the diagonal block's keys; FA3 aligns the causal mask to
the bottom right, which is the diagonal block's mask. One FA3 call per KV head would run the
query heads of its group (K/V views of one head, q packed head-major). The reference below
stands in for FA3 (``paged_varlen``)."""
import torch
from vllm_flexprefill.kernels.naive import naive_block_sparse_attention
from vllm_flexprefill.patterns.layout import BatchLayout
from vllm_flexprefill.testing import paged_cache


def test_block_lists_as_paged_sequences_give_block_sparse_attention():
    torch.manual_seed(0)
    BS, PAGE = 32, 8
    PPB = BS // PAGE
    q_lens, k_lens = [300, 77, 64], [700, 77, 500]
    HQ, H, D = 4, 2, 16
    G = HQ // H
    layout = BatchLayout.build(q_lens, k_lens, BS, "cpu")
    q = torch.randn(sum(q_lens), HQ, D)
    k = torch.randn(sum(k_lens), H, D)
    v = torch.randn(sum(k_lens), H, D)
    kc, vc, rows = paged_cache(k, v, k_lens, page=PAGE)
    # page of each key position (rows are element offsets: page = row // stride(0))
    page_of_pos = rows // kc.stride(0)
    NT = layout.num_tiles
    W = layout.max_key_blocks
    idx = torch.full((HQ, NT, W), -1, dtype=torch.int32)
    cnt = torch.zeros(HQ, NT, dtype=torch.int32)
    for h in range(HQ):
        for t in range(NT):
            r = int(layout.tile_row[t])
            chosen = sorted(set(torch.randperm(r)[: max(0, r // 2)].tolist()) | {r}) if r else [0]
            idx[h, t, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            cnt[h, t] = len(chosen)
    want = naive_block_sparse_attention(q, kc, vc, layout, idx, cnt, 0.3, k_rows=rows)

    # the decomposition
    tile_seq, tile_row = layout.tile_seq.tolist(), layout.tile_row.tolist()
    pages = torch.zeros(HQ, NT, W * PPB, dtype=torch.int32)
    used = torch.zeros(HQ, NT, dtype=torch.int32)
    q_start, q_end = [], []
    for t in range(NT):
        s, r = tile_seq[t], tile_row[t]
        ctx = k_lens[s] - q_lens[s]
        a, b = max(r * BS, ctx), min((r + 1) * BS, k_lens[s])
        q_start.append(layout.q_starts[s] + a - ctx)
        q_end.append(layout.q_starts[s] + b - ctx)
        for h in range(HQ):
            n = int(cnt[h, t])
            for i in range(n):
                blk = int(idx[h, t, i])
                for p in range(PPB):
                    pos = min(blk * BS + p * PAGE, k_lens[s] - 1)
                    pages[h, t, i * PPB + p] = page_of_pos[layout.k_starts[s] + pos]
            used[h, t] = (n - 1) * BS + min(BS, k_lens[s] - BS * r)

    def paged_varlen(qe, kview, vview, table, seqused, scale):
        """Reference of FA3's paged varlen causal call for one element: bottom-right causal."""
        n_q, n_k = qe.shape[0], int(seqused)
        kk = kview[table.long()].reshape(-1, D)[:n_k]
        vv = vview[table.long()].reshape(-1, D)[:n_k]
        s_ = scale * qe @ kk.T
        i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
        s_ = s_.masked_fill(j > n_k - n_q + i, float("-inf"))
        return torch.softmax(s_, -1) @ vv

    got = torch.empty_like(q)
    for g in range(H):
        kview, vview = kc[:, :, g], vc[:, :, g]   # [pages, PAGE, D]
        for j in range(G):
            h = g * G + j
            for t in range(NT):
                qe = q[q_start[t]:q_end[t], h]
                got[q_start[t]:q_end[t], h] = paged_varlen(qe, kview, vview, pages[h, t], used[h, t], 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
