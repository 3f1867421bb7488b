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


def confirm_top(sweep, rows: list[dict], tracker) -> list[dict]:
    """Winner's-curse guard after a sweep: re-run its K best finished trials with M fresh seeds each, rank them by
    the mean, and give each the multi-run verdict (record only when the acceptance test passes on a comparable
    track). Recorded under the sweep's parent run, through its tracker."""
    import math
    from dataclasses import replace

    from sweeps.acceptance import acceptance_test
    from sweeps.cluster import execute
    from sweeps.protocol import TrialStatus
    from sweeps.records import runs_verdict
    from sweeps.results import ProgressPrinter, ranked, rows_from_grid
    from sweeps.search import SweepPlan, make_tuner
    from sweeps.stall import StallWatchdog

    s, space, plan, spec, judge = sweep.settings, sweep.space, sweep.plan, sweep.spec, sweep.judge
    keys, track = [p.key for p in space.params], judge.track
    finished = [r for r in ranked(rows, space.metric, space.mode) if r["status"] == TrialStatus.FINISHED]
    confirmed = []
    for r in finished[: s.confirm_top]:
        order = interleaved_seeds(10_000 + 100 * r["trial_index"], s.confirm_runs, False)
        name = f"{plan.name}-confirm-{r['trial_index']}"
        sub_spec = replace(make_attempt_spec(spec, name, {CANDIDATE_ARM: spec.config_for({k: r[k] for k in keys})},
                                             order), overrides={}, log_dir=str(plan.storage.local(name) / "logs"))
        sub_plan = SweepPlan(sub_spec.space, name, plan.storage, len(order), plan.concurrency, 0, "none",
                             plan.total_steps)
        sub_tracker = tracker.for_reruns(sub_spec.config_for, of=r["trial_index"])
        print(f"confirming trial {r['trial_index']} ({r['val_loss']:.4f}) with seeds {[x for x, _ in order]}")
        watchdog = [] if getattr(sub_spec, "hosts", ()) else [StallWatchdog(s.stall_timeout, s.resource_timeout)]
        callbacks = [*watchdog, ProgressPrinter(plan.total_steps, space.metric, trials=len(order)), sub_tracker]
        grid = execute(lambda: make_tuner(sub_plan, sub_spec, callbacks), s.address, spec.env)
        done = [x for x in rows_from_grid(grid, ["run.seed"]) if x["status"] == TrialStatus.FINISHED]
        losses, times = [x["val_loss"] for x in done], [x["train_time_s"] for x in done]
        test = acceptance_test(losses, times, track.target_loss, record_time_s=track.record_time_s,
                               time_noise=track.time_noise, record_runs=track.record_runs) if len(done) > 1 else None
        mean = test.loss.mean if test else (losses[0] if losses else math.nan)
        verdict = runs_verdict(bool(test and test.accepted), mean, track.target_loss, judge.comparable)
        confirmed.append({"trial_index": r["trial_index"], "sweep_val_loss": r["val_loss"], "runs": len(done),
                          "mean_val_loss": mean, "std_val_loss": test.loss.std if test else 0.0,
                          "mean_train_time_s": test.time.mean if test else math.nan,
                          "loss_p": test.loss_p if test else math.nan, "verdict": verdict,
                          "losses": losses, "times": times, **{k: r[k] for k in keys}})
    confirmed.sort(key=lambda c: c["mean_val_loss"] if space.mode == "min" else -c["mean_val_loss"])
    print(confirmed_table(confirmed))
    tracker.log_confirmed(confirmed)
    return confirmed


def confirmed_table(confirmed: list[dict]) -> str:
    lines = ["\nconfirmed ranking (mean over fresh seeds; verdict of the multi-run test):",
             f"{'rank':>4}  {'trial':>5}  {'sweep val_loss':>14}  {'mean val_loss':>13}  {'std':>7}  {'p':>8}  "
             f"{'mean train_s':>12}  runs  verdict"]
    for i, c in enumerate(confirmed, 1):
        lines.append(f"{i:>4}  {c['trial_index']:>5}  {c['sweep_val_loss']:>14.4f}  {c['mean_val_loss']:>13.4f}  "
                     f"{c['std_val_loss']:>7.4f}  {c['loss_p']:>8.3g}  {c['mean_train_time_s']:>12.2f}  "
                     f"{c['runs']:>4}  {c['verdict']}")
    return "\n".join(lines)
