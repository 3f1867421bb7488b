"""Targets of the prefix-token loss (record #89): every token's "prefix token", the vocabulary token whose byte
string is the longest proper prefix of the token's own. Record #89 also trains each position to predict the
prefix of its next token (weighted by the schedule's prefix weights); the table comes from the tokenizer's
vocabulary alone, never from the corpus.

The vocabulary (`model.prefix_vocab`): `gpt2` reads tiktoken's GPT-2 ranks (tiktoken downloads them once into
its cache, TIKTOKEN_CACHE_DIR); any other value is a path to a file in tiktoken's format (per line: the token's
bytes in base64, a space, its id), such as r50k_base.tiktoken (GPT-2's vocabulary in that format) copied to a
machine without network access.
"""

from __future__ import annotations

import base64
from pathlib import Path

import torch


class VocabularyMissing(ValueError):
    """The prefix loss's vocabulary cannot be read; the message says how to provide it or turn the loss off."""


OFF_HINT = "or --set model.prefix_vocab= to train without the prefix-token loss"
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"


def load_ranks(spec: str) -> dict[bytes, int]:
    """token bytes -> id, from tiktoken's GPT-2 encoding (`gpt2`) or a .tiktoken file."""
    if spec == "gpt2":
        try:
            import tiktoken

            return dict(tiktoken.get_encoding("gpt2")._mergeable_ranks)
        except Exception as e:  # no tiktoken, or no network for its first download
            raise VocabularyMissing(
                f"model.prefix_vocab=gpt2: tiktoken's GPT-2 vocabulary is not available ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:120] if str(e) else ''}); run once where tiktoken can download it, or fetch "
                f"{R50K_URL} (the same vocabulary in tiktoken's format) and --set model.prefix_vocab=PATH, "
                f"{OFF_HINT}") from None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise VocabularyMissing(f"model.prefix_vocab={spec}: no such file (expected `gpt2` or a .tiktoken file), "
                                f"{OFF_HINT}")
    ranks = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise VocabularyMissing(f"model.prefix_vocab={spec}: line {n} is not `<base64 token> <id>` "
                                        f"(tiktoken's format), {OFF_HINT}") from None
    return ranks


def prefix_table(ranks: dict[bytes, int], vocab_size: int) -> torch.Tensor:
    """(vocab_size,) int64: each id's prefix token id, -1 where it has none (one byte, or an id outside ranks)."""
    table = torch.full((vocab_size,), -1, dtype=torch.int64)
    for token, rank in ranks.items():
        if rank >= vocab_size:
            continue
        for n in range(len(token) - 1, 0, -1):  # longest proper prefix first
            parent = ranks.get(token[:n])
            if parent is not None and parent < vocab_size:
                table[rank] = parent
                break
    return table


def write_numeral_vocab(path: str | Path, size: int = 50257) -> str:
    """A stand-in vocabulary for machines without GPT-2's (tests, GPU benchmarks offline): token i's bytes are
    its decimal digits, so prefixes are as common as in a real BPE vocabulary ("12" is the prefix of "123") and
    the loss costs what it costs with GPT-2's. Never for a record: which token is whose prefix is made up."""
    Path(path).write_text("".join(f"{base64.b64encode(str(i).encode()).decode()} {i}\n" for i in range(size)))
    return str(path)


def vocab_for_speed(spec: str, folder: str | Path) -> tuple[str, str]:
    """(prefix_vocab, note) for a speed benchmark: `spec` itself where it loads, else the numeral stand-in written
    under `folder` (the same cost; the losses are not a record's), with a line saying so."""
    if not spec:
        return spec, ""
    try:
        load_ranks(spec)
        return spec, ""
    except VocabularyMissing:
        path = write_numeral_vocab(Path(folder) / "numerals.tiktoken")
        return path, f"prefix-token loss: {spec} not available here, timed with a stand-in vocabulary of its size"
