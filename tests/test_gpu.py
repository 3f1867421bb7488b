"""GPU paths (skipped without CUDA): the record preset trains on one GPU; the attention kernel in bf16."""

import pytest
import torch

from conftest import numeral_vocab
from speedrun.attention import reference_attention, segment_ids, windowed_attention
from speedrun.config import TrainConfig
from speedrun.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_windowed_attention_bf16_on_gpu():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4096, 6, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    tokens = torch.randint(0, 50257, (1, 4096), device="cuda")
    tokens[0, ::700] = 50256
    seg = segment_ids(tokens, 50256, 2048)
    out = windowed_attention(q, k, v, seg, 384, 0.12).float()
    ref = reference_attention(q.double(), k.double(), v.double(), seg, 384, 0.12).float()
    assert (out - ref).norm() / ref.norm() < 1e-2


def test_record_preset_trains_on_one_gpu():
    """The full-size record model and optimiser, compressed schedule, on the sample corpus (no FineWeb here)."""
    cfg = TrainConfig.preset("record").with_total_steps(24).override({
        "data.source": "sample", "data.bos_id": 127, "model.prefix_vocab": numeral_vocab(), "data.val_tokens": 131072, "run.val_every": 8,
        "run.compile": False, "run.warmup_steps": 1})
    result = train(cfg)
    losses = [h["val_loss"] for h in result.history]
    assert losses[0] > 10 and losses[-1] < losses[0] - 4, losses
    assert result.peak_mem_bytes < 80 * 2**30


# ---- the fast path (issue 7) against the portable one -------------------------------------------------
import gc  # noqa: E402
import time  # noqa: E402

from speedrun.attention import flex_windowed_attention, sliding_block_mask  # noqa: E402
from speedrun.fp8 import fp8_linear  # noqa: E402
from speedrun.model import CausalSelfAttention  # noqa: E402
from speedrun.train import _Trainer  # noqa: E402


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_linear_matches_its_emulation_and_bf16():
    torch.manual_seed(2)
    x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(3072, 768, device="cuda") * 0.03).requires_grad_()
    g = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for name, f in [("mm", lambda: fp8_linear(x, w, emulate=False)), ("emu", lambda: fp8_linear(x, w, emulate=True)),
                    ("bf16", lambda: x @ w.bfloat16().t())]:
        y = f()
        outs[name] = (y, *torch.autograd.grad(y, (x, w), g))
    for a, b in zip(outs["mm"], outs["emu"]):
        assert _rel(a, b) < 1e-2  # the same quantised operands, fp32 accumulation either way
    for a, b in zip(outs["mm"], outs["bf16"]):
        assert _rel(a, b) < 1e-1  # e4m3 / e5m2 rounding


def test_delayed_fp8_mlp_matches_its_emulation_and_bf16():
    """The record's MLP (speedrun.fp8_mlp) through _scaled_mm: its emulation's numbers, bf16's within e4m3 rounding,
    the same scales kept for the next forward, and a backward equal to the emulation's (bf16 from the same post)."""
    from speedrun.fp8_mlp import DelayedScales, fp8_delayed_mlp

    torch.manual_seed(3)
    x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_fc = (torch.randn(3072, 768, device="cuda") * 0.03).requires_grad_()
    w_proj = (torch.randn(768, 3072, device="cuda") * 0.01).requires_grad_()
    g = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16)
    outs, states = {}, {}
    compiled = torch.compile(fp8_delayed_mlp, fullgraph=True)  # as the trainer runs it: Inductor lowers _scaled_mm
    for name, emulate, fused, fn in [("mm", False, False, fp8_delayed_mlp), ("fused", False, True, fp8_delayed_mlp),
                                     ("compiled", False, True, compiled), ("emu", True, False, fp8_delayed_mlp)]:
        states[name] = DelayedScales(1.8, 1.12).cuda()
        states[name].bootstrap.fill_(False)
        for _ in range(2):  # the second forward runs on the delayed scales
            y = fn(x, w_fc, w_proj, states[name], emulate=emulate, fused=fused)
        outs[name] = (y, *torch.autograd.grad(y, (x, w_fc, w_proj), g))
    bf16 = torch.relu(x @ w_fc.bfloat16().t()).square() @ w_proj.bfloat16().t()
    for name in ("mm", "fused", "compiled"):
        for a, b in zip(outs[name], outs["emu"]):
            assert _rel(a, b) < 1e-2
        assert _rel(outs[name][0], bf16) < 1e-1
        assert torch.allclose(states[name].next, states["emu"].next, rtol=1e-2)


