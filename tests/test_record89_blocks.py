"""Blocks of record #89 built so far (DESIGN.md's list after record #89): the bigram embedding's xor hash and sign
trick, MUDD routing with learnable XSA, attention gates and DC-MHA taking their weights from it, SA lambdas, q and k
orthogonalised per pair of heads, and NorMuon's statistic along the longer side. Each does what it says, each is
on in the record preset, and switching any one off changes a run (tests/test_mudd.py: MUDD's own maths)."""

import pytest
import torch

from conftest import fast_tiny
from speedrun.config import TrainConfig
from speedrun.model import GPT, BigramHashEmbedding, CausalSelfAttention
from speedrun.optim import SpeedrunOptimizer, normuon_update
from speedrun.train import _Trainer

# on, off; tiny's layers for MUDD (skip from 1 into the attention-free 3, layer 4 as the `from` snapshot)
BLOCKS = {"model.bigram_hash": ("xor", "mul"), "model.bigram_sign_rows": (256, 0),
          "model.xsa_layers": ([1, 2, 5], []), "model.qk_head_pairs": (True, False),
          "optim.normuon_axis": ("larger", "rows"), "model.use_sa_lambdas": (True, False),
          "model.mudd": (True, False), "model.attn_gate_layers": ([2, 5], []), "model.dc_layers": ([5], []),
          "model.ve_gate_input": ("x_ve", "x"), "optim.smear_gate_lr_mult": (0.01, 100.0)}
# MUDD's gates start at their biases and learn at 0.1x Adam's lr: 50x here, so that 8 steps show what they route
TOGETHER = {"model.use_skip_connections": False, "model.dc_window": 12, "optim.mudd_gate_lr_mult": 5.0,
            "optim.mudd_lr_mult": 5.0}
OFF_ALSO = {"model.mudd": {"model.dc_layers": []}}  # DC-MHA's weights come from MUDD


def test_the_record_preset_has_them_on():
    r = TrainConfig.preset("record")
    assert (r.model.bigram_hash, r.model.bigram_buckets, r.model.bigram_sign_rows) == ("xor", 377_280, 8192)
    assert r.model.xsa_layers == (1, 3, 4, 7) and r.model.qk_head_pairs and r.optim.normuon_axis == "larger"
    assert r.model.mudd and not r.model.use_skip_connections and r.model.use_sa_lambdas
    assert (r.model.attn_gate_layers, r.model.dc_layers, r.model.dc_window) == ((3, 10), (10,), 112)
    assert (r.model.mudd_skip_from, r.model.mudd_attn_from, r.model.mudd_gate_layer) == (3, 7, 4)


def losses(overrides: dict, steps: int = 8) -> list[float]:
    trainer = _Trainer(fast_tiny(16, **overrides), None, None)
    return [trainer.train_step(s).item() for s in range(steps)]


@pytest.mark.parametrize("key", list(BLOCKS))
def test_switching_a_block_off_changes_the_run(key):
    on = {**TOGETHER, **{k: v[0] for k, v in BLOCKS.items()}}
    with_all = losses(on)
    without = losses({**on, key: BLOCKS[key][1], **OFF_ALSO.get(key, {})})
    assert with_all[0] == pytest.approx(without[0], abs=0.05)  # the same model at the start (zero-initialised)
    assert max(abs(a - b) for a, b in zip(with_all, without)) > 1e-5, key


def test_xor_hash_and_sign_trick():
    cfg = TrainConfig.preset("tiny").override({"model.bigram_hash": "xor", "model.bigram_sign_rows": 64}).model
    a, b = BigramHashEmbedding(cfg), BigramHashEmbedding(cfg)
    assert torch.equal(a.signs, b.signs) and set(a.signs.unique().tolist()) == {-1.0, 1.0}  # same on every rank
    tokens = torch.tensor([[5, 7, 9, 127, 3]])
    buckets = a.bucket(tokens, torch.nn.functional.pad(tokens[:, :-1], (1, 0)))
    expected = [(36313 * t ^ 27191 * p) % (cfg.bigram_buckets - 1) for p, t in [(5, 7), (7, 9), (9, 127), (127, 3)]]
    assert buckets[0, 0] == cfg.bigram_buckets - 1 and buckets[0, 1:].tolist() == expected
    torch.nn.init.ones_(a.embed.weight)
    out = a(tokens)
    assert torch.equal(out[0, 0], a.signs[0]) and torch.equal(out[0, 1], a.signs[(5 ^ 7) % 64])


