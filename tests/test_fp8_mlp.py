"""The MLP's FP8 forward with delayed scaling (record #89, `model.fp8_mlp_scaling=delayed`): its products, its
saturation when a delayed scale is too small, the scales it keeps, the weight's bootstrap, its bf16-style
backward, and a CPU run through the emulated FP8 path in which switching it off changes the run. The GPU runs the
same maths on the FP8 tensor cores (tests/test_gpu.py: fast path vs eager)."""

import torch
import torch.nn.functional as F

from conftest import fast_tiny
from speedrun.config import TrainConfig
from speedrun.fp8 import E4M3, E4M3_MAX, quantize, scaled_mm
from speedrun.fp8_mlp import DelayedScales, fp8_delayed_mlp
from speedrun.train import _Trainer


def operands(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 32, generator=g).requires_grad_()
    w_fc = (0.1 * torch.randn(128, 32, generator=g)).requires_grad_()
    w_proj = (0.1 * torch.randn(32, 128, generator=g)).requires_grad_()
    return x, w_fc, w_proj


def quantised_post(x, w_fc):
    """relu(x @ w_fc.T)^2 from the e4m3 operands under their current scales (the up-projection as the GPU runs it)."""
    xq, sx = quantize(x.detach(), E4M3, E4M3_MAX)
    wq, sw = quantize(w_fc.detach(), E4M3, E4M3_MAX)
    return torch.relu(scaled_mm(xq, sx, wq.t(), sw, torch.float32, emulate=True)).square()


def down(post, w_proj, s_act, s_w):
    """The down-projection of e4m3 operands under given scales, saturating at +-448."""
    pq = (post / s_act).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * s_act
    wq = (w_proj.detach() / s_w).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * s_w
    return pq @ wq.t()


def test_first_forward_uses_current_scales_and_keeps_the_next_ones():
    x, w_fc, w_proj = operands()
    state = DelayedScales(1.8, 1.12)
    y = fp8_delayed_mlp(x, w_fc, w_proj, state, emulate=True)
    post = quantised_post(x, w_fc)
    amax = torch.stack([post.amax(), w_proj.detach().abs().amax()])
    assert torch.allclose(y, down(post, w_proj, *(amax / E4M3_MAX)), rtol=1e-5, atol=1e-6)
    assert torch.allclose(state.next, amax * torch.tensor([1.8, 1.12]) / E4M3_MAX)
    exact = F.linear(F.relu(F.linear(x, w_fc)).square(), w_proj)
    assert ((y - exact).norm() / exact.norm()).item() < 0.08  # e4m3's 3 mantissa bits, averaged


def test_later_forwards_use_the_delayed_scales_and_saturate_what_outgrew_them():
    x, w_fc, w_proj = operands()
    state = DelayedScales(1.8, 1.12)
    state.bootstrap.fill_(False)
    fp8_delayed_mlp(x, w_fc, w_proj, state, emulate=True)
    delayed = state.next.clone()
    y = fp8_delayed_mlp(3 * x, w_fc, w_proj, state, emulate=True)  # post grows 9x: beyond the 1.8 headroom
    post = quantised_post(3 * x, w_fc)
    assert (post / delayed[0]).amax() > E4M3_MAX  # it really saturates
    assert torch.allclose(y, down(post, w_proj, *delayed), rtol=1e-5, atol=1e-5)
    current = down(post, w_proj, post.amax() / E4M3_MAX, w_proj.detach().abs().amax() / E4M3_MAX)
    assert (y - current).abs().max() > 1e-2  # not what current scaling gives
    assert torch.allclose(state.next[0], post.amax() * 1.8 / E4M3_MAX)  # and the next scale follows


def test_the_weight_scale_is_current_while_bootstrapping():
    x, w_fc, w_proj = operands()
    state = DelayedScales(1.8, 1.12)
    fp8_delayed_mlp(x, w_fc, w_proj, state, emulate=True)
    state.next[1] = 1e-6  # a weight scale far too small (as after the zero-initialised start)
    kept = state.next.clone()
    booting = fp8_delayed_mlp(x, w_fc, w_proj, state, emulate=True)
    post = quantised_post(x, w_fc)
    assert torch.allclose(booting, down(post, w_proj, kept[0], w_proj.detach().abs().amax() / E4M3_MAX),
                          rtol=1e-5, atol=1e-6)
    state.next.copy_(kept)
    state.bootstrap.fill_(False)
    delayed = fp8_delayed_mlp(x, w_fc, w_proj, state, emulate=True)
    assert torch.allclose(delayed, down(post, w_proj, kept[0], kept[1]), rtol=1e-5, atol=1e-6)
    assert delayed.abs().max() < 0.1 * booting.abs().max()  # every weight clamped to +-448e-6


