"""Real sweeps on a real local Ray: the shared muon_lr sweep's trials (conftest.shared_sweep); ASHA stops a poor
arm; parquet = Tune; the time objective reaches the searcher; and behind the `long` marker: the curve pruner with
the Pareto front, --confirm-top re-runs the winners with fresh seeds (every shipped space trains in
tests/test_spaces.py)."""

import contextlib
import io
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from conftest import QUICK, QUICK_VAL, assert_study_matches
from speedrun.config import TrainConfig
from sweeps import run as sweep_cli

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


def sweep(tmp_path, *args):
    if "--tracking-uri" not in args:  # never the working folder's store
        args = (*args, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    rc = sweep_cli.main(["--preset", "tiny", "--storage", str(tmp_path), "--name", "s", *args])
    assert rc == 0
    table = pq.read_table(tmp_path / "s" / "results.parquet").to_pylist()
    return table


@pytest.fixture
def muon_sweep(shared_sweep):
    """(folder, rows, stdout) of the shared muon_lr sweep."""
    return shared_sweep.folder, shared_sweep.rows, shared_sweep.out


@pytest.fixture(scope="module")
def confirmed_sweep(local_ray, tmp_path_factory):
    """A muon_lr sweep of 2 trials followed by --confirm-top 2 --confirm-runs 2. Returns (folder, rows, stdout)."""
    tmp = tmp_path_factory.mktemp("confirmed_sweep")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rows = sweep(tmp, "--space", "muon_lr", "--trials", "2", "--steps", "12", "--scheduler", "none",
                     "--cpus-per-worker", "0.5", "--confirm-top", "2", "--confirm-runs", "2", *QUICK)
    return tmp, rows, out.getvalue()


def assert_one_trained_trial(row):
    assert row["status"] == "finished" and row["step"] == 12
    assert row["val_loss"] < math.log(128) - 0.5  # it trained
    assert row["trial_startup_s"] > 0 and row["train_time_s"] > 0


def test_muon_lr_space_runs_its_trials(muon_sweep):
    _, rows, _ = muon_sweep
    assert sorted(r["trial_index"] for r in rows) == [0, 1]
    for row in rows:
        assert_one_trained_trial(row)


def tune_last_results(folder: Path) -> dict[int, dict]:
    out = {}
    for d in folder.glob("trial_*"):
        lines = (d / "result.json").read_text().splitlines()
        out[int(d.name.split("_")[1])] = json.loads(lines[-1])
    return out


def test_asha_stops_the_poor_arm_and_results_match_tune(local_ray, tmp_path, capsys):
    space = str(HERE / "spaces" / "poor_arm.toml")
    # One trial at a time keeps the order fixed: the control fills the rungs before the poor arm reaches
    # them. Trial 2 starts after the poor arm is stopped, even where Ray leaks the stopped trial's reservation.
    rows = sweep(tmp_path, "--space", space, "--concurrency", "1", "--cpus-per-worker", "1.5", "--seed", "3",
                 *QUICK_VAL)  # with the warm-up: the time split below accounts for it
    by_index = {r["trial_index"]: r for r in rows}
    assert sorted(by_index) == [0, 1, 2]
    control, poor, third = by_index[0], by_index[1], by_index[2]
    base = TrainConfig.preset("tiny")
    assert control["optim.muon_lr"] == base.optim.muon_lr and control["optim.adam_lr"] == base.optim.adam_lr
    assert control["status"] == "finished" and control["step"] == 12
    assert poor["optim.muon_lr"] == pytest.approx(0.00002)
    assert poor["status"] == "pruned" and poor["step"] < 12  # ASHA stopped it at its first rung
    assert poor["verdict"] == "pruned"
    assert poor["val_loss"] > control["val_loss"] + 0.5
    assert third["status"] in ("finished", "pruned")  # it ran after the stop
    # one row per trial, equal to what Tune recorded as each trial's last result
    tune = tune_last_results(tmp_path / "s")
    assert sorted(tune) == [0, 1, 2]
    for i, row in by_index.items():
        for key in ("val_loss", "train_time_s", "step", "tokens"):
            assert row[key] == pytest.approx(tune[i][key]), (i, key)
        assert row["optim.muon_lr"] == tune[i]["config"]["optim.muon_lr"]
    # the sweep's worker time split: the trials' own clocks explain the time each trial held its worker
    from sweeps.results import time_split
    wall = json.loads((tmp_path / "s" / "wall_time.json").read_text())["wall_s"]
    split = time_split(rows, wall, slots=1, workers=1)
    assert split.training > 0 and split.validating > 0 and split.starting > 0 and split.idle > 0
    assert poor["val_time_s"] > 0 and poor["trial_startup_s"] > 0  # a stopped trial's clocks, from earlier reports
    assert abs(split.other) <= 0.03 * split.total, split
    assert "worker time: 1 x" in capsys.readouterr().out

    # the persisted Optuna study: states, params and values as in results.parquet; intermediate values keyed by
    # the training steps at which each trial validated (not Tune's report counter), the stop's own included
    study = assert_study_matches(tmp_path / "s", "s", rows, "val_loss")
    for t in study.trials:
        i = t.user_attrs["trial_index"]
        validated = {int(json.loads(line)["step"]): json.loads(line)["val_loss"] for line in
                     next((tmp_path / "s").glob(f"trial_{i:04d}_*/result.json")).read_text().splitlines()
                     if "val_loss" in json.loads(line) and not json.loads(line).get("finished_training")}
        assert t.intermediate_values == pytest.approx(validated), i
    assert study.trials[1].state.name == "PRUNED" and max(study.trials[1].intermediate_values) == poor["step"]


@pytest.mark.extended
def test_curve_pruner_and_pareto_front_in_a_real_sweep(local_ray, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rows = sweep(tmp_path, "--space", str(HERE / "spaces" / "curve_arms.toml"), "--scheduler", "curve",
                 "--objective", "pareto", "--concurrency", "1", "--cpus-per-worker", "1.5", "--tracking-uri", uri,
                 *QUICK)
    out = capsys.readouterr().out
    by_index = {r["trial_index"]: r for r in rows}
    assert by_index[0]["status"] == "finished" and by_index[0]["step"] == 12
    assert by_index[1]["status"] == "pruned" and by_index[1]["step"] < 12  # fell behind the control's curve
    assert by_index[2]["status"] == "finished" and by_index[2]["step"] == 12  # tracked it: kept
    assert "Pareto front" in out
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("curve_arms")
    parent = client.search_runs([exp.experiment_id], "tags.kind = 'sweep'")[0]
    front = parent.data.tags["pareto_front"].split(",")
    assert front and set(front) <= {"0", "2"}
    assert "pareto_front.csv" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    tagged = client.search_runs([exp.experiment_id], "tags.pareto = 'true'")
    assert sorted(r.data.tags["trial_index"] for r in tagged) == sorted(front)


def test_time_objective_reaches_the_searcher(muon_sweep):
    from sweeps.records import get_track, projected_time_s
    from sweeps.search import SpeedrunOptunaSearch
    tmp_path, rows, out = muon_sweep
    track = get_track("quick")  # conftest.quick_track: the trials' own data, validation set and budget
    assert "verdicts: track quick" in out
    searcher = SpeedrunOptunaSearch()
    searcher.restore_from_dir(str(tmp_path / "s"))
    values = sorted(t.value for t in searcher._ot_study.trials)
    assert values == pytest.approx(sorted(r["objective_time_s"] for r in rows))
    assert_study_matches(tmp_path / "s", "s", rows, "objective_time_s")  # the journal a user opens, the same
    for r in rows:  # the end-of-run time, projected through the exchange rate, for hits and misses alike
        assert r["time_to_target_s"] == (r["train_time_s"] if r["val_loss"] <= track.target_loss else None)
        assert r["objective_time_s"] == pytest.approx(
            projected_time_s(r["val_loss"], r["train_time_s"], int(r["step"]), track), rel=1e-6)
        assert r["verdict"] in ("candidate", "missed")  # the quick track's record time is 1e6 s


def test_a_set_value_reaches_every_trial_as_given(muon_sweep):
    """--steps 12 --set optim.muon_momentum_warmup_steps=5: the trials' logged configs hold 5 (a --set value is
    applied after the compression, never rescaled; tests/test_config.py checks the same order elsewhere)."""
    tmp_path, _, _ = muon_sweep
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("muon_lr")
    trials = client.search_runs([exp.experiment_id], "tags.kind = 'trial' and tags.sweep_name = 's'")
    assert trials and {r.data.params["optim.muon_momentum_warmup_steps"] for r in trials} == {"5"}
    assert {r.data.params["schedule.num_scheduled_steps"] for r in trials} != {"260"}  # compressed to 12 steps


@pytest.mark.extended
def test_confirm_top_reranks_by_the_mean(confirmed_sweep):
    tmp_path, rows, out = confirmed_sweep
    assert "confirmed ranking (mean over fresh seeds; verdict of the multi-run test)" in out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("muon_lr")
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'sweep' and tags.sweep_name = 's'")
    confirm_runs = client.search_runs([exp.experiment_id], "tags.kind = 'confirm' and tags.sweep_name = 's'")
    assert len(confirm_runs) == 4
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in confirm_runs)
    confirmed = json.loads(client.download_artifacts(parent.info.run_id, "confirm.json", str(tmp_path)) and
                           open(f"{tmp_path}/confirm.json").read())
    assert [c["runs"] for c in confirmed] == [2, 2]
    assert sorted(c["trial_index"] for c in confirmed) == [0, 1]  # both finished trials re-run
    means = [c["mean_val_loss"] for c in confirmed]
    assert means == sorted(means)  # ranked by the mean of the fresh seeds
    for c in confirmed:
        assert c["mean_val_loss"] == pytest.approx(sum(c["losses"]) / 2)
        assert c["verdict"] in ("record", "reached", "missed")  # the multi-run words, never a single-run one
