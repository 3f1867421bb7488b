"""Record #89's MUDD routing and DC-MHA (speedrun.mudd, speedrun.dc_attention): the record preset lays out its
gates and coefficients as record #89's train_gpt.py does, has its parameter count, starts where it starts, and
DC-MHA's blocked computation equals the composition written out token by token."""

import pytest
import torch

from conftest import fast_tiny
from speedrun.config import TrainConfig
from speedrun.dc_attention import dc_correction
from speedrun.model import GPT
from speedrun.mudd import FINAL_START, LAST_LAYER_START
from speedrun.optim import build_groups
from speedrun.train import _Trainer

TINY_MUDD = {"model.mudd": True, "model.use_skip_connections": False, "model.xsa_layers": [1, 2],
             "model.dc_layers": [5], "model.dc_window": 12, "model.use_sa_lambdas": True}


def record_model() -> GPT:
    with torch.device("meta"):
        return GPT(TrainConfig.preset("record").model)


def test_the_gates_sit_where_record_89_puts_them():
    m = record_model().mudd
    pre, post = m.pre_slots, m.post_slots
    assert len(pre.start) == 26 and len(post.start) == 41
    span = lambda s: (s.start, s.stop)  # noqa: E731
    assert {k: {i: span(s) for i, s in v.items()} for k, v in pre.slots.items()} == {
        "xsa": {1: (0, 6), 3: (6, 12)}, "attn": {3: (12, 18)},
        "x0": {0: (18, 19), 1: (20, 21), 2: (22, 23), 3: (24, 25)},
        "bigram": {0: (19, 20), 1: (21, 22), 2: (23, 24), 3: (25, 26)}}
    assert {k: {i: span(s) for i, s in v.items()} for k, v in post.slots.items()} == {
        "xsa": {4: (0, 6), 7: (6, 12)}, "attn": {10: (12, 18)},
        "x0": {4: (18, 19), 5: (20, 21), 7: (22, 23), 8: (24, 25), 9: (26, 27)},
        "bigram": {4: (19, 20), 5: (21, 22), 7: (23, 24), 8: (25, 26), 9: (27, 28)},
        "skip": {6: (28, 29)}, "dc_w1": {10: (29, 35)}, "dc_w2": {10: (35, 41)}}
    # record #89's bias starts (its init_mudd_gate): attention gates 0.25, bigram 0.05, skip 0.5, DC's w1 1.0
    assert pre.start[12:18] == [0.25] * 6 and pre.start[19:26:2] == [0.05] * 4 and sum(pre.start) == pytest.approx(1.7)
    assert post.start[28] == 0.5 and post.start[29:35] == [1.0] * 6 and post.start[35:41] == [0.0] * 6


def test_the_record_preset_has_record_89s_parameters():
    """Record #89's count from its shapes (vocab padded to 50304, banks without their world-size padding), less
    what its file allocates and never reads; ours allocates only what it uses."""
    V, D, L, H = 50304, 768, 11, 6
    banks = 2 * 5 * 6 * 256 * D + 10 * 2 * D * D + L * 2 * 3072 * D  # qk per head pair, v/o, MLP (11 real layers)
    embeddings = 2 * V * D + 5 * V * D + 377_280 * D  # lm_head, embed, value embeds, bigram
    small = 5 * H * 12 + 12 + 2 * L * 2 + (2 * L + 2)  # ve gates, smear gate, resid/post lambdas, scalars
    mudd = 2 * 64 * D + 2 * 14 * 64 + 2 * 14 + 1 + 2 * 64 * D + 2 * 41 * 64 + 2 * 41  # nets + one gate scale
    record_89 = banks + embeddings + small + mudd
    assert record_89 == 635_887_015
    # never read there: rows 5-13 of the final coefficient net and rows 26-40 of the pre-gate (weights and biases),
    # the last layer's value-embedding gate (its lanes come from MUDD), the SA lambdas of the attention-free layer
    unused = (14 - 5) * 65 + (41 - 26) * 65 + H * 12 + 2
    assert sum(p.numel() for p in record_model().parameters()) == record_89 - unused


def test_the_routing_starts_at_record_89s_values():
    torch.manual_seed(0)
    m = GPT(fast_tiny(16, **TINY_MUDD).model).mudd
    x = torch.randn(2, 5, 128)
    assert torch.allclose(m.last_layer(x), torch.tensor(LAST_LAYER_START).expand(2, 5, -1), atol=1e-6)
    assert torch.allclose(m.final(x), torch.tensor(FINAL_START, dtype=torch.float32).expand(2, 5, -1), atol=1e-6)
    gates = {}
    m.gates(x, True, gates)
    assert torch.allclose(gates["skip"][3], torch.full((2, 5, 1), 0.5)) and gates["dc_w2"][5].abs().max() == 0


def naive_dc(q, k, v, segment, w1, w2, window, scale):
    B, T, H, _ = q.shape
    out = torch.zeros_like(v)
    for b in range(B):
        for t in range(T):
            keys = [s for s in range(max(0, t - window + 1), t + 1) if segment[b, s] == segment[b, t]]
            probs = torch.stack([(q[b, t, h] @ k[b, keys, h].T * scale).softmax(-1) for h in range(H)])
            mix = w1[b, t] / w1[b, t].square().mean().add(1e-6).sqrt()
            pattern = (mix[:, None] * probs).sum(0)
            for h in range(H):
                out[b, t, h] = w2[b, t, h] * (pattern @ v[b, keys, h])
    return out


