"""The time-to-target objective's projection, the record-curve pruner's rule, the Pareto front (no Ray)."""

import math
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler

from sweeps.pruner import RecordCurvePruner
from sweeps.records import Track, get_track, projected_time_s
from sweeps.results import pareto_front
from sweeps.protocol import OBJECTIVES
from sweeps.search import SweepPlan, make_searcher
from sweeps.spaces import load_space

TRACK = Track("t", "test", target_loss=3.28, record_time_s=73.8, source="test", data_source="fineweb",
              val_pattern="fineweb_val_*.bin", val_tokens=10_485_760, exchange_rate=0.0045, noise=0.0013)


def test_hits_and_misses_are_projected_the_same_way_through_the_exchange_rate():
    # 0.009 above target = 200 more steps at 0.0045 per 100 steps; at 0.5 s per step that is 100 s more
    assert projected_time_s(3.289, 50.0, 100, TRACK) == pytest.approx(150.0)
    assert projected_time_s(3.298, 50.0, 100, TRACK) == pytest.approx(250.0)  # twice the gap, twice the steps
    # a run that ended 0.0009 below the target could have stopped 20 steps earlier: 10 s less
    assert projected_time_s(3.2791, 50.0, 100, TRACK) == pytest.approx(40.0)
    assert projected_time_s(3.28, 50.0, 100, TRACK) == pytest.approx(50.0)  # on the target: its own end time
    assert projected_time_s(2.0, 50.0, 100, TRACK) == pytest.approx(25.0)  # never below half the run
    with pytest.raises(ValueError, match="exchange_rate"):
        projected_time_s(3.3, 50.0, 100, Track("x", "", 3.28, 1.0, "", "fineweb", "v", 1))


def test_shipped_tracks_carry_what_the_objectives_need():
    for name in ("track1", "tiny"):
        track = get_track(name)
        assert track.exchange_rate > 0 and track.noise > 0
    assert get_track("track1").exchange_rate == 0.0045
    assert get_track("tiny").curve  # a stored control curve: the pruner works before trial 0 has run


def trial(index: int):
    return SimpleNamespace(experiment_tag=f"{index + 1}_x=1", trial_id=f"t{index}")


def feed(pruner, index, points, total=100):
    return [pruner.on_trial_result(None, trial(index), {"step": s, "total_steps": total, "val_loss": v})
            for s, v in points]


def test_pruner_stops_a_trial_behind_the_control_and_keeps_one_that_tracks_it():
    pruner = RecordCurvePruner(noise=0.01, z=3.0, early=10.0)
    control = [(0, 4.85), (25, 2.0), (50, 1.6), (75, 1.45), (100, 1.38)]
    assert set(feed(pruner, 0, control)) == {TrialScheduler.CONTINUE}
    tracking = [(s, v + 0.02) for s, v in control]  # within the noise margin everywhere
    assert set(feed(pruner, 1, tracking)) == {TrialScheduler.CONTINUE}
    behind = [(0, 4.85), (25, 2.5)]  # 0.5 behind at a quarter of the schedule
    assert feed(pruner, 2, behind)[-1] == TrialScheduler.STOP
    assert pruner.decisions[0].trial == 2 and pruner.decisions[0].fraction == 0.25
    nan = [(0, 4.85), (50, math.nan)]
    assert feed(pruner, 3, nan)[-1] == TrialScheduler.STOP


def test_a_trial_that_ends_below_the_control_becomes_the_record_curve():
    pruner = RecordCurvePruner(noise=0.01)
    feed(pruner, 0, [(0, 4.85), (50, 2.0), (100, 1.60)])
    better = [(0, 4.85), (50, 1.8), (100, 1.40)]
    feed(pruner, 1, better)
    assert feed(pruner, 2, [(50, 1.95)]) == [TrialScheduler.CONTINUE]  # within the margin of the control...
    pruner.on_trial_complete(None, trial(1), {})
    assert feed(pruner, 3, [(50, 1.95)]) == [TrialScheduler.STOP]  # ...but far behind the new record curve
    worse = [(0, 4.85), (50, 1.85), (100, 1.45)]
    feed(pruner, 4, worse)
    pruner.on_trial_complete(None, trial(4), {})  # ends above the record curve: it stays as it was
    assert pruner.reference(1.0) == pytest.approx(1.40)