def test_backward_is_the_unquantised_formula_at_the_forwards_activations():
    x, w_fc, w_proj = operands(1)
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    y = fp8_delayed_mlp(x, w_fc, w_proj, DelayedScales(1.8, 1.12), emulate=True)
    gx, g_fc, g_proj = torch.autograd.grad(y, (x, w_fc, w_proj), g)
    post = quantised_post(x, w_fc)
    d_pre = 2 * (g @ w_proj.detach()) * post.sqrt()
    assert torch.allclose(g_proj, g.t() @ post, rtol=1e-5, atol=1e-5)
    assert torch.allclose(g_fc, d_pre.t() @ x.detach(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(gx, d_pre @ w_fc.detach(), rtol=1e-5, atol=1e-5)


def test_the_record_preset_scales_its_mlp_delayed():
    m = TrainConfig.preset("record").model
    assert (m.fp8_mlp_scaling, m.fp8_act_headroom, m.fp8_weight_headroom, m.fp8_bootstrap_steps) == \
        ("delayed", 1.8, 1.12, 16)
    assert TrainConfig.preset("tiny").model.fp8_mlp_scaling == "current"


def fp8_run(scaling: str, steps: int = 8):
    """A tiny run through the FP8 path (emulated on the CPU; the trainer only turns it on on CUDA)."""
    trainer = _Trainer(fast_tiny(16, **{"model.fp8_mlp_scaling": scaling, "model.fp8_bootstrap_steps": 2}),
                       None, None)
    trainer.model.set_fast_path(flex=False, fp8=True)
    return trainer, [trainer.train_step(s).item() for s in range(steps)]


def test_delayed_scaling_changes_a_run_and_validation_leaves_its_scales_alone():
    trainer, delayed = fp8_run("delayed")
    _, current = fp8_run("current")
    assert delayed[-1] < delayed[0] - 0.3  # it trains
    assert delayed[0] == current[0]  # the zero-initialised down-projection: the same first loss
    assert max(abs(a - b) for a, b in zip(delayed, current)) > 1e-4
    scales = trainer.model.delayed_fp8_scales()
    assert len(scales) == trainer.cfg.model.n_layer and not scales[0].bootstrap  # past the 2 bootstrap steps
    before = [s.next.clone() for s in scales]
    assert all((b > 0).all() for b in before)
    trainer.validate(8, final=False)
    assert all(torch.equal(s.next, b) for s, b in zip(scales, before))
    trainer._reset()
    assert all((s.next == 0).all() for s in scales)


def test_dynamo_captures_it_whole_and_the_bootstrap_flag_compiles_nothing_new():
    """The compiled GPU path needs one full graph: the scales are buffers, the bootstrap a tensor flag."""
    from torch._dynamo.testing import CompileCounter

    from speedrun.model import GPT

    torch._dynamo.reset()
    cfg = fast_tiny(16, **{"model.fp8_mlp_scaling": "delayed"})
    torch.manual_seed(0)
    model, twin = GPT(cfg.model), GPT(cfg.model)
    with torch.no_grad():  # the down-projections start at zero: give them something to quantise
        for block in model.blocks:
            block.mlp.proj.weight.normal_(0, 0.02)
    twin.load_state_dict(model.state_dict())
    for m in (model, twin):
        m.set_fast_path(flex=False, fp8=True)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    tokens = torch.randint(0, 127, (1, 256))
    args = (tokens, tokens.roll(-1, 1), torch.tensor([1.0, 0.5]), (32, 96), 256, 127)
    for booting in (True, False, False):
        for m in (model, twin):
            for s in m.delayed_fp8_scales():
                s.bootstrap.fill_(booting)
        loss = compiled(*args)
        loss.backward()
        assert torch.allclose(loss, twin(*args), rtol=1e-5)
        assert all(torch.equal(a.next, b.next) for a, b in zip(model.delayed_fp8_scales(), twin.delayed_fp8_scales()))
    other = GPT(fast_tiny(16, **{"model.fp8_mlp_scaling": "delayed", "model.fp8_act_headroom": 3.0,
                                 "model.fp8_weight_headroom": 1.5}).model)
    other.set_fast_path(flex=False, fp8=True)  # a trial with other headrooms reuses the graph
    torch.compile(other, backend=counter, fullgraph=True, dynamic=False)(*args).backward()
    assert counter.frame_count == 1
    torch._dynamo.reset()