@pytest.mark.parametrize("fused", [False, True])
def test_delayed_fp8_mlp_runs_eagerly_under_autocast(fused):
    """As the eager trainer calls it: forward under bf16 autocast, backward outside it. Autocast used to turn
    relu^2 (a pow) into fp32, and backward then met a bf16 gradient with it (a dtype error in g^T @ post)."""
    from speedrun.fp8_mlp import DelayedScales, fp8_delayed_mlp

    x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_fc = (torch.randn(3072, 768, device="cuda") * 0.03).requires_grad_()
    w_proj = (torch.randn(768, 3072, device="cuda") * 0.01).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fp8_delayed_mlp(x, w_fc, w_proj, DelayedScales(1.8, 1.12).cuda(), fused=fused)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(w_fc.grad).all() and w_fc.grad.abs().sum() > 0


@pytest.mark.parametrize("M", [49152, 4096 + 64])  # a record micro-batch; a shape the tiles do not divide
def test_fused_mlp_kernels_match_the_torch_path(M):
    """speedrun.mlp_kernels' two Triton kernels against _scaled_mm / bf16 matmul followed by the elementwise ops."""
    from speedrun.fp8 import E4M3, E4M3_MAX, quantize
    from speedrun.mlp_kernels import down_relu_square_grad, up_relu_square

    torch.manual_seed(4)
    x = torch.randn(M, 768, device="cuda", dtype=torch.bfloat16)
    xq, sx = quantize(x, E4M3, E4M3_MAX)
    wq, sw = quantize(torch.randn(3072, 768, device="cuda") * 0.03, E4M3, E4M3_MAX)
    post, amax = up_relu_square(xq, sx, wq, sw, torch.bfloat16, fused=True)
    ref_post, ref_amax = up_relu_square(xq, sx, wq, sw, torch.bfloat16, fused=False)
    assert _rel(post, ref_post) < 1e-2
    assert torch.allclose(amax, ref_amax, rtol=1e-2)
    g = torch.randn(M, 768, device="cuda", dtype=torch.bfloat16)
    w_proj = torch.randn(768, 3072, device="cuda", dtype=torch.bfloat16) * 0.01
    d_pre = down_relu_square_grad(g, w_proj, ref_post, fused=True)
    assert _rel(d_pre, down_relu_square_grad(g, w_proj, ref_post, fused=False)) < 1e-2


