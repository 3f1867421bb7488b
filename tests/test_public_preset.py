"""The `public-2508` preset: the architecture, optimisers and schedule of the public speedrun trainer of August
2025 (../shared/reference/public_train_gpt.py) built from the trainer's blocks and switches. Its parameter count is
the file's (from the file's shapes), a scaled-down copy with every one of its switches trains on CPU, and each
switch it needs does what it says."""

import math

import pytest
import torch

from speedrun.config import TrainConfig, public_2508_windows
from speedrun.model import GPT
from speedrun.optim import SpeedrunOptimizer, build_groups, newton_schulz, normuon_update
from speedrun.train import train

PUBLIC = TrainConfig.preset("public-2508")


def public_file_parameter_count(world_size: int = 1) -> int:
    """The public file's parameters, shape by shape (its line numbers): embed, 3 value embeddings and the untied
    lm_head, each 50304 x 768 (L662-672); per layer with attention (11 of 12, L643) qkvo_w 4 x 768 x 768 (L587)
    and the attention gate 6 x 12 (L597); per layer c_fc and c_proj, 768 x 3072 each (L625-626); `scalars`,
    5 x 12 padded to a multiple of the world size (L675-681)."""
    V, D, H, hidden, layers, attn_layers = 50304, 768, 6, 3072, 12, 11
    scalars = 5 * layers + (-5 * layers) % world_size
    return 5 * V * D + attn_layers * (4 * D * D + H * 12) + layers * 2 * D * hidden + scalars


def test_the_parameter_count_is_the_files():
    with torch.device("meta"):
        model = GPT(PUBLIC.model)
    ours = sum(p.numel() for p in model.parameters())
    # the file allocates 12 skip weights and an SA-lambda pair for layer 7 (no attention), and uses 6 and none:
    # 8 scalars it never reads, which this model does not have
    assert ours == public_file_parameter_count() - 8 == 275_743_564
    assert len(model.value_embeds) == 3 and [model.ve_bank[i] for i in (0, 1, 2, 9, 10, 11)] == [0, 1, 2, 0, 1, 2]
    assert model.blocks[7].attn is None and model.n_skip == 6
    assert model.blocks[0].attn.ve_gate is None and model.blocks[5].attn.ve_lambdas is not None


def test_the_schedule_is_the_files():
    s = PUBLIC.schedule
    assert s.total_steps == 1695 and s.cooldown_frac == 0.45 and s.final_lr_frac == 0.1
    # W = max(1, ceil(13.5 step / 1695)) blocks of 128 tokens (L922-928): 128 -> 1792 tokens; short = W // 2
    assert s.stage_starts[:3] == (0, 126, 252) and s.stage_starts[-1] == 1633
    assert s.long_windows[0] == 1 and s.long_windows[-1] == 14 and s.short_windows[-1] == 7
    assert set(s.tokens_per_step) == {393216} and set(s.max_seq_lens) == {49152}
    starts, shorts, longs = public_2508_windows(100)
    assert longs[-1] == 14 and len(starts) == 14 and starts[1] == 8  # ceil(13.5 * 8 / 100) = 2


def small_public(steps: int = 40) -> TrainConfig:
    """public-2508's switches at the tiny preset's size, on the sample corpus."""
    stages = PUBLIC.schedule.num_stages
    return PUBLIC.override({
        "model.vocab_size": 128, "model.padded_vocab_size": 128, "model.n_head": 2, "model.head_dim": 32,
        "model.dim": 64, "model.mlp_dim": 256, "model.block_size": 16, "data.source": "sample", "data.bos_id": 127,
        "data.val_tokens": 8192, "data.max_micro_batch_tokens": 1024, "data.val_micro_batch_tokens": 4096,
        "schedule.tokens_per_step": [2048] * stages, "schedule.max_seq_lens": [256] * stages,
        "optim.adam_eps": 1e-10, "run.warmup_steps": 0, "run.compile": False, "run.device": "cpu",
        "run.dtype": "float32", "run.val_every": 10, "run.log_every": 10,
    }).with_total_steps(steps).override({"optim.muon_momentum_warmup_steps": 300})


def test_a_small_copy_with_every_switch_learns_on_cpu():
    result = train(small_public())
    losses = [h["val_loss"] for h in result.history]
    assert result.status == "finished" and abs(losses[0] - math.log(128)) < 0.3  # zero lm_head: uniform at start
    assert losses[-1] < losses[0] - 1.0, losses


def test_optimiser_groups_follow_the_file():
    model = GPT(small_public().model)
    groups = {g.name: g for g in build_groups(model, PUBLIC.optim)}
    muon = {id(p) for p in groups["muon"].params}
    assert id(model.blocks[0].attn.gate) in muon  # the attention gate is a Muon matrix (L893)
    mult = dict(zip(map(id, groups["muon"].params), groups["muon"].per_param_lr_mult))
    assert mult[id(model.blocks[0].mlp.fc.weight)] == 0.5 and mult[id(model.blocks[0].mlp.proj.weight)] == 1.0
    assert groups["embed"].lr_mult == 75.0 and groups["head"].lr_mult == 1.0  # lr 0.6 and 0.008 (L684-688)
    assert groups["embed"].params == [model.embed.weight] and groups["head"].params == [model.lm_head.weight]
    sa = model.blocks[0].attn.ve_lambdas
    assert any(p is sa for p in groups["scalar"].params) and sa.tolist() == [0.5, 0.5]


