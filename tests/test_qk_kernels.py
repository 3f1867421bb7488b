"""QK-norm + RoPE (speedrun.qk_kernels) and sa_lambdas[0] applied through the qkv weight, on the CPU path.
The Triton kernels themselves are checked against this reference in tests/test_gpu.py."""

import torch
import torch.nn.functional as F

from speedrun.config import TrainConfig
from speedrun.model import GPT, CastedLinear, Rotary
from speedrun.qk_kernels import qk_norm_rope, reference_qk_norm_rope, rope


def test_reference_is_rms_norm_then_the_models_rotary():
    torch.manual_seed(0)
    rotary = Rotary(64, 1 / 1024, 0.12)
    rotary.yarn_extend(256, 512)  # frequencies as a run changes them
    x = torch.randn(2, 48, 3, 64)
    want = rotary(F.rms_norm(x, (64,)))
    assert torch.equal(reference_qk_norm_rope(x, rotary.freq), want)
    # off a GPU (or in fp32) the fused flag falls back to the same torch ops
    assert torch.equal(qk_norm_rope(x, rotary.freq, fused=True), want)
    # a rotation keeps each pair's length, so the norm survives it: every row has rms 1
    assert torch.allclose(want.square().mean(-1), torch.ones(2, 48, 3), atol=1e-5)


def test_rotation_moves_only_the_pairs_with_a_frequency():
    x = torch.randn(1, 8, 1, 16)
    freq = torch.tensor([1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    y = reference_qk_norm_rope(x, freq)
    n = F.rms_norm(x, (16,))
    still = [2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15]
    assert torch.allclose(y[..., still], n[..., still])
    assert not torch.allclose(y[0, 1:, 0, 0], n[0, 1:, 0, 0])  # position 0 never rotates, later ones do
    assert torch.allclose(y[0, 0], n[0, 0])


def test_scaled_weight_gives_the_scaled_product_and_a_gradient_for_the_scale():
    torch.manual_seed(0)
    lin = CastedLinear(32, 96)
    lam = torch.tensor(0.5, requires_grad=True)
    x = torch.randn(4, 32)
    out = lin(x, lam)
    assert torch.allclose(out, 0.5 * lin(x), atol=1e-6)
    out.square().sum().backward()
    # d/dlam of |lam * x W^T|^2 = 2 lam |x W^T|^2
    assert torch.allclose(lam.grad, 2 * 0.5 * lin(x).square().sum(), rtol=1e-5)


def test_record89_attention_trains_both_sa_lambdas_through_the_weights():
    cfg = TrainConfig.preset("tiny").override({"model.use_sa_lambdas": True, "model.use_qk_norm": True,
                                               "model.use_rope": True})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():  # output projections start at zero: open them so a gradient reaches q, k and v
        for b in model.blocks:
            if b.attn is not None:
                b.attn.proj.weight.normal_(std=0.02)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 256))
    loss = model(tokens, torch.roll(tokens, -1, 1), (1.0,), (64, 128), 256, cfg.data.bos_id)
    loss.backward()
    lams = [b.attn.sa_lambdas for b in model.blocks if b.attn is not None]
    assert lams and all(lam.grad is not None and (lam.grad != 0).all() for lam in lams)


def test_paired_heads_rotate_at_their_positions_in_the_doubled_sequence():
    """Record #89's paired-head layers: heads 2i and 2i+1 of token t sit at positions 2t and 2t+1 of the
    sequence they attend over, and rotate there (its paired Yarn tables): rotating then pairing must equal
    pairing then rotating that sequence at its own positions."""
    from speedrun.model import CausalSelfAttention

    torch.manual_seed(0)
    rotary = Rotary(64, 1 / 1024, 0.12)
    x = torch.randn(2, 24, 6, 64)
    pair = CausalSelfAttention.pair
    assert torch.allclose(pair(reference_qk_norm_rope(x, rotary.freq, paired=True)),
                          reference_qk_norm_rope(pair(x), rotary.freq), atol=1e-5)
    assert not torch.allclose(pair(reference_qk_norm_rope(x, rotary.freq)), reference_qk_norm_rope(pair(x), rotary.freq))
    assert torch.equal(rotary(x, paired=True), rope(x, rotary.freq, True))


def test_key_offset_moves_only_dims_that_rope_leaves_alone():
    """record: 64 of 128 key dims come from the previous token, all of them unrotated (as record #89 shifts its
    unrotated half); the rotated ones, and every dim of a document's first token, stay the key's own."""
    cfg = TrainConfig.preset("record").model
    from speedrun.model import CausalSelfAttention

    attn = CausalSelfAttention(cfg, paired=False, key_offset=True, has_value_embed=False)
    rotary = Rotary(cfg.head_dim, cfg.rope_min_freq, cfg.attn_scale)
    freq_of_dim = torch.cat([rotary.freq, rotary.freq])
    torch.manual_seed(0)
    k = torch.randn(1, 10, cfg.n_head, cfg.head_dim)
    segment = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = attn.offset_keys(k, segment)
    moved = attn.shifted_dims
    assert moved.sum() == cfg.key_offset_dims == 64 and (freq_of_dim[moved] == 0).all()
    assert torch.equal(out[..., ~moved], k[..., ~moved])
    assert torch.equal(out[0, 1:4][..., moved], k[0, 0:3][..., moved])
    assert (out[0, [0, 4]][..., moved] == 0).all()  # a document's first token has no previous one
