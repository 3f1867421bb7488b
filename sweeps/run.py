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
    p.add_argument("--scheduler", choices=["asha", "none"], default="asha", help="early stopping (default asha)")
    p.add_argument("--name", help="sweep name (default: SPACE-YYYYmmdd-HHMMSS)")
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


def execute(make_tuner_fn, address: str | None, env: dict):
    """Start (or join) Ray, run the Tuner, shut down what we started; return Tune's ResultGrid."""
    import ray

    own_ray = not ray.is_initialized()  # a caller (a test, a notebook) may have started Ray already
    runtime_env = {"env_vars": env}
    if address:  # a remote cluster gets this checkout's code, not whatever its nodes have installed
        import speedrun
        import sweeps
        runtime_env["py_modules"] = [speedrun, sweeps]
    if own_ray:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False,
                 logging_level="WARNING", configure_logging=True)
    try:
        return make_tuner_fn().fit()
    finally:
        if own_ray:
            ray.shutdown()


def worker_layout(args, preset: str, res: Resources) -> tuple[bool, float, int]:
    """(use_gpu, gpus_per_worker, workers per trial) from the flags and the machine; ValueError if it cannot fit."""
    from sweeps.trial import TRIAL_CPU

    use_gpu = preset == "record" and res.gpus > 0 if args.gpus_per_worker is None else args.gpus_per_worker > 0
    gpus_per_worker = (1.0 if use_gpu else 0.0) if args.gpus_per_worker is None else args.gpus_per_worker
    workers = args.workers_per_trial or (max(1, int(res.gpus // gpus_per_worker)) if use_gpu else 1)
    if use_gpu and not args.address and workers * gpus_per_worker > res.gpus:
        raise ValueError(f"--workers-per-trial {workers} x --gpus-per-worker {gpus_per_worker:g} needs "
                         f"{workers * gpus_per_worker:g} GPUs; this machine has {res.gpus}")
    if not use_gpu and not args.address and workers * args.cpus_per_worker + TRIAL_CPU > res.cpus:
        raise ValueError(f"--workers-per-trial {workers} x --cpus-per-worker {args.cpus_per_worker:g} (+{TRIAL_CPU} "
                         f"for the trial itself) needs more than the {res.cpus:g} CPUs here: lower one of them")
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
    from sweeps.trial import worker_env

    return worker_env({"OMP_NUM_THREADS": str(max(1, int(cpus_per_worker))),
                       "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor_cache"),
                       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from sweeps.spaces import SpaceError, available_spaces, load_space

    if args.list_spaces:
        for name, path in available_spaces().items():
            space = load_space(name, "record")
            print(f"{name:10s} {space.description}")
            for p in space.params:
                print(f"{'':10s}   {p.describe()}")
        return 0
    if not args.space:
        return fail(f"--space is required: one of {', '.join(available_spaces())} (see --list-spaces)")

    from speedrun.data import ShardError

    res = local_resources()
    preset = choose_preset(args, res)
    from speedrun.__main__ import parse_sets

    try:
        space = load_space(args.space, preset)
        if args.sets:
            space = replace(space, fixed={**space.fixed, **parse_sets(args.sets)})
            space.base_config()
        overrides = prepare_data(space.base_config(), args)
    except (SpaceError, ShardError, ValueError) as e:
        return fail(str(e))
    try:
        use_gpu, gpus_per_worker, workers = worker_layout(args, preset, res)
    except ValueError as e:
        return fail(str(e))
    if not use_gpu:
        overrides["run.threads"] = max(1, int(args.cpus_per_worker))
    from sweeps.records import default_track, get_track

    try:
        track = get_track(args.track or default_track(preset), args.target, args.record_time)
    except ValueError as e:
        return fail(str(e))
    overrides["run.target_loss"] = track.target_loss
    steps = args.steps if args.steps is not None else space.steps
    trials = args.trials or space.trials
    try:
        total_steps = space.trial_config(space.control_point(), steps).schedule.total_steps
    except ValueError as e:
        return fail(f"--steps {steps}: {e}")
    concurrency = concurrency_for(args, use_gpu, gpus_per_worker, workers, res, trials)
    name = args.name or f"{space.name}-{datetime.now():%Y%m%d-%H%M%S}"
    storage = Path(args.storage).expanduser().resolve() if "://" not in args.storage else args.storage

    ray_env()
    from sweeps.results import ProgressPrinter, format_table, ranked, rows_from_grid, write_parquet
    from sweeps.search import SweepPlan, make_tuner
    from sweeps.tracking import MlflowTracker, code_version, resolve_uri
    from sweeps.trial import TrialSpec

    plan = SweepPlan(space, name, Path(storage), trials, concurrency, args.seed, args.scheduler, total_steps)
    sweep_folder = plan.folder
    env = trial_env(sweep_folder, args.cpus_per_worker)
    spec = TrialSpec(space=space, overrides=overrides, steps=steps, workers=workers, use_gpu=use_gpu,
                     cpus_per_worker=args.cpus_per_worker, gpus_per_worker=gpus_per_worker,
                     train_storage=str(sweep_folder / "train_runs"), max_failures=args.max_failures, env=env,
                     log_dir=str(sweep_folder / "logs"), code_version=code_version())

    uri = resolve_uri(args.tracking_uri)
    try:
        tracker = MlflowTracker(uri, space.name, name, {
            "space": space.name, "searcher": f"optuna TPE seed {args.seed}", "scheduler": args.scheduler,
            "trials": trials, "concurrency": concurrency, "preset": preset, "steps": total_steps,
            "workers_per_trial": workers, "gpus_per_worker": gpus_per_worker if use_gpu else 0,
            "params": ", ".join(p.key for p in space.params), "storage": str(sweep_folder)},
            track, total_steps, spec.config_for, space.metric)
    except Exception as e:  # an unreachable or unusable store: say so before any compute is spent
        return fail(f"MLflow tracking URI {uri} is not usable ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                    "check --tracking-uri / MLFLOW_TRACKING_URI")
    print(f"sweep {name}: space {space.name} ({', '.join(p.key for p in space.params)}), preset {preset}, "
          f"{trials} trials of {total_steps} steps, {concurrency} at a time, {workers} "
          f"{'GPU' if use_gpu else 'CPU'} worker(s) each, scheduler {args.scheduler}; folder {sweep_folder}")
    t0 = time.time()
    grid = execute(lambda: make_tuner(plan, spec, [ProgressPrinter(total_steps, space.metric), tracker]),
                   args.address, env)
    keys = [p.key for p in space.params]
    rows = tracker.annotate(rows_from_grid(grid, keys))
    path = write_parquet(rows, sweep_folder / "results.parquet")
    tracker.finish_sweep(rows, tracker.curves())
    print()
    print(format_table(ranked(rows, space.metric, space.mode), keys))
    n_beat = sum(bool(r.get("beat_record")) for r in rows)
    print(f"\n{len(rows)} trials in {time.time() - t0:.0f}s; * = trial 0, the {preset} preset's values (control); "
          f"{n_beat} beat the record of track {track.name} ({track.target_loss} in {track.record_time_s:g}s)")
    print(f"results: {path}")
    if args.confirm_top:
        confirm_top(rows, keys, space, spec, plan, track, uri, args, total_steps, env)
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
