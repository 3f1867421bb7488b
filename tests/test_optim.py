"""Polar Express orthogonalisation, cautious weight decay, and the optimiser's parameter groups."""

import torch

from speedrun.config import TrainConfig
from speedrun.model import GPT
from speedrun.optim import SpeedrunOptimizer, build_groups, cautious_decay_, polar_express


def test_polar_express_is_near_orthogonal():
    torch.manual_seed(0)
    for shape in [(64, 64), (96, 32), (32, 128), (3, 48, 48)]:
        g = torch.randn(*shape)
        x = polar_express(g)
        # Polar Express maps every singular value above ~1e-3 of the norm into a band around 1.
        sg = torch.linalg.svdvals(g) / torch.linalg.matrix_norm(g).unsqueeze(-1)
        s = torch.linalg.svdvals(x)[sg > 2e-3]
        assert s.min() > 0.6 and s.max() < 1.3, (shape, s.min(), s.max())
        # the same directions as the exact polar factor U V^T
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        exact = u @ vh
        cos = (x * exact).sum() / (x.norm() * exact.norm())
        assert cos > 0.95


def test_cautious_decay_touches_only_sign_agreeing_entries():
    torch.manual_seed(0)
    p = torch.randn(50, 40)
    u = torch.randn(50, 40)
    before = p.clone()
    cautious_decay_(p, u, 0.1)
    agree = (u * before) > 0
    assert torch.equal(p[~agree], before[~agree])
    assert torch.allclose(p[agree], before[agree] * 0.9)
    assert agree.any() and (~agree).any()


def test_every_parameter_in_exactly_one_group():
    cfg = TrainConfig.preset("tiny")
    model = GPT(cfg.model)
    groups = build_groups(model, cfg.optim)
    seen = [id(p) for g in groups for p in g.params]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    names = {g.name: g for g in groups}
    assert all(p.ndim == 2 for p in names["muon"].params)
    assert names["value_embed"].lr_mult == cfg.optim.value_embed_lr_mult
    assert names["embed"].betas == cfg.optim.embed_betas
    assert 2.0 in names["muon"].per_param_lr_mult  # the MLP out-projections


def test_adam_every_other_step_and_muon_every_step():
    cfg = TrainConfig.preset("tiny")
    model = GPT(cfg.model)
    opt = SpeedrunOptimizer(model, cfg.optim)
    assert [opt.adam_due(s, 9) for s in range(10)] == [False, True] * 5
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    muon_p = opt.muon_params()[0]
    adam_p = model.blocks[0].lambdas
    m0, a0 = muon_p.detach().clone(), adam_p.detach().clone()
    opt.step(1.0, 0.9, adam=False)
    assert not torch.equal(muon_p, m0) and torch.equal(adam_p, a0)
    opt.step(1.0, 0.9, adam=True)
    assert not torch.equal(adam_p, a0)


def test_a_parameter_without_a_gradient_is_left_exactly_as_it_was_then_trains_like_a_fresh_one():
    """Adam's compiled step always takes every Adam parameter (one graph, tied or untied); one without a gradient
    (the embedding while tied) is inactive: neither it nor its state moves, weight decay included. Given a
    gradient later, it steps as a fresh Adam parameter would (its step count starts at 1)."""
    torch.manual_seed(0)
    cfg = TrainConfig.preset("tiny").override({"optim.embed_wd_mult": 100.0, "optim.adam_wd": 0.1,
                                               "optim.cautious_wd": False})
    model = GPT(cfg.model)
    opt = SpeedrunOptimizer(model, cfg.optim)
    embed, head = model.embed.weight, model.lm_head.weight
    frozen, head_before = embed.detach().clone(), head.detach().clone()
    grads = [torch.randn_like(embed) for _ in range(2)]
    for step in range(2):  # active: every Adam parameter but the embedding
        for p in opt.adam_params():
            p.grad = None if p is embed else torch.randn_like(p)
        opt.step(1.0, 0.9, adam=True)
    assert torch.equal(embed, frozen) and opt.state[embed]["t"].item() == 0
    assert not torch.equal(head, head_before) and opt.state[head]["t"].item() == 2
    assert not opt.state[embed]["exp_avg"].any() and not opt.state[embed]["exp_avg_sq"].any()

    fresh = torch.nn.Parameter(frozen.clone())  # the same steps on a lone Adam parameter of the embedding's group
    lone = torch.optim.Adam([fresh], lr=cfg.optim.adam_lr * cfg.optim.embed_lr_mult, betas=cfg.optim.embed_betas,
                            eps=cfg.optim.adam_eps)
    decay = (cfg.optim.adam_lr * cfg.optim.embed_lr_mult) ** cfg.optim.adam_wd_power * cfg.optim.adam_wd * 100.0
    for g in grads:
        for p in opt.adam_params():
            p.grad = g.clone() if p is embed else None
        opt.step(1.0, 0.9, adam=True)
        with torch.no_grad():
            fresh.mul_(1 - decay)
        fresh.grad = g.clone()
        lone.step()
    assert opt.state[embed]["t"].item() == 2
    assert not torch.equal(embed, frozen) and torch.allclose(embed, fresh, atol=1e-6)
