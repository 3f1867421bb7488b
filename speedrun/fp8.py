"""FP8 matrix products for the GPU fast path (`model.use_fp8`), and the same maths without FP8 hardware.

y = x @ w.T with x and w cast to float8 e4m3 under per-tensor scales (scale = amax / 448, so the largest
entry lands on e4m3's largest value); in backward the output gradient is cast to e5m2 (amax / 57344), whose
wider range suits gradients. Products accumulate in fp32. On a CUDA device of compute capability >= 8.9 the
products run on the FP8 tensor cores through torch._scaled_mm; elsewhere the quantised operands are
multiplied in fp32 (`emulate=True`), which is what the GPU tests compare against.
"""

from __future__ import annotations

import torch

from .head_kernels import head_loss_and_grad, row_targets

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def quantize(t: torch.Tensor, dtype: torch.dtype, fmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / scale in `dtype`, scale) with one fp32 scale for the whole tensor."""
    scale = t.abs().amax().float().clamp_min(1e-12) / fmax
    return (t.float() / scale).to(dtype), scale


def scaled_mm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype,
              emulate: bool) -> torch.Tensor:
    """(a * sa) @ (b * sb) for FP8 a (M, K) and b (K, N)."""
    if emulate:
        return ((a.float() * sa) @ (b.float() * sb)).to(out_dtype)
    # _scaled_mm wants a row-major and b column-major
    return torch._scaled_mm(a.contiguous(), b.t().contiguous().t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, emulate: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.size(-1))
        xq, sx = quantize(x2, E4M3, E4M3_MAX)
        wq, sw = quantize(w, E4M3, E4M3_MAX)
        y = scaled_mm(xq, sx, wq.t(), sw, torch.bfloat16, emulate)
        ctx.save_for_backward(xq, sx, wq, sw)
        ctx.emulate, ctx.w_dtype = emulate, w.dtype
        return y.view(*x.shape[:-1], w.size(0))

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        xq, sx, wq, sw = ctx.saved_tensors
        g = gy.reshape(-1, gy.size(-1))
        gq, sg = quantize(g, E5M2, E5M2_MAX)
        gx = scaled_mm(gq, sg, wq, sw, torch.bfloat16, ctx.emulate)
        gw = scaled_mm(gq.t(), sg, xq, sx, torch.float32, ctx.emulate).to(ctx.w_dtype)
        return gx.view(*gy.shape[:-1], wq.size(1)), gw, None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, emulate: bool | None = None) -> torch.Tensor:
    """x @ w.T in FP8 (bf16 out); w keeps its own dtype (the fp32 master weight) and gets its gradient in it."""
    if emulate is None:
        emulate = not fp8_hardware(x.device)
    return _FP8Linear.apply(x, w, emulate)


def fp8_hardware(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def softcap_logits(z: torch.Tensor, softcap: torch.Tensor) -> torch.Tensor:
    """scale * sigmoid((z + shift) / div) in fp32; softcap = (scale, shift, div)."""
    scale, shift, div = softcap.unbind()
    return scale * torch.sigmoid((z.float() + shift) / div)


def capped_logsumexp(s: torch.Tensor) -> torch.Tensor:
    """log-sum-exp of softcapped logits in one pass: 0 <= s <= scale (23 in the record), so exp(s) summed
    over the vocabulary stays far inside fp32 and the usual max-subtraction pass is not needed."""
    return s.exp().sum(dim=-1).log()


def shifted_targets(targets: torch.Tensor, k: int) -> torch.Tensor:
    """targets[:, t + k] at position t; -1 (matches no token) where t + k runs off the row. Every tensor keeps
    the row's full length: the compiler (inductor, torch 2.11) failed to fuse length-T with length-(T-k) loops."""
    T = targets.size(1)
    pos = torch.arange(T, device=targets.device)
    return torch.where(pos < T - k, torch.roll(targets, -k, dims=1), -1)


