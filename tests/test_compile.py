"""Knobs that need not change a shape reach compiled code as tensors: changing them compiles nothing new.

A counting torch.compile backend (it runs the captured graphs eagerly) counts the frames dynamo compiles
while MTP weights, softcap constants, the attention scale (YaRN), learning rates, weight decay, momentum,
betas and lr multipliers change between steps and between trials (a new model and optimiser). Runs on the
CPU (forward only through FlexAttention, which has no CPU backward) and, with CUDA, on the GPU.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from speedrun import schedule as S
from speedrun.config import TrainConfig
from speedrun.model import GPT
from speedrun.optim import SpeedrunOptimizer
from speedrun.train import _Trainer
from conftest import fast_tiny

@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own compilations (dynamo caches per code object across tests otherwise)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

TRIAL_KNOBS = [
    {},
    {"model.softcap_scale": 20.0, "model.softcap_shift": 4.0, "model.softcap_div": 7.0, "model.attn_scale": 0.1,
     "optim.muon_lr": 0.05, "optim.adam_lr": 0.01, "optim.muon_wd": 0.3, "optim.adam_wd": 0.01,
     "optim.muon_momentum": 0.9, "optim.muon_beta2": 0.8, "optim.embed_betas": [0.6, 0.9],
     "optim.value_embed_betas": [0.7, 0.9], "optim.scalar_betas": [0.8, 0.98], "optim.adam_eps": 1e-8,
     "optim.muon_mlp_out_lr_mult": 3.0, "optim.scalar_lr_mult": 2.0, "optim.embed_wd_mult": 50.0,
     "optim.value_embed_lr_mult": 20.0},
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flex", [False, True])
def test_model_knobs_do_not_recompile(device, flex):
    counter = CompileCounter()
    grad = device == "cuda"
    tokens = torch.randint(0, 127, (1, 512), device=device)
    tokens[0, ::50] = 127
    targets = torch.randint(0, 127, (1, 512), device=device)
    for trial, knobs in enumerate(TRIAL_KNOBS):
        cfg = TrainConfig.preset("tiny").override(knobs)
        torch.manual_seed(trial)
        model = GPT(cfg.model).to(device)
        model.set_fast_path(flex=flex, fp8=False)
        forward = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
        for step in range(3):
            mtp = torch.tensor([1.0, 0.5 - 0.2 * step, 0.25 - 0.1 * step], device=device)
            if step:
                model.rotary.yarn_extend(176 * step, 176 * (step + 1))
            with torch.set_grad_enabled(grad):
                loss = forward(tokens, targets, mtp, (80, 176), 256, 127)
            if grad:
                loss.backward()
            assert torch.isfinite(loss)
    assert counter.frame_count == 1, counter.frame_count


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_knobs_do_not_recompile(device):
    counter = CompileCounter()
    for trial, knobs in enumerate(TRIAL_KNOBS):
        cfg = TrainConfig.preset("tiny").override(knobs)
        model = GPT(cfg.model).to(device)
        opt = SpeedrunOptimizer(model, cfg.optim, compile=counter)
        before = [p.detach().clone() for p in model.parameters()]
        for step in range(4):
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            model.embed.weight.grad = None  # tied: the embedding has no gradient of its own yet
            opt.step(1.0 - 0.1 * step, 0.85 + 0.02 * step, adam=step % 2 == 1, adam_grad_scale=0.5)
        moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p is not model.embed.weight]
        assert all(moved)
        # one graph per Muon bucket (shape, split, multiplier) and one for every Adam parameter, compiled in the
        # first trial only
        assert counter.frame_count == len(opt.muon_buckets) + 1, (trial, counter.frame_count)


def test_compiled_optimizer_equals_eager():
    """The optimiser's update functions give the same parameters compiled (counting backend) and eager."""
    cfg = TrainConfig.preset("tiny")
    torch.manual_seed(0)
    a, b = GPT(cfg.model), GPT(cfg.model)
    b.load_state_dict(a.state_dict())
    opts = [SpeedrunOptimizer(a, cfg.optim), SpeedrunOptimizer(b, cfg.optim, compile=CompileCounter())]
    for step in range(3):
        grads = [torch.randn_like(p) for p in a.parameters()]
        for model, opt in zip((a, b), opts):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step(0.9, 0.9, adam=step % 2 == 1)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_bf16_tables_train_the_same_compiled():
    """With the vocabulary tables in bf16 (model.table_dtype), the model and the optimiser compiled through
    AOTAutograd (mixed-dtype parameters and gradients in its joint graph) give eager's losses."""
    cfg = fast_tiny(8, **{"model.table_dtype": "bfloat16"})
    eager = _Trainer(cfg, None, None)
    compiled = _Trainer(cfg, None, None, compile_backend="aot_eager")
    losses = [[t.train_step(s).item() for s in range(8)] for t in (eager, compiled)]
    assert losses[0][-1] < losses[0][0] - 2
    assert losses[1] == pytest.approx(losses[0], abs=1e-3)
    assert all(t.dtype == torch.bfloat16 for t in compiled.model.vocab_tables())


def test_untying_does_not_recompile():
    """Tied and untied steps run the same graph: the tie lives outside the forward (a copy and a gradient fold)."""
    counter = CompileCounter()
    cfg = TrainConfig.preset("tiny")
    model = GPT(cfg.model)
    assert model.tied
    forward = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    tokens = torch.randint(0, 127, (1, 256))
    for step in range(4):
        if step == 2:
            model.untie()
        loss = forward(tokens, tokens.roll(-1, 1), torch.ones(1), (64, 128), 256, 127)
        loss.backward()
        model.fold_tied_grad()
        assert (model.embed.weight.grad is None) == model.tied
    assert counter.frame_count == 1


def test_a_warmed_up_run_compiles_nothing_more():
    """After the warm-up, no training step of the schedule compiles anything: not a stage's shape, not the untying
    (the embedding then gets gradients of its own: the Adam step's parameter list must not change), not the last
    step. On the H200 a sweep trial of the record preset stalled for over 100 s at its untie step, in its timed run."""
    counter = CompileCounter()
    cfg = fast_tiny(16, **{"optim.adam_every": 2, "run.warmup_steps": 2, "model.untie_step": 9})
    trainer = _Trainer(cfg, None, None, compile_backend=counter)
    trainer.warmup()
    assert trainer.model.tied and all(p.grad is None for p in trainer.model.parameters())
    warm = counter.frame_count
    assert warm > 0
    for step in range(cfg.schedule.total_steps):
        trainer.train_step(step)
    assert not trainer.model.tied
    assert counter.frame_count == warm


def test_validations_in_every_stage_compile_nothing_after_the_warm_up():
    """Off the FlexAttention path windows are ints, so each stage's validation is a graph of its own; with 1,280
    validation tokens in 512-token forwards the last batch is filled up to the same shape: the warm-up compiles
    each validation once, so no validation of the run (the final one, at its own window, included) compiles."""
    counter = CompileCounter()
    cfg = fast_tiny(16, **{"run.warmup_steps": 1, "run.val_every": 3, "data.val_tokens": 1280,
                           "data.val_micro_batch_tokens": 512})
    assert len({(st.short_window, st.long_window) for st in S.all_stages(cfg.schedule)}) == 4
    after_warmup = []
    trainer = _Trainer(cfg, lambda m: after_warmup.append(counter.frame_count) if "startup_s" in m else None, None,
                       compile_backend=counter)
    result = trainer.run()
    assert result.status == "finished" and len(result.history) == 7
    assert after_warmup[0] > 0 and counter.frame_count == after_warmup[0]
