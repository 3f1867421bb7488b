"""The corpus the embedded default trains on: made on the machine, learnable, with an exactly known floor.

The source is a seeded mixture of Markov chains. Each document starts with BOS, draws a hidden topic
uniformly, then emits symbols from that topic's sparse transition table; after each symbol the document
ends (BOS) with probability 1/mean_doc_len. A model must read earlier tokens of the document to tell the
topic, so attention matters. The floor is the loss of the Bayes-optimal predictor (exact posterior over
topics given the whole document so far) on the validation tokens: no model can beat it on average.

Shards are ordinary speedrun .bin shards, cached under $SPEEDRUN_CACHE (default ~/.cache/speedrun-sweeps).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .data import read_shard, shard_token_count, write_shard


SAMPLE_TRAIN_PATTERN = "sample_train_*.bin"
SAMPLE_VAL_PATTERN = "sample_val_*.bin"


@dataclass(frozen=True)
class SampleSpec:
    vocab_size: int = 128  # symbols 0..vocab_size-2, BOS = vocab_size-1
    topics: int = 4
    successors: int = 4  # nonzero entries per transition row
    dirichlet_alpha: float = 1.0
    mean_doc_len: int = 128
    train_tokens: int = 2_000_000
    train_shards: int = 2
    val_tokens: int = 131_072
    seed: int = 1234

    @property
    def bos_id(self) -> int:
        return self.vocab_size - 1

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


class MarkovMixture:
    """The generating source; also computes exact Bayes-optimal log-losses."""

    def __init__(self, spec: SampleSpec):
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        n_sym, K = spec.vocab_size - 1, spec.topics
        # trans[z, prev, next]: rows for every symbol and for BOS (the first symbol of a document).
        self.trans = np.zeros((K, spec.vocab_size, n_sym))
        for z in range(K):
            for prev in range(spec.vocab_size):
                nxt = rng.choice(n_sym, size=spec.successors, replace=False)
                self.trans[z, prev, nxt] = rng.dirichlet(np.full(spec.successors, spec.dirichlet_alpha))
        self.p_end = 1.0 / spec.mean_doc_len

    def generate(self, n_tokens: int, rng: np.random.Generator, lanes: int = 256) -> np.ndarray:
        """A stream of whole documents, BOS first, about n_tokens long (lanes are trimmed to whole documents)."""
        spec, bos = self.spec, self.spec.bos_id
        steps = n_tokens // lanes + 4 * spec.mean_doc_len
        cum = np.cumsum(self.trans, axis=-1)
        out = np.empty((lanes, steps), dtype=np.int64)
        prev = np.full(lanes, bos)
        topic = rng.integers(spec.topics, size=lanes)
        for t in range(steps):
            if t == 0:
                tok = np.full(lanes, bos)
            else:
                u = rng.random(lanes)
                sym = (u[:, None] > cum[topic, prev]).sum(axis=1).clip(max=cum.shape[-1] - 1)
                end = (prev != bos) & (rng.random(lanes) < self.p_end)
                tok = np.where(end, bos, sym)
            new_doc = tok == bos
            topic = np.where(new_doc, rng.integers(spec.topics, size=lanes), topic)
            out[:, t] = tok
            prev = tok
        pieces = []
        for lane in out:
            last_bos = np.flatnonzero(lane == bos)[-1]
            pieces.append(lane[:last_bos])  # whole documents; the next lane starts with BOS
        return np.concatenate(pieces)

    def bayes_loss(self, tokens: np.ndarray) -> float:
        """Mean -log p(tokens[t+1] | tokens[..t]) of the Bayes-optimal predictor (the floor), in nats."""
        bos, K = self.spec.bos_id, self.spec.topics
        prior = np.full(K, 1.0 / K)
        post = prior.copy()
        in_doc = tokens[0] == bos  # before the first BOS we know nothing of the topic either way
        total = 0.0
        for t in range(len(tokens) - 1):
            prev, nxt = int(tokens[t]), int(tokens[t + 1])
            if prev == bos:
                post, in_doc = prior.copy(), True
            p_end = 0.0 if prev == bos else self.p_end
            if nxt == bos:
                p = p_end
            else:
                like = self.trans[:, prev, nxt] * (1 - p_end)
                p = float(post @ like)
                if in_doc:
                    post = post * like
                    post /= post.sum()
            total -= np.log(max(p, 1e-300))
        return total / (len(tokens) - 1)


def cache_root() -> Path:
    return Path(os.environ.get("SPEEDRUN_CACHE", Path.home() / ".cache" / "speedrun-sweeps"))


def ensure_sample_corpus(directory: str | os.PathLike | None = None, spec: SampleSpec = SampleSpec()) -> Path:
    """Make the corpus once (idempotent, safe when several processes race); return its folder."""
    directory = Path(directory) if directory else cache_root() / f"sample-{spec.digest()}"
    meta = directory / "sample.json"
    if meta.exists():
        return directory
    source = MarkovMixture(spec)
    rng = np.random.default_rng(spec.seed + 1)
    per_shard = spec.train_tokens // spec.train_shards
    for i in range(spec.train_shards):
        write_shard(directory / f"sample_train_{i:06d}.bin", source.generate(per_shard, rng))
    val = source.generate(spec.val_tokens + 1, np.random.default_rng(spec.seed + 2))
    write_shard(directory / "sample_val_000000.bin", val)
    tmp = meta.with_suffix(".tmp" + str(os.getpid()))
    tmp.write_text(json.dumps({"spec": asdict(spec), "bos_id": spec.bos_id}, indent=1))
    os.replace(tmp, meta)
    return directory


def sample_floor(directory: str | os.PathLike, val_tokens: int) -> float | None:
    """The Bayes-optimal loss on the first val_tokens of the sample corpus (cached); None if not a sample corpus."""
    directory = Path(directory)
    meta_path = directory / "sample.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    key = str(val_tokens)
    if key in meta.get("floors", {}):
        return meta["floors"][key]
    spec = SampleSpec(**meta["spec"])
    val_path = directory / "sample_val_000000.bin"
    n = min(val_tokens, shard_token_count(val_path) - 1)
    floor = MarkovMixture(spec).bayes_loss(np.asarray(read_shard(val_path)[: n + 1]))
    meta.setdefault("floors", {})[key] = floor
    tmp = meta_path.with_suffix(".tmp" + str(os.getpid()))
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    return floor
