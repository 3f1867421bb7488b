"""Record attempts of a contributor's own train_gpt.py (`record.py --trainer`): the stand-in (tests/trainers/) with a
knob set, interleaved with the unchanged file, through Ray (2 gloo workers per run) and under plain torchrun; the
statistics are those of the runs' own final losses, and bad input is refused before anything runs."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from sweeps import record as record_cli

STANDIN = str(Path(__file__).resolve().parent / "trainers" / "train_gpt.py")


def attempt(tmp_path, *argv) -> tuple[int, dict]:
    rc = record_cli.main(["--trainer", STANDIN, *argv, "--storage", str(tmp_path), "--name", "att",
                          "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    folder = tmp_path / "att"
    return rc, json.loads((folder / "verdict.json").read_text()) if rc in (0, 1) else {}


@pytest.mark.slow
@pytest.mark.extended
def test_a_knob_interleaved_with_the_unchanged_file_through_ray(local_ray, tmp_path):
    rc, v = attempt(tmp_path, "--set", "Muon.lr=0.02", "--baseline", STANDIN, "--runs", "2", "--seed-env", "SEED",
                    "--env", "NUM_ITERS=16", "--target", "2.6", "--workers-per-trial", "2", "--cpus-per-worker", "0.5")
    assert rc == (0 if v["accepted"] else 1)
    assert [(r["run"], r["arm"]) for r in v["runs"]] == [("seed 1000", "candidate"), ("seed 1002", "candidate"),
                                                         ("seed 1001", "baseline"), ("seed 1003", "baseline")]
    assert len(set(v["losses"])) == 2  # --seed-env: each run its own seed
    assert v["loss_p"] == pytest.approx(stats.ttest_1samp(v["losses"], 2.6, alternative="less").pvalue, rel=1e-9)
    assert v["time_test"] == "welch_vs_baseline"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("record-attempts")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'trial' and tags.sweep_name = 'att'")
    by_seed = {int(r.data.tags["seed"]): r for r in runs}
    assert sorted(by_seed) == [1000, 1001, 1002, 1003]
    for seed, run in by_seed.items():
        arm = "candidate" if seed in (1000, 1002) else "baseline"
        assert run.data.tags["arm"] == arm and run.data.params["env.SEED"] == str(seed)
        assert run.data.params.get("Muon.lr") == ("0.02" if arm == "candidate" else None)
        curve = client.get_metric_history(run.info.run_id, "val_loss")
        assert sorted({m.step for m in curve}) == [0, 8, 16] and curve[-1].value < curve[0].value - 0.5
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / f"dl{seed}")))
        patch = (local / "diff.patch").read_text()
        assert ("lr=0.02" in patch) == (arm == "candidate")
        assert "step:16/16 val_loss:" in (local / "train.log").read_text()
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'sweep' and tags.sweep_name = 'att'")
    assert "statistics.md" in [a.path for a in client.list_artifacts(parent.info.run_id)]


def test_runs_under_plain_torchrun_without_ray(tmp_path, capsys):
    rc, v = attempt(tmp_path, "--torchrun", "--runs", "2", "--seed-env", "SEED", "--env", "NUM_ITERS=16",
                    "--target", "2.6", "--workers-per-trial", "2")
    captured = capsys.readouterr()
    logs = "".join(p.read_text()[-1500:] for p in sorted((tmp_path / "att" / "runs").glob("*/stdout.txt")))
    assert rc in (0, 1), captured.out + captured.err + logs
    out = captured.out
    assert rc == (0 if v["accepted"] else 1), out
    assert [r["arm"] for r in v["runs"]] == ["candidate", "candidate"]
    logs = sorted((tmp_path / "att" / "runs").glob("candidate_seed*/stdout.txt"))
    assert len(logs) == 2 and all("step:16/16 val_loss:" in p.read_text() for p in logs)
    finals = [float(p.read_text().split("step:16/16 val_loss:")[1].split()[0]) for p in logs]
    assert sorted(finals) == pytest.approx(sorted(v["losses"]))  # the verdict is over the runs' own last lines
    assert "the runs read their own data" in out



def test_a_run_that_aborts_after_its_final_validation_keeps_its_result_under_torchrun(tmp_path, capsys):
    """The stand-in's rank 0 really aborts (SIGABRT) after its last line: the run is judged on its log, as in a
    sweep's script trial, and the exit code is on record beside it."""
    rc, v = attempt(tmp_path, "--torchrun", "--runs", "2", "--seed-env", "SEED", "--env", "NUM_ITERS=8",
                    "--set", "ABORT_AT_EXIT=True", "--target", "3.5", "--workers-per-trial", "2")
    out = capsys.readouterr().out
    assert rc in (0, 1), out
    assert len(v["runs"]) == 2 and all(r["script_exit_code"] != 0 and r["verdict"] != "failed" for r in v["runs"])
    assert out.count("exited with 1 after its final validation line; its result is kept") == 2, out  # warnings
    assert (tmp_path / "att" / "statistics.md").read_text().count("after its final validation line") == 2
    assert len(v["losses"]) == 2 and all(loss < 3.5 for loss in v["losses"])


@pytest.mark.parametrize("argv, words", [
    (["--set", "Muon.nope=0.9"], "Muon.nope"),
    (["--set", "Muon.lr=abc"], "not a Python literal"),
    (["--space", "muon_lr"], "--space picks a speedrun config"),
    (["--baseline", "nowhere.py"], "--baseline nowhere.py: no such Python file"),
    (["--env", "NUM_ITERS"], "expected KEY=VALUE"),
    (["--env", "VAL_EVERY=4"], "number of steps each trial runs is not known"),
])
def test_bad_script_attempts_are_refused_in_one_line(tmp_path, capsys, argv, words):
    rc, _ = attempt(tmp_path, *argv, *(["--env", "NUM_ITERS=8"] if argv[0] != "--env" else []), "--runs", "2")
    err = capsys.readouterr().err
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "att").exists()


def test_env_without_trainer_is_refused(tmp_path, capsys):
    rc = record_cli.main(["--preset", "tiny", "--env", "NUM_ITERS=8", "--storage", str(tmp_path)])
    assert rc == 2 and "--env applies to --trainer runs" in capsys.readouterr().err
