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

EXIT_BAD_INPUT = 2


@dataclass
class Resources:
    cpus: float
    gpus: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python sweeps/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--space", help="a named space (see --list-spaces) or a .toml file")
    p.add_argument("--list-spaces", action="store_true", help="print the shipped spaces and exit")
    p.add_argument("--trials", type=int, help="number of trials (default: the space's, per preset)")
    p.add_argument("--concurrency", type=int, help="trials at once (default: as many as the resources fit)")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (default: all GPUs, or 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (default 1 with GPUs)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    p.add_argument("--preset", choices=["record", "tiny"], help="default: record with CUDA + FineWeb, else tiny")
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
    p.add_argument("--track", help="target loss and record time to judge trials by (default: track1 for the "
                   "record preset, tiny for tiny; see sweeps/tracks.toml)")
    p.add_argument("--record-time", type=float, help="override the track's record time (seconds)")
    p.add_argument("--target", type=float, help="override the track's target validation loss")
    p.add_argument("--confirm-top", type=int, default=0, metavar="K",
                   help="after the sweep, re-run the K best trials with fresh seeds and rank them by the mean")
    p.add_argument("--confirm-runs", type=int, default=3, metavar="M", help="seeds per re-run trial (default 3)")
    p.add_argument("--inject-faults", help=argparse.SUPPRESS)  # test-only, see sweeps.trial.FaultPlan
    return p.parse_args(argv)


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def local_resources() -> Resources:
    import torch
    return Resources(cpus=float(os.cpu_count() or 1), gpus=torch.cuda.device_count())


def fineweb_dir(args) -> Path:
    return Path(args.data or os.environ.get("SPEEDRUN_DATA", "data/fineweb10B")).expanduser().resolve()


def choose_preset(args, res: Resources) -> str:
    if args.preset:
        return args.preset
    from speedrun.data import ShardError, find_shards
    try:
        has_data = bool(find_shards(fineweb_dir(args), "fineweb_train_*.bin"))
    except ShardError:
        has_data = False
    if res.gpus and has_data:
        return "record"
    why = "no CUDA device" if not res.gpus else f"no FineWeb shards in {fineweb_dir(args)}"
    print(f"notice: {why}: sweeping the tiny preset on CPU with the generated sample corpus "
          f"(pass --preset record to insist)", file=sys.stderr)
    return "tiny"


def prepare_data(preset_cfg, args) -> dict:
    """Validate or create the data before any compute is spent; return the config overrides for workers."""
    from speedrun.data import find_shards, validate_shards
    from speedrun.sample import ensure_sample_corpus
    from speedrun.train import data_patterns

    if preset_cfg.data.source == "sample":
        folder = ensure_sample_corpus(args.data or None)
    else:
        folder = fineweb_dir(args)
    train_pattern, val_pattern = data_patterns(preset_cfg)
    validate_shards(find_shards(folder, train_pattern))
    validate_shards(find_shards(folder, val_pattern))
    return {"data.data_dir": str(Path(folder).resolve())}


def ray_env() -> None:
    """Driver-side settings, before Ray starts."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # reports block ~2 s otherwise
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # train-loss reports carry no val_loss
    # Save the experiment state (trials + searcher) at most a second apart (default: every 10 s or more), so
    # a driver killed outright loses at most the last second: a trial finished before that is not re-run.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")


def execute(make_tuner_fn, address: str | None, env: dict, need: tuple | None = None):
    """Start (or join) Ray, run the Tuner, shut down what we started; return Tune's ResultGrid.
    `need` = (workers, use_gpu, gpus_per_worker, cpus_per_worker) of one trial: refused (BadInput) before
    any trial starts when the cluster, all nodes together, cannot hold it."""
    import ray

    own_ray = not ray.is_initialized()  # a caller (a test, a notebook) may have started Ray already
    runtime_env = {"env_vars": env}
    if address:  # a remote cluster gets this checkout's code, not whatever its nodes have installed
        import speedrun
        import sweeps
        runtime_env["py_modules"] = [speedrun, sweeps]
    if own_ray:
        extra = {} if address else local_ray_options()
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False,
                 logging_level="WARNING", configure_logging=True, **extra)
    try:
        if need:
            check_capacity(ray.cluster_resources(), "the Ray cluster", *need)
        return make_tuner_fn().fit()
    finally:
        if own_ray:
            ray.shutdown()


def local_ray_options() -> dict:
    """`ray.init` arguments (and environment) for a Ray this process starts on its own machine, as the CLI, the
    benchmarks and the tests start it. Ray Train's preemption watcher (one more actor per trial, polling for
    node drains a cloud autoscaler announces) is off: a single local node is never drained. A set
    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER wins."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return {"num_cpus": local_ray_cpus()}


