"""The MLP's relu^2 fused into the matrix products around it, as two Triton kernels (`model.mlp_kernel`).

Unfused, the delayed-FP8 MLP (speedrun.fp8_mlp) writes the up-projection's bf16 output `pre`, reads it back for
post = relu(pre)^2 and again for amax(post); in backward it writes d_post = g @ w_proj and reads it back with
post for d_pre = 2 * d_post * sqrt(post). Each of those passes moves tokens x 3072 bf16 values through HBM,
12 layers x 8 micro-batches a step (the last profile: 32 ms per stage-3 step for the backward one alone).

    up:   post, amax = relu((a @ b^T) * sa * sb)^2, max(post)   a (M, K) and b (N, K) e4m3
    down: d_pre = 2 * (a @ b) * sqrt(post)                     a (M, K) bf16, b (K, N) bf16, post (M, N) bf16

Both round the product to bf16 first, as _scaled_mm and the bf16 matmul do, so they give the unfused path's
numbers. Each writes one (M, N) tensor; amax comes back as per-tile maxima that a tiny torch op reduces. The
tile shape is measured once per shape on the machine (as in head_kernels). Shapes the tiles do not divide, and
machines without FP8 hardware take the torch path (`reference_up`, `reference_down`; `emulate` as in
speedrun.fp8), which the GPU tests compare against.
"""

from __future__ import annotations

from functools import partial

import torch

from .fp8 import scaled_mm

_TRITON = None


