"""The blocked sliding-window kernel equals full masked attention, for documents and windows of any size."""

import pytest
import torch

from speedrun.attention import reference_attention, segment_ids, sliding_block_mask, windowed_attention


@pytest.mark.parametrize("T, window", [(64, 8), (100, 16), (37, 64), (96, 1), (128, 48)])
def test_windowed_matches_reference(T, window):
    torch.manual_seed(T + window)
    B, H, D = 2, 3, 8
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    tokens = torch.randint(0, 20, (B, T))
    tokens[tokens < 3] = 99  # BOS about every 7 tokens
    seg = segment_ids(tokens, bos_id=99, max_seq_len=24)
    out = windowed_attention(q, k, v, seg, window, 0.3)
    ref = reference_attention(q, k, v, seg, window, 0.3)
    assert torch.allclose(out, ref, atol=1e-5)


def test_segments_split_documents_and_long_documents():
    tokens = torch.tensor([[5, 5, 9, 5, 5, 5, 5, 5, 9, 5]])
    seg = segment_ids(tokens, bos_id=9, max_seq_len=3)
    s = seg[0].tolist()
    assert s[0] == s[1]  # before the first BOS
    assert s[2] == s[3] == s[4] != s[1]  # a document starts at BOS
    assert s[5] == s[6] == s[7] != s[4]  # and is cut every max_seq_len tokens
    assert s[8] == s[9] != s[7]


@pytest.mark.parametrize("preset", ["tiny", "public-2508"])
def test_the_flex_path_takes_its_windows_as_a_tensor_and_equals_the_portable_path(preset):
    """The GPU fast path's masks from a window tensor (one compiled graph while the windows grow) give the portable
    kernel's loss; FlexAttention runs eagerly here (unfused), the same maths as on the GPU. Paired heads and the
    key offset are in the tiny preset, shared value embeddings and lambda mixing in public-2508."""
    from speedrun.config import TrainConfig
    from speedrun.model import GPT

    small = {"model.vocab_size": 128, "model.padded_vocab_size": 128, "model.n_head": 2, "model.head_dim": 32,
             "model.dim": 64, "model.mlp_dim": 128, "model.block_size": 16, "data.source": "sample", "data.bos_id": 127}
    cfg = TrainConfig.preset(preset).override(small if preset != "tiny" else {}).model
    torch.manual_seed(0)
    model = GPT(cfg)
    for p in model.parameters():  # zero-initialised projections and gates would hide the attention
        torch.nn.init.normal_(p, std=0.3)
    tokens = torch.randint(0, 127, (1, 129))
    tokens[0, ::23] = 127
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    windows = (32, 64)
    with torch.no_grad():  # FlexAttention has no backward on CPU
        portable = model(inputs, targets, (1.0,), windows, 128, 127)
        model.set_fast_path(flex=True, fp8=False)
        with_ints = model(inputs, targets, (1.0,), windows, 128, 127)
        with_tensor = model(inputs, targets, (1.0,), torch.tensor(windows, dtype=torch.int32), 128, 127)
        other = model(inputs, targets, (1.0,), torch.tensor((16, 32), dtype=torch.int32), 128, 127)
    assert torch.allclose(portable, with_ints, atol=1e-5) and torch.allclose(with_ints, with_tensor, atol=1e-6)
    assert not torch.allclose(other, with_tensor, atol=1e-4)  # the tensor's values are the windows used


def test_flex_attention_is_chosen_only_where_its_kernel_can_tile_the_mask():
    """On a compiling GPU, `auto` takes FlexAttention for the record's 128-token window unit and blocked SDPA for
    the tiny preset's 16 (Inductor refused to lower flex_attention on 16-token blocks on the H200); asking for flex
    there is refused in one line. Only the device's type is read: no GPU needed."""
    import torch

    from speedrun.config import TrainConfig
    from speedrun.train import fast_path_kernels

    gpu = torch.device("cuda")
    record = TrainConfig.preset("record")
    assert fast_path_kernels(record, gpu)[0]
    tiny = TrainConfig.preset("tiny").override({"run.compile": True})
    assert not fast_path_kernels(tiny, gpu)[0]
    with pytest.raises(ValueError, match="multiple of 128"):
        fast_path_kernels(tiny.override({"model.attn_kernel": "flex"}), gpu)
    assert not fast_path_kernels(record, torch.device("cpu"))[0]


@pytest.mark.parametrize("paired", [False, True])
def test_sliding_block_mask_orders_blocks_as_flex_attention_does_without_sorting(paired):
    """The BlockMask built from running counts holds the blocks in exactly the order FlexAttention's own stable
    argsorts give, on both sides (key blocks per query block; query blocks per key block, for the backward)."""
    from torch.nn.attention.flex_attention import BlockMask

    torch.manual_seed(0)
    tokens = torch.randint(0, 1000, (2, 4096))
    tokens[torch.rand(tokens.shape) < 1 / 700] = 1000
    mask = sliding_block_mask(segment_ids(tokens, 1000, 1024), 640, paired)
    ref = BlockMask.from_kv_blocks(mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
                                   mask.full_kv_indices, BLOCK_SIZE=128, mask_mod=mask.mask_mod)
    for num, idx in ((mask.kv_num_blocks, mask.kv_indices), (mask.full_kv_num_blocks, mask.full_kv_indices)):
        listed = torch.arange(idx.size(-1)) < num.unsqueeze(-1)
        dense = torch.zeros_like(idx, dtype=torch.bool).scatter_(-1, idx.long(), listed)
        assert 0 < dense.sum() < dense.numel() and torch.equal(dense.sum(-1), num)  # distinct blocks, some of each
        assert torch.equal(idx, torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).int())
    for name in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(mask, name), getattr(ref, name)), name
