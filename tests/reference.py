"""What the tests compare against: tolerances and causal attention in float32."""

from __future__ import annotations

import torch

# max |kernel - twin| on identical block lists, by dtype (fp32 math on both sides; the
# kernel rounds P to the input dtype before the PV product, as flash attention does)
ATOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}
# relative error ||sparse - dense|| / ||dense|| allowed on inputs with planted structure
# gamma = 0.95 leaves up to 5 % of the probe rows' attention mass out, which moves outputs by a
# similar share; 0.06 allows that and catches a missed structure (errors of 0.1 and more)
PLANTED_REL_ERR = 0.06


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens, k_lens, scale: float) -> torch.Tensor:
    """Causal attention of packed sequences in float32 (queries are the last q_len of k_len).

    q: [Tq, HQ, D]; k, v: [Tk, H, D]. Returns [Tq, HQ, D] float32.
    """
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    qo = ko = 0
    for ql, kl in zip(q_lens, k_lens):
        qs = q[qo:qo + ql].float().transpose(0, 1)
        ks = k[ko:ko + kl].float().repeat_interleave(group, 1).transpose(0, 1)
        vs = v[ko:ko + kl].float().repeat_interleave(group, 1).transpose(0, 1)
        mask = torch.arange(kl, device=q.device)[None, :] <= torch.arange(kl - ql, kl, device=q.device)[:, None]
        scores = (scale * qs @ ks.transpose(1, 2)).masked_fill(~mask, float("-inf"))
        out[qo:qo + ql] = (torch.softmax(scores, -1) @ vs).transpose(0, 1)
        qo += ql
        ko += kl
    return out
