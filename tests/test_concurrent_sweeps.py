"""Two sweep drivers started at the same moment (a script, a job array) on one Ray cluster and one MLflow store:
two sweeps, each with all its trials in its results.parquet and in MLflow (default names never collide)."""

import os
import socket
import subprocess
import sys
import time
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


def driver_output(proc: subprocess.Popen, deadline: float) -> str:
    """A driver's output; one still running at the deadline is killed and its output so far is what fails the
    test (pytest's own timeout would show neither driver's)."""
    try:
        return proc.communicate(timeout=max(1.0, deadline - time.time()))[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
        pytest.fail(f"a sweep driver was still running after 8 minutes; its output:\n{out[-6000:]}")


def test_two_drivers_started_together_get_two_sweeps(tmp_path):
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    port = free_port()
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=4", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    procs = []
    try:
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        cmd = [sys.executable, RUN_PY, "--space", "muon_lr", "--preset", "tiny", "--trials", "2", "--steps", "12",
               "--scheduler", "none", "--storage", str(tmp_path / "sweeps"), "--tracking-uri", uri,
               "--address", f"127.0.0.1:{port}", "--stall-timeout", "120", "--resource-timeout", "240", *QUICK]
        procs += [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                  for _ in range(2)]
        outputs = [driver_output(p, deadline=time.time() + 480) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
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
