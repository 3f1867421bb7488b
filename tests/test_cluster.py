"""A sweep on an existing Ray cluster (--address): a local two-node cluster, `ray start --head` and a second
`ray start` on this machine, each node with one logical CPU. The layout and the concurrency come from the
cluster (not from the driver's machine), the code reaches the workers as the runtime environment's modules, and
the two trials, run at once, land on both nodes: results.parquet and MLflow name each trial's node."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from sweeps import run as sweep_cli
from test_resume import QUICK

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")


def ray_cli(*args: str, env: dict) -> None:
    out = subprocess.run([RAY, *args], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.fixture
def two_nodes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Ray 2.60's `ray start` turns token authentication on when a token exists (~/.ray/auth_token); this
    # throwaway local cluster runs without, as the local Ray the sweep starts itself does
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
           "RAY_AUTH_MODE": "disabled"}
    address = f"127.0.0.1:{port}"
    try:
        ray_cli("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
                "--include-dashboard=false", env=env)
        ray_cli("start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", env=env)
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=180)


@pytest.mark.long
def test_a_sweep_on_a_two_node_cluster_uses_both_nodes(two_nodes, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = sweep_cli.main(["--preset", "tiny", "--space", "muon_lr", "--trials", "2", "--steps", "6", "--scheduler", "none",
                         "--cpus-per-worker", "0.9", "--address", two_nodes, "--storage", str(tmp_path), "--name", "c",
                         "--tracking-uri", uri, *QUICK])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "2 at a time" in out  # two nodes of 1 CPU: a worker of 0.9 CPU on each, from the cluster's resources
    rows = pq.read_table(tmp_path / "c" / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert len({r["node_id"] for r in rows}) == 2 and all(r["node_id"] for r in rows)  # one trial on each node
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("muon_lr")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'trial'")
    assert {r.data.tags["node_id"] for r in runs} == {r["node_id"] for r in rows}


def test_a_trial_no_node_can_hold_is_refused_by_the_clusters_resources(two_nodes, tmp_path, capsys):
    rc = sweep_cli.main(["--preset", "tiny", "--space", "muon_lr", "--workers-per-trial", "3", "--address", two_nodes,
                         "--storage", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err
    assert rc == 2 and f"the Ray cluster at {two_nodes} has 2" in err and len(err.strip().splitlines()) == 1, err


def test_an_autoscaling_cluster_is_waited_for_and_what_it_can_never_hold_is_refused(local_ray, capsys):
    """wait_for_capacity against a real local Ray, given the maximum an autoscaler would report: a trial beyond
    that maximum is refused at once; one within it but beyond what the cluster has now is asked for and waited
    for, with progress, until the timeout; one that fits now starts at once. (Ray's fake autoscaling provider did
    not scale up on this machine, so the scale-up itself is not exercised here.)"""
    import time

    from sweeps.cluster import BadInput, wait_for_capacity

    have = local_ray.cluster_resources()["CPU"]
    big = (1, False, 0.0, have + 1)  # one worker wanting more CPUs than the cluster has now
    with pytest.raises(BadInput, match="at its autoscaler's maximum has"):
        wait_for_capacity({"CPU": have}, big, timeout_s=30)
    t0 = time.time()
    with pytest.raises(BadInput, match="did not scale up within 3s"):
        wait_for_capacity({"CPU": have + 8}, big, timeout_s=3, poll_s=0.5)
    assert 3 <= time.time() - t0 < 30
    assert "waiting for the cluster to scale up (0s): a trial needs" in capsys.readouterr().err
    t0 = time.time()
    wait_for_capacity({"CPU": have + 8}, (1, False, 0.0, 0.5), timeout_s=30)
    assert time.time() - t0 < 5