def reference_up(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16, emulate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    post = torch.relu(scaled_mm(a, sa, b.t(), sb, out_dtype, emulate)).square()
    return post, post.detach().amax().float()


def reference_down(a: torch.Tensor, b: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    return 2 * (a @ b) * post.sqrt()


def _kernels():
    """Compile-on-first-use Triton kernels (triton is imported only on a CUDA machine)."""
    global _TRITON
    if _TRITON is not None:
        return _TRITON
    import triton
    import triton.language as tl

    @triton.jit
    def up_kernel(a_ptr, b_ptr, post_ptr, scale_ptr, amax_ptr, M, N, K,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
        pid = tl.program_id(0)
        # GROUP row-tiles walk the column tiles together, so b's tiles stay in L2 between them
        per_group = GROUP * (N // BN)
        first_m = (pid // per_group) * GROUP
        rows = tl.minimum(M // BM - first_m, GROUP)
        pm, pn = first_m + (pid % per_group) % rows, (pid % per_group) // rows
        rm = (pm * BM + tl.arange(0, BM)).to(tl.int64)
        rn = pn * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_ptrs = a_ptr + rm[:, None] * K + rk[None, :]
        b_ptrs = b_ptr + rn[None, :] * K + rk[:, None]  # b is (N, K): its tile read as (BK, BN), K-major
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, K, BK):
            acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
            a_ptrs += BK
            b_ptrs += BK
        pre = (acc * tl.load(scale_ptr)).to(tl.bfloat16).to(tl.float32)
        relu = tl.maximum(pre, 0.0)
        post = (relu * relu).to(tl.bfloat16)
        tl.store(post_ptr + rm[:, None] * N + rn[None, :], post)
        tl.store(amax_ptr + pid, tl.max(tl.max(post.to(tl.float32), axis=1), axis=0))

    @triton.jit
    def down_kernel(a_ptr, b_ptr, post_ptr, out_ptr, M, N, K,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
        pid = tl.program_id(0)
        # GROUP row-tiles walk the column tiles together, so b's tiles stay in L2 between them
        per_group = GROUP * (N // BN)
        first_m = (pid // per_group) * GROUP
        rows = tl.minimum(M // BM - first_m, GROUP)
        pm, pn = first_m + (pid % per_group) % rows, (pid % per_group) // rows
        rm = (pm * BM + tl.arange(0, BM)).to(tl.int64)
        rn = pn * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_ptrs = a_ptr + rm[:, None] * K + rk[None, :]
        b_ptrs = b_ptr + rk[:, None] * N + rn[None, :]  # b is (K, N)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, K, BK):
            acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
            a_ptrs += BK
            b_ptrs += BK * N
        offs = rm[:, None] * N + rn[None, :]
        d_post = acc.to(tl.bfloat16).to(tl.float32)
        post = tl.load(post_ptr + offs).to(tl.float32)
        tl.store(out_ptr + offs, (2.0 * d_post * tl.sqrt(post)).to(tl.bfloat16))

    _TRITON = (triton, up_kernel, down_kernel)
    return _TRITON


# (BM, BN, BK, warps, stages) tried once per shape; the first of each list is the usual Hopper winner
_UP_TILES = [(128, 256, 128, 8, 3), (128, 128, 128, 4, 4), (128, 256, 64, 8, 4)]
_DOWN_TILES = [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 32, 8, 4)]
_CHOICE: dict = {}


def _divides(tiles, M, N, K) -> list:
    return [t for t in tiles if M % t[0] == 0 and N % t[1] == 0 and K % t[2] == 0]


def _launch(kernel, tile, M, N, K, *args) -> None:
    bm, bn, bk, warps, stages = tile
    kernel[((M // bm) * (N // bn),)](*args, M, N, K, BM=bm, BN=bn, BK=bk, GROUP=8, num_warps=warps,
                                     num_stages=stages)


def _pick(key, tiles, run) -> tuple:
    if key not in _CHOICE:
        from triton.testing import do_bench
        times = {t: do_bench(partial(run, t), warmup=5, rep=20, return_mode="median") for t in tiles}
        _CHOICE[key] = min(times, key=times.get)
    return _CHOICE[key]


@torch.library.custom_op("speedrun::mlp_up_relu2", mutates_args=())
def _up(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    (M, K), N = a.shape, b.size(0)
    tiles = _divides(_UP_TILES, M, N, K)
    if not tiles:
        return reference_up(a, sa, b, sb)
    _, kernel, _ = _kernels()
    scale = (sa * sb).reshape(1)
    post = torch.empty(M, N, device=a.device, dtype=torch.bfloat16)
    partial_max = torch.empty((M // 128) * (N // 128), device=a.device, dtype=torch.float32)  # per tile

    def run(tile):
        _launch(kernel, tile, M, N, K, a, b, post, scale, partial_max)

    tile = _pick(("up", M, N, K, a.device.index), tiles, run)
    run(tile)
    return post, partial_max[: (M // tile[0]) * (N // tile[1])].amax()


@_up.register_fake
def _(a, sa, b, sb):
    return a.new_empty(a.size(0), b.size(0), dtype=torch.bfloat16), a.new_empty((), dtype=torch.float32)


@torch.library.custom_op("speedrun::mlp_down_relu2_grad", mutates_args=())
def _down(a: torch.Tensor, b: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    (M, K), N = a.shape, b.size(1)
    tiles = _divides(_DOWN_TILES, M, N, K)
    if not tiles:
        return reference_down(a, b, post)
    _, _, kernel = _kernels()
    out = torch.empty(M, N, device=a.device, dtype=torch.bfloat16)

    def run(tile):
        _launch(kernel, tile, M, N, K, a, b, post, out)

    run(_pick(("down", M, N, K, a.device.index), tiles, run))
    return out


@_down.register_fake
def _(a, b, post):
    return a.new_empty(a.size(0), b.size(1), dtype=torch.bfloat16)


def up_relu_square(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype,
                   fused: bool, emulate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(relu((a @ b^T) * sa * sb)^2 in out_dtype, its amax in fp32) for e4m3 a (M, K), b (N, K), fp32 scales;
    fused: bf16 out only."""
    if not fused:
        return reference_up(a, sa, b, sb, out_dtype, emulate)
    return _up(a.contiguous(), sa.float(), b.contiguous(), sb.float())


def down_relu_square_grad(a: torch.Tensor, b: torch.Tensor, post: torch.Tensor, fused: bool) -> torch.Tensor:
    """2 * (a @ b) * sqrt(post) in bf16 for bf16 a (M, K), b (K, N), post (M, N): the relu^2 input's gradient."""
    if not fused:
        return reference_down(a, b, post)
    return _down(a.contiguous(), b.contiguous(), post.contiguous())
