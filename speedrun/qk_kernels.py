"""QK-norm and half-RoPE of one attention input (queries or keys) in one Triton kernel each way (`model.fused_qk_norm`).

    y = rotate(rms_norm(x), theta),  theta[t, h, j] = position(t, h) * freq[j]   x (B, T, H, D) bf16, any strides

Written as torch ops (`reference_qk_norm_rope`), Inductor fuses the norm and the rotation into one reduction
kernel per tensor, but computes cos and sin per element (every head, again in backward) and reduces in two
passes over the row; in a stage-3 step's profile on an H200 its backward took ~550 us a call where the bytes
need ~150 us (these kernels: ~75 us). Here a program holds whole rows of D values in registers: one read of x,
one write of y; backward reads x and dy once, writes dx once, with cos/sin computed once per row and pair.
Numbers: fp32 inside, bf16 out, F.rms_norm's eps for bf16 input (float32's); eager rounds the norm to bf16 before rotating,
Inductor and this kernel do not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROWS_PER_PROGRAM = 16
EPS = torch.finfo(torch.float32).eps  # what F.rms_norm uses for a bf16 input (it computes in fp32)


def rope(x: torch.Tensor, freq: torch.Tensor, paired: bool = False) -> torch.Tensor:
    """x (B, T, H, D) at positions 0..T-1: element j of D's first half and element j of its second half rotate
    together by position * freq[j] (freq (D/2,); zeros leave a pair as it is). paired: record #89's paired-head
    layers, where heads 2i and 2i+1 of token t sit at positions 2t and 2t+1 of the doubled sequence they attend
    over (CausalSelfAttention.pair), and rotate at those positions."""
    T, H = x.size(1), x.size(2)
    t = torch.arange(T, device=x.device, dtype=torch.float32)
    if paired:
        pos = 2 * t[:, None] + (torch.arange(H, device=x.device) % 2).float()[None, :]  # (T, H)
        theta = (pos[..., None] * freq)[None]
    else:
        theta = torch.outer(t, freq)[None, :, None, :]
    return rotate_pairs(x, theta.cos().type_as(x), theta.sin().type_as(x))


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Element j of D's first half and element j of its second half, turned by the angle whose cos/sin are given."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def reference_qk_norm_rope(x: torch.Tensor, freq: torch.Tensor, paired: bool = False) -> torch.Tensor:
    """The same maths as torch ops."""
    return rope(F.rms_norm(x, (x.size(-1),)), freq, paired)


def _launch(kernel, x: torch.Tensor, freq: torch.Tensor, paired: bool, *tensors: torch.Tensor) -> None:
    B, T, H, D = x.shape
    rows = B * T * H
    grid = (-(-rows // ROWS_PER_PROGRAM),)
    kernel[grid](x, freq, *tensors, rows, T, H, x.stride(0), x.stride(1), x.stride(2), EPS,
                 ROWS=ROWS_PER_PROGRAM, HALF=D // 2, PAIRED=paired, num_warps=4)


@torch.library.custom_op("speedrun::qk_norm_rope", mutates_args=())
def _forward(x: torch.Tensor, freq: torch.Tensor, paired: bool) -> torch.Tensor:
    from .qk_triton import qk_norm_rope_fwd_kernel

    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _launch(qk_norm_rope_fwd_kernel, x, freq, paired, out)
    return out


@_forward.register_fake
def _(x, freq, paired):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


@torch.library.custom_op("speedrun::qk_norm_rope_backward", mutates_args=())
def _backward(x: torch.Tensor, freq: torch.Tensor, paired: bool, grad: torch.Tensor) -> torch.Tensor:
    from .qk_triton import qk_norm_rope_bwd_kernel

    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _launch(qk_norm_rope_bwd_kernel, x, freq, paired, grad.contiguous(), dx)
    return dx


@_backward.register_fake
def _(x, freq, paired, grad):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, freq, ctx.paired = inputs
    ctx.save_for_backward(x, freq)


def _grad(ctx, grad: torch.Tensor):
    x, freq = ctx.saved_tensors
    return _backward(x, freq, ctx.paired, grad), None, None  # freq: a buffer (YaRN sets it), never trained


_forward.register_autograd(_grad, setup_context=_setup_context)


def qk_norm_rope(x: torch.Tensor, freq: torch.Tensor, fused: bool, paired: bool = False) -> torch.Tensor:
    """rms_norm then half-RoPE of x (B, T, H, D) at the positions `rope` gives; freq (D/2,) fp32.
    fused: the Triton kernels (CUDA, bf16, D even, unit stride along D), else torch ops."""
    if fused and x.is_cuda and x.dtype == torch.bfloat16 and x.stride(-1) == 1 and x.size(-1) % 2 == 0:
        return _forward(x, freq.float().contiguous(), paired)
    return reference_qk_norm_rope(x, freq, paired)
