"""Two sweep drivers started at the same moment (a script, a job array) on one Ray cluster and one MLflow store:
two sweeps, each with all its trials in its results.parquet and in MLflow (default names never collide)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from conftest import QUICK

pytestmark = [pytest.mark.slow, pytest.mark.long]
RUN_PY = str(Path(__file__).resolve().parent.parent / "sweeps" / "run.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_drivers_started_together_get_two_sweeps(tmp_path):
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    port = free_port()
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=4", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        cmd = [sys.executable, RUN_PY, "--space", "muon_lr", "--preset", "tiny", "--trials", "2", "--steps", "12",
               "--scheduler", "none", "--storage", str(tmp_path / "sweeps"), "--tracking-uri", uri,
               "--address", f"127.0.0.1:{port}", *QUICK]
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
        outputs = [p.communicate(timeout=1200)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=180)
    folders = sorted(d for d in (tmp_path / "sweeps").iterdir() if (d / "sweep.json").exists())
    assert len(folders) == 2 and folders[0].name != folders[1].name
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("muon_lr")
    for folder in folders:
        rows = pq.read_table(folder / "results.parquet").to_pylist()
        assert sorted(r["trial_index"] for r in rows) == [0, 1] and all(r["status"] == "finished" for r in rows)
        runs = client.search_runs([exp.experiment_id], f"tags.kind = 'trial' and tags.sweep_name = '{folder.name}'")
        assert sorted(r.data.tags["trial_index"] for r in runs) == ["0", "1"]
