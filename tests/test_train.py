"""The training loop: loss falls, reports and results, the log format, divergence, silent no-op knobs."""

import math
import re

import pytest
import torch

from conftest import fast_tiny
from speedrun import schedule as S
from speedrun.config import TrainConfig
from speedrun.data import TrainLoader
from speedrun.model import GPT
from speedrun.train import _Trainer, micro_tokens_for, time_to_target, train


def test_tiny_learns_and_reports():
    cfg = TrainConfig.preset("tiny").with_total_steps(60).override({"data.val_tokens": 8192, "run.val_every": 20})
    reports, lines = [], []
    result = train(cfg, report=reports.append, log=lines.append)
    losses = [h["val_loss"] for h in result.history]
    assert [h["step"] for h in result.history] == [0, 20, 40, 60]
    assert abs(losses[0] - math.log(128)) < 0.1  # starts at ln(vocab)
    assert losses[-1] < losses[0] - 1.5 and losses == sorted(losses, reverse=True)
    assert result.status == "finished" and result.steps == 60 and result.tokens > 0
    assert result.floor is not None and 0.5 < result.floor < losses[-1]
    assert result.train_time_s > 0 and result.peak_mem_bytes > 0
    # report: start-up first, then train and validation metrics with the required keys
    assert {"compile_s", "startup_s"} <= reports[0].keys()
    assert any("train_loss" in r for r in reports) and sum("val_loss" in r for r in reports) == 4
    assert all({"step", "train_time_s", "tokens"} <= r.keys() for r in reports)
    times = [r["train_time_s"] for r in reports]
    assert times == sorted(times)
    pat = re.compile(r"^step:\d+/60 val_loss:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms$")
    assert sum(bool(pat.match(line)) for line in lines) == 4


def test_time_to_target_is_the_end_of_run_time_or_none():
    assert time_to_target(3.27, 73.8, 3.28) == 73.8  # ended below the target: the run's own end time
    assert time_to_target(3.28, 73.8, 3.28) == 73.8
    assert time_to_target(3.2801, 73.8, 3.28) is None  # whatever happened mid-run
    assert time_to_target(float("nan"), 10.0, 3.28) is None  # diverged


def test_micro_batch_split():
    assert micro_tokens_for(131072, 1, 49152) == 32768
    assert micro_tokens_for(393216, 8, 49152) == 49152
    assert micro_tokens_for(2048, 2, 1024) == micro_tokens_for(2048, 1, 1024) == 1024
    with pytest.raises(ValueError, match="divisible"):
        micro_tokens_for(1000, 3, 512)


def test_non_finite_loss_is_a_diverged_result():
    lines = []
    result = train(fast_tiny(**{"optim.adam_lr": 1e8}), log=lines.append)
    assert result.status == "diverged" and result.diverged
    assert math.isnan(result.val_loss) and result.steps < 16
    assert any("diverged" in line for line in lines)


# Knobs the search spaces change, with a second value; each must change the run.
SEARCHED_KNOBS = {
    "optim.muon_lr": 0.04, "optim.muon_wd": 0.1, "optim.muon_beta2": 0.5, "optim.muon_momentum": 0.9,
    "optim.muon_momentum_min": 0.7, "optim.muon_momentum_warmup_steps": 8, "optim.muon_momentum_cooldown_steps": 4,
    "optim.muon_mlp_out_lr_mult": 1.0, "optim.adam_lr": 0.02, "optim.adam_wd": 0.05,
    "optim.embed_lr_mult": 2.0, "optim.embed_wd_mult": 1.0, "optim.value_embed_lr_mult": 3.0,
    "optim.value_embed_wd_mult": 50.0, "optim.scalar_lr_mult": 1.0, "optim.embed_betas": [0.8, 0.95],
    "optim.value_embed_betas": [0.5, 0.9], "optim.scalar_betas": [0.8, 0.9],
    "model.softcap_scale": 15.0, "model.softcap_shift": 2.0, "model.softcap_div": 4.0,
    "model.attn_scale": 0.2, "model.untie_step": 3,
    "schedule.short_windows.0": 2, "schedule.short_windows.1": 1, "schedule.short_windows.2": 2,
    "schedule.short_windows.3": 2, "schedule.long_windows.0": 5, "schedule.long_windows.1": 4,
    "schedule.long_windows.2": 6, "schedule.long_windows.3": 7, "schedule.final_long_window": 8,
    "schedule.cooldown_frac": 0.2, "schedule.final_lr_frac": 0.5, "schedule.stage_starts.1": 3,
    "schedule.stage_starts.2": 7, "schedule.stage_lr_mults.1": 2.0, "schedule.stage_lr_mults.3": 1.0,
    "schedule.tokens_per_step.2": 1024, "schedule.mtp_start.0": [1.0, 0.2, 0.1],
}


