"""Ray Tune wiring: the Optuna searcher (trial 0 = the control), concurrency, ASHA, the Tuner, the results.

What the searcher is told, deliberately:
- intermediate values only at validations (reports without the metric are skipped);
- a trial that ASHA stopped reaches Optuna as PRUNED (with its intermediate values), not COMPLETE with a
  partial loss that TPE would read as a finished result;
- a diverged trial completes with its step-0 loss (see trial.final_metrics): bad, but learnable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from .pruner import RecordCurvePruner
from .storage import Storage
from .samplers import DEFAULT_SAMPLER, SamplerChoice, choose_sampler, make_sampler
from .scheduler_state import PersistentState
from .records import NOISE_SIGMAS, Track
from .spaces import Param, Space
from .protocol import FINISHED, OBJECTIVES, TRIAL_CPU, trial_dirname, trial_index
from .script_trial import ScriptSpec, run_script_trial
from .trial import TrialSpec, run_trial
from .trial_hosts import run_hosted_trial


class SpeedrunOptunaSearch(OptunaSearch):
    """OptunaSearch whose study is the sweep's own (persisted, one Optuna trial per Tune trial, tagged with its
    trial index), with intermediate values keyed by the training step rather than Tune's report counter."""

    def suggest(self, trial_id: str):
        params = super().suggest(trial_id)
        indices = self.__dict__.setdefault("_indices", {})
        if trial_id not in indices:  # suggest runs once per new trial, in creation order: the trial index
            indices[trial_id] = len(indices)
            self._ot_trials[trial_id].set_user_attr("trial_index", indices[trial_id])
            self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
        return params

    def _live_trial(self, trial_id: str):
        """The Optuna trial of a Tune trial, or None when the study already holds its end. A trial that was running
        when a driver stopped is FAIL in the study with user attr `interrupted` (close_interrupted); Tune restarts
        it with the same config, so it gets a new Optuna trial with the same params and user attrs. A trial whose
        end reached the study just before a driver died (Tune then replays that end) is not told twice."""
        ot = self._ot_trials[trial_id]
        stored = self._ot_study._storage.get_trial(ot._trial_id)
        if stored.state.is_finished() and not stored.user_attrs.get("interrupted"):
            self._completed_trials.add(trial_id)
            return None
        if stored.state.is_finished():
            attrs = {k: v for k, v in stored.user_attrs.items() if k != "interrupted"}
            self._ot_study.add_trial(optuna.trial.create_trial(
                state=optuna.trial.TrialState.RUNNING, params=stored.params, distributions=stored.distributions,
                user_attrs={**attrs, "restarted_from": stored.number}))
            fresh = self._ot_study.get_trials(deepcopy=False)[-1]
            ot = self._ot_trials[trial_id] = optuna.Trial(self._ot_study, fresh._trial_id)
        return ot

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list):
            return  # Optuna takes no intermediate values in multi-objective studies
        if self.metric not in result or result.get(FINISHED) or trial_id in self._completed_trials:
            return  # only validations: the final report is told as the trial's value
        value = result[self.metric]
        ot = self._live_trial(trial_id)
        if ot is None or not math.isfinite(value):
            return
        step = int(result["step"])
        if step not in ot.storage.get_trial(ot._trial_id).intermediate_values:
            ot.report(value, step)  # a retried attempt repeats earlier steps: the first attempt's values stand

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._ot_trials and trial_id not in self._completed_trials:
            if self._live_trial(trial_id) is None:
                return
        if result is not None and not result.get(FINISHED):
            self.on_trial_result(trial_id, result)  # the validation a scheduler stopped it at (Tune sends it here)
            result = None  # stopped early: PRUNED, its value the last intermediate one
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if result is not None and not all(math.isfinite(result.get(m, math.nan)) for m in metrics):
            result = None
        super().on_trial_complete(trial_id, result, error)


STUDY_FILE = "optuna.journal"


def study_storage(folder: Path) -> optuna.storages.JournalStorage:
    """The sweep's Optuna study: a journal file in the sweep folder (Optuna's storage for shared file systems),
    opened by `optuna.load_study(study_name=<sweep name>, storage=study_storage(folder))` and optuna-dashboard."""
    from optuna.storages.journal import JournalFileBackend

    folder.mkdir(parents=True, exist_ok=True)  # a record attempt's or a re-run's Tuner makes its folder later
    return optuna.storages.JournalStorage(JournalFileBackend(str(folder / STUDY_FILE)))


def close_interrupted(folder: Path, study_name: str) -> int:
    """Fail the study's trials left RUNNING by a driver that stopped; returns how many."""
    path = folder / STUDY_FILE
    if not path.exists():
        return 0
    storage = study_storage(folder)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return 0
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in running:
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)  # the searcher restarts these on --resume
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return len(running)


def optuna_distribution(p: Param) -> optuna.distributions.BaseDistribution:
    if p.type == "categorical":
        return optuna.distributions.CategoricalDistribution(list(p.choices))
    if p.type == "int":
        return optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log)
    return optuna.distributions.FloatDistribution(float(p.low), float(p.high), log=p.log)


@dataclass
class SweepPlan:
    space: Space
    name: str
    storage: Storage  # holds the sweep folder (sweeps.storage)
    trials: int
    concurrency: int
    seed: int
    scheduler: str  # asha | curve | none
    total_steps: int
    objective: str = "loss"  # see OBJECTIVES
    track: Track | None = None  # noise and stored curve for the record-curve pruner
    sampler: str = DEFAULT_SAMPLER  # see sweeps.samplers

    @property
    def folder(self) -> Path:
        return self.storage.local(self.name)  # this node's working copy


