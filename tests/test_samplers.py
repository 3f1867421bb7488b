"""The searcher without a Ray cluster: samplers sized to the budget, the persisted study and its interrupted
trials, and scheduler state that survives a resume (the real sweeps are in test_sweep.py, test_resume.py and
test_resume_schedulers.py)."""

import copy
import math
import pickle
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import ray
from ray.tune.schedulers import TrialScheduler

from sweeps import run as sweep_cli
from sweeps.protocol import FINISHED
from sweeps.samplers import SAMPLERS, SamplerError, choose_sampler, startup_trials
from sweeps.search import (SweepPlan, close_interrupted, make_scheduler, make_searcher, study_storage)
from sweeps.spaces import SpaceError, load_space, parse_space
from sweeps.storage import Storage


@pytest.mark.parametrize("trials, given, startup", [(4, 1, 2), (8, 1, 2), (12, 1, 3), (16, 1, 4), (100, 1, 10),
                                                    (8, 5, 5)])
def test_startup_is_a_quarter_of_the_budget(trials, given, startup):
    assert startup_trials(trials, given) == startup
    assert choose_sampler("random", trials, given, False).startup == 0


def test_cmaes_is_refused_for_a_multi_objective_sweep(capsys):
    with pytest.raises(SamplerError, match="single-objective"):
        choose_sampler("cmaes", 8, 1, multi_objective=True)
    rc = sweep_cli.main(["--space", "muon_lr", "--preset", "tiny", "--sampler", "cmaes", "--objective", "pareto"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --sampler cmaes: sampler cmaes is single-objective" in err
    assert not ray.is_initialized()


def test_a_space_names_its_sampler():
    raw = {"sampler": "gp", "params": {"optim.muon_lr": {"type": "float", "low": 0.01, "high": 0.05}}}
    assert parse_space(raw, "s", "tiny").sampler == "gp"
    with pytest.raises(SpaceError, match="sampler='bogus'"):
        parse_space({**raw, "sampler": "bogus"}, "s", "tiny")


def quadratic(params: dict) -> float:
    """A loss bowl in log learning rate, its minimum inside muon_lr's range (10x off the preset's centre)."""
    return (math.log10(params["optim.muon_lr"] / 0.035)) ** 2 + (math.log10(params["optim.muon_wd"] + 0.1)) ** 2


def best_after(sampler: str, seed: int, trials: int = 8) -> float:
    space = load_space("muon_lr", "tiny")
    searcher = make_searcher(SweepPlan(space, "x", None, trials, 1, seed, "none", 100, sampler=sampler)).searcher
    best = math.inf
    for i in range(trials):
        params = searcher.suggest(f"t{i}")
        value = quadratic(params)
        searcher.on_trial_complete(f"t{i}", {"val_loss": value, FINISHED: True})
        best = min(best, value)
    return best


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_model_based_samplers_learn_within_a_sweeps_budget(sampler):
    """8 trials: with Optuna's default start-up (10) TPE would still be random; sized to the budget, the
    model-based samplers beat random search on a known bowl, on average over 5 seeds."""
    model = sum(best_after(sampler, seed) for seed in range(5))
    random = sum(best_after("random", seed) for seed in range(5))
    assert model < random


def test_study_is_persisted_and_an_interrupted_trial_restarts_as_a_new_optuna_trial(tmp_path):
    space = load_space("muon_lr", "tiny")
    plan = SweepPlan(space, "sw", Storage(str(tmp_path)), 3, 1, 0, "asha", 12)
    searcher = make_searcher(plan, study_storage(tmp_path)).searcher
    p0 = searcher.suggest("a")
    searcher.on_trial_result("a", {"val_loss": 4.0, "step": 4, "training_iteration": 9})
    searcher.on_trial_complete("a", {"val_loss": 3.5, "step": 12, FINISHED: True})
    searcher.suggest("b")
    searcher.on_trial_result("b", {"val_loss": 4.2, "step": 4, "training_iteration": 9})
    saved = tmp_path / "searcher.pkl"
    searcher.save(str(saved))  # Tune's searcher checkpoint, as at an interruption
    assert close_interrupted(tmp_path, "sw") == 1  # trial b was running: FAIL, not left RUNNING

    study = optuna.load_study(study_name="sw", storage=study_storage(tmp_path))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    assert study.trials[0].params == pytest.approx(p0) and study.trials[0].user_attrs["trial_index"] == 0
    assert study.trials[0].intermediate_values == {4: 4.0}  # keyed by the training step, not the report count

    resumed = type(searcher)()
    resumed.restore(str(saved))  # Tune's restore; Tune restarts trial b with its own config
    resumed.on_trial_result("b", {"val_loss": 4.1, "step": 4, "training_iteration": 3})
    resumed.on_trial_complete("b", {"val_loss": 3.6, "step": 12, FINISHED: True})
    study = optuna.load_study(study_name="sw", storage=study_storage(tmp_path))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    restarted = study.trials[2]
    assert restarted.params == study.trials[1].params and restarted.value == 3.6
    assert restarted.user_attrs == {"trial_index": 1, "tune_trial_id": "b", "restarted_from": 1}
    assert restarted.intermediate_values == {4: 4.1} and study.trials[1].user_attrs["interrupted"]

    # a driver killed just after telling trial a's end, before Tune saved it: Tune replays a's end; not told twice
    replaying = type(searcher)()
    replaying.restore(str(saved))
    replaying._completed_trials.discard("a")
    replaying.on_trial_complete("a", {"val_loss": 3.5, "step": 12, FINISHED: True})
    assert len(optuna.load_study(study_name="sw", storage=study_storage(tmp_path)).trials) == 3


def trial(i: int):
    return SimpleNamespace(trial_id=f"id{i}", experiment_tag=f"{i + 1}_x")


@pytest.mark.parametrize("scheduler", ["asha", "curve"])
def test_scheduler_state_comes_back_after_a_restore(tmp_path, scheduler):
    """The scheduler Tune pickles with the Tuner at the start (empty) and unpickles on a resume recovers the
    decisions made since from the sweep folder: a later poor trial is stopped as it would have been."""
    from sweeps.records import get_track

    track = get_track("quick") if scheduler == "curve" else None
    plan = SweepPlan(load_space("muon_lr", "tiny"), "sw", Storage(str(tmp_path)), 4, 1, 0, scheduler, 12, track=track)
    plan.folder.mkdir()
    s = make_scheduler(plan)
    at_start = pickle.dumps(s)  # what tuner.pkl holds
    forgetful = copy.deepcopy(make_scheduler(plan, persist=False))
    for sched in (s, forgetful):
        for i, losses in enumerate([[4.0, 3.0, 2.0], [4.0, 3.1, 2.1]]):
            sched.on_trial_add(None, trial(i))
            for step, loss in zip((4, 8, 12), losses):
                sched.on_trial_result(None, trial(i), {"step": step, "val_loss": loss, "total_steps": 12})
            sched.on_trial_complete(None, trial(i), {})
    poor = {"step": 4, "val_loss": 4.8, "total_steps": 12}
    restored = pickle.loads(at_start)
    restored.on_trial_add(None, trial(2))
    assert restored.on_trial_result(None, trial(2), poor) == TrialScheduler.STOP
    fresh = pickle.loads(pickle.dumps(make_scheduler(plan, persist=False)))  # what a resume had before
    fresh.on_trial_add(None, trial(2))
    assert fresh.on_trial_result(None, trial(2), poor) == TrialScheduler.CONTINUE
    assert Path(s.state_path).parent == plan.folder
