"""The record-curve pruner: a Ray Tune scheduler that stops a trial falling behind the control's curve.

The reference is the record curve: trial 0's validation curve (the control) against the schedule
fraction, replaced by any trial's curve that ends below it (the best run so far is the one to beat), or
the track's stored curve where no such run has got that far. Comparing at equal schedule fractions, never raw
steps, keeps trials of different schedule lengths comparable and respects the speedrun's schedule: its
loss early on predicts the final loss poorly. A trial is stopped when its loss exceeds the reference by
more than a margin calibrated from seed-to-seed noise, wide early and narrowing to `z` noise widths at the
end: margin(f) = noise * (z + early * (1 - f)).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from .protocol import FINISHED, trial_index


@dataclass(frozen=True)
class Decision:
    trial: int
    fraction: float
    val_loss: float
    reference: float
    margin: float


class RecordCurvePruner(FIFOScheduler):
    def __init__(self, noise: float, z: float = 3.0, early: float = 10.0, stored_curve: tuple = (),
                 min_fraction: float = 0.1, metric: str = "val_loss"):
        super().__init__()
        if noise <= 0:
            raise ValueError("the record-curve pruner needs a positive seed-to-seed noise (the track's `noise`)")
        self.noise, self.z, self.early, self.min_fraction, self.metric_name = noise, z, early, min_fraction, metric
        self.control: list[tuple[float, float]] = []  # the record curve: trial 0's, or the best finished one
        self.curves: dict[str, list[tuple[float, float]]] = {}  # every running trial's points so far
        self.stored = sorted(stored_curve)
        self.decisions: list[Decision] = []

    def margin(self, fraction: float) -> float:
        return self.noise * (self.z + self.early * (1.0 - min(1.0, fraction)))

    def reference(self, fraction: float) -> float | None:
        """The control's loss at this schedule fraction (linear between its validations), else the stored curve."""
        for curve in (self.control, self.stored):
            if curve and curve[0][0] <= fraction <= curve[-1][0]:
                i = bisect.bisect_left([f for f, _ in curve], fraction)
                if curve[i][0] == fraction or i == 0:
                    return curve[i][1]
                (f0, v0), (f1, v1) = curve[i - 1], curve[i]
                return v0 + (v1 - v0) * (fraction - f0) / (f1 - f0)
        return None

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.metric_name not in result or result.get(FINISHED) or not result.get("total_steps"):
            return TrialScheduler.CONTINUE
        fraction = result["step"] / result["total_steps"]
        loss = result[self.metric_name]
        curve = self.curves.setdefault(trial.trial_id, [])
        curve.append((fraction, loss))
        if trial_index(trial) == 0:
            self.control.append((fraction, loss))
            self.control.sort()
            return TrialScheduler.CONTINUE
        if fraction < self.min_fraction:
            return TrialScheduler.CONTINUE
        ref = self.reference(fraction)
        if ref is None:
            return TrialScheduler.CONTINUE
        margin = self.margin(fraction)
        if not loss <= ref + margin:  # also stops a NaN
            self.decisions.append(Decision(trial_index(trial), fraction, loss, ref, margin))
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        """A trial that ran its whole schedule and ended below the record curve becomes the record curve."""
        curve = sorted(self.curves.pop(trial.trial_id, []))
        if (curve and curve[-1][0] >= 1.0 and self.control and self.control[-1][0] >= 1.0
                and curve[-1][1] < self.control[-1][1]):
            self.control = curve

    def debug_string(self) -> str:
        return f"RecordCurvePruner: {len(self.decisions)} trials stopped"
