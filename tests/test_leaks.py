"""Never hang on resources: a sweep whose scheduler may stop trials is refused when Ray's State API (what frees a
stopped trial's reservation) does not answer, and a trial whose workers cannot get their resources fails with
the reason after --resource-timeout instead of waiting for ever (the leak injected as a placement group that holds
every CPU)."""

import pyarrow.parquet as pq
import pytest
import ray

from conftest import QUICK
from sweeps import run as sweep_cli

pytestmark = pytest.mark.slow


def test_no_state_api_refuses_a_sweep_that_may_stop_trials(tmp_path, capsys):
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        rc = sweep_cli.main(["--preset", "tiny", "--space", "muon_lr", "--trials", "1", "--steps", "6",
                             "--storage", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *QUICK])
    finally:
        ray.shutdown()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1, err
    assert "State API" in lines[0] and "--scheduler none" in lines[0]


def test_a_trial_that_cannot_get_its_workers_fails_with_the_reason(tmp_path, monkeypatch):
    from ray.util.placement_group import placement_group, remove_placement_group

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ray.init(num_cpus=3, log_to_driver=False, logging_level="WARNING")
    # a reservation nobody frees, as a leaked stopped trial's would be: 1 CPU stays, enough for the Tune trial
    # (0.01 CPU) but not for its worker (1 CPU)
    leaked = placement_group([{"CPU": 2}])
    ray.get(leaked.ready(), timeout=60)
    try:
        rc = sweep_cli.main(["--preset", "tiny", "--space", "muon_lr", "--trials", "1", "--steps", "6",
                             "--scheduler", "none", "--resource-timeout", "10", "--max-failures", "0",
                             "--storage", str(tmp_path), "--name", "s", "--tracking-uri",
                             f"sqlite:///{tmp_path}/mlflow.db", *QUICK])
    finally:
        remove_placement_group(leaked)
        ray.shutdown()
    assert rc == sweep_cli.EXIT_ALL_FAILED  # its only trial failed: nothing measured
    (row,) = pq.read_table(tmp_path / "s" / "results.parquet").to_pylist()
    assert row["status"] == "failed"
    error = next((tmp_path / "s").glob("trial_0000_*/error.txt")).read_text()
    assert "WorkerGroupStartupTimeoutError" in error or "timed out" in error


def test_the_state_api_check_asks_its_own_cluster_beside_another_ray():
    """Another Ray on the machine (a second sweep's own local Ray): the check asks the cluster this driver is
    connected to (the State API's own discovery refuses to choose between two: seen in CI as a refused sweep)."""
    import subprocess
    import sys

    from sweeps.cluster import check_stopped_trials_are_freed, local_ray_options

    other = subprocess.Popen([sys.executable, "-c", "import ray, time; ray.init(num_cpus=1, log_to_driver=False); "
                              "print('up', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        ray.init(log_to_driver=False, logging_level="WARNING", **local_ray_options())
        try:
            check_stopped_trials_are_freed(wait_s=60)
        finally:
            ray.shutdown()
    finally:
        other.terminate()
        other.wait(timeout=60)
