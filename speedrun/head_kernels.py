"""Softcapped multi-token cross-entropy over the lm_head logits: loss and FP8 logit gradient, two passes.

Given bf16 logits z (N rows = B*T positions, V columns), s = scale * sigmoid((z + shift) / div) and, per row t,
targets y_{t,k} with coefficients c_{t,k} = w_k / (B * (T - k)) (0 where t + k runs off the row):

    loss     = sum_t sum_k c_{t,k} * (lse_t - s[t, y_{t,k}])
    dL/dz    = (C_t * exp(s - lse_t) - sum_k c_{t,k} [v == y_{t,k}]) * s * (1 - s / scale) / div,  C_t = sum_k c_{t,k}

The gradient does not depend on the upstream gradient except through one scalar factor, so it is computed in
the forward pass and kept in e5m2 at a fixed scale (its analytic bound, see fp8._FP8HeadLoss), in both the
row-major layout (for dL/dx = g @ w) and the transposed one (for dL/dw = g^T @ x; FP8 tensor cores take only
K-major operands). The logits are read twice (once for the log-sum-exp, once for the gradient) and never
saved. The transposed copy comes either from the gradient pass itself or from a tiled transpose of the e5m2
tensor, whichever measures faster on the machine (on an H100 at 49152 x 50304: 5.3 ms for gradient pass +
transpose against 6.3 ms for the fused store; the whole head, FP8 products included, 16.5 ms per micro-batch,
21.5 ms before this module).

`head_loss_and_grad` runs two Triton kernels on CUDA and the same maths in torch ops elsewhere
(`reference_head_loss_and_grad`, which the GPU tests compare against).
"""

from __future__ import annotations

from functools import partial

import torch

from .kernel_tuning import FastestBuild

E5M2 = torch.float8_e5m2


