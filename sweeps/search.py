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
from .records import NOISE_SIGMAS, Track
from .spaces import Param, Space
from .protocol import FINISHED, OBJECTIVES, TRIAL_CPU, trial_dirname, trial_index
from .trial import TrialSpec, run_trial


class SpeedrunOptunaSearch(OptunaSearch):
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list):
            return  # Optuna takes no intermediate values in multi-objective studies
        if self.metric in result and trial_id not in self._completed_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is not None and not result.get(FINISHED):
            result = None  # stopped early: PRUNED
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if result is not None and not all(math.isfinite(result.get(m, math.nan)) for m in metrics):
            result = None
        super().on_trial_complete(trial_id, result, error)


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
    storage: Path  # the sweep folder's parent (absolute)
    trials: int
    concurrency: int
    seed: int
    scheduler: str  # asha | curve | none
    total_steps: int
    objective: str = "loss"  # see OBJECTIVES
    track: Track | None = None  # noise and stored curve for the record-curve pruner

    @property
    def folder(self) -> Path:
        return self.storage / self.name


def make_searcher(plan: SweepPlan) -> ConcurrencyLimiter:
    space = plan.space
    points = space.points_by_graphs(plan.total_steps)
    metric, mode = OBJECTIVES[plan.objective]
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial INFO lines repeat ProgressPrinter's
    searcher = SpeedrunOptunaSearch(
        space={p.key: optuna_distribution(p) for p in space.params},
        metric=metric, mode=mode, points_to_evaluate=points,
        sampler=optuna.samplers.TPESampler(seed=plan.seed),
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


def make_scheduler(plan: SweepPlan):
    """Early stopping always reads the validation loss curve, whatever the searcher's objective."""
    if plan.scheduler == "none":
        return FIFOScheduler()
    if plan.scheduler == "curve":
        track = plan.track  # the pruner itself refuses a missing noise (run.py says so before Ray starts)
        # the stored curve holds for the budget it was measured at; other budgets wait for trial 0's curve
        stored = track.curve if track and track.curve_steps == plan.total_steps else ()
        return RecordCurvePruner(noise=(track.noise if track else None) or 0.0, stored_curve=stored)
    grace = max(1, round(plan.space.grace_fraction * plan.total_steps))
    # stop_last_trials=False: a trial that reaches max_t still sends its final summary report.
    noise = (plan.track.noise or 0.0) if plan.track else 0.0
    return ControlKeepingASHA(time_attr="step", metric="val_loss", mode="min", max_t=plan.total_steps,
                              grace_period=grace, reduction_factor=2, stop_last_trials=False, noise=noise)


def make_tuner(plan: SweepPlan, spec: TrialSpec, callbacks: list, restore: bool = False) -> tune.Tuner:
    """A new Tuner, or (restore) Tune's saved experiment in the sweep folder: finished and failed trials are
    kept as they are, unfinished ones restart, and the searcher (the Optuna study, its sampler's RNG, the
    pending points) comes back from Tune's searcher checkpoint. The callbacks then are the ones pickled
    with the experiment (the same classes and settings)."""
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), {"cpu": TRIAL_CPU})
    if restore:
        return tune.Tuner.restore(str(plan.folder), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(  # no metric here: the searcher and the scheduler each carry their own
            search_alg=make_searcher(plan),
            scheduler=make_scheduler(plan), num_samples=plan.trials, reuse_actors=False,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(name=plan.name, storage_path=str(plan.storage), callbacks=callbacks, verbose=0),
    )