@pytest.fixture(scope="module")
def baseline():
    return train(fast_tiny()).val_loss


@pytest.mark.parametrize("key", sorted(SEARCHED_KNOBS))
def test_searched_knob_changes_the_run(key, baseline):
    cfg = fast_tiny(**{key: SEARCHED_KNOBS[key]})
    assert cfg != fast_tiny(), f"{key} did not change the config"
    assert train(cfg).val_loss != baseline, f"{key} changed nothing in the run (a silent no-op)"


def test_architecture_switches_run_and_matter(baseline):
    for switch in ("use_value_embeds", "use_smear_gate", "use_bigram_embed", "use_skip_connections",
                   "use_paired_heads", "use_key_offset", "use_attn_gate", "use_qk_norm", "use_rope",
                   "use_yarn", "use_softcap"):
        r = train(fast_tiny(**{f"model.{switch}": False}))
        assert r.status == "finished" and r.val_loss != baseline, switch


def test_chunked_head_loss_equals_the_plain_loss():
    import torch

    from speedrun.model import GPT, mtp_loss
    cfg = TrainConfig.preset("tiny").override({"model.loss_chunk_tokens": 100})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    x = torch.randn(1, 333, cfg.model.dim, requires_grad=True)
    targets = torch.randint(0, 127, (1, 333))
    w = (1.0, 0.5, 0.25)
    chunked = model.head_loss(x, targets, w)
    plain = mtp_loss(model.logits(x), targets, w)
    assert torch.allclose(chunked, plain, atol=1e-5)
    g1, = torch.autograd.grad(chunked, x)
    g2, = torch.autograd.grad(plain, x)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_bf16_tables_stay_bf16_and_train_like_fp32_ones():
    """model.table_dtype=bfloat16 (record #89's storage of the vocabulary-sized tables): the tables and their
    gradients are bf16 through the tie, the untie and Adam's steps, Adam's moments and every other weight stay
    fp32, and the run learns as with fp32 tables, within bf16 rounding."""
    def run(table_dtype: str):
        trainer = _Trainer(fast_tiny(16, **{"model.table_dtype": table_dtype}), None, None)
        tables = trainer.model.vocab_tables()
        grad_dtypes = set()
        for t in tables:
            t.register_post_accumulate_grad_hook(lambda p: grad_dtypes.add(p.grad.dtype))
        return trainer, tables, grad_dtypes, [trainer.train_step(s).item() for s in range(16)]

    _, _, _, fp32_losses = run("float32")
    trainer, tables, grad_dtypes, losses = run("bfloat16")
    assert len(tables) >= 4 and not trainer.model.tied  # lm_head, embed, value and bigram tables; untied by now
    assert all(t.dtype == torch.bfloat16 for t in tables) and grad_dtypes == {torch.bfloat16}
    others = [p for p in trainer.model.parameters() if all(p is not t for t in tables)]
    assert others and all(p.dtype == torch.float32 for p in others)
    assert all(v.dtype == torch.float32 for st in trainer.opt.state.values() for v in st.values())
    assert losses[-1] < losses[0] - 2
    assert abs(losses[-1] - fp32_losses[-1]) < 0.05


