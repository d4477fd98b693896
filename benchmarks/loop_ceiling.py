"""How fast a plain causal attention loop runs in Triton on this GPU, by how it reads K and V.

The block-sparse kernel walks a list of key blocks; this benchmark separates what that
costs from what Triton's loop reaches at all. One program per (query head, 128-query tile),
full density, GQA, bf16, the online softmax of ``kernels/block_sparse_attn.py``. K and V
are read

  contiguous    by pointers, block after block;
  ids           by pointers, each block's id read from a list in the iteration that uses it;
  ids-ahead     by pointers, each id read one block ahead;
  tma           through TMA tensor descriptors, block after block;
  tma-ids       through descriptors, each id read in its iteration;
  tma-ids-ahead through descriptors, each id read one block ahead;

against cuDNN SDPA in the same process, each output checked against cuDNN's. Prints a
table per shape and writes JSON.

    python benchmarks/loop_ceiling.py --out bench-results     # 32k tokens, head_dim 128 and 64
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
import triton
import triton.language as tl
import triton.testing

VARIANTS = ("contiguous", "ids", "ids-ahead", "tma", "tma-ids", "tma-ids-ahead")
# (BLOCK_N, num_warps, num_stages) tried per head_dim
SETTINGS = {
    128: [(128, 8, 2), (128, 8, 3), (64, 8, 3), (64, 4, 3)],
    64: [(64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3), (128, 8, 3)],
}
BM = 128


@triton.jit
def _update(b_q, b_k, b_v, b_m, b_l, b_acc, scale_log2, o_m, o_n, MASK: tl.constexpr):
    """One [BLOCK_N, D] K/V tile: the online-softmax update of the [BM] maximum and sum and
    the [BM, D] accumulator (causal mask where MASK)."""
    b_s = tl.dot(b_q, tl.trans(b_k))
    if MASK:
        b_s = tl.where(o_m[:, None] >= o_n[None, :], b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1) * scale_log2)
    b_p = tl.exp2(b_s * scale_log2 - b_m_new[:, None])
    b_alpha = tl.exp2(b_m - b_m_new)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None])
    return b_m_new, b_l, b_acc


@triton.jit
def _tile(q, i_t, i_h, n, stride_qt, stride_qh, D: tl.constexpr):
    """The tile's [BM] positions, [BM, D] queries (zeros past n) and empty softmax state."""
    o_m = i_t * 128 + tl.arange(0, 128)
    o_d = tl.arange(0, D)
    b_q = tl.load(q + o_m[:, None].to(tl.int64) * stride_qt + i_h * stride_qh + o_d[None, :],
                  mask=o_m[:, None] < n, other=0.0)
    return o_m, o_d, b_q, tl.full([128], float("-inf"), tl.float32), tl.zeros([128], tl.float32), \
        tl.zeros([128, D], tl.float32)


