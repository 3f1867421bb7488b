"""`python sweeps/run.py --space muon_lr`: a Ray Tune sweep, Optuna proposing, each trial a Ray Train run.

With GPUs and FineWeb shards it sweeps the `record` preset, one trial = all the node's GPUs; otherwise
the `tiny` preset on CPU workers and the generated sample corpus. `--address` (or RAY_ADDRESS) joins an
existing Ray cluster; `--storage` may be a path every node can reach.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from sweeps.cluster import (EXIT_BAD_INPUT, BadInput, Resources, check_capacity, concurrency_for,  # noqa: F401
                            execute, fail, local_resources, ray_env, trial_env, worker_layout)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python sweeps/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--space", help="a named space (see --list-spaces) or a .toml file")
    p.add_argument("--list-spaces", action="store_true", help="print the shipped spaces and exit")
    p.add_argument("--trials", type=int, help="number of trials (default: the space's, per preset)")
    p.add_argument("--concurrency", type=int, help="trials at once (default: as many as the resources fit)")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (default: all GPUs, or 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (default 1 with GPUs)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    p.add_argument("--preset", choices=["record", "tiny", "record-sample"],
                   help="default: record with CUDA + FineWeb, else tiny; record-sample: the record model on the "
                        "generated corpus (a GPU demo with a track of its own)")
    p.add_argument("--data", help="folder of FineWeb .bin shards (default $SPEEDRUN_DATA or data/fineweb10B)")
    p.add_argument("--steps", type=int, help="compress each trial's schedule into N steps (default: the space's)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed override of the base config for every trial, e.g. --set data.val_tokens=1048576")
    p.add_argument("--scheduler", choices=["asha", "curve", "none"], default="asha",
                   help="early stopping: asha (default), curve (the record-curve pruner: stop trials that fall "
                        "behind the control's loss curve at equal schedule fractions), none")
    p.add_argument("--objective", choices=["loss", "time", "pareto"],
                   help="what the searcher minimises: loss (final val loss at the step budget), time (time to the "
                        "track's target, misses projected by its exchange rate) or pareto (both; multi-objective). "
                        "Default: the space's `objective`, else loss")
    p.add_argument("--name", help="sweep name (default: SPACE-YYYYmmdd-HHMMSS)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep --name with its own settings: finished trials are kept, "
                        "unfinished ones restart, the searcher keeps its history")
    p.add_argument("--storage", default=os.environ.get("SPEEDRUN_SWEEPS", "sweep_runs"),
                   help="folder or URI holding sweep folders (default ./sweep_runs or $SPEEDRUN_SWEEPS)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--max-failures", type=int, default=1, help="Ray Train retries of a failed trial (default 1)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlflow.db in the working folder)")
    p.add_argument("--track", help="target loss and record time to judge trials by (default: the track of "
                   "sweeps/tracks.toml that holds for the trials' data, validation set and step budget; a track that "
                   "does not hold is refused)")
    p.add_argument("--record-time", type=float, help="override the track's record time (seconds)")
    p.add_argument("--target", type=float, help="override the track's target validation loss")
    p.add_argument("--confirm-top", type=int, default=0, metavar="K",
                   help="after the sweep, re-run the K best trials with fresh seeds and rank them by the mean")
    p.add_argument("--confirm-runs", type=int, default=3, metavar="M", help="seeds per re-run trial (default 3)")
    p.add_argument("--inject-faults", help=argparse.SUPPRESS)  # test-only, see sweeps.trial.FaultPlan
    return p.parse_args(argv)


def choose_preset(args, res: Resources) -> str:
    """--preset, else record with CUDA and FineWeb shards, else tiny (on CPU; on --data's shards if given)."""
    from sweeps.datasets import fineweb_dir, has_fineweb

    if args.preset:
        return args.preset
    if res.gpus and (args.data or has_fineweb(None)):
        return "record"  # a given --data that is unusable is refused by prepare_data, never swapped
    if args.data:
        print(f"notice: no CUDA device: sweeping the tiny model on the FineWeb shards in {fineweb_dir(args.data)} "
              f"(pass --preset record to insist)", file=sys.stderr)
    else:
        why = "no CUDA device" if not res.gpus else f"no FineWeb shards in {fineweb_dir(None)}"
        print(f"notice: {why}: sweeping the tiny preset on CPU with the generated sample corpus "
              f"(pass --preset record to insist)", file=sys.stderr)
    return "tiny"


SETTINGS_FILE = "sweep.json"  # the sweep's own settings, so that --resume needs only --name
RESUMABLE_KEEP = ("name", "storage", "address", "resume")  # what --resume may still set


def storage_root(args) -> Path:
    """--storage as the folder holding sweep folders (absolute; a URI is kept as given)."""
    return Path(args.storage).expanduser().resolve() if "://" not in args.storage else Path(args.storage)


def resume_args(args) -> argparse.Namespace:
    """--resume --name N: the stored settings of sweep N, refusing flags that would change it."""
    if not args.name:
        raise BadInput("--resume needs --name NAME of the sweep to continue")
    settings = storage_root(args) / args.name / SETTINGS_FILE
    if not settings.exists():
        parent = settings.parent.parent
        known = sorted(p.parent.name for p in parent.glob(f"*/{SETTINGS_FILE}")) if parent.is_dir() else []
        raise BadInput(f"--resume: no sweep named {args.name!r} in {parent} "
                       f"({'sweeps there: ' + ', '.join(known) if known else 'no sweeps there'}): "
                       f"check --name and --storage, or start it without --resume")
    stored = json.loads(settings.read_text())
    defaults = vars(parse_args([]))
    for key, value in vars(args).items():
        if key in RESUMABLE_KEEP or value == defaults.get(key) or value == stored.get(key):
            continue
        raise BadInput(f"--resume continues sweep {args.name!r} with its own settings: drop "
                       f"--{key.replace('_', '-')} (start a new sweep to change it)")
    merged = {**defaults, **stored, **{k: getattr(args, k) for k in RESUMABLE_KEEP}}
    return argparse.Namespace(**merged)


@dataclass
class Sweep:
    """Everything a sweep needs, resolved and checked before Ray starts."""
    args: argparse.Namespace
    space: object
    spec: object
    plan: object
    judge: object  # records.Judge: the track and whether it holds for this sweep's runs
    uri: str
    preset: str
    trials: int
    total_steps: int
    workers: int
    use_gpu: bool
    gpus_per_worker: float
    concurrency: int
    env: dict
    restore: bool


def plan_sweep(args) -> Sweep:
    """Check every input and resolve the sweep; BadInput on anything that cannot run. The data is checked
    first, before the heavy imports (Ray, MLflow, Optuna), so bad data is refused in seconds."""
    from speedrun.__main__ import parse_sets
    from sweeps.datasets import BadData, Fingerprints, measured, prepare_data
    from sweeps.records import choose_track
    from sweeps.spaces import SpaceError, available_spaces, load_space

    if args.resume:
        args = resume_args(args)
    if not args.space:
        raise BadInput(f"--space is required: one of {', '.join(available_spaces())} (see --list-spaces)")
    res = local_resources()
    preset = choose_preset(args, res)
    try:
        space = load_space(args.space, preset)
        if args.sets:
            space = replace(space, fixed={**space.fixed, **parse_sets(args.sets)})
            space.base_config()
        overrides = prepare_data(space.base_config(), args.data)
    except (SpaceError, BadData, ValueError) as e:
        raise BadInput(str(e)) from None

    from sweeps.search import SweepPlan
    from sweeps.tracking import code_version, resolve_uri
    from sweeps.trial import FaultPlan, TrialSpec

    try:
        device = space.base_config().run.device
        use_gpu, gpus_per_worker, workers = worker_layout(args, device, res, gpu_by_default=preset != "tiny")
        faults = FaultPlan.parse(args.inject_faults) if args.inject_faults else None
    except ValueError as e:
        raise BadInput(str(e)) from None
    if not use_gpu:  # CPU reservations train on the CPU, never on a GPU no trial reserved
        overrides.update({"run.threads": max(1, int(args.cpus_per_worker)), "run.device": "cpu"})
    steps = args.steps if args.steps is not None else space.steps
    trials = args.trials or space.trials
    if trials < 1 or args.max_failures < 0:
        raise BadInput("--trials must be >= 1 and --max-failures >= 0")
    try:
        control = space.trial_config(space.control_point(), steps).override(overrides)
        judge = choose_track(measured(control, Fingerprints()), args.track, args.target, args.record_time)
    except BadData as e:
        raise BadInput(str(e)) from None
    except ValueError as e:
        raise BadInput(f"--steps {steps}: {e}" if str(e).startswith("--steps") else str(e)) from None
    track = judge.track
    overrides["run.target_loss"] = track.target_loss
    total_steps = control.schedule.total_steps
    concurrency = concurrency_for(args, use_gpu, gpus_per_worker, workers, res, trials)
    args.name = args.name or f"{space.name}-{datetime.now():%Y%m%d-%H%M%S}"
    storage = storage_root(args)
    objective = args.objective or space.objective
    if objective == "time" and not (judge.comparable and track.exchange_rate):
        why = f"track {track.name} has no exchange_rate" if judge.comparable else judge.describe()
        raise BadInput(f"--objective time projects times through a track that holds for the run: {why}; "
                       f"use --objective loss")
    if args.scheduler == "curve" and not (judge.comparable and track.noise):
        why = f"track {track.name} has no noise" if judge.comparable else judge.describe()
        raise BadInput(f"--scheduler curve needs the seed-to-seed noise of a track that holds for the run: {why}; "
                       f"use --scheduler asha")
    plan = SweepPlan(space, args.name, storage, trials, concurrency, args.seed, args.scheduler, total_steps,
                     objective, track)
    folder = plan.folder
    restore = bool(args.resume) and (folder / "tuner.pkl").exists()
    if not args.resume and (folder / SETTINGS_FILE).exists():
        raise BadInput(f"sweep {args.name!r} already exists in {storage}: pass --resume to continue it, "
                       f"or choose another --name")
    ray_env()
    env = trial_env(folder, args.cpus_per_worker)
    spec = TrialSpec(space=space, overrides=overrides, steps=steps, workers=workers, use_gpu=use_gpu,
                     cpus_per_worker=args.cpus_per_worker, gpus_per_worker=gpus_per_worker,
                     train_storage=str(folder / "train_runs"), max_failures=args.max_failures, env=env,
                     log_dir=str(folder / "logs"), code_version=code_version(), faults=faults,
                     done_dir=str(folder / "done"), track=track if judge.comparable else None,
                     compile_cache=str(folder / "compile_cache"))
    uri = resolve_uri(args.tracking_uri)
    check_tracking_uri(uri)
    return Sweep(args, space, spec, plan, judge, uri, preset, trials, total_steps, workers, use_gpu,
                 gpus_per_worker, concurrency, env, restore)


def check_tracking_uri(uri: str) -> None:
    """Refuse an MLflow store that cannot be reached, quickly (MLflow itself retries for minutes)."""
    import urllib.error
    import urllib.request

    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise BadInput(f"MLflow tracking URI {uri} is not reachable ({getattr(e, 'reason', e)}): start the "
                           "server or fix --tracking-uri / MLFLOW_TRACKING_URI") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise BadInput(f"MLflow tracking URI {uri}: folder {folder} does not exist or is not writable: "
                           "fix --tracking-uri / MLFLOW_TRACKING_URI")


def save_settings(sweep: Sweep) -> None:
    folder = sweep.plan.folder
    folder.mkdir(parents=True, exist_ok=True)
    stored = {k: v for k, v in vars(sweep.args).items() if k not in RESUMABLE_KEEP}
    stored["tracking_uri"] = sweep.uri
    (folder / SETTINGS_FILE).write_text(json.dumps(stored, indent=1))


def add_wall_time(folder: Path, seconds: float, resumed: bool) -> float:
    """The sweep's wall time over all its runs (a resumed sweep adds to what the interrupted run spent)."""
    path = folder / "wall_time.json"
    before = json.loads(path.read_text())["wall_s"] if resumed and path.exists() else 0.0
    path.write_text(json.dumps({"wall_s": before + seconds}))
    return before + seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if args.list_spaces:
        from sweeps.spaces import available_spaces, load_space
        for name in available_spaces():
            space = load_space(name, "record")
            print(f"{name:10s} {space.description}")
            for p in space.params:
                print(f"{'':10s}   {p.describe()}")
        return 0
    try:
        sweep = plan_sweep(args)
        tracker = open_tracker(sweep)
    except BadInput as e:
        return fail(str(e))
    return run_sweep(sweep, tracker)


def open_tracker(sweep: Sweep):
    from sweeps.tracking import MlflowTracker

    s = sweep
    try:
        tracker = MlflowTracker(s.uri, s.space.name, s.plan.name, {
            "space": s.space.name, "searcher": f"optuna TPE seed {s.args.seed}", "scheduler": s.args.scheduler,
            "trials": s.trials, "concurrency": s.concurrency, "preset": s.preset, "steps": s.total_steps,
            "objective": s.plan.objective,
            "workers_per_trial": s.workers, "gpus_per_worker": s.gpus_per_worker if s.use_gpu else 0,
            "params": ", ".join(p.key for p in s.space.params), "storage": str(s.plan.folder)},
            s.judge, s.total_steps, s.spec.config_for, s.space.metric)
    except Exception as e:  # an unusable store: say so before any compute is spent
        raise BadInput(f"MLflow tracking URI {s.uri} is not usable ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}): check --tracking-uri / MLFLOW_TRACKING_URI") from None
    return tracker


def run_sweep(sweep: Sweep, tracker) -> int:
    from sweeps.results import (RANKING, ProgressPrinter, format_table, pareto_front, ranked, rows_from_grid,
                                time_split, write_parquet)
    from speedrun.config import recompiles
    from sweeps.search import make_tuner

    s, args, space = sweep, sweep.args, sweep.space
    folder = s.plan.folder
    save_settings(s)
    if s.restore:
        tracker.reopen()
    verb = "resuming" if s.restore else "sweep"
    print(f"{verb} {s.plan.name}: space {space.name} ({', '.join(p.key for p in space.params)}), preset {s.preset}, "
          f"{s.trials} trials of {s.total_steps} steps, {s.concurrency} at a time, {s.workers} "
          f"{'GPU' if s.use_gpu else 'CPU'} worker(s) each, scheduler {args.scheduler}; folder {folder}")
    print(f"verdicts: {s.judge.describe()}")
    if s.use_gpu and s.spec.config_for(space.control_point()).run.compile:
        shaping = [p.key for p in space.params if recompiles(p.key)]
        print(f"compile caches: {folder / 'inductor_cache'} and {s.spec.compile_cache}; "
              + (f"{', '.join(shaping)} change compiled graphs: each new value compiles" if shaping
                 else "every searched knob is a tensor in the compiled graphs: trials after the first start warm"))
    t0 = time.time()
    try:
        grid = execute(lambda: make_tuner(s.plan, s.spec, [ProgressPrinter(s.total_steps, space.metric), tracker],
                                          restore=s.restore),
                       args.address, s.env, need=(s.workers, s.use_gpu, s.gpus_per_worker, args.cpus_per_worker))
    except BadInput as e:
        return fail(str(e))
    wall = add_wall_time(folder, time.time() - t0, s.restore)
    keys = [p.key for p in space.params]
    tracker.load_done()
    rows = tracker.annotate(rows_from_grid(grid, keys))
    path = write_parquet(rows, folder / "results.parquet")
    split = time_split(rows, wall, s.concurrency * s.workers, s.workers)
    settled = grid.num_terminated + grid.num_errors
    if len(grid) < s.trials or settled < len(grid):
        tracker.mark_interrupted()
        print(f"\ninterrupted: {settled} of {s.trials} trials done and recorded ({path}); continue with:\n"
              f"  python sweeps/run.py --resume --name {s.plan.name} --storage {s.plan.storage}", file=sys.stderr)
        return 130
    objective = s.plan.objective
    front = pareto_front(rows) if objective == "pareto" else []
    tracker.finish_sweep(rows, tracker.curves(), pareto=front, split=split)
    print()
    print(format_table(ranked(rows, *RANKING[objective]), keys))
    if objective == "pareto":
        print(f"\nPareto front (val_loss vs training time; {len(front)} of {len(rows)} trials):")
        print(format_table(front, keys, top=len(front)))
    n_failed = sum(r["status"] == "failed" for r in rows)
    print(f"\n{len(rows)} trials in {time.time() - t0:.0f}s ({n_failed} failed); * = trial 0, the {s.preset} preset's "
          f"values (control)")
    print(verdict_line(rows, s.judge))
    print(split.format("GPU" if s.use_gpu else "worker"))
    print(f"results: {path}")
    if n_failed:
        print(f"logs of failed trials: {folder}/trial_*/error.txt and {folder / 'logs'}")
    if args.confirm_top:
        confirm_top(rows, keys, space, s.spec, s.plan, s.judge, s.uri, args, s.total_steps, s.env)
    print(f"MLflow:  {tracker.ui_hint()}")
    return 0


def verdict_line(rows: list[dict], judge) -> str:
    """The sweep's headline about the record: counts of each verdict word, and what a candidate is worth."""
    from collections import Counter

    from sweeps.records import CANDIDATE

    if not judge.comparable:
        return f"verdicts: {judge.describe()}"
    counts = Counter(r.get("verdict") or "-" for r in rows)
    line = (f"verdicts against track {judge.track.summary()}: "
            + ", ".join(f"{n} {word}" for word, n in counts.most_common()))
    if counts.get(CANDIDATE):
        line += ("\n  a candidate is one run: confirm it with several seeds "
                 "(--confirm-top, or sweeps/record.py --run-id RUN --runs 10)")
    return line


def confirm_top(rows, keys, space, spec, plan, judge, uri, args, total_steps, env) -> list[dict]:
    """Winner's-curse guard: re-run the K best finished trials with M fresh seeds each, rank them by the mean,
    and give each the multi-run verdict (record only when the acceptance test passes on a comparable track)."""
    import math

    from sweeps.acceptance import acceptance_test
    from sweeps.attempts import CANDIDATE_ARM, interleaved_seeds, make_attempt_spec
    from sweeps.records import MISSED, NOT_COMPARABLE, REACHED, RECORD
    from sweeps.results import ProgressPrinter, ranked, rows_from_grid
    from sweeps.search import SweepPlan, make_tuner
    from sweeps.tracking import MlflowTracker

    best = [r for r in ranked(rows, space.metric, space.mode) if r["status"] == "finished"][: args.confirm_top]
    track = judge.track
    confirmed = []
    for r in best:
        cfg = spec.config_for({k: r[k] for k in keys})
        order = interleaved_seeds(10_000 + 100 * r["trial_index"], args.confirm_runs, False)
        sub_name = f"{plan.name}-confirm-{r['trial_index']}"
        sub_spec = make_attempt_spec(spec, sub_name, {CANDIDATE_ARM: cfg}, order)
        sub_spec = replace(sub_spec, overrides={}, log_dir=str(plan.storage / sub_name / "logs"))
        sub_plan = SweepPlan(sub_spec.space, sub_name, plan.storage, len(order), plan.concurrency, 0, "none",
                             total_steps)
        tracker = MlflowTracker(uri, space.name, plan.name, {}, judge, total_steps, sub_spec.config_for,
                                child_kind="confirm", child_tags={"of": str(r["trial_index"])})
        print(f"confirming trial {r['trial_index']} ({r['val_loss']:.4f}) with seeds {[s for s, _ in order]}")
        grid = execute(lambda: make_tuner(sub_plan, sub_spec, [ProgressPrinter(total_steps, space.metric), tracker]),
                       args.address, env)
        done = [x for x in rows_from_grid(grid, ["run.seed"]) if x["status"] == "finished"]
        losses, times = [x["val_loss"] for x in done], [x["train_time_s"] for x in done]
        test = acceptance_test(losses, times, track.target_loss, record_time_s=track.record_time_s,
                               time_noise=track.time_noise, record_runs=track.record_runs) if len(done) > 1 else None
        mean = test.loss.mean if test else (losses[0] if losses else math.nan)
        verdict = (NOT_COMPARABLE if not judge.comparable else RECORD if test and test.accepted
                   else REACHED if mean <= track.target_loss else MISSED)
        confirmed.append({"trial_index": r["trial_index"], "sweep_val_loss": r["val_loss"], "runs": len(done),
                          "mean_val_loss": mean, "std_val_loss": test.loss.std if test else 0.0,
                          "mean_train_time_s": test.time.mean if test else math.nan,
                          "loss_p": test.loss_p if test else math.nan, "verdict": verdict,
                          "losses": losses, "times": times, **{k: r[k] for k in keys}})
    confirmed.sort(key=lambda c: c["mean_val_loss"] if space.mode == "min" else -c["mean_val_loss"])
    print("\nconfirmed ranking (mean over fresh seeds; verdict of the multi-run test):")
    print(f"{'rank':>4}  {'trial':>5}  {'sweep val_loss':>14}  {'mean val_loss':>13}  {'std':>7}  {'p':>8}  "
          f"{'mean train_s':>12}  runs  verdict")
    for i, c in enumerate(confirmed, 1):
        print(f"{i:>4}  {c['trial_index']:>5}  {c['sweep_val_loss']:>14.4f}  {c['mean_val_loss']:>13.4f}  "
              f"{c['std_val_loss']:>7.4f}  {c['loss_p']:>8.3g}  {c['mean_train_time_s']:>12.2f}  {c['runs']:>4}  "
              f"{c['verdict']}")
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    parent = tracker.parent_id
    client.log_text(parent, json.dumps(confirmed, indent=1), "confirm.json")
    client.log_batch(parent, metrics=[Metric(f"confirm_mean_val_loss_trial_{c['trial_index']}", c["mean_val_loss"],
                                             0, 0) for c in confirmed if c["mean_val_loss"] == c["mean_val_loss"]])
    for c in confirmed:
        client.set_tag(parent, f"confirm_verdict_trial_{c['trial_index']}", c["verdict"])
    return confirmed


if __name__ == "__main__":
    sys.exit(main())
