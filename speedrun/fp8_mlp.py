"""The MLP with FP8 forward products and delayed scaling (record #89's `model.fp8_mlp_scaling=delayed`).

Up-projection: x and the weight cast to e4m3 under their own current per-tensor scales (amax / 448).
Down-projection: relu(pre)^2 and the weight cast to e4m3 under *delayed* scales, set from the amax seen at the
previous forward times a headroom (activations 1.8, weight 1.12), so the scale is known before the
tensor is; values beyond the scale's range saturate at +-448 instead of overflowing. While `bootstrap` is set (the
first steps: the down-projection starts at zero and grows fast) and at the very first forward, the current amax
is used instead. Backward runs in the activation dtype from the unquantised tensors, as in record #89: only the
forward products are FP8. Without FP8 hardware the quantised operands are multiplied in fp32 (`emulate`). With
`fused`, relu^2 and its gradient run inside the products next to them (speedrun.mlp_kernels).
"""

from __future__ import annotations

import torch
from torch import nn

from .fp8 import E4M3, E4M3_MAX, fp8_hardware, quantize, scaled_mm
from .mlp_kernels import down_relu_square_grad, up_relu_square


class DelayedScales(nn.Module):
    """Per MLP: the down-projection's activation and weight scales for the next forward (0: none yet), and
    whether the trainer still wants current scaling for the weight (its first `fp8_bootstrap_steps` steps)."""

    def __init__(self, act_headroom: float, weight_headroom: float):
        super().__init__()
        self.headroom = nn.Buffer(torch.tensor([act_headroom, weight_headroom]), persistent=False)
        self.next = nn.Buffer(torch.zeros(2), persistent=False)  # (activation, weight) scales
        self.bootstrap = nn.Buffer(torch.ones((), dtype=torch.bool), persistent=False)

    @torch.no_grad()
    def update(self, amax: torch.Tensor) -> None:
        self.next.copy_(amax.clamp_min(1e-12) * self.headroom / E4M3_MAX)


def saturate(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """t / scale in e4m3, clamped to its range (a delayed scale can be too small for a tensor that grew)."""
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def down_scales(a_amax: torch.Tensor, w_proj: torch.Tensor, delayed: torch.Tensor, bootstrap: torch.Tensor):
    """(activation scale, weight scale, this forward's amaxes) for the down-projection, given the activation's
    amax: the delayed scales, or the current ones (amax / 448) where none is set yet, and for the weight while
    bootstrapping. Each scale is a tensor of its own: Inductor (torch 2.11) fails to lower _scaled_mm on 0-dim
    views of one stacked tensor."""
    w_amax = w_proj.detach().abs().amax().float()
    s_act = torch.where(delayed[0] > 0, delayed[0], a_amax.clamp_min(1e-12) / E4M3_MAX)
    s_w = torch.where((delayed[1] > 0) & ~bootstrap, delayed[1], w_amax.clamp_min(1e-12) / E4M3_MAX)
    return s_act, s_w, torch.stack([a_amax, w_amax])


class _FP8ForwardMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_fc, w_proj, delayed, bootstrap, emulate, fused):
        x2 = x.reshape(-1, x.size(-1))
        xq, sx = quantize(x2, E4M3, E4M3_MAX)
        wq, sw = quantize(w_fc, E4M3, E4M3_MAX)
        fused = fused and x.dtype == torch.bfloat16  # the kernels read and write bf16
        post, a_amax = up_relu_square(xq, sx, wq, sw, x.dtype, fused, emulate)
        s_act, s_w, amax = down_scales(a_amax, w_proj, delayed, bootstrap)
        y = scaled_mm(saturate(post, s_act), s_act, saturate(w_proj, s_w).t(), s_w, x.dtype, emulate)
        ctx.save_for_backward(x2, w_fc, w_proj, post)
        ctx.x_shape, ctx.fused = x.shape, fused
        ctx.mark_non_differentiable(amax)
        return y.view(*x.shape[:-1], w_proj.size(0)), amax

    @staticmethod
    def backward(ctx, gy, _amax_grad):
        x2, w_fc, w_proj, post = ctx.saved_tensors
        dt = x2.dtype
        g = gy.reshape(-1, gy.size(-1)).to(dt)
        d_pre = down_relu_square_grad(g, w_proj.to(dt), post, ctx.fused)  # relu(pre) = sqrt(post): pre is not kept
        g_proj = (g.t() @ post).to(w_proj.dtype)
        g_fc = (d_pre.t() @ x2).to(w_fc.dtype)
        return (d_pre @ w_fc.to(dt)).view(ctx.x_shape), g_fc, g_proj, None, None, None, None


def fp8_delayed_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, state: DelayedScales,
                    emulate: bool | None = None, fused: bool = True) -> torch.Tensor:
    """proj(relu(fc(x))^2) with FP8 forward products; `state` then holds the scales for the next forward.
    `fused` takes effect only on FP8 hardware (the emulation has no kernels to fuse into)."""
    if emulate is None:
        emulate = not fp8_hardware(x.device)
    # every dtype in here is explicit: CUDA autocast would run relu^2 (a pow) in fp32, keep a fp32 post for
    # backward (twice the memory) and, in eager mode, meet bf16 gradients with it outside autocast
    with torch.autocast(x.device.type, enabled=False):
        y, amax = _FP8ForwardMLP.apply(x, w_fc, w_proj, state.next, state.bootstrap, emulate, fused and not emulate)
    state.update(amax)
    return y