@triton.jit
def _read(p_k, p_v, desc_k, desc_v, i_c, col, o_n, stride_kt, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """The [BLOCK_N, D] K and V tiles of key block i_c (by pointers, or TMA descriptors)."""
    if TMA:
        return desc_k.load([i_c * BLOCK_N, col]), desc_v.load([i_c * BLOCK_N, col])
    rows = (i_c * BLOCK_N + o_n).to(tl.int64) * stride_kt
    return tl.load(p_k + rows[:, None]), tl.load(p_v + rows[:, None])


@triton.jit
def loop_kernel(q, k, v, desc_k, desc_v, o, ids, n, scale_log2, stride_qt, stride_qh, stride_kt, stride_kh,
                HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, IDS: tl.constexpr,
                TMA: tl.constexpr):
    """One (head, 128-query tile) program. IDS 0: blocks in order; 1: each BLOCK_N-key block's id
    read in its iteration; 2: read a block ahead. TMA: K/V through descriptors of [T, H * D]."""
    pid = tl.program_id(0)
    i_t = tl.cdiv(n, 128) - 1 - pid // HQ  # the longest rows first
    i_h = pid % HQ
    o_m, o_d, b_q, b_m, b_l, b_acc = _tile(q, i_t, i_h, n, stride_qt, stride_qh, D)
    o_n = tl.arange(0, BLOCK_N)
    col = (i_h // GROUP) * D
    p_k = k + (i_h // GROUP) * stride_kh + o_d[None, :]
    p_v = v + (i_h // GROUP) * stride_kh + o_d[None, :]
    n_full = i_t * 128 // BLOCK_N  # blocks wholly before the tile's first row
    if IDS == 2:
        i_c = tl.load(ids)
        for i_b in range(n_full):
            i_next = tl.load(ids + i_b + 1)
            b_k, b_v = _read(p_k, p_v, desc_k, desc_v, i_c, col, o_n, stride_kt, BLOCK_N, TMA)
            b_m, b_l, b_acc = _update(b_q, b_k, b_v, b_m, b_l, b_acc, scale_log2, o_m, o_n, False)
            i_c = i_next
    else:
        for i_b in range(n_full):
            if IDS == 1:
                i_c = tl.load(ids + i_b)
            else:
                i_c = i_b
            b_k, b_v = _read(p_k, p_v, desc_k, desc_v, i_c, col, o_n, stride_kt, BLOCK_N, TMA)
            b_m, b_l, b_acc = _update(b_q, b_k, b_v, b_m, b_l, b_acc, scale_log2, o_m, o_n, False)
    for i_b in range(n_full, n_full + 128 // BLOCK_N):  # the diagonal, masked
        o_j = i_b * BLOCK_N + o_n
        if TMA:  # rows past n read as zeros
            b_k, b_v = _read(p_k, p_v, desc_k, desc_v, i_b, col, o_n, stride_kt, BLOCK_N, TMA)
        else:
            rows = o_j.to(tl.int64) * stride_kt
            b_k = tl.load(p_k + rows[:, None], mask=o_j[:, None] < n, other=0.0)
            b_v = tl.load(p_v + rows[:, None], mask=o_j[:, None] < n, other=0.0)
        b_m, b_l, b_acc = _update(b_q, b_k, b_v, b_m, b_l, b_acc, scale_log2, o_m, o_j, True)
    tl.store(o + o_m[:, None].to(tl.int64) * stride_qt + i_h * stride_qh + o_d[None, :],
             (b_acc / b_l[:, None]).to(o.dtype.element_ty), mask=o_m[:, None] < n)


def loop_attention(q, k, v, variant: str, block_n: int, num_warps: int, num_stages: int) -> torch.Tensor:
    """Causal attention of q [N, HQ, D] over k, v [N, H, D] (contiguous) by one of VARIANTS.
    The id variants read the identity list: the same blocks as "contiguous", through a list."""
    n, hq, d = q.shape
    h = k.shape[1]
    out = torch.full_like(q, float("nan"))
    ids = torch.arange(triton.cdiv(n, block_n) + 1, dtype=torch.int32, device=q.device)
    mode = 2 if variant.endswith("ids-ahead") else 1 if variant.endswith("ids") else 0
    common = dict(HQ=hq, GROUP=hq // h, D=d, BLOCK_N=block_n, IDS=mode, num_warps=num_warps, num_stages=num_stages)
    grid = (hq * triton.cdiv(n, BM),)
    desc_k, desc_v = k, v  # unused without TMA
    if variant.startswith("tma"):
        from triton.tools.tensor_descriptor import TensorDescriptor
        k2, v2 = k.view(n, h * d), v.view(n, h * d)
        desc_k = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [block_n, d])
        desc_v = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [block_n, d])
    loop_kernel[grid](q, k, v, desc_k, desc_v, out, ids, n, d ** -0.5 * 1.4426950408889634, q.stride(0), q.stride(1),
                      k.stride(0), k.stride(1), TMA=variant.startswith("tma"), **common)
    return out


def run(hq: int, h: int, d: int, n: int, reps_ms: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    q = torch.randn(n, hq, d, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(n, h, d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(n, h, d, dtype=torch.bfloat16, device="cuda")
    expanded = (q, k.repeat_interleave(hq // h, 1), v.repeat_interleave(hq // h, 1))
    qs, ks, vs = (t.transpose(0, 1)[None] for t in expanded)

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

    ref = cudnn()[0].transpose(0, 1).float()
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=reps_ms, return_mode="median")  # noqa: E731
    base = bench(cudnn)
    print(f"\nHQ {hq} H {h} D {d} N {n}: cuDNN {base:.3f} ms")
    rows = []
    for variant in VARIANTS:
        for block_n, warps, stages in SETTINGS[d]:
            row = dict(HQ=hq, H=h, D=d, N=n, variant=variant, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
                       cudnn_ms=base)
            fn = lambda: loop_attention(q, k, v, variant, block_n, warps, stages)  # noqa: E731
            try:
                row["max_err"] = (fn().float() - ref).abs().max().item()
                row["ms"] = bench(fn)
            except Exception as e:  # noqa: BLE001 - a setting Triton cannot compile is a result too
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            if "ms" in row:
                ok = "" if row["max_err"] < 0.02 else "  OUTPUT DIFFERS FROM cuDNN"
                print(f"{variant:14s} BLOCK_N {block_n:3d} warps {warps} stages {stages}  {row['ms']:8.3f} ms  "
                      f"cuDNN/this {base / row['ms']:.2f}  max err {row['max_err']:.3g}{ok}")
            else:
                print(f"{variant:14s} BLOCK_N {block_n:3d} warps {warps} stages {stages}  {row['error']}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--reps-ms", type=int, default=150)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results"))
    args = parser.parse_args()
    # descriptors made on the device need scratch memory from an allocator
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    rows = run(32, 8, 128, args.length, args.reps_ms) + run(9, 3, 64, args.length, args.reps_ms)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    (args.out / "loop_ceiling.json").write_text(json.dumps(dict(env=env, results=rows), indent=1))


if __name__ == "__main__":
    main()
