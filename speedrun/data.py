"""FineWeb-format token shards: write, read, validate, BOS-aligned distributed loading, and download.

A shard is a 256 x int32 header (magic 20240520, version 1, token count) followed by uint16 tokens.
Training batches are cut into micro-batches ("chunks") that each start at a BOS token; chunk j of a step
goes to rank j % world_size, so the global batch is the same for any world size and ranks never overlap.

    python -m speedrun.data download --train-shards 8 --dir data/fineweb10B
    python -m speedrun.data check --dir data/fineweb10B
    python -m speedrun.data fingerprint --dir data/fineweb10B   # sha256 of the 10,485,760 validation tokens
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
HF_REPO = "kjj0/fineweb10B-gpt2"


class ShardError(ValueError):
    """A shard or a data folder that cannot be used; the message says which and what to do."""


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> Path:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError("tokens must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, tokens.size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)  # readers never see a half-written shard
    return path


def shard_token_count(path: str | os.PathLike) -> int:
    """Validate the header and file size; return the number of tokens."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated shard ({size} bytes, smaller than the {HEADER_BYTES}-byte header); "
                         "re-download or regenerate it")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: wrong magic number {header[0]} (expected {MAGIC}): not a speedrun .bin shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if size != expected:
        raise ShardError(f"{path}: truncated or padded shard: header says {n} tokens ({expected} bytes), "
                         f"file has {size} bytes; re-download or regenerate it")
    return n


def read_shard(path: str | os.PathLike) -> np.ndarray:
    n = shard_token_count(path)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n,))


def find_shards(data_dir: str | os.PathLike, pattern: str) -> list[Path]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ShardError(f"data folder {data_dir} does not exist: pass --data DIR or run "
                         f"`python -m speedrun.data download --dir {data_dir}`")
    paths = sorted(Path(p) for p in glob.glob(str(data_dir / pattern)))
    if not paths:
        raise ShardError(f"no shards match {data_dir / pattern}: check --data or data.train_pattern/val_pattern")
    return paths


def validate_shards(paths: list[Path]) -> int:
    return sum(shard_token_count(p) for p in paths)


@dataclass
class Batch:
    inputs: torch.Tensor  # (1, T) int64
    targets: torch.Tensor  # (1, T) int64


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without stalling it: CUDA copies from pageable memory wait for the device to
    finish its queued work first (a GPU idle gap at every copy), copies from pinned memory do not."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def batches_to_device(batches: list[Batch], device: torch.device) -> list[Batch]:
    """Every micro-batch of a step in one copy (one pinned buffer), as views of one device tensor."""
    if device.type != "cuda" or not batches:
        return batches
    if len({b.inputs.shape for b in batches}) > 1:
        return [Batch(to_device(b.inputs, device), to_device(b.targets, device)) for b in batches]
    rows = to_device(torch.stack([torch.stack([b.inputs, b.targets]) for b in batches]), device)
    return [Batch(row[0], row[1]) for row in rows]


class TrainLoader:
    """Walks the training shards in order, cutting BOS-aligned chunks; each rank reads only its own."""

    def __init__(self, paths: list[Path], bos_id: int, rank: int = 0, world_size: int = 1):
        if not paths:
            raise ShardError("no training shards given")
        self.paths, self.bos_id, self.rank, self.world = list(paths), bos_id, rank, world_size
        self._shard_idx, self._pos = 0, 0
        self._load(0)

    def _load(self, idx: int) -> None:
        self._shard_idx = idx % len(self.paths)
        self.tokens = read_shard(self.paths[self._shard_idx])
        self.bos_positions = np.flatnonzero(self.tokens == self.bos_id)
        self._pos = 0

    def state(self) -> tuple[int, int]:
        return self._shard_idx, self._pos

    def restore(self, state: tuple[int, int]) -> None:
        if state[0] != self._shard_idx:
            self._load(state[0])
        self._pos = state[1]

    def _next_chunk_start(self, length: int) -> int:
        for _ in range(2 * len(self.paths) + 1):
            i = np.searchsorted(self.bos_positions, self._pos)
            if i < len(self.bos_positions) and self.bos_positions[i] + length + 1 <= len(self.tokens):
                return int(self.bos_positions[i])
            self._load(self._shard_idx + 1)
        raise ShardError(f"no BOS-aligned chunk of {length + 1} tokens in any training shard "
                         f"(bos_id={self.bos_id}): shards too small or wrong bos_id")

    def next_step_rows(self, tokens_per_step: int, micro_tokens: int, pin: bool = False) -> torch.Tensor:
        """This rank's chunks of the next global batch (tokens_per_step // micro_tokens chunks in all) as one
        (chunks, 2, micro_tokens) int64 host tensor, row j holding chunk j's inputs and targets, written in one
        pass (in page-locked memory with pin=True: one copy to the GPU that does not wait for its queued work)."""
        if tokens_per_step % micro_tokens:
            raise ValueError(f"tokens_per_step {tokens_per_step} is not a multiple of micro_tokens {micro_tokens}")
        chunks = tokens_per_step // micro_tokens
        mine = [j for j in range(chunks) if j % self.world == self.rank]
        rows = torch.empty((len(mine), 2, micro_tokens), dtype=torch.int64, pin_memory=pin)
        out = rows.numpy()
        k = 0
        for j in range(chunks):
            start = self._next_chunk_start(micro_tokens)
            self._pos = start + micro_tokens
            if j % self.world == self.rank:
                out[k, 0] = self.tokens[start : start + micro_tokens]
                out[k, 1] = self.tokens[start + 1 : start + micro_tokens + 1]
                k += 1
        return rows


