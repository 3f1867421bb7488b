"""The prefix-token loss (record #89): each token's prefix token from a vocabulary file in tiktoken's format, the
loss term on every head path (eager, chunked, the fused FP8 head), a run that trains with it, and clear errors
where the vocabulary is missing. The vocabularies here are written by the tests (GPT-2's needs the network)."""

import base64
import subprocess
import sys

import pytest
import torch

from conftest import fast_tiny
from speedrun.fp8 import fp8_head_loss, fp8_linear, softcap_logits
from speedrun.model import GPT, mtp_loss
from speedrun.prefix import VocabularyMissing, load_ranks, prefix_table, vocab_for_speed
from speedrun.train import _Trainer


def write_vocab(path, tokens: dict[bytes, int]) -> str:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for t, i in tokens.items()))
    return str(path)


def sample_vocab(tmp_path) -> str:
    """Byte strings for the sample corpus's 128 ids: ids 0-15 single letters, id 16+j extends id j // 7 by a letter,
    so that most ids have a prefix token (BOS, 127, has none)."""
    tokens = {bytes([97 + i]): i for i in range(16)}
    by_id = {i: t for t, i in tokens.items()}
    for i in range(16, 127):
        by_id[i] = by_id[(i - 16) // 7] + bytes([65 + i % 26]) + bytes([48 + i % 10])
        tokens[by_id[i]] = i
    return write_vocab(tmp_path / "sample.tiktoken", tokens)


def test_each_token_gets_its_longest_proper_prefix(tmp_path):
    ranks = {b"a": 0, b"ab": 1, b"abc": 2, b"abd": 3, b"b": 4, b"bcd": 5, b"abcde": 6, b"x": 9}
    ranks = load_ranks(write_vocab(tmp_path / "v.tiktoken", ranks))
    table = prefix_table(ranks, 8)
    # bcd has no "bc": its longest prefix that is a token is "b"; ids at or beyond the vocabulary are left out
    assert table.tolist() == [-1, 0, 1, 1, -1, 4, 2, -1]


def test_a_missing_or_malformed_vocabulary_is_refused_with_the_way_out(tmp_path):
    with pytest.raises(VocabularyMissing, match="no such file.*--set model.prefix_vocab= to train without"):
        load_ranks(str(tmp_path / "nope.tiktoken"))
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("YQ== 0\nnot-base64 x\n")
    with pytest.raises(VocabularyMissing, match="line 2 is not"):
        load_ranks(str(bad))
    try:  # GPT-2's through tiktoken: there where it can be downloaded, else the one-line refusal
        assert len(load_ranks("gpt2")) == 50256
    except VocabularyMissing as e:
        assert "model.prefix_vocab=gpt2" in str(e) and "r50k_base.tiktoken" in str(e) and "\n" not in str(e)
        # a speed benchmark times the same loss with a stand-in of GPT-2's size instead, and says so
        vocab, note = vocab_for_speed("gpt2", tmp_path)
        assert "stand-in" in note and (prefix_table(load_ranks(vocab), 50304) >= 0).sum() > 50000


def manual_prefix_loss(logits, prefix_targets, weight):
    valid = prefix_targets >= 0
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), prefix_targets.clamp_min(0).flatten(),
                                           reduction="none").view(prefix_targets.shape)
    return weight * torch.where(valid, ce, 0.0).mean()


def test_the_loss_term_on_every_head_path():
    torch.manual_seed(0)
    B, T, D, V = 2, 96, 64, 512
    x, w = torch.randn(B, T, D), torch.randn(V, D) * 0.3
    targets = torch.randint(0, V, (B, T))
    prefix = (torch.where(torch.rand(B, T) < 0.3, -1, torch.randint(0, V, (B, T))), torch.tensor(0.25))
    weights, softcap = torch.tensor([1.0, 0.5]), torch.tensor([23.0, 5.0, 7.5])
    logits = softcap_logits(fp8_linear(x, w, emulate=True), softcap)
    plain = mtp_loss(logits, targets, weights)
    with_prefix = mtp_loss(logits, targets, weights, prefix=prefix)
    assert torch.allclose(with_prefix - plain, manual_prefix_loss(logits, *prefix), atol=1e-5)
    fused = fp8_head_loss(x, w, targets, weights, softcap, emulate=True, prefix=prefix)
    assert torch.allclose(fused, with_prefix, atol=1e-4)


def test_the_chunked_head_adds_the_same_term(tmp_path):
    cfg = fast_tiny(16, **{"model.prefix_vocab": sample_vocab(tmp_path), "model.loss_chunk_tokens": 16}).model
    torch.manual_seed(0)
    model = GPT(cfg)
    x, targets = torch.randn(2, 64, cfg.dim), torch.randint(0, 128, (2, 64))
    prefix = (torch.where(targets % 3 == 0, -1, targets // 2), torch.tensor(0.5))
    whole = mtp_loss(model.logits(x), targets, (1.0, 0.5), capped=True, prefix=prefix)
    assert torch.allclose(model.head_loss(x, targets, (1.0, 0.5), prefix), whole, atol=1e-5)  # 4 chunks


def test_a_run_with_the_prefix_loss_learns_and_differs_from_one_without(tmp_path):
    on = {"model.prefix_vocab": sample_vocab(tmp_path), "schedule.prefix_start": [0.5, 0.5, 0.0, 0.0],
          "schedule.prefix_end": [0.5, 0.0, 0.0, 0.0]}
    runs = []
    for sets in (on, {}):
        trainer = _Trainer(fast_tiny(16, **sets), None, None)
        runs.append([trainer.train_step(s).item() for s in range(16)])
    with_prefix, without = runs
    assert (trainer.model.prefix_table is None) and with_prefix[0] > without[0] + 0.1  # the term is in the loss
    assert sum(with_prefix[-3:]) / 3 < with_prefix[0] - 0.5
    assert max(abs(a - b) for a, b in zip(with_prefix[12:], without[12:])) > 1e-4  # stages 2-3: no term, another run


def test_the_cli_refuses_a_missing_vocabulary_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "speedrun", "--preset", "tiny", "--steps", "4",
                          "--set", f"model.prefix_vocab={tmp_path}/none.tiktoken"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: model.prefix_vocab=")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
