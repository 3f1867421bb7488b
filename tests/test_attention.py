"""The blocked sliding-window kernel equals full masked attention, for documents and windows of any size."""

import pytest
import torch

from speedrun.attention import reference_attention, segment_ids, windowed_attention


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
