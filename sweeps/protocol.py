"""The trial protocol: what a trial reports and how the driver names and classifies trials.

Every reader and writer of trial results uses these names: the trial unit (trial.py) reports them, Tune's
searcher and schedulers (search.py, pruner.py) read them, the tracker (tracking.py) records them, the
results table (results.py) collects them.
"""

from __future__ import annotations

import os
from enum import Enum


class TrialStatus(str, Enum):
    """How a trial ended (MLflow tag `status`, results column `status`)."""
    RUNNING = "running"
    FINISHED = "finished"  # ran its whole schedule
    DIVERGED = "diverged"  # a non-finite loss ended it
    PRUNED = "pruned"  # the scheduler stopped it early
    FAILED = "failed"  # an error, after Ray Train's retries
    INTERRUPTED = "interrupted"  # the driver stopped before it ended

    def __str__(self) -> str:
        return self.value


ENDED = (TrialStatus.FINISHED, TrialStatus.DIVERGED, TrialStatus.PRUNED)  # a complete record

# Keys of the trial's reports (besides the trainer's own metrics: step, train_time_s, val_loss, ...)
FINISHED = "finished_training"  # on the last report of a trial that ran to its end
REPLAYED = "replayed"  # the final report of a trial that had ended before a driver crash, sent again
TRIAL_CPU = 0.01  # what a Tune trial itself holds: Tune rejects 0, and its workers hold the real CPUs/GPUs

OBJECTIVES = {  # name -> (searcher metric(s), mode(s))
    "loss": ("val_loss", "min"),  # final validation loss at the fixed step budget
    "time": ("objective_time_s", "min"),  # end-of-run time projected through the track (records.py)
    "pareto": (["val_loss", "train_time_s"], ["min", "min"]),  # both: a multi-objective Optuna study
}
RANKING = {"loss": ("val_loss", "min"), "time": ("objective_time_s", "min"), "pareto": ("val_loss", "min")}


def trial_index(trial) -> int:
    """0-based creation order (trial 0 is the control); Tune's experiment_tag starts with a 1-based counter."""
    return int(trial.experiment_tag.split("_", 1)[0]) - 1


def trial_dirname(trial) -> str:
    return f"trial_{trial_index(trial):04d}_{trial.trial_id}"


def index_from_dirname(path: str) -> int:
    """Trial index from a trial folder named trial_NNNN_<id> (trial_dirname); -1 otherwise."""
    name = os.path.basename(os.path.normpath(path))
    parts = name.split("_")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "trial" and parts[1].isdigit() else -1


def trial_status(metrics: dict, error) -> TrialStatus:
    """How a trial ended, from its last report and Tune's error (the driver's tracker knows pruned for sure)."""
    if error is not None:
        return TrialStatus.FAILED
    if metrics.get(FINISHED):
        return TrialStatus(metrics.get("status", "finished"))
    return TrialStatus.PRUNED if metrics else TrialStatus.FAILED