def test_pruner_compares_equal_schedule_fractions_not_steps():
    pruner = RecordCurvePruner(noise=0.01)
    feed(pruner, 0, [(0, 4.85), (50, 2.0), (100, 1.38)], total=100)
    # a trial with a 200-step schedule: at its step 100 it is at half its schedule, read against 2.0, not 1.38
    assert feed(pruner, 1, [(100, 2.05)], total=200) == [TrialScheduler.CONTINUE]
    assert feed(pruner, 2, [(100, 2.05)], total=100) == [TrialScheduler.STOP]  # same loss at the end: behind


def test_margin_is_calibrated_from_noise_and_narrows_towards_the_end():
    pruner = RecordCurvePruner(noise=0.002, z=3.0, early=10.0)
    assert pruner.margin(0.0) == pytest.approx(0.026) and pruner.margin(1.0) == pytest.approx(0.006)
    assert all(pruner.margin(a) > pruner.margin(b) for a, b in [(0.1, 0.5), (0.5, 0.9)])


def test_pruner_falls_back_to_the_stored_curve_and_holds_off_without_one():
    stored = RecordCurvePruner(noise=0.01, stored_curve=((0.0, 4.85), (0.5, 2.0), (1.0, 1.38)))
    assert feed(stored, 1, [(50, 2.6)]) == [TrialScheduler.STOP]  # trial 0 has not reported yet
    empty = RecordCurvePruner(noise=0.01)
    assert feed(empty, 1, [(50, 2.6)]) == [TrialScheduler.CONTINUE]  # nothing to compare with: no decision


def test_pareto_front():
    rows = [{"trial_index": i, "status": s, "val_loss": v, "train_time_s": t}
            for i, (s, v, t) in enumerate([("finished", 1.40, 30), ("finished", 1.38, 40), ("finished", 1.41, 35),
                                           ("finished", 1.37, 60), ("pruned", 1.0, 1.0)])]
    assert [r["trial_index"] for r in pareto_front(rows)] == [3, 1, 0]  # 2 is beaten by 0; pruned is out


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_searcher_takes_the_objectives_metrics(objective):
    space = load_space("muon_lr", "tiny")
    plan = SweepPlan(space, "x", None, 4, 1, 0, "none", 100, objective, get_track("tiny"))
    searcher = make_searcher(plan).searcher
    assert searcher.metric == OBJECTIVES[objective][0]
    assert len(searcher._ot_study.directions) == (2 if objective == "pareto" else 1)


def asha(noise: float):
    from sweeps.search import ControlKeepingASHA
    s = ControlKeepingASHA(time_attr="step", metric="val_loss", mode="min", max_t=12, grace_period=4,
                           reduction_factor=2, stop_last_trials=False, noise=noise)
    for i in range(4):
        s.on_trial_add(None, trial(i))
    return s


def asha_feed(s, index, points):
    return [s.on_trial_result(None, trial(index), {"step": st, "val_loss": v, "training_iteration": k + 1})
            for k, (st, v) in enumerate(points)]


@pytest.mark.parametrize("noise, stopped", [(0.0, True), (0.01, False)])
def test_asha_never_stops_a_trial_within_the_noise_of_the_best(noise, stopped):
    """Trials 0.02 apart at a rung: plain ASHA stops the worse one; with a seed noise of 0.01 (margin 2.83 x 0.01)
    the gap is one that seeds alone make, and it runs on. A gap far beyond the noise is still stopped."""
    s = asha(noise)
    asha_feed(s, 0, [(4, 2.00)])
    asha_feed(s, 1, [(4, 1.99)])
    assert (asha_feed(s, 2, [(4, 2.01)])[-1] == TrialScheduler.STOP) is stopped
    assert asha_feed(s, 3, [(4, 2.50)])[-1] == TrialScheduler.STOP


def test_the_summary_says_when_no_trial_wins_beyond_noise():
    from sweeps.summary import mark_noise
    rows = [{"trial_index": i, "status": "finished", "val_loss": v} for i, v in enumerate([1.3812, 1.3800, 1.3900])]
    line = mark_noise(rows, 0.0011)
    assert "no winner beyond noise" in line and "trial(s) 0 within" in line and "trial 1" in line
    assert [r["vs_best"] for r in rows] == ["+0.0012~", "best", "+0.0100"]
    assert mark_noise(rows, 0.0001) is None  # 0.0012 is 12 sigma apart: a winner
