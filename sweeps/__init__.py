"""Ray Tune + Optuna sweeps of the speedrun trainer: spaces, the trial unit, search wiring, results."""
