"""Record attempts: several seeded runs through the trial unit, logs, the t-test verdict, MLflow. (The
winner's-curse guard of a sweep, --confirm-top, is tested in test_sweep.py on a sweep shared with other tests.)"""

import json
import math

import conftest
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from sweeps import record as record_cli
from sweeps.verdict import judge_runs, runs_needed

pytestmark = pytest.mark.slow
# the runs side by side (one thread each, as one at a time would have)
QUICK = [*conftest.QUICK, "--cpus-per-worker", "0.5"]


def test_three_seeds_logs_verdict_and_mlflow(local_ray, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = record_cli.main(["--preset", "tiny", "--steps", "12", "--runs", "3", "--target", "3.7", *QUICK,
                          "--record-time", "1e6", "--storage", str(tmp_path), "--name", "att", "--tracking-uri", uri])
    verdict = json.loads((tmp_path / "att" / "verdict.json").read_text())
    assert rc == 0 and verdict["accepted"] is True
    assert verdict["seeds"] == [1000, 1001, 1002]
    losses = verdict["losses"]
    assert len(losses) == 3 and len(set(losses)) == 3  # fresh seeds: three different runs
    assert verdict["p_value"] == pytest.approx(stats.ttest_1samp(losses, 3.7, alternative="less").pvalue, rel=1e-12)
    logs = sorted((tmp_path / "att" / "logs").glob("*.txt"))
    assert len(logs) == 3
    for log in logs:
        text = log.read_text()
        assert text.startswith("# code version:") and "torch" in text.splitlines()[1]
        assert "step:12/12 val_loss:" in text and "peak memory allocated:" in text
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("record-attempts")
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'sweep' and tags.sweep_name = 'att'")
    assert parent.data.tags["accepted"] == "true" and parent.data.metrics["p_value"] == pytest.approx(
        verdict["p_value"])
    children = client.search_runs([exp.experiment_id], "tags.kind = 'trial' and tags.sweep_name = 'att'")
    assert sorted(int(c.data.params["run.seed"]) for c in children) == verdict["seeds"]


def test_a_clear_miss_is_not_accepted(local_ray, tmp_path, capsys):
    # 4 steps are plenty to miss a target of 2.0 (the loss starts near 4.85)
    rc = record_cli.main(["--preset", "tiny", "--steps", "4", "--runs", "2", "--target", "2.0", *QUICK,
                          "--storage", str(tmp_path), "--name", "miss", "--tracking-uri",
                          f"sqlite:///{tmp_path}/mlflow.db"])
    out = capsys.readouterr().out
    assert rc == 1 and "not accepted" in out and "above the target 2.0" in out


def test_runs_needed_estimate():
    # mean below the target but too few runs for p < 0.01: the estimate says how many the spread needs
    losses = [3.2790, 3.2805, 3.2782, 3.2799]
    v = judge_runs(losses, [70.0] * 4, 3.28, 73.8)
    assert not v.accepted and v.p_value >= 0.01
    assert v.runs_needed is not None and v.runs_needed > 4
    assert any(f"about {v.runs_needed} runs" in r for r in v.reasons)
    # the estimate is the first n at which the same mean and std pass
    n = v.runs_needed
    t = (3.28 - v.loss_mean) / (v.loss_std / math.sqrt(n))
    assert t > stats.t.ppf(0.99, n - 1) and (3.28 - v.loss_mean) / (v.loss_std / math.sqrt(n - 1)) <= stats.t.ppf(
        0.99, n - 2)
    assert runs_needed(3.30, 0.001, 3.28) is None
