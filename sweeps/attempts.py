"""Several seeded runs of fixed configs through the sweep's trial unit: record attempts (a candidate, and
optionally baseline runs interleaved with it, A B A B ...) and the re-runs of --confirm-top.

Every run is one Tune trial whose only searched knob is `run.seed`; a table maps each seed to its arm's
config, so the seed order is the run order and the arms alternate.
"""

from __future__ import annotations

from dataclasses import dataclass

from speedrun.config import TrainConfig

from .spaces import Param, Space
from .trial import TrialSpec

CANDIDATE_ARM, BASELINE_ARM = "candidate", "baseline"


def interleaved_seeds(first_seed: int, runs: int, with_baseline: bool) -> list[tuple[int, str]]:
    """(seed, arm) in run order: A B A B ... with a baseline, else only the candidate."""
    if not with_baseline:
        return [(first_seed + i, CANDIDATE_ARM) for i in range(runs)]
    return [(first_seed + 2 * i + j, arm) for i in range(runs) for j, arm in enumerate((CANDIDATE_ARM, BASELINE_ARM))]


def attempt_space(name: str, seeds: list[int]) -> Space:
    """The runs as a Space with one knob, run.seed: trial 0 is the first seed, the rest are its `points`."""
    return Space(name=name, description="seeded runs of fixed configs", preset="record",
                 fixed={"run.seed": seeds[0]}, params=(Param("run.seed", "int", 0, 2**31 - 1),),
                 points=tuple({"run.seed": s} for s in seeds[1:]), trials=len(seeds))


@dataclass(frozen=True)
class AttemptSpec(TrialSpec):
    """A TrialSpec whose trial config is its seed's arm's config (flat dotted dicts), with that seed."""
    arms: tuple = ()  # ((arm name, flat config dict), ...)
    arm_of_seed: tuple = ()  # ((seed, arm name), ...)

    def arm_for(self, params: dict) -> str:
        return dict(self.arm_of_seed)[int(params["run.seed"])]

    def config_for(self, params: dict) -> TrainConfig:
        flat = dict(self.arms)[self.arm_for(params)]
        return TrainConfig.from_dict(flat).override({"run.seed": int(params["run.seed"])}).override(self.overrides)

    def tags_for(self, params: dict) -> dict:
        return {"arm": self.arm_for(params), "seed": str(int(params["run.seed"]))}


def make_attempt_spec(base: TrialSpec, name: str, configs: dict[str, TrainConfig],
                      order: list[tuple[int, str]]) -> AttemptSpec:
    """`base`'s resources and environment, running `configs` (arm -> config) in `order` ((seed, arm) ...)."""
    fields = {f: getattr(base, f) for f in TrialSpec.__dataclass_fields__}
    fields.update(space=attempt_space(name, [s for s, _ in order]), steps=0,
                  arms=tuple((arm, cfg.to_dict()) for arm, cfg in configs.items()),
                  arm_of_seed=tuple(order))
    return AttemptSpec(**fields)
