"""A sweep interrupted (SIGINT) right after its scheduler stopped a trial, then resumed, stops the same later
trials as the sweep would have uninterrupted: ASHA against a real uninterrupted sweep of the same seed, the
record-curve pruner against its own decisions replayed over the trials' recorded curves. Tune does not checkpoint
schedulers; sweeps.scheduler_state keeps their rungs and reference curve in the sweep folder. Drivers are real
processes, each with its own local Ray, one at a time."""

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from test_resume import QUICK, Driver

pytestmark = [pytest.mark.slow, pytest.mark.extended]
HERE = Path(__file__).resolve().parent
SPACE = str(HERE / "spaces" / "wide_arms.toml")
VAL = ["--set", "run.val_every=2"]


def start_args(tmp_path: Path, name: str, scheduler: str) -> list[str]:
    return ["--preset", "tiny", "--space", SPACE, "--trials", "6", "--steps", "12", "--concurrency", "1",
            "--scheduler", scheduler, "--sampler", "random", "--seed", "1", "--name", name, "--storage", str(tmp_path),
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--cpus-per-worker", "1.5", *QUICK, *VAL]


def run_to_end(driver: Driver, timeout: float = 900) -> None:
    assert driver.proc.wait(timeout=timeout) == 0, driver.output()[-3000:]


def interrupt_after_first_stop(tmp_path: Path, name: str, scheduler: str) -> int:
    """Start the sweep, SIGINT it once a trial was stopped and the next one has started, resume it to the end.
    Returns the index of the first stopped trial."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    first = Driver(tmp_path, start_args(tmp_path, name, scheduler), f"{name}-1")
    try:
        deadline = time.time() + 600
        while time.time() < deadline and first.proc.poll() is None:
            runs = [r for r in experiment_runs(client) if r.data.tags.get("sweep_name") == name]
            stopped = [int(r.data.tags["trial_index"]) for r in runs if r.data.tags.get("status") == "pruned"]
            if stopped and f"trial {max(stopped) + 1} started" in first.output():
                first.proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.5)
        assert first.proc.wait(timeout=300) == 130, first.output()[-3000:]
        assert stopped, first.output()[-3000:]
    finally:
        kill_group(first)
    second = Driver(tmp_path, ["--resume", "--name", name, "--storage", str(tmp_path)], f"{name}-2")
    try:
        run_to_end(second)
        assert f"resuming {name}" in second.output()
    finally:
        kill_group(second)
    return min(stopped)


def experiment_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("wide_arms")
    return client.search_runs([exp.experiment_id], "tags.kind = 'trial'", max_results=1000) if exp else []


def kill_group(driver: Driver) -> None:
    try:
        os.killpg(driver.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    driver.log.close()


def outcome(folder: Path) -> dict[int, tuple[str, int]]:
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    return {r["trial_index"]: (r["status"], int(r["step"])) for r in rows}


def test_asha_stops_the_same_trials_after_a_resume(tmp_path):
    plain = Driver(tmp_path, start_args(tmp_path, "plain", "asha"), "plain")
    try:
        run_to_end(plain)
    finally:
        kill_group(plain)
    expected = outcome(tmp_path / "plain")
    first_stop = interrupt_after_first_stop(tmp_path, "resumed", "asha")
    assert (tmp_path / "resumed" / "scheduler_state.pkl").exists()
    later_stops = [i for i, (status, _) in expected.items() if status == "pruned" and i > first_stop]
    assert later_stops, f"the test needs ASHA stops after the interruption: {expected}"
    assert outcome(tmp_path / "resumed") == expected


def validation_curve(trial_folder: Path) -> list[tuple[int, float]]:
    """(step, val_loss) of a trial's validations from Tune's result.json; a restarted trial's last attempt wins."""
    points = {}
    for line in (trial_folder / "result.json").read_text().splitlines():
        r = json.loads(line)
        if "val_loss" in r and not r.get("finished_training"):
            points[int(r["step"])] = r["val_loss"]
    return sorted(points.items())


def test_curve_pruner_keeps_its_reference_curve_after_a_resume(tmp_path):
    from sweeps.pruner import RecordCurvePruner
    from sweeps.records import get_track
    from ray.tune.schedulers import TrialScheduler

    first_stop = interrupt_after_first_stop(tmp_path, "resumed", "curve")
    got = outcome(tmp_path / "resumed")
    # the decisions of one uninterrupted pruner, fed the same curves in trial order (one trial at a time)
    pruner = RecordCurvePruner(noise=get_track("quick").noise)
    expected = {}
    for folder in sorted((tmp_path / "resumed").glob("trial_*")):
        index = int(folder.name.split("_")[1])
        trial = SimpleNamespace(trial_id=folder.name.split("_")[2], experiment_tag=f"{index + 1}_x")
        status, step = "finished", 12
        for s, loss in validation_curve(folder):
            result = {"val_loss": loss, "step": s, "total_steps": 12}
            if pruner.on_trial_result(None, trial, result) == TrialScheduler.STOP:
                status, step = "pruned", s
                break
        if status == "finished":
            pruner.on_trial_complete(None, trial, {})
        expected[index] = (status, step)
    later_stops = [i for i, (status, _) in expected.items() if status == "pruned" and i > first_stop]
    assert later_stops, f"the test needs pruner stops after the interruption: {expected}"
    assert got == expected
