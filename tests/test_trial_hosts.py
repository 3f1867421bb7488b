"""--reuse-workers on a real local Ray: a sweep's trials run one after another in one warm process per slot, a
host killed mid-trial is restarted and the trial runs again, and a trial that ran after others (or after a
stopped one) on a host trains exactly as in a fresh process."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
from pathlib import Path
import pytest
import torch

from conftest import QUICK, fast_tiny
from speedrun.config import TrainConfig
from speedrun.train import train
from sweeps import run as sweep_cli

pytestmark = pytest.mark.slow
RUN = str(Path(__file__).resolve().parents[1] / "sweeps" / "run.py")


def fresh_process_val_loss(cfg: TrainConfig) -> float:
    """The trial's config trained here, in a process that has trained nothing of it before."""
    threads = torch.get_num_threads()
    try:
        return train(cfg).val_loss
    finally:
        torch.set_num_threads(threads)


def test_a_sweep_reuses_its_host_and_survives_a_killed_one(local_ray, tmp_path):
    rc = sweep_cli.main(["--preset", "tiny", "--space", "muon_lr", "--trials", "3", "--steps", "12",
                         "--scheduler", "none", "--concurrency", "1", "--reuse-workers", "--inject-faults", "1:first",
                         "--storage", str(tmp_path), "--name", "s", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                         *QUICK])
    assert rc == 0
    rows = sorted(pq.read_table(tmp_path / "s" / "results.parquet").to_pylist(), key=lambda r: r["trial_index"])
    assert [r["status"] for r in rows] == ["finished"] * 3
    assert all(r["val_loss"] < math.log(128) - 0.5 for r in rows)
    pids = [r["host_pid"] for r in rows]
    assert pids[0] != pids[1] == pids[2]  # trial 1 killed its host on the first attempt: Ray started a new one
    assert [r["host_trials_before"] for r in rows] == [0, 0, 1]
    assert rows[2]["worker_start_s"] < 5  # no process to start
    # one slot: Tune hands each next trial the same relay process, a killed host's retry included
    assert len({r["trainable_pid"] for r in rows}) == 1 and rows[0]["trainable_pid"] is not None

    log = next((tmp_path / "s" / "logs").glob(f"{rows[2]['trial_id']}_seed*.txt"))
    config = next(line for line in log.read_text().splitlines() if line.startswith("# config: "))
    cfg = TrainConfig.from_dict(json.loads(config[len("# config: "):]))
    assert rows[2]["val_loss"] == pytest.approx(fresh_process_val_loss(cfg), abs=1e-6)


@pytest.mark.long  # about 2 minutes on a 2-core machine
def test_a_stalled_hosted_trial_gets_a_fresh_host_and_fails_as_stalled(local_ray, tmp_path):
    # trial 1 hangs inside its host (its process alive): the watchdog kills that host 45 s after the trial's last
    # report, Ray starts it afresh, the trial (no retries left) fails as stalled and trial 2 trains on the new host
    rc = sweep_cli.main(["--preset", "tiny", "--space", "muon_lr", "--trials", "3", "--steps", "6",
                         "--scheduler", "none", "--concurrency", "1", "--reuse-workers", "--inject-faults", "1:stall",
                         "--max-failures", "0", "--stall-timeout", "45", "--storage", str(tmp_path), "--name", "s",
                         "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *QUICK])
    assert rc == 0
    rows = sorted(pq.read_table(tmp_path / "s" / "results.parquet").to_pylist(), key=lambda r: r["trial_index"])
    assert [r["status"] for r in rows] == ["finished", "failed", "finished"]
    assert rows[1]["error"].startswith("stalled: nothing heard for") and "--stall-timeout 45" in rows[1]["error"]
    assert rows[0]["host_pid"] != rows[2]["host_pid"] and rows[2]["host_trials_before"] == 0  # a fresh host


def loop_config(cfg: TrainConfig) -> dict:
    return {"config": cfg.to_dict(), "trial_start": time.time(), "env": {"SPEEDRUN_CACHE": os.environ["SPEEDRUN_CACHE"]}}


@pytest.mark.parametrize("how", ["stopped", "abandoned"])
def test_a_stopped_trial_leaves_its_host_clean(local_ray, how):
    """A pruned trial: the scheduler's stop reaches the host (StopHostedTrials), or its trainable is lost and nobody
    polls the host; either way the host ends that trial at its next report, is free at once, and trains the
    next one as a fresh process would."""
    import ray

    from sweeps.trial_hosts import start_hosts, stop_hosts

    long_run = fast_tiny(steps=4000, **{"run.threads": 1})
    short_run = fast_tiny(steps=16, **{"run.threads": 1, "optim.muon_lr": 0.03, "run.val_every": 8})
    (host,) = start_hosts(1, {"CPU": 1}, timeout_s=120, prefix=f"test-host-{how}", abandon_s=2.0)
    try:
        assert ray.get(host.claim.remote("pruned"))
        stopped = host.run.remote("pruned", loop_config(long_run))
        seen = []
        while not any("train_loss" in m for m in seen):
            seen += ray.get(host.poll.remote("pruned"))[0]
        assert not ray.get(host.claim.remote("next"))  # busy with the trial
        if how == "stopped":
            ray.get_actor("test-host-stopped-0").stop.remote("pruned")
        assert ("stopped by the scheduler" if how == "stopped" else "no one has polled") in \
            ray.get(stopped, timeout=120)["stopped"]
        assert ray.get(host.claim.remote("next"))
        done = host.run.remote("next", loop_config(short_run))
        reports, ended = [], False
        while not ended:
            new, ended = ray.get(host.poll.remote("next"))
            reports += new
        assert ray.get(done)["host_trials_before"] == 1
    finally:
        stop_hosts((host,))
    assert reports[-1]["step"] == 16 and reports[-1]["finished_training"]
    assert reports[-1]["val_loss"] == pytest.approx(fresh_process_val_loss(short_run), abs=1e-6)


@pytest.mark.extended
def test_an_interrupted_sweep_on_hosts_resumes(tmp_path):
    """SIGINT right after trial 0 (the next trial is already on the warm host), then --resume: a new driver's
    hosts run the rest."""
    args = ["--preset", "tiny", "--space", "muon_lr", "--trials", "3", "--steps", "12", "--scheduler", "none",
            "--concurrency", "1", "--reuse-workers", "--storage", str(tmp_path), "--name", "s",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *QUICK]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, RUN, *args], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        deadline = time.time() + 300
        while "trial 0 finished" not in (tmp_path / "first.log").read_text() and time.time() < deadline:
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=180) == 130, (tmp_path / "first.log").read_text()[-3000:]
    assert sweep_cli.main(["--resume", "--name", "s", "--storage", str(tmp_path)]) == 0
    rows = sorted(pq.read_table(tmp_path / "s" / "results.parquet").to_pylist(), key=lambda r: r["trial_index"])
    assert [r["status"] for r in rows] == ["finished"] * 3
    assert rows[0]["host_pid"] != rows[1]["host_pid"] == rows[2]["host_pid"]  # the second driver's host