def sampler_choice(plan: SweepPlan) -> SamplerChoice:
    given = len(plan.space.points) + 1
    return choose_sampler(plan.sampler, plan.trials, given, isinstance(OBJECTIVES[plan.objective][0], list))


def make_searcher(plan: SweepPlan, storage: optuna.storages.BaseStorage | None = None) -> ConcurrencyLimiter:
    """The Optuna searcher; with a storage (study_storage) the study is persisted under the sweep's name."""
    space = plan.space
    points = space.points_by_graphs(plan.total_steps)
    metric, mode = OBJECTIVES[plan.objective]
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial INFO lines repeat ProgressPrinter's
    searcher = SpeedrunOptunaSearch(
        space={p.key: optuna_distribution(p) for p in space.params},
        metric=metric, mode=mode, points_to_evaluate=points,
        sampler=make_sampler(sampler_choice(plan), plan.seed),
        storage=storage, study_name=plan.name if storage is not None else None,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=plan.concurrency)


class ControlKeepingASHA(ASHAScheduler):
    """ASHA on val_loss against training steps that never stops trial 0 (the control's full curve is the
    reference every other trial is read against; its results still fill the rungs), nor a trial whose loss is
    within the noise margin of the best loss any trial reported at the same step: a gap that seeds alone make
    is no reason to stop. The margin is `margin_sigmas` x the track's seed-to-seed noise (0: plain ASHA)."""

    def __init__(self, *args, noise: float = 0.0, margin_sigmas: float = NOISE_SIGMAS, **kwargs):
        super().__init__(*args, **kwargs)
        self.margin = margin_sigmas * noise
        self.best_at: dict[int, float] = {}  # step -> best val_loss reported there

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        step, loss = result.get("step"), result.get("val_loss")
        if step is None or loss is None or not math.isfinite(loss):
            return action
        best = self.best_at[step] = min(self.best_at.get(step, math.inf), loss)
        if action == TrialScheduler.STOP and (trial_index(trial) == 0 or loss - best <= self.margin):
            return TrialScheduler.CONTINUE
        return action


class PersistentASHA(PersistentState, ControlKeepingASHA):
    """ControlKeepingASHA whose rungs survive a resume."""


class PersistentCurvePruner(PersistentState, RecordCurvePruner):
    """RecordCurvePruner whose reference curve survives a resume."""


SCHEDULER_STATE_FILE = "scheduler_state.pkl"


def make_scheduler(plan: SweepPlan, persist: bool = True):
    """Early stopping always reads the validation loss curve, whatever the searcher's objective. With `persist`
    the scheduler keeps its state in the sweep folder (sweeps.scheduler_state)."""
    if plan.scheduler == "none":
        return FIFOScheduler()
    if plan.scheduler == "curve":
        track = plan.track  # the pruner itself refuses a missing noise (run.py says so before Ray starts)
        # the stored curve holds for the budget it was measured at; other budgets wait for trial 0's curve
        stored = track.curve if track and track.curve_steps == plan.total_steps else ()
        scheduler = PersistentCurvePruner(noise=(track.noise if track else None) or 0.0, stored_curve=stored)
    else:
        grace = max(1, round(plan.space.grace_fraction * plan.total_steps))
        # stop_last_trials=False: a trial that reaches max_t still sends its final summary report.
        noise = (plan.track.noise or 0.0) if plan.track else 0.0
        scheduler = PersistentASHA(time_attr="step", metric="val_loss", mode="min", max_t=plan.total_steps,
                                   grace_period=grace, reduction_factor=2, stop_last_trials=False, noise=noise)
    if persist:
        scheduler.state_path = str(plan.folder / SCHEDULER_STATE_FILE)
    return scheduler


def make_tuner(plan: SweepPlan, spec: TrialSpec, callbacks: list, restore: bool = False) -> tune.Tuner:
    """A new Tuner, or (restore) Tune's saved experiment in the sweep folder: finished and failed trials are
    kept as they are, unfinished ones restart, and the searcher (the Optuna study, its sampler's RNG, the
    pending points) comes back from Tune's searcher checkpoint, the scheduler's rungs or reference curve from its
    state file. The callbacks then are the ones pickled with the experiment (the same classes and settings)."""
    unit = run_script_trial if isinstance(spec, ScriptSpec) else run_hosted_trial if spec.hosts else run_trial
    # a hosted trial's trainable only relays its host's reports: Tune hands the next trial the same relay process
    # (Tune's reuse_actors) instead of starting one per trial (2-4 s between trials on one slot)
    trainable = tune.with_resources(tune.with_parameters(unit, spec=spec), {"cpu": TRIAL_CPU})
    if restore:
        close_interrupted(plan.folder, plan.name)  # a driver killed outright left its running trials RUNNING
        return tune.Tuner.restore(plan.storage.uri(plan.name), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(  # no metric here: the searcher and the scheduler each carry their own
            search_alg=make_searcher(plan, study_storage(plan.folder)),
            scheduler=make_scheduler(plan), num_samples=plan.trials, reuse_actors=unit is run_hosted_trial,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(name=plan.name, storage_path=plan.storage.root, callbacks=callbacks, verbose=0),
    )
