"""The FP8 maths of the GPU fast path, run here through its emulation (quantised operands, fp32 products)."""

import torch

from speedrun.fp8 import E4M3, E4M3_MAX, capped_logsumexp, fp8_head_loss, fp8_linear, quantize, softcap_logits
from speedrun.model import mtp_loss


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_quantize_uses_the_whole_e4m3_range():
    t = torch.randn(1000) * 3
    q, s = quantize(t, E4M3, E4M3_MAX)
    assert q.dtype == E4M3 and q.float().abs().max() == E4M3_MAX
    assert _rel(q.float() * s, t) < 0.05


def test_fp8_linear_is_close_to_the_plain_product():
    torch.manual_seed(0)
    x = torch.randn(64, 128, requires_grad=True)
    w = (torch.randn(96, 128) * 0.1).requires_grad_()
    y = fp8_linear(x, w, emulate=True)
    ref = x @ w.t()
    assert y.dtype == torch.bfloat16 and _rel(y.float(), ref) < 0.08
    g = torch.randn(64, 96)
    grads = torch.autograd.grad(y.float(), (x, w), g)
    assert grads[1].dtype == torch.float32  # the master weight's dtype
    for a, b in zip(grads, torch.autograd.grad(ref, (x, w), g)):
        assert _rel(a, b) < 0.15


def test_capped_logsumexp_equals_logsumexp():
    s = softcap_logits(torch.randn(4, 50, 1000) * 20, torch.tensor([23.0, 5.0, 7.5]))
    assert torch.allclose(capped_logsumexp(s), s.logsumexp(-1), atol=1e-5)


def test_fused_fp8_head_equals_fp8_lm_head_then_loss():
    """The fused head's loss equals lm_head-in-FP8 + softcap + mtp_loss; its gradients differ only by the
    e5m2 rounding of the logit gradient (scaled by its analytic bound instead of its amax)."""
    torch.manual_seed(0)
    B, T, D, V = 2, 96, 64, 512
    x = torch.randn(B, T, D, requires_grad=True)
    w = (torch.randn(V, D) * 0.3).requires_grad_()
    targets = torch.randint(0, V, (B, T))
    weights, softcap = torch.tensor([1.0, 0.5, 0.25]), torch.tensor([23.0, 5.0, 7.5])
    fused = fp8_head_loss(x, w, targets, weights, softcap, emulate=True)
    plain = mtp_loss(softcap_logits(fp8_linear(x, w, emulate=True), softcap), targets, weights)
    exact = mtp_loss(softcap_logits(x @ w.t(), softcap), targets, weights)
    assert torch.allclose(fused, plain, atol=1e-5) and abs(fused - exact) < 1e-2
    for a, b in zip(torch.autograd.grad(fused * 0.5, (x, w)), torch.autograd.grad(exact * 0.5, (x, w))):
        assert _rel(a, b) < 0.1
