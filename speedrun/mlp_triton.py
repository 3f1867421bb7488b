"""Triton kernels for speedrun.mlp_kernels: the MLP's two products with relu^2 (forward) and its gradient
(backward) in their epilogues. Imported only where they run (a CUDA machine with Triton); see mlp_kernels.

Two builds of each product: `*_ptr_kernel`, one output tile per program with pointer loads, and `*_tma_kernel`,
persistent (one program per SM walking the tiles) with tensor-memory-accelerator descriptors (Hopper). Both
round the fp32 accumulator to bf16 before the epilogue, as the unfused path's product does.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(t, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """Output tile t's (row, column) tile: GROUP row-tiles walk the column tiles together, so the weight's tiles
    stay in L2 between them."""
    per_group = GROUP * (N // BN)
    first_m = (t // per_group) * GROUP
    rows = tl.minimum(M // BM - first_m, GROUP)
    return first_m + (t % per_group) % rows, (t % per_group) // rows


@triton.jit
def _relu_square(acc, scale):
    pre = (acc * scale).to(tl.bfloat16).to(tl.float32)
    relu = tl.maximum(pre, 0.0)
    return (relu * relu).to(tl.bfloat16)


@triton.jit
def _relu_square_grad(acc, post):
    return (2.0 * acc.to(tl.bfloat16).to(tl.float32) * tl.sqrt(post.to(tl.float32))).to(tl.bfloat16)


@triton.jit
def _tile_max(post):
    return tl.max(tl.max(post.to(tl.float32), axis=1), axis=0)


@triton.jit
def up_ptr_kernel(a_ptr, b_ptr, post_ptr, scale_ptr, amax_ptr, M, N, K,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """post = relu((a @ b^T) * scale)^2, a (M, K), b (N, K); amax_ptr[program] = this tile's max."""
    pid = tl.program_id(0)
    pm, pn = _tile(pid, M, N, BM, BN, GROUP)
    rm = (pm * BM + tl.arange(0, BM)).to(tl.int64)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None] * K + rk[None, :]
    b_ptrs = b_ptr + rn[None, :] * K + rk[:, None]  # b's tile read as (BK, BN), K-major
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K, BK):
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
        a_ptrs += BK
        b_ptrs += BK
    post = _relu_square(acc, tl.load(scale_ptr))
    tl.store(post_ptr + rm[:, None] * N + rn[None, :], post)
    tl.store(amax_ptr + pid, _tile_max(post))


@triton.jit
def down_ptr_kernel(a_ptr, b_ptr, post_ptr, out_ptr, M, N, K,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """out = 2 * (a @ b) * sqrt(post), a (M, K), b (K, N)."""
    pm, pn = _tile(tl.program_id(0), M, N, BM, BN, GROUP)
    rm = (pm * BM + tl.arange(0, BM)).to(tl.int64)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None] * K + rk[None, :]
    b_ptrs = b_ptr + rk[:, None] * N + rn[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K, BK):
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
        a_ptrs += BK
        b_ptrs += BK * N
    offs = rm[:, None] * N + rn[None, :]
    tl.store(out_ptr + offs, _relu_square_grad(acc, tl.load(post_ptr + offs)))


@triton.jit
def up_tma_kernel(a_desc, b_desc, post_desc, scale_ptr, amax_ptr, M, N, K,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, SMS: tl.constexpr):
    """up_ptr_kernel's maths, persistent: amax_ptr[program] = the max over the tiles this program wrote."""
    start = tl.program_id(0)
    scale = tl.load(scale_ptr)
    amax = 0.0
    for t in tl.range(start, (M // BM) * (N // BN), SMS, flatten=True):
        pm, pn = _tile(t, M, N, BM, BN, GROUP)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            acc = tl.dot(a_desc.load([pm * BM, k]), b_desc.load([pn * BN, k]).T, acc)
        post = _relu_square(acc, scale)
        post_desc.store([pm * BM, pn * BN], post)
        amax = tl.maximum(amax, _tile_max(post))
    tl.store(amax_ptr + start, amax)


@triton.jit
def down_tma_kernel(a_desc, b_desc, post_desc, out_desc, M, N, K,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, SMS: tl.constexpr):
    """down_ptr_kernel's maths, persistent."""
    for t in tl.range(tl.program_id(0), (M // BM) * (N // BN), SMS, flatten=True):
        pm, pn = _tile(t, M, N, BM, BN, GROUP)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            acc = tl.dot(a_desc.load([pm * BM, k]), b_desc.load([k, pn * BN]), acc)
        out_desc.store([pm * BM, pn * BN], _relu_square_grad(acc, post_desc.load([pm * BM, pn * BN])))
