"""Record verdicts: from speedrun logs (no training) and from fresh runs interleaved with a baseline's through
the trial unit (real Ray, real MLflow)."""

import json
from pathlib import Path

import conftest
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from speedrun.config import TrainConfig
from sweeps import record as record_cli

CANDIDATE = ([3.2771, 3.2779, 3.2768, 3.2782, 3.2775, 3.2770, 3.2785, 3.2774],
             [78.91, 79.02, 78.87, 79.10, 78.95, 78.99, 79.05, 78.92])
BASELINE = ([3.2780, 3.2791, 3.2776, 3.2785, 3.2769, 3.2788, 3.2779, 3.2783, 3.2790, 3.2774],
            [79.61, 79.75, 79.58, 79.70, 79.66, 79.80, 79.63, 79.69, 79.72, 79.60])


def write_logs(folder: Path, losses, times, steps: int = 1390) -> Path:
    """One file per run in the public trainer's format; the last val line is the run's result."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (loss, t) in enumerate(zip(losses, times)):
        lines = ["import os  # the trainer's source heads a real log", f"step:0/{steps} val_loss:10.8258 "
                 f"train_time:0ms step_avg:0.03ms", f"step:1/{steps} train_time:120ms step_avg:120.00ms",
                 f"step:1250/{steps} val_loss:3.2790 train_time:{t * 900:.0f}ms step_avg:57.00ms",
                 f"step:{steps}/{steps} val_loss:{loss:.4f} train_time:{t * 1000:.0f}ms step_avg:57.30ms",
                 "peak memory allocated: 30000 MiB"]
        (folder / f"run{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def run_logs(tmp_path, capsys, *argv) -> tuple[int, dict, str]:
    rc = record_cli.main([*argv, "--storage", str(tmp_path / "out"), "--name", "v",
                          "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    captured = capsys.readouterr()
    verdict = json.loads((tmp_path / "out" / "v" / "verdict.json").read_text()) if rc in (0, 1) else {}
    return rc, verdict, captured.out + captured.err


def test_logs_reproduce_the_record_statistics(tmp_path, capsys):
    cand = write_logs(tmp_path / "cand", *CANDIDATE)
    base = write_logs(tmp_path / "base", *BASELINE)
    rc, v, out = run_logs(tmp_path, capsys, "--logs", str(cand), "--baseline-logs", str(base))
    losses, times = CANDIDATE
    b_losses, b_times = BASELINE
    assert v["loss_p"] == pytest.approx(stats.ttest_1samp(losses, 3.28, alternative="less").pvalue, rel=1e-4)
    assert v["time_p"] == pytest.approx(stats.ttest_ind(times, b_times, equal_var=False, alternative="less").pvalue,
                                        rel=1e-4)
    assert v["loss_welch_p"] == pytest.approx(stats.ttest_ind(losses, b_losses, equal_var=False).pvalue, rel=1e-4)
    assert v["speedup"] == pytest.approx((sum(b_times) / 10) / (sum(times) / 8), rel=1e-4)
    assert rc == 0 and v["accepted"] and v["verdict"] == "record"
    md = (tmp_path / "out" / "v" / "statistics.md").read_text()
    assert "one-sided" in md and "Welch" in md and "| verdict |" in md
    words = [r["verdict"] for r in v["runs"]]
    assert words[:8] == ["candidate"] * 8  # every candidate run is faster than the fastest baseline run
    assert "verdict: record" in out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("record-attempts")
    (parent,) = client.search_runs([exp.experiment_id], "tags.sweep_name = 'v'")
    assert parent.data.tags["verdict"] == "record" and parent.data.metrics["loss_p"] == pytest.approx(v["loss_p"])


def test_a_baseline_against_a_copy_of_itself_is_not_accepted_and_has_no_candidate(tmp_path, capsys):
    base = write_logs(tmp_path / "base", *BASELINE)
    copy = write_logs(tmp_path / "copy", *BASELINE)
    rc, v, _ = run_logs(tmp_path, capsys, "--logs", str(copy), "--baseline-logs", str(base))
    assert rc == 1 and not v["accepted"]
    assert v["time_p"] == pytest.approx(0.5, abs=1e-9)
    assert not any(r["verdict"] == "candidate" for r in v["runs"])


def test_logs_without_a_baseline_are_timed_against_the_tracks_record_runs(tmp_path, capsys):
    from sweeps.records import get_track

    track = get_track("track1")
    cand = write_logs(tmp_path / "cand", *CANDIDATE)
    rc, v, out = run_logs(tmp_path, capsys, "--logs", str(cand))
    losses, times = CANDIDATE
    expected = stats.ttest_ind_from_stats(stats.tmean(times), stats.tstd(times), len(times), track.record_time_s,
                                          track.time_noise, track.record_runs, equal_var=False, alternative="less")
    assert v["time_p"] == pytest.approx(expected.pvalue, rel=1e-4)
    assert "record time" in out and "--baseline-logs" in out  # says that times compare across machines


def test_a_loss_above_the_target_is_missed(tmp_path, capsys):
    cand = write_logs(tmp_path / "cand", [3.2812, 3.2820, 3.2805], [70.0, 70.1, 69.9])
    rc, v, out = run_logs(tmp_path, capsys, "--logs", str(cand))
    assert rc == 1 and v["verdict"] == "missed" and "above the target" in out
    assert {r["verdict"] for r in v["runs"]} == {"missed"}


@pytest.mark.parametrize("bad", ["empty", "no val line", "training flag"])
def test_bad_logs_input_exits_2(tmp_path, capsys, bad):
    folder = tmp_path / "logs"
    folder.mkdir()
    argv = ["--logs", str(folder)]
    if bad == "no val line":
        (folder / "a.txt").write_text("step:1/10 train_time:5ms\n")
    if bad == "training flag":
        write_logs(folder, [3.27, 3.27], [70.0, 70.0])
        argv += ["--preset", "tiny"]
    rc, _, err = run_logs(tmp_path, capsys, *argv)
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err


def test_fresh_runs_on_another_budget_than_the_tracks_are_refused(tmp_path, capsys):
    # the tiny track was measured at 100 steps: 270-step runs cannot be judged against its record time
    rc = record_cli.main(["--preset", "tiny", "--runs", "3", "--storage", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "270 steps (track tiny: 100)" in err and "--steps 100" in err


@pytest.mark.slow
@pytest.mark.extended
def test_candidate_interleaved_with_a_baseline_through_ray(local_ray, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    baseline = tmp_path / "baseline.json"
    # the same validation set as the candidate's (4,096 tokens, conftest.QUICK), else it is refused
    baseline.write_text(json.dumps(TrainConfig.resolve("tiny", {"data.val_tokens": 4096, "run.warmup_steps": 0},
                                                       12).to_dict()))
    rc = record_cli.main(["--preset", "tiny", "--steps", "12", "--set", "optim.muon_lr=0.03", "--runs", "2",
                          "--baseline", str(baseline), "--target", "3.9", *conftest.QUICK, "--cpus-per-worker", "0.5",
                          "--storage", str(tmp_path), "--name", "att", "--tracking-uri", uri])
    v = json.loads((tmp_path / "att" / "verdict.json").read_text())
    assert rc == (0 if v["accepted"] else 1)
    assert [(r["run"], r["arm"]) for r in v["runs"]] == [("seed 1000", "candidate"), ("seed 1002", "candidate"),
                                                         ("seed 1001", "baseline"), ("seed 1003", "baseline")]
    assert v["loss_p"] == pytest.approx(stats.ttest_1samp(v["losses"], 3.9, alternative="less").pvalue, rel=1e-9)
    assert v["baseline_times"] and v["time_test"] == "welch_vs_baseline"
    logs = sorted((tmp_path / "att" / "logs").glob("*.txt"))
    assert len(logs) == 4 and all("step:12/12 val_loss:" in p.read_text() for p in logs)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("record-attempts")
    children = client.search_runs([exp.experiment_id], "tags.kind = 'trial' and tags.sweep_name = 'att'")
    arms = {int(c.data.params["run.seed"]): (c.data.tags["arm"], c.data.params["optim.muon_lr"]) for c in children}
    assert arms == {1000: ("candidate", "0.03"), 1001: ("baseline", "0.02"), 1002: ("candidate", "0.03"),
                    1003: ("baseline", "0.02")}
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'sweep' and tags.sweep_name = 'att'")
    assert parent.data.tags["verdict"] in ("record", "reached", "missed")
    assert "statistics.md" in [a.path for a in client.list_artifacts(parent.info.run_id)]


def test_rank_takes_the_latest_sweeps_trial_at_its_own_budget(tmp_path, capsys):
    """Two sweeps of one space at two step budgets in one store: --space S --rank 1 re-runs the latest sweep's
    best trial, at that trial's budget, and says which sweep, trial and budget it is."""
    import time as clock

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("muon_lr")
    for sweep, steps, losses in (("long", 40, [1.9, 1.8]), ("short", 12, [3.7, 3.6])):
        for i, loss in enumerate(losses):
            cfg = TrainConfig.preset("tiny").with_total_steps(steps).override({"optim.muon_lr": 0.02 + 0.01 * i})
            run = client.create_run(exp, tags={"kind": "trial", "sweep_name": sweep, "trial_index": str(i),
                                               "status": "finished", "verdict": "not comparable"})
            client.log_batch(run.info.run_id, metrics=[Metric("val_loss", loss, 0, steps)],
                             params=[Param(k, json.dumps(v) if isinstance(v, list) else str(v))
                                     for k, v in cfg.to_dict().items()])
            client.set_terminated(run.info.run_id)
        clock.sleep(0.05)
    args = record_cli.parse_args(["--space", "muon_lr", "--rank", "1"])
    cfg, source = record_cli.candidate_config(args, uri)
    assert cfg.schedule.total_steps == 12 and cfg.optim.muon_lr == pytest.approx(0.03)
    assert source.startswith("rank 1 of sweep short (the latest of this space): trial 1, 12 steps")
    args = record_cli.parse_args(["--space", "muon_lr", "--rank", "1", "--sweep", "long"])
    cfg, source = record_cli.candidate_config(args, uri)
    assert cfg.schedule.total_steps == 40 and "rank 1 of sweep long: trial 1, 40 steps" in source
    from sweeps import report as report_cli
    assert report_cli.main(["--space", "muon_lr", "--tracking-uri", uri]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.strip()[:1].isdigit() and "runs of" not in ln]
    assert [(ln[0], ln[1], ln[3]) for ln in lines] == [("1", "long", "40"), ("2", "long", "40"), ("1", "short", "12"),
                                                       ("2", "short", "12")]  # ranked within each budget


def test_a_baseline_on_another_validation_set_is_refused(tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(TrainConfig.resolve("tiny", None, 12).to_dict()))  # 32,768 validation tokens
    rc = record_cli.main(["--preset", "tiny", "--steps", "12", "--runs", "2", "--baseline", str(baseline),
                          "--target", "3.9", *conftest.QUICK, "--storage", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "the baseline measures something else" in err and "32,768 validation tokens" in err