def test_public_init_and_fp8_head_only():
    model = GPT(PUBLIC.model.__class__(**{**PUBLIC.model.__dict__, "padded_vocab_size": 50304, "n_layer": 2,
                                          "no_attn_layers": (), "long_window_layers": (0,), "value_embed_layers": (0,)}))
    assert model.lm_head.weight.abs().sum() == 0  # L672
    assert 0.95 < model.embed.weight.std().item() < 1.05 and 0.95 < model.value_embeds[0].weight.std().item() < 1.05
    model.set_fast_path(flex=False, fp8=True)
    assert model.lm_head.fp8 and not model.blocks[0].mlp.fc.fp8 and not model.blocks[1].mlp.proj.fp8


def test_quintic_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    s = torch.linalg.svdvals(newton_schulz(torch.randn(64, 32), 5))
    assert 0.6 < s.min() and s.max() < 1.25  # Muon's iteration: singular values near 1, not exactly 1


@pytest.mark.parametrize("normalise", [True, False])
def test_plain_muon_differs_from_normuon_only_by_the_normalisation(normalise):
    torch.manual_seed(0)
    p = torch.randn(8, 16)
    g = torch.randn(8, 16)
    g[0] *= 10  # one output neuron with a large gradient: NorMuon evens it out, Muon does not
    params, hp = [p.clone()], torch.tensor([1.0, 0.0, 0.0, 0.0])
    normuon_update(params, [g], [torch.zeros(8, 16)], [torch.zeros(1, 8, 1)], hp, 1, 5, False, normalise, "quintic")
    step = p - params[0]
    rms = step.square().mean(dim=1).sqrt()
    expected = newton_schulz(g, 5)
    if normalise:
        assert rms.max() / rms.min() < 1.05
    else:
        assert torch.allclose(step, expected, atol=1e-5)


def test_the_optimiser_runs_plain_muon_with_the_files_settings():
    cfg = small_public()
    model = GPT(cfg.model)
    opt = SpeedrunOptimizer(model, cfg.optim)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = model.blocks[0].attn.gate.detach().clone()
    opt.step(1.0, 0.85, adam=True)
    assert not torch.equal(before, model.blocks[0].attn.gate)
    assert "second_moment" in opt.state[model.blocks[0].attn.gate]


def fidelity_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "fidelity.py"
    spec = importlib.util.spec_from_file_location("fidelity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fidelity_benchmark_seeds_the_public_file_where_it_builds_its_model():
    from pathlib import Path

    fidelity = fidelity_module()
    source = "import torch\nargs = 1\nmodel: nn.Module = GPT(vocab_size=50257).cuda()\nfor m in model.modules(): pass\n"
    lines = fidelity.seeded_copy(source).splitlines()
    assert lines[2].endswith('_torch.manual_seed(int(_os.environ.get("SEED", "0")))') and lines[3].startswith("model:")
    with pytest.raises(ValueError, match="cannot seed"):
        fidelity.seeded_copy("x = 1\n")
    public = Path(__file__).resolve().parents[2] / "shared" / "reference" / "public_train_gpt.py"
    if public.exists():  # the real file (this project's machines): the line goes right before its GPT(...)
        seeded = fidelity.seeded_copy(public.read_text()).splitlines()
        at = next(i for i, line in enumerate(seeded) if "manual_seed(int(_os.environ" in line)
        assert "= GPT(" in seeded[at + 1]


def test_the_fidelity_shards_are_learnable_gpt2_tokens_under_finewebs_names(tmp_path):
    from speedrun.data import find_shards, read_shard

    fidelity = fidelity_module()
    folder = fidelity.write_fidelity_shards(tmp_path, train_tokens=60_000, val_tokens=20_000, shard_tokens=40_000)
    names = sorted(p.name for p in folder.glob("*.bin"))
    assert names == ["fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin"]
    val = read_shard(folder / "fineweb_val_000000.bin")
    assert val[0] == 50256 and val.max() <= 50256 and (val == 50256).sum() > 20  # BOS-separated documents
    assert len(set(val.tolist())) <= 128  # 127 symbols and BOS: a corpus the model can learn
    assert len(find_shards(folder, PUBLIC.data.train_pattern)) == 2  # our trainer finds them by FineWeb's pattern


def test_the_fidelity_table_measures_the_gap_in_seed_spreads(tmp_path):
    fidelity = fidelity_module()
    curves = {"public_seed1": (5.0, 4.00), "public_seed2": (5.0, 4.02), "ours_seed1": (5.0, 4.05), "ours_seed2": (5.0, 4.07)}
    for name, (first, last) in curves.items():
        (tmp_path / f"{name}.txt").write_text(f"step:0/100 val_loss:{first:.4f} train_time:0ms step_avg:0.00ms\n"
                                              f"step:100/100 val_loss:{last:.4f} train_time:70000ms step_avg:700.00ms\n")
    text = fidelity.table(tmp_path)
    # means 4.01 and 4.06, both stds 0.01414: a gap of 3.54 spreads
    assert "largest gap after step 0: 3.54 seed-spreads" in text
    assert "561.7k tokens/s" in text  # 100 x 393,216 tokens in 70 s


def test_the_fidelity_benchmark_spreads_seeds_over_gpu_pairs():
    fidelity = fidelity_module()
    assert fidelity.lanes([0, 1], [1, 2]) == [("public", 0, [1, 2]), ("ours", 1, [1, 2])]  # one after another
    assert fidelity.lanes([0, 1, 2, 3], [1, 2, 3]) == [("public", 0, [1, 3]), ("public", 1, [2]),
                                                      ("ours", 2, [1, 3]), ("ours", 3, [2])]
    assert fidelity.lanes([0, 1, 2, 3], [5]) == [("public", 0, [5]), ("ours", 2, [5])]
    with pytest.raises(SystemExit):
        fidelity.main(["--public", __file__, "--gpus", "0", "1", "2"])
