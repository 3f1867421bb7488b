"""Acceptance statistics of a multi-run claim (sweeps/acceptance.py) read from speedrun-format logs
(sweeps/speedrun_logs.py), checked against scipy called directly. CPU only, no Ray."""

import json
import math
import statistics

import pytest
from scipy import stats

from sweeps.acceptance import (TIME_NOT_TESTED, TIME_VS_BASELINE, TIME_VS_RECORD_STATS, TIME_VS_RECORD_TIME, Runs,
                               acceptance_test, runs_needed)
from sweeps.speedrun_logs import LogError, parse_log, read_log_dir

TARGET = 3.28
STEPS = 1390

# 8 candidate runs and 10 baseline runs (the previous record re-run): final val loss, train time (s)
CAND_LOSSES = [3.2779, 3.2791, 3.2768, 3.2785, 3.2774, 3.2796, 3.2781, 3.2772]
CAND_TIMES = [79.512, 79.688, 79.604, 79.731, 79.559, 79.645, 80.102, 79.590]
BASE_LOSSES = [3.2788, 3.2771, 3.2805, 3.2779, 3.2766, 3.2793, 3.2782, 3.2810, 3.2775, 3.2784]
BASE_TIMES = [80.640, 80.702, 80.731, 80.688, 80.815, 80.659, 80.777, 80.703, 80.690, 80.748]


def write_log(path, final_loss, final_time_s, steps=STEPS, last_step=None):
    """A log in the public trainer's format: source code first, training lines, validations every 500 steps."""
    last_step = steps if last_step is None else last_step
    lines = ['import os', 'print0(f"step:{step}/{train_steps} val_loss:{val_loss:.4f} train_time:{t:.0f}ms")',
             "=" * 40, f"step:0/{steps} val_loss:10.8311 train_time:0ms step_avg:0.03ms"]
    per_step_ms = final_time_s * 1000 / last_step
    for step in range(1, last_step + 1):
        ms = round(step * per_step_ms) if step < last_step else round(final_time_s * 1000)
        lines.append(f"step:{step}/{steps} train_time:{ms}ms step_avg:{ms / step:.2f}ms")
        if step % 500 == 0 and step != last_step:
            lines.append(f"step:{step}/{steps} val_loss:{4.0 - step / 1000:.4f} train_time:{ms}ms "
                         f"step_avg:{ms / step:.2f}ms")
    lines.append(f"step:{last_step}/{steps} val_loss:{final_loss:.4f} train_time:{round(final_time_s * 1000)}ms "
                 f"step_avg:{final_time_s * 1000 / last_step:.2f}ms")
    lines.append("peak memory allocated: 30220 MiB reserved: 38672 MiB")
    path.write_text("\n".join(lines) + "\n")


def write_runs(folder, losses, times):
    folder.mkdir()
    for i, (loss, t) in enumerate(zip(losses, times)):
        write_log(folder / f"run{i:02d}.txt", loss, t)
    return folder


@pytest.fixture
def logged(tmp_path):
    cand = read_log_dir(write_runs(tmp_path / "this_pr", CAND_LOSSES, CAND_TIMES))
    base = read_log_dir(write_runs(tmp_path / "baseline", BASE_LOSSES, BASE_TIMES))
    return cand, base


def test_logs_give_each_runs_final_validation(logged):
    cand, base = logged
    assert len(cand) == 8 and len(base) == 10
    assert [r.name for r in cand] == [f"run{i:02d}" for i in range(8)]
    assert [r.val_loss for r in cand] == CAND_LOSSES
    assert [r.train_time_s for r in cand] == pytest.approx(CAND_TIMES, abs=1e-9)
    assert [r.train_time_s for r in base] == pytest.approx(BASE_TIMES, abs=1e-9)
    run = cand[0]
    assert run.complete and run.final_step == run.total_steps == STEPS
    assert [step for step, _, _ in run.history] == [0, 500, 1000, STEPS]
    assert run.history[0] == (0, 10.8311, 0.0)