def test_xsa_removes_the_part_along_the_own_value():
    cfg = TrainConfig.preset("tiny").override({"model.xsa_layers": [1]}).model
    attn = CausalSelfAttention(cfg, paired=False, key_offset=False, has_value_embed=False, xsa=True)
    y, v = torch.randn(2, 5, cfg.n_head, cfg.head_dim), torch.randn(2, 5, cfg.n_head, cfg.head_dim)
    assert torch.equal(attn.exclusive(y, v, attn.xsa_alpha.view(1, 1, -1, 1)), y)  # alpha 0 at the start: off
    with torch.no_grad():
        attn.xsa_alpha.fill_(20.0)  # tanh = 1: the whole component along v goes
    out = attn.exclusive(y, v, attn.xsa_alpha.view(1, 1, -1, 1))
    assert (out * v).sum(-1).abs().max() < 1e-4 and not torch.allclose(out, y)


def test_q_and_k_per_pair_of_heads_give_the_same_attention_and_are_orthogonalised_per_pair():
    base = TrainConfig.preset("tiny").model
    paired = TrainConfig.preset("tiny").override({"model.qk_head_pairs": True}).model
    torch.manual_seed(0)
    one, two = CausalSelfAttention(base, False, False, False), CausalSelfAttention(paired, False, False, False)
    with torch.no_grad():  # the same maps: q and k rows in qk, v apart
        two.qk.weight.copy_(one.qkv.weight[: 2 * base.dim])
        two.v.weight.copy_(one.qkv.weight[2 * base.dim :])
        two.proj.weight.copy_(torch.randn_like(two.proj.weight))
        one.proj.weight.copy_(two.proj.weight)
    from speedrun.attention import segment_ids
    from speedrun.model import LayerContext, Rotary
    x = torch.randn(1, 32, base.dim)
    ctx = LayerContext(segment_ids(torch.ones(1, 32, dtype=torch.long), 127, 32), 16,
                       Rotary(base.head_dim, base.rope_min_freq, base.attn_scale))
    assert torch.allclose(one(x, None, ctx), two(x, None, ctx), atol=1e-6)
    assert two.qk.weight.muon_split == base.n_head  # 2 x head_dim rows per pair, for q then for k
    rows = 2 * base.head_dim
    g = torch.randn(2 * base.dim, base.dim)
    params = [torch.zeros(2 * base.dim, base.dim)]
    normuon_update(params, [g], [torch.zeros_like(g)], [torch.zeros(base.n_head, rows, 1)],
                   torch.tensor([1.0, 0.0, 0.0, 0.0]), base.n_head, 5, False, False)
    for block in (-params[0]).view(base.n_head, rows, base.dim):
        s = torch.linalg.svdvals(block)
        assert s.min() > 0.5 and s.max() < 1.5  # each pair's block orthogonalised on its own


def test_normuon_keeps_its_statistic_along_the_longer_side():
    cfg = TrainConfig.preset("tiny").override({"optim.normuon_axis": "larger"})
    model = GPT(cfg.model)
    opt = SpeedrunOptimizer(model, cfg.optim)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step(1.0, 0.9, adam=True)
    proj = model.blocks[0].mlp.proj.weight  # (dim, mlp_dim): wide, a statistic per hidden unit (column)
    fc = model.blocks[0].mlp.fc.weight  # (mlp_dim, dim): tall, per row
    assert opt.state[proj]["second_moment"].shape == (1, 1, cfg.model.mlp_dim)
    assert opt.state[fc]["second_moment"].shape == (1, cfg.model.mlp_dim, 1)


@pytest.mark.parametrize("power", [1, 2])
def test_adam_decay_follows_the_lr_to_its_power(power):
    cfg = TrainConfig.preset("tiny").override({"optim.adam_wd_power": power, "optim.cautious_wd": False})
    model = GPT(cfg.model)
    opt = SpeedrunOptimizer(model, cfg.optim)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves a weight
    w = model.embed.weight if not model.tied else model.lm_head.weight
    before = w.detach().clone()
    opt.step(0.5, 0.9, adam=True)
    lr = cfg.optim.adam_lr * cfg.optim.embed_lr_mult * 0.5
    expected = 1 - lr ** power * cfg.optim.adam_wd * cfg.optim.embed_wd_mult
    assert torch.allclose(w, before * expected, rtol=1e-5)


def test_yarn_rescales_the_attention_by_its_slope():
    from speedrun.model import Rotary
    import math
    rot = Rotary(128, 1 / 1024, 0.1, yarn_slope=0.2)
    rot.yarn_extend(384, 896)
    assert rot.attn_scale.item() == pytest.approx(0.1 * (1 + 0.2 * math.log(896 / 384)))
    r = TrainConfig.preset("record").model
    assert (r.attn_scale, r.yarn_attn_slope, r.key_offset_dims) == (0.1, 0.2, 64)