def test_tied_gradient_is_the_shared_weights_gradient():
    """While tied, the folded lm_head gradient equals autograd's through one truly shared weight tensor, and the
    embedding's copy follows lm_head through optimiser steps until untie."""
    cfg = fast_tiny()
    model = GPT(cfg.model)
    tokens = torch.randint(0, 127, (2, 128))
    targets, mtp, args = tokens.roll(-1, 1), torch.tensor([1.0, 0.5]), ((64, 128), 128, 127)
    model(tokens, targets, mtp, *args).backward()
    model.fold_tied_grad()

    shared = model.lm_head.weight.detach().clone().requires_grad_()
    params = {n: p.detach() for n, p in model.named_parameters()} | {"lm_head.weight": shared, "embed.weight": shared}
    torch.func.functional_call(model, params, (tokens, targets, mtp, *args)).backward()
    assert model.embed.weight.grad is None
    torch.testing.assert_close(model.lm_head.weight.grad, shared.grad)

    trainer = _Trainer(cfg.override({"model.untie_step": 3}), report=None, log=None)
    for step in range(5):
        trainer.train_step(step)
        same = torch.equal(trainer.model.embed.weight, trainer.model.lm_head.weight)
        assert same == (step < 3), step


def test_warmup_visits_each_distinct_stage_shape_once():
    """Warm-up compiles every stage's graph: stages sharing a shape (here stages 3 and 4 of four) add no steps."""
    cfg = fast_tiny(**{"run.warmup_steps": 2, "schedule.short_windows": [1, 2, 3, 3], "schedule.long_windows": [2, 3, 4, 4],
                       "schedule.mtp_start": [[1.0]] * 4, "schedule.mtp_end": [[1.0]] * 4})
    trainer = _Trainer(cfg, report=None, log=None)
    steps = []
    real_step = trainer.train_step
    trainer.train_step = lambda step: steps.append(step) or real_step(step)
    trainer.warmup()
    assert len(steps) == 3 * 2, steps


def test_the_next_steps_batch_is_cut_ahead_without_changing_the_data_order():
    """Each step cuts the next step's batch before it returns (the host's work then overlaps the GPU's, also
    after a synchronisation); the batches are those a plain loader reads in order, across a stage boundary where
    the shape changes, and a step of another shape than the one cut ahead (as warm-up takes) rewinds first."""
    cfg = fast_tiny(16, **{"schedule.tokens_per_step": [1024, 2048, 2048, 2048]})
    sch = cfg.schedule
    trainer = _Trainer(cfg, None, None)
    reference = TrainLoader(trainer.train_paths, cfg.data.bos_id)
    boundary = S.all_stages(sch)[1].start
    for step in range(boundary + 2):
        trainer.train_step(step)
        reference.next_step_rows(S.stage_at(sch, step).tokens_per_step, 512)  # what this step read
        upcoming = S.stage_at(sch, step + 1).tokens_per_step
        shape, _, rows = trainer._prefetched
        assert shape == (upcoming, 512)
        state = reference.state()
        assert torch.equal(rows, reference.next_step_rows(upcoming, 512))
        reference.restore(state)
    other = 1024 if upcoming != 1024 else 2048
    assert torch.equal(trainer._host_rows(other, 512), reference.next_step_rows(other, 512))
    assert trainer._prefetched is None


UNIFORM_WINDOWS = {"schedule.max_seq_lens": [256] * 4, "schedule.short_windows": [1] * 4,
                   "schedule.long_windows": [3] * 4, "schedule.final_long_window": 3}


@pytest.mark.parametrize("stages", [{}, UNIFORM_WINDOWS], ids=["tiny-stages", "uniform-windows"])
def test_warm_up_then_reset_trains_exactly_like_no_warm_up(stages):
    """The untimed warm-up (every stage shape, then `_reset`) leaves nothing behind: with four micro-batches a
    step and Adam every other step (as the record), the losses after it equal a run that never warmed up, step
    for step. With uniform windows the warm-up's last step is not an Adam step, so Adam's gradients are still
    accumulating when it ends (on the H200 they leaked into the timed run's first Adam step)."""
    over = {"schedule.tokens_per_step": [2048] * 4, "data.max_micro_batch_tokens": 512, "optim.adam_every": 2,
            **stages}

    def losses(warmup_steps: int) -> list[float]:
        trainer = _Trainer(fast_tiny(16, **over, **{"run.warmup_steps": warmup_steps}), None, None)
        trainer.warmup()  # with 0 steps: nothing
        assert all(p.grad is None for p in trainer.model.parameters())
        return [trainer.train_step(s).item() for s in range(8)]

    cold, warmed = losses(0), losses(3)
    assert cold[-1] < cold[0] - 1
    assert warmed == cold