def test_acceptance_matches_scipy(logged):
    cand, base = logged
    losses, times = [r.val_loss for r in cand], [r.train_time_s for r in cand]
    b_losses, b_times = [r.val_loss for r in base], [r.train_time_s for r in base]
    a = acceptance_test(losses, times, TARGET, baseline_losses=b_losses, baseline_times=b_times)

    assert a.loss_p == pytest.approx(stats.ttest_1samp(CAND_LOSSES, TARGET, alternative="less").pvalue, rel=1e-4)
    assert a.baseline_loss_p == pytest.approx(stats.ttest_1samp(BASE_LOSSES, TARGET, alternative="less").pvalue,
                                              rel=1e-4)
    assert a.loss_welch_p == pytest.approx(stats.ttest_ind(CAND_LOSSES, BASE_LOSSES, equal_var=False).pvalue,
                                           rel=1e-4)
    welch_time = stats.ttest_ind(CAND_TIMES, BASE_TIMES, equal_var=False, alternative="less")
    assert a.time_test == TIME_VS_BASELINE
    assert a.time_p == pytest.approx(welch_time.pvalue, rel=1e-4)
    assert a.time_t == pytest.approx(welch_time.statistic, rel=1e-4)
    assert a.time_p_two_sided == pytest.approx(stats.ttest_ind(CAND_TIMES, BASE_TIMES, equal_var=False).pvalue,
                                               rel=1e-4)
    assert a.speedup == pytest.approx(statistics.mean(BASE_TIMES) / statistics.mean(CAND_TIMES), rel=1e-4)
    assert a.time_saved_s == pytest.approx(statistics.mean(BASE_TIMES) - statistics.mean(CAND_TIMES), rel=1e-4)
    assert a.slowest_run_s == max(CAND_TIMES) and a.fastest_baseline_s == min(BASE_TIMES)
    assert a.loss.std == pytest.approx(statistics.stdev(CAND_LOSSES), rel=1e-4)
    assert a.time.median == pytest.approx(statistics.median(CAND_TIMES), rel=1e-4)
    assert a.accepted and a.reasons == ()

    json.loads(json.dumps(a.to_dict(), allow_nan=False))
    table = a.table()
    assert "ACCEPTED" in table and "baseline time s" in table
    md = a.statistics_md("Candidate", [{"run": r.name, "val_loss": r.val_loss, "train_time_s": r.train_time_s,
                                        "verdict": "ok"} for r in cand])
    assert md.startswith("# Candidate\n")
    assert "| run00 | 3.2779 | 79.512 s | ok |" in md
    assert f"{a.speedup:.8f}x" in md and f"{a.loss_welch_p:.10f}" in md


def test_baseline_against_itself_is_not_accepted():
    a = acceptance_test(BASE_LOSSES, BASE_TIMES, TARGET, baseline_losses=BASE_LOSSES, baseline_times=BASE_TIMES)
    assert a.time_p == pytest.approx(0.5, abs=1e-9)
    assert a.speedup == pytest.approx(1.0)
    assert not a.accepted
    assert any(r.startswith("time: Welch p = 0.5 vs the baseline's 10 runs is not below 0.01") for r in a.reasons)


def test_time_against_the_record_without_baseline():
    a = acceptance_test(CAND_LOSSES, CAND_TIMES, TARGET, record_time_s=80.7, time_noise=0.06, record_runs=13)
    expected = stats.ttest_ind_from_stats(statistics.mean(CAND_TIMES), statistics.stdev(CAND_TIMES), 8,
                                          80.7, 0.06, 13, equal_var=False, alternative="less")
    assert a.time_test == TIME_VS_RECORD_STATS
    assert a.time_p == pytest.approx(expected.pvalue, rel=1e-4)
    assert a.speedup == pytest.approx(80.7 / statistics.mean(CAND_TIMES), rel=1e-4)
    assert a.accepted

    b = acceptance_test(CAND_LOSSES, CAND_TIMES, TARGET, record_time_s=79.7)  # no spread known: one-sample test
    assert b.time_test == TIME_VS_RECORD_TIME
    assert b.time_p == pytest.approx(stats.ttest_1samp(CAND_TIMES, 79.7, alternative="less").pvalue, rel=1e-4)
    assert not b.accepted and len(b.reasons) == 1 and b.reasons[0].startswith("time: one-sample p = ")
    assert "## Against the record" in b.statistics_md("x")

    c = acceptance_test(CAND_LOSSES, CAND_TIMES, TARGET)
    assert c.time_test == TIME_NOT_TESTED and c.time_p is None and c.speedup is None
    assert c.accepted and "acceptance rests on the loss alone" in c.reasons[0]


