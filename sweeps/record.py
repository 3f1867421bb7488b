"""`python sweeps/record.py`: the verdict on a record claim, from fresh runs or from existing logs.

Fresh runs: one config (`--run-id` of a trial's MLflow run, `--space S --rank 1`, `--config FILE.json`, or a
preset with `--set`) over `--runs N` fresh seeds through the sweep's trial unit (or `--torchrun`). With
`--baseline RUN_ID|FILE.json` the baseline's runs are interleaved with the candidate's (A B A B ...) on the
same machine, so that drift hits both.

From logs: `--logs DIR [--baseline-logs DIR]` reads speedrun logs (one file per run, the public trainer's
`step:N/M val_loss:X train_time:Yms` lines; a file's last such line is its run's result); nothing trains.

The verdict: mean final val loss <= the target with a one-sided t-test p < 0.01, and a faster time: Welch's
test p < 0.01 against the baseline's runs, or, without a baseline, against the track's record time and its
run-to-run spread. Writes `statistics.md` (and logs it to MLflow). Exit codes: 0 accepted, 1 not accepted,
2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from sweeps.cluster import BadInput, fail
from sweeps.protocol import TrialStatus

EXPERIMENT = "record-attempts"
EXIT_ACCEPTED, EXIT_NOT_ACCEPTED = 0, 1


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python sweeps/record.py", description=__doc__.splitlines()[0],
                                epilog="exit codes: 0 accepted, 1 not accepted, 2 bad input")
    src = p.add_argument_group("the candidate (default: --preset)")
    src.add_argument("--run-id", help="an MLflow trial run whose params are the config")
    src.add_argument("--space", help="with --rank: take the config of that space's leaderboard entry")
    src.add_argument("--rank", type=int, default=1, help="leaderboard rank for --space (default 1, the best)")
    src.add_argument("--sweep", help="with --space: only this sweep's trials")
    src.add_argument("--config", help="a JSON file of flat dotted keys (a trial's config.json)")
    src.add_argument("--preset", help="record | tiny (default: tiny without CUDA, else record)")
    src.add_argument("--logs", metavar="DIR", help="judge the speedrun logs in DIR (one file per run); no training")
    src.add_argument("--trainer", metavar="PATH.py",
                     help="runs of your own train_gpt.py; --set KNOB=VALUE by the file's names (--list-knobs)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="with --trainer: environment of every run (DATA_PATH, NUM_ITERS, ...)")
    p.add_argument("--seed-env", default="", metavar="NAME",
                   help="with --trainer: the environment variable your file reads a seed from; each run gets its own")
    p.add_argument("--stall-timeout", type=float, default=900.0,
                   help="a run that reports nothing for this many seconds (before its first report, 1800 s more "
                        "for resources and compiling) is killed and fails as stalled; with --trainer, also a "
                        "script that prints nothing for that long (default 900)")
    p.add_argument("--baseline", metavar="RUN_ID|FILE.json",
                   help="baseline config (an MLflow run id or a JSON config; with --trainer, a .py file run as it "
                        "is): its runs interleave with the candidate's")
    p.add_argument("--baseline-logs", metavar="DIR", help="baseline runs from existing logs (one file per run)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, help="compress the schedule into N steps (with --trainer: the file's step "
                                                      "count, when --env NUM_ITERS does not give it)")
    p.add_argument("--runs", type=int, default=10, help="runs of the candidate (and of the baseline), default 10")
    p.add_argument("--first-seed", type=int, default=1000, help="seeds are first-seed, first-seed+1, ...")
    p.add_argument("--track", help="default: the track that holds for the run's data, validation set and steps")
    p.add_argument("--target", type=float, help="override the track's target loss")
    p.add_argument("--record-time", type=float, help="override the track's record time (seconds)")
    p.add_argument("--workers-per-trial", type=int)
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--data", help="folder of FineWeb .bin shards")
    p.add_argument("--name", help="attempt name (default record-YYYYmmdd-HHMMSS-PID)")
    p.add_argument("--storage", default=os.environ.get("SPEEDRUN_SWEEPS", "sweep_runs"))
    p.add_argument("--tracking-uri")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))
    p.add_argument("--torchrun", action="store_true", help="plain torchrun on this node, one run after another")
    return p.parse_args(argv)


# ---- where the configs come from ------------------------------------------------------------------
def config_from_run(uri: str, run_id: str):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from speedrun.config import TrainConfig
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as e:
        raise BadInput(f"MLflow run {run_id} not found in {uri} ({str(e).splitlines()[0][:120]}): "
                       "check the run id and --tracking-uri") from None
    return TrainConfig.from_dict(run.data.params), f"MLflow run {run_id} ({run.info.run_name})"


def config_from_file(path: str):
    from speedrun.config import TrainConfig
    try:
        return TrainConfig.from_dict(json.loads(Path(path).read_text())), f"file {path}"
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"config file {path}: {e}: give a JSON file of flat dotted keys (a trial's config.json)")


def candidate_config(args, uri: str):
    """The config to attempt, and a line saying where it came from."""
    from speedrun.config import TrainConfig, parse_overrides

    ranked_from = ""
    if args.space and not args.run_id:
        from sweeps.report import latest_sweep, leaderboard
        try:
            rows = leaderboard(uri, args.space, args.sweep)
        except LookupError as e:
            raise BadInput(str(e)) from None
        sweep = args.sweep or latest_sweep(rows)
        rows = [r for r in rows if r["sweep"] == sweep and r["status"] == TrialStatus.FINISHED]
        if len(rows) < args.rank:
            raise BadInput(f"sweep {sweep} of space {args.space} has {len(rows)} finished trials in {uri}; "
                           f"--rank {args.rank} does not exist (--sweep NAME picks another sweep)")
        row = rows[args.rank - 1]
        args.run_id = row["run_id"]
        ranked_from = (f"rank {args.rank} of sweep {sweep}{'' if args.sweep else ' (the latest of this space)'}: "
                       f"trial {row['trial']}, {row['steps']} steps, val_loss {row['val_loss']:.4f}; ")
    if args.run_id:
        cfg, source = config_from_run(uri, args.run_id)
        source = ranked_from + source
    elif args.config:
        cfg, source = config_from_file(args.config)
    else:
        import torch
        preset = args.preset or ("record" if torch.cuda.is_available() else "tiny")
        cfg, source = TrainConfig.preset(preset), f"preset {preset}"
    cfg = TrainConfig.resolve(sets=parse_overrides(args.sets), steps=args.steps, base=cfg)
    if args.steps:
        source += f", compressed to {args.steps} steps"
    if args.sets:
        source += " with " + ", ".join(args.sets)
    return cfg, source


def baseline_config(args, uri: str):
    if args.baseline.endswith(".json") or Path(args.baseline).exists():
        return config_from_file(args.baseline)
    return config_from_run(uri, args.baseline)


# ---- the verdict ----------------------------------------------------------------------------------
def per_run_rows(runs: list[dict], judge, baseline_times: list[float] | None) -> list[dict]:
    """Each run's own verdict, as a sweep would tag it; with baseline runs, a run is a candidate only when it
    is faster than the fastest of them."""
    from sweeps.records import run_verdict

    track = judge.track
    if baseline_times:
        track = replace(track, record_time_s=min(baseline_times), time_noise=0.0)
    rows = []
    for r in runs:
        verdict = run_verdict(r["status"], r["val_loss"], r["train_time_s"], track, judge.comparable)
        if r.get("arm") == "baseline":
            verdict = "baseline " + verdict if verdict in ("reached", "missed") else "baseline"
        rows.append({"run": r["run"], "arm": r.get("arm", "candidate"), "val_loss": r["val_loss"],
                     "train_time_s": r["train_time_s"], "verdict": verdict,
                     **({"script_exit_code": r["script_exit_code"]} if r.get("script_exit_code") else {})})
    return rows


def attempt_verdict(test) -> str:
    from sweeps.records import runs_verdict
    return runs_verdict(test.accepted, test.loss.mean, test.target)


def judge_and_report(cand: list[dict], base: list[dict] | None, judge, folder: Path, title: str,
                     notes: list[str]) -> tuple[object, list[dict]]:
    """The acceptance test over finished runs, printed, and written to folder/statistics.md and verdict.json."""
    from sweeps.acceptance import acceptance_test

    ok = lambda rs: [r for r in rs if r["status"] == TrialStatus.FINISHED and math.isfinite(r["val_loss"])]  # noqa: E731
    c, b = ok(cand), ok(base) if base is not None else None
    dropped = len(cand) - len(c) + ((len(base) - len(b)) if base is not None else 0)
    if dropped:
        notes.append(f"{dropped} run(s) did not finish their schedule and are left out of the statistics")
    notes += [f"run {r['run']} ({r['arm']}) exited with code {r['script_exit_code']} after its final validation "
              "line; its result is kept" for r in cand + (base or []) if r.get("script_exit_code")]
    if len(c) < 2 or (b is not None and len(b) < 2):
        raise BadInput(f"{len(c)} finished candidate run(s)" + (f" and {len(b)} baseline run(s)" if b is not None
                       else "") + ": the tests need at least 2 of each; give more runs or logs")
    track = judge.track
    test = acceptance_test(
        [r["val_loss"] for r in c], [r["train_time_s"] for r in c], track.target_loss,
        baseline_losses=[r["val_loss"] for r in b] if b is not None else None,
        baseline_times=[r["train_time_s"] for r in b] if b is not None else None,
        record_time_s=None if b is not None else track.record_time_s,
        time_noise=track.time_noise, record_runs=track.record_runs)
    rows = per_run_rows(cand + (base or []), judge, [r["train_time_s"] for r in b] if b else None)
    folder.mkdir(parents=True, exist_ok=True)
    md = test.statistics_md(title, rows)
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (folder / "statistics.md").write_text(md)
    (folder / "verdict.json").write_text(json.dumps(
        {"title": title, "track": track.name, "verdict": attempt_verdict(test), "runs": rows, **test.to_dict()},
        indent=1, default=str))
    print()
    print(f"{'run':>24}  {'arm':>9}  {'val_loss':>8}  {'train_s':>9}  verdict")
    for r in rows:
        print(f"{r['run']:>24}  {r['arm']:>9}  {r['val_loss']:8.4f}  {r['train_time_s']:9.3f}  {r['verdict']}")
    print()
    print(test.table())
    for n in notes:
        print(f"note: {n}")
    print(f"verdict: {attempt_verdict(test)}; statistics: {folder / 'statistics.md'}")
    return test, rows


def log_to_mlflow(tracker, name: str, test, folder: Path) -> None:
    """The attempt's statistics on its MLflow parent run, through the tracker (the one MLflow writer)."""
    numbers = {k: v for k, v in flat_numbers(test.to_dict()).items() if math.isfinite(v)}
    tracker.log_attempt(name, test.accepted, attempt_verdict(test), numbers,
                        [folder / "statistics.md", folder / "verdict.json"])


