"""Dynamically composable multi-head attention (DC-MHA, Xiao et al. 2024), in the post-only form record #89 uses
on its last layer: heads share a composed local attention pattern.

Per query token t and head h, P_h(t, .) is the softmax of the head's scores over the last `window` keys of t's
document (a local pattern, not the layer's full window). The heads' patterns are mixed, per token, by w1 (RMS-
normalised over heads) into one pattern A(t, .) = sum_h w1_h(t) P_h(t, .), and head h's output gains
w2_h(t) * sum_s A(t, s) v_h(s). Both weights come from the model's MUDD gates; w2 starts at zero, so the layer
starts as plain attention.

Computed in blocks of C >= window queries: block b's keys are blocks b-1 and b, so the cost is O(T * C * H * D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import block_mask_tensor, previous_and_own_block


def dc_correction(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor, w1: torch.Tensor,
                  w2: torch.Tensor, window: int, scale: float | torch.Tensor) -> torch.Tensor:
    """q, k, v: (B, T, H, D) as the layer attends with them; w1, w2: (B, T, H). Returns the (B, T, H, D) term
    to add to the attention output."""
    B, T, H, D = q.shape
    C = max(window, 16)
    n = -(-T // C)
    pad = n * C - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        w1, w2 = (F.pad(t, (0, 0, 0, pad)) for t in (w1, w2))
        segment = F.pad(segment, (0, pad), value=-1)
    qb = q.view(B, n, C, H, D)
    kb, vb = (previous_and_own_block(t.view(B, n, C, H, D)) for t in (k, v))
    mask = block_mask_tensor(segment, C, window)
    scores = torch.einsum("bnqhd,bnkhd->bnhqk", qb.float(), kb.float()) * scale
    probs = scores.masked_fill(~mask.unsqueeze(2), float("-inf")).softmax(dim=-1)  # (B, n, H, C, 2C)
    mix = F.rms_norm(w1.float(), (H,), eps=1e-6).view(B, n, C, H)
    # a weighted sum over 6 heads: as an einsum it ran as a batched matmul of inner size 1 whose backward (an outer
    # product) took 0.9 ms per record micro-batch; written out it is one fused elementwise pass, in fp32
    pattern = (probs * mix.transpose(2, 3).unsqueeze(-1)).sum(dim=2)
    out = torch.einsum("bnqk,bnkhd->bnqhd", pattern, vb.float()) * w2.float().view(B, n, C, H, 1)
    return out.reshape(B, n * C, H, D)[:, :T].to(v.dtype)