def local_ray_cpus() -> int:
    """The logical CPUs a local Ray is started with: twice this machine's. Ray 2.60 can leave a stopped trial's
    worker reservation held in the raylet after the GCS has removed its placement group (seen after a prune on
    2 cores: the next trial then waited for ever); the headroom absorbs such a leak. It cannot oversubscribe:
    the searcher's concurrency limit (concurrency_for, from the real CPUs) caps live trials."""
    return 2 * (os.cpu_count() or 1)


def check_capacity(have: dict, where: str, workers: int, use_gpu: bool, gpus_per_worker: float,
                   cpus_per_worker: float) -> None:
    """BadInput unless `have` ({"CPU": n, "GPU": m}: this machine, or the whole Ray cluster) holds one trial."""
    from sweeps.trial import TRIAL_CPU

    have_gpu, have_cpu = have.get("GPU", 0), have.get("CPU", 0)
    if use_gpu and workers * gpus_per_worker > have_gpu:
        raise BadInput(f"a trial needs {workers * gpus_per_worker:g} GPUs (--workers-per-trial {workers} x "
                       f"--gpus-per-worker {gpus_per_worker:g}); {where} has {have_gpu:g}: lower them or add GPUs")
    if workers * cpus_per_worker + TRIAL_CPU > have_cpu:
        raise BadInput(f"a trial needs {workers * cpus_per_worker + TRIAL_CPU:g} CPUs (--workers-per-trial {workers} x "
                       f"--cpus-per-worker {cpus_per_worker:g}, +{TRIAL_CPU} for the trial itself); {where} has "
                       f"{have_cpu:g}: lower one of them")