def test_loss_failures_say_why():
    high = acceptance_test([3.2815, 3.2809, 3.2812], [70.0, 70.1, 70.2], TARGET, record_time_s=75.0)
    assert not high.accepted and high.runs_needed is None
    assert high.reasons[0] == "mean val loss 3.2812 is above the target 3.28: more runs will not fix that"
    assert not any("about" in r for r in high.reasons)

    few = [3.2790, 3.2801, 3.2779]
    a = acceptance_test(few, [70.0, 70.1, 70.2], TARGET, record_time_s=75.0)
    assert not a.accepted
    assert a.reasons[0] == f"loss p = {a.loss_p:.2g} is not below 0.01"
    assert a.runs_needed == runs_needed(statistics.mean(few), statistics.stdev(few), TARGET, 0.01)
    assert a.reasons[1] == (f"with this spread (std {statistics.stdev(few):.2g}) "
                            f"about {a.runs_needed} runs would give p < 0.01")

    one = acceptance_test([3.2700], [70.0], TARGET)
    assert math.isnan(one.loss_p) and not one.accepted and one.loss.std == 0


def test_runs_needed():
    assert runs_needed(3.2805, 0.0013, TARGET) is None
    assert runs_needed(TARGET, 0.0013, TARGET) is None
    assert runs_needed(3.27, 0.0, TARGET) == 2
    mean, std = 3.2790, 0.0013
    n = runs_needed(mean, std, TARGET)

    def p(k):  # the p of a sample of size k with exactly this mean and std
        return stats.t.cdf((mean - TARGET) / (std / math.sqrt(k)), k - 1)

    assert p(n) < 0.01 <= p(n - 1)
    assert runs_needed(mean, std, TARGET, alpha=0.05) < n
    big = runs_needed(3.27999, 0.0013, TARGET)
    assert big is not None and big > 10_000
    with pytest.raises(ValueError):
        runs_needed(mean, -1.0, TARGET)


def test_runs_summary():
    r = Runs.of([3.0, 1.0, 2.0])
    assert (r.n, r.mean, r.std, r.median, r.min, r.max) == (3, 2.0, 1.0, 2.0, 1.0, 3.0)
    assert Runs.of([5.0]).std == 0.0
    with pytest.raises(ValueError):
        Runs.of([])
    with pytest.raises(ValueError):
        acceptance_test([3.27, 3.27], [70.0], TARGET)


def test_log_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "statistics.md").write_text("# not a log\n")
    with pytest.raises(LogError, match="holds no run logs"):
        read_log_dir(empty)
    with pytest.raises(LogError, match="not a folder"):
        read_log_dir(tmp_path / "missing")

    train_only = tmp_path / "train_only"
    train_only.mkdir()
    (train_only / "a.txt").write_text("step:1/1390 train_time:94ms step_avg:94.04ms\n"
                                      "step:2/1390 train_time:134ms step_avg:66.75ms\n")
    with pytest.raises(LogError, match=r"a\.txt: no validation line"):
        read_log_dir(train_only)
    assert issubclass(LogError, ValueError)


def test_incomplete_run_is_kept_and_marked(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    write_log(folder / "done.log", 3.2781, 79.6)
    write_log(folder / "cut.txt", 3.3330, 67.961, last_step=1250)
    runs = read_log_dir(folder)
    assert [r.name for r in runs] == ["cut", "done"]
    cut = parse_log(folder / "cut.txt")
    assert (cut.final_step, cut.total_steps, cut.complete) == (1250, STEPS, False)
    assert cut.val_loss == 3.3330 and cut.train_time_s == pytest.approx(67.961)
    assert runs[1].complete


def test_prefixed_and_diverged_lines(tmp_path):
    log = tmp_path / "ray.txt"
    log.write_text("(RayTrainWorker pid=4242) step:0/100 val_loss:10.8000 train_time:0ms step_avg:0.03ms\n"
                   "(RayTrainWorker pid=4242) step:50/100 val_loss:nan train_time:2500ms step_avg:50.00ms\n"
                   "substep:100/100 val_loss:3.0000 train_time:5000ms\n")
    run = parse_log(log)
    assert (run.final_step, run.total_steps, run.complete) == (50, 100, False)
    assert math.isnan(run.val_loss) and run.train_time_s == 2.5


def test_diverged_run_fails_the_claim():
    a = acceptance_test([3.2790, math.nan, 3.2780], [70.0, 71.0, 72.0], TARGET, baseline_times=[90.0, 91.0, 92.0])
    assert not a.accepted and math.isnan(a.loss.mean)
    assert a.reasons == ("1 of 3 runs ended with a non-finite val loss (diverged): the claim cannot pass",)
    json.dumps(a.to_dict(), allow_nan=False)
    a.table(), a.statistics_md("diverged")