def _first_losses(overrides: dict, steps: int = 20) -> list[float]:
    cfg = TrainConfig.preset("record").override({
        "data.source": "sample", "data.bos_id": 127, "data.val_tokens": 65536, "run.warmup_steps": 0,
        "model.prefix_vocab": numeral_vocab(), **overrides})
    torch.cuda.reset_peak_memory_stats()
    trainer = _Trainer(cfg, None, None)
    t0 = time.perf_counter()
    losses = [trainer.train_step(s).item() for s in range(steps)]
    print(f"{overrides}: {steps} steps in {time.perf_counter() - t0:.1f}s (compile included), "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return losses


_PLAIN: list[float] = []
FAST_VARIANTS = {"fp8": {"run.compile": True, "model.use_fp8": True},  # the fast path as shipped
                 "bf16": {"run.compile": True, "model.use_fp8": False},  # compile + flex only
                 # and with the vocabulary tables stored in bf16, as record #89 stores them
                 "fp8-bf16-tables": {"run.compile": True, "model.use_fp8": True, "model.table_dtype": "bfloat16"}}
# the FP8 variants' largest difference over five cold H200 runs: 0.017 to 0.033, the largest a one-step spike
# (8.40 vs 8.67 at step 10, equal again at step 11) with the same numerics that gave 0.022 on the next machine
TOLERANCE = {"fp8": 4e-2, "bf16": 1e-2, "fp8-bf16-tables": 4e-2}


@pytest.mark.parametrize("variant", list(FAST_VARIANTS))
def test_fast_path_losses_match_the_plain_path(variant):
    """First 20 record steps on the same batches: eager + SDPA + bf16 against compile + flex (+ FP8)."""
    if not _PLAIN:
        _PLAIN.extend(_first_losses({"run.compile": False, "model.attn_kernel": "sdpa", "model.use_fp8": False}))
    plain, fast = _PLAIN, _first_losses(FAST_VARIANTS[variant])
    rel = max(abs(x - y) / y for x, y in zip(fast, plain))
    table = "\n".join([f"step plain {variant}"] + [f"{i} {x:.4f} {y:.4f}" for i, (x, y) in enumerate(zip(plain, fast))]
                      + [f"max relative difference over 20 steps: {rel:.4f}"])
    print("\n" + table)
    assert plain[-1] < plain[0] - 2, table
    assert rel < TOLERANCE[variant], table  # the table in the message: a failure's numbers reach any log


def test_knob_changes_between_trials_do_not_recompile():
    """Two trials of the compiled record preset in one process: the second compiles no new graph."""
    from torch._dynamo.utils import counters
    base = {"data.source": "sample", "data.bos_id": 127, "data.val_tokens": 65536, "run.warmup_steps": 0,
            "schedule.tokens_per_step": [65536] * 4, "model.prefix_vocab": numeral_vocab()}
    graphs = []
    for knobs in ({}, {"optim.muon_lr": 0.03, "optim.adam_lr": 0.01, "optim.muon_wd": 0.5, "optim.adam_wd": 0.01,
                       "optim.muon_momentum": 0.9, "model.softcap_scale": 20.0, "model.softcap_div": 7.0,
                       "schedule.stage_lr_mults": [1.2, 1.5, 1.7, 0.2], "schedule.mtp_start.0": [1.0, 0.4, 0.2],
                       "optim.embed_betas": [0.6, 0.9], "optim.muon_mlp_out_lr_mult": 3.0}):
        trainer = _Trainer(TrainConfig.preset("record").override({**base, **knobs}), None, None)
        for s in range(4):  # lr, momentum and MTP weights change every step
            trainer.train_step(s)
        torch.cuda.synchronize()
        graphs.append(counters["stats"]["unique_graphs"])
        del trainer
        gc.collect()
    print("unique graphs after trial 1, 2:", graphs)
    assert graphs[1] == graphs[0]



def test_growing_windows_compile_one_graph():
    """public-2508 grows its windows at 13 stage boundaries; the compiled forward takes them as a tensor, so
    stepping through every stage (same batch shape) adds no graph after the first step's, and the loss falls."""
    from torch._dynamo.utils import counters
    cfg = TrainConfig.preset("public-2508").with_total_steps(28).override({
        "data.source": "sample", "data.bos_id": 127, "model.vocab_size": 128, "model.padded_vocab_size": 128,
        "data.val_tokens": 65536, "run.warmup_steps": 0, "schedule.tokens_per_step": [49152] * 15})
    trainer = _Trainer(cfg, None, None)
    losses = [trainer.train_step(0).item()]
    torch.cuda.synchronize()
    after_first = counters["stats"]["unique_graphs"]
    losses += [trainer.train_step(s).item() for s in range(1, 28)]
    torch.cuda.synchronize()
    print("unique graphs after step 0 and after all 14 window sizes:", after_first, counters["stats"]["unique_graphs"])
    assert counters["stats"]["unique_graphs"] == after_first
    assert losses[-1] < losses[0] - 1

def test_fused_fp8_head_on_gpu_matches_its_emulation():
    from speedrun.fp8 import fp8_head_loss
    torch.manual_seed(3)
    B, T, D, V = 1, 4096, 768, 50304
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, D, device="cuda") * 0.005).requires_grad_()
    targets = torch.randint(0, 50257, (B, T), device="cuda")
    weights = torch.tensor([1.0, 0.5, 0.25], device="cuda")
    softcap = torch.tensor([23.0, 5.0, 7.5], device="cuda")
    res = {}
    for emulate in (False, True):
        loss = fp8_head_loss(x, w, targets, weights, softcap, emulate=emulate)
        res[emulate] = (loss, *torch.autograd.grad(loss, (x, w)))
    assert abs(res[False][0] - res[True][0]) / res[True][0] < 1e-3
    for a, b in zip(res[False][1:], res[True][1:]):
        assert _rel(a, b) < 2e-2


@pytest.mark.parametrize("paired", [False, True])
def test_flex_attention_matches_the_sdpa_kernel(paired):
    torch.manual_seed(1)
    B, T, H, D, W = 1, 8192, 6, 128, 640
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    tokens = torch.randint(0, 50256, (B, T), device="cuda")
    tokens[tokens % 997 == 0] = 50256
    seg = segment_ids(tokens, 50256, 2048)
    scale = torch.tensor(0.12, device="cuda")
    attn = CausalSelfAttention.paired_attention if paired else (
        lambda q, k, v, s, w, sc: windowed_attention(q, k, v, s, w, sc))
    ref = attn(q, k, v, seg, W, scale)

    @torch.compile(fullgraph=True)
    def fast(q, k, v, seg):
        mask = sliding_block_mask(seg, W, paired)
        if paired:
            P = CausalSelfAttention
            return P.unpair(flex_windowed_attention(P.pair(q), P.pair(k), P.pair(v), mask, scale))
        return flex_windowed_attention(q, k, v, mask, scale)

    out = fast(q, k, v, seg)
    assert _rel(out, ref) < 1e-2
    g = torch.randn_like(out)
    g_ref = torch.autograd.grad(ref, (q, k, v), g)
    g_fast = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(g_fast, g_ref):
        assert _rel(a, b) < 2e-2


