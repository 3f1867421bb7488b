"""`speedrun-sweep --space muon_lr` (or `python sweeps/run.py ...`): a Ray Tune sweep, Optuna proposing, each
trial a Ray Train run of the speedrun trainer, MLflow recording every trial and its verdict.

With GPUs and FineWeb shards it sweeps the `record` preset, one trial = all the node's GPUs; otherwise the `tiny`
preset on CPU workers and the generated sample corpus. `--address` (or RAY_ADDRESS) joins an existing Ray
cluster; `--storage` may be a path every node can reach. The flags: sweeps/settings.py.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from sweeps.cluster import BadInput, execute, fail
from sweeps.plan import Sweep, open_tracker, plan_sweep
from sweeps.script_plan import plan_script_sweep
from sweeps.settings import parse_settings

EXIT_INTERRUPTED = 130
EXIT_ALL_FAILED = 1  # every trial failed: nothing was measured (the trials stay recorded)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    if settings.list_spaces:
        return list_spaces()
    from sweeps.driver_lock import DriverLock

    try:
        if settings.list_knobs:
            return list_knobs(settings.list_knobs)
        sweep = plan_script_sweep(settings) if settings.trainer else plan_sweep(settings)
        with DriverLock(sweep.plan.folder):
            return run_sweep(sweep, open_tracker(sweep))
    except BadInput as e:
        return fail(str(e))


def list_knobs(path: str) -> int:
    from sweeps.knobs import KnobError, list_knobs as knob_table

    try:
        print(knob_table(path))
    except (KnobError, OSError) as e:
        raise BadInput(f"--list-knobs {path}: {e}") from None
    return 0


def list_spaces() -> int:
    from sweeps.spaces import available_spaces, load_space

    for name in available_spaces():
        space = load_space(name, "record")
        print(f"{name:10s} {space.description}")
        for p in space.params:
            print(f"{'':10s}   {p.describe()}")
    return 0


def run_sweep(sweep: Sweep, tracker) -> int:
    """Run (or resume) the sweep's Tuner, record what it did, print the summary; 130 if interrupted."""
    from sweeps.results import ProgressPrinter, PushSweepFiles, pareto_front, rows_from_grid, time_split, write_parquet
    from sweeps.search import close_interrupted, make_tuner
    from sweeps.stall import StallWatchdog
    from sweeps.trial_hosts import StopHostedTrials
    from sweeps.summary import header, resume_command, summary

    s, plan, spec = sweep.settings, sweep.plan, sweep.spec
    s.save(plan.folder, sweep.uri)
    plan.storage.push_sweep(plan.name)
    if sweep.restore:
        tracker.reopen()
    print(header(sweep))
    t0 = time.time()
    prefix = f"speedrun-host-{plan.name}"
    # the watchdog first: its reason must be in a stalled trial's error.txt before the tracker reads it
    watchdog = StallWatchdog(s.stall_timeout, s.resource_timeout, prefix, plan.concurrency if s.reuse_workers else 0)
    callbacks = [watchdog, ProgressPrinter(plan.total_steps, sweep.space.metric, trials=plan.trials), tracker,
                 PushSweepFiles(plan.storage.root, plan.name)]

    def tuner(hosts: tuple = ()):
        if not hosts:
            return make_tuner(plan, spec, callbacks, restore=sweep.restore)
        return make_tuner(plan, replace(spec, hosts=hosts), [*callbacks, StopHostedTrials(prefix, len(hosts))],
                          restore=sweep.restore)

    grid = execute(tuner, s.address, spec.env, stops=plan.scheduler != "none",
                   need=(spec.workers, spec.use_gpu, spec.gpus_per_worker, spec.cpus_per_worker),
                   hosts=plan.concurrency if s.reuse_workers else 0, host_prefix=prefix)
    wall = add_wall_time(plan.folder, time.time() - t0, sweep.restore)
    tracker.load_done()
    rows = tracker.annotate(rows_from_grid(grid, [p.key for p in sweep.space.params]))
    path = write_parquet(rows, plan.folder / "results.parquet")
    split = time_split(rows, wall, plan.concurrency * spec.workers, spec.workers)
    settled = grid.num_terminated + grid.num_errors
    if len(grid) < plan.trials or settled < len(grid):
        tracker.mark_interrupted()
        close_interrupted(plan.folder, plan.name)
        plan.storage.push_sweep(plan.name)
        print(f"\ninterrupted: {settled} of {plan.trials} trials done and recorded ({path}); continue with:\n"
              f"  {resume_command(plan.name, plan.storage)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    front = pareto_front(rows) if plan.objective == "pareto" else []
    tracker.finish_sweep(rows, tracker.curves(), pareto=front, split=split)
    print(summary(sweep, rows, front, split, time.time() - t0))
    plan.storage.push_sweep(plan.name)
    print(f"results: {path}" + (f" (stored in {plan.storage.uri(plan.name)})" if plan.storage.remote else ""))
    if any(r["status"] == "failed" for r in rows):
        print(f"logs of failed trials: {plan.folder}/trial_*/error.txt and {plan.folder / 'logs'}")
    if s.confirm_top:
        from sweeps.attempts import confirm_top
        confirm_top(sweep, rows, tracker)
    print(f"MLflow:  {tracker.ui_hint()}")
    if rows and all(r["status"] == "failed" for r in rows):
        print(f"error: all {len(rows)} trials failed, nothing was measured; their errors: "
              f"{plan.folder}/trial_*/error.txt", file=sys.stderr)
        return EXIT_ALL_FAILED
    return 0


def add_wall_time(folder: Path, seconds: float, resumed: bool) -> float:
    """The sweep's wall time over all its runs (a resumed sweep adds to what the interrupted run spent)."""
    path = folder / "wall_time.json"
    before = json.loads(path.read_text())["wall_s"] if resumed and path.exists() else 0.0
    path.write_text(json.dumps({"wall_s": before + seconds}))
    return before + seconds


if __name__ == "__main__":
    sys.exit(main())
