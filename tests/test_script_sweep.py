"""Sweeps of a contributor's own train_gpt.py (the stand-in under tests/trainers/, in the public file's shape):
each trial a patched copy run on 2 Ray Train workers as torchrun would start it (gloo), its step lines read as
reports. ASHA stops a poor arm; MLflow has the knobs, the curves, the diff and the script's own log; a script
process killed mid-run and a stalled one are failed trials and the sweep goes on."""

import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from sweeps import run as sweep_cli

HERE = Path(__file__).resolve().parent
STANDIN = str(HERE / "trainers" / "train_gpt.py")
pytestmark = pytest.mark.slow


def script_sweep(tmp_path, space: str, *args, exit_code: int = 0) -> list[dict]:
    rc = sweep_cli.main(["--trainer", STANDIN, "--space", str(HERE / "spaces" / space), "--env", "NUM_ITERS=40",
                         "--workers-per-trial", "2", "--cpus-per-worker", "0.5", "--concurrency", "1",
                         "--storage", str(tmp_path), "--name", "s", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                         *args])
    assert rc == exit_code
    return sorted(pq.read_table(tmp_path / "s" / "results.parquet").to_pylist(), key=lambda r: r["trial_index"])


def leftover_scripts(tmp_path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if str(tmp_path) in line]


@pytest.mark.extended  # about 2.5 minutes on a 2-core machine (tests/test_sweep.py runs ASHA in the default step)
def test_a_script_sweep_with_asha(local_ray, tmp_path, capsys):
    rows = script_sweep(tmp_path, "standin.toml", "--seed", "2")
    out = capsys.readouterr().out
    assert "trainer: " in out and "not comparable" in out
    control, poor, third = rows
    assert control["status"] == "finished" and control["step"] == 40 and control["val_loss"] < 2.3
    assert control["Muon.lr"] == 0.05 and control["DistAdam.lr"] == 0.02  # trial 0: the file as it is
    assert poor["Muon.lr"] == pytest.approx(0.0005)
    assert poor["status"] == "pruned" and poor["step"] < 40 and poor["val_loss"] > control["val_loss"]
    assert third["status"] in ("finished", "pruned")
    assert not leftover_scripts(tmp_path / "s" / "trial_code")  # a stopped trial's script processes are gone

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("standin")
    runs = {r.data.tags["trial_index"]: r for r in client.search_runs([exp.experiment_id], "tags.kind = 'trial'")}
    assert sorted(runs) == ["0", "1", "2"]
    run = runs["1"]
    assert float(run.data.params["Muon.lr"]) == pytest.approx(0.0005) and run.data.params["trainer"] == STANDIN
    curve = client.get_metric_history(runs["0"].info.run_id, "val_loss")  # the control's, keyed by its steps
    assert sorted({m.step for m in curve}) == [0, 8, 16, 24, 32, 40] and curve[-1].value < curve[0].value - 1
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"diff.patch", "train.log", "code.json", "stdout.rank0.txt"} <= files
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    patch = (local / "diff.patch").read_text()
    assert "-optimizer2 = Muon([model.proj.weight], lr=0.05" in patch and "lr=0.0005" in patch
    log = (local / "train.log").read_text()
    assert log.startswith("Running Python") and "step:8/40 val_loss:" in log  # the script's own log file
    assert run.data.tags["code_sha256"] != runs["0"].data.tags["code_sha256"]
    assert runs["0"].data.tags["code_sha256"] == runs["0"].data.tags["source_sha256"]  # the control: unpatched


@pytest.mark.extended  # about 2.5 minutes on a 2-core machine: three script trials, one of them waits out a stall
def test_killed_and_stalled_scripts_fail_and_the_sweep_goes_on(local_ray, tmp_path):
    # the stand-in's first console line comes after torch's import, gloo's set-up and a validation: on a cold,
    # loaded 2-core CI machine that took over 15 s, so the healthy trial 0 "stalled" too (all failed, exit 1)
    rows = script_sweep(tmp_path, "standin_faults.toml", "--scheduler", "none", "--max-failures", "0",
                        "--stall-timeout", "40")
    assert [r["status"] for r in rows] == ["finished", "failed", "failed"]
    errors = {i: next((tmp_path / "s").glob(f"trial_{i:04d}_*/error.txt")).read_text() for i in (1, 2)}
    assert "exited with" in errors[1] and "train_gpt.py" in errors[1]
    assert "stalled" in errors[2]
    assert not leftover_scripts(tmp_path / "s" / "trial_code")


@pytest.mark.extended
def test_a_sweep_whose_every_trial_fails_exits_non_zero_with_its_trials_recorded(local_ray, tmp_path, capsys):
    rows = script_sweep(tmp_path, "standin_all_fail.toml", "--scheduler", "none", "--max-failures", "0",
                        exit_code=sweep_cli.EXIT_ALL_FAILED)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert "error: all 2 trials failed" in capsys.readouterr().err
    runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()],
        "tags.kind = 'trial'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]