def test_head_kernels_match_their_torch_reference():
    """The two Triton passes of the fused head (speedrun.head_kernels) against the same maths in torch ops."""
    from speedrun.head_kernels import head_loss_and_grad, row_targets
    torch.manual_seed(4)
    B, T, V = 2, 4096, 50304
    z = (torch.randn(B * T, V, device="cuda") * 15).bfloat16()
    targets = torch.randint(0, 50257, (B, T), device="cuda")
    tgt, coef = row_targets(targets, torch.tensor([1.0, 0.5, 0.25], device="cuda"))
    softcap = torch.tensor([23.0, 5.0, 7.5], device="cuda")
    inv_sg = torch.tensor(57344 / (1.75 / (B * (T - 2)) * 23 / 30), device="cuda")
    fast = head_loss_and_grad(z, tgt, coef, softcap, inv_sg, use_triton=True)
    ref = head_loss_and_grad(z, tgt, coef, softcap, inv_sg, use_triton=False)
    assert abs(fast[0] - ref[0]) / ref[0] < 1e-5
    assert torch.equal(fast[2].t().view(torch.uint8), fast[1].view(torch.uint8))
    assert _rel(fast[1], ref[1]) < 1e-2
    flips = (fast[1].view(torch.uint8) != ref[1].view(torch.uint8)).float().mean().item()
    print(f"e5m2 entries that differ from torch's rounding: {flips:.2e}")
    assert flips < 1e-3
    assert head_loss_and_grad(z, tgt, coef, softcap, None, use_triton=True)[1] is None


@pytest.mark.parametrize("T,paired", [(2048, False), (1001, False), (1001, True)])
def test_fused_qk_norm_rope_matches_the_torch_ops(T, paired):
    """The Triton QK-norm + RoPE (speedrun.qk_kernels) against the torch ops in fp64: forward and the gradient,
    on a strided slice of a fused qkv output, eagerly and under torch.compile; 1001 tokens: a partial last program;
    paired: a paired-head layer's positions (2t + head % 2)."""
    from speedrun.model import Rotary
    from speedrun.qk_kernels import qk_norm_rope, reference_qk_norm_rope

    torch.manual_seed(0)
    rotary = Rotary(128, 1 / 1024, 0.12).cuda()
    rotary.yarn_extend(1024, 2048)
    qkv = (3 * torch.randn(2, T, 3, 6, 128, device="cuda")).bfloat16().requires_grad_()
    grad = torch.randn(2, T, 6, 128, device="cuda", dtype=torch.bfloat16)
    ref_in = qkv.detach().double().requires_grad_()
    ref = reference_qk_norm_rope(ref_in[:, :, 1], rotary.freq.double(), paired)
    ref.backward(grad.double())
    compiled = torch.compile(lambda t: qk_norm_rope(t[:, :, 1], rotary.freq, True, paired), fullgraph=True)
    for fn in (lambda t: qk_norm_rope(t[:, :, 1], rotary.freq, True, paired), compiled):
        qkv.grad = None
        out = fn(qkv)
        out.backward(grad)
        assert out.is_contiguous() and out.dtype == torch.bfloat16
        assert (out.double() - ref).norm() / ref.norm() < 5e-3
        g, g_ref = qkv.grad.double(), ref_in.grad
        assert g[:, :, 0].abs().max() == 0 and g[:, :, 2].abs().max() == 0  # only the k slice gets a gradient
        assert (g - g_ref).norm() / g_ref.norm() < 1e-2


def test_batches_reach_the_gpu_in_one_pinned_copy_unchanged():
    from speedrun.data import Batch, batches_to_device

    batches = [Batch(torch.arange(8).view(1, 8) + i, torch.arange(1, 9).view(1, 8) + i) for i in range(3)]
    moved = batches_to_device(batches, torch.device("cuda"))
    assert all(m.inputs.is_cuda and m.targets.is_cuda for m in moved)
    assert [(m.inputs.cpu().tolist(), m.targets.cpu().tolist()) for m in moved] == \
        [(b.inputs.tolist(), b.targets.tolist()) for b in batches]
    uneven = batches + [Batch(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.long))]
    assert [m.inputs.shape for m in batches_to_device(uneven, torch.device("cuda"))] == [b.inputs.shape for b in uneven]


def test_a_steps_rows_are_cut_into_pinned_memory_for_one_copy(tmp_path):
    """On a GPU the loader writes the step's rows into page-locked memory (a copy that does not wait for the
    GPU's queued work) and they arrive unchanged; the same rows as without pinning."""
    import numpy as np

    from speedrun.data import TrainLoader, write_shard

    ids = np.arange(10_000) % 97
    ids[::100] = 0  # BOS every 100 tokens
    shard = write_shard(tmp_path / "t_000.bin", ids)
    pinned = TrainLoader([shard], bos_id=0).next_step_rows(800, 200, pin=True)
    plain = TrainLoader([shard], bos_id=0).next_step_rows(800, 200)
    assert pinned.is_pinned() and not plain.is_pinned()
    moved = pinned.to("cuda", non_blocking=True)
    assert torch.equal(moved.cpu(), plain)