def logs_tracker(uri: str, name: str, judge):
    """An MLflow parent run for a verdict from logs (no trials): experiment record-attempts, source=logs."""
    from sweeps.tracking import MlflowTracker
    return MlflowTracker(uri, EXPERIMENT, name, {"kind": "record verdict from logs"}, judge, 0, None)


def flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_numbers(v, f"{prefix}{k}_"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            out[f"{prefix}{k}"] = float(v)
    return out


# ---- from logs --------------------------------------------------------------------------------------
def runs_from_logs(folder: str, arm: str) -> list[dict]:
    from sweeps.speedrun_logs import read_log_dir
    return [{"run": Path(r.path).name, "arm": arm, "val_loss": r.val_loss, "train_time_s": r.train_time_s,
             "status": TrialStatus.FINISHED if r.complete else TrialStatus.FAILED} for r in read_log_dir(folder)]


def verdict_from_logs(args, uri: str, name: str, folder: Path) -> int:
    from sweeps.records import get_track, Judge
    from sweeps.speedrun_logs import LogError

    try:
        judge = Judge(get_track(args.track or "track1", args.target, args.record_time))
        cand = runs_from_logs(args.logs, "candidate")
        base = runs_from_logs(args.baseline_logs, "baseline") if args.baseline_logs else None
    except (LogError, ValueError) as e:
        return fail(str(e))
    notes = [f"logs are taken as measured on track {judge.track.name}'s data and validation set "
             f"({judge.track.description})"]
    if base is None:
        notes.append(f"time tested against the track's record time {judge.track.record_time_s:g}s, measured on "
                     f"{judge.track.hardware or 'unknown hardware'}: give --baseline-logs from this machine")
    print(f"record verdict from logs: {len(cand)} candidate run(s) in {args.logs}"
          + (f", {len(base)} baseline run(s) in {args.baseline_logs}" if base is not None else "")
          + f"; target {judge.track.target_loss}")
    try:
        test, rows = judge_and_report(cand, base, judge, folder, f"Record verdict {name} (from logs)", notes)
    except BadInput as e:
        return fail(str(e))
    log_to_mlflow(logs_tracker(uri, name, judge), name, test, folder)
    return EXIT_ACCEPTED if test.accepted else EXIT_NOT_ACCEPTED


# ---- fresh runs -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sweeps.tracking import resolve_uri

    uri = resolve_uri(args.tracking_uri)
    name = args.name or f"record-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    from sweeps.storage import Storage
    storage = Storage.parse(args.storage)
    folder = storage.local(name)
    if args.logs:
        training = [f for f in ("run_id", "space", "config", "preset", "baseline", "steps", "torchrun", "trainer")
                    if getattr(args, f)] + (["set"] if args.sets else [])
        if training:
            return fail(f"--logs judges existing runs: drop --{training[0].replace('_', '-')} (it configures fresh runs)")
        rc = verdict_from_logs(args, uri, name, folder)
        storage.push_sweep(name)
        return rc
    if args.runs < 2:
        return fail(f"--runs {args.runs}: the acceptance test needs at least 2 runs (about 10 are typical)")
    try:
        if args.trainer:
            rc = script_attempt(args, uri, name, storage, folder)
        elif args.env or args.seed_env:
            raise BadInput(f"{'--env' if args.env else '--seed-env'} applies to --trainer runs: set the speedrun "
                           "trainer's knobs with --set")
        else:
            rc = attempt(args, uri, name, storage, folder)
    except BadInput as e:
        return fail(str(e))
    storage.push_sweep(name)  # statistics, verdict and logs to a URI storage
    return rc


def attempt(args, uri: str, name: str, storage, folder: Path) -> int:
    from speedrun.data import ShardError
    from sweeps.attempts import BASELINE_ARM, CANDIDATE_ARM, interleaved_seeds
    from sweeps.sweep_data import BadData, Fingerprints, measured, prepare_data
    from sweeps.records import choose_track
    from sweeps.speedrun_logs import LogError

    try:
        cfg, source = candidate_config(args, uri)
        configs = {CANDIDATE_ARM: cfg}
        if args.baseline:
            configs[BASELINE_ARM], base_source = baseline_config(args, uri)
        overrides = prepare_data(cfg, args.data)
        fingerprints = Fingerprints()
        seen = {arm: measured(c.override(overrides), fingerprints) for arm, c in configs.items()}
        timed_against_baseline = bool(args.baseline or args.baseline_logs)
        judge = choose_track(seen[CANDIDATE_ARM], args.track, args.target, args.record_time,
                             ignore_steps=timed_against_baseline)
        logged_base = runs_from_logs(args.baseline_logs, "baseline") if args.baseline_logs else None
    except (ValueError, LookupError, ShardError, BadData, LogError, OSError) as e:
        raise BadInput(str(e)) from None
    if not judge.comparable:
        hint = ("give --target LOSS with --baseline to judge it against baseline runs" if not timed_against_baseline
                else "give --target LOSS")
        if not (timed_against_baseline and args.target is not None):
            raise BadInput(f"{judge.describe().replace('; trials get no record verdict', '')}: run on the track's "
                           f"data and budget (e.g. --steps {judge.track.step_budget or 'N'}), or {hint}")
        judge = replace(judge, differences=())
    if BASELINE_ARM in seen:
        diffs = judge.track.differences(seen[BASELINE_ARM], ignore_steps=True)
        if diffs and judge.track.differences(seen[CANDIDATE_ARM], ignore_steps=True) != diffs:
            raise BadInput(f"the baseline measures something else than the candidate ({'; '.join(diffs)}): "
                           "both must use the same data and validation set")
    overrides["run.target_loss"] = judge.track.target_loss
    order = interleaved_seeds(args.first_seed, args.runs, BASELINE_ARM in configs)
    print(f"record attempt {name}: {args.runs} runs of {source}"
          + (f", interleaved with {args.runs} of the baseline ({base_source})" if BASELINE_ARM in configs else "")
          + f"; {judge.describe()}; logs in {folder / 'logs'}")
    t0 = time.time()
    tracker = None
    if args.torchrun:
        runs = run_with_torchrun(configs, overrides, order, folder, args)
    else:
        runs, tracker = run_with_ray(configs, overrides, order, name, storage, judge, uri, args)
    notes = []
    if logged_base is not None:
        notes.append(f"baseline runs from {args.baseline_logs}, not interleaved with the candidate's: drift between "
                     "the two sets counts as a difference")
    elif BASELINE_ARM not in configs:
        notes.append(f"time tested against the track's record time {judge.track.record_time_s:g}s (measured on "
                     f"{judge.track.hardware or 'unknown hardware'}); --baseline times both on this machine")
    return report_attempt(runs, logged_base, judge, name, folder, notes, tracker, t0)


def report_attempt(runs, logged_base, judge, name, folder, notes, tracker, t0) -> int:
    """The verdict over an attempt's runs, printed, written and logged; the exit code."""
    from sweeps.attempts import BASELINE_ARM, CANDIDATE_ARM

    cand = [r for r in runs if r["arm"] == CANDIDATE_ARM]
    base = [r for r in runs if r["arm"] == BASELINE_ARM] or logged_base
    test, rows = judge_and_report(cand, base, judge, folder, f"Record attempt {name}", notes)
    if tracker is not None:
        log_to_mlflow(tracker, name, test, folder)
    print(f"\n{len(runs)} runs in {time.time() - t0:.0f}s; logs: {folder / 'logs'}")
    return EXIT_ACCEPTED if test.accepted else EXIT_NOT_ACCEPTED


def script_attempt(args, uri: str, name: str, storage, folder: Path) -> int:
    """`--trainer PATH`: fresh runs of the contributor's file (and a baseline file's, interleaved), judged as logs
    are: the file reads its own data, so the track is taken as holding for it and the statistics say so."""
    from sweeps.attempts import BASELINE_ARM, interleaved_seeds
    from sweeps.records import Judge, get_track
    from sweeps.script_attempts import run_with_torchrun, script_arms
    from sweeps.script_plan import parse_env, script_steps

    arms = script_arms(args)
    env = parse_env(args.env)
    if args.data:
        env.setdefault("DATA_PATH", str(Path(args.data).expanduser().resolve()))
    steps = script_steps(args.steps, env)
    try:
        judge = Judge(get_track(args.track or "track1", args.target, args.record_time))
    except (ValueError, LookupError) as e:
        raise BadInput(str(e)) from None
    order = interleaved_seeds(args.first_seed, args.runs, BASELINE_ARM in arms)
    knobs = ", ".join(f"{k}={v!r}" for k, v in arms["candidate"][1].items()) or "its knobs as they are"
    print(f"record attempt {name}: {args.runs} runs of {arms['candidate'][0]} ({knobs}), {steps} steps"
          + (f", interleaved with {args.runs} of {arms[BASELINE_ARM][0]} as it is" if BASELINE_ARM in arms else "")
          + f"; target {judge.track.target_loss}; runs in {folder}")
    data = env.get("DATA_PATH", "the file's default path")
    notes = [f"the runs read their own data ({data}): taken as measured on "
             f"track {judge.track.name}'s data and validation set ({judge.track.description})"]
    if not args.baseline:
        notes.append(f"time tested against the track's record time {judge.track.record_time_s:g}s (measured on "
                     f"{judge.track.hardware or 'unknown hardware'}); --baseline PATH.py times both on this machine")
    t0 = time.time()
    if args.torchrun:
        import torch
        nproc = args.workers_per_trial or max(1, torch.cuda.device_count())
        runs, tracker = run_with_torchrun(arms, env, order, folder, nproc, args.seed_env), None
    else:
        runs, tracker = run_script_with_ray(arms, env, order, name, storage, judge, uri, args, steps)
    return report_attempt(runs, None, judge, name, folder, notes, tracker, t0)


def run_with_ray(configs, overrides, order, name, storage, judge, uri, args) -> tuple[list[dict], object]:
    from sweeps.attempts import make_attempt_spec
    from sweeps.cluster import concurrency_for, ray_env, resources_for, trial_env, worker_layout
    from sweeps.tracking import code_version
    from sweeps.trial import TrialSpec

    res = resources_for(args.address)
    use_gpu, gpus_per_worker, workers = worker_layout(args, configs["candidate"].run.device, res)
    if not use_gpu:  # CPU reservations train on the CPU, never on a GPU no trial reserved
        overrides.update({"run.threads": max(1, int(args.cpus_per_worker)), "run.device": "cpu"})
    concurrency = concurrency_for(args, use_gpu, gpus_per_worker, workers, res, len(order))
    folder = storage.local(name)
    ray_env()
    env = trial_env(folder, args.cpus_per_worker, storage=storage)
    base = TrialSpec(space=None, overrides=overrides, workers=workers, use_gpu=use_gpu,
                     cpus_per_worker=args.cpus_per_worker, gpus_per_worker=gpus_per_worker,
                     train_storage=storage.uri(name, "train_runs"), max_failures=1, env=env,
                     log_dir=str(folder / "logs"), code_version=code_version(),
                     compile_cache=storage.uri(name, "compile_cache"), storage=storage.root)
    spec = make_attempt_spec(base, EXPERIMENT, configs, order)
    return attempt_on_ray(spec, order, name, storage, judge, uri, args, configs["candidate"].schedule.total_steps,
                          concurrency, {"workers_per_trial": workers})


def run_script_with_ray(arms, script_env, order, name, storage, judge, uri, args, steps) -> tuple[list[dict], object]:
    """The runs of --trainer files, each a script trial (sweeps.script_trial) on this node's or the cluster's GPUs."""
    from sweeps.cluster import concurrency_for, ray_env, resources_for, trial_env, worker_layout
    from sweeps.script_attempts import make_script_attempt_spec
    from sweeps.script_trial import ScriptSpec
    from sweeps.tracking import code_version

    res = resources_for(args.address)
    try:
        use_gpu, gpus_per_worker, workers = worker_layout(args, "auto", res, gpu_by_default=True)
    except ValueError as e:
        raise BadInput(str(e)) from None
    concurrency = concurrency_for(args, use_gpu, gpus_per_worker, workers, res, len(order))
    folder = storage.local(name)
    ray_env()
    env = {**trial_env(folder, args.cpus_per_worker, storage=storage), **script_env,
           **({"TRAIN_ENABLE_SHARE_CUDA_VISIBLE_DEVICES": "1"} if use_gpu else {})}
    base = ScriptSpec(space=None, source_path=arms["candidate"][0], code_dir=str(folder / "trial_code"),
                      workers=workers, use_gpu=use_gpu, cpus_per_worker=args.cpus_per_worker,
                      gpus_per_worker=gpus_per_worker, env=env, train_storage=storage.uri(name, "train_runs"),
                      max_failures=1, done_dir=str(folder / "done"), stall_s=args.stall_timeout,
                      code_version=code_version(), storage=storage.root)
    spec = make_script_attempt_spec(base, EXPERIMENT, arms, order, args.seed_env)
    return attempt_on_ray(spec, order, name, storage, judge, uri, args, steps, concurrency,
                          {"workers_per_trial": workers, "trainer": arms["candidate"][0]},
                          files_for=spec.trial_files, judge_each_run=False)


def attempt_on_ray(spec, order, name, storage, judge, uri, args, total_steps, concurrency, params,
                   **tracker_options) -> tuple[list[dict], object]:
    """One Tune trial per (seed, arm) of `order`, in that order; each run's result by seed, and the tracker."""
    from sweeps.cluster import RESOURCE_TIMEOUT_S, execute
    from sweeps.results import ProgressPrinter, rows_from_grid
    from sweeps.search import SweepPlan, make_tuner
    from sweeps.stall import StallWatchdog
    from sweeps.tracking import MlflowTracker

    plan = SweepPlan(spec.space, name, storage, len(order), concurrency, 0, "none", total_steps)
    tracker = MlflowTracker(uri, EXPERIMENT, name, {"kind": "record attempt", "runs": args.runs,
                                                    "seeds": [s for s, _ in order], **params},
                            judge, total_steps, spec.config_for, tags_for=spec.tags_for, **tracker_options)
    callbacks = [StallWatchdog(args.stall_timeout, RESOURCE_TIMEOUT_S),  # first: it adds to error.txt
                 ProgressPrinter(total_steps, "val_loss", trials=len(order)), tracker]
    grid = execute(lambda: make_tuner(plan, spec, callbacks), args.address, spec.env)
    rows = tracker.annotate(rows_from_grid(grid, ["run.seed"]))
    tracker.finish_sweep(rows, tracker.curves())
    by_seed = {int(r["run.seed"]): r for r in rows}
    runs = []
    for seed, arm in order:
        r = by_seed.get(seed, {"status": TrialStatus.FAILED, "val_loss": None, "train_time_s": None})
        finished = r["status"] == TrialStatus.FINISHED and r.get("val_loss") is not None
        runs.append({"run": f"seed {seed}", "arm": arm, "status": r["status"] if finished else TrialStatus.FAILED,
                     "val_loss": r["val_loss"] if finished else math.nan,
                     "train_time_s": r.get("train_time_s") or math.nan})
    return runs, tracker


def run_with_torchrun(configs, overrides, order, folder: Path, args) -> list[dict]:
    """Without Ray: `torchrun -m speedrun` once per run, in order, on this node's GPUs (or one CPU process)."""
    import torch
    nproc = args.workers_per_trial or max(1, torch.cuda.device_count())
    out = []
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    for seed, arm in order:
        run_cfg = configs[arm].override({**overrides, "run.seed": seed})
        cfg_file = folder / f"config_{arm}_seed{seed}.json"
        cfg_file.write_text(json.dumps(run_cfg.to_dict()))
        result_file = folder / f"result_{arm}_seed{seed}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "speedrun", "--config", str(cfg_file), "--json", str(result_file)]
        with open(folder / "logs" / f"{arm}_seed{seed}.txt", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
        r = json.loads(result_file.read_text()) if result_file.exists() else {}
        out.append({"run": f"seed {seed}", "arm": arm, "val_loss": r.get("val_loss", math.nan),
                    "train_time_s": r.get("train_time_s", math.nan), "status": r.get("status", TrialStatus.FAILED)})
    return out


if __name__ == "__main__":
    sys.exit(main())