@pytest.mark.parametrize("T, window", [(23, 5), (40, 16), (7, 12)])
def test_dc_mha_equals_the_composition_written_out(T, window):
    torch.manual_seed(T)
    B, H, D = 2, 4, 8
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    w1, w2 = torch.randn(B, T, H), torch.randn(B, T, H)
    segment = torch.zeros(B, T, dtype=torch.long)
    segment[0, T // 3:] = 1  # two documents in row 0
    got = dc_correction(q, k, v, segment, w1, w2, window, 0.3)
    assert torch.allclose(got, naive_dc(q, k, v, segment, w1, w2, window, 0.3), atol=1e-5)
    assert dc_correction(q, k, v, segment, w1, torch.zeros_like(w2), window, 0.3).abs().max() == 0  # starts off


def test_the_optimiser_gives_mudd_its_groups():
    cfg = TrainConfig.preset("record")
    with torch.device("meta"):
        model = GPT(cfg.model)
    groups = {g.name: g for g in build_groups(model, cfg.optim)}
    ids = [id(p) for g in groups.values() for p in g.params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # each in exactly one group
    assert (groups["mudd"].lr_mult, groups["mudd_gate"].lr_mult) == (0.25, 0.1)
    assert groups["mudd_bias"].wd_mult == groups["mudd_gate_bias"].wd_mult == 0.0
    assert model.mudd.gate_scale in groups["mudd_gate_bias"].params
    assert (groups["resid_lambda"].lr_mult, groups["post_lambda"].lr_mult) == (5.0, 1.0)
    assert groups["resid_lambda"].betas == (0.9, 0.95) and groups["mudd"].betas == (0.9, 0.99)
    # record #89's value-embedding gates: lr x1 and decayed; its smear gate's weights: lr x0.01
    assert (groups["ve_gate"].lr_mult, groups["ve_gate"].wd_mult, groups["smear_gate"].lr_mult) == (1.0, 1.0, 0.01)
    assert len(groups["ve_gate"].params) == 4  # layers 1, 2, 8, 9 (layer 10's lanes come from MUDD)


def test_a_tiny_mudd_run_learns():
    trainer = _Trainer(fast_tiny(24, **TINY_MUDD), None, None)
    losses = [trainer.train_step(s).item() for s in range(24)]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.5


@pytest.mark.parametrize("sets, words", [
    ({"model.dc_layers": [5]}, "DC-MHA takes its weights from MUDD"),
    ({"model.mudd": True}, "MUDD replaces the U-net skips"),
    ({**TINY_MUDD, "model.mudd_attn_from": 5}, "must be a layer before the last"),
    ({**TINY_MUDD, "model.mudd_skip_from": 3}, "before the attention-free layer"),
])
def test_mudd_layouts_that_cannot_work_are_refused(sets, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig.preset("tiny").override(sets)


def test_the_routing_compiles_into_one_graph(tmp_path):
    """Dynamo captures MUDD, DC-MHA and the prefix-token loss whole (fullgraph), as the GPU's compiled path needs;
    the captured graph computes the eager loss. Prefix weights changing per step compile nothing new."""
    from torch._dynamo.testing import CompileCounter

    from speedrun.prefix import write_numeral_vocab

    torch._dynamo.reset()
    cfg = fast_tiny(16, **TINY_MUDD, **{"model.prefix_vocab": write_numeral_vocab(tmp_path / "n.tiktoken", 128)})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    model.prefix_table.copy_(torch.arange(128) // 10 - 1)  # any table will do: 0-9 none, 10-19 -> 0, ...
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    tokens = torch.randint(0, 127, (1, 256))
    tokens[0, ::60] = 127
    args = (tokens, tokens.roll(-1, 1), torch.tensor([1.0, 0.5]), (32, 96), 256, 127)
    for weight in (0.25, 0.1):
        loss = compiled(*args, prefix_weight=torch.tensor(weight))
        loss.backward()
        assert torch.allclose(loss, model(*args, prefix_weight=torch.tensor(weight)), rtol=1e-5)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_the_optimiser_steps_every_adam_group_in_one_compiled_graph():
    """MUDD adds six Adam groups (twelve in the record preset): one compiled Adam graph takes them all, so the
    compiled optimiser never hits dynamo's recompile limit (a graph per group did, at eight)."""
    from torch._dynamo.testing import CompileCounter

    from speedrun.optim import SpeedrunOptimizer

    torch._dynamo.reset()
    cfg = fast_tiny(16, **TINY_MUDD)
    model = GPT(cfg.model)
    counter = CompileCounter()
    opt = SpeedrunOptimizer(model, cfg.optim, compile=counter)
    assert sum(g.kind == "adam" for g in opt.groups) >= 10
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        model.embed.weight.grad = None
        opt.step(1.0, 0.9, adam=True)
    assert counter.frame_count == len(opt.muon_buckets) + 1
    torch._dynamo.reset()