def mtp_from_lse(s: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k * mean over t < T-k of (lse_t - s[t, y_{t+k}]), with the picks as masked vocabulary sums."""
    B, T = targets.shape
    vocab = torch.arange(s.size(-1), device=s.device)
    loss = s.new_zeros(())
    for k in range(weights.numel()):
        tk = shifted_targets(targets, k)
        picked = torch.where(vocab == tk.unsqueeze(-1), s, 0.0).sum(-1)
        loss = loss + weights[k] * torch.where(tk >= 0, lse - picked, 0.0).sum() / (B * (T - k))
    return loss


class _FP8HeadLoss(torch.autograd.Function):
    """FP8 lm_head, softcap and multi-token cross-entropy as one function, for the compiled fast path.

    Forward: z = x @ w.T in FP8 (bf16 out), s = softcap(z), loss = sum_k w_k * mean_t(lse_t - s[t, y_{t+k}]).
    The logit gradient is the upstream gradient (a scalar) times a tensor that forward can already compute,
    so forward computes it (head_kernels) and z is never saved. Its bound is known without reading it:
    |dL/ds| <= sum_k w_k / N_k and ds/dz <= scale / (4 div), so its e5m2 scale needs no amax pass; backward
    folds the upstream gradient into that scale."""

    @staticmethod
    def forward(ctx, x, w, targets, weights, softcap, emulate, need_grad, prefix_targets, prefix_weight):
        B, T, D = x.shape
        xq, sx = quantize(x.reshape(-1, D), E4M3, E4M3_MAX)
        wq, sw = quantize(w, E4M3, E4M3_MAX)
        z = scaled_mm(xq, sx, wq.t(), sw, torch.bfloat16, emulate)
        tgt, coef = row_targets(targets, weights)
        bound = sum((weights[k] / (B * (T - k))).abs() for k in range(weights.numel()))
        if prefix_targets is not None:  # the prefix-token loss: one more target per row (-1: none)
            valid = prefix_targets.reshape(-1, 1) >= 0
            tgt = torch.cat([tgt, prefix_targets.reshape(-1, 1).to(tgt.dtype)], dim=1)
            coef = torch.cat([coef, torch.where(valid, prefix_weight.float() / (B * T), 0.0)], dim=1)
            bound = bound + prefix_weight.abs() / (B * T)
        scale, _, div = softcap.unbind()
        bound = bound * scale / (4 * div)
        sg0 = (bound / E5M2_MAX).clamp_min(1e-30)
        loss, gq, gqt = head_loss_and_grad(z, tgt, coef, softcap, 1.0 / sg0 if need_grad else None,
                                           use_triton=not emulate)
        if need_grad:
            ctx.save_for_backward(xq, sx, wq, sw, gq, gqt, sg0)
        ctx.emulate, ctx.w_dtype, ctx.x_shape = emulate, w.dtype, x.shape
        return loss

    @staticmethod
    def backward(ctx, g_out):
        xq, sx, wq, sw, gq, gqt, sg0 = ctx.saved_tensors
        sg = sg0 * g_out
        gx = scaled_mm(gq, sg, wq, sw, torch.bfloat16, ctx.emulate)
        gw = scaled_mm(gqt, sg, xq, sx, torch.float32, ctx.emulate).to(ctx.w_dtype)
        return gx.view(ctx.x_shape), gw, None, None, None, None, None, None, None


def fp8_head_loss(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                  softcap: torch.Tensor, emulate: bool | None = None,
                  prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The multi-token loss of softcap(x @ w.T) with the product in FP8 (see _FP8HeadLoss), plus the prefix-token
    loss when `prefix` (targets, -1 where none; weight) is given."""
    if emulate is None:
        emulate = not fp8_hardware(x.device)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    prefix_targets, prefix_weight = prefix if prefix is not None else (None, None)
    return _FP8HeadLoss.apply(x, w, targets, weights, softcap, emulate, need_grad, prefix_targets, prefix_weight)
