"""The MLP's relu^2 fused into the matrix products around it, as two Triton kernels (`model.fused_mlp`).

Unfused, the delayed-FP8 MLP (speedrun.fp8_mlp) writes the up-projection's bf16 output `pre`, reads it back for
post = relu(pre)^2 and again for amax(post); in backward it writes d_post = g @ w_proj and reads it back with
post for d_pre = 2 * d_post * sqrt(post). Each of those passes moves tokens x 3072 bf16 values through HBM,
12 layers x 8 micro-batches a step (the last profile: 32 ms per stage-3 step for the backward one alone).

    up:   post, amax = relu((a @ b^T) * sa * sb)^2, max(post)   a (M, K) and b (N, K) e4m3
    down: d_pre = 2 * (a @ b) * sqrt(post)                     a (M, K) bf16, b (K, N) bf16, post (M, N) bf16

Both round the product to bf16 first, as _scaled_mm and the bf16 matmul do, so they give the unfused path's
numbers. Each writes one (M, N) tensor; amax comes back as per-program maxima that a tiny torch op reduces. The
kernels (speedrun.mlp_triton) come in builds and tile shapes; the fastest is measured once per shape on the
machine (as in head_kernels). Shapes the tiles do not divide, and
machines without FP8 hardware take the torch path (`reference_up`, `reference_down`; `emulate` as in
speedrun.fp8), which the GPU tests compare against.
"""

from __future__ import annotations

from functools import partial

import torch

from .fp8 import scaled_mm
from .kernel_tuning import FastestBuild


def reference_up(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16, emulate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    post = torch.relu(scaled_mm(a, sa, b.t(), sb, out_dtype, emulate)).square()
    return post, post.detach().amax().float()


def reference_down(a: torch.Tensor, b: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    return 2 * (a @ b) * post.sqrt()


# (build, BM, BN, BK, warps, stages), each timed once per shape on the machine; a build that fails to compile there
# (too much shared memory, no TMA) drops out. Each candidate compiles in every cold process, so the list holds
# only builds that won or came close somewhere (`benchmarks/kernel_builds.py`; on an H200 at 49,152 rows the
# TMA builds lead the up product and the pointer ones stay for GPUs without TMA)
_UP_VARIANTS = [("ptr", 128, 256, 128, 8, 3), ("ptr", 128, 128, 128, 4, 4),
                ("tma", 128, 256, 128, 8, 3), ("tma", 128, 128, 128, 8, 4)]
_DOWN_VARIANTS = [("ptr", 128, 256, 64, 8, 3), ("ptr", 128, 256, 32, 8, 4), ("tma", 128, 128, 64, 8, 4)]
_TUNING = FastestBuild("fused MLP", "SPEEDRUN_MLP_TUNING_LOG", "set model.fused_mlp=false")


def _divides(variants, M, N, K) -> list:
    return [v for v in variants if M % v[1] == 0 and N % v[2] == 0 and K % v[3] == 0]


def _grid(variant, M, N, device) -> int:
    tiles = (M // variant[1]) * (N // variant[2])
    return tiles if variant[0] == "ptr" else min(tiles, torch.cuda.get_device_properties(device).multi_processor_count)


def _run_up(variant, a, b, post, scale, partial_max) -> int:
    """Launches one build of the up kernel; returns how many programs wrote a partial max."""
    from . import mlp_triton as mt
    kind, bm, bn, bk, warps, stages = variant
    (M, K), N = a.shape, b.size(0)
    grid = _grid(variant, M, N, a.device)
    meta = dict(BM=bm, BN=bn, BK=bk, GROUP=8, num_warps=warps, num_stages=stages)
    if kind == "ptr":
        mt.up_ptr_kernel[(grid,)](a, b, post, scale, partial_max, M, N, K, **meta)
    else:
        from triton.tools.tensor_descriptor import TensorDescriptor as TD
        mt.up_tma_kernel[(grid,)](TD.from_tensor(a, [bm, bk]), TD.from_tensor(b, [bn, bk]),
                                  TD.from_tensor(post, [bm, bn]), scale, partial_max, M, N, K, SMS=grid, **meta)
    return grid


def _run_down(variant, a, b, post, out) -> None:
    from . import mlp_triton as mt
    kind, bm, bn, bk, warps, stages = variant
    (M, K), N = a.shape, b.size(1)
    grid = _grid(variant, M, N, a.device)
    meta = dict(BM=bm, BN=bn, BK=bk, GROUP=8, num_warps=warps, num_stages=stages)
    if kind == "ptr":
        mt.down_ptr_kernel[(grid,)](a, b, post, out, M, N, K, **meta)
    else:
        from triton.tools.tensor_descriptor import TensorDescriptor as TD
        mt.down_tma_kernel[(grid,)](TD.from_tensor(a, [bm, bk]), TD.from_tensor(b, [bk, bn]),
                                    TD.from_tensor(post, [bm, bn]), TD.from_tensor(out, [bm, bn]), M, N, K,
                                    SMS=grid, **meta)


def _pick(key, variants, run) -> tuple:
    return _TUNING.pick(key, {v: partial(run, v) for v in variants})


@torch.library.custom_op("speedrun::mlp_up_relu2", mutates_args=())
def _up(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    (M, K), N = a.shape, b.size(0)
    variants = _divides(_UP_VARIANTS, M, N, K)
    if not variants:
        return reference_up(a, sa, b, sb)
    scale = (sa * sb).reshape(1)
    post = torch.empty(M, N, device=a.device, dtype=torch.bfloat16)
    partial_max = torch.empty(max((M // 128) * (N // 128), 1024), device=a.device, dtype=torch.float32)
    run = partial(_run_up, a=a, b=b, post=post, scale=scale, partial_max=partial_max)
    programs = run(_pick(("up", M, N, K, a.device.index), variants, run))
    return post, partial_max[:programs].amax()


@_up.register_fake
def _(a, sa, b, sb):
    return a.new_empty(a.size(0), b.size(0), dtype=torch.bfloat16), a.new_empty((), dtype=torch.float32)


@torch.library.custom_op("speedrun::mlp_down_relu2_grad", mutates_args=())
def _down(a: torch.Tensor, b: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    (M, K), N = a.shape, b.size(1)
    variants = _divides(_DOWN_VARIANTS, M, N, K)
    if not variants:
        return reference_down(a, b, post)
    out = torch.empty(M, N, device=a.device, dtype=torch.bfloat16)
    run = partial(_run_down, a=a, b=b, post=post, out=out)
    run(_pick(("down", M, N, K, a.device.index), variants, run))
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
