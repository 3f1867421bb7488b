"""Sweeps stored under a URI (sweeps.storage), against a real S3-compatible server started here (moto's server
mode): the storage's own operations, a sweep driven with `--storage s3://...` interrupted with SIGINT and resumed
from an empty node-local copy (as from another machine), with every sweep file and Ray's state in the bucket and
no local folder named `s3:`; and a storage that cannot be used is refused in one line."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from pyarrow import fs

from sweeps.storage import Storage
from test_resume import QUICK, Driver, children, wait_for_finished


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A moto S3 server on a free port with bucket `sweeps`; the AWS variables that reach it set in this process
    (pyarrow and boto3 read them), and the node-local cache under tmp_path."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "SPEEDRUN_SWEEPS_CACHE": str(tmp_path / "node-cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2)
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "moto_server did not start"
            time.sleep(0.3)
    import boto3
    boto3.client("s3").create_bucket(Bucket="sweeps")
    yield env
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def bucket_files(prefix: str) -> dict[str, int]:
    filesystem, base = fs.FileSystem.from_uri(f"s3://{prefix}")
    infos = filesystem.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base) + 1:]: i.size for i in infos if i.type == fs.FileType.File}


def no_s3_folder(*roots: Path) -> bool:
    return not any(p.name.startswith("s3:") for root in roots for p in root.rglob("*"))


def test_push_pull_exists_and_listing(s3, tmp_path):
    storage = Storage.parse("s3://sweeps/unit/")
    assert storage.remote and storage.root == "s3://sweeps/unit"
    assert storage.local("a") == tmp_path / "node-cache" / "s3" / "sweeps" / "unit" / "a"
    storage.check()
    folder = storage.local("a")
    (folder / "logs").mkdir(parents=True)
    (folder / "sweep.json").write_text("{}")
    (folder / "logs" / "t1_seed0.txt").write_text("step:1/1 val_loss:3.0 train_time:1ms\n")
    (folder / "inductor_cache").mkdir()
    (folder / "inductor_cache" / "big.bin").write_bytes(b"x" * 100)
    storage.push_sweep("a")
    assert bucket_files("sweeps/unit") == {"a/sweep.json": 2, "a/logs/t1_seed0.txt": 37}  # the cache stays here
    assert storage.exists("a", "sweep.json") and not storage.exists("a", "results.parquet")
    assert storage.sweeps() == ["a"]
    shutil.rmtree(tmp_path / "node-cache")
    storage.pull("a")
    assert (folder / "logs" / "t1_seed0.txt").read_text().startswith("step:1/1")
    assert not (folder / "inductor_cache").exists()
    local = Storage.parse(str(tmp_path / "here"))
    assert not local.remote and local.local("x") == tmp_path / "here" / "x"


@pytest.mark.slow
@pytest.mark.extended
def test_a_sweep_in_s3_resumes_after_sigint_from_an_empty_local_copy(s3, tmp_path):
    work = tmp_path / "work"  # the drivers' working directory: no `s3:` folder may appear in it
    work.mkdir()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    start = ["--preset", "tiny", "--space", "muon_lr", "--trials", "3", "--steps", "6", "--concurrency", "1",
             "--scheduler", "none", "--seed", "5", "--name", "r", "--storage", "s3://sweeps/runs",
             "--tracking-uri", uri, *QUICK]
    drivers = []
    try:
        first = Driver(work, start, "1", env=s3)
        drivers.append(first)
        wait_for_finished(client, first, 1)
        first.proc.send_signal(signal.SIGINT)
        assert first.proc.wait(timeout=120) == 130, first.output()[-3000:]
        assert "--storage s3://sweeps/runs" in first.output()  # the resume command names the URI
        stored = bucket_files("sweeps/runs/r")
        assert {"sweep.json", "optuna.journal", "results.parquet", "tuner.pkl"} <= set(stored), sorted(stored)
        assert any(k.startswith("done/") for k in stored) and any(k.startswith("logs/") for k in stored)

        shutil.rmtree(tmp_path / "node-cache")  # resumed as from another machine: only the bucket has the sweep
        second = Driver(work, ["--resume", "--name", "r", "--storage", "s3://sweeps/runs"], "2", env=s3)
        drivers.append(second)
        assert second.proc.wait(timeout=600) == 0, second.output()[-3000:]
    finally:
        for d in drivers:
            if d.proc.poll() is None:
                os.killpg(d.proc.pid, signal.SIGKILL)
    stored = bucket_files("sweeps/runs/r")
    local = Path(tmp_path / "results.parquet")
    filesystem, base = fs.FileSystem.from_uri("s3://sweeps/runs/r/results.parquet")
    with filesystem.open_input_file(base) as f:
        rows = pq.read_table(f).to_pylist()
    assert sorted(r["trial_index"] for r in rows) == [0, 1, 2] and all(r["status"] == "finished" for r in rows)
    assert len([k for k in stored if k.startswith("done/")]) == 3
    assert len([k for k in stored if k.startswith("logs/") and k.endswith(".txt")]) == 3
    assert any(k.startswith("train_runs/") for k in stored)  # Ray Train's own runs, written there by Ray
    runs = children(client)
    assert sorted(r.data.tags["trial_index"] for r in runs) == ["0", "1", "2"]
    for run in runs:  # each trial's worker log reached MLflow through the bucket
        assert "train.log" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not local.exists() and no_s3_folder(work, tmp_path)


def test_a_storage_that_cannot_be_used_is_refused(s3, tmp_path, capsys):
    from sweeps import run as sweep_cli

    rc = sweep_cli.main(["--preset", "tiny", "--space", "muon_lr", "--storage", "s3://no-such-bucket/x",
                         "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err
    assert rc == 2 and "--storage s3://no-such-bucket/x is not usable" in err and len(err.strip().splitlines()) == 1
    assert no_s3_folder(Path.cwd(), tmp_path)