def first_tokens(paths: list[Path], n: int) -> np.ndarray:
    """The first n tokens of the shards in order (memory-mapped where one shard holds them); ShardError if fewer."""
    arrays, have = [], 0
    for p in paths:
        if have >= n:
            break
        arrays.append(read_shard(p)[: n - have])
        have += len(arrays[-1])
    if have < n:
        raise ShardError(f"validation shards hold {have} tokens, fewer than the {n} needed: "
                         "lower data.val_tokens or add validation shards")
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def val_fingerprint(paths: list[Path], val_tokens: int) -> str:
    """sha256 of the first val_tokens validation tokens (uint16, little-endian): what a track was measured on."""
    import hashlib
    return hashlib.sha256(np.ascontiguousarray(first_tokens(paths, val_tokens), dtype="<u2").tobytes()).hexdigest()


def val_batches(paths: list[Path], val_tokens: int, micro_tokens: int, rank: int = 0,
                world_size: int = 1, pad_id: int = 0) -> list[Batch]:
    """The first val_tokens of the validation shards, contiguous, in chunks of micro_tokens; chunk j goes to rank
    j % world. A last chunk short of micro_tokens is filled up (inputs pad_id, targets -1, which the losses skip),
    so that every validation forward has one shape (one compiled graph). The model is causal: the filler after the
    last token changes no loss before it."""
    tokens = torch.from_numpy(first_tokens(paths, val_tokens + 1).astype(np.int64))
    out = []
    for j, a in enumerate(range(0, val_tokens, micro_tokens)):
        if j % world_size == rank:
            n = min(micro_tokens, val_tokens - a)
            inputs, targets = tokens[a : a + n], tokens[a + 1 : a + n + 1]  # views, but for the last chunk
            if n < micro_tokens:
                inputs = torch.cat([inputs, inputs.new_full((micro_tokens - n,), pad_id)])
                targets = torch.cat([targets, targets.new_full((micro_tokens - n,), -1)])
            out.append(Batch(inputs.unsqueeze(0), targets.unsqueeze(0)))
    return out


# ---- download --------------------------------------------------------------------------------
def shard_names(train_shards: int) -> list[str]:
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, train_shards + 1)]


def download(directory: str | os.PathLike, train_shards: int, repo_id: str = HF_REPO,
             endpoint: str | None = None) -> list[Path]:
    """Fetch the validation shard and the first `train_shards` training shards (skips valid local copies)."""
    from huggingface_hub import hf_hub_download  # only the download needs it

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    got = []
    for name in shard_names(train_shards):
        target = directory / name
        try:
            shard_token_count(target)
            got.append(target)
            continue
        except (FileNotFoundError, ShardError):
            pass
        path = hf_hub_download(repo_id=repo_id, filename=name, repo_type="dataset", local_dir=str(directory),
                               endpoint=endpoint)
        shard_token_count(path)
        got.append(Path(path))
        print(f"downloaded {name}", file=sys.stderr)
    return got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speedrun.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="fetch FineWeb GPT-2 token shards from the Hugging Face Hub")
    d.add_argument("--train-shards", type=int, default=8, help="training shards of 100M tokens (default 8)")
    d.add_argument("--dir", default="data/fineweb10B")
    d.add_argument("--repo", default=HF_REPO)
    c = sub.add_parser("check", help="validate every shard in a folder")
    c.add_argument("--dir", default="data/fineweb10B")
    c.add_argument("--pattern", default="*.bin")
    f = sub.add_parser("fingerprint", help="sha256 of the first N validation tokens (a track's val_sha256)")
    f.add_argument("--dir", default="data/fineweb10B")
    f.add_argument("--pattern", default="fineweb_val_*.bin")
    f.add_argument("--val-tokens", type=int, default=10_485_760)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "download":
            if args.train_shards < 0:
                raise ShardError(f"--train-shards {args.train_shards}: must be >= 0")
            paths = download(args.dir, args.train_shards, args.repo, os.environ.get("HF_ENDPOINT"))
        elif args.cmd == "fingerprint":
            print(val_fingerprint(find_shards(args.dir, args.pattern), args.val_tokens))
            return 0
        else:
            paths = find_shards(args.dir, args.pattern)
        total = validate_shards(paths)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(paths)} shards, {total:,} tokens, all valid, in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
