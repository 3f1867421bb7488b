"""Optuna samplers for a sweep, with start-up counts sized to the sweep's budget.

Optuna's model-based samplers propose at random for their first `n_startup_trials` trials (10 by default,
enqueued points included). A sweep of 4-16 trials would then never leave random search, so the start-up
count here is a quarter of the budget, at least 2 and at most 10, and never fewer than the given points
(the control and the space's `points`), which run first anyway. The default sampler is the one that reached
the best loss in `benchmarks/search_efficiency.py --compare samplers` (the README's sampler table): TPE,
multivariate, with the constant liar for concurrent trials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna

SAMPLERS = ("tpe", "gp", "cmaes", "random")
DEFAULT_SAMPLER = "tpe"  # measured: the README's sampler table
SINGLE_OBJECTIVE_ONLY = ("cmaes",)


class SamplerError(ValueError):
    """A sampler that cannot run this sweep; the message names the fix."""


@dataclass(frozen=True)
class SamplerChoice:
    name: str
    startup: int  # trials proposed before the model is used (given points included)
    trials: int
    given: int  # the control and the space's points

    def describe(self) -> str:
        given = min(self.given, self.trials)
        if self.name == "random":
            return f"sampler random: {self.trials} trials, {given} given, the rest at random"
        first = min(self.trials, max(self.startup, given))
        return (f"sampler {self.name}: {self.trials} trials, the first {first} given or random ({given} given), "
                f"then {self.trials - first} model-based")


def startup_trials(trials: int, given: int) -> int:
    return max(given, min(10, max(2, math.ceil(trials / 4))))


def choose_sampler(name: str, trials: int, given: int, multi_objective: bool) -> SamplerChoice:
    if name not in SAMPLERS:
        raise SamplerError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    if multi_objective and name in SINGLE_OBJECTIVE_ONLY:
        raise SamplerError(f"sampler {name} is single-objective: with --objective pareto use tpe, gp or random")
    return SamplerChoice(name, 0 if name == "random" else startup_trials(trials, given), trials, given)


def make_sampler(choice: SamplerChoice, seed: int) -> optuna.samplers.BaseSampler:
    random = optuna.samplers.RandomSampler(seed=seed)
    if choice.name == "random":
        return random
    if choice.name == "tpe":
        # multivariate: learning rates interact; constant_liar: concurrent trials are not proposed alike
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=choice.startup, multivariate=True,
                                          constant_liar=True)
    if choice.name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=choice.startup, independent_sampler=random,
                                         warn_independent_sampling=False)
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=choice.startup, independent_sampler=random,
                                        warn_independent_sampling=False)
