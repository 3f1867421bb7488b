"""GPU paths (skipped without CUDA): the record preset trains on one GPU; the attention kernel in bf16."""

import pytest
import torch

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
        "data.source": "sample", "data.bos_id": 127, "data.val_tokens": 131072, "run.val_every": 8,
        "run.compile": False, "run.warmup_steps": 1})
    result = train(cfg)
    losses = [h["val_loss"] for h in result.history]
    assert losses[0] > 10 and losses[-1] < losses[0] - 4, losses
    assert result.peak_mem_bytes < 80 * 2**30
