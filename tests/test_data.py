"""Shards: round trip, every validation error, BOS-aligned rank-disjoint loading, validation split, download."""

import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from speedrun import data as D


def make_stream(n, bos=0, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(1, 500, size=n)
    toks[rng.random(n) < 0.02] = bos
    toks[0] = bos
    return toks


def test_round_trip(tmp_path):
    toks = make_stream(5000)
    p = D.write_shard(tmp_path / "a.bin", toks)
    assert D.shard_token_count(p) == 5000
    assert np.array_equal(D.read_shard(p), toks)


def test_wrong_magic(tmp_path):
    p = D.write_shard(tmp_path / "a.bin", make_stream(100))
    raw = bytearray(p.read_bytes())
    raw[0:4] = np.int32(1234).tobytes()
    p.write_bytes(bytes(raw))
    with pytest.raises(D.ShardError, match="wrong magic"):
        D.read_shard(p)


def test_wrong_version(tmp_path):
    p = D.write_shard(tmp_path / "a.bin", make_stream(100))
    raw = bytearray(p.read_bytes())
    raw[4:8] = np.int32(7).tobytes()
    p.write_bytes(bytes(raw))
    with pytest.raises(D.ShardError, match="version 7"):
        D.read_shard(p)


def test_truncated(tmp_path):
    p = D.write_shard(tmp_path / "a.bin", make_stream(100))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(D.ShardError, match="truncated"):
        D.read_shard(p)
    p.write_bytes(b"\0" * 100)
    with pytest.raises(D.ShardError, match="truncated"):
        D.read_shard(p)


def test_empty_glob_and_missing_folder(tmp_path):
    with pytest.raises(D.ShardError, match="no shards match"):
        D.find_shards(tmp_path, "fineweb_train_*.bin")
    with pytest.raises(D.ShardError, match="does not exist"):
        D.find_shards(tmp_path / "nope", "*.bin")


@pytest.fixture
def shards(tmp_path):
    return [D.write_shard(tmp_path / f"t_{i}.bin", make_stream(20_000, seed=i)) for i in range(2)]


def test_chunks_start_at_bos_and_ranks_are_disjoint(shards):
    world, micro, steps = 4, 256, 12
    per_rank = []
    for rank in range(world):
        loader = D.TrainLoader(shards, bos_id=0, rank=rank, world_size=world)
        got = []
        for _ in range(steps):
            for inputs, targets in loader.next_step_rows(8 * micro, micro):
                assert inputs[0].item() == 0  # BOS-aligned
                assert bool((inputs[1:] == targets[:-1]).all())
                got.append(tuple(inputs.tolist()))
        per_rank.append(got)
    single = D.TrainLoader(shards, bos_id=0)
    all_chunks = [tuple(row[0].tolist()) for _ in range(steps) for row in single.next_step_rows(8 * micro, micro)]
    union = [c for r in per_rank for c in r]
    assert sorted(union) == sorted(all_chunks)  # together the ranks read exactly the world-1 batch
    assert len(set(union)) == len(union)  # and no chunk twice
    assert all(len(r) == steps * 2 for r in per_rank)


def test_loader_wraps_across_shards(shards):
    loader = D.TrainLoader(shards, bos_id=0)
    for _ in range(60):  # 60 x 1024 tokens > 40k tokens in the two shards
        assert len(loader.next_step_rows(1024, 512)) == 2
    assert loader.state()[0] in (0, 1)


def test_val_batches_contiguous_and_split(tmp_path):
    toks = make_stream(10_000)
    D.write_shard(tmp_path / "v.bin", toks)
    paths = D.find_shards(tmp_path, "v.bin")
    one = D.val_batches(paths, 4000, 1000)
    assert np.array_equal(np.concatenate([b.inputs[0].numpy() for b in one]), toks[:4000])
    two = [D.val_batches(paths, 4000, 1000, rank=r, world_size=2) for r in range(2)]
    assert [len(x) for x in two] == [2, 2]
    with pytest.raises(D.ShardError, match="val_tokens"):
        D.val_batches(paths, 20_000, 1000)


def test_a_short_last_validation_chunk_is_filled_to_the_common_shape(tmp_path):
    """4,000 tokens in 1,500-token chunks: three chunks of one shape; the third's last 500 inputs are the filler
    and its targets there -1, so the targets that count are exactly the 4,000 of the unfilled split."""
    toks = make_stream(10_000)
    D.write_shard(tmp_path / "v.bin", toks)
    paths = D.find_shards(tmp_path, "v.bin")
    filled = D.val_batches(paths, 4000, 1500, pad_id=7)
    assert [b.inputs.shape for b in filled] == [(1, 1500)] * 3 == [b.targets.shape for b in filled]
    targets = np.concatenate([b.targets[0].numpy() for b in filled])
    assert np.array_equal(targets[:4000], toks[1:4001]) and (targets[4000:] == -1).all()
    assert (filled[-1].inputs[0, 1000:] == 7).all()
    assert np.array_equal(np.concatenate([b.inputs[0].numpy() for b in filled])[:4000], toks[:4000])
    ranks = [D.val_batches(paths, 4000, 1500, rank=r, world_size=2, pad_id=7) for r in range(2)]
    assert [len(x) for x in ranks] == [2, 1] and torch.equal(ranks[0][1].targets, filled[2].targets)


class _HubStandIn(http.server.BaseHTTPRequestHandler):
    """Serves files like the Hub's resolve endpoint: /datasets/<repo>/resolve/<rev>/<name>."""
    root: Path

    def _file(self):
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        return self.root / name

    def _headers(self, f):
        self.send_response(200)
        data = f.read_bytes()
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hash(data) & 0xffffffff:x}"')
        self.send_header("X-Repo-Commit", "0" * 40)
        self.end_headers()
        return data

    def do_HEAD(self):  # noqa: N802
        f = self._file()
        if not f.exists():
            self.send_error(404)
            return
        self._headers(f)

    def do_GET(self):  # noqa: N802
        f = self._file()
        if not f.exists():
            self.send_error(404)
            return
        self.wfile.write(self._headers(f))

    def log_message(self, *a):
        pass


def test_download_from_a_local_hub(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    for name in D.shard_names(2):
        D.write_shard(remote / name, make_stream(3000))
    handler = type("H", (_HubStandIn,), {"root": remote})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        got = D.download(tmp_path / "local", 2, endpoint=endpoint)
    finally:
        server.shutdown()
    assert sorted(p.name for p in got) == sorted(D.shard_names(2))
    for p in got:
        assert np.array_equal(D.read_shard(p), D.read_shard(remote / p.name))


def test_sample_bos_constant_matches_the_corpus():
    from speedrun.config import SAMPLE_BOS_ID
    from speedrun.sample import SampleSpec
    assert SampleSpec().bos_id == SAMPLE_BOS_ID