def row_targets(targets: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) int32 targets (-1: none) and (N, K) fp32 coefficients for the B*T rows of `targets` (B, T)."""
    B, T = targets.shape
    K = weights.numel()
    pos = torch.arange(T, device=targets.device)
    tgt, coef = [], []
    for k in range(K):
        rolled = torch.roll(targets, -k, dims=1)
        valid = (pos < T - k) & (rolled >= 0)  # -1: no target (a validation batch's filler)
        tgt.append(torch.where(valid, rolled, -1))
        coef.append(torch.where(valid, weights[k] / (B * (T - k)), 0.0).expand(B, T))
    return (torch.stack(tgt, -1).reshape(B * T, K).to(torch.int32),
            torch.stack(coef, -1).reshape(B * T, K).float())


def reference_head_loss_and_grad(z: torch.Tensor, tgt: torch.Tensor, coef: torch.Tensor, softcap: torch.Tensor,
                                 inv_sg: torch.Tensor | None):
    """(loss, gq, gq^T) in torch ops; gq = dL/dz * inv_sg in e5m2, None when inv_sg is None (no gradient)."""
    scale, shift, div = softcap.unbind()
    s = scale * torch.sigmoid((z.float() + shift) / div)
    lse = s.exp().sum(-1).log()  # 0 <= s <= scale: no max-subtraction needed
    picked = s.gather(-1, tgt.clamp_min(0).long())
    loss = (coef * (lse.unsqueeze(-1) - picked)).sum()
    if inv_sg is None:
        return loss, None, None
    g = (s - lse.unsqueeze(-1)).exp() * coef.sum(-1, keepdim=True)
    vocab = torch.arange(z.size(-1), device=z.device)
    for k in range(tgt.size(1)):
        g = g - torch.where(vocab == tgt[:, k : k + 1], coef[:, k : k + 1], 0.0)
    gq = (g * (s * (1 - s / scale) / div) * inv_sg).to(E5M2)
    return loss, gq, gq.t().contiguous()


_TRITON = None


def _kernels():
    """Compile-on-first-use Triton kernels (triton is imported only on a CUDA machine)."""
    global _TRITON
    if _TRITON is not None:
        return _TRITON
    import triton
    import triton.language as tl

    @triton.jit
    def lse_loss_kernel(z_ptr, tgt_ptr, coef_ptr, sc_ptr, lse_ptr, loss_ptr, V: tl.constexpr,
                        K: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        zrow = z_ptr + row.to(tl.int64) * V
        scale, shift, div = tl.load(sc_ptr), tl.load(sc_ptr + 1), tl.load(sc_ptr + 2)
        a = 1.0 / div
        b = shift * a
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(zrow + cols, mask=cols < V, other=0.0).to(tl.float32)
            s = scale * tl.sigmoid(z * a + b)
            acc += tl.where(cols < V, tl.exp(s), 0.0)
        lse = tl.log(tl.sum(acc, axis=0))
        loss = lse * 0.0
        for k in tl.static_range(K):
            t = tl.load(tgt_ptr + row * K + k)
            c = tl.load(coef_ptr + row * K + k)
            zt = tl.load(zrow + tl.maximum(t, 0)).to(tl.float32)
            loss += c * (lse - scale * tl.sigmoid(zt * a + b))
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, loss)

    @triton.jit
    def grad_kernel(z_ptr, lse_ptr, tgt_ptr, coef_ptr, sc_ptr, inv_sg_ptr, gq_ptr, gqt_ptr, N, V,
                    K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, TRANS: tl.constexpr):
        # int64 only in each tile's base pointer; offsets inside a tile fit int32
        m0, n0 = tl.program_id(0) * BM, tl.program_id(1) * BN
        r, c = tl.arange(0, BM), tl.arange(0, BN)
        rows, cols = m0 + r, n0 + c
        rmask, cmask = rows < N, cols < V
        mask = rmask[:, None] & cmask[None, :]
        scale, shift, div = tl.load(sc_ptr), tl.load(sc_ptr + 1), tl.load(sc_ptr + 2)
        inv_sg = tl.load(inv_sg_ptr)
        a = 1.0 / div
        b = shift * a
        tile = m0.to(tl.int64) * V + n0
        z = tl.load(z_ptr + tile + (r[:, None] * V + c[None, :]), mask=mask, other=0.0).to(tl.float32)
        s = scale * tl.sigmoid(z * a + b)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        csum = tl.zeros([BM], dtype=tl.float32)
        for k in tl.static_range(K):
            csum += tl.load(coef_ptr + rows * K + k, mask=rmask, other=0.0)
        g = csum[:, None] * tl.exp(s - lse[:, None])
        for k in tl.static_range(K):
            t = tl.load(tgt_ptr + rows * K + k, mask=rmask, other=-1)
            ck = tl.load(coef_ptr + rows * K + k, mask=rmask, other=0.0)
            g = tl.where(cols[None, :] == t[:, None], g - ck[:, None], g)
        q = (g * (s * (1.0 - s * (1.0 / scale))) * (a * inv_sg)).to(tl.float8e5)
        tl.store(gq_ptr + tile + (r[:, None] * V + c[None, :]), q, mask=mask)
        if TRANS:
            tile_t = n0.to(tl.int64) * N + m0
            tl.store(gqt_ptr + tile_t + (c[:, None] * N + r[None, :]), tl.trans(q), mask=tl.trans(mask))

    @triton.jit
    def transpose_kernel(src_ptr, dst_ptr, N, V, BM: tl.constexpr, BN: tl.constexpr):
        m0, n0 = tl.program_id(0) * BM, tl.program_id(1) * BN
        r, c = tl.arange(0, BM), tl.arange(0, BN)
        mask = ((m0 + r) < N)[:, None] & ((n0 + c) < V)[None, :]
        x = tl.load(src_ptr + m0.to(tl.int64) * V + n0 + (r[:, None] * V + c[None, :]), mask=mask)
        tl.store(dst_ptr + n0.to(tl.int64) * N + m0 + (c[:, None] * N + r[None, :]), tl.trans(x),
                 mask=tl.trans(mask))

    _TRITON = (triton, lse_loss_kernel, grad_kernel, transpose_kernel)
    return _TRITON


@torch.library.custom_op("speedrun::head_lse_loss", mutates_args=())
def _head_lse_loss(z: torch.Tensor, tgt: torch.Tensor, coef: torch.Tensor,
                   softcap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    triton, kernel, _, _ = _kernels()
    N, V = z.shape
    lse = torch.empty(N, device=z.device, dtype=torch.float32)
    loss = torch.empty(N, device=z.device, dtype=torch.float32)
    kernel[(N,)](z, tgt, coef, softcap, lse, loss, V, K=tgt.size(1), BLOCK=2048, num_warps=8)
    return lse, loss


@_head_lse_loss.register_fake
def _(z, tgt, coef, softcap):
    return z.new_empty(z.size(0), dtype=torch.float32), z.new_empty(z.size(0), dtype=torch.float32)


@torch.library.custom_op("speedrun::head_grad_fp8", mutates_args=())
def _head_grad_fp8(z: torch.Tensor, lse: torch.Tensor, tgt: torch.Tensor, coef: torch.Tensor, softcap: torch.Tensor,
                   inv_sg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    N, V = z.shape
    gq = torch.empty(N, V, device=z.device, dtype=E5M2)
    gqt = torch.empty(V, N, device=z.device, dtype=E5M2)
    args = (z, lse, tgt, coef, softcap, inv_sg, gq, gqt, N, V, tgt.size(1))
    key = (N, V, tgt.size(1), z.device.index)
    _GRAD_VARIANTS[_TUNING.pick(key, {name: partial(run, *args) for name, run in _GRAD_VARIANTS.items()})](*args)
    return gq, gqt


_TUNING = FastestBuild("head gradient pass", "SPEEDRUN_HEAD_TUNING_LOG", "set model.use_fp8=false")


def _fused(bm, bn, warps, z, lse, tgt, coef, softcap, inv_sg, gq, gqt, N, V, K):
    triton, _, kernel, _ = _kernels()
    kernel[(triton.cdiv(N, bm), triton.cdiv(V, bn))](z, lse, tgt, coef, softcap, inv_sg, gq, gqt, N, V,
                                                      K=K, BM=bm, BN=bn, TRANS=True, num_warps=warps)


def _split(bm, bn, warps, tm, tn, twarps, z, lse, tgt, coef, softcap, inv_sg, gq, gqt, N, V, K):
    triton, _, kernel, transpose = _kernels()
    kernel[(triton.cdiv(N, bm), triton.cdiv(V, bn))](z, lse, tgt, coef, softcap, inv_sg, gq, gqt, N, V,
                                                      K=K, BM=bm, BN=bn, TRANS=False, num_warps=warps)
    transpose[(triton.cdiv(N, tm), triton.cdiv(V, tn))](gq.view(torch.uint8), gqt.view(torch.uint8), N, V,
                                                         BM=tm, BN=tn, num_warps=twarps)


# the gradient pass either writes both layouts (fused) or the row-major one then transposes it (split); which
# tiles and which of the two is fastest is measured once per shape on the machine (kernel_tuning); every candidate
# compiles in a cold process, so only the two fastest fused tilings stay (on an H200 the split builds lead, the
# fused ones 1.4-3x slower: benchmarks/kernel_builds.py)
_GRAD_VARIANTS = {
    **{f"fused{bm}x{bn}w{w}": partial(_fused, bm, bn, w)
       for bm, bn, w in [(64, 64, 4), (32, 128, 4)]},
    **{f"split{bm}x{bn}w{w}": partial(_split, bm, bn, w, 64, 64, 4)
       for bm, bn, w in [(16, 256, 4), (32, 256, 4), (8, 512, 4), (64, 128, 4)]},
}


@_head_grad_fp8.register_fake
def _(z, lse, tgt, coef, softcap, inv_sg):
    N, V = z.shape
    return z.new_empty(N, V, dtype=E5M2), z.new_empty(V, N, dtype=E5M2)


def head_loss_and_grad(z: torch.Tensor, tgt: torch.Tensor, coef: torch.Tensor, softcap: torch.Tensor,
                       inv_sg: torch.Tensor | None, use_triton: bool):
    """(loss, gq, gq^T) for bf16 logits z (N, V); see the module docstring. inv_sg None: loss only."""
    if not use_triton:
        return reference_head_loss_and_grad(z, tgt, coef, softcap, inv_sg)
    z, tgt, coef, softcap = z.contiguous(), tgt.contiguous(), coef.contiguous(), softcap.float().contiguous()
    lse, loss_rows = _head_lse_loss(z, tgt, coef, softcap)
    if inv_sg is None:
        return loss_rows.sum(), None, None
    gq, gqt = _head_grad_fp8(z, lse, tgt, coef, softcap, inv_sg.float().reshape(1))
    return loss_rows.sum(), gq, gqt
