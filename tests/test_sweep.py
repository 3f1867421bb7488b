"""Real sweeps on a real local Ray: every shipped space runs a trial; ASHA stops a poor arm; parquet = Tune."""

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from speedrun.config import TrainConfig
from sweeps import run as sweep_cli

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


def sweep(tmp_path, *args):
    rc = sweep_cli.main(["--preset", "tiny", "--storage", str(tmp_path), "--name", "s", *args])
    assert rc == 0
    table = pq.read_table(tmp_path / "s" / "results.parquet").to_pylist()
    return table


@pytest.mark.parametrize("space", ["muon_lr", "adam_lr", "softcap", "windows", "schedule"])
def test_every_space_runs_a_trial(space, local_ray, tmp_path):
    rows = sweep(tmp_path, "--space", space, "--trials", "1", "--steps", "12", "--scheduler", "none")
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "finished" and row["step"] == 12
    assert row["val_loss"] < math.log(128) - 0.5  # it trained
    assert row["trial_startup_s"] > 0 and row["train_time_s"] > 0


def tune_last_results(folder: Path) -> dict[int, dict]:
    out = {}
    for d in folder.glob("trial_*"):
        lines = (d / "result.json").read_text().splitlines()
        out[int(d.name.split("_")[1])] = json.loads(lines[-1])
    return out


def test_asha_stops_the_poor_arm_and_results_match_tune(local_ray, tmp_path):
    space = str(HERE / "spaces" / "poor_arm.toml")
    # 1.5 CPUs a worker on 2: room for exactly one trial (each trial also holds 0.01 CPU), so trial 2 can
    # start only once the pruned trial's reservation is freed. One trial at a time keeps the order fixed:
    # the control fills the rungs before the poor arm reaches them.
    rows = sweep(tmp_path, "--space", space, "--concurrency", "1", "--cpus-per-worker", "1.5", "--seed", "3")
    by_index = {r["trial_index"]: r for r in rows}
    assert sorted(by_index) == [0, 1, 2]
    control, poor, third = by_index[0], by_index[1], by_index[2]
    base = TrainConfig.preset("tiny")
    assert control["optim.muon_lr"] == base.optim.muon_lr and control["optim.adam_lr"] == base.optim.adam_lr
    assert control["status"] == "finished" and control["step"] == 24
    assert poor["optim.muon_lr"] == pytest.approx(0.00002)
    assert poor["status"] == "pruned" and poor["step"] < 24  # ASHA stopped it at its first rung
    assert poor["val_loss"] > control["val_loss"] + 0.5
    assert third["status"] in ("finished", "pruned")  # it ran after the stop: no leaked reservation
    # one row per trial, equal to what Tune recorded as each trial's last result
    tune = tune_last_results(tmp_path / "s")
    assert sorted(tune) == [0, 1, 2]
    for i, row in by_index.items():
        for key in ("val_loss", "train_time_s", "step", "tokens"):
            assert row[key] == pytest.approx(tune[i][key]), (i, key)
        assert row["optim.muon_lr"] == tune[i]["config"]["optim.muon_lr"]