def worker_layout(args, preset: str, res: Resources) -> tuple[bool, float, int]:
    """(use_gpu, gpus_per_worker, workers per trial) from the flags and the machine; BadInput if a trial cannot
    fit on this machine (on a remote cluster, execute() checks once connected)."""
    use_gpu = preset == "record" and res.gpus > 0 if args.gpus_per_worker is None else args.gpus_per_worker > 0
    gpus_per_worker = (1.0 if use_gpu else 0.0) if args.gpus_per_worker is None else args.gpus_per_worker
    workers = args.workers_per_trial or (max(1, int(res.gpus // gpus_per_worker)) if use_gpu else 1)
    if not args.address:
        check_capacity({"CPU": res.cpus, "GPU": res.gpus}, "this machine", workers, use_gpu, gpus_per_worker,
                       args.cpus_per_worker)
    return use_gpu, gpus_per_worker, workers


def concurrency_for(args, use_gpu: bool, gpus_per_worker: float, workers: int, res: Resources, trials: int) -> int:
    """--concurrency, else as many trials as this machine's CPUs or GPUs hold (1 on a remote cluster)."""
    from sweeps.trial import TRIAL_CPU

    if args.concurrency:
        return args.concurrency
    if args.address:
        fit = 1
    elif use_gpu:
        fit = int(res.gpus // (workers * gpus_per_worker))
    else:
        fit = int(res.cpus // (workers * args.cpus_per_worker + TRIAL_CPU))
    return max(1, min(fit, trials))


def trial_env(folder: Path, cpus_per_worker: float) -> dict:
    """Environment of every trial and worker process of a sweep or record attempt in `folder`."""
    from sweeps.compile_cache import cache_env
    from sweeps.trial import worker_env

    return worker_env({"OMP_NUM_THREADS": str(max(1, int(cpus_per_worker))),
                       **cache_env(str(folder / "inductor_cache")),
                       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]})


class BadInput(ValueError):
    """Input that must be refused before any compute is spent: exit 2 with this one-line message."""


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
    track: object
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
    """Check every input and resolve the sweep; BadInput on anything that cannot run."""
    from speedrun.__main__ import parse_sets
    from speedrun.data import ShardError
    from sweeps.records import default_track, get_track
    from sweeps.search import SweepPlan
    from sweeps.spaces import SpaceError, available_spaces, load_space
    from sweeps.tracking import code_version, resolve_uri
    from sweeps.trial import FaultPlan, TrialSpec

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
        overrides = prepare_data(space.base_config(), args)
        use_gpu, gpus_per_worker, workers = worker_layout(args, preset, res)
        track = get_track(args.track or default_track(preset), args.target, args.record_time)
        faults = FaultPlan.parse(args.inject_faults) if args.inject_faults else None
    except (SpaceError, ShardError, ValueError) as e:
        raise BadInput(str(e)) from None
    if not use_gpu:
        overrides["run.threads"] = max(1, int(args.cpus_per_worker))
    overrides["run.target_loss"] = track.target_loss
    steps = args.steps if args.steps is not None else space.steps
    trials = args.trials or space.trials
    if trials < 1 or args.max_failures < 0:
        raise BadInput("--trials must be >= 1 and --max-failures >= 0")
    try:
        total_steps = space.trial_config(space.control_point(), steps).schedule.total_steps
    except ValueError as e:
        raise BadInput(f"--steps {steps}: {e}") from None
    concurrency = concurrency_for(args, use_gpu, gpus_per_worker, workers, res, trials)
    args.name = args.name or f"{space.name}-{datetime.now():%Y%m%d-%H%M%S}"
    storage = storage_root(args)
    objective = args.objective or space.objective
    if objective == "time" and not track.exchange_rate:
        raise BadInput(f"--objective time needs the track's exchange_rate; track {track.name} has none "
                       f"(add it in sweeps/tracks.toml)")
    if args.scheduler == "curve" and not track.noise:
        raise BadInput(f"--scheduler curve needs the track's seed-to-seed noise; track {track.name} has none "
                       f"(add `noise` in sweeps/tracks.toml)")
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
                     done_dir=str(folder / "done"), track=track, compile_cache=str(folder / "compile_cache"))
    uri = resolve_uri(args.tracking_uri)
    check_tracking_uri(uri)
    return Sweep(args, space, spec, plan, track, uri, preset, trials, total_steps, workers, use_gpu,
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
            s.track, s.total_steps, s.spec.config_for, s.space.metric)
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
    n_beat = sum(bool(r.get("beat_record")) for r in rows)
    n_failed = sum(r["status"] == "failed" for r in rows)
    print(f"\n{len(rows)} trials in {time.time() - t0:.0f}s ({n_failed} failed); * = trial 0, the {s.preset} preset's "
          f"values (control); {n_beat} beat the record of track {s.track.name} ({s.track.target_loss} in "
          f"{s.track.record_time_s:g}s)")
    print(split.format("GPU" if s.use_gpu else "worker"))
    print(f"results: {path}")
    if n_failed:
        print(f"logs of failed trials: {folder}/trial_*/error.txt and {folder / 'logs'}")
    if args.confirm_top:
        confirm_top(rows, keys, space, s.spec, s.plan, s.track, s.uri, args, s.total_steps, s.env)
    print(f"MLflow:  {tracker.ui_hint()}")
    return 0


def confirm_top(rows, keys, space, spec, plan, track, uri, args, total_steps, env) -> list[dict]:
    """Winner's-curse guard: re-run the K best finished trials with M fresh seeds each; rank by the mean."""
    import statistics
    from dataclasses import replace as dc_replace

    from sweeps.record import attempt_space
    from sweeps.results import ProgressPrinter, ranked, rows_from_grid
    from sweeps.search import SweepPlan, make_tuner
    from sweeps.tracking import MlflowTracker

    best = [r for r in ranked(rows, space.metric, space.mode) if r["status"] == "finished"][: args.confirm_top]
    confirmed = []
    for r in best:
        cfg = spec.config_for({k: r[k] for k in keys})
        seeds = [10_000 + 100 * r["trial_index"] + i for i in range(args.confirm_runs)]
        sub = attempt_space(cfg, seeds)
        sub_plan = SweepPlan(sub, f"{plan.name}-confirm-{r['trial_index']}", plan.storage, len(seeds),
                             plan.concurrency, 0, "none", total_steps)
        sub_spec = dc_replace(spec, space=sub, overrides={}, steps=0, log_dir=str(sub_plan.folder / "logs"))
        tracker = MlflowTracker(uri, space.name, plan.name, {}, track, total_steps, sub_spec.config_for,
                                child_kind="confirm", child_tags={"of": str(r["trial_index"])})
        print(f"confirming trial {r['trial_index']} ({r['val_loss']:.4f}) with seeds {seeds}")
        grid = execute(lambda: make_tuner(sub_plan, sub_spec, [ProgressPrinter(total_steps, space.metric), tracker]),
                       args.address, env)
        losses = [x["val_loss"] for x in rows_from_grid(grid, ["run.seed"]) if x["status"] == "finished"]
        confirmed.append({"trial_index": r["trial_index"], "sweep_val_loss": r["val_loss"], "runs": len(losses),
                          "mean_val_loss": statistics.fmean(losses) if losses else float("nan"),
                          "std_val_loss": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                          "losses": losses, **{k: r[k] for k in keys}})
    confirmed.sort(key=lambda c: c["mean_val_loss"] if space.mode == "min" else -c["mean_val_loss"])
    print("\nconfirmed ranking (mean over fresh seeds):")
    print(f"{'rank':>4}  {'trial':>5}  {'sweep val_loss':>14}  {'mean val_loss':>13}  {'std':>7}  runs")
    for i, c in enumerate(confirmed, 1):
        print(f"{i:>4}  {c['trial_index']:>5}  {c['sweep_val_loss']:>14.4f}  {c['mean_val_loss']:>13.4f}  "
              f"{c['std_val_loss']:>7.4f}  {c['runs']}")
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    parent = tracker.parent_id
    client.log_text(parent, json.dumps(confirmed, indent=1), "confirm.json")
    client.log_batch(parent, metrics=[Metric(f"confirm_mean_val_loss_trial_{c['trial_index']}", c["mean_val_loss"],
                                             0, 0) for c in confirmed if c["mean_val_loss"] == c["mean_val_loss"]])
    return confirmed


if __name__ == "__main__":
    sys.exit(main())
