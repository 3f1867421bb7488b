"""A sweep driver interrupted with SIGINT, then (resumed) killed with SIGKILL, then resumed to the end: finished
trials are neither re-run nor recorded twice, unfinished ones restart, and the searcher keeps its history
(the proposals equal those of one uninterrupted seeded searcher). Each driver is a real process with its own
local Ray; no other Ray may run meanwhile, so this module uses no local_ray fixture."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from conftest import assert_study_matches
from sweeps.search import SweepPlan, make_searcher, study_storage
from sweeps.spaces import load_space
from sweeps.storage import Storage
from sweeps.tracking import KILL_DRIVER_ENV
from sweeps.protocol import FINISHED

pytestmark = pytest.mark.slow
RUN = str(Path(__file__).resolve().parent.parent / "sweeps" / "run.py")
QUICK = ["--set", "run.warmup_steps=0", "--set", "data.val_tokens=4096", "--set", "run.val_every=100000",
         "--set", "run.log_every=2"]


class Driver:
    def __init__(self, tmp_path: Path, args: list[str], label: str, env: dict | None = None):
        self.log = open(tmp_path / f"driver-{label}.txt", "w")
        self.proc = subprocess.Popen([sys.executable, RUN, *args], cwd=tmp_path, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})

    def output(self) -> str:
        return Path(self.log.name).read_text()


def children(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("muon_lr")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.kind = 'trial'", max_results=1000)


def wait_for_finished(client, driver: Driver, n: int, timeout: float = 400) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = {r.data.tags["trial_index"]: r for r in children(client) if r.data.tags.get("status") == "finished"}
        if len(done) >= n:
            return done
        time.sleep(0.5)
    raise AssertionError(f"fewer than {n} trials finished in {timeout}s:\n{driver.output()[-3000:]}")


def expected_proposals(trials: int, seed: int) -> list[dict]:
    """What one uninterrupted seeded searcher proposes, one trial at a time."""
    space = load_space("muon_lr", "tiny")
    searcher = make_searcher(SweepPlan(space, "x", Storage("/nonexistent"), trials, 1, seed, "none", 6))
    out = []
    for i in range(trials):
        out.append(searcher.suggest(f"t{i}"))
        searcher.on_trial_complete(f"t{i}", {"val_loss": 3.0 + i, FINISHED: True})
    return out


@pytest.mark.long  # about 3.5 minutes on a 2-core machine: three sweep drivers one after another
def test_interrupt_then_kill_then_resume(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    start = ["--preset", "tiny", "--space", "muon_lr", "--trials", "3", "--steps", "6", "--concurrency", "1",
             "--scheduler", "none", "--seed", "5", "--name", "r", "--storage", str(tmp_path), "--tracking-uri", uri,
             *QUICK]
    resume = ["--resume", "--name", "r", "--storage", str(tmp_path)]
    drivers = []
    try:
        # 1. SIGINT once trial 0 is done: the driver records what it has and says how to resume
        first = Driver(tmp_path, start, "1")
        drivers.append(first)
        before = wait_for_finished(client, first, 1)
        first.proc.send_signal(signal.SIGINT)
        assert first.proc.wait(timeout=180) == 130, first.output()[-3000:]
        assert "--resume --name r" in first.output()
        parent = client.search_runs([client.get_experiment_by_name("muon_lr").experiment_id],
                                    "tags.kind = 'sweep'")[0]
        assert parent.info.status == "KILLED"
        statuses = {r.data.tags["trial_index"]: (r.info.status, r.data.tags["status"]) for r in children(client)}
        assert statuses["0"] == ("FINISHED", "finished")
        assert all(s in (("FINISHED", "finished"), ("KILLED", "interrupted")) for s in statuses.values())
        study = optuna.load_study(study_name="r", storage=study_storage(tmp_path / "r"))
        states = [t.state.name for t in study.trials]
        assert states[0] == "COMPLETE" and "RUNNING" not in states  # the interrupted trial is FAIL, not RUNNING

        # 2. resume; the driver SIGKILLs itself the moment trial 2's end is in MLflow, before Tune saves it
        second = Driver(tmp_path, resume, "2", env={KILL_DRIVER_ENV: "2"})
        drivers.append(second)
        assert second.proc.wait(timeout=400) == -signal.SIGKILL, second.output()[-3000:]
        mid = wait_for_finished(client, second, 3, timeout=1)
        logs = {p.name: p.stat().st_mtime for p in (tmp_path / "r" / "logs").glob("*.txt")}

        # 3. resume to the end
        third = Driver(tmp_path, resume, "3")
        drivers.append(third)
        assert third.proc.wait(timeout=600) == 0, third.output()[-3000:]
        assert "trial 0 started" not in second.output() + third.output()
        assert "trial 2 had ended before the interruption" in third.output()  # Tune replayed its end
        for run in {**before, **mid}.values():  # no finished trial trained again: its worker log is untouched
            (log,) = (tmp_path / "r" / "logs").glob(f"{run.data.tags['trial_id']}_*.txt")
            assert log.stat().st_mtime == logs[log.name], log.name

        rows = pq.read_table(tmp_path / "r" / "results.parquet").to_pylist()
        assert [r["trial_index"] for r in rows] == [0, 1, 2]
        assert all(r["status"] == "finished" and r["step"] == 6 for r in rows)
        final = children(client)
        assert sorted(r.data.tags["trial_index"] for r in final) == ["0", "1", "2"]  # each exactly once
        assert all(r.info.status == "FINISHED" for r in final)
        by_index = {r.data.tags["trial_index"]: r for r in final}
        for index, run in {**mid, **before}.items():  # the same MLflow runs, not re-created
            assert by_index[index].info.run_id == run.info.run_id
        # the searcher kept its history across both interruptions: same proposals as without them
        for row, proposal in zip(rows, expected_proposals(3, seed=5)):
            for key, value in proposal.items():
                assert row[key] == pytest.approx(value), (row["trial_index"], key)
        assert len({row["optim.muon_lr"] for row in rows}) == 3
        # the study in the sweep folder agrees with results.parquet; the trials interrupted by SIGINT and SIGKILL
        # stay in it as FAIL, each followed by its restart
        study = assert_study_matches(tmp_path / "r", "r", rows, "val_loss")
        ended = [t.user_attrs["trial_index"] for t in study.trials if t.state.name != "FAIL"]
        assert sorted(ended) == [0, 1, 2]  # trial 2's end, replayed after the SIGKILL, is not told twice
        for t in study.trials:  # a trial cut off by an interruption, if any, is followed by its restart
            if t.state.name == "FAIL":
                assert t.user_attrs["interrupted"] and any(u.user_attrs.get("restarted_from") == t.number
                                                           for u in study.trials)
    finally:
        for d in drivers:  # a SIGKILLed driver leaves Ray's agents behind: clean its process group up
            try:
                os.killpg(d.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            d.log.close()
