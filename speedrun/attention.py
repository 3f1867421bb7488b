"""Sliding-window attention over packed documents: the mask maths, and the portable SDPA kernel.

Tokens of a row are packed documents; `segment` gives each token its document (or max_seq_len chunk) id.
Query i may attend key j when j <= i, i - j < window and segment[j] == segment[i]. The kernel cuts the
row into blocks of `window` queries; each block attends to itself and the block before, so the cost is
O(T * window) instead of O(T^2), and the result equals full masked attention exactly.

On the GPU the same rule runs through FlexAttention: `sliding_block_mask` turns the segments into a
BlockMask (per 128-token block of queries, the key blocks that are fully visible, and the partly visible
ones that need the element mask), built from per-block segment bounds in a few small tensor ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_ids(tokens: torch.Tensor, bos_id: int, max_seq_len: int) -> torch.Tensor:
    """Per-token segment id: a new segment at every BOS and every max_seq_len tokens inside a document."""
    B, T = tokens.shape
    is_bos = tokens == bos_id
    doc = torch.cumsum(is_bos.long(), dim=1)
    pos = torch.arange(T, device=tokens.device).expand(B, T)
    doc_start = torch.where(is_bos, pos, torch.zeros_like(pos)).cummax(dim=1).values
    chunk = (pos - doc_start) // max_seq_len
    return doc * (T + 1) + chunk


def allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, q_seg: torch.Tensor, k_seg: torch.Tensor,
            window: int) -> torch.Tensor:
    """The attention rule as a boolean mask (broadcasting over whatever shapes are given)."""
    return (k_pos <= q_pos) & (q_pos - k_pos < window) & (k_seg == q_seg) & (k_pos >= 0)


def previous_and_own_block(t: torch.Tensor) -> torch.Tensor:
    """(B, n, C, ...) blocks -> (B, n, 2C, ...): block b-1 (zeros before the first) beside block b."""
    before = F.pad(t, (0, 0) * (t.dim() - 3) + (0, 0, 1, 0))[:, :-1]
    return torch.cat([before, t], dim=2)


def block_mask_tensor(segment: torch.Tensor, C: int, window: int) -> torch.Tensor:
    """segment (B, n*C) -> (B, n, C, 2C): `allowed` for each block's queries against blocks b-1 and b."""
    B, n = segment.size(0), segment.size(1) // C
    seg = segment.view(B, n, C)
    k_seg = torch.cat([F.pad(seg, (0, 0, 1, 0), value=-2)[:, :-1], seg], dim=2)
    base = torch.arange(n, device=segment.device).view(1, n, 1) * C
    q_pos = base + torch.arange(C, device=segment.device).view(1, 1, C)
    k_pos = base - C + torch.arange(2 * C, device=segment.device).view(1, 1, 2 * C)
    return allowed(q_pos.unsqueeze(-1), k_pos.unsqueeze(-2), seg.unsqueeze(-1), k_seg.unsqueeze(-2), window)


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor,
                       window: int, scale: float | torch.Tensor) -> torch.Tensor:
    """q, k, v: (B, T, H, D); segment: (B, T). Returns (B, T, H, D). A tensor scale multiplies q first
    (SDPA takes only a number, and reading a tensor's value would break a compiled graph)."""
    if isinstance(scale, torch.Tensor):
        q, scale = q * scale.to(q.dtype), 1.0
    B, T, H, D = q.shape
    C = max(1, min(window, T))
    n = -(-T // C)
    pad = n * C - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        segment = F.pad(segment, (0, pad), value=-1)
    # (B, n, C, H, D) blocks; keys/values of block b are blocks b-1 and b.
    qb = q.view(B, n, C, H, D)
    kb, vb = (previous_and_own_block(t.view(B, n, C, H, D)) for t in (k, v))
    mask = block_mask_tensor(segment, C, window)
    out = F.scaled_dot_product_attention(
        qb.reshape(B * n, C, H, D).transpose(1, 2),
        kb.reshape(B * n, 2 * C, H, D).transpose(1, 2),
        vb.reshape(B * n, 2 * C, H, D).transpose(1, 2),
        attn_mask=mask.reshape(B * n, 1, C, 2 * C),
        scale=float(scale),
    )
    out = out.transpose(1, 2).reshape(B, n * C, H, D)
    return out[:, :T]


def sliding_block_mask(segment: torch.Tensor, window: int, paired: bool = False, block: int = 128):
    """FlexAttention BlockMask for `allowed` on one row layout. segment: (B, T), non-decreasing along T.

    paired: the sequence is the paired-head layout (2T positions, token = position // 2, window doubled),
    as in CausalSelfAttention.paired_attention."""
    from torch.nn.attention.flex_attention import BlockMask

    if paired:
        segment, window = segment.repeat_interleave(2, dim=1), 2 * window
    B, T = segment.shape
    if T % block:
        raise ValueError(f"flex attention needs the sequence length ({T}) to be a multiple of {block}")
    n = T // block
    first, last = segment[:, ::block], segment[:, block - 1 :: block]  # segment bounds per block (monotone ids)
    idx = torch.arange(n, device=segment.device)
    d = (idx.view(n, 1) - idx.view(1, n)).unsqueeze(0)  # query block - key block
    # some (q, k) pair of the two blocks is allowed / every pair is allowed
    some = (d >= 0) & (d * block - (block - 1) < window) & (last.unsqueeze(1) >= first.unsqueeze(2))
    every = (d > 0) & (d * block + (block - 1) < window) & (first.unsqueeze(1) == last.unsqueeze(2))
    partial = some & ~every

    def mask_mod(b, h, q, k):
        return (k <= q) & (q - k < window) & (segment[b, q] == segment[b, k])

    # the key blocks of each query block and (for the backward) the query blocks of each key block
    kv_num, kv_idx = ordered_blocks(partial)
    full_num, full_idx = ordered_blocks(every)
    q_num, q_idx = ordered_blocks(partial.transpose(1, 2))
    full_q_num, full_q_idx = ordered_blocks(every.transpose(1, 2))
    return BlockMask(seq_lengths=(T, T), kv_num_blocks=kv_num, kv_indices=kv_idx, full_kv_num_blocks=full_num,
                     full_kv_indices=full_idx, q_num_blocks=q_num, q_indices=q_idx, full_q_num_blocks=full_q_num,
                     full_q_indices=full_q_idx, BLOCK_SIZE=(block, block), mask_mod=mask_mod)


def ordered_blocks(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """m: (B, rows, cols) bool. Per row, the count of True columns and all column indices, the True ones first,
    each part ascending (what a stable descending argsort of m gives, as BlockMask.from_kv_blocks orders them),
    with a head dim of 1 (the same for all heads).

    Computed from a running count instead of a sort: Inductor (torch 2.11) builds an in-graph sort over a row of
    384-768 blocks as one Triton kernel that took 110 s to compile on an H200, once per sequence length, and
    from_kv_blocks sorts again to find the query blocks; here both orders come from cumsum and a scatter."""
    ones = m.to(torch.int32)
    counts = ones.sum(-1, dtype=torch.int32)
    before = ones.cumsum(-1, dtype=torch.int32) - ones  # True columns left of each column
    cols = torch.arange(m.size(-1), device=m.device, dtype=torch.int32)
    slot = torch.where(m, before, counts.unsqueeze(-1) + cols - before)  # a permutation of 0..cols-1 per row
    order = torch.empty_like(slot).scatter_(-1, slot.long(), cols.expand_as(slot).contiguous())
    return counts[:, None].contiguous(), order[:, None].contiguous()


def flex_windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask,
                            scale: float | torch.Tensor) -> torch.Tensor:
    """q, k, v: (B, T, H, D) with `block_mask` from sliding_block_mask; the same result as windowed_attention.
    The scale multiplies q (it may be a tensor: YaRN changes it without recompiling)."""
    from torch.nn.attention.flex_attention import flex_attention

    if isinstance(scale, torch.Tensor):
        scale = scale.to(q.dtype)
    out = flex_attention((q * scale).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                         block_mask=block_mask, scale=1.0)
    return out.transpose(1, 2)


def reference_attention(q, k, v, segment, window, scale):
    """Full T x T masked attention: the definition the fast kernels are checked against."""
    B, T, H, D = q.shape
    pos = torch.arange(T, device=q.device)
    mask = allowed(pos.view(T, 1), pos.view(1, T), segment.unsqueeze(-1), segment.unsqueeze(-2), window)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask.unsqueeze(1), scale=float(scale))
    return out.transpose(1, 2)