def test_validation_with_a_filled_last_batch_gives_the_same_loss():
    """2,000 validation tokens in 800-token forwards: the third holds 400 tokens and 400 of filler. After a few
    training steps (the model reads context), its loss equals the loss with that batch cut to its 400 tokens (the
    split before the filler existed): the filler counts nothing and changes nothing before it."""
    from speedrun.data import Batch
    from speedrun.train import _Trainer

    trainer = _Trainer(fast_tiny(8, **{"data.val_tokens": 2000, "data.val_micro_batch_tokens": 800}), None, None)
    for step in range(4):
        trainer.train_step(step)
    filled = trainer.val
    assert [b.targets.shape[1] for b in filled] == [800] * 3 and int((filled[-1].targets < 0).sum()) == 400
    loss_filled = trainer.validate(4, final=False)
    trainer.val = filled[:2] + [Batch(filled[2].inputs[:, :400], filled[2].targets[:, :400])]
    loss_cut = trainer.validate(4, final=False)
    assert loss_filled == pytest.approx(loss_cut, abs=1e-5)
    trainer.val = filled[:2] + [Batch(filled[2].inputs[:, :400], filled[2].targets[:, :400] * 0)]
    assert abs(trainer.validate(4, final=False) - loss_cut) > 0.01  # the comparison sees the last batch's targets


def test_validation_reads_whole_documents_as_the_record_does():
    """Record #89 validates whole documents (its eval attention's longest sequence is the forward's length), where
    training cuts them at the stage's max_seq_len: the validation loss does not depend on schedule.max_seq_lens."""
    from speedrun import schedule as S
    from speedrun.train import _Trainer

    cfg = fast_tiny(8, **{"schedule.max_seq_lens": [256] * 4, "data.val_tokens": 2048,
                          "data.val_micro_batch_tokens": 1024})
    t = _Trainer(cfg, None, None)
    for step in range(4):  # at init the attention's output projections are zero: no context matters yet
        t.train_step(step)
    at_256 = t.validate(4, final=False)
    t.cfg = cfg.override({"schedule.max_seq_lens": [1024] * 4})
    assert t.validate(4, final=False) == at_256
    # the control: cutting these batches' documents at 256 tokens (the old validation) changes their loss
    stage = S.stage_at(t.cfg.schedule, 4)
    with torch.no_grad():
        cut, whole = (t._loss(t.val[0], stage, t.val_mtp, stage.short_window, stage.long_window, max_seq_len=n).item()
                      for n in (256, 1024))
    assert abs(cut - whole) > 1e-6


def test_warm_up_logs_the_seconds_of_each_shape_it_compiles():
    """One line per distinct stage shape and per validation shape, each with its seconds (a trial's start-up,
    broken down: on a GPU these are the compilations)."""
    from speedrun import schedule as S

    cfg = TrainConfig.preset("tiny").override({"run.warmup_steps": 1})
    lines: list[str] = []
    _Trainer(cfg, None, lines.append).warmup()
    warm = [line for line in lines if line.startswith("warm-up: ")]
    stages = S.all_stages(cfg.schedule)
    shapes = {(s.tokens_per_step, s.max_seq_len, s.short_window, s.long_window) for s in stages}
    windows = {(s.short_window, s.long_window) for s in stages}
    assert len([w for w in warm if w.startswith("warm-up: stage ")]) == len(shapes) > 1, warm
    assert len([w for w in warm if "validation, windows" in w]) == len(windows), warm
    assert warm[-1].startswith("warm-up: final validation: ")
    assert all(float(w.rsplit(": ", 1)[1].removesuffix(" s")) >= 0 for w in warm)
