"""The data a sweep or record attempt trains on, settled before Ray starts.

`--data DIR` always means that folder's FineWeb-format shards: they are validated (missing or corrupt ->
BadData, one line) and never written into. The generated sample corpus lives only under the cache
(`$SPEEDRUN_CACHE`). `measured()` says what a run's loss is measured on, for matching it with a track.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from speedrun.config import TrainConfig
from speedrun.data import ShardError, find_shards, val_fingerprint, validate_shards
from speedrun.train import data_patterns

from .records import Measured


class BadData(ValueError):
    """Data that cannot be used; the message names the folder and the fix."""


def fineweb_dir(data_flag: str | None) -> Path:
    return Path(data_flag or os.environ.get("SPEEDRUN_DATA", "data/fineweb10B")).expanduser().resolve()


def has_fineweb(data_flag: str | None) -> bool:
    try:
        return bool(find_shards(fineweb_dir(data_flag), TrainConfig().data.train_pattern))
    except ShardError:
        return False


def fineweb_overrides(cfg: TrainConfig) -> dict:
    """What a config trained on the sample corpus needs to read FineWeb shards: GPT-2's vocabulary, BOS and
    file names (the record preset's values)."""
    fw = TrainConfig()
    if cfg.data.source == "fineweb":
        return {}
    return {"data.source": "fineweb", "data.bos_id": fw.data.bos_id, "data.train_pattern": fw.data.train_pattern,
            "data.val_pattern": fw.data.val_pattern, "model.vocab_size": fw.model.vocab_size,
            "model.padded_vocab_size": max(cfg.model.padded_vocab_size, fw.model.padded_vocab_size)}


def prepare_data(cfg: TrainConfig, data_flag: str | None) -> dict:
    """Check (or, for the sample corpus, make under the cache) the data of `cfg`, and the vocabulary of its
    prefix-token loss; return the overrides that point every worker at the data. `data_flag` (--data) switches a
    sample-corpus config onto those FineWeb shards."""
    from speedrun.prefix import VocabularyMissing, load_ranks
    from speedrun.sample import ensure_sample_corpus

    overrides = {}
    if data_flag:
        overrides = fineweb_overrides(cfg)
        cfg = cfg.override(overrides)
    if cfg.data.source == "sample":
        folder = ensure_sample_corpus(None)
    else:
        folder = fineweb_dir(data_flag or cfg.data.data_dir or None)
    train_pattern, val_pattern = data_patterns(cfg)
    try:
        validate_shards(find_shards(folder, train_pattern))
        validate_shards(find_shards(folder, val_pattern))
    except (ShardError, OSError) as e:
        raise BadData(str(e)) from None
    try:  # here, before any trial: `gpt2` is downloaded into tiktoken's cache once, for the workers too
        if cfg.model.prefix_vocab:
            load_ranks(cfg.model.prefix_vocab)
    except VocabularyMissing as e:
        raise BadData(str(e)) from None
    return {**overrides, "data.data_dir": str(Path(folder).resolve())}


@dataclass
class Fingerprints:
    """sha256 of a folder's first N validation tokens, computed once per (folder, pattern, N)."""
    known: dict = field(default_factory=dict)

    def of(self, cfg: TrainConfig) -> str:
        _, pattern = data_patterns(cfg)
        key = (cfg.data.data_dir, pattern, cfg.data.val_tokens)
        if key not in self.known:
            try:
                self.known[key] = val_fingerprint(find_shards(cfg.data.data_dir, pattern), cfg.data.val_tokens)
            except (ShardError, OSError) as e:
                raise BadData(str(e)) from None
        return self.known[key]


def measured(cfg: TrainConfig, fingerprints: Fingerprints | None = None) -> Measured:
    """What a run of `cfg` (data_dir resolved) measures its loss and time on."""
    _, pattern = data_patterns(cfg)
    sha = fingerprints.of(cfg) if fingerprints is not None and cfg.data.data_dir else ""
    return Measured(cfg.data.source, pattern, cfg.data.val_tokens, cfg.schedule.total_steps, sha)
