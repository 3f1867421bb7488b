"""Triton kernels for speedrun.qk_kernels: rms norm + half-RoPE of (B, T, H, D) rows, forward and backward.
Imported only where they run (a CUDA machine with Triton).

A program takes ROWS rows (one row: one token's head, D = 2 * HALF values) and holds each as its two halves,
the pairs that RoPE rotates together. Row r is token t = (r // H) % T of batch row b = r // (H * T), head r % H;
the input may be a strided view (a slice of the fused qkv output), the outputs are contiguous. Its position is t,
or 2t + h % 2 on a paired-head layer.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _rows(x_ptr, freq_ptr, rows, T, H, s_b, s_t, s_h,
          ROWS: tl.constexpr, HALF: tl.constexpr, PAIRED: tl.constexpr):
    """Row indices, mask, the input's offsets of both halves, the output's offsets, and cos/sin per pair.
    PAIRED: head h of token t rotates at position 2t + h % 2 (qk_kernels.rope)."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask = (r < rows)[:, None]
    h = r % H
    t = (r // H) % T
    b = r // (H * T)
    j = tl.arange(0, HALF)
    src = (b.to(tl.int64) * s_b + t.to(tl.int64) * s_t + h.to(tl.int64) * s_h)[:, None] + j[None, :]
    dst = r.to(tl.int64)[:, None] * (2 * HALF) + j[None, :]
    if PAIRED:
        pos = 2 * t + h % 2
    else:
        pos = t
    theta = pos.to(tl.float32)[:, None] * tl.load(freq_ptr + j)[None, :]
    return mask, src, dst, libdevice.cos(theta), libdevice.sin(theta)  # precise: theta reaches ~T radians


@triton.jit
def _normed(x_ptr, src, mask, eps, HALF: tl.constexpr):
    x1 = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + src + HALF, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
    return x1 * inv, x2 * inv, inv


@triton.jit
def qk_norm_rope_fwd_kernel(x_ptr, freq_ptr, out_ptr, rows, T, H, s_b, s_t, s_h, eps,
                            ROWS: tl.constexpr, HALF: tl.constexpr, PAIRED: tl.constexpr):
    mask, src, dst, c, s = _rows(x_ptr, freq_ptr, rows, T, H, s_b, s_t, s_h, ROWS, HALF, PAIRED)
    n1, n2, _ = _normed(x_ptr, src, mask, eps, HALF)
    tl.store(out_ptr + dst, (n1 * c + n2 * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + dst + HALF, (n2 * c - n1 * s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def qk_norm_rope_bwd_kernel(x_ptr, freq_ptr, dy_ptr, dx_ptr, rows, T, H, s_b, s_t, s_h, eps,
                            ROWS: tl.constexpr, HALF: tl.constexpr, PAIRED: tl.constexpr):
    mask, src, dst, c, s = _rows(x_ptr, freq_ptr, rows, T, H, s_b, s_t, s_h, ROWS, HALF, PAIRED)
    n1, n2, inv = _normed(x_ptr, src, mask, eps, HALF)
    dy1 = tl.load(dy_ptr + dst, mask=mask, other=0.0).to(tl.float32)
    dy2 = tl.load(dy_ptr + dst + HALF, mask=mask, other=0.0).to(tl.float32)
    dn1 = dy1 * c - dy2 * s  # the rotation's transpose
    dn2 = dy1 * s + dy2 * c
    along = ((tl.sum(dn1 * n1, axis=1) + tl.sum(dn2 * n2, axis=1)) / (2 * HALF))[:, None]
    tl.store(dx_ptr + dst, (inv * (dn1 - n1 * along)).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + dst + HALF, (inv * (dn2 - n2 * along)).to(dx_ptr.dtype.element_ty), mask=mask)
